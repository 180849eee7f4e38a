"""KL divergence to an anchor model, with padding masks and cached anchor log-probabilities.

:func:`masked_kl` computes ``KL(anchor || other)`` in nats at every position,

    KL_t = sum_v p_a(v) * (log p_a(v) - log q(v)),   p_a = softmax(anchor), q = softmax(logits),

with the convention ``0 * log 0 = 0`` (vocabulary entries the anchor gives probability 0
contribute nothing, even where ``q`` is 0 too), and reduces it over the unmasked positions.
:class:`AnchorCache` runs the anchor model once over a list of batches and keeps its
log-probabilities, so each later KL evaluation costs one forward pass instead of two.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from tyche.errors import InputError

__all__ = ["AnchorCache", "forward_logits", "masked_kl", "token_jsd", "token_kl"]

Reduction = Literal["mean", "example", "token"]
Batch = Mapping[str, torch.Tensor] | torch.Tensor


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 if any input is float64."""
    dtype = torch.float32
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"expected floating-point logits/log-probs, got {t.dtype}")
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def token_kl(anchor_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(anchor || other)`` in nats at each position, shape ``anchor_logp.shape[:-1]``.

    Both inputs have shape ``(..., V)``. ``anchor_logp`` may be log-probabilities or raw logits
    (it is re-normalised with ``log_softmax``, a no-op for log-probabilities that also removes
    rounding from a float16 cache); ``logits`` are raw logits of the other model. Maths runs in
    float32 (float64 if either input is float64). Entries with ``p_a = 0`` contribute exactly 0;
    ``q = 0`` where ``p_a > 0`` gives ``+inf``. NaN inputs propagate to NaN outputs.
    """
    if anchor_logp.shape != logits.shape:
        raise InputError(
            f"anchor_logp has shape {tuple(anchor_logp.shape)} but logits have shape "
            f"{tuple(logits.shape)}; they must match (..., vocab)"
        )
    dtype = _compute_dtype(anchor_logp, logits)
    log_p = torch.log_softmax(anchor_logp.to(dtype), dim=-1)
    log_q = torch.log_softmax(logits.to(dtype), dim=-1)
    p = log_p.exp()
    # p * (log p - log q), with 0 where p == 0 (avoids 0 * -inf = NaN); inf - inf cannot occur
    # where p > 0 because log p is finite there.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=dtype, device=p.device))
    return terms.sum(dim=-1)


def token_jsd(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in nats at each position, shape ``logits_p.shape[:-1]``.

    ``JSD(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = (p + q) / 2``, from raw logits (or
    log-probabilities) ``(..., V)``; symmetric, in ``[0, ln 2]``, 0 only where p = q. Maths in
    float32 (float64 if either input is float64); ``0 · log 0 = 0``.
    """
    if logits_p.shape != logits_q.shape:
        raise InputError(
            f"logits have shapes {tuple(logits_p.shape)} and {tuple(logits_q.shape)}; they "
            "must match (..., vocab)"
        )
    dtype = _compute_dtype(logits_p, logits_q)
    log_p = torch.log_softmax(logits_p.to(dtype), dim=-1)
    log_q = torch.log_softmax(logits_q.to(dtype), dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, dtype=dtype))
    zero = torch.zeros((), dtype=dtype, device=log_p.device)
    p, q = log_p.exp(), log_q.exp()
    kl_p = torch.where(p > 0, p * (log_p - log_m), zero).sum(-1)
    kl_q = torch.where(q > 0, q * (log_q - log_m), zero).sum(-1)
    return 0.5 * (kl_p + kl_q)


def _as_weights(mask: torch.Tensor | None, shape: torch.Size, ref: torch.Tensor) -> torch.Tensor:
    """The mask as 0/1 weights of ``shape`` on ``ref``'s device and dtype."""
    if mask is None:
        return torch.ones(shape, dtype=ref.dtype, device=ref.device)
    if mask.shape != shape:
        raise InputError(
            f"mask has shape {tuple(mask.shape)} but the KL has positions {tuple(shape)} "
            "(the logits' shape without the vocabulary dimension)"
        )
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise InputError("mask must be boolean or contain only 0 and 1")
    return mask.to(device=ref.device, dtype=ref.dtype)


