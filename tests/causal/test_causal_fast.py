"""Tests for the fast lens path (``tyche.causal.lens_algebra``), the direction search's
stopping rule, subsample and bookkeeping (``tyche.causal.search``), and the joint refinement
(``tyche.causal.refine``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_causal import SoftmaxTarget, random_hiddens
from torch import nn

from conftest import build_gpt2, build_llama, build_neox
from tyche.causal import (
    AblationObjective,
    CausalBasis,
    CausalOptions,
    LogitLens,
    TunedLens,
    extract_causal_basis,
)
from tyche.causal.refine import orthonormal_factor

MODES = ["zero", "mean", "resample"]
#: Fast and direct paths compute the same float64 numbers in a different order (logits
#: assembled from cached pieces vs a fresh product; log S/Σp vs Σ p (log p - log q)). Each
#: per-position energy or gradient entry is a sum of ≲ V·d = 3·10⁴ terms of size ≲ 10
#: (logits), so they may differ by ≲ 10 · 3·10⁴ · 2.2e-16 ≈ 7e-11 relative to the terms;
#: measured: ≤ 4e-15 absolute on energies ~1e-3..1 (ratio 1e-12). Bounds:
F64_RTOL, F64_ATOL = 1e-9, 1e-12
#: In float32 (HF's LlamaRMSNorm computes in float32 whatever the input dtype) both paths are
#: compared with a float64 oracle. The fast path's per-position energy is log(S/Σp), S ≈ 1 +
#: energy, so its error is a few float32 ulps of 1: ~3e-7, averaged over positions; measured
#: ≤ 3e-8. The direct path subtracts log-probabilities of size |log p| ≲ 10: ~1e-6; measured
#: ≤ 1.2e-7. Gradients: ~1e-6 of their largest entry, measured ≤ 1.2e-6 (4 portable
#: settings; 1e-5 kept only 8.6×). Bounds (≥ 10×):
F32_FAST_ATOL, F32_DIRECT_ATOL, F32_GRAD_RTOL = 3e-7, 1e-6, 3e-5


class ExactRMSNorm(nn.Module):
    """``w ⊙ g / sqrt(mean g² + eps)`` in the input's dtype (HF's Llama norm uses float32)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.variance_epsilon = eps

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.weight * g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def lens_target(arch: str, kind: str, dtype=torch.float64) -> nn.Module:
    """A lens on a tiny model (norm gains and biases randomised), in ``dtype``."""
    if arch == "custom":  # LayerNorm without affine, a readout with a bias
        readout = nn.Linear(64, 512).to(dtype)
        _randomise(readout, 1)
        return LogitLens(nn.LayerNorm(64, elementwise_affine=False), readout)
    if arch == "identity":  # no norm at all
        return LogitLens(nn.Identity(), nn.Linear(64, 512, bias=False).to(dtype))
    model = {"gpt2": build_gpt2, "neox": build_neox, "llama": build_llama}[arch]().to(dtype)
    lens = LogitLens.from_model(model)
    norm = lens.norm.inner
    _randomise(norm, 2)
    if arch == "llama":
        model.model.norm = ExactRMSNorm(norm.weight, norm.variance_epsilon)
    if kind == "logit":
        return LogitLens.from_model(model)
    tuned = TunedLens(model, "resid_pre.1")
    _randomise(tuned.translators, 3)
    return tuned.for_site("resid_pre.1")


def problem(seed: int = 0, dtype=torch.float64):
    h = random_hiddens((3, 7, 64), seed=seed).to(dtype) * 2
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    labels = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(seed))
    labels[0, -1] = -100
    frame = torch.linalg.qr(torch.randn(64, 3, generator=torch.Generator().manual_seed(5)))
    return h, mask, labels, frame.Q.to(dtype)


