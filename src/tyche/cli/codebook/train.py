"""``tyche codebook train``: attach codebooks to a model and train them (and the model)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from tyche.cli.codebook.args import TrainArgs
from tyche.cli.codebook.folders import mismatch_message, settings
from tyche.cli.codebook.loading import fsm_of, load_model, load_rows, reinitialise, split
from tyche.cli.commandline import (
    CommandError,
    check_context,
    config_flags,
    on_interrupt,
    resume_command,
)

PROG = "tyche codebook"


def run_train(args: TrainArgs, argv: list[str] | None = None) -> Any:
    """Train; ``argv`` (the flags after ``train``, as given) makes the Ctrl-C resume line."""
    from tyche.codebook.model import attach
    from tyche.codebook.train import (
        SettingsMismatch,
        TrainConfig,
        evaluate_lm,
        row_sampler,
        train_codebooks,
    )
    from tyche.distributed import get_rank, rank0_print
    from tyche.io import json_text

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
        kmeans_calibrate=args.kmeans_calibrate,
        replace_dead_every=args.replace_dead_every,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    import torch

    sites = split(args.sites)
    out = Path(args.out)
    on_interrupt(
        f"the last checkpoint is in {out}/checkpoint; continue with: "
        f"{resume_command(PROG + ' train', config_flags(args) if argv is None else argv)}"
    )
    model = load_model(args.model)
    check_context(model, args.seq_len, "--seq_len", allow_long=args.allow_long_context,
                  name=args.model)  # fmt: skip
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
            restore_scale=args.restore_scale,
            seed=args.seed,
        )
    if args.data.startswith("fsm:"):
        fsm = fsm_of(args.data)
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
            raise CommandError(
                f"{args.data} gives only {rows.shape[0]} sequences of "
                f"{args.seq_len} tokens; lower --eval_sequences or --seq_len"
            )
        held, train_rows = rows[: args.eval_sequences], rows[args.eval_sequences :]
        batches = row_sampler(train_rows, args.batch_size, args.seed)
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
        (out / "train_args.json").write_text(json_text(asdict(args), indent=1, sort_keys=False))
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
