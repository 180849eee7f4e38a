"""`model_loss`: the batched behavioural loss of a model around its trained parameters.

L(δ) = KL(p_θ ‖ p_{θ+δ}), the masked mean over tokens (language models) or examples
(classifiers), in nats, where δ moves only the selected parameters. The anchor's log-probs
are computed once and cached; perturbed evaluations are batched over directions.

Strategies for a batch of B offsets:
- ``"vmap"``: ``torch.func.functional_call`` under ``torch.vmap``: all B models in one
  batched forward pass (fastest for small models; memory grows with B).
- ``"loop"``: ``functional_call`` once per offset, the module untouched.
- ``"inplace"``: writes θ+δ into the parameters, runs the model, then copies θ back, so
  the weights are restored bit for bit (one extra copy of θ, no per-offset copies: for
  large models).
``"auto"`` takes inplace above ``INPLACE_ABOVE`` selected parameters; below, it tries vmap
on the first call and falls back to loop if the model refuses it.

``where`` restricts the KL to part of the data, a behaviour of the model: a boolean mask over
the examples (N,) or, for language models, over the tokens (N, T) (a digit class, the lines
of one play). The model still reads every input as before (a token's context is unchanged);
only which positions the mean runs over changes. Rows with nothing selected are not run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from tyche.basin.params import ParameterLayout, select_parameters
from tyche.divergence import AnchorCache
from tyche.errors import InputError
from tyche.frameworks import as_module

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
Strategy = Literal["auto", "vmap", "loop", "inplace"]

#: above this many selected parameters, strategy="auto" evaluates in place (no copies of θ)
INPLACE_ABOVE = 10_000_000


def _interrupt_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that ``err`` was raised while handling, if any.

    A Ctrl-C that lands while ``torch.vmap`` enters its nesting level comes out as a
    RuntimeError (functorch's "dynamicLayerStack.empty()" assertion) whose context is the
    interrupt; it must stop the run, not pass for a model that vmap cannot batch.
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _batches(inputs: Inputs, mask: torch.Tensor | None, batch_size: int | None):
    """Split the evaluation data into (model kwargs or tensor, mask) chunks of batch_size rows."""
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise InputError(f"inputs must hold 'input_ids'; got keys {sorted(inputs)}")
        n = inputs["input_ids"].shape[0]
        if mask is None:
            mask = inputs.get("attention_mask")
    elif isinstance(inputs, torch.Tensor):
        n = inputs.shape[0]
    else:
        raise TypeError("inputs must be a tensor (classifier) or a dict with input_ids (LM)")
    if n == 0:
        raise InputError("inputs are empty: model_loss needs at least one example")
    size = batch_size or n
    for s in range(0, n, size):
        part = (
            {k: v[s : s + size] for k, v in inputs.items()}
            if isinstance(inputs, Mapping)
            else inputs[s : s + size]
        )
        yield part, None if mask is None else mask[s : s + size]


class ModelLoss:
    """Callable δ (B, D) → KL(anchor ‖ perturbed) (B,) in nats, for the selected parameters.

    ``model`` is any module returning logits, a TransformerLens ``HookedTransformer`` or an
    nnsight wrapper (``tyche.frameworks.as_module``; parameter names are then the
    TransformerLens model's own, e.g. ``blocks.0.attn.W_Q``).

    Attributes:
        anchor: θ, the selected parameters flattened, shape (D,), detached copy.
        layout: names, shapes and offsets of the selected parameters in θ.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        *,
        include: str | Sequence[str] = "*",
        exclude: str | Sequence[str] | None = None,
        mask: torch.Tensor | None = None,
        where: torch.Tensor | None = None,
        data_batch_size: int | None = None,
        strategy: Strategy = "auto",
        cache_device: torch.device | str | None = None,
    ):
        if strategy not in ("auto", "vmap", "loop", "inplace"):
            raise InputError(f"strategy must be auto, vmap, loop or inplace; got {strategy!r}")
        model = as_module(model)
        self.model = model
        self.strategy = strategy
        named = select_parameters(model, include, exclude)
        self.layout = ParameterLayout.of(named)
        self.params = dict(named)
        self.anchor = self.layout.flatten([p for _, p in named]).clone()
        device = next(iter(self.params.values())).device
        model.eval()
        self.where = None if where is None else _check_where(where, inputs)
        token_where = None
        if self.where is not None:
            keep = self.where.reshape(self.where.shape[0], -1).any(1).nonzero()[:, 0]
            inputs = _rows(inputs, keep)
            mask = None if mask is None else mask[keep]
            token_where = self.where[keep] if self.where.dim() == 2 else None
        parts = list(_batches(inputs, mask, data_batch_size))
        batches = [_with_mask(_to(x, device), m) for x, m in parts]
        store = device if cache_device is None else torch.device(cache_device)
        self.cache = AnchorCache.from_model(model, batches, device=store)
        if token_where is not None:
            sizes = [len(x["input_ids"]) for x in batches]
            self.cache = self.cache.with_kl_masks(
                [
                    w.to(device) & _attention(b).bool()
                    for w, b in zip(token_where.split(sizes), batches)
                ]  # fmt: skip
            )
        if self.cache.n_positions == 0:
            raise InputError("where selects only padding: no position is left to average over")
        self.cache_bytes = self.cache.nbytes
        self.n_params = self.layout.size
        if strategy == "auto" and self.n_params > INPLACE_ABOVE:
            self.strategy = "inplace"

    @property
    def n_positions(self) -> int:
        """Examples or tokens the mean KL runs over."""
        return self.cache.n_positions

    @property
    def bytes_per_offset(self) -> int:
        """Memory one offset row costs inside a call: θ+δ for vmap/loop, nothing in place."""
        if self.strategy == "inplace":
            return 0
        return self.n_params * self.anchor.element_size()

    def _kl(self, params: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """Mean KL(anchor ‖ model) over all evaluation positions for one setting (scalar)."""
        return self.cache.mean_kl(self.model if params is None else _Perturbed(self.model, params))

    def _perturbed(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.params[n].detach() + d.to(self.params[n].dtype) for n, d in delta.items()}

    @torch.no_grad()
    def __call__(self, offsets: torch.Tensor) -> torch.Tensor:
        """KL(anchor ‖ θ+δ_b) for each row δ_b of ``offsets`` (B, D); returns (B,) float32."""
        if offsets.dim() != 2 or offsets.shape[1] != self.n_params:
            raise InputError(
                f"offsets must have shape (B, {self.n_params}); got {tuple(offsets.shape)}"
            )
        if self.strategy in ("auto", "vmap"):
            try:
                split = self.layout.split(offsets)
                with warnings.catch_warnings():  # sdpa has no batching rule: a slower fallback
                    warnings.filterwarnings("ignore", message=".*batching rule.*")
                    return torch.vmap(lambda d: self._kl(self._perturbed(d)))(split)
            except Exception as err:
                interrupt = _interrupt_behind(err)
                if interrupt is not None:  # Ctrl-C inside vmap, not a model that refuses it
                    raise interrupt from None
                if self.strategy == "vmap":
                    raise
                self.strategy = "loop"
        if self.strategy == "loop":
            return torch.stack([self._kl(self._perturbed(self.layout.split(o))) for o in offsets])
        return torch.stack([self._inplace(o) for o in offsets])

    def _inplace(self, offset: torch.Tensor) -> torch.Tensor:
        """Write θ+δ into the parameters, evaluate, and restore θ exactly."""
        anchor = self.layout.split(self.anchor)
        delta = self.layout.split(offset)
        try:
            for n, p in self.params.items():
                p.copy_(anchor[n] + delta[n].to(p.dtype))
            return self._kl(None)
        finally:
            for n, p in self.params.items():
                p.copy_(anchor[n])


class _Perturbed(nn.Module):
    """``model`` run with ``params`` substituted (``functional_call``); the module is untouched."""

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor]):
        super().__init__()
        self.inner = model
        self.substitute = dict(params)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.inner, self.substitute, args, kwargs, strict=False)


