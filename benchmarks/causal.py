"""Benchmark causal basis extraction: Tyche against the original gist, in one process.

Default (``python benchmarks/causal.py``): ``zoo:shakespeare-lm``, ``resid_pre.1``, 64 × 128
tokens of ``zoo:shakespeare`` (seed 0), mean ablation, logit lens, k = 8. Interleaved over
``--repeats`` rounds, on the same hidden states:

* ``gist``: the original algorithm re-implemented (``causal_gist.py``);
* ``tyche, general path``: ``extract_causal_basis(..., fast=False)``, the search as for any
  target (the lens runs on every evaluation, as ``ModelFromSite`` must);
* ``tyche, default``: the lens evaluated by exact algebra (``tyche.causal.lens_algebra``).

Reported: total seconds (median over rounds) and their ratios, seconds and evaluations per
direction, evaluation-equivalents per direction (seconds per direction over the seconds of
one full forward + backward of the same path on all tokens), and every basis's energies by
one float64 evaluator (sum of the k single-direction energies, joint energy of all k). Then
where the default's time goes (screening, climbing, polishing, final joint energies), and
``refine="joint"``: the joint energy of the first i directions, greedy against refined.

``--only gist`` skips the general path, ``--only tyche`` the gist too, ``--core`` the
breakdown and the refinement (for large models, e.g. ``--model zoo:smollm2-135m --site
resid_pre.10 --k 16 --only tyche --core --repeats 1``). ``--layers`` runs the per-layer
comparison with PCA directions instead (``resid_pre.*``, k = 16).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def load(model_name: str, site: str, n_sequences: int, seq_len: int):
    from tyche.causal import LogitLens
    from tyche.causal.activations import read_site_activations
    from tyche.data import chunk_and_tokenize
    from tyche.sites import resolve_sites
    from tyche.zoo import resolve_model, resolve_texts

    zoo = resolve_model(model_name)
    model = zoo.model.eval()
    tokens = chunk_and_tokenize(
        resolve_texts("zoo:shakespeare"), zoo.tokenizer, max_seq_len=seq_len
    )
    pick = torch.randperm(tokens["input_ids"].shape[0], generator=torch.Generator().manual_seed(0))
    tokens = {k: v[pick[:n_sequences].sort().values] for k, v in tokens.items()}
    sites = [s.name for s in resolve_sites(model, site)]
    hiddens = read_site_activations(model, tokens, sites, batch_size=8)
    return model, tokens, hiddens, LogitLens.from_model(model)


def unit_seconds(objective, v: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of one forward + backward of ``objective`` on all tokens."""
    objective.value_and_grad(v)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        objective.value_and_grad(v)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(run) -> dict[str, list[float]]:
    """Run ``run()`` with the objective's passes timed by kind: {kind: [passes, seconds]}."""
    from tyche.causal.objective import AblationObjective

    spent: dict[str, list[float]] = {}
    original = {
        "energy": AblationObjective.energy,
        "value_and_grad": AblationObjective.value_and_grad,
    }

    def timed(name):
        def wrapper(self, vectors, subsample=False):
            start = time.perf_counter()
            out = original[name](self, vectors, subsample=subsample)
            kind = {
                ("energy", True): "screening (subsample, forward)",
                ("value_and_grad", True): "climbing (subsample, L-BFGS)",
                ("value_and_grad", False): "polishing (all tokens, L-BFGS)",
                ("energy", False): "final joint energies (all tokens, forward)",
            }[(name, subsample)]
            entry = spent.setdefault(kind, [0.0, 0.0])
            entry[0] += self.subsample_fraction if subsample else 1.0
            entry[1] += time.perf_counter() - start
            return out

        return wrapper

    AblationObjective.energy = timed("energy")
    AblationObjective.value_and_grad = timed("value_and_grad")
    try:
        run()
    finally:
        AblationObjective.energy = original["energy"]
        AblationObjective.value_and_grad = original["value_and_grad"]
    return spent


