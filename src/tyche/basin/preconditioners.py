"""Unit-determinant preconditioners for importance-sampling basin directions.

A preconditioner P maps a uniform direction u to v = P u; the estimator weights a sample by
|det P|·|Pu|^{-D}, and every P here has det P = 1 (mean log-eigenvalue 0). A diagonal P is a
positive vector p (v = p ⊙ u); a matrix P is a symmetric positive-definite (D, D) tensor
applied in parameter space (v = P u). Spectra s (Adam's ν, a Fisher diagonal) map to
p_i ∝ 1/(|s_i|^exponent + eps): low-curvature coordinates are stretched (≈ F^{-1/2} at ½).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from tyche.divergence import logits_of
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.optim_state import read_optimizer_state


class ZeroSpectrum(InputError):
    """``n_zero`` spectrum entries are zero with ``eps=0``: p = 1/(|s|^exponent + eps) would
    divide by zero."""

    def __init__(self, message: str, n_zero: int):
        super().__init__(message)
        self.n_zero = n_zero


def _spectrum_to_scales(spec: torch.Tensor, eps: float, exponent: float) -> torch.Tensor:
    """p_i = 1/(|s_i|^exponent + eps) in float64, with a clear error on division by zero."""
    if not (math.isfinite(eps) and eps >= 0 and math.isfinite(exponent) and exponent >= 0):
        raise InputError(f"eps and exponent must be finite and >= 0, got {eps!r}, {exponent!r}")
    denom = spec.abs().to(torch.float64).pow(exponent) + eps
    if not (denom > 0).all():
        n_zero = int((denom <= 0).sum())
        raise ZeroSpectrum(
            f"{n_zero} spectrum entries are zero and eps=0, so 1/(|s|^exponent + eps) divides "
            "by zero; use eps > 0",
            n_zero,
        )
    return 1.0 / denom


def normalize_unit_det(p: torch.Tensor) -> torch.Tensor:
    """p / exp(mean log p) for a positive vector p (D,): the diagonal P = diag(p) gets det 1.

    The mean is taken in float64; the result has p's dtype.
    """
    p = torch.as_tensor(p)
    if p.dim() != 1 or p.numel() == 0:
        raise InputError(f"expected a non-empty 1-D tensor, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise InputError("the preconditioner contains NaN or inf entries")
    if not (p > 0).all():
        raise InputError(
            f"the preconditioner has {int((p <= 0).sum())} non-positive entries; "
            "all entries must be > 0"
        )
    logp = p.to(torch.float64).log()
    out = torch.exp(logp - logp.mean())
    return out.to(p.dtype) if p.is_floating_point() else out


def diag_preconditioner(
    spec: torch.Tensor, *, eps: float = 1e-3, exponent: float = 0.5
) -> torch.Tensor:
    """Diagonal preconditioner p (D,) from a spectrum s (D,): p_i ∝ 1/(|s_i|^exponent + eps).

    s is e.g. Adam's ``exp_avg_sq`` or a Fisher diagonal (units: squared gradient); eps is in
    units of |s|^exponent. p is normalised to unit determinant (mean log p = 0, in float64)
    and returned in s's floating dtype (float32 for integer input), on s's device.
    """
    spec = torch.as_tensor(spec)
    if spec.dim() != 1 or spec.numel() == 0:
        raise InputError(f"spec must be a non-empty 1-D tensor, got shape {tuple(spec.shape)}")
    if not torch.isfinite(spec).all():
        raise InputError(f"spec has {int((~torch.isfinite(spec)).sum())} NaN/inf entries")
    dtype = spec.dtype if spec.is_floating_point() else torch.float32
    return normalize_unit_det(_spectrum_to_scales(spec, eps, exponent)).to(dtype)


def _symmetric_eigh(m: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition (float64) of a square, finite, symmetric matrix m."""
    m = torch.as_tensor(m)
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.numel() == 0:
        raise InputError(f"{what} must be a square (D, D) matrix, got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise InputError(f"{what} contains NaN or inf entries")
    m64 = m.to(torch.float64)
    scale = float(m64.abs().max())
    tol = 100 * torch.finfo(m.dtype if m.is_floating_point() else torch.float32).eps * scale
    asym = float((m64 - m64.T).abs().max())
    if asym > tol:
        raise InputError(f"{what} is not symmetric (max |M - Mᵀ| = {asym:.3g}); pass (M + Mᵀ)/2")
    return torch.linalg.eigh((m64 + m64.T) / 2)


def normalize_unit_det_matrix(m: torch.Tensor) -> torch.Tensor:
    """M / det(M)^{1/D} for a symmetric positive-definite M (D, D): unit determinant.

    Computed in float64 from the eigenvalues; returned in M's dtype.
    """
    lam, _ = _symmetric_eigh(m, "the preconditioner matrix")
    if not (lam > 0).all():
        raise InputError(
            f"the preconditioner matrix is not positive definite (smallest eigenvalue "
            f"{float(lam.min()):.3g}); pass a symmetric positive-definite matrix"
        )
    m = torch.as_tensor(m)
    out = (m + m.T).to(torch.float64) / 2 * torch.exp(-lam.log().mean())
    return out.to(m.dtype) if m.is_floating_point() else out


def matrix_preconditioner(
    h: torch.Tensor, *, eps: float = 1e-3, exponent: float = 0.5
) -> torch.Tensor:
    """P = V diag(p) Vᵀ (D, D) for H = V Λ Vᵀ, p_k ∝ 1/(|λ_k|^exponent + eps), det P = 1.

    P acts in parameter space: P v_k = p_k v_k for every eigenvector v_k of H (the original
    code returned V diag(p), i.e. coordinates in the eigenbasis). Symmetric positive
    definite; computed in float64 and returned in H's dtype.
    """
    lam, vecs = _symmetric_eigh(h, "H")
    p = normalize_unit_det(_spectrum_to_scales(lam, eps, exponent))
    out = (vecs * p) @ vecs.T
    out = (out + out.T) / 2
    h = torch.as_tensor(h)
    return out.to(h.dtype) if h.is_floating_point() else out


def user_preconditioner(pre: Any, dim: int) -> torch.Tensor:
    """Validate a user's ``preconditioner=``: a positive (D,) vector or a (D, D) SPD matrix.

    Returns it normalised to unit determinant (same dtype). Raises ValueError/TypeError
    naming what is wrong (length mismatch, non-positive, NaN/inf, not symmetric/PD).
    """
    try:
        pre = torch.as_tensor(pre)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"preconditioner must be a tensor, got {type(pre).__name__}") from exc
    expected = {1: (dim,), 2: (dim, dim)}.get(pre.dim())
    if expected is None:
        raise InputError(
            f"the preconditioner must be a (D,) vector or a (D, D) matrix, got shape "
            f"{tuple(pre.shape)}"
        )
    if tuple(pre.shape) != expected:
        kind = "vector" if pre.dim() == 1 else "matrix"
        raise InputError(
            f"the preconditioner {kind} has shape {tuple(pre.shape)} but the basin "
            f"has D = {dim} parameters; expected {expected}"
        )
    return normalize_unit_det(pre) if pre.dim() == 1 else normalize_unit_det_matrix(pre)


