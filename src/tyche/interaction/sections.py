"""The thin adapter to models: node layers, batches of inputs, and sections run as functions.

A *node layer* is a site of :mod:`tyche.sites` (an alias such as ``resid_pre.1``, a module
name, a module name with ``:input``) or ``"output"`` for the model's output (its logits).
Its activation is read as ``(B, P, d)``: ``B`` rows, ``P`` positions (1 for a 2-D activation)
and ``d`` features (trailing dimensions past the second are flattened, e.g. attention heads).

The *section* from node layer ``l`` to ``l + 1`` is run as a function of the folded
activation ``[f, c]`` at ``l``: the whole model runs on a batch, the activation at ``l`` is
replaced, every bias after it is scaled by ``c`` (:class:`~tyche.interaction.fold.BiasScaler`),
and the forward pass stops as soon as node layer ``l + 1`` is reached. Node layers must be
*cuts*: everything after ``l`` may depend on the inputs only through ``l`` (a residual stream
site is a cut, an MLP's input inside a residual block is not). :meth:`ModelRunner.check_cut`
tests this on real rows and says which site to use instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tyche.distributed import get_rank, get_world_size, shard_range
from tyche.errors import InputError
from tyche.hook_names import envoy_path
from tyche.hooks import replace_activations
from tyche.interaction.fold import BiasScaler, append_constant
from tyche.sites import Site, resolve_sites

__all__ = [
    "OUTPUT",
    "Batch",
    "ModelRunner",
    "NodeLayer",
    "make_batches",
    "prepared_model",
    "resolve_node_layers",
]

OUTPUT = "output"


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the wanted site is reached."""


@dataclass(frozen=True)
class NodeLayer:
    """A resolved node layer: its name and site (None for ``"output"``)."""

    name: str
    site: Site | None

    @property
    def is_output(self) -> bool:
        return self.site is None


def resolve_node_layers(model: nn.Module, patterns: Sequence[str]) -> list[NodeLayer]:
    """Resolve node-layer patterns (in the given order) to :class:`NodeLayer` objects.

    A pattern is a site pattern (:mod:`tyche.sites`: an alias, a module name, a
    TransformerLens hook name, an nnsight path), an nnsight ``Envoy`` (its module), or
    ``"output"``.

    A glob may expand to several sites (kept in the model's order); ``"output"`` may only
    come last. Raises ``ValueError`` for a pattern that matches nothing (naming close
    matches), duplicates, fewer than two node layers, or ``"output"`` before the end.
    """
    if isinstance(patterns, str):
        raise TypeError("node_layers must be a list of patterns, e.g. ['resid_pre.1', 'output']")
    layers: list[NodeLayer] = []
    for i, pattern in enumerate(patterns):
        path = envoy_path(pattern)  # an nnsight Envoy (model.transformer.h[0]): its module
        pattern = path if path is not None else pattern
        if not isinstance(pattern, str):
            raise TypeError(f"node layer {i} must be a str, got {type(pattern).__name__}")
        if pattern == OUTPUT:
            if i != len(patterns) - 1:
                raise InputError(
                    f"'output' is node layer {i} of {len(patterns)}: it can only be the last "
                    "one (nothing runs after the model's output)"
                )
            layers.append(NodeLayer(OUTPUT, None))
            continue
        layers.extend(NodeLayer(s.name, s) for s in resolve_sites(model, pattern))
    names = [layer.name for layer in layers]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"node layers {repeated} are listed more than once: {names}")
    if len(layers) < 2:
        raise InputError(f"need at least two node layers (a section runs between two), got {names}")
    return layers


