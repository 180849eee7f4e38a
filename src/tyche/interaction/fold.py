"""Bias folding: every activation vector carries a constant coordinate that owns the biases.

The local interaction basis treats a node layer's activation ``f`` (width ``d``) as the
vector ``[f, c]`` of width ``d + 1`` whose last coordinate ``c`` is 1 on the data. Every
bias of the section that follows is multiplied by that constant, so the section is a
function of ``[f, c]`` with no affine offsets of its own: along the integration path
``alpha * [f, 1]`` the biases are switched on together with the activations, and the
gradient with respect to ``c`` says how much the output depends on the biases.

The original rewrites the model's weights to do this. Here the weights are left alone:
:class:`BiasScaler` hooks every module with a ``bias`` parameter (``nn.Linear``, GPT-2's
``Conv1D``, ``LayerNorm``...) and adds ``(c - 1) * bias`` to its output, which is the same
function. A bias applied at position ``t`` of a sequence is scaled by ``c_t``, the constant of
that position (when the module's output has the node layer's positions); otherwise (a module
that changes the number of positions) by the mean of ``c`` over positions. Along the path
both are ``alpha``; they differ only in how the gradient with respect to ``c`` is split over
positions.

TransformerLens modules keep their biases under other names and add some of them inside the
module: :data:`TRANSFORMER_LENS_BIASES` says, per class, at which output each one is first
present (``b_Q`` at ``hook_q``, ``b_in`` at ``hook_pre``, ``b_O`` at the attention's own
output, ...), and the scaler adds ``(c - 1) * bias`` there. A bias-like parameter of a
TransformerLens module that the table does not place is refused (:func:`bias_points`), so no
bias is silently left unscaled.

Centring works in the same coordinates: :func:`centering_matrix` ``Y`` maps ``[f, 1]`` to
``[f - mu, 1]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tyche.errors import InputError

__all__ = [
    "TRANSFORMER_LENS_BIASES",
    "BiasPoint",
    "BiasScaler",
    "append_constant",
    "bias_points",
    "biased_modules",
    "centering_matrix",
    "scale_like",
]

#: TransformerLens class -> {bias parameter: the child (a hook point) whose output is the first
#: tensor that holds the bias; "" for the module's own output}. As TransformerLens 3.x computes
#: them: ``LayerNorm`` adds ``b`` after ``hook_normalized``, ``GatedMLP`` adds ``b_in`` after the
#: gate product (inside ``hook_post``), ``GroupedQueryAttention`` keeps ``_b_K``/``_b_V`` per
#: key-value head (the shape of ``hook_k``/``hook_v``).
TRANSFORMER_LENS_BIASES: dict[str, dict[str, str]] = {
    "LayerNorm": {"b": ""},
    "Attention": {"b_Q": "hook_q", "b_K": "hook_k", "b_V": "hook_v", "b_O": ""},
    "GroupedQueryAttention": {"b_Q": "hook_q", "_b_K": "hook_k", "_b_V": "hook_v", "b_O": ""},
    "MLP": {"b_in": "hook_pre", "b_out": ""},
    "GatedMLP": {"b_in": "hook_post", "b_out": ""},
    "Unembed": {"b_U": ""},
}
#: parameter names TransformerLens gives biases (``b``, ``b_O``, ``_b_K``, ...)
_TL_BIAS_NAME = re.compile(r"_?b(_\w+)?")


def append_constant(f: Tensor, value: float = 1.0) -> Tensor:
    """``(..., d) -> (..., d + 1)``: ``f`` with a trailing constant coordinate."""
    return torch.cat([f, f.new_full((*f.shape[:-1], 1), value)], dim=-1)


def centering_matrix(mean: Tensor, *, inverse: bool = False) -> Tensor:
    """``Y`` (``d + 1`` square) with ``[f, 1] @ Y = [f - mean, 1]``; ``Y^-1`` if ``inverse``.

    ``Y`` is the identity except its last row, which is ``[-mean, 1]`` (``[+mean, 1]`` for
    the inverse).
    """
    d = mean.shape[-1]
    y = torch.eye(d + 1, dtype=mean.dtype, device=mean.device)
    y[d, :d] = mean if inverse else -mean
    return y


def biased_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with a floating-point ``bias`` parameter of their own, by name."""
    found = []
    for name, module in model.named_modules():
        bias = module._parameters.get("bias")
        if isinstance(bias, Tensor) and bias.is_floating_point():
            found.append((name, module))
    return found


@dataclass(frozen=True)
class BiasPoint:
    """One bias and where it enters: ``owner._parameters[param]`` is first present in the
    output of ``module`` (the owner itself, or the hook point of a TransformerLens module)."""

    name: str
    """the parameter's full name, e.g. ``blocks.0.attn.b_Q``"""
    owner: nn.Module
    param: str
    module: nn.Module

    @property
    def bias(self) -> Tensor:
        return self.owner._parameters[self.param]


