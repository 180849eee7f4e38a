"""``tyche codebook <command>``: train, cache, search, intervene on, steer and browse codebooks.

Examples::

    tyche codebook train --model zoo:shakespeare-lm --sites 'attn_heads.*,mlp_out.*' \\
        --num_codes 512 --k 4 --steps 600 --out runs/cb-shakespeare
    tyche codebook cache --model runs/cb-shakespeare --out runs/cb-cache
    tyche codebook search --cache runs/cb-cache --pattern '\\bking\\b'
    tyche codebook contexts --cache runs/cb-cache --site mlp_out.1 --code 42
    tyche codebook intervene --model runs/cb-shakespeare --prompt 'To be' --force mlp_out.1:42
    tyche codebook steer --cache runs/cb-cache --words king,love,blood,death
    tyche codebook tokfsm --model zoo:tokfsm
    tyche codebook app --cache runs/cb-cache
    torchrun --nproc_per_node=2 -m tyche codebook train ...   # batches split over processes
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tyche.commandline import (
    CommandError,
    check_number,
    check_readable_text,
    check_writable_folder,
    on_interrupt,
    parse_config,
    resume_command,
    split_list,
)

if TYPE_CHECKING:
    import torch

__all__ = ["main"]

PROG = "tyche codebook"


@dataclass
class ModelArgs:
    model: str = "zoo:shakespeare-lm"
    """'zoo:NAME' or a local folder (a save_pretrained model, with or without codebooks)"""


@dataclass
class DataArgs:
    data: str = "zoo:shakespeare"
    """text: 'zoo:shakespeare', 'zoo:stdlib-docs' or a .txt file; or 'fsm:FOLDER' / 'fsm:zoo:tokfsm'
    for TokFSM walks from that folder's fsm.json"""
    seq_len: int = 128
    """tokens per sequence"""
    seed: int = 0
    """seed of the data draw (and of training)"""


@dataclass
class TrainArgs(ModelArgs, DataArgs):
    """Attach codebooks to a model (or continue a codebook model) and train them."""

    sites: str = "attn_heads.*,mlp_out.*"
    """site patterns for new codebooks, comma separated (ignored for a codebook model)"""
    num_codes: int = 512
    """codes per codebook (per head for attn_heads)"""
    k: int = 1
    """codes chosen per token"""
    similarity: Literal["inner_product", "cosine", "euclidean"] = "inner_product"
    """how inputs are compared with codes"""
    loss: Literal["aeloss", "fullaeloss", "vqvae", "base"] = "aeloss"
    """gradient variant of the codebooks (see tyche.codebook.layer)"""
    beta: float = 0.25
    """commitment weight (fullaeloss, vqvae)"""
    steps: int = 600
    """optimiser steps"""
    batch_size: int = 16
    """sequences per step (split over torchrun processes)"""
    lr: float = 1e-3
    """peak learning rate of the base model"""
    code_lr: float | None = None
    """peak learning rate of the codebooks (default: --lr)"""
    weight_decay: float = 0.01
    """AdamW weight decay of the base model (codebooks: none)"""
    warmup_steps: int = 50
    """linear warm-up steps"""
    schedule: Literal["cosine", "constant"] = "cosine"
    """learning-rate schedule after warm-up"""
    freeze_base: bool = False
    """train only the codebooks"""
    snap_after: int = 0
    """steps with the codebooks passing their inputs through (a warm start) before they snap"""
    from_scratch: bool = False
    """re-initialise the model's weights (seeded by --seed) and train it from scratch"""
    kmeans_init: bool = False
    """initialise the codes by k-means on the model's activations"""
    kmeans_tokens: int = 16384
    """tokens of activations clustered by --kmeans_init"""
    replace_dead_every: int = 0
    """replace codes unused for this many steps by recent inputs (0: never)"""
    log_every: int = 50
    """steps between logged metrics"""
    checkpoint_every: int = 0
    """steps between checkpoints (0: only at the end)"""
    resume: bool = False
    """continue the run in --out from its checkpoint"""
    eval_sequences: int = 64
    """held-out sequences for the final next-token loss and accuracy"""
    out: str = "runs/codebook"
    """output folder: the trained model (loadable by transformers), train_result/, checkpoint/"""


