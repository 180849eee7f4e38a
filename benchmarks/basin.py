"""Basin-volume benchmark: time and loss evaluations per direction, and radius accuracy.

For each model it runs Tyche's radius search (rtol = 1e-2) over the same directions as a
plain doubling-then-bisection search (the original's scheme, made correct), then re-finds
every radius to rtol = 1e-5 (float32 models resolve no finer) as the reference and reports
the relative error of the radii.

    python benchmarks/basin.py [--directions 32] [--skip-lm]

Models: zoo:digits-mlp (D = 4,810, KL on 1,024 inputs) and zoo:shakespeare-lm (GPT-NeoX,
8 × 64 tokens of Shakespeare).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from tyche.basin.loss import ModelLoss
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", type=int, default=32)
    parser.add_argument("--skip-lm", action="store_true", help="only the digits MLP")
    args = parser.parse_args()
    torch.manual_seed(0)
    from tyche.zoo import load_digits_mlp

    mlp = load_digits_mlp()
    bench("digits-mlp", ModelLoss(mlp.model, mlp.x_train), args.directions, 1e-2, batch=16)
    if not args.skip_lm:
        from tyche.data import chunk_and_tokenize
        from tyche.zoo import resolve_model, resolve_texts

        zm = resolve_model("zoo:shakespeare-lm")
        tokens = chunk_and_tokenize(
            resolve_texts("zoo:shakespeare"), zm.tokenizer, max_seq_len=64, max_examples=8
        )
        loss = ModelLoss(zm.model, {k: v[:8] for k, v in tokens.items()}, strategy="loop")
        bench("shakespeare-lm (GPT-NeoX)", loss, max(8, args.directions // 4), 1e-2, batch=4)


if __name__ == "__main__":
    main()