def _with_mask(x: Inputs, mask: torch.Tensor | None) -> Inputs:
    """Attach an explicit evaluation mask to LM inputs as their attention_mask."""
    if mask is None or not isinstance(x, Mapping):
        if mask is not None:
            raise InputError("mask is only supported for language-model inputs (a dict)")
        return x
    return {**x, "attention_mask": mask.to(x["input_ids"].device)}


def _n_examples(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise InputError(f"inputs must hold 'input_ids'; got keys {sorted(inputs)}")
        return int(inputs["input_ids"].shape[0])
    return int(inputs.shape[0])


def _check_where(where: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """``where`` as a bool tensor (N,) or (N, T), checked against the inputs."""
    where = torch.as_tensor(where)
    if where.dtype != torch.bool:
        binary = not (where.is_floating_point() or where.is_complex())
        if not (binary and ((where == 0) | (where == 1)).all()):
            raise InputError("where must be boolean (or 0/1 integers): True where the KL counts")
        where = where.bool()
    n = _n_examples(inputs)
    shapes = [(n,)]
    if isinstance(inputs, Mapping):
        shapes.append(tuple(inputs["input_ids"].shape))
    if tuple(where.shape) not in shapes:
        what = " or ".join(str(s) for s in shapes)
        raise InputError(
            f"where has shape {tuple(where.shape)}; it must be {what}: one entry per example"
            + (" or per token" if len(shapes) > 1 else "")
        )
    if not where.any():
        raise InputError("where selects nothing: no example or token is left to average over")
    return where.cpu()


def _rows(inputs: Inputs, keep: torch.Tensor) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v[keep.to(v.device)] for k, v in inputs.items()}
    return inputs[keep.to(inputs.device)]


def _attention(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"]) if mask is None else mask


def _to(x: Inputs, device: torch.device) -> Inputs:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, Mapping) else x.to(device)


def model_loss(model: nn.Module, inputs: Inputs, **kwargs: Any) -> ModelLoss:
    """Build the batched KL loss of ``model`` on ``inputs``; see :class:`ModelLoss`."""
    return ModelLoss(model, inputs, **kwargs)
