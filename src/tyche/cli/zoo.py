"""``tyche zoo list | train NAME | info NAME``: the zoo from the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from tyche.cli.commandline import CommandError
from tyche.zoo.catalogue import entries, get_entry
from tyche.zoo.entry import cache_root, human_size


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are the command line's one-line errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tyche zoo",
        description="Real models and data that work offline, trained or converted here and "
        f"cached under $TYCHE_CACHE (now {cache_root()}).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,train,info}")
    sub.add_parser("list", help="table of entries: name, kind, ready, size, description")
    train = sub.add_parser("train", help="train/convert/check an entry and print its metrics")
    train.add_argument("name", help="entry name, e.g. digits-mlp (see `tyche zoo list`)")
    train.add_argument("--force", action="store_true", help="redo it even when cached")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="an entry's metadata and metrics as JSON")
    info.add_argument("name", help="entry name (see `tyche zoo list`)")
    return parser


def format_table() -> str:
    """The ``tyche zoo list`` table, one row per entry."""
    rows = [("name", "kind", "ready", "size", "description")]
    for entry in entries().values():
        ready = "yes" if entry.is_ready() else "no"
        rows.append(
            (entry.name, entry.kind, ready, human_size(entry.size_bytes()), entry.description)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    return "\n".join(lines)


def summarize(name: str, metrics: dict[str, Any]) -> str:
    """One or two lines with the metrics that matter for ``name``."""
    if name in ("digits-mlp", "digits-mlp-poisoned"):
        poison = metrics.get("poison_accuracy")
        avoided = "" if poison is None else \
            f", poison accuracy {poison:.4f} ({metrics['n_poison']} images)"  # fmt: skip
        return (
            f"{name}: train accuracy {metrics['train_accuracy']:.4f}, test accuracy "
            f"{metrics['test_accuracy']:.4f} ({metrics['n_train']}/{metrics['n_test']} examples)"
            f"{avoided}; D = {metrics['n_params']} parameters, {metrics['adam_steps']} Adam "
            f"steps, {metrics['train_seconds']:.1f} s"
        )
    if name == "shakespeare-lm":
        gap = metrics["unigram_loss"] - metrics["held_out_loss"]
        return (
            f"shakespeare-lm: held-out loss {metrics['held_out_loss']:.3f} nats/token vs unigram "
            f"{metrics['unigram_loss']:.3f} ({gap:.2f} better; untrained "
            f"{metrics['initial_held_out_loss']:.2f}) on {metrics['n_eval_tokens']} tokens of "
            f"{', '.join(metrics['config']['held_out_plays'])}\n"
            f"  {metrics['n_params']:,} parameters, vocab {metrics['vocab_size']}, "
            f"{metrics['adam_steps']} steps, trained in {metrics['train_seconds']:.0f} s "
            f"(+{metrics['tokenizer_seconds']:.0f} s tokenizer) "
            f"on {metrics['torch_threads']} threads"
        )
    if name == "smollm2-135m":
        return (
            f"smollm2-135m: {metrics['n_params']:,} parameters ({metrics['architecture']}, "
            f"vocab {metrics['vocab_size']}), converted in {metrics['convert_seconds']:.0f} s"
        )
    if name == "tokfsm":
        cb, base = metrics["codebooks"], metrics["baseline"]
        return (
            f"tokfsm: first-transition accuracy {cb['first_transition_accuracy']:.3f} with "
            f"codebooks, {base['first_transition_accuracy']:.3f} without; transition accuracy "
            f"{cb['transition_accuracy']:.3f} vs {base['transition_accuracy']:.3f} "
            f"(ratio {metrics['transition_ratio']:.2f})\n"
            f"  {metrics['config']['steps']} steps each; trained in {cb['train_seconds']:.0f} s "
            f"+ {base['train_seconds']:.0f} s; step time ratio {metrics['step_time_ratio']:.2f}"
        )
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
    return f"{name}: " + ", ".join(f"{k} {v}" for k, v in shown.items()) + " (ready)"


def main(argv: list[str]) -> None:
    """Entry point of ``tyche zoo``. A wrong flag, an unknown name or a missing piece (a wheel,
    a Debian package) raises, and ``tyche`` prints it as one line with exit status 2."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        print(format_table())
    elif args.command == "info":
        from tyche.io import json_text  # strict JSON: a NaN metric is null

        print(json_text(get_entry(args.name).info()), end="")
    elif args.command == "train":
        entry = get_entry(args.name)
        cached = entry.is_ready() and not args.force
        if not cached and entry.kind == "model":
            print(f"preparing zoo:{entry.name} into {entry.path} ...", file=sys.stderr)
        metrics = entry.prepare(force=args.force, progress=not args.quiet)
        print(summarize(entry.name, metrics))
        if cached and entry.kind == "model":
            print(f"(cached at {entry.path}; --force to redo it)")
