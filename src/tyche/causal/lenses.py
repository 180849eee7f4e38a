"""Targets for causal basis extraction: maps from hidden states at one site to logits.

Any callable ``h (..., d) -> logits (..., V)`` is a target. Three are provided:

* :class:`LogitLens`: the model's final norm and unembedding applied to ``h`` directly.
* :class:`TunedLens`: a learned affine translator per site before the logit lens,
  ``f_s(h) = LogitLens(h + A_s h + b_s)``, trained by :func:`train_tuned_lens` to match the
  model's final logits by KL (``A_s, b_s`` start at zero, so an untrained lens is the logit
  lens). ``lens.for_site(name)`` is the target for one site.
* :class:`ModelFromSite`: the rest of the model, run from a hooked site on a fixed batch of
  inputs, so ablating a direction "inside the real model" is the same call as for a lens.

Every ``model`` taken here may be an HF model, a TransformerLens ``HookedTransformer`` (its
``ln_final`` and ``unembed`` make the logit lens; its hook names are sites) or an nnsight
wrapper (``tyche.frameworks.as_module``).

Targets may expose ``readout_matrix() -> (V, d)`` (the linear part of the map, ignoring the
norm's centring and scaling), used to seed the search for causal directions.

A tuned lens keeps its translators in the model's dtype promoted to at least float32
(:func:`lens_dtype`): float32 for a bfloat16 or float16 model, whose 8- or 11-bit mantissas
would round most of Adam's small updates away, the model's own dtype otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tyche.causal.lens_algebra import LensFactors, norm_factors
from tyche.errors import InputError
from tyche.frameworks import as_module, framework_of
from tyche.io import ResultIO, model_hash
from tyche.sites import Site, final_norm, resolve_sites, unembedding

__all__ = [
    "LensAtSite",
    "LogitLens",
    "ModelFromSite",
    "TunedLens",
    "TunedLensWeights",
    "lens_dtype",
    "logit_soft_cap",
    "refuse_per_head_sites",
]


def lens_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a tuned lens's translators for a model in ``model_dtype``: float32 for
    half-precision models (bfloat16, float16), the model's own dtype otherwise."""
    return torch.promote_types(model_dtype, torch.float32)


def _frozen(module: nn.Module) -> _Detached:
    """A view that keeps ``module`` out of the owner's parameters and state dict."""
    holder = _Detached()
    object.__setattr__(holder, "inner", module)
    return holder