@dataclass
class CacheArgs(ModelArgs, DataArgs):
    """Run a codebook model over data and store every token's code ids (plus text)."""

    n_sequences: int = 256
    """sequences cached (seeded draw from the whole tokenized data)"""
    batch_size: int = 32
    """sequences per forward pass"""
    neurons: bool = True
    """also store the dense activations entering each codebook (neuron baseline)"""
    copy_model: bool = True
    """store the model inside the cache folder (the app and interventions use it)"""
    out: str = "runs/codebook-cache"
    """output folder of the cache"""


@dataclass
class SearchArgs:
    """Find codes that fire on a regex, ranked by precision against the best neuron."""

    cache: str = "runs/codebook-cache"
    """cache folder (tyche codebook cache)"""
    pattern: str = r"\bking\b"
    """regex; with a group, its start is the targeted token"""
    sites: str | None = None
    """codebook sites to search, comma separated (default: all)"""
    min_recall: float = 0.01
    """drop codes firing on fewer matched tokens than this share"""
    min_precision: float = 0.0
    """drop codes less precise than this"""
    top: int = 20
    """rows shown"""
    parity: Literal["even", "odd"] | None = None
    """keep only even or odd token positions (TokFSM: odd = first digits)"""
    neurons: bool = True
    """compare every code with the best single neuron at the same recall"""
    out: str | None = None
    """also save the result here (safetensors + JSON)"""


@dataclass
class ContextsArgs:
    """Show the contexts where a code fired, the token marked."""

    cache: str = "runs/codebook-cache"
    """cache folder"""
    site: str = "mlp_out.0"
    """codebook site"""
    code: int = 0
    """code id"""
    head: int | None = None
    """head (per-head codebooks)"""
    n: int = 20
    """contexts shown"""
    window: int = 12
    """tokens of context either side"""


@dataclass
class InterveneArgs(ModelArgs):
    """Generate from a prompt with and without codes forced, replaced, appended or blocked."""

    cache: str | None = None
    """take the model from this cache folder instead of --model"""
    prompt: str = "To be, or not to be"
    """text to continue"""
    force: str = ""
    """codes to force: SITE[/hHEAD]:CODE[@POS;POS], comma separated"""
    replace: str = ""
    """codes that replace the weakest slots (same syntax)"""
    append: str = ""
    """codes added as an extra slot (same syntax)"""
    block: str = ""
    """codes never chosen (the next best takes their place)"""
    n_samples: int = 3
    """continuations per setting"""
    max_new_tokens: int = 32
    """tokens generated"""
    temperature: float = 1.0
    """sampling temperature (0: greedy)"""
    seed: int = 0
    """sampling seed (the same for both settings)"""


@dataclass
class SteerArgs:
    """Topic steering: force the codes of a word and count continuations that contain it."""

    cache: str = "runs/codebook-cache"
    """cache folder holding the model (built with --copy_model)"""
    words: str = "king,love,blood,death"
    """words, comma separated"""
    prompts: str = "zoo:shakespeare"
    """prompt source: text data; prompts are 4 seeded windows of --prompt_tokens tokens"""
    n_prompts: int = 4
    """prompts"""
    prompt_tokens: int = 16
    """tokens per prompt"""
    samples_per_prompt: int = 10
    """continuations per prompt (4 x 10 = 40 per word)"""
    max_new_tokens: int = 48
    """tokens per continuation"""
    max_codes: int = 8
    """codes forced per word"""
    target: Literal["before", "word"] = "before"
    """force the codes of the token before the word (they predict it) or of the word itself"""
    min_precision: float = 0.5
    """codes must be at least this precise for the word"""
    min_recall: float = 0.02
    """codes must fire on at least this share of the word's tokens"""
    sites: str | None = None
    """search only these codebook sites (comma separated)"""
    seed: int = 0
    """seed of prompts and sampling"""
    out: str | None = None
    """save the table as JSON here"""


