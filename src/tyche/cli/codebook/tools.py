"""``tyche codebook`` cache, search, contexts, intervene, steer, tokfsm and app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tyche.cli.codebook.args import (
    AppArgs,
    CacheArgs,
    ContextsArgs,
    InterveneArgs,
    SearchArgs,
    SteerArgs,
    TokFSMArgs,
)
from tyche.cli.codebook.loading import folder_of, load_model, load_rows, split
from tyche.cli.commandline import CommandError, check_context, split_list


def run_cache(args: CacheArgs) -> Any:
    from tyche.codebook.cache import build_cache

    model = load_model(args.model)
    check_context(model, args.seq_len, "--seq_len", allow_long=args.allow_long_context,
                  name=args.model)  # fmt: skip
    if not model.sites:
        raise CommandError(f"{args.model} has no codebooks; train some with tyche codebook train")
    rows = load_rows(args.data, model.tokenizer, args.seq_len, args.n_sequences, args.seed)
    cache = build_cache(
        model,
        rows,
        args.out,
        batch_size=args.batch_size,
        neurons=args.neurons,
        copy_model=args.copy_model,
        provenance={"model_name": args.model, "data_name": args.data},
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


def run_contexts(args: ContextsArgs) -> Any:
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
        raise CommandError("--prompt gives no tokens")
    horizon = ids.shape[1] + args.max_new_tokens - 1  # the longest forward pass generating
    _check_positions(ivs, ids.shape[1], args.max_new_tokens)
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


def _check_positions(ivs: list[Any], prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, in the flags' words, a position that no forward pass of the generation has."""
    from tyche.codebook.interventions import beyond_horizon

    horizon = prompt_len + max_new_tokens - 1
    found = beyond_horizon(ivs, horizon)
    if found is not None:
        iv, p = found
        raise CommandError(
            f"--{iv.spec}: position {p} can never apply: the prompt "
            f"has {prompt_len} tokens and --max_new_tokens {max_new_tokens} feeds back at "
            f"most {horizon} (positions {-horizon} to {horizon - 1}); give a position in "
            "that range"
        )


def run_steer(args: SteerArgs) -> Any:
    from tyche.codebook.cache import load_cache
    from tyche.codebook.steering import topic_codes, topic_steering, word_regex
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
        ivs = topic_codes(
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
        print(
            f"{word:<10} baseline {100 * row['baseline_rate']:5.1f}%   with codes "
            f"{100 * row['steered_rate']:5.1f}%   ({row['n']} continuations; codes "
            f"{', '.join(row['codes'])})"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json_text(table, indent=1, sort_keys=False))
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
        if forced:
            forcing = state_forcing(
                model, fsm, sites=forced, n_trials=args.n_trials, seed=args.seed
            )
            report["state_forcing"] = forcing
            print(
                f"forcing another state's codes at {', '.join(forced)} "
                f"({forcing['n_trials']} trials), next token: "
                f"closer to that state's than to the own state's in "
                f"{100 * forcing['next_token_success_rate']:.0f}% of trials; mass on digits "
                f"that begin its successors {forcing['next_token_target_mass']:.2f} (without: "
                f"{forcing['next_token_baseline_mass']:.2f}); JSD to that state "
                f"{forcing['next_token_jsd_patched']:.3f} nats (unpatched "
                f"{forcing['next_token_jsd_unpatched']:.3f})"
            )
            print(
                f"  whole next state: its successors most likely in "
                f"{100 * forcing['success_rate']:.0f}% of trials "
                f"(without: {100 * forcing['baseline_rate']:.0f}%); JSD to that state "
                f"{forcing['jsd_patched']:.3f} nats (unpatched {forcing['jsd_unpatched']:.3f})"
            )
            print(
                f"  whole next state, codes of that state's run also at its digits: its "
                f"successors most likely in {100 * forcing['carried_success_rate']:.0f}% of "
                f"trials; JSD to that state {forcing['carried_jsd_patched']:.3f} nats"
            )
    return report


def run_app(args: AppArgs) -> Any:
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
