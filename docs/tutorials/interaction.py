# ruff: noqa: E402 (each cell imports what it uses)

# %% [markdown]
# # The local interaction basis of the digits MLP
#
# Which directions of each layer matter for the next one, and how do the layers interact? The
# local interaction basis (LIB; Bushnaq et al. 2024) gives every *node layer* a basis built
# from the output backwards: the Gram matrix of the layer's activations (the bias folded in
# as a constant coordinate, centred) is whitened, the second moment of the Jacobian of the
# next layer's LIB features is diagonalised, and each direction is scaled by the square root
# of its importance Λ. Between consecutive layers, an edge matrix holds the interaction
# strengths of the directions. PCA (`basis="svd"`) comes from the same code path as a
# baseline.
#
# The model is the basin paper's MLP on sklearn's digits (`zoo:digits-mlp`: 64 pixels →
# 64 GELU units → 10 classes, trained here in about a second). The node layers are the
# pixels (`0:input`, the input of module `0`), the hidden units after the GELU (`2:input`)
# and the logits (`output`). The zoo's `zoo:modadd` (the LIB paper's modular-addition
# transformer) trains for about 20 minutes; its graph and curves are in
# [BENCHMARKS](../../benchmarks.md).

# %%
import torch

from tyche.interaction import GraphOptions, build_interaction_graph
from tyche.zoo import load_digits_mlp

torch.manual_seed(0)
mlp = load_digits_mlp()
model, x, y = mlp.model, mlp.x_train, mlp.y_train  # (1024, 64) pixels in [0, 1], (1024,)
node_layers = ["0:input", "2:input", "output"]
options = GraphOptions(basis="jacobian", edges="squared", dtype=torch.float64)
graph = build_interaction_graph(model, x, node_layers, options, progress=False)
for basis in graph.bases:
    if basis.Lambda is not None:
        first = ", ".join(f"{v:.3g}" for v in basis.Lambda[:6])
        print(f"{basis.node_layer:>8}: {basis.C.shape[1]} directions; Λ of the first six: {first}")
for i, edges in enumerate(graph.edges):
    print(f"edges {node_layers[i]} -> {node_layers[i + 1]}: {tuple(edges.shape)}")

# %% [markdown]
# `C` (original coordinates, with the folded bias as the last row → LIB directions), its
# pseudo-inverse `C_pinv` and `Lambda` are per node layer; `graph.edges[i]` (k_next, k_this)
# holds the interaction strengths between the directions of layers i and i + 1. The first
# direction of each layer is the constant one (the centring puts it first); the others are
# ordered by Λ. The pixels keep 53 directions of 65 (64 pixels and the bias, less those the
# data never varies), the hidden layer only 11: the logits read 10 directions of it, plus the
# constant.
#
# ## The graph
#
# `plot_graph` draws the 12 most important directions of each layer as nodes and, for each
# pair of layers, the fewest strongest edges that carry most of the pair's weight, widths by
# strength.

# %%
from tyche.interaction.plot import plot_graph

plot_graph(graph, "graph.png", nodes_per_layer=12)

# %% [markdown]
# ## How many directions does the model need?
#
# `ablate_nodes` keeps the top n directions of one node layer at a time (ablating the rest)
# and measures accuracy and loss on the 773 held-out digits, for every n up to 16 and then
# steps of × 1.25. The same for the PCA basis shows what the LIB ordering buys.

# %%
from tyche.interaction import AblationOptions, ablate_nodes
from tyche.interaction.plot import plot_ablation_curves

pca = build_interaction_graph(
    model, x, node_layers, GraphOptions(basis="svd", edges=None), progress=False
)
ablation = AblationOptions(schedule="exponential")
curves = {
    "LIB": ablate_nodes(model, graph, mlp.x_test, mlp.y_test, ablation, progress=False),
    "PCA": ablate_nodes(model, pca, mlp.x_test, mlp.y_test, ablation, progress=False),
}
for label, by_layer in curves.items():
    for where, curve in by_layer.items():
        shown = [(n, a) for n, a in zip(curve.n_kept, curve.accuracy) if n in (1, 2, 4, 8, 16)]
        points = ", ".join(f"{n} kept {a:.3f}" for n, a in shown)
        print(f"{label:3} {where:>7} (unablated {curve.baseline_accuracy:.3f}): {points}")
plot_ablation_curves(curves, "ablation.png")

# %% [markdown]
# Each panel is one node layer; the dashed line is the unablated model's test accuracy. At
# the pixels, the LIB directions recover the accuracy with fewer directions than the
# directions of largest variance; at the hidden layer the two bases nearly agree, since both
# span the 10 directions the logits read within their first 11. On
# the command line the same is `tyche interaction build --model zoo:digits-mlp
# --node_layers 0:input,2:input,output --out runs/lib`, then
# `tyche interaction ablate --graph runs/lib --kind nodes` and
# `tyche interaction plot --graph runs/lib`.
