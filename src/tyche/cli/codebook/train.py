"""``tyche codebook train``: attach codebooks to a model and train them (and the model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tyche.cli.codebook.args import CodebookTrainConfig
from tyche.cli.codebook.folders import mismatch_message, settings
from tyche.cli.codebook.loading import default_data_of, fsm_of, load_model, reinitialise, split
from tyche.cli.commandline import (
    CommandError,
    best_effort,
    config_flags,
    flat_settings,
    on_interrupt,
    resume_command,
)

PROG = "tyche codebook"


def run_train(args: CodebookTrainConfig, argv: list[str] | None = None) -> Any:
    """Train; ``argv`` (the flags after ``train``, as given) makes the Ctrl-C resume line."""
    from tyche.codebook.model import attach
    from tyche.codebook.plot import plot_training
    from tyche.codebook.report import training_line
    from tyche.codebook.train import (
        SettingsMismatch,
        evaluate_lm,
        row_sampler,
        train_codebooks,
    )
    from tyche.distributed import get_rank, rank0_print
    from tyche.io import json_text, model_hash

    cfg = args.train.library(args.rows.seed)
    import torch

    sites = split(args.sites)
    out = Path(args.out)
    on_interrupt(
        f"the last checkpoint is in {out}/checkpoint; continue with: "
        f"{resume_command(PROG + ' train', config_flags(args) if argv is None else argv)}"
    )
    if args.source.model.startswith("tl:") and not args.train.freeze_base:
        raise CommandError(
            f"--model {args.source.model}: a TransformerLens base is not saved with the "
            "codebooks, so it must stay as loaded; add --freeze_base"
        )
    start_codes = _dictionary_init(args.train)  # read before the model: its errors come first
    model = load_model(args.source.model)
    args.source.check_context(model, args.rows.seq_len)
    if args.from_scratch:
        reinitialise(model.base, args.rows.seed)
    if start_codes is not None and model.sites:
        raise CommandError(
            f"--init_dictionary sets the codes of new codebooks, but --model "
            f"{args.source.model} has codebooks at {model.sites} already"
        )
    if not model.sites:
        model = attach(
            model,
            sites,
            args.num_codes,
            args.k,
            similarity=args.similarity,
            loss=args.loss,
            beta=args.beta,
            restore_scale=args.restore_scale,
            seed=args.rows.seed,
        )
    if start_codes is not None:
        _start_from_dictionary(model, *start_codes, args.train)
    spec, seq_len = args.rows.spec(default_data_of(args.source.model)), args.rows.seq_len
    inputs: dict[str, Any] = {"model": args.source.model, "data": spec}
    if spec.startswith("fsm:"):
        if args.rows.n_sequences is not None:
            raise CommandError(f"--n_sequences does not apply to --data {spec}: its walks are "
                               "drawn afresh for every step; drop the flag")  # fmt: skip
        fsm = fsm_of(spec)
        held = fsm.batch(args.eval_sequences, seq_len, torch.Generator().manual_seed(2**31 - 1))

        def batches(step: int) -> torch.Tensor:
            return fsm.batch(
                args.train.batch_size,
                seq_len,
                torch.Generator().manual_seed(args.rows.seed * 1_000_003 + step),
            )
    else:
        rows = args.rows.load(model.tokenizer, spec, held_out=args.eval_sequences,
                              held_out_flag="--eval_sequences")  # fmt: skip
        held, train_rows = rows.held_out["input_ids"], rows.input_ids
        batches = row_sampler(train_rows, args.train.batch_size, args.rows.seed)
        inputs.update(rows.record(args.rows))
    inputs["model_hash"] = model_hash(model.base)
    before = {}
    with model.snapping(False):
        before = evaluate_lm(model, held)
    try:
        result = train_codebooks(model, batches, cfg, out=out, resume=args.resume,
                                 eval_fn=lambda m: evaluate_lm(m, held),
                                 extra_settings=settings(args))  # fmt: skip
    except SettingsMismatch as err:
        raise CommandError(mismatch_message(err)) from None
    if get_rank() == 0:
        model.save_pretrained(out)
        result.save(out / "train_result")
        record = {**flat_settings(args), "inputs": inputs}
        (out / "train_args.json").write_text(json_text(record, indent=1, sort_keys=False))
        last = result.history[-1]
        ev = result.evaluation
        rank0_print(
            f"trained {args.train.steps} steps in {result.seconds:.1f} s "
            f"({result.steps_per_second:.2f} steps/s, {result.world_size} process(es))"
        )
        rank0_print(training_line(last))
        rank0_print(
            f"held-out next-token accuracy {ev['accuracy']:.4f} (loss {ev['loss']:.3f}); "
            f"the model without codebooks before training: {before['accuracy']:.4f} "
            f"(loss {before['loss']:.3f})"
        )
        figure = lambda: plot_training(result.history, out / "training.png")  # noqa: E731
        best_effort(PROG, "draw training.png", lambda: print(f"figure: {figure()}"), out)
        rank0_print(f"saved the codebook model to {out}/")
    return result


def _dictionary_init(train: Any) -> tuple[Any, Any] | None:
    """The dictionary of --init_dictionary and the scores of --init_dictionary_energies
    (None: rank by decoder norm), read and checked in the flags' words; None without it."""
    if train.init_dictionary is None:
        return None
    from tyche.codebook.dictionary_init import energy_scores
    from tyche.dictionaries import load_dictionary
    from tyche.errors import InputError

    try:
        dictionary = load_dictionary(train.init_dictionary)
    except InputError as err:
        raise CommandError(f"--init_dictionary: {err}") from None
    if train.init_dictionary_energies is None:
        return dictionary, None
    from tyche.causal.features import LatentEnergies

    try:
        saved = LatentEnergies.load(train.init_dictionary_energies)
        saved_for = (saved.n_latents, saved.dictionary.get("hook_name"))
        if saved_for != (dictionary.n_latents, dictionary.hook_name):
            raise InputError(
                f"it holds the energies of {saved_for[0]} latents at {saved_for[1]}, not of "
                "this dictionary"
            )
        scores = energy_scores(saved.latents, saved.energies, dictionary.n_latents)
    except (InputError, OSError) as err:
        raise CommandError(
            f"--init_dictionary_energies: {err}; give the features/ folder "
            "tyche causal --features saved for this dictionary"
        ) from None
    return dictionary, scores


def _start_from_dictionary(model: Any, dictionary: Any, scores: Any, train: Any) -> None:
    """Set the new codebook's codes from the dictionary's decoder rows (announced)."""
    from tyche.codebook.dictionary_init import init_from_dictionary
    from tyche.distributed import rank0_print
    from tyche.errors import InputError

    try:
        ids = init_from_dictionary(model, dictionary, scores=scores)
    except InputError as err:
        raise CommandError(f"--init_dictionary {train.init_dictionary}: {err}") from None
    how = "causal energy" if scores is not None else "decoder norm"
    rank0_print(
        f"codes initialised from {ids.shape[-1]} decoder rows of {train.init_dictionary} "
        f"(the latents of largest {how})"
    )
