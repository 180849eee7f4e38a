"""Adam(W) moments keyed by parameter name, saved as safetensors (never pickle).

The basin estimator's Adam preconditioner needs each parameter's second moment
``exp_avg_sq``; torch keeps them keyed by parameter *index*, so we map them to names.
On disk a state is one safetensors file with keys ``"<param name>/<moment>"``.
The moments are stored raw, without Adam's bias correction (divide ``exp_avg_sq`` by
``1 - beta2**steps`` for the corrected estimate; the zoo's metrics JSON records both).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

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
                raise ValueError("the optimizer holds a parameter that is not in the model")
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
            raise ValueError(f"{path}: key {key!r} is not of the form 'param_name/moment'")
        out.setdefault(name, {})[moment] = tensor
    return out


def _is_no_decay(name: str, module_of: Mapping[str, nn.Module]) -> bool:
    """HF Trainer's grouping: biases and normalisation weights get no weight decay."""
    owner = module_of.get(name.rpartition(".")[0])
    is_norm = owner is not None and "norm" in type(owner).__name__.lower()
    return "bias" in name or is_norm or "norm" in name.lower()


def load_trainer_optimizer(path: Path, model: nn.Module) -> OptimizerState:
    """Map a HuggingFace ``Trainer`` checkpoint's ``optimizer.pt`` to parameter names.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain containers
    only). torch stores state by index; the names come from ``param_names`` in the
    parameter groups when present, otherwise from the Trainer's layout (weight-decay
    group, then the no-decay group of biases and norms, each in ``named_parameters``
    order), then from plain ``named_parameters`` order. An ordering is accepted only if
    every shape matches; otherwise a ValueError explains what did not fit.
    """
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(f"{path} is not a torch optimizer state_dict")
    indices = [i for g in sd["param_groups"] for i in g["params"]]
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    candidates: list[list[str]] = []
    group_names = [n for g in sd["param_groups"] for n in g.get("param_names", [])]
    if len(group_names) == len(indices):
        candidates.append(group_names)
    modules = dict(model.named_modules())
    decay = [n for n in params if not _is_no_decay(n, modules)]
    candidates.append(decay + [n for n in params if _is_no_decay(n, modules)])
    candidates.append(list(params))
    for names in candidates:
        if len(names) != len(indices) or any(n not in params for n in names):
            continue
        out: OptimizerState = {}
        fits = True
        for idx, name in zip(indices, names):
            state = sd["state"].get(idx, {})
            if not all(m in state for m in MOMENTS):
                continue
            if any(state[m].shape != params[name].shape for m in MOMENTS):
                fits = False
                break
            out[name] = {m: state[m].to(torch.float32) for m in MOMENTS}
        if fits and out:
            return out
    raise ValueError(
        f"{path}: could not match its {len(indices)} optimizer slots to the model's "
        f"{len(params)} trainable parameters by shape; was it saved for this model?"
    )
