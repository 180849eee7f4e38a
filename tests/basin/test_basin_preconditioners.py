"""Preconditioners against closed forms: unit determinant, parameter-space matrices, Adam
state mapping, and the Fisher diagonal of softmax models and a causal LM."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tyche.basin.preconditioners import (
    adam_preconditioner,
    diag_preconditioner,
    fisher_diagonal,
    matrix_preconditioner,
    normalize_unit_det,
    normalize_unit_det_matrix,
    user_preconditioner,
)

F64 = torch.float64
#: log det of a float64 SPD matrix of condition κ is computed to ~eps·κ (LU or eigenvalues),
#: once when normalising and once in the test: for random_spd's κ = 1e5 that is ~2e-11 each;
#: measured up to 2.6e-11, so 1e-9 keeps ≥ 10× (a missed normalisation is off by O(1))
LOGDET_ATOL = 1e-9


def random_spd(d: int, seed: int, indefinite: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = torch.logspace(-3, 2, d, dtype=F64)
    if indefinite:
        lam[::2] *= -1
    return (q * lam) @ q.T


# ----------------------------------------------------------------------------- diagonal


def test_diag_preconditioner_matches_formula_and_has_unit_determinant():
    g = torch.Generator().manual_seed(0)
    spec = torch.randn(1000, generator=g, dtype=F64) ** 2 * 1e-4
    spec[::7] *= -1  # signs are ignored (|s|)
    p = diag_preconditioner(spec, eps=1e-3, exponent=0.5)
    raw = 1 / (spec.abs().sqrt() + 1e-3)
    # float64; the two normalisations differ in the rounding of a 1000-term mean of logs
    # |log raw| ≲ 7: ≤ 1000·eps·7 ≈ 8e-13 relative at worst; measured 6e-16
    torch.testing.assert_close(p, raw / raw.log().mean().exp(), rtol=1e-12, atol=0)
    # Σ log p over 1000 entries |log p| ≲ 2, each log shifted by the mean's rounding (≤ 8e-13):
    # ≤ 1000·(8e-13 + eps·2) ≈ 1e-9 at worst; measured 4.6e-13
    assert abs(float(p.log().sum())) < 1e-9
    # float32 input: float32 output, determinant still 1 to float32 accuracy: the mean is taken
    # in float64, so only the final rounding of each p_i (≤ 2^-24 ≈ 6e-8 relative) moves
    # mean log p; measured 1.2e-10
    p32 = diag_preconditioner(spec.float(), eps=1e-3, exponent=0.7)
    assert p32.dtype == torch.float32 and abs(float(p32.double().log().mean())) < 1e-6
    # exponent 0 is the identity, exactly: every log p_i is the same x, the mean is x to within
    # 1000·eps·|x| (|x| ≈ 1e-3), and exp of a difference that small rounds to 1.0
    assert torch.equal(diag_preconditioner(spec, exponent=0.0), torch.ones(1000, dtype=F64))
    assert diag_preconditioner(torch.tensor([1, 4, 9])).dtype == torch.float32


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        (torch.tensor([1.0, float("nan")]), {}, "NaN/inf"),
        (torch.tensor([1.0, float("inf")]), {}, "NaN/inf"),
        (torch.ones(2, 2), {}, "1-D"),
        (torch.ones(0), {}, "1-D"),
        (torch.ones(3), {"eps": -1e-3}, "eps"),
        (torch.ones(3), {"exponent": -0.5}, "exponent"),
        (torch.ones(3), {"eps": float("nan")}, "eps"),
        (torch.zeros(3), {"eps": 0.0}, "divides by zero"),
        (torch.tensor([0.0, 1.0]), {"eps": 0.0}, "divides by zero"),
    ],
)
def test_diag_preconditioner_errors(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        diag_preconditioner(spec, **kwargs)


def test_normalize_unit_det_is_scale_invariant_and_validates():
    p = torch.tensor([0.5, 2.0, 8.0, 1.0], dtype=F64)
    q = normalize_unit_det(p)
    # float64, 4 logs of size ≲ 6 (+ log 37 ≈ 3.6) and one exp: ≲ 4·eps·10 ≈ 1e-14 relative
    torch.testing.assert_close(normalize_unit_det(37.0 * p), q, rtol=1e-13, atol=0)
    # geometric mean 2^¾; exp of a 4-term mean of logs ≲ 2 plus two roundings: ≲ 4·eps·2 + 2·eps
    # ≈ 2e-15 relative at worst; measured 1.9e-16
    torch.testing.assert_close(q, p / 2 ** (3 / 4), rtol=1e-14, atol=0)
    for bad, match in [
        ([1.0, 0.0], "non-positive"),
        ([1.0, -2.0], "non-positive"),
        ([1.0, float("nan")], "NaN"),
        ([[1.0]], "1-D"),
    ]:
        with pytest.raises(ValueError, match=match):
            normalize_unit_det(torch.tensor(bad))


# ----------------------------------------------------------------------------- matrices


@pytest.mark.parametrize("indefinite", [False, True])
def test_matrix_preconditioner_acts_in_parameter_space(indefinite):
    """P v_k = p_k v_k for every eigenvector v_k of H. The original returned V·diag(p) (used
    as x ↦ x P), which sends an eigenvector to eigen-coordinates, not to a multiple of it."""
    h = random_spd(12, seed=1, indefinite=indefinite)
    lam, vecs = torch.linalg.eigh(h)
    p = matrix_preconditioner(h, eps=1e-3, exponent=0.5)
    scales = 1 / (lam.abs().sqrt() + 1e-3)
    scales = scales / scales.log().mean().exp()
    # float64 eigenvectors of H (|H| = 100, smallest eigengap ≈ 1.9e-3) are accurate to
    # ~eps·|H|/gap ≈ 1e-11, scaled by |p| ≲ 20; measured ≤ 5.4e-12 under every setting: 18×
    for k in range(12):
        torch.testing.assert_close(p @ vecs[:, k], scales[k] * vecs[:, k], rtol=0, atol=1e-10)
    torch.testing.assert_close(p, p.T, rtol=0, atol=0)  # exact: P is built as (M + Mᵀ)/2
    assert float(torch.linalg.eigvalsh(p).min()) > 0
    sign, logdet = torch.linalg.slogdet(p)
    # P's condition is ≈ 300 (not H's 1e5): ~eps·300 ≈ 7e-14 per log det; measured 1.6e-14
    assert float(sign) == 1 and abs(float(logdet)) < 1e-10
    # same eigenvectors as H: ≲ 12·eps·|P|·|H| ≈ 3e-12; measured 7e-14. Loose against rounding,
    # tight against a wrong basis (O(1))
    torch.testing.assert_close(p @ h, h @ p, rtol=0, atol=1e-9)
    # the original's form fails this check, so the test discriminates
    original = vecs * scales
    v0 = vecs[:, 0]
    image = v0 @ original
    assert (image - (image @ v0) * v0).norm() > 0.5 * image.norm()


def test_matrix_preconditioner_on_a_diagonal_matrix_equals_the_diagonal_one():
    s = torch.tensor([1e-4, 1e-2, 1.0, 3.0, 0.0], dtype=F64)
    p = matrix_preconditioner(torch.diag(s), eps=1e-2, exponent=0.5)
    # a diagonal matrix has exact unit eigenvectors, so both are the same float64 formula up
    # to the order of one 5-term mean (measured identical)
    torch.testing.assert_close(
        p, torch.diag(diag_preconditioner(s, eps=1e-2)), rtol=1e-12, atol=1e-14
    )
    assert matrix_preconditioner(torch.diag(s).float(), eps=1e-2).dtype == torch.float32


def test_matrix_preconditioner_errors():
    with pytest.raises(ValueError, match="not symmetric"):
        matrix_preconditioner(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        matrix_preconditioner(torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        matrix_preconditioner(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


def test_normalize_unit_det_matrix():
    m = random_spd(6, seed=2)
    out = normalize_unit_det_matrix(m)
    assert abs(float(torch.linalg.slogdet(out)[1])) < LOGDET_ATOL  # κ = 1e5; measured 2.9e-12
    ratio = out / m
    # one scalar factor, two roundings per entry: ≤ 2 eps; measured 2.8e-16
    torch.testing.assert_close(ratio, torch.full_like(m, float(ratio[0, 0])), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="not positive definite"):
        normalize_unit_det_matrix(random_spd(6, seed=2, indefinite=True))
    with pytest.raises(ValueError, match="not symmetric"):
        normalize_unit_det_matrix(m + torch.triu(torch.ones(6, 6, dtype=F64), 1))


def test_user_preconditioner_validation():
    p = user_preconditioner(torch.tensor([1.0, 4.0]), 2)
    # exact: the float64 log/exp land within a few float64 ulps of 0.5 and 2.0, which round to
    # them exactly in float32 (measured identical)
    torch.testing.assert_close(p, torch.tensor([0.5, 2.0]), rtol=0, atol=0)
    assert user_preconditioner([1.0, 4.0], 2).dtype == torch.float32  # plain lists accepted
    m = user_preconditioner(random_spd(3, seed=3), 3)
    # κ = 1e5: measured 2.6e-11, which the former 1e-10 only cleared by 4×
    assert abs(float(torch.linalg.slogdet(m)[1])) < LOGDET_ATOL
    cases = [
        (torch.ones(3), 4, r"length \(3,\).*D = 4|shape \(3,\).*D = 4"),
        (torch.ones(3, 3), 4, r"shape \(3, 3\).*D = 4"),
        (torch.tensor([1.0, -1.0]), 2, "non-positive"),
        (torch.tensor([1.0, 0.0]), 2, "non-positive"),
        (torch.tensor([1.0, float("inf")]), 2, "NaN or inf"),
        (random_spd(3, seed=3, indefinite=True), 3, "not positive definite"),
        (torch.ones(2, 2, 2), 2, r"\(D,\) vector or a \(D, D\) matrix"),
    ]
    for pre, dim, match in cases:
        with pytest.raises(ValueError, match=match):
            user_preconditioner(pre, dim)
    with pytest.raises(TypeError, match="tensor"):
        user_preconditioner(object(), 2)


# ----------------------------------------------------------------------------- Adam


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def expected(model, opt, names, key="exp_avg_sq", **kw):
    params = dict(model.named_parameters())
    spec = torch.cat([opt.state[params[n]][key].reshape(-1) for n in names])
    return diag_preconditioner(spec, **kw)


def test_adam_from_named_optimizer_state_dict_and_path(tmp_path):
    model = tiny_net()
    opt = torch.optim.Adam(model.named_parameters(), lr=1e-2)  # state dict has param_names
    train(model, opt)
    names = ["2.weight", "0.bias"]  # a subset, in an order unlike the model's
    shapes = [model.get_parameter(n).shape for n in names]
    p = adam_preconditioner(opt.state_dict(), names, shapes, eps=1e-4)
    assert p.shape == (15 + 5,)
    # the same float64 formula on the same moments, gathered by another route: identical up
    # to the order of a 20-term mean (measured identical); a wrong mapping is off by O(1)
    torch.testing.assert_close(p, expected(model, opt, names, eps=1e-4), rtol=1e-6, atol=0)
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    # same path: diag_preconditioner on the same moments, read back bit for bit from the file
    torch.testing.assert_close(adam_preconditioner(str(path), names, shapes, eps=1e-4), p)
    p1 = adam_preconditioner(path, names, shapes, order=1, eps=1e-4, exponent=1.0)
    # as above, on exp_avg (measured identical); a wrong mapping or moment is off by O(1)
    torch.testing.assert_close(
        p1, expected(model, opt, names, "exp_avg", eps=1e-4, exponent=1.0), rtol=1e-6, atol=0
    )


def test_adam_from_unnamed_state_dict_with_groups_needs_the_optimizer_order():
    model = tiny_net()
    params = dict(model.named_parameters())
    decay, no_decay = ["0.weight", "2.weight"], ["0.bias", "2.bias"]  # HF Trainer-style groups
    opt = torch.optim.AdamW(
        [
            {"params": [params[n] for n in decay]},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
        ]
    )
    train(model, opt)
    state = opt.state_dict()
    assert all("param_names" not in g for g in state["param_groups"])
    names = list(params)
    shapes = [params[n].shape for n in names]
    p = adam_preconditioner(state, names, shapes, optimizer_param_names=decay + no_decay)
    # as above: the same formula on the same moments (measured identical)
    torch.testing.assert_close(p, expected(model, opt, names), rtol=1e-6, atol=0)
    # given the model, the reader finds the Trainer-style order by itself
    # same path: the same moments found by another name mapping, through the same formula
    torch.testing.assert_close(adam_preconditioner(state, names, shapes, model=model), p)
    # without either, ids are matched to `names` (model order): wrong shapes are caught
    with pytest.raises(ValueError, match="could not match"):
        adam_preconditioner(state, names, shapes)
    with pytest.raises(ValueError, match="could not match"):
        adam_preconditioner(state, names[:2], shapes[:2])


def test_adam_from_zoo_mapping_and_errors():
    model = tiny_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt)
    params = dict(model.named_parameters())
    zoo = {n: dict(opt.state[p]) for n, p in params.items()}
    names, shapes = list(params), [p.shape for p in params.values()]
    # same path: diag_preconditioner on the same concatenated float32 moments
    torch.testing.assert_close(adam_preconditioner(zoo, names, shapes), expected(model, opt, names))
    partial = {n: v for n, v in zoo.items() if n != "2.bias"}
    with pytest.raises(ValueError, match=r"1 selected parameters have no 'exp_avg_sq'.*2\.bias"):
        adam_preconditioner(partial, names, shapes)
    with pytest.raises(ValueError, match=r"exp_avg_sq of '0.weight' has shape \(5, 4\)"):
        adam_preconditioner(zoo, names, [(4, 5)] + shapes[1:])
    with pytest.raises(ValueError, match="order"):
        adam_preconditioner(zoo, names, shapes, order=3)
    with pytest.raises(ValueError, match="no 'exp_avg_sq'"):  # a fresh optimizer has no state
        adam_preconditioner(torch.optim.Adam(model.named_parameters()).state_dict(), names, shapes)
    with pytest.raises(TypeError, match="optimizer state must be a path"):
        adam_preconditioner(3, names, shapes)


# ----------------------------------------------------------------------------- Fisher


def softmax_closed_form(model: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Fisher diagonal of a linear softmax model, mean over examples: for W (C, d), b (C,)
    F_W[c, j] = mean_n p_nc (1 − p_nc) x_nj², F_b[c] = mean_n p_nc (1 − p_nc)."""
    p = torch.softmax(model(x), -1).detach()
    v = p * (1 - p)
    return torch.cat([(v[:, :, None] * x[:, None, :] ** 2).mean(0).reshape(-1), v.mean(0)])


