"""``tyche codebook`` cache, search, topics, contexts, intervene, steer, tokfsm and app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tyche.cli.codebook.args import (
    AppConfig,
    CacheConfig,
    ContextsConfig,
    InterveneConfig,
    SearchConfig,
    SteerConfig,
    TokFSMEvalConfig,
    TopicsConfig,
)
from tyche.cli.codebook.checks import document_rows
from tyche.cli.codebook.loading import default_data_of, folder_of, load_model, load_rows, split
from tyche.cli.commandline import CommandError, check_context, split_list
from tyche.codebook.report import (
    contexts_text,
    forcing_text,
    purity_table,
    steering_line,
    tokfsm_accuracy_text,
)


def run_cache(args: CacheConfig) -> Any:
    from tyche.codebook.cache import build_cache
    from tyche.data import token_ids_sha256
    from tyche.io import model_hash

    model = load_model(args.source.model)
    args.source.check_context(model, args.rows.seq_len)
    if not model.sites:
        raise CommandError(
            f"{args.source.model} has no codebooks; train some with tyche codebook train"
        )
    spec = args.rows.spec(default_data_of(args.source.model))
    if spec.startswith("fsm:"):
        rows = load_rows(spec, model.tokenizer, args.rows.seq_len, args.rows.n_sequences,
                         args.rows.seed)  # fmt: skip
        record = {"data": spec, "n_sequences": len(rows), "seq_len": args.rows.seq_len,
                  "seed": args.rows.seed}  # fmt: skip
    else:
        drawn = args.rows.load(model.tokenizer, spec)
        rows, record = drawn.input_ids, drawn.record(args.rows)
    record["input_ids_sha256"] = token_ids_sha256(rows)
    cache = build_cache(
        model,
        rows,
        args.out,
        batch_size=args.batch_size,
        neurons=args.neurons,
        copy_model=args.copy_model,
        provenance={"model_name": args.source.model, "data_name": spec,
                    "inputs": {**record, "model_hash": model_hash(model.base)}},
    )
    print(
        f"cached {cache.n_sequences} x {cache.seq_len} tokens at {len(cache.sites)} codebooks "
        f"in {cache.manifest['seconds']:.1f} s: {args.out}/"
    )
    return cache


def run_search(args: SearchConfig) -> Any:
    from tyche.codebook.cache import load_cache
    from tyche.codebook.code_search import search

    cache = load_cache(args.cache)
    result = search(
        cache,
        args.pattern,
        sites=split(args.sites),
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


def run_topics(args: TopicsConfig) -> Any:
    from dataclasses import replace

    from tyche.codebook.cache import load_cache
    from tyche.codebook.steering import word_regex
    from tyche.codebook.topics import topic_codes
    from tyche.errors import InputError

    cache = load_cache(args.cache)
    unknown = [s for s in split(args.sites) or [] if s not in cache.sites]
    if unknown:
        raise CommandError(f"--sites: the cache has no codebooks at {unknown}; it has "
                           f"{cache.sites}")  # fmt: skip
    if args.rows is not None:
        flag, documents = f"--rows {args.rows}", document_rows(args.rows, cache.n_sequences)
    elif args.regex is not None:
        flag, documents = f"--regex {args.regex!r}", args.regex
    else:
        flag, documents = f"--word {args.word!r}", word_regex(args.word)
    try:
        result = topic_codes(
            cache,
            documents,
            sites=split(args.sites),
            min_recall=args.min_recall,
            min_precision=args.min_precision,
            top=args.top,
        )
    except InputError as err:
        raise CommandError(f"{flag}: {err}") from None
    if args.word is not None:
        result = replace(result, documents=f"the rows containing the word {args.word!r}")
    print(result.table())
    if result.codes:
        print(f"to force them: tyche codebook intervene --cache {args.cache} "
              f"--topic '{result.spec()}'")  # fmt: skip
    if args.out:
        print(f"saved to {result.save(args.out)}/")
    return result


def run_contexts(args: ContextsConfig) -> Any:
    from tyche.codebook.cache import load_cache
    from tyche.codebook.code_search import code_contexts

    cache = load_cache(args.cache)
    heads = cache.layout(args.site)["n_groups"]
    if heads > 1 and (args.head is None or not 0 <= args.head < heads):
        got = "no --head" if args.head is None else f"--head {args.head}"
        raise CommandError(
            f"--site {args.site} has one codebook per head ({heads} heads, code ids differ "
            f"between them): give --head 0 to {heads - 1}, not {got}"
        )
    found = code_contexts(cache, args.site, args.code, head=args.head, n=args.n, window=args.window)
    total = int(cache.counts(args.site)[args.head or 0, args.code])
    print(contexts_text(args.site, args.code, found, head=args.head, n_fires=total,
                        n_tokens=cache.n_sequences * cache.seq_len))  # fmt: skip
    return found


def run_intervene(args: InterveneConfig) -> Any:
    from tyche.codebook.interventions import generate, next_token_jsd, parse_interventions

    ivs = []
    for mode in ("force", "replace", "append", "block"):
        ivs += parse_interventions(getattr(args, mode), mode)  # type: ignore[arg-type]
    topic = parse_interventions(args.topic, "replace")
    if args.cache:
        from tyche.codebook.cache import load_cache

        model = load_cache(args.cache).load_model()
    else:
        model = load_model(args.model)
    tok = model.tokenizer
    ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.numel() == 0:
        raise CommandError("--prompt gives no tokens")
    horizon = ids.shape[1] + args.max_new_tokens - 1  # the longest forward pass generating
    _check_positions(ivs, ids.shape[1], args.max_new_tokens)
    _check_positions(topic, ids.shape[1], args.max_new_tokens, "--topic")
    ivs += _topic_slots(model, topic)
    jsd = float(next_token_jsd(model, ids, ivs, horizon=horizon)[0])
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


def _topic_slots(model: Any, topic: list[Any]) -> list[Any]:
    """The --topic codes in their codebooks' weakest slots (at most k per codebook)."""
    from tyche.codebook.topics import topic_interventions
    from tyche.errors import InputError

    try:
        slots = {iv.site: model.codebook(iv.site).k for iv in topic}
        return topic_interventions(topic, k=slots)
    except InputError as err:
        text = str(err).replace("as extra slots instead", "as extra slots with --append instead")
        raise CommandError(f"--topic: {text}") from None


