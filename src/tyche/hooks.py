"""Context-managed hooks that read or replace the tensors at sites during forward passes.

:func:`read_activations` records the tensors at some sites into an :class:`Activations`
dict; :func:`replace_activations` swaps them for the output of a function or for a fixed
tensor, and :func:`add_replacement_hooks` does the same until its hooks are removed (to
insert a computation into a model for good). Sites are named and resolved by
:mod:`tyche.sites` (aliases such as ``resid_pre.*``, module names, globs); an
``attn_heads`` site is read and replaced as its per-head view ``(B, T, n_heads, d_head)``.
``read_activations``, ``replace_activations`` and ``Activations`` are also importable from
``tyche.sites``.

The context managers' hooks never outlive their ``with`` block, also when the forward pass
raises. Tensors keep
the device and dtype of the module that produced them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tyche.errors import InputError
from tyche.sites import Site, _Catalog, _resolve, resolve_sites

__all__ = [
    "Activations",
    "ReplacementHooks",
    "add_replacement_hooks",
    "read_activations",
    "replace_activations",
]

_INPUT_KWARGS = ("hidden_states", "hidden_state", "x", "input", "inputs_embeds")

Replacement = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor


class Activations(dict):
    """``dict[site name, Tensor]`` filled by a forward pass; a missing key says why."""

    def __missing__(self, key: object) -> torch.Tensor:
        raise KeyError(
            f"no activation recorded for {key!r}: run a forward pass inside the `with` block "
            f"and check the site was reached (recorded so far: {sorted(self)})"
        )


def _first_tensor(output: Any, site: Site) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and output:
        first = next(iter(output.values()))
        if isinstance(first, torch.Tensor):
            return first
    raise TypeError(f"{site.name}: module output of type {type(output).__name__} holds no tensor")


def _with_first(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return type(output)(new, *output[1:])
    if isinstance(output, tuple | list):
        return type(output)([new, *output[1:]])
    output[next(iter(output))] = new  # dict-like model output, created afresh by each call
    return output


def _input_tensor(args: tuple, kwargs: dict, site: Site) -> tuple[int | str, torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    for key in _INPUT_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return key, kwargs[key]
    raise TypeError(
        f"{site.name}: {type(site.module).__name__} got no tensor as first positional argument "
        f"nor as one of the keyword arguments {_INPUT_KWARGS}; pick another site"
    )


def _view(tensor: torch.Tensor, site: Site) -> torch.Tensor:
    if site.n_heads is None:
        return tensor
    if site.heads_native:  # the module gives (..., n_heads, d_head) itself
        if tensor.dim() < 2 or tensor.shape[-2] != site.n_heads:
            raise InputError(
                f"{site.name}: expected (..., {site.n_heads}, d_head) at {site.module_name}, "
                f"got {tuple(tensor.shape)}"
            )
        return tensor
    if tensor.shape[-1] % site.n_heads:
        raise InputError(f"{site.name}: width {tensor.shape[-1]} not divisible by {site.n_heads}")
    return tensor.unflatten(-1, (site.n_heads, -1))


def _replaced(tensor: torch.Tensor, site: Site, replacement: Replacement) -> torch.Tensor:
    view = _view(tensor, site)
    if isinstance(replacement, torch.Tensor):
        try:
            new = torch.broadcast_to(replacement.to(view.device, view.dtype), view.shape)
        except RuntimeError as err:
            raise InputError(
                f"{site.name}: substitute of shape {tuple(replacement.shape)} does not "
                f"broadcast to the activation's shape {tuple(view.shape)}"
            ) from err
    else:
        new = replacement(view)
        if not isinstance(new, torch.Tensor):
            kind = type(new).__name__
            raise TypeError(f"{site.name}: replacement function returned {kind}, not a Tensor")
        if new.shape != view.shape:
            raise InputError(
                f"{site.name}: replacement function returned shape {tuple(new.shape)}, "
                f"expected {tuple(view.shape)}"
            )
        new = new.to(view.device, view.dtype)
    return new.reshape(tensor.shape)


def _hook(site: Site, transform: Callable[[torch.Tensor], torch.Tensor | None]) -> Any:
    """Register ``transform`` on the site; a non-None return value replaces the tensor."""
    if site.where == "output":

        def forward_hook(module: nn.Module, args: tuple, output: Any) -> Any:
            new = transform(_first_tensor(output, site))
            return None if new is None else _with_first(output, new)

        return site.module.register_forward_hook(forward_hook)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        key, tensor = _input_tensor(args, kwargs, site)
        new = transform(tensor)
        if new is None:
            return None
        if key == 0:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, key: new}

    return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@contextmanager
def _hooks_removed_on_exit(registrations: Iterator[Any]) -> Iterator[None]:
    handles: list[Any] = []
    try:
        for handle in registrations:  # one at a time, so a failed registration undoes the rest
            handles.append(handle)
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def read_activations(
    model: nn.Module, sites: str | Site | Sequence[str | Site], *, detach: bool = True
) -> Iterator[Activations]:
    """Record the tensors at ``sites`` during forward passes inside the ``with`` block.

    Yields an :class:`Activations` dict keyed by site name; a later call of the same module
    overwrites the entry. ``attn_heads`` entries are ``(B, T, n_heads, d_head)`` views.
    ``detach=False`` keeps the autograd graph, so gradients with respect to the stored tensors
    (head views included) can be taken.
    """
    resolved = resolve_sites(model, sites)
    store = Activations()

    def recorder(site: Site) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def record(tensor: torch.Tensor) -> torch.Tensor | None:
            view = _view(tensor, site)
            store[site.name] = view.detach() if detach else view
            if detach or view is tensor:
                return None
            return view.reshape(tensor.shape)  # route the graph through the stored view

        return record

    with _hooks_removed_on_exit(_hook(s, recorder(s)) for s in resolved):
        yield store


class ReplacementHooks:
    """Hooks placed by :func:`add_replacement_hooks`; they stay until :meth:`remove`.

    ``sites`` lists the resolved sites in forward order. Also a context manager that removes
    the hooks on exit.
    """

    def __init__(self, sites: list[Site], handles: list[Any]) -> None:
        self.sites = sites
        self._handles = handles

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        """True until :meth:`remove` was called."""
        return bool(self._handles)

    def __enter__(self) -> ReplacementHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _replacement_plan(
    model: nn.Module, mapping: Mapping[str | Site, Replacement]
) -> tuple[list[Site], dict[Site, Replacement]]:
    if not isinstance(mapping, Mapping) or not mapping:
        raise TypeError("replacing activations needs a non-empty mapping {site: fn or tensor}")
    catalog = _Catalog(model)
    plan: dict[Site, Replacement] = {}
    for key, replacement in mapping.items():
        if not (callable(replacement) or isinstance(replacement, torch.Tensor)):
            raise TypeError(f"replacement for {key!r} must be callable or a Tensor")
        for site in _resolve(catalog, key):
            if site in plan:
                raise InputError(f"site {site.name} is targeted by two keys of the mapping")
            plan[site] = replacement
    return sorted(plan, key=catalog.order_key), plan


def add_replacement_hooks(
    model: nn.Module, mapping: Mapping[str | Site, Replacement]
) -> ReplacementHooks:
    """Replace the tensors at sites in every forward pass until the returned hooks are removed.

    The persistent form of :func:`replace_activations` (same ``mapping``); use it to insert
    a module's computation into a model for good, e.g. a bottleneck at every MLP output.
    If a registration fails, the hooks placed so far are removed before the error propagates.
    """
    ordered, plan = _replacement_plan(model, mapping)

    def replacer(site: Site) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda tensor: _replaced(tensor, site, plan[site])

    handles: list[Any] = []
    try:
        for site in ordered:
            handles.append(_hook(site, replacer(site)))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return ReplacementHooks(ordered, handles)


@contextmanager
def replace_activations(
    model: nn.Module, mapping: Mapping[str | Site, Replacement]
) -> Iterator[list[Site]]:
    """Replace the tensors at sites during forward passes inside the ``with`` block.

    ``mapping`` maps a site, alias, or glob to ``fn(tensor) -> tensor`` (same shape; for
    ``attn_heads`` the ``(B, T, n_heads, d_head)`` view) or to a tensor substituted for the
    activation (broadcast to its shape, cast to its device and dtype). Yields the resolved
    sites. Hooks run in registration order, so reads opened inside see replaced values.
    """
    hooks = add_replacement_hooks(model, mapping)
    try:
        yield hooks.sites
    finally:
        hooks.remove()
