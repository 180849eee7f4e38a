"""How much of each test tolerance the comparisons use: a pytest plugin and its summary.

Loaded by ``tests/conftest.py`` only when ``TYCHE_TOLERANCE_REPORT=path/to/file.jsonl`` is set
(otherwise nothing here is imported). It wraps the scalar comparison of ``pytest.approx``,
``torch.allclose`` / ``torch.isclose`` (and the tensor methods), ``torch.testing.assert_close``,
``numpy.allclose`` / ``numpy.isclose``, ``numpy.testing.assert_allclose`` and ``math.isclose``,
and records every call made from a file in ``tests/``. After each test it appends one JSON line
per call site of that test::

    {"file": "test_x.py", "line": 42, "test": "tests/test_x.py::test_y", "kind": "allclose",
     "n": 3, "max_abs_diff": 1.2e-07, "used_fraction": 0.012, "n_apart": 0,
     "least_apart": null}

``n`` counts the comparisons made at that line in that test (a loop or an array compared with
``pytest.approx`` gives several), ``max_abs_diff`` is the largest ``|a - b|`` over them and
``used_fraction`` the largest ``|a - b| / tolerance`` over those that held, with the tolerance of
each function (``atol + rtol·|b|`` for the ``allclose`` family, ``max(rel·|b|, abs)`` for
``approx``); its inverse is the margin. Comparisons that did not hold (``assert not
torch.allclose(...)``, which claims two results differ) count in ``n_apart``, and
``least_apart`` is the smallest ``|a - b| / tolerance`` among them: their margin.

``python tests/support/tolerance_report.py FILE.jsonl ...`` (one file per setting) prints every
call site whose worst margin over all the files is below ``--margin`` (default 10), then the
worst margins.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
ENV = "TYCHE_TOLERANCE_REPORT"


def _site(depth: int) -> tuple[str, int] | None:
    """(file relative to tests/, line) of the frame ``depth`` above the caller, if in tests/."""
    frame = sys._getframe(depth + 1)
    path = Path(frame.f_code.co_filename)
    if TESTS not in path.parents or path.name == Path(__file__).name:
        return None
    return str(path.relative_to(TESTS)), frame.f_lineno


class Recorder:
    """Aggregates comparisons per (test, call site) and appends them to a JSON-lines file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.test = "<collection>"
        self.rows: dict[tuple[str, int, str], dict[str, Any]] = {}

    def add(self, site: tuple[str, int], kind: str, diff: float, fraction: float) -> None:
        """Record one comparison (or one array of them) made at ``site``."""
        key = (*site, kind)
        row = self.rows.setdefault(
            key,
            {"n": 0, "max_abs_diff": 0.0, "used_fraction": 0.0, "n_apart": 0, "least_apart": None},
        )
        row["n"] += 1
        row["max_abs_diff"] = max(row["max_abs_diff"], diff)
        if fraction <= 1:
            row["used_fraction"] = max(row["used_fraction"], fraction)
        else:
            row["n_apart"] += 1
            least = row["least_apart"]
            row["least_apart"] = fraction if least is None else min(least, fraction)

    def flush(self) -> None:
        """Append the rows of the current test and start afresh."""
        if not self.rows:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for (file, line, kind), row in sorted(self.rows.items()):
                record = {"file": file, "line": line, "test": self.test, "kind": kind, **row}
                f.write(json.dumps(record) + "\n")
        self.rows.clear()

    # pytest hooks
    def pytest_runtest_logstart(self, nodeid: str, location: object) -> None:
        self.flush()
        self.test = nodeid

    def pytest_runtest_logfinish(self, nodeid: str, location: object) -> None:
        self.flush()
        self.test = "<between tests>"

    def pytest_sessionfinish(self, session: object) -> None:
        self.flush()


RECORDER: Recorder | None = None


def _spread(actual: Any, expected: Any, atol: float, rtol: float) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / (atol + rtol·|b|)) elementwise, broadcast, in float64.

    Equal entries (infinities of one sign, and NaN beside NaN) count as 0.
    """
    import numpy as np

    a = _as_numpy(actual)
    b = _as_numpy(expected)
    with np.errstate(all="ignore"):
        a, b = np.broadcast_arrays(a, b)
        diff = np.abs(a - b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
        tol = atol + rtol * np.abs(b)
        fraction = np.where(diff == 0, 0.0, diff / np.where(tol > 0, tol, 0.0))
    if diff.size == 0:
        return 0.0, 0.0
    fraction = np.where(np.isnan(fraction), np.inf, fraction)
    return float(diff.max()), float(fraction.max())


def _as_numpy(x: Any):
    """``x`` (a tensor, array or number) as a float64 (or complex128) numpy array."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.to(x.dtype if x.is_complex() else __import__("torch").float64).numpy()
    arr = np.asarray(x)
    return arr.astype(np.complex128 if np.iscomplexobj(arr) else np.float64)