def masked_kl(
    anchor_logp: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``KL(anchor || other)`` in nats, reduced over the positions where ``mask`` is true.

    Shapes: ``anchor_logp`` and ``logits`` ``(..., T, V)`` for sequence models or ``(N, V)``
    for classifiers; ``mask`` (bool or 0/1) has the shape without ``V``, ``None`` = all.

    - ``"mean"``: scalar, sum of the KL over unmasked positions / their count.
    - ``"example"``: shape ``(...)`` (e.g. ``(N,)``), the masked mean over ``T`` of each
      example; every example needs an unmasked position. For 2-D inputs ``(N, V)`` each row
      is one example of one position, so this equals ``"token"``.
    - ``"token"``: shape ``(..., T)``, per-position KL with masked positions set to 0.

    Raises ``ValueError`` on mismatched shapes and when the mask selects nothing.
    """
    kl = token_kl(anchor_logp, logits)
    weights = _as_weights(mask, kl.shape, kl)
    if reduction == "token":
        return torch.where(weights > 0, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    if reduction == "mean":
        count = weights.sum()
        if count == 0:
            raise InputError("mask selects no positions; the mean KL over nothing is undefined")
        return _masked_sum(kl, weights) / count
    if reduction == "example":
        if kl.dim() <= 1:
            return masked_kl(anchor_logp, logits, mask, reduction="token")
        counts = weights.sum(dim=-1)
        if (counts == 0).any():
            empty = torch.nonzero(counts == 0).tolist()
            raise InputError(
                f"examples {empty[:10]} have no unmasked positions; their mean KL is undefined"
            )
        return _masked_sum(kl, weights, dim=-1) / counts
    raise InputError(f"reduction must be 'mean', 'example' or 'token', got {reduction!r}")


def _masked_sum(kl: torch.Tensor, weights: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``kl`` over positions with weight 1; masked positions never leak NaN/inf."""
    kept = torch.where(weights > 0, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def forward_logits(model: nn.Module | Callable[..., Any], batch: Batch) -> torch.Tensor:
    """Run ``model`` on ``batch`` and return its logits.

    ``batch`` is a dict of tensors (passed as keyword arguments, e.g. ``input_ids`` and
    ``attention_mask``) or a tensor (passed positionally, e.g. classifier inputs ``(N, D)``).
    The output may be a tensor or an object/dict with ``logits`` (HuggingFace style).
    """
    return logits_of(model(**batch) if isinstance(batch, Mapping) else model(batch))


def logits_of(out: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``out.logits`` or ``out["logits"]``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", None)
    if logits is None:
        raise TypeError(f"model returned a {type(out).__name__} without 'logits'")
    return logits


def _model_device(model: nn.Module | Callable[..., Any]) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return torch.device("cpu")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device)


def _batch_mask(batch: Batch) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        return batch.get("attention_mask")
    return None


class AnchorCache:
    """The anchor model's log-probabilities over a fixed list of batches, computed once.

    ``logp(i)`` has shape ``(B_i, T_i, V)`` (or ``(B_i, V)`` for classifiers). Build with
    :meth:`from_model`. ``mean_kl(model)`` then gives the token-weighted mean KL of another
    model (same architecture, e.g. with perturbed weights) to the anchor over all batches.
    """

    def __init__(
        self,
        logps: Sequence[torch.Tensor],
        batches: Sequence[Batch],
        kl_masks: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        if len(logps) != len(batches):
            raise InputError(f"{len(logps)} log-prob tensors for {len(batches)} batches")
        if kl_masks is not None and len(kl_masks) != len(batches):
            raise InputError(f"{len(kl_masks)} KL masks for {len(batches)} batches")
        self._logps = list(logps)
        self.batches = list(batches)
        self._kl_masks = None if kl_masks is None else list(kl_masks)

    def with_kl_masks(self, masks: Sequence[torch.Tensor | None]) -> AnchorCache:
        """The same cache with the KL counted only where ``masks[i]`` (the shape of batch i's
        positions, bool or 0/1) is true; the model still sees its inputs and attention mask
        unchanged. ``None`` for a batch falls back to its attention mask."""
        return AnchorCache(self._logps, self.batches, masks)

    @classmethod
    @torch.no_grad()
    def from_model(
        cls,
        model: nn.Module | Callable[..., Any],
        batches: Sequence[Batch],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> AnchorCache:
        """Run ``model`` once over ``batches`` and store ``log_softmax`` of its logits.

        ``device``: where to keep the cache, ``"cpu"`` (default), ``"same"`` (the model's
        device) or any ``torch.device``. ``dtype``: storage dtype (e.g. ``torch.float16`` to
        halve memory); by default float32 (float64 for a float64 model). The log-softmax is
        always taken in at least float32 before storage. Batches are moved to the model's
        device for the forward pass; the model should be in eval mode (a warning is given
        otherwise, since dropout would make the anchor random).
        """
        if len(batches) == 0:
            raise InputError("AnchorCache needs at least one batch")
        if isinstance(model, nn.Module) and model.training:
            warnings.warn(
                "the anchor model is in training mode (dropout is active); call model.eval()",
                stacklevel=2,
            )
        model_device = _model_device(model)
        store = model_device if device == "same" else torch.device(device)
        logps = []
        for batch in batches:
            logits = forward_logits(model, _to_device(batch, model_device))
            logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
            logps.append(logp.to(device=store, dtype=dtype or logp.dtype))
        return cls(logps, batches)

    def __len__(self) -> int:
        return len(self._logps)

    def logp(self, index: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Cached anchor log-probabilities of batch ``index`` (optionally moved to ``device``)."""
        logp = self._logps[index]
        return logp if device is None else logp.to(device, non_blocking=True)

    def mask(self, index: int) -> torch.Tensor | None:
        """The ``attention_mask`` of batch ``index`` (``None`` for tensor batches)."""
        return _batch_mask(self.batches[index])

    def kl_mask(self, index: int) -> torch.Tensor | None:
        """Where the KL of batch ``index`` counts: its KL mask if set, else its attention mask."""
        if self._kl_masks is not None and self._kl_masks[index] is not None:
            return self._kl_masks[index]
        return self.mask(index)

    @property
    def nbytes(self) -> int:
        """Bytes used by the cached log-probabilities."""
        return sum(t.numel() * t.element_size() for t in self._logps)

    @property
    def n_positions(self) -> int:
        """Number of counted positions over all batches (the denominator of ``mean_kl``)."""
        total = 0
        for i, logp in enumerate(self._logps):
            m = self.kl_mask(i)
            total += int(m.sum()) if m is not None else logp[..., 0].numel()
        return total

    def describe(self) -> str:
        """A one-line summary, e.g. ``"anchor cache: 12.3 MiB on cpu, float32, 8 batches"``."""
        devices = sorted({str(t.device) for t in self._logps})
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in self._logps})
        return (
            f"anchor cache: {self.nbytes / 2**20:.1f} MiB on {', '.join(devices)}, "
            f"{', '.join(dtypes)}, {len(self)} batches"
        )

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    def mean_kl(self, model: nn.Module | Callable[..., Any], *, grad: bool = False) -> torch.Tensor:
        """Mean ``KL(anchor || model)`` in nats over every unmasked position of every batch.

        One forward pass per batch; a scalar tensor on the model's device. Each batch weighs by
        its number of unmasked positions (a mean over tokens, not over batches). Runs under
        ``torch.no_grad()`` unless ``grad=True``.
        """
        device = _model_device(model)
        total: torch.Tensor | float = 0.0
        with torch.set_grad_enabled(grad):
            for i, batch in enumerate(self.batches):
                logits = forward_logits(model, _to_device(batch, device))
                mask = self.kl_mask(i)
                mask = None if mask is None else mask.to(device)
                total = total + masked_kl(self.logp(i, device), logits, mask, "token").sum()
        return total / self.n_positions