def both_paths(target, h, mask, labels, mode, objective, **kw):
    made = [AblationObjective(target, h, CausalOptions(mode=mode, objective=objective,
                                                       batch_size=2, fast=fast, **kw),
                              mask=mask, labels=labels,
                              generator=torch.Generator().manual_seed(1))
            for fast in (True, False)]  # fmt: skip
    assert made[0].factored is not None and made[1].factored is None
    return made


@pytest.mark.parametrize(
    "arch,kind",
    [("gpt2", "logit"), ("neox", "logit"), ("llama", "logit"), ("gpt2", "tuned"),
     ("llama", "tuned"), ("custom", "logit"), ("identity", "logit")],
)  # fmt: skip
def test_fast_path_equals_the_direct_computation_in_float64(arch, kind):
    """Energies and gradients, every ablation mode and objective, one vector and a subspace."""
    target = lens_target(arch, kind)
    h, mask, labels, frame = problem()
    for mode in MODES:
        for objective in ("kl", "ce"):
            fast, direct = both_paths(target, h, mask, labels, mode, objective,
                                      screen_positions=7)  # fmt: skip
            assert fast.subsample_fraction < 1
            for vectors in (frame[:, 0], frame):
                for sub in (False, True):
                    e1, g1 = fast.value_and_grad(vectors, subsample=sub)
                    e2, g2 = direct.value_and_grad(vectors, subsample=sub)
                    # fast vs direct in float64: the F64 bounds (≲ 7e-11 of the terms, above)
                    torch.testing.assert_close(e1, e2, rtol=F64_RTOL, atol=F64_ATOL)
                    torch.testing.assert_close(g1, g2, rtol=F64_RTOL, atol=F64_ATOL)  # as above
                    assert abs(e1 - fast.energy(vectors, subsample=sub)) <= F64_ATOL
                    assert g1.abs().max() > 1e-6  # a real gradient was compared


def test_hf_llama_norm_is_recognised_and_both_paths_meet_a_float64_oracle():
    model = build_llama()
    target = LogitLens.from_model(model)
    assert type(target.norm.inner).__name__ == "LlamaRMSNorm"
    exact = build_llama().double()
    exact.model.norm = ExactRMSNorm(exact.model.norm.weight, exact.model.norm.variance_epsilon)
    h, mask, labels, frame = problem(dtype=torch.float32)
    for mode in MODES:
        for objective in ("kl", "ce"):
            fast, direct = both_paths(target, h, mask, labels, mode, objective)
            oracle = AblationObjective(LogitLens.from_model(exact), h.double(),
                                       CausalOptions(mode=mode, objective=objective,
                                                     batch_size=2, fast=False),
                                       mask=mask, labels=labels,
                                       generator=torch.Generator().manual_seed(1))  # fmt: skip
            for vectors in (frame[:, 0], frame):
                e0, g0 = oracle.value_and_grad(vectors.double())
                for path, tol in ((fast, F32_FAST_ATOL), (direct, F32_DIRECT_ATOL)):
                    e, g = path.value_and_grad(vectors)
                    assert abs(float(e) - float(e0)) <= tol, (mode, objective, path.factored)
                    atol = F32_GRAD_RTOL * float(g0.abs().max())
                    # float32 vs the float64 oracle: ~1e-6 of the largest entry (F32 bounds above)
                    torch.testing.assert_close(g.double(), g0, rtol=0, atol=atol)


