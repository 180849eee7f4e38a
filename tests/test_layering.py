"""The house's layering: no import circles, and methods import only shared modules.

Shared modules (``tyche.sites``, ``tyche.hooks``, ...) know no method and no zoo; a method
(``tyche.basin``, ``tyche.causal``, ...) imports shared modules only, except its ``cli.py``
(or ``cli/`` package), which is a face like the zoo and ``__main__``. The graph is read from
the source with ``ast`` (every ``import``, also those inside functions), so lazy imports
count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tyche

ROOT = Path(tyche.__file__).parent
METHODS = ("basin", "causal", "codebook", "interaction")
FACES = ("zoo", "__main__")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The tyche modules ``name`` imports (resolved to known modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [t for t in subs if t in known] or [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("tyche") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    # a module's package __init__ runs first: `import tyche.a.b` imports tyche.a too, but
    # that is not an edge of b's own; only what b's source names counts
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in METHODS:
        # a method's cli (a module or a package of modules) is a face
        return "face" if len(parts) > 2 and parts[2] == "cli" else f"method:{parts[1]}"
    if parts[1] in FACES:
        return "face"
    return "shared"


def test_no_import_circles() -> None:
    graph = _graph()
    # the package roots (`tyche`, `tyche.basin`, ...) only re-export, lazily or not; an edge
    # into a package root is an edge into its public modules, which the walk covers
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_methods_import_only_shared_modules() -> None:
    bad = []
    for name, targets in _graph().items():
        layer = _layer(name)
        for target in targets:
            other = _layer(target)
            if layer == "shared" and other != "shared":
                bad.append(f"shared {name} imports {target}")
            if layer.startswith("method:") and other not in ("shared", layer):
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: a method importing the zoo lazily is caught."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from tyche.zoo.resolve import resolve_model\n")
    known = set(_modules())
    assert "tyche.zoo.resolve" in _imports("tyche.basin.m", path, known)
    assert _layer("tyche.basin.m") == "method:basin" and _layer("tyche.zoo.resolve") == "face"


_IMPORT_EACH_ALONE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "tyche" or m.startswith("tyche.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone() -> None:
    """Each module imports first, with no other tyche module loaded (no order dependence).

    One interpreter (torch and transformers load once); tyche's modules are dropped from
    ``sys.modules`` before each import, so each one starts from nothing of tyche.
    """
    names = sorted(n for n in _modules() if n != "tyche.__main__")
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_ALONE, *names],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