# ----------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    """One batch of model inputs: a tensor or a dict of keyword arguments.

    ``n`` rows; ``offset`` is the global index of its first row (stochastic sources are drawn
    per global row, so any split of the data over batches or ranks gives the same ones).
    """

    data: Tensor | dict[str, Any]
    n: int
    offset: int

    def rows(self, index: Tensor) -> Batch:
        """The rows ``index`` (a LongTensor) of this batch."""
        if isinstance(self.data, Tensor):
            return Batch(self.data[index], len(index), self.offset)
        picked = {
            k: v[index] if isinstance(v, Tensor) and v.ndim and v.shape[0] == self.n else v
            for k, v in self.data.items()
        }
        return Batch(picked, len(index), self.offset)

    def slice(self, start: int, stop: int) -> Batch:
        """Rows ``start..stop`` of this batch, with their own global offset."""
        part = self.rows(torch.arange(start, stop))
        return Batch(part.data, part.n, self.offset + start)

    def mask(self) -> Tensor | None:
        """The ``attention_mask`` (B, T) if the batch has one, else None."""
        if isinstance(self.data, Mapping):
            mask = self.data.get("attention_mask")
            return mask if isinstance(mask, Tensor) else None
        return None


def _rows_of(item: Any, where: str) -> int:
    if isinstance(item, Tensor):
        if item.ndim == 0:
            raise InputError(f"{where}: a 0-d tensor has no rows; pass (B, ...) inputs")
        return item.shape[0]
    if isinstance(item, Mapping):
        sizes = {k: v.shape[0] for k, v in item.items() if isinstance(v, Tensor) and v.ndim}
        if not sizes:
            raise InputError(f"{where}: the dict holds no tensor; pass e.g. {{'input_ids': ...}}")
        if len(set(sizes.values())) != 1:
            raise InputError(f"{where}: the tensors have different numbers of rows: {sizes}")
        return next(iter(sizes.values()))
    raise TypeError(
        f"{where}: expected a tensor or a dict of tensors, got {type(item).__name__}; inputs "
        "is a tensor, a batch dict, or an iterable of them"
    )


def _slice(item: Any, start: int, stop: int, n: int) -> Any:
    if isinstance(item, Tensor):
        return item[start:stop]
    return {
        k: v[start:stop] if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v
        for k, v in item.items()
    }


def make_batches(inputs: Any, batch_size: int | None, *, shard: bool = True) -> list[Batch]:
    """Split ``inputs`` into batches, keeping this rank's share when ``shard`` is True.

    ``inputs`` is a tensor or a dict of tensors (split into batches of ``batch_size`` rows;
    ``None``: one batch; under ``torchrun`` each rank first takes its contiguous block of
    rows), or an iterable of them (each item one batch; each rank takes a block of batches).
    An iterator is read once into a list, since the build passes over the data several times.
    """
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be >= 1 or None, got {batch_size}")
    rank, world = (get_rank(), get_world_size()) if shard else (0, 1)
    if isinstance(inputs, Tensor | Mapping):
        n = _rows_of(inputs, "inputs")
        if n == 0:
            raise InputError("inputs has no rows")
        mine = shard_range(n, rank, world)
        size = batch_size or max(len(mine), 1)
        return [
            Batch(_slice(inputs, s, min(s + size, mine.stop), n), min(size, mine.stop - s), s)
            for s in range(mine.start, mine.stop, size)
        ]
    if isinstance(inputs, str | bytes) or not isinstance(inputs, Iterable):
        raise TypeError(
            f"inputs must be a tensor, a dict of tensors, or an iterable of them; got "
            f"{type(inputs).__name__}"
        )
    items = list(inputs)
    if not items:
        raise InputError("inputs is an empty iterable; give at least one batch")
    sizes = [_rows_of(item, f"inputs[{i}]") for i, item in enumerate(items)]
    offsets = [sum(sizes[:i]) for i in range(len(items))]
    mine = shard_range(len(items), rank, world)
    return [Batch(items[i], sizes[i], offsets[i]) for i in mine]


# ----------------------------------------------------------------------------- the model
@contextmanager
def prepared_model(model: nn.Module, dtype: torch.dtype | None) -> Iterator[nn.Module]:
    """The model in eval mode, in ``dtype`` (floating tensors), parameters frozen.

    Everything is put back on exit: the training flag, each parameter's ``requires_grad`` and
    the dtype (a cast to a wider type and back is exact, so the weights are restored bit for
    bit). A model with a config naming its dtype (TransformerLens' ``cfg.dtype``, to which its
    norms cast their outputs) has that field set to ``dtype`` too while it runs.
    """
    was_training = model.training
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    floats = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    original = floats.pop() if len(floats) == 1 else None
    if dtype is not None and len(floats) > 0:
        raise InputError(
            f"the model mixes floating dtypes {sorted(map(str, floats | {original}))}; cast it "
            "to one dtype first or pass dtype=None"
        )
    cfg = getattr(model, "cfg", None)
    cfg_dtype = getattr(cfg, "dtype", None)
    retype = dtype is not None and isinstance(cfg_dtype, torch.dtype) and cfg_dtype != dtype
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if dtype is not None and original is not None and original != dtype:
            model.to(dtype)
        if retype:
            cfg.dtype = dtype
        yield model
    finally:
        if dtype is not None and original is not None and original != dtype:
            model.to(original)
        if retype:
            cfg.dtype = cfg_dtype
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
        model.train(was_training)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the first parameter (or buffer) and the floating dtype of the model."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return device, floats[0] if floats else torch.get_default_dtype()


def model_output(output: Any) -> Tensor:
    """The logits of a model's output: a tensor, ``.logits``, a dict's or tuple's first tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        first = output.get("logits", next(iter(output.values()), None))
        if isinstance(first, Tensor):
            return first
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def as_rows(t: Tensor, what: str) -> Tensor:
    """An activation as ``(B, P, d)``: 2-D gets ``P = 1``; dims past the second are flattened."""
    if t.ndim < 2:
        raise InputError(f"{what}: activation of shape {tuple(t.shape)} has no feature dimension")
    if t.ndim == 2:
        return t.unsqueeze(1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _lead_shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape[:-1]) if t.ndim <= 3 else tuple(t.shape[:2])