def _is_transformer_lens(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformer_lens.")


def _transformer_lens_points(name: str, module: nn.Module) -> list[BiasPoint]:
    """The bias points of one TransformerLens module (see :data:`TRANSFORMER_LENS_BIASES`)."""
    table = TRANSFORMER_LENS_BIASES.get(type(module).__name__, {})
    gated_ln = type(module).__name__ == "GatedMLP" and _layer_norm_activation(module)
    points = []
    for param, tensor in module._parameters.items():
        if tensor is None or not tensor.is_floating_point() or not _TL_BIAS_NAME.fullmatch(param):
            continue
        full = f"{name}.{param}" if name else param
        child = table.get(param)
        if param == "b_in" and gated_ln:
            child = None  # its layer-norm branch never adds b_in: refused, not guessed
        target = module if child == "" else getattr(module, child, None) if child else None
        if not isinstance(target, nn.Module):
            raise InputError(
                f"cannot fold the bias {full} of the TransformerLens {type(module).__name__} "
                "into the constant coordinate (tyche does not know where it is added); the "
                "interaction basis supports TransformerLens LayerNorm, Attention, "
                "GroupedQueryAttention, MLP, GatedMLP and Unembed biases"
            )
        points.append(BiasPoint(full, module, param, target))
    return points


def _layer_norm_activation(module: nn.Module) -> bool:
    check = getattr(getattr(module, "cfg", None), "is_layer_norm_activation", None)
    return bool(check()) if callable(check) else False


def bias_points(model: nn.Module) -> list[BiasPoint]:
    """Every floating-point bias of ``model`` and the module whose output first holds it:
    a ``bias`` parameter at its module's output (``nn.Linear``, ``Conv1D``, ``LayerNorm``...),
    the biases of TransformerLens modules where :data:`TRANSFORMER_LENS_BIASES` says.
    Raises ``InputError`` for a TransformerLens bias it cannot place."""
    points = []
    for name, module in model.named_modules():
        if _is_transformer_lens(module):
            points += _transformer_lens_points(name, module)
            continue
        bias = module._parameters.get("bias")
        if isinstance(bias, Tensor) and bias.is_floating_point():
            points.append(BiasPoint(f"{name}.bias" if name else "bias", module, "bias", module))
    return points


def scale_like(c: Tensor, y: Tensor, what: str) -> Tensor:
    """The constant ``c`` (``lead`` shape, e.g. ``(B,)`` or ``(B, T)``) broadcastable to ``y``.

    Per position when ``y`` is ``(*lead, ...)`` (e.g. ``(B, T, d)``, or ``(B, T, H, d_head)``
    for a per-head bias); else the mean over positions, broadcast over every dimension of
    ``y`` but the batch. Raises ``ValueError`` if ``y``'s batch differs.
    """
    lead = tuple(c.shape)
    if y.ndim > len(lead) and tuple(y.shape[: len(lead)]) == lead:
        return c.to(y.dtype).reshape(*lead, *([1] * (y.ndim - len(lead))))
    if y.ndim >= 1 and y.shape[0] == lead[0]:
        per_sample = c.reshape(lead[0], -1).mean(1) if c.ndim > 1 else c
        return per_sample.to(y.dtype).reshape(lead[0], *([1] * (y.ndim - 1)))
    raise InputError(
        f"{what}: output of shape {tuple(y.shape)} does not share the batch dimension of the "
        f"node layer (leading shape {lead}), so its bias cannot be folded into the constant"
    )


class BiasScaler:
    """Hooks that multiply the biases of every module by the constant ``c`` while active.

    Use as a context manager around the forward passes; :meth:`activate` sets ``c`` (shape:
    the node layer's leading dims, e.g. ``(B,)`` or ``(B, T)``) once the section starts and
    :meth:`deactivate` stops scaling. Register it *before* the site hooks so a module's own
    bias counts on the right side of a site placed at that module's output.
    """

    def __init__(self, model: nn.Module) -> None:
        self.points = bias_points(model)
        self.c: Tensor | None = None
        self._handles: list[Any] = []

    def activate(self, c: Tensor) -> None:
        """Scale biases by ``c`` in the modules that run from now on."""
        self.c = c

    def deactivate(self) -> None:
        self.c = None

    def _hook(self, point: BiasPoint) -> Any:
        name = point.name

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            c = self.c
            if c is None:
                return None
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"the output holding the bias {name!r} is a {type(output).__name__}; the "
                    "constant coordinate can only scale biases added to a tensor output"
                )
            bias = point.bias
            width = bias.ndim
            if width == 0 or tuple(output.shape[-width:]) != tuple(bias.shape):
                raise InputError(
                    f"bias {name!r} of shape {tuple(bias.shape)} is not added to the last "
                    f"dimensions of the output {tuple(output.shape)}; it cannot be folded"
                )
            scale = scale_like(c, output, f"bias {name!r}")
            scale = scale.reshape(*scale.shape[: scale.ndim - width], 1)
            # an outer product as a matmul: its backward is one matrix-vector product
            added = (scale - 1) @ bias.to(output.dtype).reshape(1, -1)
            return output + added.unflatten(-1, tuple(bias.shape))

        return hook

    def __enter__(self) -> BiasScaler:
        for point in self.points:
            self._handles.append(point.module.register_forward_hook(self._hook(point)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.c = None


@contextmanager
def scaled_biases(model: nn.Module) -> Iterator[BiasScaler]:
    """``with scaled_biases(model) as scaler: ...`` (the hooks never outlive the block)."""
    scaler = BiasScaler(model)
    with scaler:
        yield scaler