@dataclass
class TokFSMArgs(ModelArgs):
    """Evaluate a TokFSM codebook model: transitions, purity, state forcing."""

    model: str = "zoo:tokfsm"
    """'zoo:tokfsm' or a folder with codebooks and fsm.json"""
    n_samples: int = 100
    """sampled sequences for the transition accuracy"""
    seq_len: int = 64
    """tokens per sampled sequence"""
    n_trials: int = 100
    """state-forcing trials"""
    seed: int = 0
    """sampling seed"""


@dataclass
class AppArgs:
    """Start the Streamlit code browser on a cache folder."""

    cache: str = "runs/codebook-cache"
    """cache folder (tyche codebook cache)"""
    port: int = 8501
    """port of the web server"""
    headless: bool = True
    """do not open a browser window"""


# ---------------------------------------------------------------------- helpers
def _split(text: str | None) -> list[str] | None:
    return split_list(text) or None


def _check_model_spec(spec: str, flag: str = "--model") -> None:
    """A zoo language model or a local model folder, checked without loading anything."""
    from tyche.zoo.catalogue import check_name

    if spec.startswith("zoo:"):
        if check_name(spec, kind="model") == "digits-mlp":
            raise CommandError(
                f"{flag}: zoo:digits-mlp is not a language model; codebooks need one"
            )
    elif not (Path(spec).expanduser() / "config.json").is_file():
        raise CommandError(f"{flag}: no model folder at {spec!r} (expected config.json there)")


def _check_data_spec(spec: str, flag: str = "--data") -> None:
    from tyche.zoo.catalogue import check_name

    if spec.startswith("fsm:"):
        target = spec.removeprefix("fsm:")
        if target.startswith("zoo:"):
            _check_model_spec(target, flag)
        elif not (Path(target).expanduser() / "fsm.json").is_file():
            raise CommandError(f"{flag}: no fsm.json in {target!r}")
    elif spec.startswith("zoo:"):
        if check_name(spec, kind="data") == "fashion-mnist":
            raise CommandError(f"{flag}: zoo:fashion-mnist is image data, not text")
    else:
        check_readable_text(spec, flag)


def _check_cache(folder: str, flag: str = "--cache") -> None:
    if not (Path(folder).expanduser() / "manifest.json").is_file():
        raise CommandError(
            f"{flag}: {folder!r} is not a codebook cache (no manifest.json); build one with "
            "tyche codebook cache"
        )


def _check_counts(**values: int) -> None:
    for name, value in values.items():
        check_number(value, f"--{name}", minimum=1, integer=True)


def _folder_of(spec: str) -> Path:
    from tyche.zoo.catalogue import get_entry
    from tyche.zoo.resolve import ensure_prepared

    if spec.startswith("zoo:"):
        entry = get_entry(spec, kind="model")
        ensure_prepared(entry)
        return entry.path
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model folder at {spec!r} (expected config.json there)")
    return path


def load_model(spec: str) -> Any:
    """A CodebookModel from a zoo name or folder (no codebooks if the folder has none)."""
    _check_model_spec(spec)
    from tyche.codebook.model import CODEBOOKS_CONFIG, CodebookModel
    from tyche.distributed import default_device

    folder = _folder_of(spec)
    if (folder / CODEBOOKS_CONFIG).is_file():
        model = CodebookModel.from_pretrained(folder, device=default_device())
    else:
        from tyche.zoo.resolve import load_hf_folder

        base, tokenizer, _ = load_hf_folder(folder)
        model = CodebookModel(base.to(default_device()))
        model.tokenizer = tokenizer
        model._rehook()
    if model.tokenizer is None:
        raise ValueError(f"{spec} has no tokenizer in its folder; codebook tools need one")
    return model


def _fsm_of(spec: str):
    from tyche.codebook.tokfsm import FSM

    target = spec.removeprefix("fsm:")
    folder = _folder_of(target) if target.startswith("zoo:") else Path(target).expanduser()
    return FSM.load(folder)