def test_cache_budget_changes_memory_not_results():
    target = lens_target("gpt2", "logit")
    h, mask, labels, frame = problem()
    chunk_gb = 2 * 7 * 512 * 8 / 2**30  # chunk 1: 2 rows × 7 positions; chunk 2: 1 row
    runs = {}
    for gb in (0.0, chunk_gb * 1.2, chunk_gb * 2.5, 1.0):
        obj = AblationObjective(target, h, CausalOptions(batch_size=2, cache_gb=gb), mask=mask)
        runs[gb] = (obj.factored.cached_fraction, obj.value_and_grad(frame))
    fractions = [f for f, _ in runs.values()]
    assert fractions == [0.0, 0.5, 1.0, 1.0]  # 2 chunks; readouts first, probabilities after
    reference = runs[1.0][1]
    # cached vs recomputed pieces in float64, another order: the F64 bounds (above)
    for _, (energy, grad) in runs.values():
        torch.testing.assert_close(energy, reference[0], rtol=F64_RTOL, atol=F64_ATOL)
        torch.testing.assert_close(grad, reference[1], rtol=F64_RTOL, atol=F64_ATOL)  # as above
    with pytest.raises(ValueError, match="cache_gb must be >= 0"):
        AblationObjective(target, h, CausalOptions(cache_gb=-1.0))


def test_default_cache_is_half_the_free_memory(monkeypatch):
    import tyche.causal.objective as objective
    import tyche.memory as memory

    target = lens_target("gpt2", "logit")
    h, mask, _, _ = problem()
    chunk_bytes = 2 * 7 * 512 * 8  # one chunk's readout (float64 hidden states)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for free, fraction in ((0, 0.0), (2 * 1.2 * chunk_bytes, 0.5), (1 << 40, 1.0)):
        monkeypatch.setattr(memory, "available_memory", lambda device, free=free: free)
        obj = AblationObjective(target, h, CausalOptions(batch_size=2), mask=mask)
        assert obj.cache_gb == int(objective.AUTO_CACHE_SHARE * free) / 2**30
        assert obj.factored.cached_fraction == fraction
    # two torchrun processes on one host split the share between them
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    obj = AblationObjective(target, h, CausalOptions(batch_size=2), mask=mask)
    assert obj.cache_gb == int(objective.AUTO_CACHE_SHARE * free / 2) / 2**30


def test_an_unknown_or_wrong_norm_falls_back_to_the_general_path():
    class ShiftedRMSNorm(ExactRMSNorm):  # looks like an RMSNorm, but the gain is 1 + w
        def forward(self, g):
            return super().forward(g) + g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)

    h, mask, labels, frame = problem()
    readout = nn.Linear(64, 512).double()
    unknown = LogitLens(nn.Tanh(), readout)  # not a norm we know: no factors
    assert unknown.lens_factors() is None
    assert AblationObjective(unknown, h).factored is None
    wrong = LogitLens(ShiftedRMSNorm(torch.ones(64, dtype=torch.float64), 1e-6), readout)
    assert wrong.lens_factors() is not None
    with pytest.warns(UserWarning, match="did not reproduce its logits"):
        obj = AblationObjective(wrong, h)
    assert obj.factored is None  # the general path gives the right energies
    manual = obj.energy(frame[:, 0])
    clean = wrong(h).detach().log_softmax(-1)
    mu = h.reshape(-1, 64).mean(0)
    ablated = h - torch.outer(((h - mu) @ frame[:, 0]).reshape(-1), frame[:, 0]).reshape(h.shape)
    with torch.no_grad():
        expected = (clean.exp() * (clean - wrong(ablated).log_softmax(-1))).sum(-1).mean()
    # float64, the general path vs this formula: 512-term sums of |terms| ≲ 10 in another
    # order, ≲ 512·1.1e-16·10 ≈ 6e-13 of the terms; a fast path that ran instead is O(1) off
    assert math.isclose(manual, float(expected), rel_tol=1e-12)