@pytest.fixture()
def softmax_model():
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    x = torch.randn(30, 5, dtype=F64)
    return model, x


def test_fisher_exact_matches_the_softmax_closed_form(softmax_model):
    model, x = softmax_model
    closed = softmax_closed_form(model, x)
    # float64 means over 30 examples of positive terms: ≲ 30·eps ≈ 7e-15 relative (for any
    # batch size); measured 3.9e-16
    for batch_size in (7, 32):
        f = fisher_diagonal(model, x, names=["weight", "bias"], exact=True, batch_size=batch_size)
        assert f.dtype == F64 and f.shape == (24,)
        torch.testing.assert_close(f, closed, rtol=1e-10, atol=0)  # ≲ 30·eps, as above
    f_bias = fisher_diagonal(model, x, names=["bias"], exact=True)
    torch.testing.assert_close(f_bias, closed[-4:], rtol=1e-10, atol=0)  # ≲ 30·eps, as above


def test_fisher_sampled_is_unbiased_for_the_closed_form(softmax_model):
    model, x = softmax_model
    closed = softmax_closed_form(model, x)
    gen = torch.Generator().manual_seed(0)
    f = fisher_diagonal(model, x, names=["weight", "bias"], n_draws=400, generator=gen)
    rel = (f / closed - 1).abs()
    # Monte Carlo error, not rounding: 0.015 mean and 0.038 max here; over seeds 0-19 the
    # mean stays ≤ 0.024 and the max ≤ 0.080, so the bounds hold for any seed
    assert float(rel.mean()) < 0.03 and float(rel.max()) < 0.12
    again = fisher_diagonal(
        model, x, names=["weight", "bias"], n_draws=400, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(f, again)  # exact: the same draws through the same ops


def test_fisher_exact_on_a_nonlinear_classifier_matches_a_direct_loop():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Linear(6, 4)).double().eval()
    x = torch.randn(9, 3, dtype=F64)
    f = fisher_diagonal(model, x, names=["0.weight", "2.bias"], exact=True, batch_size=4)
    w, b = model[0].weight, model[2].bias
    direct = torch.zeros(18 + 4, dtype=F64)
    for n in range(9):
        logp = model(x[n : n + 1]).log_softmax(-1)[0]
        for c in range(4):
            g = torch.autograd.grad(logp[c], [w, b], retain_graph=True)
            direct += logp[c].exp().detach() * torch.cat([t.reshape(-1) for t in g]) ** 2
    # float64, 36 positive terms per entry summed in another order: ≲ 36·eps ≈ 8e-15 relative;
    # measured 6.6e-16
    torch.testing.assert_close(f, direct / 9, rtol=1e-10, atol=0)