def load_rows(data: str, tokenizer: Any, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """``n`` token rows of ``seq_len``: TokFSM walks (``fsm:...``) or a seeded draw of text."""
    import torch

    if data.startswith("fsm:"):
        return _fsm_of(data).batch(n, seq_len, torch.Generator().manual_seed(seed))
    from tyche.data import chunk_and_tokenize
    from tyche.zoo.resolve import resolve_texts

    rows = chunk_and_tokenize(resolve_texts(data), tokenizer, max_seq_len=seq_len)["input_ids"]
    pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    return rows[pick[:n]]


def reinitialise(base: torch.nn.Module, seed: int) -> None:
    """Draw fresh weights for a HF model (its own initialiser, seeded)."""
    import torch

    if not hasattr(base, "_init_weights"):
        raise ValueError(f"{type(base).__name__} has no _init_weights; cannot train from scratch")
    # transformers marks loaded weights as initialised and its initialiser then skips them
    for item in [*base.modules(), *base.parameters()]:
        if getattr(item, "_is_hf_initialized", False):
            item._is_hf_initialized = False
    torch.manual_seed(seed)
    base.apply(base._init_weights)
    if hasattr(base, "tie_weights"):
        base.tie_weights()


def check_args(args: Any) -> None:
    """Every flag of a command, checked before anything is loaded."""
    if isinstance(args, TrainArgs | CacheArgs):
        _check_model_spec(args.model)
        _check_data_spec(args.data)
        check_number(args.seq_len, "--seq_len", minimum=2, integer=True)
        check_number(args.seed, "--seed", minimum=0, integer=True)
        _check_counts(batch_size=args.batch_size)
    if isinstance(args, TrainArgs):
        if not split_list(args.sites):
            raise CommandError("--sites is empty; e.g. --sites 'attn_heads.*,mlp_out.*'")
        _check_counts(
            num_codes=args.num_codes,
            k=args.k,
            steps=args.steps,
            log_every=args.log_every,
            eval_sequences=args.eval_sequences,
        )
        if args.k > args.num_codes:
            raise CommandError(f"--k {args.k} > --num_codes {args.num_codes}; lower --k")
        for flag in ("lr", "code_lr"):
            check_number(getattr(args, flag), f"--{flag}", above=0)
        for flag in ("beta", "weight_decay"):
            check_number(getattr(args, flag), f"--{flag}", minimum=0)
        for flag in ("warmup_steps", "replace_dead_every", "checkpoint_every", "snap_after"):
            check_number(getattr(args, flag), f"--{flag}", minimum=0, integer=True)
        if args.from_scratch and args.freeze_base:
            raise CommandError("--from_scratch with --freeze_base would train codebooks on noise")
        if args.resume and not (Path(args.out) / "checkpoint").is_dir():
            raise CommandError(f"--resume: no checkpoint in {args.out}/checkpoint")
        check_writable_folder(args.out, "--out")
    if isinstance(args, CacheArgs):
        _check_counts(n_sequences=args.n_sequences)
        check_writable_folder(args.out, "--out")
    if isinstance(args, SearchArgs | ContextsArgs | SteerArgs | AppArgs):
        _check_cache(args.cache)
    if isinstance(args, SearchArgs):
        check_number(args.min_recall, "--min_recall", minimum=0)
        check_number(args.min_precision, "--min_precision", minimum=0)
        _check_counts(top=args.top)
    if isinstance(args, ContextsArgs):
        check_number(args.code, "--code", minimum=0, integer=True)
        _check_counts(n=args.n)
        check_number(args.window, "--window", minimum=0, integer=True)
    if isinstance(args, InterveneArgs):
        if args.cache:
            _check_cache(args.cache)
        else:
            _check_model_spec(args.model)
        if not any(getattr(args, m) for m in ("force", "replace", "append", "block")):
            raise CommandError("give at least one of --force, --replace, --append, --block")
        _check_counts(n_samples=args.n_samples, max_new_tokens=args.max_new_tokens)
        check_number(args.temperature, "--temperature", minimum=0)
        if not args.prompt.strip():
            raise CommandError("--prompt is empty")
    if isinstance(args, SteerArgs):
        if not split_list(args.words):
            raise CommandError("--words is empty; e.g. --words king,love,blood,death")
        _check_data_spec(args.prompts, "--prompts")
        _check_counts(
            n_prompts=args.n_prompts,
            prompt_tokens=args.prompt_tokens,
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            max_codes=args.max_codes,
        )
    if isinstance(args, TokFSMArgs):
        _check_model_spec(args.model)
        _check_counts(n_samples=args.n_samples, n_trials=args.n_trials)
        check_number(args.seq_len, "--seq_len", minimum=3, integer=True)
    if isinstance(args, AppArgs):
        check_number(args.port, "--port", minimum=1, integer=True)


# ---------------------------------------------------------------------- commands
def run_train(args: TrainArgs) -> Any:
    from tyche.codebook.model import attach
    from tyche.codebook.train import TrainConfig, evaluate_lm, row_sampler, train_codebooks
    from tyche.distributed import get_rank, rank0_print

    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        code_lr=args.code_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        freeze_base=args.freeze_base,
        snap_after=args.snap_after,
        kmeans_init=args.kmeans_init,
        kmeans_tokens=args.kmeans_tokens,
        replace_dead_every=args.replace_dead_every,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    import torch

    sites = _split(args.sites)
    out = Path(args.out)
    on_interrupt(
        f"the last checkpoint is in {out}/checkpoint; continue with: "
        f"{resume_command(PROG + ' train', sys.argv[2:])}"
    )
    model = load_model(args.model)
    if args.from_scratch:
        reinitialise(model.base, args.seed)
    if not model.sites:
        model = attach(
            model,
            sites,
            args.num_codes,
            args.k,
            similarity=args.similarity,
            loss=args.loss,
            beta=args.beta,
            seed=args.seed,
        )
    if args.data.startswith("fsm:"):
        fsm = _fsm_of(args.data)
        held = fsm.batch(
            args.eval_sequences, args.seq_len, torch.Generator().manual_seed(2**31 - 1)
        )

        def batches(step: int) -> torch.Tensor:
            return fsm.batch(
                args.batch_size,
                args.seq_len,
                torch.Generator().manual_seed(args.seed * 1_000_003 + step),
            )
    else:
        rows = load_rows(args.data, model.tokenizer, args.seq_len, 10**9, args.seed)
        if rows.shape[0] <= args.eval_sequences:
            raise ValueError(
                f"{args.data} gives only {rows.shape[0]} sequences of "
                f"{args.seq_len} tokens; lower --eval_sequences or --seq_len"
            )
        held, train_rows = rows[: args.eval_sequences], rows[args.eval_sequences :]
        batches = row_sampler(train_rows, args.batch_size, args.seed)
    before = {}
    with model.snapping(False):
        before = evaluate_lm(model, held)
    result = train_codebooks(
        model, batches, cfg, out=out, resume=args.resume, eval_fn=lambda m: evaluate_lm(m, held)
    )
    if get_rank() == 0:
        model.save_pretrained(out)
        result.save(out / "train_result")
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=1) + "\n")
        last = result.history[-1]
        ev = result.evaluation
        rank0_print(
            f"trained {args.steps} steps in {result.seconds:.1f} s "
            f"({result.steps_per_second:.2f} steps/s, {result.world_size} process(es))"
        )
        rank0_print(
            f"last logged: loss {last['loss']:.3f}, reconstruction {last['mse']:.3g}, "
            f"dead codes {100 * last['dead_fraction']:.1f}%, usage entropy "
            f"{last['entropy']:.2f} nats"
        )
        rank0_print(
            f"held-out next-token accuracy {ev['accuracy']:.4f} (loss {ev['loss']:.3f}); "
            f"the model without codebooks before training: {before['accuracy']:.4f} "
            f"(loss {before['loss']:.3f})"
        )
        rank0_print(f"saved the codebook model to {out}/")
    return result