def test_huge_ablated_logits_take_the_overflow_safe_route():
    """Zero-ablating a direction that carries 1e5 of the state moves logits by ~1e4: the
    fast path's exponent t = Δ - Σ p Δ (Δ = ablated - clean logits) exceeds 709, e^t overflows
    float64, and the max-shifted sum must still give the direct path's values."""
    target = lens_target("identity", "logit")  # no norm: logits scale with the state
    h, mask, labels, _ = problem()
    g = torch.Generator().manual_seed(3)
    big = torch.linalg.qr(torch.randn(64, 1, generator=g, dtype=torch.float64))[0]
    h = h + 1e5 * big[:, 0]
    with torch.no_grad():
        clean = target(h)
        delta = target(h - (h @ big) * big[:, 0]) - clean
        t = delta - (clean.softmax(-1) * delta).sum(-1, keepdim=True)
    assert float(t.max()) > 709  # e^t overflows: the safe route is needed
    for objective in ("kl", "ce"):
        fast, direct = both_paths(target, h, mask, labels, "zero", objective)
        e1, g1 = fast.value_and_grad(big)
        e2, g2 = direct.value_and_grad(big)
        # the F64 bound (above), relative: these energies are large, not near 0
        torch.testing.assert_close(e1, e2, rtol=F64_RTOL, atol=0)
        # gradients: F64_RTOL of their largest entry (signed sums cancel)
        torch.testing.assert_close(g1, g2, rtol=F64_RTOL, atol=F64_RTOL * float(g2.abs().max()))


def test_a_common_shift_of_the_ablated_logits_cannot_underflow_float32():
    """Ablating a direction the readout sees in every row lowers all logits by ~95: e^Δ
    (Δ = ablated - clean logits) is subnormal in float32 (below e^-87), so the fast path must
    exponentiate Δ - Σ p Δ (which cannot underflow), and it must not carry the shared ~95 in
    float32 (ulp 8e-6: errors ~1e-5 nats, measured before the readout was centred). Bounds as
    for the float32 comparison above (measured here ≤ 6e-8 on energies, ≤ 9e-7 on gradients
    relative to their largest entry)."""
    h, mask, labels, _ = problem(dtype=torch.float32)
    big = torch.linalg.qr(torch.randn(64, 1, generator=torch.Generator().manual_seed(3)))[0]
    h = h - (h @ big) * big[:, 0] + 10 * big[:, 0]  # h·big = 10 everywhere
    readout = nn.Linear(64, 512, bias=False)
    with torch.no_grad():  # every logit row reads 9.5 h·big more
        weight = torch.randn(512, 64, generator=torch.Generator().manual_seed(4)) / 16
        readout.weight.copy_(weight + 9.5 * big[:, 0])
    target = LogitLens(nn.Identity(), readout)
    exact = LogitLens(nn.Identity(), copy.deepcopy(readout).double())
    with torch.no_grad():
        delta = target(h - (h @ big) * big[:, 0]) - target(h)
    assert float(delta.max()) < -87  # e^Δ is subnormal or zero in float32 everywhere
    for objective in ("kl", "ce"):
        kw = dict(mask=mask, labels=labels)
        fast = AblationObjective(target, h, CausalOptions(mode="zero", objective=objective), **kw)
        assert fast.factored is not None
        oracle = AblationObjective(
            exact, h.double(), CausalOptions(mode="zero", objective=objective, fast=False), **kw
        )
        e0, g0 = oracle.value_and_grad(big.double())
        e, g = fast.value_and_grad(big)
        assert abs(e0) > 1e-2  # a real energy (CE increase may be negative)
        assert abs(float(e) - float(e0)) <= F32_FAST_ATOL, objective
        atol = F32_GRAD_RTOL * float(g0.abs().max())
        # float32 vs the float64 oracle: F32_GRAD_RTOL of the largest entry (docstring)
        torch.testing.assert_close(g.double(), g0, rtol=0, atol=atol)