class ModelRunner:
    """Runs a prepared model on batches: reads node layers and runs sections as functions.

    ``dtype`` is the floating dtype inputs and activations are cast to (default: the model's).
    """

    def __init__(
        self, model: nn.Module, node_layers: Sequence[NodeLayer], dtype: torch.dtype | None = None
    ) -> None:
        self.model = model
        self.node_layers = list(node_layers)
        self.device, own = model_device_dtype(model)
        self.dtype = dtype or own

    # -------------------------------------------------------------- calling the model
    def _to_device(self, batch: Batch) -> Any:
        def move(v: Any) -> Any:
            if not isinstance(v, Tensor):
                return v
            v = v.to(self.device)
            return v.to(self.dtype) if v.is_floating_point() else v

        if isinstance(batch.data, Tensor):
            return move(batch.data)
        return {k: move(v) for k, v in batch.data.items()}

    def call(self, batch: Batch) -> Any:
        """``model(**data)`` for a dict, ``model(data)`` for a tensor (moved and cast)."""
        data = self._to_device(batch)
        return self.model(**data) if isinstance(data, dict) else self.model(data)

    def _fit_error(self, err: Exception) -> InputError:
        return InputError(
            f"the model could not run on the inputs ({type(err).__name__}: {err}). Pass what "
            f"{type(self.model).__name__}.forward takes: a tensor, a dict of keyword arguments "
            "(e.g. {'input_ids': ..., 'attention_mask': ...}), or an iterable of them"
        )

    # -------------------------------------------------------------- reading node layers
    def read(self, batch: Batch) -> dict[str, Tensor]:
        """Every node layer's activation ``(B, P, d)`` on ``batch`` (detached).

        Checks that each node layer is reached exactly once, in the given order, and that
        the activations are finite; raises ``ValueError`` saying what to fix otherwise.
        """
        acts: dict[str, Tensor] = {}
        order: list[str] = []
        last = self.node_layers[-1]
        n_sites = sum(1 for n in self.node_layers if n.site is not None)

        def recorder(name: str) -> Any:
            def record(t: Tensor) -> Tensor:
                order.append(name)
                acts[name] = as_rows(t.detach(), name)
                if len(acts) == n_sites and not last.is_output:
                    raise _Stop  # every node layer seen: the rest of the model is not needed
                return t

            return record

        sites = {n.site: recorder(n.name) for n in self.node_layers if n.site}
        out = None
        with replace_activations(self.model, sites):
            try:
                out = self.call(batch)
            except _Stop:
                pass
            except (TypeError, RuntimeError, ValueError, IndexError, KeyError) as err:
                raise self._fit_error(err) from err
        if last.is_output:
            acts[last.name] = as_rows(model_output(out).detach(), last.name)
            order.append(last.name)
        self._check_order(order)
        for name, a in acts.items():
            if not torch.isfinite(a).all():
                bad = (~torch.isfinite(a)).nonzero()[0].tolist()
                raise InputError(
                    f"node layer {name!r} has non-finite activations (first at row "
                    f"{batch.offset + bad[0]}, index {bad[1:]}); check the model and inputs "
                    "(NaN or inf weights, overflow in float16/bfloat16 — try dtype=torch.float64, "
                    "--dtype float64 on the command line)"
                )
        return acts

    def _check_order(self, order: list[str]) -> None:
        names = [n.name for n in self.node_layers]
        missing = [n for n in names if n not in order]
        if missing:
            raise InputError(
                f"node layers {missing} were not reached in the forward pass (reached, in "
                f"order: {order}); pick sites the model computes on these inputs"
            )
        repeated = sorted({n for n in order if order.count(n) > 1})
        if repeated:
            raise InputError(
                f"node layers {repeated} are computed more than once per forward pass (a "
                "module called twice); pick a site that is computed once"
            )
        if order != names:
            raise InputError(
                f"node layers out of order: the forward pass reaches them as {order}, but they "
                f"were given as {names}; list them in the order the model computes them"
            )

    # -------------------------------------------------------------- sections
    def capture(self, batch: Batch, index: int) -> tuple[Tensor, torch.Size]:
        """The folded activation ``[f, 1]`` ``(B, P, d + 1)`` at node layer ``index`` and the
        site's own shape (the forward pass stops there)."""
        layer = self.node_layers[index]
        if layer.site is None:
            raise InputError("the model's output has no section after it")
        found: dict[str, Any] = {}

        def grab(t: Tensor) -> Tensor:
            found["t"] = t.detach()
            raise _Stop

        with torch.no_grad(), replace_activations(self.model, {layer.site: grab}), suppress(_Stop):
            self.call(batch)
        if "t" not in found:
            raise InputError(f"node layer {layer.name!r} was not reached in the forward pass")
        t = found["t"]
        return append_constant(as_rows(t, layer.name).to(self.dtype)), t.shape

    def section_fn(self, batch: Batch, index: int, shape: torch.Size) -> Any:
        """Section ``index`` on ``batch`` as a function ``(x_f, x_c) -> y``.

        ``x_f`` ``(B, P, d)`` replaces the activation at node layer ``index`` (whose own shape
        is ``shape``), ``x_c`` ``(B, P)`` scales every bias after it, and ``y = [g, c_out]`` is
        the folded activation at node layer ``index + 1`` ``(B, P', d' + 1)``. Pure in its
        arguments, so ``torch.func.vjp`` and ``vmap`` apply.
        """
        start, end = self.node_layers[index], self.node_layers[index + 1]
        lead = tuple(shape[:-1]) if len(shape) <= 3 else tuple(shape[:2])

        def run(x_f: Tensor, x_c: Tensor) -> Tensor:
            state: dict[str, Any] = {"in": False, "y": None}
            scaler = BiasScaler(self.model)

            def inject(t: Tensor) -> Tensor:
                if state["in"]:
                    raise InputError(
                        f"node layer {start.name!r} is computed more than once per forward pass"
                    )
                state["in"] = True
                scaler.activate(x_c.reshape(lead))
                return x_f.reshape(t.shape)

            def capture(t: Tensor) -> Tensor:
                if not state["in"]:
                    raise InputError(
                        f"node layers out of order: {end.name!r} is computed before {start.name!r}"
                    )
                state["y"] = t
                raise _Stop

            hooks: dict[Site, Any] = {start.site: inject}
            if end.site is not None:
                hooks[end.site] = capture
            # the math kernel of scaled_dot_product_attention is made of ops that vmap batches;
            # the fused CPU kernels' backward would run once per cotangent
            with scaler, replace_activations(self.model, hooks), sdpa_kernel(SDPBackend.MATH):
                try:
                    out = self.call(batch)
                    if end.site is None:
                        state["y"] = model_output(out)
                except _Stop:
                    pass
            if not state["in"] or state["y"] is None:
                raise InputError(f"node layer {end.name!r} was not reached after {start.name!r}")
            return _fold_output(state["y"], x_c.reshape(lead), lead, start.name, end.name)

        return run

    def section(
        self,
        batch: Batch,
        index: int,
        alpha: float = 1.0,
        *,
        replacement: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Section ``index`` at ``alpha * [f, 1]`` (or at ``replacement`` ``(B, P, d + 1)``),
        without gradients: ``(h, y)`` with ``h = [f, 1]`` at node layer ``index`` and ``y``
        the folded activation at ``index + 1``."""
        h, shape = self.capture(batch, index)
        x = alpha * h if replacement is None else replacement.to(h)
        if x.shape != h.shape:
            raise InputError(f"replacement {tuple(x.shape)} must have shape {tuple(h.shape)}")
        with torch.no_grad():
            y = self.section_fn(batch, index, shape)(x[..., :-1], x[..., -1])
        return h, y

    def check_cut(self, batch: Batch, index: int, rtol: float) -> None:
        """Raise ``ValueError`` if node layer ``index`` is not a cut of the model.

        Runs section ``index`` on rows of ``batch`` twice: once as they are, once with the
        rows shifted by one for everything before the node layer but the node layer's own
        activation kept. A cut gives the same output; a residual path around the node layer
        does not. Rows that differ in their attention mask are not paired; with fewer than two
        comparable rows nothing is checked.
        """
        pairs = _shift_within_equal_masks(batch)
        if pairs is None:
            return
        rows, shifted = pairs
        head = batch.rows(rows)
        h, y = self.section(head, index)
        _, y_shifted = self.section(batch.rows(shifted), index, replacement=h)
        scale = y.abs().max().clamp_min(1e-30)
        if not torch.allclose(y, y_shifted, rtol=rtol, atol=rtol * float(scale)):
            start, end = self.node_layers[index].name, self.node_layers[index + 1].name
            raise InputError(
                f"node layer {start!r} is not a cut of the model: {end!r} also depends on "
                "earlier activations through another path (e.g. a residual connection around "
                f"{start!r}). Use sites that carry the whole state: residual-stream aliases "
                "(resid_pre.i, resid_post.i, unembed) or module inputs/outputs on the main path"
            )


def _fold_output(y: Tensor, c: Tensor, lead: tuple, start: str, end: str) -> Tensor:
    """``[rows(y), c_out]``: each output position keeps its own constant when the positions
    are the same as the node layer's, else takes the mean constant of its row."""
    rows = as_rows(y, end)
    if _lead_shape(y) == lead:
        c_rows = c.reshape(rows.shape[0], rows.shape[1], 1)
    elif y.shape[0] == c.shape[0]:
        per_row = c.reshape(c.shape[0], -1).mean(1)
        c_rows = per_row.view(-1, 1, 1).expand(-1, rows.shape[1], 1)
    else:
        raise InputError(
            f"node layer {end!r} has {y.shape[0]} rows but {start!r} has {c.shape[0]}; node "
            "layers must keep the batch dimension first"
        )
    return torch.cat([rows, c_rows.to(rows.dtype)], dim=-1)


def _shift_within_equal_masks(batch: Batch, limit: int = 8) -> tuple[Tensor, Tensor] | None:
    """Row indices ``rows`` and a shifted copy pairing rows with equal masks (or None)."""
    n = min(batch.n, limit)
    if n < 2:
        return None
    mask = batch.mask()
    if mask is None:
        rows = torch.arange(n)
        return rows, rows.roll(1)
    keys: dict[tuple, list[int]] = {}
    for i in range(batch.n):
        keys.setdefault(tuple(mask[i].tolist()), []).append(i)
    group = max(keys.values(), key=len)[:limit]
    if len(group) < 2:
        return None
    rows = torch.tensor(group)
    return rows, rows.roll(1)
