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

Centring works in the same coordinates: :func:`centering_matrix` ``Y`` maps ``[f, 1]`` to
``[f - mu, 1]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from tyche.errors import InputError

__all__ = ["BiasScaler", "append_constant", "biased_modules", "centering_matrix", "scale_like"]


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


def scale_like(c: Tensor, y: Tensor, what: str) -> Tensor:
    """The constant ``c`` (``lead`` shape, e.g. ``(B,)`` or ``(B, T)``) broadcastable to ``y``.

    Per position when ``y`` is ``(*lead, d)``; else the mean over positions, broadcast over
    every dimension of ``y`` but the batch. Raises ``ValueError`` if ``y``'s batch differs.
    """
    lead = tuple(c.shape)
    if tuple(y.shape[:-1]) == lead:
        return c.to(y.dtype).unsqueeze(-1)
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
        self.modules = biased_modules(model)
        self.c: Tensor | None = None
        self._handles: list[Any] = []

    def activate(self, c: Tensor) -> None:
        """Scale biases by ``c`` in the modules that run from now on."""
        self.c = c

    def deactivate(self) -> None:
        self.c = None

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            c = self.c
            if c is None:
                return None
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"module {name!r} has a bias but returns {type(output).__name__}; the "
                    "constant coordinate can only scale biases added to a tensor output"
                )
            bias = module._parameters["bias"]
            if output.shape[-1] != bias.shape[-1] or bias.ndim != 1:
                raise InputError(
                    f"module {name!r}: bias of shape {tuple(bias.shape)} is not added to the "
                    f"last dimension of its output {tuple(output.shape)}; it cannot be folded"
                )
            scale = scale_like(c, output, f"module {name!r}")
            # an outer product as a matmul: its backward is one matrix-vector product
            return output + (scale - 1) @ bias.to(output.dtype).unsqueeze(0)

        return hook

    def __enter__(self) -> BiasScaler:
        for name, module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook(name)))
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