# ----------------------------------------------------------------------------- search
def test_subsample_is_spread_runs_of_rows_and_counted_exactly():
    h = random_hiddens((40, 9, 6))
    mask = torch.ones(40, 9, dtype=torch.bool)
    mask[10, 4:] = False  # row 10 starts a run: its padding is not counted
    obj = AblationObjective(
        SoftmaxTarget(6), h, CausalOptions(batch_size=3, screen_positions=72), mask=mask
    )
    rows = [r for s in obj.screen[0] for r in range(s.start, s.stop)]
    assert rows == [0, 5, 10, 15, 20, 25, 30, 35]  # 8 rows of 9 positions, every 40/8 rows
    assert obj.screen[1] == 8 * 9 - 5 and obj.subsample_fraction == (72 - 5) / (360 - 5)
    assert all(s.start // 3 == (s.stop - 1) // 3 for s in obj.screen[0])  # never straddle
    everything = AblationObjective(SoftmaxTarget(6), h, CausalOptions(screen_positions=200))
    assert everything.subsample_fraction == 1.0  # more than half the data: no subsample


def test_search_stops_on_the_tangent_gradient_and_counts_its_passes(monkeypatch):
    """Each returned direction meets ‖(I - BBᵀ - vvᵀ)∇σ‖ ≤ tol·σ (by an independent float64
    gradient), and ``n_evals`` adds up every pass: full ones as 1, subsample ones as their
    fraction, the k final joint energies excluded."""
    calls = {"full": 0, "sub": 0}
    original_vg, original_energy = AblationObjective.value_and_grad, AblationObjective.energy

    def counting(fn):
        def wrapper(self, vectors, subsample=False):
            calls["sub" if subsample and self.subsample_fraction < 1 else "full"] += 1
            return fn(self, vectors, subsample=subsample)

        return wrapper

    monkeypatch.setattr(AblationObjective, "value_and_grad", counting(original_vg))
    monkeypatch.setattr(AblationObjective, "energy", counting(original_energy))
    target = SoftmaxTarget(8, seed=4).double()
    h = random_hiddens((48, 6, 8), seed=5).double()
    basis = extract_causal_basis(target, h, 3, CausalOptions(n_pca=0, screen_positions=48))
    fraction = basis.settings["screen_positions"] / basis.n_positions
    assert fraction < 1
    counted = calls["full"] - 3 + fraction * calls["sub"]
    # float64 sums of a few hundred counts and fractions in another order: ≲ 1e-13 relative
    assert math.isclose(sum(basis.n_evals), counted, rel_tol=1e-12)
    monkeypatch.undo()
    check = AblationObjective(target, h)
    for j in range(3):
        earlier, v = basis.vectors[:, :j], basis.vectors[:, j]
        energy, grad = check.value_and_grad(v)
        grad = grad - earlier @ (earlier.T @ grad)
        grad = grad - (grad @ v) * v
        assert float(grad.norm()) <= basis.settings["tol"] * float(energy) * (1 + 1e-9)


# ----------------------------------------------------------------------------- refine
def test_joint_refinement_beats_a_brute_force_search_over_planes():
    """d = 3, k = 2: every plane is the complement of a normal n on the sphere, and mean
    ablation of a plane maps h to μ + ((h - μ)·n) n. A 3k-point Fibonacci grid of normals
    (spacing ~0.06 rad, energy within ~1e-3 of the best plane) is the oracle."""
    from test_causal import _fibonacci_sphere

    target = SoftmaxTarget(3, seed=3).double()
    h = random_hiddens((300, 3), seed=4).double()
    basis = extract_causal_basis(target, h, 2, CausalOptions(refine="joint", n_pca=0))
    clean = target(h).log_softmax(-1)
    mu = h.mean(0)
    best = 0.0
    for normals in _fibonacci_sphere(3000).split(500):
        ablated = mu + ((h - mu) @ normals.T)[..., None] * normals  # (N, m, 3)
        logq = target(ablated).log_softmax(-1)
        kl = (clean.exp()[:, None] * (clean[:, None] - logq)).sum(-1).mean(0)
        best = max(best, float(kl.max()))
    assert float(basis.subspace_energies[-1]) >= best - 1e-3
    assert float(basis.subspace_energies[-1]) >= float(basis.greedy_subspace_energies[-1])


def test_joint_refinement_is_stationary_ordered_and_reproducible(tmp_path):
    target = SoftmaxTarget(8, seed=9).double()
    h = random_hiddens((4, 50, 8), seed=10).double()
    mask = torch.ones(4, 50, dtype=torch.bool)
    mask[2, 40:] = False
    k = 4
    basis = extract_causal_basis(target, h, k, CausalOptions(refine="joint", n_pca=0), mask=mask)
    greedy = extract_causal_basis(target, h, k, CausalOptions(n_pca=0), mask=mask)
    # same path: the refinement starts from the greedy search, run with the same arguments
    torch.testing.assert_close(basis.greedy_subspace_energies, greedy.subspace_energies)
    assert basis.settings["refine"] == "joint" and greedy.greedy_subspace_energies is None
    q = basis.vectors.double()
    # float64 orthonormal columns, 8-term dot products: ≲ 8·1.1e-16 ≈ 1e-15
    torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=q.dtype), rtol=0, atol=1e-12)
    obj = AblationObjective(target, h, mask=mask)
    energy, grad = obj.value_and_grad(q)  # normal to the span: what the refinement zeroes
    assert float(basis.subspace_energies[-1]) >= float(greedy.subspace_energies[-1])
    assert float((grad - q @ (q.T @ grad)).norm()) <= basis.settings["tol"] * float(energy)
    # energies reproduce (float64, recomputed by a fresh objective: ≲ 200-term sums, perhaps
    # in other chunks, ≲ 1e-13 relative); each prefix adds the best remaining column
    for i in range(k):
        assert math.isclose(obj.energy(q[:, : i + 1]), float(basis.subspace_energies[i]),
                            rel_tol=1e-12)  # fmt: skip
        assert math.isclose(obj.energy(q[:, i]), float(basis.energies[i]), rel_tol=1e-12)  # ditto
        others = [obj.energy(torch.cat([q[:, :i], q[:, j : j + 1]], 1)) for j in range(i, k)]
        assert float(basis.subspace_energies[i]) >= max(others) - 1e-12
    loaded = CausalBasis.load(basis.save(tmp_path / "refined"))
    # same path: the saved tensor itself (safetensors keeps the bits)
    torch.testing.assert_close(loaded.greedy_subspace_energies, basis.greedy_subspace_energies)
    with pytest.raises(ValueError, match="refine must be"):
        extract_causal_basis(target, h, 2, CausalOptions(refine="both"))