def adam_preconditioner(
    optimizer_state: Any,
    names: Sequence[str],
    shapes: Sequence[Sequence[int]],
    *,
    order: int = 2,
    eps: float = 1e-3,
    exponent: float = 0.5,
    optimizer_param_names: Sequence[str] | None = None,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Diagonal preconditioner (D,) from Adam moments of the selected parameters.

    Args:
        optimizer_state: anything :func:`tyche.optim_state.read_optimizer_state` reads: a
            name -> {"exp_avg", "exp_avg_sq"} mapping (the zoo's format), a ``torch.optim``
            state dict, or a path to one (a HF Trainer ``optimizer.pt``) or to our
            safetensors file. Index-keyed states are mapped to names through their own
            "param_names", else ``optimizer_param_names`` (ALL the optimizer's parameters in
            the order given to it), else ``model``'s parameters, else ``names``.
        names, shapes: the selected parameters, in the order of the flat basin vector.
        order: 2 uses ``exp_avg_sq`` (ν), 1 uses ``exp_avg`` (its absolute value).
        eps, exponent: as in `diag_preconditioner`.

    Returns:
        p (D,), D = Σ numel(shape), unit determinant, float32 (float64 if ν is float64).
    """
    if order not in (1, 2):
        raise InputError(f"order must be 1 (exp_avg) or 2 (exp_avg_sq), got {order!r}")
    if len(names) != len(shapes):
        raise InputError(f"got {len(names)} names but {len(shapes)} shapes")
    by_name = read_optimizer_state(
        optimizer_state,
        None if model is None else as_module(model),
        param_names=optimizer_param_names,
        shapes=None if model is not None else dict(zip(names, shapes)),
    )
    key = "exp_avg_sq" if order == 2 else "exp_avg"
    has = [n for n, v in by_name.items() if isinstance(v, Mapping) and key in v]
    missing = [n for n in names if n not in set(has)]
    if missing:
        known = ", ".join(has[:5]) or "nothing"
        raise InputError(
            f"{len(missing)} selected parameters have no {key!r} in the optimizer state, e.g. "
            f"{', '.join(missing[:5])}; the state has entries for: {known}"
        )
    moments = [torch.as_tensor(by_name[n][key]).detach() for n in names]
    for name, shape, moment in zip(names, shapes, moments):
        if tuple(moment.shape) != tuple(shape):
            raise InputError(
                f"{key} of {name!r} has shape {tuple(moment.shape)} but the "
                f"parameter has shape {tuple(shape)}"
            )
    dtype = torch.promote_types(moments[0].dtype, torch.float32)
    spec = torch.cat([m.reshape(-1).to("cpu", dtype) for m in moments])
    return diag_preconditioner(spec, eps=eps, exponent=exponent)


def _rows(x: Any, idx: slice | int | torch.Tensor) -> Any:
    """x[idx] for a tensor or for every tensor of a dict."""
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def fisher_diagonal(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    names: Sequence[str],
    n_draws: int = 1,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """Diagonal of the Fisher information of the model's output distribution, (D,).

    F_i = mean over positions of E_{y~p_θ(·|x)} [(∂ log p_θ(y|x)/∂θ_i)²], the Hessian of the
    mean KL(p_θ ‖ p_{θ+δ}) at δ = 0 (nats per squared parameter unit). Positions are the N
    examples of a classifier (``inputs`` a tensor (N, ...) or kwargs dict; logits (N, C)) or
    the unmasked tokens of a causal LM (dict with input_ids (N, T) and optional
    attention_mask (N, T); logits (N, T, V)). ``names`` are the selected parameters, in order.

    Sampled (default): ``n_draws`` labels per position from p_θ (drawn on ``generator``'s
    device; default a generator on the parameters' device seeded with 0, so the result
    repeats exactly; under torchrun every rank with the same inputs gets the same F),
    per-example gradients of Σ_t log p(y_t) with torch.func (vmap over examples ×
    draws, or a loop where the forward is not vmappable, e.g. HF attention masks). Squaring
    a per-sequence sum is unbiased for the per-token sum: the scores of independently drawn
    tokens have zero mean, so cross terms vanish in expectation (they add variance only).
    ``exact=True`` sums over all labels weighted by p_θ: exact, memory ∝ C·D (T·V·D) per
    example, so for small outputs only. Memory of a sampled chunk ∝ batch_size·D.

    ``model`` may be a TransformerLens or nnsight model (``tyche.frameworks.as_module``).

    Returns F (D,) on the parameters' device, float32 (or the parameters' wider dtype).
    """
    model = as_module(model)
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if not names or unknown:
        raise InputError(
            f"names must be parameter names of the model; unknown: {unknown[:5]}; "
            f"the model has e.g. {list(params)[:5]}"
        )
    for label, v in (("n_draws", n_draws), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{label} must be an integer >= 1, got {v!r}")
    noisy = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    if any(m.training and isinstance(m, noisy) for m in model.modules()):
        raise InputError("the model has dropout/batch-norm in training mode; call model.eval()")
    sel = {n: params[n].detach() for n in names}
    device = sel[names[0]].device
    if generator is None and not exact:
        generator = torch.Generator(device).manual_seed(0)
    as_kwargs = isinstance(inputs, Mapping)
    if as_kwargs:
        inputs = {k: torch.as_tensor(v).to(device) for k, v in inputs.items()}
    else:
        inputs = torch.as_tensor(inputs).to(device)
    n_examples = len(next(iter(inputs.values()))) if as_kwargs else len(inputs)
    if n_examples == 0:
        raise InputError("inputs hold no examples")

    def log_probs(p: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        out = functional_call(model, p, (), x) if as_kwargs else functional_call(model, p, (x,))
        return logits_of(out).log_softmax(-1)

    def single(x: Any):  # log-probs of one unbatched example as a function of the parameters
        x = _rows(x, None)
        return lambda q: log_probs(q, x)[0]

    def exact_term(x, w):  # Σ_{t,c} w_{t,c} (∂ log p_{t,c}/∂θ)², with w = p·mask
        jac = jacrev(single(x))(sel)
        return {k: torch.tensordot(w, j.square(), dims=w.dim()) for k, j in jac.items()}

    def sampled_term(x, y, w):  # (∂/∂θ Σ_t w_t log p(y_t))²
        lp = single(x)
        g = grad(lambda q: (lp(q).gather(-1, y[..., None])[..., 0] * w).sum())(sel)
        return {k: v.square() for k, v in g.items()}

    vmappable = True

    def summed(fn, *args):  # Σ over dim 0 of fn applied to each row of args
        nonlocal vmappable
        if vmappable:
            try:
                return {k: v.sum(0) for k, v in vmap(fn)(*args).items()}
            except RuntimeError as exc:
                if "vmap" not in str(exc):
                    raise
                vmappable = False
        outs = [fn(*(_rows(a, b) for a in args)) for b in range(len(args[1]))]
        return {k: sum(o[k] for o in outs) for k in sel}

    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in sel.items()}

    def add(part: dict[str, torch.Tensor]) -> None:
        for k in total:
            total[k] += part[k].double()

    n_positions = 0.0
    step = batch_size if exact else max(1, batch_size // n_draws)
    group = min(n_draws, batch_size)  # draws per vmapped call
    with torch.no_grad():
        for start in range(0, n_examples, step):
            x = _rows(inputs, slice(start, start + step))
            logp = log_probs(sel, x)
            mask = x.get("attention_mask") if as_kwargs and logp.dim() == 3 else None
            w = torch.ones(logp.shape[:-1], device=device) if mask is None else mask.to(logp.dtype)
            n_positions += float(w.sum())
            if exact:
                add(summed(exact_term, x, logp.exp() * w[..., None]))
                continue
            probs = logp.exp().reshape(-1, logp.shape[-1])
            probs = probs.to(generator.device)
            for done in range(0, n_draws, group):
                m = min(group, n_draws - done)  # draws in this call, tiled draw-major
                y = torch.multinomial(probs, m, replacement=True, generator=generator)
                y = y.T.reshape(m * len(logp), *logp.shape[1:-1]).to(device)
                tile = torch.arange(len(logp), device=device).repeat(m)
                add(summed(sampled_term, _rows(x, tile), y, w[tile]))
    if n_positions == 0:
        raise InputError("the attention mask leaves no positions to average over")
    flat = torch.cat([total[n].reshape(-1) for n in names])
    flat /= n_positions * (1 if exact else n_draws)
    return flat.to(torch.promote_types(sel[names[0]].dtype, torch.float32))


#: the kinds `build_preconditioner` makes ("none": no preconditioner)
PRECONDITIONER_KINDS = ("none", "adam", "fisher")


def build_preconditioner(
    kind: str,
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    names: Sequence[str],
    optimizer_state: Any = None,
    order: int = 2,
    eps: float = 1e-3,
    exponent: float = 0.5,
    seed: int = 0,
) -> torch.Tensor | None:
    """The diagonal preconditioner p (D,) of one kind, for the parameters ``names`` of ``model``.

    ``kind`` is "none" (returns None), "adam" (`adam_preconditioner` on ``optimizer_state``,
    the moments of ``order``; shapes from the model) or "fisher" (`diag_preconditioner` of
    `fisher_diagonal` on ``inputs``, its labels drawn on a generator on the model's device
    seeded with ``seed``, so every rank and every resumed run get the same p). Both map a
    spectrum s to p ∝ 1/(|s|^exponent + eps), unit determinant, in the order of ``names``
    (the flat basin vector's). Deterministic: the same arguments give the same bits.

    Defaults: eps = 1e-3 and exponent = 0.5 are those of `diag_preconditioner` and of the
    ``tyche basin`` flags --eps and --exponent; order = 2 uses Adam's ``exp_avg_sq``. The
    seed-compatible `VolumeConfig` passes its own fields instead, whose defaults are the
    original basin-volume's: ``preconditioner_eps=1e-5``, ``preconditioner_exponent=0.5``,
    ``adam_order=2``, and ``seed=42`` for the Fisher labels.

    Raises:
        InputError: an unknown kind, "adam" without optimizer_state, or what the builders
            raise (`ZeroSpectrum` where eps = 0 meets a zero spectrum entry).
    """
    if kind not in PRECONDITIONER_KINDS:
        raise InputError(
            f"unknown preconditioner kind {kind!r}: use one of {', '.join(PRECONDITIONER_KINDS)}"
        )
    if kind == "none":
        return None
    model = as_module(model)
    if kind == "adam":
        if optimizer_state is None:
            raise InputError(
                "the adam preconditioner needs optimizer_state (a state dict, a name -> "
                "moments mapping, or a path to optimizer.pt)"
            )
        params = dict(model.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise InputError(
                f"names must be parameter names of the model; unknown: {unknown[:5]}; "
                f"the model has e.g. {list(params)[:5]}"
            )
        shapes = [params[n].shape for n in names]
        return adam_preconditioner(optimizer_state, list(names), shapes, order=order, eps=eps,
                                   exponent=exponent, model=model)  # fmt: skip
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    fisher = fisher_diagonal(model, inputs, names=list(names), generator=generator)
    return diag_preconditioner(fisher, eps=eps, exponent=exponent)