class _Detached(nn.Module):
    inner: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def _linear_readout(unembed: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """An affine unembedding as ``(W (V, d), b (V,) or None)``: an ``nn.Linear``'s weight and
    bias, or TransformerLens's ``Unembed`` (``W_U`` (d, V), transposed, and ``b_U`` (V,));
    None for anything else."""
    if isinstance(unembed, nn.Linear):
        return unembed.weight, unembed.bias
    w_u, b_u = getattr(unembed, "W_U", None), getattr(unembed, "b_U", None)
    if isinstance(w_u, Tensor) and w_u.ndim == 2:
        return w_u.T, b_u if isinstance(b_u, Tensor) and tuple(b_u.shape) == w_u.shape[1:] else None
    return None


def _readout_weight(unembed: nn.Module) -> Tensor | None:
    """The unembedding's (V, d) matrix (``_linear_readout``, else a 2-D ``weight``), or None."""
    linear = _linear_readout(unembed)
    weight = linear[0] if linear is not None else getattr(unembed, "weight", None)
    return weight if isinstance(weight, Tensor) and weight.ndim == 2 else None


def _lens_norm(model: nn.Module) -> nn.Module:
    """The norm the logit lens applies: ``tyche.sites.final_norm`` (TransformerLens's
    ``ln_final`` among them), or ``nn.Identity`` for a TransformerLens model built without
    one (``normalization_type=None``)."""
    if framework_of(model) == "transformer_lens" and getattr(model, "ln_final", None) is None:
        return nn.Identity()
    return final_norm(model)


def logit_soft_cap(model: nn.Module) -> float | None:
    """``c`` where the model's logits are ``c · tanh(z / c)`` (Gemma 2): TransformerLens's
    ``cfg.output_logits_soft_cap`` or HF's ``config.final_logit_softcapping``; None if off."""
    for holder, key in (("cfg", "output_logits_soft_cap"), ("config", "final_logit_softcapping")):
        cap = getattr(getattr(model, holder, None), key, None)
        if isinstance(cap, int | float) and not isinstance(cap, bool) and cap > 0:
            return float(cap)
    return None


class LogitLens(nn.Module):
    """``h -> unembed(norm(h))``: read hidden states with the model's own output head.

    Build it with :meth:`from_model`; ``norm`` may be ``nn.Identity()``. The modules are the
    model's own (not copies): the lens moves and changes with the model. ``soft_cap`` ``c``
    (the model's, e.g. Gemma 2) makes the logits ``c · tanh(z / c)``, as the model's are.
    """

    def __init__(self, norm: nn.Module, unembed: nn.Module, soft_cap: float | None = None) -> None:
        super().__init__()
        self.norm = _frozen(norm)
        self.unembed = _frozen(unembed)
        self.soft_cap = soft_cap

    @classmethod
    def from_model(cls, model: nn.Module) -> LogitLens:
        """The logit lens of a causal LM: an HF model (GPT-2, GPT-NeoX, Llama and alike), a
        TransformerLens ``HookedTransformer`` (``ln_final`` and ``unembed``) or an nnsight
        wrapper of either (``tyche.frameworks.as_module``)."""
        model = as_module(model)
        return cls(_lens_norm(model), unembedding(model), logit_soft_cap(model))

    def forward(self, h: Tensor) -> Tensor:
        """Logits (..., V) for hidden states (..., d) (cast to the unembedding's dtype)."""
        weight = _readout_weight(self.unembed.inner)
        if isinstance(weight, Tensor) and weight.is_floating_point() and h.dtype != weight.dtype:
            h = h.to(weight.dtype)
        logits = self.unembed(self.norm(h))
        if self.soft_cap is None:
            return logits
        return self.soft_cap * torch.tanh(logits / self.soft_cap)

    def lens_factors(self) -> LensFactors | None:
        """The lens as norm + linear readout (``tyche.causal.lens_algebra``), or None when the
        norm or the unembedding is not one it recognises, or the logits are soft-capped (then
        only the general path works)."""
        linear = _linear_readout(self.unembed.inner)
        if linear is None or self.soft_cap is not None:
            return None
        weight, bias = linear
        norm = norm_factors(self.norm.inner, weight.shape[1])
        if norm is None:
            return None
        return LensFactors(readout=weight, readout_bias=bias, **norm)

    def readout_matrix(self) -> Tensor:
        """(V, d): the unembedding times the norm's per-channel gain (centring ignored)."""
        weight = _readout_weight(self.unembed.inner)
        if weight is None:
            raise TypeError("the unembedding has no (V, d) weight matrix")
        norm = self.norm.inner
        gain = getattr(norm, "weight", getattr(norm, "w", None))
        if isinstance(gain, Tensor) and gain.shape == weight.shape[1:]:
            return weight.detach() * gain.detach()
        return weight.detach()


class LensAtSite(nn.Module):
    """One site's tuned lens as a target: ``h -> LogitLens(h + A h + b)``."""

    def __init__(self, lens: TunedLens, index: int) -> None:
        super().__init__()
        self.lens, self.index = _frozen(lens), index

    @property
    def site(self) -> str:
        return self.lens.inner.sites[self.index]

    def forward(self, h: Tensor) -> Tensor:
        return self.lens.inner(h, self.index)

    def lens_factors(self) -> LensFactors | None:
        """The logit lens's factors after the translator ``h -> (I + A) h + b``."""
        lens: TunedLens = self.lens.inner
        factors = lens.logit_lens.lens_factors()
        if factors is None:
            return None
        translator = lens.translators[self.index]
        weight = translator.weight.detach()
        eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return factors.with_translator(eye + weight, translator.bias)

    def readout_matrix(self) -> Tensor:
        """(V, d): ``W (I + A)`` with ``W`` the logit lens's readout (the bias is not linear)."""
        lens: TunedLens = self.lens.inner
        translator = lens.translators[self.index].weight.detach()
        eye = torch.eye(translator.shape[0], dtype=translator.dtype, device=translator.device)
        return lens.logit_lens.readout_matrix().to(translator.dtype) @ (eye + translator)


@dataclass(frozen=True)
class TunedLensWeights(ResultIO):
    """What a saved tuned lens holds: one affine translator per site.

    Attributes:
        weight: (L, d, d) translator matrices ``A_s`` (the lens adds ``A_s h + b_s`` to h).
        bias: (L, d) translator biases ``b_s``.
        sites: the L site names, in order.
        model_hash: hash of the model the lens was trained on (``tyche.io.model_hash``).
        kl_logit_lens: per site, mean KL(model ‖ logit lens) in nats on the training data.
        kl_tuned_lens: per site, mean KL(model ‖ tuned lens) in nats after training.
        settings: training settings.
    """

    UNITS: ClassVar[dict[str, str]] = {"kl_logit_lens": "nats", "kl_tuned_lens": "nats"}

    weight: Tensor
    bias: Tensor
    sites: list[str]
    model_hash: str | None = None
    kl_logit_lens: list[float] = field(default_factory=list)
    kl_tuned_lens: list[float] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


class TunedLens(nn.Module):
    """A logit lens with a learned affine translator ``h -> h + A_s h + b_s`` per site.

    The translators are in :attr:`dtype` (the model's, at least float32); hidden states are
    cast to it, and ``h + A_s h + b_s`` to the unembedding's dtype for the logit lens.

    Args:
        model: the causal LM whose final norm and unembedding are used (HF, TransformerLens or
            nnsight, see ``tyche.frameworks.as_module``).
        sites: site names or patterns (e.g. ``"resid_pre.*"``) the lens reads; not per-head
            sites (``attn_heads.i``, ``hook_z``), whose (..., H, d_head) tensors a lens
            cannot read.
    """

    def __init__(self, model: nn.Module, sites: str | Sequence[str]) -> None:
        super().__init__()
        model = as_module(model)
        resolved = resolve_sites(model, sites)
        refuse_per_head_sites(resolved, "a tuned lens")
        self.sites: list[str] = [s.name for s in resolved]
        self.logit_lens = LogitLens.from_model(model)  # holds no parameters of its own
        object.__setattr__(self, "_model", model)
        ref = self.logit_lens.readout_matrix()
        d = ref.shape[1]
        self.translators = nn.ModuleList(nn.Linear(d, d) for _ in self.sites)
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        self.translators.to(device=ref.device, dtype=lens_dtype(ref.dtype))
        self.stats: dict[str, Any] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The translators' dtype: the model's, promoted to at least float32."""
        return self.translators[0].weight.dtype

    def index(self, site: str | int) -> int:
        """Position of ``site`` (a name or an index) among the lens's sites."""
        if isinstance(site, int):
            if not 0 <= site < len(self.sites):
                raise IndexError(f"site index {site} out of range for {len(self.sites)} sites")
            return site
        if site not in self.sites:
            raise KeyError(f"the tuned lens has no site {site!r}; it has {self.sites}")
        return self.sites.index(site)

    def forward(self, h: Tensor, site: str | int) -> Tensor:
        """Logits (..., V) of the lens for hidden states ``h`` (..., d) at ``site``."""
        translator = self.translators[self.index(site)]
        h = h.to(translator.weight.dtype)
        return self.logit_lens(h + translator(h))

    def for_site(self, site: str | int) -> LensAtSite:
        """The target ``h -> logits`` for one site."""
        return LensAtSite(self, self.index(site))

    def weights(self) -> TunedLensWeights:
        """The translators as a saveable result."""
        return TunedLensWeights(
            weight=torch.stack([t.weight.detach().cpu() for t in self.translators]),
            bias=torch.stack([t.bias.detach().cpu() for t in self.translators]),
            sites=list(self.sites),
            model_hash=model_hash(self._model),
            kl_logit_lens=list(self.stats.get("kl_logit_lens", [])),
            kl_tuned_lens=list(self.stats.get("kl_tuned_lens", [])),
            settings=dict(self.stats.get("settings", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write the translators to the folder ``path`` (safetensors + JSON)."""
        return self.weights().save(path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, strict: bool = True) -> TunedLens:
        """Load a lens saved by :meth:`save` onto ``model``.

        With ``strict`` (default) the model must be the one the lens was trained on (same
        ``model_hash``); otherwise a ``ValueError`` says so.
        """
        saved = TunedLensWeights.load(path)
        if strict and saved.model_hash is not None and saved.model_hash != model_hash(model):
            raise InputError(
                f"the tuned lens at {path} was trained on a model with hash {saved.model_hash}, "
                f"not this one ({model_hash(model)}); pass strict=False to use it anyway"
            )
        model = as_module(model)
        lens = cls(model, saved.sites)
        if tuple(saved.weight.shape[1:]) != tuple(lens.translators[0].weight.shape):
            raise InputError(
                f"the saved translators are {tuple(saved.weight.shape[1:])}, "
                f"but the model width needs {tuple(lens.translators[0].weight.shape)}"
            )
        with torch.no_grad():
            for t, w, b in zip(lens.translators, saved.weight, saved.bias):
                t.weight.copy_(w)
                t.bias.copy_(b)
        lens.stats = {
            "kl_logit_lens": saved.kl_logit_lens,
            "kl_tuned_lens": saved.kl_tuned_lens,
            "settings": saved.settings,
        }
        return lens


def refuse_per_head_sites(sites: Sequence[Site], what: str) -> None:
    """Raise ``InputError`` if any of ``sites`` is per head (``Site.n_heads``: ``attn_heads.i``,
    TransformerLens's ``blocks.i.attn.hook_z``): ``what`` (a lens) reads the residual stream,
    not (..., H, d_head) head outputs."""
    heads = [s.name for s in sites if s.n_heads is not None]
    if heads:
        raise InputError(
            f"{what} reads the residual stream, but {', '.join(heads)} is per head "
            "((B, T, H, d_head)); use the model target (target='model', ModelFromSite) for "
            "per-head sites, or a residual site such as resid_pre.0"
        )


class ModelFromSite(nn.Module):
    """The rest of ``model`` from ``site``, on a fixed batch: ``h -> model(inputs).logits``.

    The whole model runs on ``inputs`` with the activation at ``site`` replaced by ``h``
    (``(B, T, d)``, the shape the site has on these inputs), so the logits depend on ``h``
    exactly as they do inside the real model. Earlier layers run too (and are wasted work);
    gradients reach ``h`` through every later layer. Hidden states for it come from
    ``tyche.hooks.read_activations(model, site)`` on the same inputs. A per-head site
    (``attn_heads.i``, TransformerLens's ``blocks.i.attn.hook_z``: (B, T, H, d_head)) also
    takes ``h`` with its heads concatenated, (B, T, H·d_head), head after head.

    ``model`` is an HF model or any module, a TransformerLens ``HookedTransformer`` or an
    nnsight wrapper (``tyche.frameworks.as_module``).
    """

    def __init__(self, model: nn.Module, site: str | Site, inputs: Mapping[str, Tensor]) -> None:
        super().__init__()
        model = as_module(model)
        sites = resolve_sites(model, site)
        if len(sites) != 1:
            raise InputError(
                f"ModelFromSite needs exactly one site, {site!r} matches {[s.name for s in sites]}"
            )
        self.site = sites[0]
        self.model = _frozen(model)
        if "input_ids" not in inputs and "inputs_embeds" not in inputs:
            raise InputError("inputs must hold 'input_ids' (and usually 'attention_mask')")
        self.inputs = dict(inputs)

    def select(self, rows: slice) -> ModelFromSite:
        """The same target on rows ``rows`` of the batch."""
        return ModelFromSite(
            self.model.inner, self.site, {k: v[rows] for k, v in self.inputs.items()}
        )

    def forward(self, h: Tensor) -> Tensor:
        from tyche.hooks import replace_activations

        def swap(activation: Tensor) -> Tensor:
            if activation.shape == h.shape:
                return h
            if activation.ndim > 3 and activation.flatten(2).shape == h.shape:
                return h.reshape(activation.shape)  # heads concatenated
            raise InputError(
                f"ModelFromSite({self.site.name}): hidden states have shape "
                f"{tuple(h.shape)} but the site has {tuple(activation.shape)} on these "
                "inputs; read the hidden states from the same inputs"
            )

        with replace_activations(self.model.inner, {self.site: swap}):
            out = self.model.inner(**self.inputs)
        return getattr(out, "logits", out)
