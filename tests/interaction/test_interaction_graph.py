"""The local interaction graph on tiny models: the properties that define "correct" (the
original's test suite, spec section 6.1), checked against oracles."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tyche.hooks import read_activations
from tyche.interaction import GraphOptions, build_interaction_graph
from tyche.interaction.fold import append_constant
from tyche.interaction.integrate import IntegrationRule
from tyche.interaction.jacobian import integrated_vjp, section_outputs
from tyche.interaction.sections import (
    ModelRunner,
    make_batches,
    prepared_model,
    resolve_node_layers,
)

MLP_LAYERS = ["layers.1:input", "layers.2:input", "output"]


class TinyMLP(nn.Module):
    """``layers.i`` = Linear + activation (none after the last); input ``(B, widths[0])``."""

    def __init__(self, widths=(5, 7, 6, 3), act: type[nn.Module] = nn.ReLU, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        blocks = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(widths) - 2
            blocks.append(nn.Linear(a, b) if last else nn.Sequential(nn.Linear(a, b), act()))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def mlp_data(n: int = 300, d: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d) + 0.3


def features(model: nn.Module, x: torch.Tensor, graph, i: int) -> torch.Tensor:
    """``[f, 1] @ C`` of node layer ``i`` read with hooks from a float64 copy of the model."""
    m64 = copy.deepcopy(model).double()
    name = graph.node_layers[i]
    with torch.no_grad(), read_activations(m64, [name]) as acts:
        m64(x.double())
    return append_constant(acts[name].double()) @ graph.bases[i].C


# ----------------------------------------------------------------------------- Lambda


@pytest.mark.parametrize("formula", ["(1-alpha)^2", "(1-0)*alpha"])
def test_lambda_is_the_variance_of_each_feature(formula: str) -> None:
    model, x = TinyMLP(), mlp_data()
    options = GraphOptions(basis=formula, edges=None, integration="gauss-legendre", n_intervals=4)
    graph = build_interaction_graph(model, x, MLP_LAYERS, options, progress=False)
    for i in range(2):
        f_hat = features(model, x, graph, i)
        lam = graph.bases[i].Lambda
        # E[f_hat^2] over the data equals Lambda; float64 sums of 300 products: ~1e-13 relative
        torch.testing.assert_close((f_hat**2).mean(0), lam, rtol=1e-9, atol=1e-12 * lam.max())
        # centred: every feature but the constant has mean 0 (so Lambda is its variance)
        assert (f_hat[:, 1:].mean(0).abs() <= 1e-9 * f_hat[:, 1:].std(0)).all()
        # the same float64 sums over 300 rows, less a mean of ~1e-9·std: ~1e-13 relative
        torch.testing.assert_close(f_hat[:, 1:].var(0, correction=0), lam[1:], rtol=1e-9, atol=0)


def test_functional_edges_sum_to_the_activation_size() -> None:
    model, x = TinyMLP(), mlp_data()
    options = GraphOptions(basis="(1-alpha)^2", edges="functional", integration="trapezoidal",
                           n_intervals=3)  # fmt: skip
    graph = build_interaction_graph(model, x, MLP_LAYERS, options, progress=False)
    for i in range(2):
        size = (features(model, x, graph, i) ** 2).mean(0)
        if i + 1 < 2:
            # the next layer's constant feature is the constant carried through: its only edge
            # comes from this layer's constant
            assert graph.edges[i][0, 1:].abs().max() <= 1e-12 * graph.edges[i].abs().max()
            assert graph.edges[i][0, 0] > 0
        # the same integrated gradients on both sides (Lambda is their absolute value);
        # float64 sums over 300 rows
        outgoing = graph.edges[i].sum(0).abs()
        torch.testing.assert_close(outgoing, size, rtol=1e-9, atol=1e-12 * size.max())  # as above


def test_lambda_of_alpha_formulas_agree_on_a_homogeneous_network() -> None:
    """With biases folded a ReLU network is positively homogeneous, so both non-jacobian
    formulas integrate to ``F J``: their Lambdas agree (any exact rule)."""
    model, x = TinyMLP(), mlp_data()
    kw = dict(edges=None, integration="gauss-legendre", n_intervals=2)
    a = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis="(1-alpha)^2", **kw),
                                progress=False)  # fmt: skip
    b = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis="(1-0)*alpha", **kw),
                                progress=False)  # fmt: skip
    for ba, bb in zip(a.bases[:-1], b.bases[:-1]):
        # two exact 3-node rules for the same integral: float64 rounding of sums over 300 rows
        # (~1e-13 relative) through an eigendecomposition
        torch.testing.assert_close(ba.Lambda, bb.Lambda, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize(
    ("formula", "edges", "rule", "n"),
    [("jacobian", "squared", "gradient", 0), ("(1-alpha)^2", "functional", "trapezoidal", 2)],
)
def test_rotating_the_final_layer_changes_only_the_last_basis_and_edges(
    formula: str, edges: str, rule: str, n: int
) -> None:
    model, x = TinyMLP(widths=(5, 7, 6, 6, 3)), mlp_data()
    layers = ["layers.1:input", "layers.2:input", "layers.3:input", "output"]
    kw = dict(basis=formula, edges=edges, integration=rule, n_intervals=n)
    plain = build_interaction_graph(model, x, layers, GraphOptions(rotate_final=False, **kw),
                                    progress=False)  # fmt: skip
    rotated = build_interaction_graph(model, x, layers, GraphOptions(rotate_final=True, **kw),
                                      progress=False)  # fmt: skip
    assert plain.bases[-1].C is None and rotated.bases[-1].C is not None
    for a, b in zip(plain.bases[:-1], rotated.bases[:-1]):
        # M differs only by float64 rounding of a rotation of the output: ~1e-13 relative
        torch.testing.assert_close(a.Lambda, b.Lambda, rtol=1e-8, atol=1e-12 * a.Lambda.max())
        # eigenvectors of those M: the ~1e-13 grown by 1/(relative eigengap)
        torch.testing.assert_close(a.C, b.C, rtol=1e-6, atol=1e-8)
    for a, b in zip(plain.edges[:-1], rotated.edges[:-1]):
        # products of those C: their tolerance
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10 * a.abs().max())


def block_model(seed: int = 0, bias: float = 0.1) -> tuple[nn.Module, torch.Tensor]:
    """A linear MLP whose weights are block diagonal (2 + 2) and data whose blocks have zero
    sample covariance (so every Gram and Jacobian moment is block diagonal)."""
    g = torch.Generator().manual_seed(seed)
    model = TinyMLP(widths=(4, 4, 4, 4), act=nn.Identity)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            lin = layer if isinstance(layer, nn.Linear) else layer[0]
            w = torch.zeros(4, 4)
            w[:2, :2] = torch.randn(2, 2, generator=g) * (1 + i)
            w[2:, 2:] = torch.randn(2, 2, generator=g) * 0.3
            lin.weight.copy_(w)
            lin.bias.fill_(bias)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.7, 3.0, 2.2])
    # independent blocks exactly: block B's centred columns orthogonal to block A's
    a = x[:, :2] - x[:, :2].mean(0)
    b = x[:, 2:] - x[:, 2:].mean(0)
    x[:, 2:] = b - a @ torch.linalg.lstsq(a, b).solution + 0.5
    return model, x - (0 if bias else x.mean(0))


@pytest.mark.parametrize(("formula", "edges"), [("jacobian", "squared"),
                                                ("(1-alpha)^2", "functional")])  # fmt: skip
def test_block_diagonal_linear_model_gives_block_diagonal_edges(formula: str, edges: str) -> None:
    # (1-alpha)^2 weighs gradients by the uncentred outputs F(f): a mean output couples the
    # blocks (E[F F^T] = Cov + mu mu^T), so that case runs on zero-mean data without biases
    model, x = block_model(bias=0.1 if formula == "jacobian" else 0.0)
    options = GraphOptions(basis=formula, edges=edges, integration="gradient" if formula ==
                           "jacobian" else "gauss-legendre", n_intervals=0 if formula ==
                           "jacobian" else 2)  # fmt: skip
    graph = build_interaction_graph(model, x, MLP_LAYERS, options, progress=False)

    def blocks(C: torch.Tensor) -> torch.Tensor:
        """0 or 1 per column (block of its largest entries); -1 for the constant."""
        mass = torch.stack([C[:2].pow(2).sum(0), C[2:4].pow(2).sum(0)])
        return torch.where(mass.sum(0) < 1e-20, -1, mass.argmax(0))

    for i, e in enumerate(graph.edges):
        b_in = blocks(graph.bases[i].C)
        C_out = graph.bases[i + 1].C
        b_out = blocks(C_out) if C_out is not None else torch.tensor([0, 0, 1, 1])
        # every LIB direction lies in one block: its other block's entries are rounding
        C = graph.bases[i].C[:4, 1:]
        assert (torch.minimum(C[:2].abs().max(0).values, C[2:].abs().max(0).values)
                <= 1e-10 * C.abs().max()).all()  # fmt: skip
        cross = (b_out[:, None] != b_in[None, :]) & (b_out[:, None] >= 0) & (b_in[None, :] >= 0)
        assert cross.any()
        # off-block edges are float64 rounding of exact zeros relative to the largest edge
        assert e[cross].abs().max() <= 1e-10 * e.abs().max()


@pytest.mark.parametrize("formula", ["jacobian", "(1-0)*alpha", "(1-alpha)^2", "svd"])
def test_centred_bases_have_one_constant_direction(formula: str) -> None:
    model, x = TinyMLP(), mlp_data()
    options = GraphOptions(basis=formula, edges=None, integration="gradient" if formula in
                           ("jacobian", "svd") else "trapezoidal", n_intervals=0 if formula in
                           ("jacobian", "svd") else 3)  # fmt: skip
    graph = build_interaction_graph(model, x, MLP_LAYERS, options, progress=False)
    for i in range(2):
        basis = graph.bases[i]
        # direction 0 reads only the constant coordinate; no other direction reads it
        assert not basis.C[:-1, 0].any() and basis.C[-1, 0] > 0
        assert basis.C_pinv[1:, -1].abs().max() <= 1e-12
        f_hat = features(model, x, graph, i)
        # C[:-1, 0] is exactly 0: every row's value is 1·C[-1, 0] plus exact zeros
        assert torch.allclose(f_hat[:, 0], f_hat[0, 0].expand(len(x)), rtol=1e-15, atol=0)
        # the rest have mean 0: float64 sums over 300 rows of O(1) values
        assert (f_hat[:, 1:].mean(0).abs() <= 1e-9 * f_hat[:, 1:].std(0)).all()
        # the constant direction in original coordinates is the mean activation
        mean = append_constant(basis.mean)
        row = basis.C_pinv[0] / basis.C_pinv[0, -1]
        # float64 pseudo-inverse of a small (≤ 8 square) basis: rounding of ~eps·cond
        torch.testing.assert_close(row, mean, rtol=1e-12, atol=1e-12)


def test_svd_basis_is_the_pca_basis() -> None:
    model, x = TinyMLP(), mlp_data()
    graph = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis="svd"), progress=False)
    for basis in graph.bases[:-1]:
        assert torch.equal(basis.C, basis.W) and torch.equal(basis.C_pinv, basis.W_pinv)
        assert basis.Lambda is None and basis.importance is basis.eigenvalues
    neuron = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis="neuron",
                                     center=False), progress=False)  # fmt: skip
    assert torch.equal(neuron.bases[0].C, torch.eye(8, dtype=torch.float64))


def test_squared_edges_are_nonnegative_and_jacobian_lambda_is_the_second_moment() -> None:
    model, x = TinyMLP(), mlp_data()
    graph = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    for e in graph.edges:
        assert (e >= 0).all() and e.max() > 0
    f_hat = features(model, x, graph, 0)
    lam = graph.bases[0].Lambda
    # float64 sums of 300 products: ~1e-13 relative (as for the other formulas)
    torch.testing.assert_close((f_hat**2).mean(0), lam, rtol=1e-9, atol=1e-12 * lam.max())


# ----------------------------------------------------------------------------- integration


class Cube(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x**3


def _integrated_jacobian(model: nn.Module, x: torch.Tensor, rule: IntegrationRule) -> torch.Tensor:
    layers = resolve_node_layers(model, ["0:input", "output"])
    with prepared_model(model, torch.float64) as m:
        runner = ModelRunner(m, layers, torch.float64)
        batch = make_batches(x, None)[0]
        fwd = section_outputs(runner, batch, 0, rule, need_full=False)
        width = fwd.full.shape[-1]
        eye = torch.eye(width, dtype=torch.float64)

        def make(k, a, b, y):  # noqa: ANN001, ANN202
            return eye[a:b].view(b - a, 1, 1, width).expand(-1, len(x), 1, -1).contiguous()

        parts = [J for _, _, J in integrated_vjp(fwd, rule, range(width), make, width)]
    return torch.cat([parts[0].f, parts[0].c.unsqueeze(-1)], -1)[:, :, 0]  # (out, B, in)


def test_integrated_gradients_of_x_cubed_converge_to_the_analytic_value() -> None:
    """F(x) = x^3 elementwise: the integrated Jacobian along alpha x is int 3 alpha^2 x^2 = x^2."""
    model = nn.Sequential(Cube())
    x = torch.linspace(-1.5, 2.0, 7, dtype=torch.float64).view(7, 1).expand(7, 3).contiguous()
    exact = x**2
    errors = []
    for n in (1, 4, 16, 64):
        J = _integrated_jacobian(model, x, IntegrationRule("trapezoidal", n))
        diag = torch.stack([J[j, :, j] for j in range(3)], 1)
        errors.append(float((diag - exact).abs().max()))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-3  # trapezoid error ~ max|x|^2 / (2 n^2) + the 1e-3/n end offset
    gl = _integrated_jacobian(model, x, IntegrationRule("gauss-legendre", 1))
    diag = torch.stack([gl[j, :, j] for j in range(3)], 1)
    # 2 Gauss-Legendre nodes are exact for the quadratic integrand: float64 rounding only
    torch.testing.assert_close(diag, exact, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(("rule", "n"), [("gradient", 0), ("trapezoidal", 3),
                                         ("gauss-legendre", 4)])  # fmt: skip
def test_integration_rules_agree_with_jacrev(rule: str, n: int) -> None:
    """The batched integrated Jacobian equals torch.func.jacrev of the folded section."""
    model = TinyMLP(widths=(3, 4, 2), act=nn.Tanh, seed=4).double()
    x = mlp_data(6, 3).double()
    layers = resolve_node_layers(model, ["layers.0:input", "output"])
    r = IntegrationRule(rule, n)
    with prepared_model(model, torch.float64) as m:
        runner = ModelRunner(m, layers, torch.float64)
        fwd = section_outputs(runner, make_batches(x, None)[0], 0, r, need_full=False)
        eye = torch.eye(3, dtype=torch.float64)
        ours = next(integrated_vjp(
            fwd, r, range(3), lambda k, a, b, y: eye[a:b].view(3, 1, 1, 3).expand(3, 6, 1, 3)
            .contiguous(), 3))[2]  # fmt: skip
    ours = torch.cat([ours.f, ours.c.unsqueeze(-1)], -1)[:, :, 0]  # (3 outputs + c, B, 4)
    lin1, lin2 = model.layers[0][0], model.layers[1]

    def folded(h: torch.Tensor) -> torch.Tensor:  # [x, c] -> [y, c]
        hidden = torch.tanh(h[:3] @ lin1.weight.T + h[3] * lin1.bias)
        return torch.cat([hidden @ lin2.weight.T + h[3] * lin2.bias, h[3:]])

    alphas, weights = r.points()
    for b in range(6):
        h = torch.cat([x[b], torch.ones(1, dtype=torch.float64)])
        ref = sum(w * torch.func.jacrev(folded)(a * h) for a, w in zip(alphas, weights))
        # the same float64 operations in another order: ~1e-15 relative
        torch.testing.assert_close(ours[:, b], ref[:3], rtol=1e-12, atol=1e-14)