def run_cache(args: CacheArgs) -> Any:
    from tyche.codebook.cache import build_cache

    model = load_model(args.model)
    if not model.sites:
        raise ValueError(f"{args.model} has no codebooks; train some with tyche codebook train")
    rows = load_rows(args.data, model.tokenizer, args.seq_len, args.n_sequences, args.seed)
    cache = build_cache(
        model,
        rows,
        args.out,
        batch_size=args.batch_size,
        neurons=args.neurons,
        copy_model=args.copy_model,
        model_name=args.model,
        data_name=args.data,
    )
    print(
        f"cached {cache.n_sequences} x {cache.seq_len} tokens at {len(cache.sites)} codebooks "
        f"in {cache.manifest['seconds']:.1f} s: {args.out}/"
    )
    return cache


def run_search(args: SearchArgs) -> Any:
    from tyche.codebook.cache import load_cache
    from tyche.codebook.code_search import search

    cache = load_cache(args.cache)
    result = search(
        cache,
        args.pattern,
        sites=_split(args.sites),
        min_recall=args.min_recall,
        min_precision=args.min_precision,
        top=args.top,
        parity=args.parity,
        neurons=args.neurons,
    )
    print(result.table())
    if args.out:
        print(f"saved to {result.save(args.out)}/")
    return result