def compare(args: argparse.Namespace) -> dict:
    from causal_gist import gist_causal_basis

    from tyche.causal import AblationObjective, CausalOptions, extract_causal_basis

    model, tokens, hiddens, lens = load(args.model, args.site, args.n_sequences, args.seq_len)
    h = hiddens[args.site]
    n_tokens, d = h.shape[0] * h.shape[1], h.shape[-1]
    vocab = lens.readout_matrix().shape[0]
    print(
        f"{args.model} {args.site}: d={d}, V={vocab}, {n_tokens} tokens, mode={args.mode}, "
        f"k={args.k}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    # one evaluator for every basis: the exact algebra in float64 (equal to the direct
    # computation to float64 rounding, tests/test_causal_fast.py), or float32 if too large
    wide = n_tokens * vocab * 8 * 2 < 4 * 2**30
    lens64 = copy.deepcopy(model).double() if wide else model
    from tyche.causal import LogitLens

    evaluator = AblationObjective(
        LogitLens.from_model(lens64), h.double() if wide else h, CausalOptions(mode=args.mode)
    )

    def score(vectors: torch.Tensor) -> tuple[list[float], float]:
        vectors = vectors.to(evaluator.hiddens.dtype)
        singles = [evaluator.energy(vectors[:, i]) for i in range(vectors.shape[1])]
        return singles, evaluator.energy(vectors)

    methods = {
        "tyche": ["tyche, default"],
        "gist": ["gist", "tyche, default"],
        "all": ["gist", "tyche, general path", "tyche, default"],
    }[args.only]
    v = torch.linalg.qr(torch.randn(d, 1, generator=torch.Generator().manual_seed(0)))[0][:, 0]
    units = {
        "tyche, default": unit_seconds(AblationObjective(lens, h, CausalOptions(mode=args.mode)), v)
    }
    if "tyche, general path" in methods:
        units["tyche, general path"] = unit_seconds(
            AblationObjective(lens, h, CausalOptions(mode=args.mode, fast=False)), v
        )
    rounds: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for method in methods:
            start = time.perf_counter()
            if method == "gist":
                out = gist_causal_basis(lens, h, args.k, mode=args.mode)
                vectors, evals, seconds = out["vectors"], out["evals"], out["seconds"]
            else:
                basis = extract_causal_basis(
                    lens,
                    h,
                    args.k,
                    CausalOptions(mode=args.mode, n_pca=0, fast=method == "tyche, default"),
                )
                vectors, evals, seconds = basis.vectors, basis.n_evals, basis.seconds
            total = time.perf_counter() - start
            singles, joint = score(vectors)
            rounds[method].append(
                {
                    "seconds": total,
                    "seconds_per_direction": seconds,
                    "evals": evals,
                    "energies": singles,
                    "joint": joint,
                }
            )
            print(
                f"  round {r + 1} {method}: {total:.1f} s, sum of energies "
                f"{sum(singles):.4f}, joint {joint:.4f}"
            )
        if "gist" in rounds:  # its own unit: one closure = one forward + backward
            last = rounds["gist"][-1]
            units["gist"] = sum(last["seconds_per_direction"]) / sum(last["evals"])

    report: dict = {
        "model": args.model,
        "site": args.site,
        "k": args.k,
        "n_tokens": n_tokens,
        "load_average": os.getloadavg()[0],
        "units": units,
        "methods": {},
    }
    print(
        f"\n| method | total s (median of {args.repeats}) | s / direction | evaluations / "
        "direction | eval-equivalents / direction | sum of energies | joint energy |"
    )
    print("|---|---|---|---|---|---|---|")
    gist_total = None
    for method, runs in rounds.items():
        total = statistics.median(r["seconds"] for r in runs)
        per_dir = statistics.median(sum(r["seconds_per_direction"]) / args.k for r in runs)
        evals = statistics.median(sum(r["evals"]) / args.k for r in runs)
        equivalents = per_dir / units[method]
        energy_sum = statistics.median(sum(r["energies"]) for r in runs)
        joint = statistics.median(r["joint"] for r in runs)
        gist_total = total if method == "gist" else gist_total
        ratio = (
            "" if gist_total is None or method == "gist" else f" ({gist_total / total:.1f}× faster)"
        )
        report["methods"][method] = {
            "total": total,
            "per_direction": per_dir,
            "evals": evals,
            "equivalents": equivalents,
            "energy_sum": energy_sum,
            "joint": joint,
            "rounds": runs,
        }
        print(
            f"| {method} | {total:.1f}{ratio} | {per_dir:.2f} | {evals:.1f} | "
            f"{equivalents:.1f} | {energy_sum:.4f} | {joint:.4f} |"
        )
    print(
        "\nseconds of one forward + backward on all tokens: "
        + ", ".join(f"{m} {s:.3f}" for m, s in units.items())
    )

    if args.core:
        return report
    spent = breakdown(
        lambda: extract_causal_basis(lens, h, args.k, CausalOptions(mode=args.mode, n_pca=0))
    )
    report["breakdown"] = spent
    print("\nwhere the default's time goes (passes in full-data units, seconds):")
    for kind, (passes, seconds) in spent.items():
        print(f"  {kind:<45} {passes / args.k:6.2f} passes/direction  {seconds:7.1f} s")

    start = time.perf_counter()
    refined = extract_causal_basis(
        lens, h, args.k, CausalOptions(mode=args.mode, n_pca=0, refine="joint")
    )
    refine_seconds = time.perf_counter() - start
    greedy_prefix = refined.greedy_subspace_energies.tolist()
    prefix = [
        evaluator.energy(refined.vectors[:, : i + 1].to(evaluator.hiddens.dtype))
        for i in range(args.k)
    ]
    report["refine"] = {"greedy": greedy_prefix, "refined": prefix, "seconds": refine_seconds}
    print(
        f"\nrefine='joint' ({refine_seconds:.1f} s in all): joint energy of the first i "
        "directions (nats)"
    )
    print("| i | " + " | ".join(str(i + 1) for i in range(args.k)) + " |")
    print("|---|" + "---|" * args.k)
    print("| greedy | " + " | ".join(f"{e:.4f}" for e in greedy_prefix) + " |")
    print("| refined | " + " | ".join(f"{e:.4f}" for e in prefix) + " |")
    monotone = all(b >= a for a, b in zip(prefix, prefix[1:]))
    print(
        f"refined joint energy of all k {prefix[-1]:.4f} vs greedy {greedy_prefix[-1]:.4f}; "
        f"non-decreasing in i: {monotone}"
    )
    return report


def layers(args: argparse.Namespace) -> dict:
    """Per layer: causal against PCA directions, random and multiple starts, lens vs model."""
    from tyche.causal import AblationObjective, CausalOptions, ModelFromSite, extract_causal_basis

    model, tokens, hiddens, lens = load(args.model, "resid_pre.*", args.n_sequences, args.seq_len)
    report: dict = {}
    print(
        "| site | causal E1 | E2..E4 | best PCA | E1/PCA | E1 random start | E1 8 starts | "
        "joint k | s/dir | evals/dir | lens-model Spearman |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for site, h in hiddens.items():
        start = time.perf_counter()
        basis = extract_causal_basis(
            lens, h, args.k, CausalOptions(mode=args.mode, n_pca=args.k), site=site
        )
        seconds = time.perf_counter() - start
        random_start = extract_causal_basis(
            lens, h, 1, CausalOptions(mode=args.mode, n_init=0, n_pca=0)
        )
        multi = extract_causal_basis(lens, h, 1, CausalOptions(mode=args.mode, n_starts=8, n_pca=0))
        objective = AblationObjective(
            ModelFromSite(model, site, tokens), h, CausalOptions(mode=args.mode, batch_size=16)
        )
        model_energies = [objective.energy(basis.vectors[:, i]) for i in range(basis.k)]
        ra = torch.tensor(basis.energies.tolist()).argsort().argsort().double()
        rb = torch.tensor(model_energies).argsort().argsort().double()
        ra, rb = ra - ra.mean(), rb - rb.mean()
        rho = float((ra @ rb) / (ra.norm() * rb.norm()))
        e, best_pca = basis.energies.tolist(), float(basis.pca_energies.max())
        report[site] = {
            "energies": e,
            "pca_energies": basis.pca_energies.tolist(),
            "first_random_start": float(random_start.energies[0]),
            "first_8_starts": float(multi.energies[0]),
            "spearman": rho,
            "seconds": seconds,
        }
        print(
            f"| {site} | {e[0]:.4f} | {', '.join(f'{x:.4f}' for x in e[1:4])} | "
            f"{best_pca:.4f} | {e[0] / best_pca:.2f} | {float(random_start.energies[0]):.4f} | "
            f"{float(multi.energies[0]):.4f} | {float(basis.subspace_energies[-1]):.3f} | "
            f"{seconds / basis.k:.2f} | {sum(basis.n_evals) / basis.k:.1f} | {rho:.2f} |"
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:shakespeare-lm")
    parser.add_argument("--site", default="resid_pre.1")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--n_sequences", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--mode", default="mean")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        choices=["all", "gist", "tyche"],
        default="all",
        help="all: gist, general path, default; gist: gist and default; tyche: default only",
    )
    parser.add_argument("--layers", action="store_true", help="per-layer PCA comparison")
    parser.add_argument(
        "--core", action="store_true", help="skip the time breakdown and refine='joint'"
    )
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.layers:
        args.k = 16 if args.k == 8 else args.k
    report = layers(args) if args.layers else compare(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