def _record(kind: str, actual: Any, expected: Any, atol: float, rtol: float) -> None:
    """Record one call of a tensor comparison made directly from a file in tests/."""
    site = _site(2)
    if RECORDER is None or site is None:
        return
    try:
        diff, fraction = _spread(actual, expected, atol, rtol)
    except Exception:  # noqa: BLE001 - shapes or types the comparison itself rejects
        return
    RECORDER.add(site, kind, diff, fraction)


def _wrap(kind: str, func: Callable, defaults: tuple[float, float], n: int) -> Callable:
    """``func(a, b, rtol, atol, ...)`` that records its spread; ``defaults`` = (rtol, atol)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rtol = kwargs.get("rtol", args[n] if len(args) > n else defaults[0])
        atol = kwargs.get("atol", args[n + 1] if len(args) > n + 1 else defaults[1])
        if len(args) >= 2:
            _record(kind, args[0], args[1], float(atol), float(rtol))
        return func(*args, **kwargs)

    return wrapper


def _wrap_assert_close(func: Callable) -> Callable:
    """``torch.testing.assert_close`` that records its spread (defaults follow the dtypes)."""

    @functools.wraps(func)
    def wrapper(actual: Any, expected: Any, *args: Any, **kwargs: Any) -> Any:
        for a, b in _pairs(actual, expected):
            rtol, atol = kwargs.get("rtol"), kwargs.get("atol")
            if rtol is None or atol is None:
                rtol, atol = _default_tolerances(a, b)
            _record("assert_close", a, b, float(atol), float(rtol))
        return func(actual, expected, *args, **kwargs)

    return wrapper


def _pairs(actual: Any, expected: Any) -> Iterator[tuple[Any, Any]]:
    """The (tensor-or-number, tensor-or-number) leaves of two matching nested containers."""
    if isinstance(actual, dict) and isinstance(expected, dict):
        for key in actual.keys() & expected.keys():
            yield from _pairs(actual[key], expected[key])
    elif isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        if all(not isinstance(v, (list, tuple, dict)) for v in (*actual, *expected)):
            yield actual, expected
        else:
            for a, b in zip(actual, expected):
                yield from _pairs(a, b)
    else:
        yield actual, expected


def _default_tolerances(actual: Any, expected: Any) -> tuple[float, float]:
    """assert_close's (rtol, atol) for these inputs (Python floats count as float64)."""
    import torch
    from torch.testing._comparison import default_tolerances

    def tensor(x: Any) -> torch.Tensor:
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)

    try:
        return default_tolerances(tensor(actual), tensor(expected))
    except (TypeError, ValueError, RuntimeError):
        return 0.0, 0.0


def _wrap_math_isclose(func: Callable) -> Callable:
    """``math.isclose`` that records its spread against ``max(rel·max|a|,|b|, abs)``."""

    @functools.wraps(func)
    def wrapper(a: float, b: float, *, rel_tol: float = 1e-9, abs_tol: float = 0.0) -> bool:
        site = _site(1)
        if RECORDER is not None and site is not None:
            diff = abs(a - b) if a != b else 0.0
            tol = max(rel_tol * max(abs(a), abs(b)), abs_tol)
            RECORDER.add(site, "isclose", diff, _fraction(diff, tol))
        return func(a, b, rel_tol=rel_tol, abs_tol=abs_tol)

    return wrapper


def _fraction(diff: float, tol: float) -> float:
    """diff / tol, with 0/0 = 0 and d/0 = inf (NaN counts as inf)."""
    if diff == 0:
        return 0.0
    if math.isnan(diff) or tol <= 0:
        return math.inf
    return diff / tol


def _install_approx() -> None:
    """Stamp each ``pytest.approx`` with its call site and record its scalar comparisons."""
    import _pytest.approx as pa
    import pytest

    approx = pytest.approx

    @functools.wraps(approx)
    def stamped(*args: Any, **kwargs: Any) -> Any:
        obj = approx(*args, **kwargs)  # pytest's own approx, with the caller's tolerance
        obj._tyche_site = _site(1)
        return obj

    pytest.approx = stamped
    make_scalar = pa.Approx._approx_scalar

    def scalar(self: Any, x: Any) -> Any:
        obj = make_scalar(self, x)
        obj._tyche_site = getattr(self, "_tyche_site", None)
        return obj

    pa.Approx._approx_scalar = scalar
    compare = pa.ApproxScalar.__eq__

    def eq(self: Any, actual: Any) -> bool:
        result = compare(self, actual)
        site = getattr(self, "_tyche_site", None)
        if RECORDER is not None and site is not None:
            _record_scalar(self, actual, site)
        return result

    pa.ApproxScalar.__eq__ = eq