def run_contexts(args: ContextsArgs) -> Any:
    from tyche.codebook.cache import load_cache
    from tyche.codebook.code_search import code_contexts

    cache = load_cache(args.cache)
    found = code_contexts(cache, args.site, args.code, head=args.head, n=args.n, window=args.window)
    total = int(cache.counts(args.site)[args.head or 0, args.code])
    print(
        f"{args.site}{'' if args.head is None else f'/h{args.head}'} code {args.code}: "
        f"fires on {total} of {cache.n_sequences * cache.seq_len} tokens"
    )
    for ctx in found:
        print(f"  [{ctx.row}:{ctx.position}] {ctx.render()}")
    return found


def run_intervene(args: InterveneArgs) -> Any:
    from tyche.codebook.interventions import generate, next_token_jsd, parse_interventions

    ivs = []
    for mode in ("force", "replace", "append", "block"):
        ivs += parse_interventions(getattr(args, mode), mode)  # type: ignore[arg-type]
    if args.cache:
        from tyche.codebook.cache import load_cache

        model = load_cache(args.cache).load_model()
    else:
        model = load_model(args.model)
    tok = model.tokenizer
    ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.numel() == 0:
        raise ValueError("--prompt gives no tokens")
    jsd = float(next_token_jsd(model, ids, ivs)[0])
    ids = ids.repeat(args.n_samples, 1)
    sampling = {
        "do_sample": args.temperature > 0,
        "max_new_tokens": args.max_new_tokens,
        "pad_token_id": tok.pad_token_id or tok.eos_token_id,
    }
    if args.temperature > 0:
        sampling |= {"temperature": args.temperature, "top_k": 0}
    outs = {}
    for name, setting in (("without", []), ("with", ivs)):
        gen = generate(model, ids, setting, seed=args.seed, **sampling)
        outs[name] = tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
        print(f"--- {name} the intervention")
        for text in outs[name]:
            print(f"{args.prompt}|{text}")
    print(f"JSD of the next-token distribution after the prompt: {jsd:.4f} nats")
    return {"jsd": jsd, **outs}


