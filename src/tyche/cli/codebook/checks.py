"""Every flag of a ``tyche codebook`` command, checked before anything is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tyche.cli.codebook import args as flags
from tyche.cli.codebook.folders import check_cache_folder, check_output_file, check_train_folder
from tyche.cli.codebook.loading import check_data_spec, check_model_spec
from tyche.cli.commandline import CommandError, check_number, check_writable_folder, split_list


def _check_cache(folder: str, flag: str = "--cache") -> None:
    if not (Path(folder).expanduser() / "manifest.json").is_file():
        raise CommandError(
            f"{flag}: {folder!r} is not a codebook cache (no manifest.json); build one with "
            "tyche codebook cache"
        )


def _check_counts(**values: int) -> None:
    for name, value in values.items():
        check_number(value, f"--{name}", minimum=1, integer=True)


def check_args(args: Any) -> None:
    """Every flag of a command, checked before anything is loaded."""
    if isinstance(args, flags.CodebookTrainConfig | flags.CacheConfig):
        args.source.check()
        args.rows.check()
    if isinstance(args, flags.CacheConfig):
        _check_counts(batch_size=args.batch_size)
    if isinstance(args, flags.CodebookTrainConfig):  # its optimiser's flags: checked when parsed
        if not split_list(args.sites):
            raise CommandError("--sites is empty; e.g. --sites 'attn_heads.*,mlp_out.*'")
        _check_counts(num_codes=args.num_codes, k=args.k, eval_sequences=args.eval_sequences)
        if args.k > args.num_codes:
            raise CommandError(f"--k {args.k} > --num_codes {args.num_codes}; lower --k")
        check_number(args.beta, "--beta", minimum=0)
        if args.from_scratch and args.train.freeze_base:
            raise CommandError("--from_scratch with --freeze_base would train codebooks on noise")
        if args.resume and not (Path(args.out) / "checkpoint").is_dir():
            raise CommandError(f"--resume: no checkpoint in {args.out}/checkpoint")
        check_writable_folder(args.out, "--out")
        check_train_folder(args)
    if isinstance(args, flags.CacheConfig):
        check_writable_folder(args.out, "--out")
        check_cache_folder(args)
    reads_a_cache = (flags.SearchConfig | flags.ContextsConfig | flags.SteerConfig
                     | flags.AppConfig | flags.TopicsConfig)  # fmt: skip
    if isinstance(args, reads_a_cache):
        _check_cache(args.cache)
    if isinstance(args, flags.SearchConfig):
        check_number(args.min_recall, "--min_recall", minimum=0)
        check_number(args.min_precision, "--min_precision", minimum=0)
        _check_counts(top=args.top)
    if isinstance(args, flags.TopicsConfig):
        _check_topics(args)
    if isinstance(args, flags.ContextsConfig):
        check_number(args.code, "--code", minimum=0, integer=True)
        _check_counts(n=args.n)
        check_number(args.window, "--window", minimum=0, integer=True)
    if isinstance(args, flags.InterveneConfig):
        if args.cache:
            _check_cache(args.cache)
        else:
            check_model_spec(args.model)
        if not any(getattr(args, m) for m in ("force", "replace", "append", "block", "topic")):
            raise CommandError(
                "give at least one of --force, --replace, --append, --block, --topic"
            )
        _check_counts(n_samples=args.n_samples, max_new_tokens=args.max_new_tokens)
        check_number(args.temperature, "--temperature", minimum=0)
        if not args.prompt.strip():
            raise CommandError("--prompt is empty")
    if isinstance(args, flags.SteerConfig):
        check_output_file(args)
        if not split_list(args.words):
            raise CommandError("--words is empty; e.g. --words king,love,blood,death")
        check_data_spec(args.prompts, "--prompts")
        _check_counts(
            n_prompts=args.n_prompts,
            prompt_tokens=args.prompt_tokens,
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            max_codes=args.max_codes,
        )
    if isinstance(args, flags.TokFSMEvalConfig):
        check_model_spec(args.model)
        _check_counts(n_samples=args.n_samples, n_trials=args.n_trials)
        check_number(args.seq_len, "--seq_len", minimum=3, integer=True)
    if isinstance(args, flags.AppConfig):
        check_number(args.port, "--port", minimum=1, integer=True)


def document_rows(text: str, n_rows: int) -> list[int]:
    """The rows of ``topics --rows``: ``"0,1,2"`` or ranges ``"0-4,9"``, each in the cache."""
    rows: list[int] = []
    for piece in split_list(text):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece)
        if m is None:
            raise CommandError(f"--rows: cannot read {piece!r}; give row numbers or ranges, "
                               "comma separated, e.g. --rows 0,1,2 or --rows 0-4,9")  # fmt: skip
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi >= n_rows:
            raise CommandError(f"--rows {piece}: the cache has {n_rows} rows (0 to "
                               f"{n_rows - 1}); give rows in that range")  # fmt: skip
        rows += range(lo, hi + 1)
    if not rows:
        raise CommandError("--rows is empty; e.g. --rows 0,1,2")
    return sorted(set(rows))


def _check_topics(args: flags.TopicsConfig) -> None:
    """One way to give the documents, each readable; the thresholds fractions."""
    given = [f"--{n}" for n in ("rows", "regex", "word") if getattr(args, n) is not None]
    if len(given) != 1:
        got = "none" if not given else " and ".join(given)
        raise CommandError(f"give exactly one of --rows, --regex, --word to say which "
                           f"documents, not {got}; e.g. --word king")  # fmt: skip
    if args.rows is not None:
        manifest = json.loads((Path(args.cache).expanduser() / "manifest.json").read_text())
        document_rows(args.rows, int(manifest["n_sequences"]))
    if args.regex is not None:
        try:
            re.compile(args.regex)
        except re.error as err:
            raise CommandError(f"--regex {args.regex!r} is not a valid regex: {err}") from None
    if args.word is not None and not args.word.strip():
        raise CommandError("--word is empty; e.g. --word king")
    for name in ("min_recall", "min_precision"):
        value = getattr(args, name)
        check_number(value, f"--{name}", minimum=0)
        if value > 1:
            raise CommandError(f"--{name} is a share of tokens, at most 1; got {value:g}")
    _check_counts(top=args.top)
