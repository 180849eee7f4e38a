"""Tests for tyche.io: lossless round trips, clear refusals, no pickle, model_hash."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tyche.io import FORMAT_VERSION, ResultIO, load_result, model_hash, save_result

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


@dataclass(frozen=True)
class Settings:
    cutoff: float
    sites: tuple[str, ...]
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class Demo(ResultIO):
    UNITS: ClassVar[dict[str, str]] = {"estimates": "nats", "deltas": "nats"}

    estimates: torch.Tensor
    deltas: torch.Tensor
    state: dict[str, torch.Tensor]
    settings: Settings
    counts: np.ndarray
    shape: tuple[int, int]
    nested: dict[str, object]
    by_layer: dict[int, list[float]]
    note: str | None = None
    where: Path = Path("out")
    extra: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Other(ResultIO):
    x: torch.Tensor


def make_demo() -> Demo:
    g = torch.Generator().manual_seed(0)
    return Demo(
        estimates=torch.randn(5, generator=g, dtype=torch.float64),
        deltas=torch.randn(2, 3, generator=g).half(),
        state={"w": torch.arange(6).view(2, 3), "b/bias": torch.tensor([True, False])},
        settings=Settings(cutoff=1e-2, sites=("mlp_out.0", "resid_pre.1"), dtype=torch.bfloat16),
        counts=np.array([[1, 2], [3, 4]], dtype=np.int32),
        shape=(3, 4),
        nested={"a": [1, 2.5, None, {"b": "c"}], "inf": math.inf, "nan": math.nan, "t": (1, 2)},
        by_layer={0: [0.1, 0.2], 3: [1e-300]},
        note=None,
        where=Path("/tmp/x"),
        extra=[torch.zeros(0, 4), torch.tensor(7.0)],
    )


def assert_same(a, b) -> None:
    """Exact equality: safetensors and JSON (repr) round-trip every bit, so no tolerance."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif hasattr(a, "__dataclass_fields__"):
        for k in a.__dataclass_fields__:
            assert_same(getattr(a, k), getattr(b, k))
    else:
        assert a == b


def test_round_trip_every_kind_of_field(tmp_path):
    demo = make_demo()
    out = demo.save(tmp_path / "res")
    assert out == tmp_path / "res" and sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tensors.safetensors",
    ]
    back = Demo.load(out)
    assert_same(demo, back)
    assert isinstance(back.settings, Settings) and back.settings.sites == (
        "mlp_out.0",
        "resid_pre.1",
    )
    assert back.shape == (3, 4) and back.nested["t"] == (1, 2)
    assert list(back.by_layer) == [0, 3]


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_dtypes_round_trip(tmp_path, dtype):
    x = (torch.arange(12) % 5).to(dtype).view(3, 4)
    back = load_result(Other, save_result(Other(x=x), tmp_path / "r"))
    assert back.x.dtype == dtype and torch.equal(back.x, x)  # stored bits: exact


def test_layout_is_safetensors_and_json_without_pickle(tmp_path, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    for target in ("pickle.dump", "pickle.dumps", "torch.save", "pickle.load", "torch.load"):
        monkeypatch.setattr(target, no_pickle)
    demo = make_demo()
    path = demo.save(tmp_path / "res")
    assert_same(Demo.load(path), demo)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["type"] == "Demo"
    assert meta["units"] == {"estimates": "nats", "deltas": "nats"}
    assert meta["fields"]["note"] is None and meta["fields"]["shape"] == {"__tuple__": [3, 4]}
    tensors = load_file(str(path / "tensors.safetensors"))
    assert {
        "estimates",
        "deltas",
        "state/w",
        "state/b/bias",
        "counts",
        "extra/0",
        "extra/1",
    } == set(tensors)
    json.loads((path / "meta.json").read_text(), parse_constant=pytest.fail)  # strict JSON


def test_overwrite_and_device_argument(tmp_path):
    path = Other(x=torch.ones(2)).save(tmp_path / "r")
    Other(x=torch.zeros(3)).save(path)
    back = Other.load(path, device="cpu")
    assert torch.equal(back.x, torch.zeros(3)) and back.x.device.type == "cpu"


def test_refusals(tmp_path):
    path = make_demo().save(tmp_path / "demo")
    with pytest.raises(ValueError, match="holds a Demo .*not a Other"):
        Other.load(path)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 2.*Upgrade tyche"):
        Demo.load(path)
    with pytest.raises(FileNotFoundError, match="not a saved tyche result"):
        Demo.load(tmp_path / "nothing")
    with pytest.raises(TypeError, match="dataclass instance"):
        save_result({"x": 1}, tmp_path / "d")
    with pytest.raises(TypeError, match="cannot save field 'x' of type object"):
        save_result(Other(x=object()), tmp_path / "o")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        Other(x=torch.ones(1)).save(tmp_path / "file")


def test_fields_not_in_class_are_refused(tmp_path):
    path = Other(x=torch.ones(1)).save(tmp_path / "r")
    meta = json.loads((path / "meta.json").read_text())
    meta["fields"]["y"] = 3
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"fields \['y'\] that Other does not define"):
        Other.load(path)


def test_model_hash():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    twin.load_state_dict(net.state_dict())
    h = model_hash(net)
    assert len(h) == 16 and int(h, 16) >= 0
    assert model_hash(twin) == h == model_hash(dict(net.state_dict()))
    # independent of order and memory layout
    state = dict(reversed(list(net.state_dict().items())))
    state["0.weight"] = state["0.weight"].t().contiguous().t()
    assert model_hash(state) == h
    if torch.cuda.is_available():
        assert model_hash({k: v.cuda() for k, v in state.items()}) == h
    # one element, a buffer, a dtype or a name changes the hash
    with torch.no_grad():
        twin[0].weight[1, 2] += 1e-6
    assert model_hash(twin) != h
    twin.load_state_dict(net.state_dict())
    twin[1].running_mean[0] = 1.0
    assert model_hash(twin) != h
    assert model_hash({k: v.double() for k, v in net.state_dict().items()}) != h
    renamed = {("x" + k): v for k, v in net.state_dict().items()}
    assert model_hash(renamed) != h
    with pytest.raises(TypeError, match="not a tensor"):
        model_hash({"a": 1.0})


def test_model_hash_of_tiny_lm(gpt2_model):
    h = model_hash(gpt2_model)
    assert h == model_hash(gpt2_model.state_dict())
    copy = type(gpt2_model)(gpt2_model.config)
    copy.load_state_dict(gpt2_model.state_dict())
    assert model_hash(copy) == h


def _strict(text: str):
    """``json.loads`` that refuses NaN and Infinity, as strict parsers (JavaScript's) do."""

    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_writes_non_finite_floats_as_null(tmp_path):
    """A metric that is NaN or infinite is written as null (valid JSON), not NaN or refused."""
    from tyche.io import write_json

    data = {"loss": math.nan, "ratio": [1.5, math.inf, -math.inf],
            "nested": {"x": np.float32("nan")}, "t": (2.0, np.float64(0.25)), "ok": 3}  # fmt: skip
    expected = {"loss": None, "ratio": [1.5, None, None], "nested": {"x": None}, "t": [2.0, 0.25],
                "ok": 3}  # fmt: skip
    written = write_json(tmp_path / "m.json", data)
    assert _strict(written.read_text()) == expected
    from tyche.io import json_text

    assert _strict(json_text(data, indent=None)) == expected
    assert json_text({"b": 1, "a": 2}, indent=None, sort_keys=False) == '{"b": 1, "a": 2}\n'
