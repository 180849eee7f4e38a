"""Benchmark the local interaction basis on ``zoo:modadd`` (the paper's build) and check its
findings.

Timing (always): the full build of the paper's configuration (node layers ``resid_pre.0``,
``blocks.0.resid_mid``, ``unembed``, ``output``; jacobian basis, squared edges, centred,
float64, gradient rule, the 3,830 training pairs in one batch), median of ``--repeats`` runs,
against an *unvectorised* computation of the same bases and edges in the same run: one
backward pass per output feature in a Python loop (what the original does), with the same
grams. The two must agree (largest relative difference printed).

``--paper`` adds the paper's comparisons, LIB (jacobian) against PCA (svd):

* edge-weight concentration: the fewest edges holding 90% / 99% of each section's weight;
* node ablations on the 8,939 test pairs (exponential schedule): the fewest kept directions
  with test accuracy >= 0.99, per node layer;
* the Fourier structure of the top LIB directions: the 2-D DFT over all (a, b) pairs of each
  direction's activation, its dominant frequency and the share of its power on that
  frequency (a + b, a, b and a - b components).

``--reference_checkpoint PATH`` runs everything on another modular-addition model instead of
the cached ``zoo:modadd``: a TransformerLens-layout state dict (``embed.W_E``, ``blocks.0.attn.
W_Q``, ...) such as the original's shipped seed-0 checkpoint, loaded with ``weights_only`` and
mapped onto :class:`~tyche.zoo.modadd.ModAddTransformer`; the figures can then be set beside
the original's on the same weights.

Usage: ``python benchmarks/interaction.py [--threads 2] [--repeats 3] [--paper] [--json out]
[--reference_checkpoint model.pt]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

LAYERS = ["resid_pre.0", "blocks.0.resid_mid", "unembed", "output"]


def unvectorised(model, x, grams, threshold: float) -> tuple[list, list, float, float]:  # noqa: ANN001
    """The same bases and edges with one backward pass per output feature (a Python loop);
    also its wall and CPU (process) seconds."""
    from tyche.interaction.basis import lib_basis, pca, unrotated_basis
    from tyche.interaction.sections import (
        ModelRunner,
        make_batches,
        prepared_model,
        resolve_node_layers,
    )

    start, cpu = time.perf_counter(), time.process_time()
    layers = resolve_node_layers(model, LAYERS)
    bases = [None] * len(LAYERS)
    edges = [None] * (len(LAYERS) - 1)
    bases[-1] = unrotated_basis(LAYERS[-1], grams.settings["dims"][-1], None)
    with prepared_model(model, torch.float64) as m:
        runner = ModelRunner(m, layers, torch.float64)
        batch = make_batches(x, None)[0]
        for i in reversed(range(len(LAYERS) - 1)):
            h, shape = runner.capture(batch, i)
            x_f = h[..., :-1].clone().requires_grad_(True)
            x_c = h[..., -1].clone().requires_grad_(True)
            with torch.enable_grad():
                y = runner.section_fn(batch, i, shape)(x_f, x_c)
            nxt = bases[i + 1]
            feats = nxt.C if nxt.C is not None else torch.eye(y.shape[-1], dtype=torch.float64)[
                :, :-1]  # fmt: skip
            grads = []
            for t in range(y.shape[1]):
                for j in range(feats.shape[1]):  # one backward pass per output feature
                    cot = torch.zeros_like(y)
                    cot[:, t] = feats[:, j]
                    g_f, g_c = torch.autograd.grad(y, (x_f, x_c), cot, retain_graph=True)
                    grads.append((j, torch.cat([g_f, g_c.unsqueeze(-1)], -1)))
            width = h.shape[-1]
            Mraw = sum(g.reshape(-1, width).T @ g.reshape(-1, width) for _, g in grads)
            p = pca(grams.means[i], grams.covariances[i], center=True, threshold=threshold)
            n = h.shape[0] * h.shape[1]
            bases[i] = lib_basis(LAYERS[i], p, p.R_pinv @ Mraw @ p.R_pinv.T / n, None,
                                 "jacobian", threshold)  # fmt: skip
            C, C_pinv = bases[i].C, bases[i].C_pinv
            E = torch.zeros(feats.shape[1], C.shape[1], dtype=torch.float64)
            f_hat = h @ C
            for j, g in grads:
                a = ((g @ C_pinv.T) * f_hat).sum(1)
                E[j] += (a * a).sum(0)
            edges[i] = E / n
    return bases, edges, time.perf_counter() - start, time.process_time() - cpu


def transformer_lens_weights(path: str):  # noqa: ANN201
    """A :class:`ModAddTransformer` with the weights of a TransformerLens-layout checkpoint."""
    from tyche.zoo.modadd import ModAddTransformer

    sd = torch.load(path, map_location="cpu", weights_only=True)
    h, d, dh = sd["blocks.0.attn.W_Q"].shape
    prefix = "blocks.0.attn."

    def heads_in(w: torch.Tensor) -> torch.Tensor:  # (h, d, dh) -> Linear weight (h*dh, d)
        return w.permute(0, 2, 1).reshape(h * dh, d)

    ours = {
        "embed_tokens.weight": sd["embed.W_E"],
        "pos_embed.weight": sd["pos_embed.W_pos"],
        "lm_head.weight": sd["unembed.W_U"].T,
        "lm_head.bias": sd["unembed.b_U"],
        "blocks.0.mlp.fc_in.weight": sd["blocks.0.mlp.W_in"].T,
        "blocks.0.mlp.fc_in.bias": sd["blocks.0.mlp.b_in"],
        "blocks.0.mlp.fc_out.weight": sd["blocks.0.mlp.W_out"].T,
        "blocks.0.mlp.fc_out.bias": sd["blocks.0.mlp.b_out"],
        "blocks.0.attn.o_proj.weight": sd[prefix + "W_O"].reshape(h * dh, d).T,
        "blocks.0.attn.o_proj.bias": sd[prefix + "b_O"],
    }
    for name in ("q", "k", "v"):
        ours[f"blocks.0.attn.{name}_proj.weight"] = heads_in(sd[f"{prefix}W_{name.upper()}"])
        ours[f"blocks.0.attn.{name}_proj.bias"] = sd[f"{prefix}b_{name.upper()}"].reshape(-1)
    model = ModAddTransformer()
    model.load_state_dict({k: v.float().contiguous() for k, v in ours.items()})
    return model.eval()


def fourier(model, graph, p: int, n_top: int) -> dict:  # noqa: ANN001
    """Dominant frequency of each top LIB direction over all p^2 pairs (a, b)."""
    from tyche.hooks import read_activations
    from tyche.interaction.fold import append_constant

    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1), torch.full((p * p,), p)], 1)
    m64 = model.double()
    with torch.no_grad(), read_activations(m64, LAYERS[1:3]) as acts:
        m64(pairs)
    out = {}
    for index, name in ((1, LAYERS[1]), (2, LAYERS[2])):
        basis = graph.bases[index]
        f_hat = append_constant(acts[name].double()) @ basis.C
        rows = []
        for k in range(1, min(n_top + 1, f_hat.shape[1])):
            grid = f_hat[:, k].view(p, p)
            power = torch.fft.fft2(grid - grid.mean()).abs() ** 2
            total = float(power.sum())
            fa, fb = divmod(int(power.flatten().argmax()), p)
            w = min(max(fa, fb), p - max(fa, fb)) if fa == 0 or fb == 0 else min(fa, p - fa)
            freq = torch.arange(p)
            near = torch.minimum(freq, p - freq) == w
            share = float(power[near][:, near].sum() + power[near, 0].sum() + power[0, near].sum())
            rows.append({"direction": k, "lambda": float(basis.Lambda[k]), "frequency": w,
                         "share_of_power": share / total if total else 0.0})  # fmt: skip
        out[name] = rows
    model.float()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paper", action="store_true", help="LIB vs PCA comparisons too")
    parser.add_argument("--skip_loop", action="store_true", help="no unvectorised run")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--reference_checkpoint",
        default=None,
        help="a TransformerLens-layout modadd state dict instead of zoo:modadd",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tyche.interaction import (
        AblationOptions,
        GraphOptions,
        ablate_nodes,
        build_grams,
        build_interaction_graph,
    )
    from tyche.zoo.modadd import load_modadd, modadd_data

    if args.reference_checkpoint:
        model, data = transformer_lens_weights(args.reference_checkpoint), modadd_data()
    else:
        model, data = load_modadd()
    x = data.x_train
    with torch.no_grad():
        accuracy = {split: float((model(xs).argmax(-1) == ys).double().mean())
                    for split, xs, ys in (("train", data.x_train, data.y_train),
                                          ("test", data.x_test, data.y_test))}  # fmt: skip
    print(f"model: {args.reference_checkpoint or 'zoo:modadd'}, accuracy {accuracy}")
    report: dict = {"threads": args.threads, "n_rows": len(x), "accuracy": accuracy,
                    "model": args.reference_checkpoint or "zoo:modadd"}  # fmt: skip
    a = torch.randn(2000, 512, dtype=torch.float64)
    t = time.perf_counter()
    for _ in range(5):
        a @ a.T
    report["reference_gflops_f64"] = 5 * 2 * 2000 * 2000 * 512 / (time.perf_counter() - t) / 1e9
    # vectorised and unvectorised interleaved, so a change of load hits both alike
    times, cpu_times, loop_times, loop_cpu, graph = [], [], [], [], None
    grams = None if args.skip_loop else build_grams(model, x, LAYERS, progress=False)
    for _ in range(args.repeats):
        t, cpu = time.perf_counter(), time.process_time()
        graph = build_interaction_graph(model, x, LAYERS, progress=False)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - cpu)
        if grams is not None:
            bases, edges, seconds, cpu_seconds = unvectorised(model, x, grams, 1e-14)
            loop_times.append(seconds)
            loop_cpu.append(cpu_seconds)
    report.update(build_seconds=times, build_cpu_seconds=cpu_times, stage_seconds=graph.seconds)
    print(f"zoo:modadd, {len(x)} pairs, jacobian + squared, float64, {args.threads} threads "
          f"(reference float64 matmul {report['reference_gflops_f64']:.1f} GFLOP/s)")  # fmt: skip
    print(
        f"vectorised build: median {statistics.median(times):.1f} s of {times} "
        f"(CPU {statistics.median(cpu_times):.1f} s; stages "
        + ", ".join(f"{k} {v:.1f} s" for k, v in graph.seconds.items())
        + ")"
    )
    if grams is not None:
        diff = max(float((e1 - e2).abs().max() / e1.abs().max())
                   for e1, e2 in zip(graph.edges, edges))  # fmt: skip
        lam = max(float((b1.Lambda - b2.Lambda).abs().max() / b1.Lambda.max())
                  for b1, b2 in zip(graph.bases[:-1], bases[:-1]))  # fmt: skip
        ratios = [u / v for u, v in zip(loop_times, times)]
        report.update(loop_seconds=loop_times, loop_cpu_seconds=loop_cpu, loop_ratios=ratios,
                      loop_edge_rel_diff=diff, loop_lambda_rel_diff=lam)  # fmt: skip
        print(f"unvectorised (one backward per output feature): median "
              f"{statistics.median(loop_times):.1f} s of {loop_times} (CPU "
              f"{statistics.median(loop_cpu):.1f} s); loop / vectorised per pair: median "
              f"{statistics.median(ratios):.2f} of {[round(r, 2) for r in ratios]}; largest "
              f"relative difference: edges {diff:.1e}, Lambda {lam:.1e}")  # fmt: skip
    if args.paper:
        pca = build_interaction_graph(model, x, LAYERS, GraphOptions(basis="svd"), progress=False)
        print("\n| section | LIB edges for 90% | PCA | LIB 99% | PCA 99% |\n|---|---|---|---|---|")
        sections = []
        for i in range(len(LAYERS) - 1):
            row = [
                graph.edge_weight_concentration(i),
                pca.edge_weight_concentration(i),
                graph.edge_weight_concentration(i, 0.99),
                pca.edge_weight_concentration(i, 0.99),
            ]
            sections.append(row)
            print(f"| {LAYERS[i]} -> {LAYERS[i + 1]} | " + " | ".join(map(str, row)) + " |")
        report["edge_concentration"] = sections
        curves = {}
        for label, g in (("LIB", graph), ("PCA", pca)):
            curves[label] = ablate_nodes(model, g, data.x_test, data.y_test,
                                         AblationOptions(cutoff=24, base=1.1),
                                         progress=False)  # fmt: skip
        print(
            "\n| node layer | kept (of width) | LIB dirs for test acc >= 0.99 | PCA | "
            "LIB acc @ 8 | PCA acc @ 8 |\n|---|---|---|---|---|---|"
        )
        nodes = {}
        for name in LAYERS[:3]:
            lib, pc = curves["LIB"][name], curves["PCA"][name]
            at = [c.accuracy[c.n_kept.index(8)] for c in (lib, pc)]
            nodes[name] = {"lib": lib.fewest_with_accuracy(0.99),
                           "pca": pc.fewest_with_accuracy(0.99), "at8": at,
                           "lib_kept": graph.bases[LAYERS.index(name)].dim,
                           "pca_kept": pca.bases[LAYERS.index(name)].dim}  # fmt: skip
            n = nodes[name]
            print(f"| {name} | {n['lib_kept']} / {n['pca_kept']} of {lib.n_total} | {n['lib']} "
                  f"| {n['pca']} | {at[0]:.3f} | {at[1]:.3f} |")  # fmt: skip
        report["node_ablation"] = nodes
        report["node_curves"] = {k: {w: [c.n_kept, c.accuracy] for w, c in v.items()}
                                 for k, v in curves.items()}  # fmt: skip
        freq = fourier(model, graph, model.config.p, 12)
        report["fourier"] = freq
        for name, rows in freq.items():
            print(f"\n{name}: top LIB directions (Lambda, dominant frequency, share of power)")
            for r in rows:
                print(f"  {r['direction']:>2}  {r['lambda']:10.4g}  k={r['frequency']:>3}  "
                      f"{r['share_of_power']:.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