def run_steer(args: SteerArgs) -> Any:
    from tyche.codebook.cache import load_cache
    from tyche.codebook.steering import topic_codes, topic_steering, word_regex

    words = split_list(args.words)
    cache = load_cache(args.cache)
    model = cache.load_model()
    tok = model.tokenizer
    rows = load_rows(args.prompts, tok, args.prompt_tokens, args.n_prompts, args.seed + 1)
    prompts = tok.batch_decode(rows)
    table = []
    for word in words:
        ivs = topic_codes(
            cache,
            word_regex(word, before=args.target == "before"),
            sites=_split(args.sites),
            max_codes=args.max_codes,
            min_precision=args.min_precision,
            min_recall=args.min_recall,
        )
        if not ivs:
            print(
                f"{word}: no code reaches precision {args.min_precision} and recall "
                f"{args.min_recall}; skipped"
            )
            continue
        row = topic_steering(
            model,
            tok,
            prompts,
            word_regex(word),
            ivs,
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        row["word"] = word
        table.append(row)
        print(
            f"{word:<10} baseline {100 * row['baseline_rate']:5.1f}%   with codes "
            f"{100 * row['steered_rate']:5.1f}%   ({row['n']} continuations; codes "
            f"{', '.join(row['codes'])})"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    return table


def run_tokfsm(args: TokFSMArgs) -> Any:
    from tyche.codebook.steering import state_forcing
    from tyche.codebook.tokfsm import (
        FSM,
        code_purity,
        first_transition_accuracy,
        transition_accuracy,
    )

    model = load_model(args.model).eval()
    fsm = FSM.load(_folder_of(args.model))
    report: dict[str, Any] = {
        "first_transition_accuracy": first_transition_accuracy(model, fsm),
        **transition_accuracy(model, fsm, n=args.n_samples, seq_len=args.seq_len, seed=args.seed),
    }
    print(
        f"first-transition accuracy (all {fsm.n_states} states): "
        f"{100 * report['first_transition_accuracy']:.1f}%"
    )
    print(
        f"transition accuracy ({args.n_samples} sampled sequences): "
        f"{100 * report['transition_accuracy']:.1f}%"
    )
    if model.sites:
        purity = code_purity(model, fsm, seq_len=args.seq_len)
        report["purity"] = purity
        print(
            f"{'codebook':<22} {'firing':>6} {'≥0.9 pure (state)':>18} {'≥0.9 pure (trigram)':>20}"
        )
        for key, rep in purity.items():
            print(
                f"{key:<22} {rep['state']['n_firing']:>6} "
                f"{100 * rep['state']['frac_pure_90']:17.1f}% "
                f"{100 * rep['trigram']['frac_pure_90']:19.1f}%"
            )
        mlp = [s for s in model.sites if s.startswith("mlp_out")]
        if mlp:
            forcing = state_forcing(model, fsm, sites=mlp, n_trials=args.n_trials, seed=args.seed)
            report["state_forcing"] = forcing
            print(
                f"forcing another state's MLP codes: its successors predicted in "
                f"{100 * forcing['success_rate']:.0f}% of {forcing['n_trials']} trials "
                f"(without: {100 * forcing['baseline_rate']:.0f}%); JSD to that state "
                f"{forcing['jsd_patched']:.3f} nats (unpatched {forcing['jsd_unpatched']:.3f})"
            )
    return report


def run_app(args: AppArgs) -> Any:
    from tyche.codebook.app import launch

    if not (Path(args.cache) / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{args.cache} is not a codebook cache (no manifest.json); "
            "build one with tyche codebook cache"
        )
    return launch(args.cache, port=args.port, headless=args.headless)


COMMANDS: dict[str, tuple[type, Any, str]] = {
    "train": (TrainArgs, run_train, "attach codebooks and train them (and the model)"),
    "cache": (CacheArgs, run_cache, "store every token's code ids over data"),
    "search": (SearchArgs, run_search, "find codes that fire on a regex"),
    "contexts": (ContextsArgs, run_contexts, "show where a code fires"),
    "intervene": (InterveneArgs, run_intervene, "generate with codes forced/blocked"),
    "steer": (SteerArgs, run_steer, "topic steering table for words"),
    "tokfsm": (TokFSMArgs, run_tokfsm, "evaluate a TokFSM codebook model"),
    "app": (AppArgs, run_app, "start the Streamlit code browser"),
}


def _usage() -> str:
    lines = ["usage: tyche codebook <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "Run `tyche codebook <command> --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str]) -> Any:
    """Entry point of ``tyche codebook``; returns what the sub-command returns."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return None
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise CommandError(f"unknown sub-command {name!r}; choose from {', '.join(COMMANDS)}")
    cls, runner, _ = COMMANDS[name]
    args = parse_config(cls, rest, prog=f"{PROG} {name}", description=cls.__doc__)
    check_args(args)
    if name == "train":
        from tyche.distributed import init_distributed

        init_distributed()
    return runner(args)
