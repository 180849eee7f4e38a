"""Basin-volume benchmark: time and loss evaluations per direction, and radius accuracy.

For each model it runs Tyche's radius search (rtol = 1e-2) over the same directions as a
plain doubling-then-bisection search (the original's scheme, made correct), then re-finds
every radius to rtol = 1e-5 (float32 models resolve no finer) as the reference and reports
the relative error of the radii.

    python benchmarks/basin.py [--directions 32] [--skip-lm] [--skip-memory]

It also compares one search for five cutoffs over four decades against one search per
cutoff (evaluations per direction, and how far the two agree), and measures the peak memory
and the overhead per direction of ``estimate_basin`` at D = 20M with a trivial loss.

Models: zoo:digits-mlp (D = 4,810, KL on 1,024 inputs) and zoo:shakespeare-lm (GPT-NeoX,
8 × 64 tokens of Shakespeare).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from tyche.basin.core import estimate_basin
from tyche.basin.loss import ModelLoss
from tyche.basin.options import BasinOptions
from tyche.basin.radius import search_radii
from tyche.basin.sampling import unit_directions


def bisection_radii(rise, n: int, cutoff: float, rtol: float, init: float) -> torch.Tensor:
    """Doubling until above the cutoff, then bisection; returns evaluations per direction."""
    evals = torch.zeros(n, dtype=torch.long)
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    r = torch.full((n,), init, dtype=torch.float64)
    active = torch.arange(n)
    while active.numel():
        d = rise(active, r[active])
        evals[active] += 1
        ok = (d - cutoff).abs() <= rtol * cutoff
        below = (d < cutoff) & ~ok
        lo[active[below]] = r[active[below]]
        hi[active[~below & ~ok]] = r[active[~below & ~ok]]
        active = active[~ok]
        r[active] = torch.where(
            torch.isinf(hi[active]),
            2 * lo[active].clamp_min(r[active]),
            (lo[active] + hi[active]) / 2,
        )
    return evals


def bench(name: str, loss: ModelLoss, n: int, cutoff: float, batch: int) -> dict[str, float]:
    dim = loss.n_params
    vhat = unit_directions(0, list(range(n)), dim, dtype=loss.anchor.dtype)
    base = float(loss(torch.zeros(1, dim))[0])

    def rise(idx: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, idx.numel(), batch):  # at most `batch` perturbed models per call
            i, r = idx[s : s + batch], radius[s : s + batch]
            out.append(loss(r.to(vhat.dtype)[:, None] * vhat[i]).double() - base)
        return torch.cat(out)

    pilot = search_radii(rise, 1, cutoff=cutoff)
    init = float(pilot.radii[0])
    t0 = time.perf_counter()
    ours = search_radii(rise, n, cutoff=cutoff, rtol=1e-2, init_radius=init)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    bis = bisection_radii(rise, n, cutoff, 1e-2, init)
    t_bis = time.perf_counter() - t0
    ref = search_radii(rise, n, cutoff=cutoff, rtol=1e-5, init_radius=ours.radii, max_evals=200)
    rel = (ours.radii - ref.radii).abs() / ref.radii
    row = {
        "D": dim,
        "directions": n,
        "tyche_s_per_dir": t_ours / n,
        "tyche_evals_per_dir": ours.mean_evals,
        "bisect_s_per_dir": t_bis / n,
        "bisect_evals_per_dir": float(bis.double().mean()),
        "radius_rel_err_median": float(rel.median()),
        "radius_rel_err_max": float(rel.max()),
        "delta_rel_err_max": float(((ours.deltas - cutoff).abs() / cutoff).max()),
    }
    print(f"\n{name} (D = {dim:,}, {n} directions, cutoff {cutoff:g}, rtol 1e-2)")
    print(
        f"  tyche search : {row['tyche_s_per_dir'] * 1e3:8.1f} ms/direction, "
        f"{row['tyche_evals_per_dir']:.2f} loss evaluations/direction"
    )
    print(
        f"  bisection    : {row['bisect_s_per_dir'] * 1e3:8.1f} ms/direction, "
        f"{row['bisect_evals_per_dir']:.2f} loss evaluations/direction"
    )
    print(
        f"  radius relative error vs rtol=1e-5 reference: "
        f"median {row['radius_rel_err_median']:.1e}, max {row['radius_rel_err_max']:.1e}; "
        f"max |delta/cutoff − 1| {row['delta_rel_err_max']:.1e}"
    )
    return row


CURVE = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]  # 5 cutoffs over 4 decades


def curve_bench(name: str, loss, n: int, sigma: float | None) -> dict[str, float]:
    """One search for all of CURVE against one search per cutoff, on the same directions."""
    kw = dict(n_samples=n, sigma=sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        curve = estimate_basin(loss, loss.anchor, BasinOptions(cutoffs=CURVE, **kw), progress=False)
        t_curve = time.perf_counter() - t0
        t0 = time.perf_counter()
        singles = [estimate_basin(loss, loss.anchor, BasinOptions(cutoff=c, **kw), progress=False)
                   for c in CURVE]  # fmt: skip
        t_single = time.perf_counter() - t0
    single_evals = [s.evals_per_direction for s in singles]
    ratio = [float((curve.radii[:, k] / s.radii - 1).abs().max()) for k, s in enumerate(singles)]
    dlogp = [abs(curve[k].log_prob - s.log_prob) for k, s in enumerate(singles)]
    row = {
        "curve_evals_per_dir": curve.evals_per_direction,
        "single_evals_per_dir_mean": sum(single_evals) / len(single_evals),
        "single_evals_per_dir_at_1e-2": single_evals[3],
        "curve_s": t_curve,
        "singles_s": t_single,
        "max_radius_rel_diff": max(ratio),
        "max_log_p_diff": max(dlogp),
    }
    print(f"\n{name}: {len(CURVE)} cutoffs {CURVE[0]:g}..{CURVE[-1]:g}, {n} directions")
    print(f"  one search for all : {row['curve_evals_per_dir']:.2f} evaluations/direction, "
          f"{t_curve:.1f} s")  # fmt: skip
    print(f"  a search per cutoff: {' + '.join(f'{e:.2f}' for e in single_evals)} = "
          f"{sum(single_evals):.2f} evaluations/direction, {t_single:.1f} s")  # fmt: skip
    mean = row["single_evals_per_dir_mean"]
    curve_evals = row["curve_evals_per_dir"]
    print(f"  curve / one single-cutoff search: {curve_evals / mean:.2f}× (mean single), "
          f"{curve_evals / single_evals[3]:.2f}× (at 1e-2); separate searches: "
          f"{sum(single_evals) / mean:.2f}×")  # fmt: skip
    print(f"  curve vs singles: radii within {row['max_radius_rel_diff']:.1e} (relative), "
          f"log P within {row['max_log_p_diff']:.1f} nats")  # fmt: skip
    return row


def memory_bench(dim: int = 20_000_000, n: int = 16) -> None:
    """Peak memory and overhead per direction at large D (a trivial loss), in a subprocess."""
    worker = Path(__file__).resolve().parents[1] / "tests" / "basin_memory_worker.py"
    for batch in ([], ["4"]):
        done = subprocess.run([sys.executable, str(worker), str(dim), str(n), *batch],
                              capture_output=True, text=True, check=True)  # fmt: skip
        out = json.loads(done.stdout.strip().splitlines()[-1])
        used = (out["peak_bytes"] - out["start_bytes"]) / 2**20
        print(f"\nD = {dim:,}, {n} directions, batch {out['batch_size']} "
              f"({'default' if not batch else 'given'}): peak {used:,.0f} MiB above the start "
              f"(limit 2·D·4 B + 1 GiB = {(8 * dim + 2**30) / 2**20:,.0f} MiB); overhead per "
              f"direction outside the loss {out['overhead_cpu_s_per_direction']:.3f} s CPU, "
              f"{out['overhead_s_per_direction']:.3f} s wall")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", type=int, default=32)
    parser.add_argument("--skip-lm", action="store_true", help="only the digits MLP")
    parser.add_argument("--skip-memory", action="store_true", help="no D = 20M run")
    args = parser.parse_args()
    torch.manual_seed(0)
    from tyche.zoo import load_digits_mlp

    mlp = load_digits_mlp()
    digits = ModelLoss(mlp.model, mlp.x_train)
    bench("digits-mlp", digits, args.directions, 1e-2, batch=16)
    curve_bench("digits-mlp", digits, args.directions, mlp.prior_sigma)
    if not args.skip_lm:
        from tyche.data import chunk_and_tokenize
        from tyche.zoo import resolve_model, resolve_texts

        zm = resolve_model("zoo:shakespeare-lm")
        tokens = chunk_and_tokenize(
            resolve_texts("zoo:shakespeare"), zm.tokenizer, max_seq_len=64, max_examples=8
        )
        loss = ModelLoss(zm.model, {k: v[:8] for k, v in tokens.items()}, strategy="loop")
        bench("shakespeare-lm (GPT-NeoX)", loss, max(8, args.directions // 4), 1e-2, batch=4)
        curve_bench("shakespeare-lm (GPT-NeoX)", loss, max(8, args.directions // 2), None)
    if not args.skip_memory:
        memory_bench()


if __name__ == "__main__":
    main()
