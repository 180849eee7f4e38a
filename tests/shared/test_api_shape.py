"""The public API keeps one shape: short signatures, one name for the progress bar.

Core functions take their settings as one options dataclass, so no public function or method
of ``tyche`` takes more than :data:`MAX_PARAMETERS` parameters (``self``/``cls`` not counted,
``*args`` and ``**kwargs`` one each); dataclasses' generated ``__init__`` is not counted (its
fields are the options). Read from the source with ``ast``, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tyche

ROOT = Path(tyche.__file__).parent
MAX_PARAMETERS = 10
#: names that would be a second spelling of ``progress``
OTHER_PROGRESS_NAMES = {"show_progress", "progress_bar", "verbose", "tqdm", "pbar"}


def _public_functions(root: Path = ROOT):
    """``(qualified name, path:line, ast.arguments, is_method)`` of every public function."""
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if any(p.startswith("_") and p not in ("__init__", "__main__") for p in parts):
            continue
        module = ".".join(parts)

        def walk(body, prefix, in_class, module=module, path=path):
            for node in body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    if node.name.startswith("_") and node.name != "__init__":
                        continue
                    yield f"{module}.{prefix}{node.name}", f"{path}:{node.lineno}", node.args, \
                        in_class
                elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    yield from walk(node.body, f"{prefix}{node.name}.", True)

        yield from walk(ast.parse(path.read_text()).body, "", False)


def _count(args: ast.arguments, is_method: bool) -> int:
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    if is_method and names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + (args.vararg is not None) + (args.kwarg is not None)


def _too_long(root: Path = ROOT) -> list[str]:
    return [
        f"{name} takes {n} parameters ({where}); group its settings into an options dataclass"
        for name, where, args, is_method in _public_functions(root)
        if (n := _count(args, is_method)) > MAX_PARAMETERS
    ]


def test_no_public_function_takes_more_than_ten_parameters() -> None:
    long = _too_long()
    assert not long, "\n".join(long)


def test_the_progress_bar_has_one_name() -> None:
    other = [
        f"{name} ({where}) calls its progress bar {a.arg!r}; call it 'progress'"
        for name, where, args, _ in _public_functions()
        for a in (*args.args, *args.kwonlyargs)
        if a.arg in OTHER_PROGRESS_NAMES
    ]
    assert not other, "\n".join(other)


def test_the_count_sees_a_long_signature(tmp_path: Path) -> None:
    """The check can fail: eleven parameters, a method with ``self`` and ``**kwargs``."""
    package = tmp_path / "toy"
    package.mkdir()
    (package / "core.py").write_text(
        "def f(a, b, c, d, e, f, g, h, i, j, k): ...\n"
        "def g(a, b, c, d, e, f, g, h, i, j): ...\n"
        "class C:\n"
        "    def m(self, a, b, c, d, e, f, g, h, i, **kw): ...\n"
        "    def n(self, a, b, c, d, e, f, g, h, i, j, *rest): ...\n"
        "def _private(a, b, c, d, e, f, g, h, i, j, k): ...\n"
    )
    found = [line.split(" takes")[0] for line in _too_long(package)]
    assert found == ["toy.core.f", "toy.core.C.n"]
