"""Adam(W) moments keyed by parameter name: the one reader of optimizer states, and our format.

Adam preconditioning needs each parameter's second moment ``exp_avg_sq``; torch keeps the
moments keyed by parameter *index*, so :func:`read_optimizer_state` maps them to names,
whatever the source: a HuggingFace ``Trainer`` checkpoint's ``optimizer.pt``, a bare
``torch.optim.Adam(...).state_dict()``, our safetensors file, or a mapping that is already
keyed by name. Our own format is one safetensors file with keys ``"<param name>/<moment>"``
(never pickle). Moments are stored raw, without Adam's bias correction (divide
``exp_avg_sq`` by ``1 - beta2**steps`` for the corrected estimate).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyche.errors import InputError

#: the moments we keep from an Adam-family optimizer state
MOMENTS = ("exp_avg", "exp_avg_sq")

OptimizerState = dict[str, dict[str, torch.Tensor]]


def adam_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerState:
    """``{param name: {"exp_avg": T, "exp_avg_sq": T}}`` for every parameter with state.

    Tensors are detached CPU float32 copies with the parameter's shape. Parameters are
    matched by identity, so any parameter-group layout works.
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    out: OptimizerState = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if not all(m in state for m in MOMENTS):
                continue
            if id(p) not in name_of:
                raise InputError("the optimizer holds a parameter that is not in the model")
            out[name_of[id(p)]] = {
                m: state[m].detach().to("cpu", torch.float32).clone() for m in MOMENTS
            }
    return out


def save_optimizer_state(state: Mapping[str, Mapping[str, torch.Tensor]], path: Path) -> None:
    """Write ``state`` to one safetensors file with keys ``"name/moment"``."""
    from safetensors.torch import save_file

    flat = {
        f"{name}/{moment}": tensor.detach().contiguous()
        for name, moments in state.items()
        for moment, tensor in moments.items()
    }
    save_file(flat, str(path))


def load_optimizer_state(path: Path) -> OptimizerState:
    """Read a file written by :func:`save_optimizer_state`."""
    from safetensors.torch import load_file

    out: OptimizerState = {}
    for key, tensor in load_file(str(path)).items():
        name, _, moment = key.rpartition("/")
        if not name:
            raise InputError(f"{path}: key {key!r} is not of the form 'param_name/moment'")
        out.setdefault(name, {})[moment] = tensor
    return out


def _is_no_decay(name: str, module_of: Mapping[str, nn.Module]) -> bool:
    """HF Trainer's grouping: biases and normalisation weights get no weight decay."""
    owner = module_of.get(name.rpartition(".")[0])
    is_norm = owner is not None and "norm" in type(owner).__name__.lower()
    return "bias" in name or is_norm or "norm" in name.lower()


def _orders_from_model(model: nn.Module) -> list[list[str]]:
    """Name orders an optimizer built on ``model`` may have used, most specific first.

    The HF Trainer's layout (weight-decay group, then the no-decay group of biases and
    norms, each in ``named_parameters`` order), then plain ``named_parameters`` order.
    """
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    modules = dict(model.named_modules())
    decay = [n for n in params if not _is_no_decay(n, modules)]
    return [decay + [n for n in params if _is_no_decay(n, modules)], params]


def _load_source(source: Any) -> Mapping[str, Any]:
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no optimizer state file at {str(path)!r}")
        if path.suffix == ".safetensors":
            return load_optimizer_state(path)
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a file that is not its own
            raise InputError(
                f"{path} could not be read as a torch optimizer state_dict "
                f"(weights_only=True): {err}"
            ) from err
    if not isinstance(source, Mapping):
        raise TypeError(
            "an optimizer state must be a path, a torch optimizer state_dict or a mapping "
            f"name -> moments, got {type(source).__name__}"
        )
    return source


def read_optimizer_state(
    source: Any,
    model: nn.Module | None = None,
    *,
    param_names: Sequence[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> OptimizerState:
    """Adam moments by parameter name, from any optimizer-state source.

    Args:
        source: a path (``optimizer.pt`` read with ``torch.load(weights_only=True)``, or our
            ``.safetensors``), a ``torch.optim`` state dict ``{"state": {int: {...}},
            "param_groups": [{"params": [int, ...]}, ...]}``, or a mapping already keyed by
            name (returned with its moments as tensors).
        model: the model the optimizer trained; its parameter names and shapes are used to
            map indices to names when the state dict does not carry ``param_names``.
        param_names: the names of ALL the optimizer's parameters in the order they were
            given to it (overrides every guess).
        shapes: ``{name: shape}`` used to check a mapping when there is no model.

    Index-to-name orders are tried in turn: ``param_names``; the groups' own
    ``param_names`` (optimizers built from ``named_parameters()``); with a model, the HF
    Trainer layout, then ``named_parameters`` order; without one, the names of ``shapes``.
    An order is accepted only if it has one name per slot and every moment's shape fits.

    Returns:
        ``{name: {"exp_avg": Tensor, "exp_avg_sq": Tensor}}`` in float32 (float64 kept),
        for every slot that holds both moments.

    Raises:
        ValueError: when no order fits, naming what did not.
    """
    state = _load_source(source)
    if not ("state" in state and "param_groups" in state):
        return {
            name: {m: torch.as_tensor(v) for m, v in moments.items()}
            for name, moments in state.items()
        }
    groups = state["param_groups"]
    indices = [i for g in groups for i in g["params"]]
    known: dict[str, tuple[int, ...]] = {}
    if model is not None:
        known = {n: tuple(p.shape) for n, p in model.named_parameters()}
    elif shapes is not None:
        known = {n: tuple(s) for n, s in shapes.items()}
    # (order, named): a named order is the optimizer's own or the caller's, so names it has
    # that `known` lacks are kept unchecked; a guessed order must name only known parameters
    orders: list[tuple[list[str], bool]] = []
    if param_names is not None:
        orders = [(list(param_names), True)]
    else:
        group_names = [n for g in groups for n in g.get("param_names", [])]
        if group_names:
            orders.append((group_names, True))
        if model is not None:
            orders += [(order, False) for order in _orders_from_model(model)]
        elif shapes is not None:
            orders.append((list(shapes), False))
    if not orders:
        raise InputError(
            "the optimizer state is keyed by index and carries no parameter names; pass the "
            "model it trained (or param_names=) so its slots can be matched to names"
        )
    for order, named in orders:
        mapped = _map(state["state"], indices, order, known, named)
        if mapped is not None:
            return mapped
    raise InputError(
        f"could not match the optimizer's {len(indices)} slots to parameter names "
        f"(tried {len(orders)} orders of {', '.join(str(len(o)) for o, _ in orders)} names; "
        "names and shapes must fit every slot): was it saved for this model and these "
        "trainable parameters?"
    )


def _map(
    slots: Mapping[int, Any],
    indices: Sequence[int],
    order: Sequence[str],
    known: Mapping[str, tuple[int, ...]],
    named: bool,
) -> OptimizerState | None:
    """Slots mapped to names along ``order``, or None where the order does not fit."""
    if len(order) != len(indices) or (not named and any(n not in known for n in order)):
        return None
    out: OptimizerState = {}
    for idx, name in zip(indices, order):
        moments = slots.get(idx, {})
        if not all(m in moments for m in MOMENTS):
            continue
        if name in known and any(tuple(moments[m].shape) != known[name] for m in MOMENTS):
            return None
        dtype = torch.promote_types(moments[MOMENTS[0]].dtype, torch.float32)
        out[name] = {m: moments[m].to(dtype) for m in MOMENTS}
    return out
