"""Results as data: frozen dataclasses saved as safetensors + JSON (never pickle).

A result saved to ``path`` is a directory holding

- ``tensors.safetensors``: every tensor in the result. A tensor field ``x`` is stored as
  ``"x"``; tensors inside containers get a path name, e.g. a ``dict[str, Tensor]`` field
  ``state`` stores ``state["w"]`` as ``"state/w"`` and a list field ``xs`` stores ``xs[0]``
  as ``"xs/0"``;
- ``meta.json``: the format version, the class name, the tyche version, ``units`` (the class's
  ``UNITS`` attribute, if any) and every field as JSON.

Field values may be tensors, numpy arrays, JSON scalars (non-finite floats included), ``None``,
lists, tuples and dicts of these (dict keys ``str``, ``int``, ``float``, ``bool`` or ``None``),
``torch.dtype``, ``pathlib.Path`` and nested dataclasses. Types JSON lacks are tagged in
``meta.json`` and come back as they went in: tuples stay tuples, numpy arrays come back as
numpy arrays (stored as tensors), dicts with non-string keys keep their keys, and a nested
dataclass comes back as its class when the field's annotation names a dataclass (otherwise as
a dict of its fields). Tensors are loaded on the CPU unless ``device`` is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tyche.errors import InputError

__all__ = [
    "FORMAT_VERSION",
    "ResultIO",
    "finite_json",
    "json_text",
    "load_result",
    "model_hash",
    "save_result",
    "write_json",
    "write_safetensors",
]

#: version of the on-disk layout; files with a larger version are refused
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
_TAGS = (
    "__tensor__",
    "__ndarray__",
    "__tuple__",
    "__float__",
    "__items__",
    "__dtype__",
    "__path__",
    "__dataclass__",
)

T = TypeVar("T")


def model_hash(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """16 hex characters of a sha256 over every tensor's name, shape, dtype and bytes.

    ``model`` is a module (its ``state_dict()``: parameters and persistent buffers) or a
    mapping of name -> tensor. Names are sorted, tensors are read on the CPU, so the hash does
    not depend on device, on parameter order or on memory layout; it changes with any element.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_hash: {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        header = f"{name}|{tuple(tensor.shape)}|{str(tensor.dtype)}\n"
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the mode a new file would get (0666 less the umask), then rename it."""
    os.chmod(tmp, 0o666 & ~_current_umask())
    os.replace(tmp, path)


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` atomically (a sibling temp file renamed into place).

    The file is readable like any other new file (the umask decides), not private.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
    _publish(tmp, path)
    return path


def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, ±inf; also numpy's) replaced by None, through
    dicts, lists and tuples: what strict JSON can hold (``null``: no value)."""
    if isinstance(data, float | np.floating):
        return float(data) if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(value) for value in data]
    return data