def _record_scalar(approx: Any, actual: Any, site: tuple[str, int]) -> None:
    """Record one scalar ``actual == approx(expected)`` (arrays come back element by element)."""
    from numbers import Complex

    expected = approx.expected
    numbers = isinstance(actual, Complex) and isinstance(expected, Complex)
    if not numbers or isinstance(actual, bool) or isinstance(expected, bool):
        return
    if actual == expected or (math.isnan(abs(expected)) and math.isnan(abs(actual))):
        diff = 0.0
    else:
        diff = float(abs(actual - expected))
    try:
        tol = float(approx.tolerance)
    except ValueError:
        tol = 0.0
    RECORDER.add(site, "approx", diff, _fraction(diff, tol))


def install(path: str | os.PathLike) -> Recorder:
    """Wrap the comparisons and return the plugin object that writes ``path``."""
    global RECORDER
    import numpy as np
    import numpy.testing
    import torch
    import torch.testing

    RECORDER = Recorder(path)
    _install_approx()
    torch.allclose = _wrap("allclose", torch.allclose, (1e-5, 1e-8), 2)
    torch.isclose = _wrap("isclose", torch.isclose, (1e-5, 1e-8), 2)
    torch.Tensor.allclose = _wrap("allclose", torch.Tensor.allclose, (1e-5, 1e-8), 2)
    torch.Tensor.isclose = _wrap("isclose", torch.Tensor.isclose, (1e-5, 1e-8), 2)
    torch.testing.assert_close = _wrap_assert_close(torch.testing.assert_close)
    np.allclose = _wrap("allclose", np.allclose, (1e-5, 1e-8), 2)
    np.isclose = _wrap("isclose", np.isclose, (1e-5, 1e-8), 2)
    assert_allclose = np.testing.assert_allclose
    numpy.testing.assert_allclose = _wrap("assert_allclose", assert_allclose, (1e-7, 0.0), 2)
    math.isclose = _wrap_math_isclose(math.isclose)
    return RECORDER


# ---- the summary ------------------------------------------------------------------------------


def margin_of(row: dict[str, Any]) -> float:
    """A row's margin: 1 / used fraction of the comparisons that held, and for those that did
    not (claims that two results differ) how many tolerances apart they were; the smaller."""
    held = math.inf if row["used_fraction"] == 0 else 1.0 / row["used_fraction"]
    apart = row.get("least_apart")
    return held if apart is None else min(held, apart)


def load(paths: list[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per call site: the worst margin and largest |a - b| over all files, and per file."""
    sites: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        setting = Path(path).stem
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            site = sites.setdefault(
                (r["file"], r["line"]),
                {"margin": math.inf, "diff": 0.0, "test": r["test"], "kind": r["kind"], "by": {}},
            )
            margin = margin_of(r)
            if margin <= site["margin"]:
                site.update(margin=margin, test=r["test"], apart=bool(r.get("n_apart")))
            site["diff"] = max(site["diff"], r["max_abs_diff"])
            site["by"][setting] = min(site["by"].get(setting, math.inf), margin)
    return sites


def summarize(paths: list[str], margin: float = 10.0, worst: int = 25) -> int:
    """Print the call sites below ``margin`` and the ``worst`` margins; return how many below."""
    sites = load(paths)
    ranked = sorted(sites.items(), key=lambda kv: kv[1]["margin"])
    low = [(k, v) for k, v in ranked if v["margin"] < margin]
    settings = sorted({s for v in sites.values() for s in v["by"]})
    print(f"{len(sites)} call sites over {len(paths)} settings ({', '.join(settings)})")
    print(f"{len(low)} call sites with a worst margin below {margin:g}x:")
    for (file, line), v in low:
        _print_site(file, line, v, settings)
    print(f"the {worst} worst margins:")
    for (file, line), v in ranked[:worst]:
        _print_site(file, line, v, settings)
    return len(low)


def _print_site(file: str, line: int, v: dict[str, Any], settings: list[str]) -> None:
    by = " ".join(f"{s}={v['by'][s]:.3g}x" for s in settings if s in v["by"])
    kind = f"{v['kind']}, apart" if v.get("apart") else v["kind"]
    print(
        f"  {file}:{line}  margin {v['margin']:.3g}x  max|a-b| {v['diff']:.3g}"
        f"  ({kind}; {by}; worst in {v['test']})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="JSON-lines files, one per setting")
    parser.add_argument("--margin", type=float, default=10.0, help="flag sites below this")
    parser.add_argument("--worst", type=int, default=25, help="how many worst margins to list")
    args = parser.parse_args(argv)
    low = summarize(args.files, args.margin, args.worst)
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