def lm_closed_form(model, batch) -> torch.Tensor:
    """Per-token Fisher of GPT-2's final LayerNorm bias β: logits = W (γ·n(h) + β) + ..., so
    ∂ log p_v/∂β = W_v − E_p W and F_β = mean over unmasked tokens of Var_{v~p}(W[v, :])."""
    with torch.no_grad():
        p = model(**batch).logits.softmax(-1)  # (N, T, V)
    weight = model.lm_head.weight.detach()  # (V, d)
    mean = p @ weight
    var = p @ weight**2 - mean**2  # (N, T, d)
    mask = batch["attention_mask"].to(F64)
    return (var * mask[..., None]).sum((0, 1)) / mask.sum()


def test_fisher_of_a_causal_lm_matches_closed_form_and_ignores_masked_tokens(
    gpt2_model, token_batch
):
    model = copy.deepcopy(gpt2_model).double()
    names = ["transformer.ln_f.bias"]
    # exact=True costs T·V backward passes per sequence: keep the batch short
    batch = {k: v[:3, :6].clone() for k, v in token_batch.items()}
    batch["attention_mask"][1, -2:] = 0
    batch["input_ids"][1, -2:] = 1
    token_batch = batch
    closed = lm_closed_form(model, token_batch)
    exact = fisher_diagonal(model, token_batch, names=names, exact=True, batch_size=3)
    # float64: backward passes vs a closed form over V = 512 words, a variance E[W²] - E[W]²
    # that cancels ~10×: ≲ 512·eps·10 ≈ 1e-12 relative; measured 2.8e-15
    torch.testing.assert_close(exact, closed, rtol=1e-8, atol=0)
    other = {k: v.clone() for k, v in token_batch.items()}
    other["input_ids"][1, -2:] = 7
    # what sits at masked positions does not matter: the same batch through the same ops, the
    # masked tokens' terms weighted by 0 (float64; measured identical)
    torch.testing.assert_close(
        fisher_diagonal(model, other, names=names, exact=True), exact, rtol=1e-12, atol=0
    )
    # the sampled per-sequence estimator is unbiased for the per-token Fisher
    gen = torch.Generator().manual_seed(0)
    sampled = fisher_diagonal(model, token_batch, names=names, n_draws=128, generator=gen)
    rel = (sampled / closed - 1).abs()
    total = float(sampled.sum() / closed.sum() - 1)
    print(
        f"\nsampled LM Fisher: relative error mean {float(rel.mean()):.3f}, of the sum {total:.3f}"
    )
    # Monte Carlo error: over seeds 0-11 the mean error stays ≤ 0.064 and that of the sum ≤ 0.022
    assert float(rel.mean()) < 0.1 and abs(total) < 0.05


def test_fisher_errors(softmax_model):
    model, x = softmax_model
    with pytest.raises(ValueError, match="unknown"):
        fisher_diagonal(model, x, names=["nope"])
    with pytest.raises(ValueError, match="n_draws"):
        fisher_diagonal(model, x, names=["bias"], n_draws=0)
    with pytest.raises(ValueError, match="no examples"):
        fisher_diagonal(model, x[:0], names=["bias"])
    dropout = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.1)).double().train()
    with pytest.raises(ValueError, match="eval"):
        fisher_diagonal(dropout, x, names=["0.bias"])