def json_text(data: Any, *, indent: int | None = 2, sort_keys: bool = True) -> str:
    """``data`` as strict JSON text (a NaN or infinity is ``null``, see :func:`finite_json`),
    ending in a newline: for every JSON file or listing the project writes or prints."""
    return json.dumps(finite_json(data), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2,
               sort_keys: bool = True) -> Path:  # fmt: skip
    """Write ``data`` as indented, key-sorted strict JSON to ``path`` atomically; a NaN or
    infinity is written as ``null`` (:func:`json_text`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_text(data, indent=indent, sort_keys=sort_keys))
    _publish(tmp, path)
    return path


class _Encoder:
    """Turns a field value into JSON, moving tensors into ``self.tensors`` by path name."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _store(self, name: str, tensor: torch.Tensor) -> str:
        if name in self.tensors:
            raise InputError(f"two tensors would be stored under the same name {name!r}")
        self.tensors[name] = tensor.detach().to("cpu").contiguous().clone()
        return name

    def encode(self, value: Any, name: str) -> Any:
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, torch.Tensor):
            return {"__tensor__": self._store(name, value)}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": self._store(name, torch.from_numpy(np.ascontiguousarray(value)))}
        if isinstance(value, np.generic):
            return self.encode(value.item(), name)
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, Path):
            return {"__path__": str(value)}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {
                f.name: self.encode(getattr(value, f.name), f"{name}/{f.name}")
                for f in dataclasses.fields(value)
            }
            return {"__dataclass__": type(value).__qualname__, "fields": fields}
        if isinstance(value, list | tuple):
            items = [self.encode(v, f"{name}/{i}") for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value):
                if any(k in _TAGS for k in value):
                    raise InputError(f"{name}: dict keys {_TAGS} are reserved by tyche.io")
                return {k: self.encode(v, f"{name}/{k}") for k, v in value.items()}
            items = [
                [self.encode(k, f"{name}/key"), self.encode(v, f"{name}/{k}")]
                for k, v in value.items()
            ]
            return {"__items__": items}
        raise TypeError(
            f"cannot save field {name!r} of type {type(value).__name__}; use tensors, numpy "
            "arrays, JSON scalars, lists, tuples, dicts or dataclasses of these"
        )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__float__" in value:
        return float(value["__float__"])
    if "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
    if "__path__" in value:
        return Path(value["__path__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    if "__dataclass__" in value:
        return {k: _decode(v, tensors) for k, v in value["fields"].items()}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass an annotation names (``X``, ``X | None``), else None."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Instantiate dataclass ``cls`` from decoded field values (recursing into dataclasses)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to no reconstruction
        hints = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(
            f"{where} has fields {unknown} that {cls.__qualname__} does not define; it was "
            "written by a different version of this class"
        )
    for name, value in values.items():
        nested = _dataclass_in(hints.get(name))
        if nested is not None and isinstance(value, dict):
            values[name] = _build(nested, value, f"{where}/{name}")
    init = {k: v for k, v in values.items() if fields[k].init}
    try:
        obj = cls(**init)
    except TypeError as err:
        raise InputError(f"cannot rebuild {cls.__qualname__} from {where}: {err}") from err
    for name, value in values.items():  # init=False fields: restore the saved value
        if not fields[name].init:
            object.__setattr__(obj, name, value)
    return obj


def save_result(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Save dataclass instance ``obj`` to the directory ``path`` (created; files replaced).

    Returns the directory as a ``Path``. See the module docstring for the layout.
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"save_result needs a dataclass instance, got {type(obj).__name__}")
    from tyche._version import __version__

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory; results are saved as folders")
    path.mkdir(parents=True, exist_ok=True)
    encoder = _Encoder()
    fields = {f.name: encoder.encode(getattr(obj, f.name), f.name) for f in dataclasses.fields(obj)}
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "type": type(obj).__qualname__,
        "module": type(obj).__module__,
        "tyche_version": __version__,
        "fields": fields,
    }
    units = getattr(type(obj), "UNITS", None)
    if units is not None:
        meta["units"] = encoder.encode(units, "UNITS")
    # write both files next to their final names, then swap them in
    write_safetensors(encoder.tensors, path / TENSORS_FILE, metadata={"format": "pt"})
    tmp_meta = path / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    _publish(tmp_meta, path / META_FILE)
    return path


def load_result(
    cls: type[T], path: str | os.PathLike[str], device: str | torch.device | None = None
) -> T:
    """Load a result of class ``cls`` saved by :func:`save_result` from the directory ``path``.

    Raises ``ValueError`` if the directory holds another class, was written by a newer format,
    or its fields do not fit ``cls``; ``FileNotFoundError`` if the files are missing.
    """
    path = Path(path)
    meta_path, tensor_path = path / META_FILE, path / TENSORS_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved tyche result (expected {META_FILE} and {TENSORS_FILE})"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(
            f"{path} was written with result format version {version!r}; this tyche reads "
            f"versions <= {FORMAT_VERSION}. Upgrade tyche to load it."
        )
    if meta.get("type") != cls.__qualname__:
        raise InputError(
            f"{path} holds a {meta.get('type')} (from {meta.get('module')}), not a "
            f"{cls.__qualname__}; load it with that class"
        )
    tensors = load_file(str(tensor_path), device=str(device) if device is not None else "cpu")
    values = {k: _decode(v, tensors) for k, v in meta["fields"].items()}
    return _build(cls, values, str(path))


class ResultIO:
    """Mixin giving a (frozen) dataclass ``save(path)`` and ``load(path)`` (see module doc).

    A subclass may define ``UNITS: ClassVar[dict[str, str]]`` (field -> unit); it is written
    to ``meta.json``.
    """

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to the directory ``path``; returns it."""
        return save_result(self, path)

    @classmethod
    def load(
        cls: type[T], path: str | os.PathLike[str], device: str | torch.device | None = None
    ) -> T:
        """Load an instance saved with :meth:`save` (tensors on ``device``, default CPU)."""
        return load_result(cls, path, device=device)