def _check_positions(
    ivs: list[Any], prompt_len: int, max_new_tokens: int, flag: str | None = None
) -> None:
    """Refuse, in the flags' words, a position that no forward pass of the generation has
    (``flag`` names the flag of ``ivs``; default: their mode's)."""
    from tyche.codebook.interventions import beyond_horizon

    horizon = prompt_len + max_new_tokens - 1
    found = beyond_horizon(ivs, horizon)
    if found is not None:
        iv, p = found
        what = f"--{iv.spec}" if flag is None else f"{flag} {iv.spec.split(' ', 1)[1]}"
        raise CommandError(
            f"{what}: position {p} can never apply: the prompt "
            f"has {prompt_len} tokens and --max_new_tokens {max_new_tokens} feeds back at "
            f"most {horizon} (positions {-horizon} to {horizon - 1}); give a position in "
            "that range"
        )


def run_steer(args: SteerConfig) -> Any:
    from tyche.codebook.cache import load_cache
    from tyche.codebook.steering import topic_steering, word_codes, word_regex
    from tyche.io import json_text

    words = split_list(args.words)
    cache = load_cache(args.cache)
    model = cache.load_model()
    tok = model.tokenizer
    rows = load_rows(args.prompts, tok, args.prompt_tokens, args.n_prompts, args.seed + 1,
                     ("--prompts", "--prompt_tokens"))  # fmt: skip
    prompts = tok.batch_decode(rows)
    table = []
    for word in words:
        ivs = word_codes(
            cache,
            word_regex(word, before=args.target == "before"),
            sites=split(args.sites),
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
        print(steering_line(row))
    if not table:
        raise CommandError(
            f"no code of --sites {args.sites or 'all'} reaches --min_precision "
            f"{args.min_precision} and --min_recall {args.min_recall} for any of --words "
            f"{','.join(words)}, so nothing was steered; lower them, name other --sites, or "
            "cache more text (tyche codebook cache --n_sequences)"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json_text(table, indent=1, sort_keys=False))
    return table


def run_tokfsm(args: TokFSMEvalConfig) -> Any:
    from tyche.codebook.steering import state_forcing
    from tyche.codebook.tokfsm import (
        FSM,
        code_purity,
        first_transition_accuracy,
        transition_accuracy,
    )

    model = load_model(args.model).eval()
    fsm = FSM.load(folder_of(args.model))
    check_context(model, args.seq_len, "--seq_len", allow_long=args.allow_long_context,
                  name=args.model)  # fmt: skip
    if args.forcing_sites is None:
        forced = [s for s in model.sites if s.startswith("mlp_out")]
    else:  # a clear error, before any evaluation, when it names a site without a codebook
        forced = model.match(args.forcing_sites)
    report: dict[str, Any] = {
        "first_transition_accuracy": first_transition_accuracy(model, fsm),
        **transition_accuracy(model, fsm, n=args.n_samples, seq_len=args.seq_len, seed=args.seed),
    }
    print(tokfsm_accuracy_text(report, fsm.n_states, args.n_samples))
    if model.sites:
        purity = code_purity(model, fsm, seq_len=args.seq_len)
        report["purity"] = purity
        print(purity_table(purity))
        if forced:
            forcing = state_forcing(
                model, fsm, sites=forced, n_trials=args.n_trials, seed=args.seed
            )
            report["state_forcing"] = forcing
            print(forcing_text(forcing, forced))
    return report


def run_app(args: AppConfig) -> Any:
    from tyche.cli.codebook_app import launch

    if not (Path(args.cache) / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{args.cache} is not a codebook cache (no manifest.json); "
            "build one with tyche codebook cache"
        )
    code = launch(args.cache, port=args.port, headless=args.headless)
    if code:  # stopped by SIGTERM (143) or failed: the process exits with that code
        raise SystemExit(code)
    return code