def test_orthonormal_factor_keeps_an_orthonormal_start():
    w = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64))[0]
    w = w * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)  # signs QR alone would flip
    # float64 re-orthonormalisation of orthonormal columns: a few ulps (1.1e-16) of 1
    torch.testing.assert_close(orthonormal_factor(w), w, rtol=0, atol=1e-14)


def test_site_activations_stop_after_the_last_site(hf_model, token_batch):
    """The layers after the last site and the unembedding are not run; the values are those
    of a full forward pass."""
    from tyche.causal.activations import read_site_activations
    from tyche.hooks import read_activations
    from tyche.sites import unembedding

    calls = []
    handle = unembedding(hf_model).register_forward_hook(lambda *_: calls.append(1))
    try:
        got = read_site_activations(hf_model, token_batch, ["resid_pre.0", "resid_pre.1"], 3)
        assert not calls
        with torch.no_grad(), read_activations(hf_model, ["resid_pre.0", "resid_pre.1"]) as acts:
            hf_model(**token_batch)
        assert len(calls) == 1
    finally:
        handle.remove()
    # the same layers on the same batch; 1e-6 allows float32 kernels of another blocking
    # (|h| ≲ 5: a few 2^-24·5 ≈ 3e-7); a wrong site or a stopped layer is O(1) off
    for site, value in got.items():
        torch.testing.assert_close(value, acts[site].float(), rtol=1e-6, atol=1e-6)
