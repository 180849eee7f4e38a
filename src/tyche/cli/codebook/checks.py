"""Every flag of a ``tyche codebook`` command, checked before anything is loaded."""

from __future__ import annotations

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
    reads_a_cache = flags.SearchConfig | flags.ContextsConfig | flags.SteerConfig | flags.AppConfig
    if isinstance(args, reads_a_cache):
        _check_cache(args.cache)
    if isinstance(args, flags.SearchConfig):
        check_number(args.min_recall, "--min_recall", minimum=0)
        check_number(args.min_precision, "--min_precision", minimum=0)
        _check_counts(top=args.top)
    if isinstance(args, flags.ContextsConfig):
        check_number(args.code, "--code", minimum=0, integer=True)
        _check_counts(n=args.n)
        check_number(args.window, "--window", minimum=0, integer=True)
    if isinstance(args, flags.InterveneConfig):
        if args.cache:
            _check_cache(args.cache)
        else:
            check_model_spec(args.model)
        if not any(getattr(args, m) for m in ("force", "replace", "append", "block")):
            raise CommandError("give at least one of --force, --replace, --append, --block")
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
