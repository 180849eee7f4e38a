"""The house's layering: no import circles, and imports flow down only.

Three layers, top to bottom: the faces (``tyche.cli``, ``tyche.zoo``, ``tyche.__main__``)
may import anything; a method (each row of the registry, :mod:`tyche.methods`: ``tyche.basin``,
``tyche.causal``, ...) imports shared modules and itself only; a shared module
(``tyche.sites``, ``tyche.hooks``, ...) imports shared modules only. The method list comes from
the registry, so a new method's folder is checked as a method as soon as its row exists. The
graph is read from the source with ``ast`` (every ``import``, also those inside functions), so
lazy imports count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tyche
from tyche import methods
from tyche.methods import Method

ROOT = Path(tyche.__file__).parent
#: the packages (and modules) of ``tyche`` that are faces
FACES = ("cli", "zoo", "__main__")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


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


def _graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = _modules(root)
    known = set(modules)
    # a module's package __init__ runs first: `import tyche.a.b` imports tyche.a too, but
    # that is not an edge of b's own; only what b's source names counts
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(name: str) -> str:
    """``"root"`` (the package face, lazy re-exports only), ``"face"``, ``"method:<name>"``
    or ``"shared"``."""
    parts = name.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in methods.method_names():
        return f"method:{parts[1]}"
    if parts[1] in FACES:
        return "face"
    return "shared"


def _violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per import that runs up the house, naming the rule it breaks."""
    bad = []
    for name, targets in graph.items():
        layer = _layer(name)
        for target in sorted(targets):
            other = _layer(target)
            if layer == "shared" and other != "shared":
                bad.append(
                    f"shared module {name} imports {target} ({other}): a shared module "
                    "imports shared modules only (is it a method missing from "
                    "tyche/methods.py?)"
                )
            elif layer.startswith("method:") and other not in ("shared", layer):
                what = "a face" if other in ("face", "root") else f"another method ({other[7:]})"
                bad.append(
                    f"method module {name} imports {target}, {what}: a method imports shared "
                    "modules and itself only (move command-line code to tyche/cli/)"
                )
    return sorted(bad)


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
    bad = _violations(_graph())
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: a method importing the zoo lazily is caught."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from tyche.zoo.resolve import resolve_model\n")
    known = set(_modules())
    assert "tyche.zoo.resolve" in _imports("tyche.basin.m", path, known)
    assert _layer("tyche.basin.m") == "method:basin" and _layer("tyche.zoo.resolve") == "face"
    graph = {"tyche.basin.m": {"tyche.zoo.resolve"}, "tyche.zoo.resolve": set()}
    assert _violations(graph) == [
        "method module tyche.basin.m imports tyche.zoo.resolve, a face: a method imports "
        "shared modules and itself only (move command-line code to tyche/cli/)"
    ]


def _toy_house(root: Path) -> None:
    """A small ``tyche`` tree holding a fifth method, ``probe``, and its command."""
    files = {
        "__init__.py": "",
        "sites.py": "",
        "zoo/__init__.py": "",
        "probe/__init__.py": "",
        "probe/core.py": "from tyche.sites import *\n",
        "probe/peek.py": "def f():\n    from tyche.zoo import x\n",
        "cli/__init__.py": "",
        "cli/probe.py": "from tyche.probe.core import *\nfrom tyche.zoo import *\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_toy_fifth_method_is_found_in_help_and_in_the_layering(tmp_path, capsys) -> None:
    """Registering a method is all it takes: ``tyche --help`` lists it, and the layering
    checks its folder as a method (before its row exists, it counts as a shared module)."""
    from tyche.__main__ import main

    root = tmp_path / "tyche"
    _toy_house(root)
    graph = _graph(root)
    before = _violations(graph)
    assert any(line.startswith("shared module tyche.probe.peek") for line in before)
    toy = Method(name="probe", description="peek at a toy's insides", cli="tyche.cli.probe",
                 library="tyche.probe", question="what is inside?")  # fmt: skip
    methods.register(toy)
    try:
        main(["--help"])
        assert "  probe " in capsys.readouterr().out
        assert _violations(graph) == [
            "method module tyche.probe.peek imports tyche.zoo, a face: a method imports "
            "shared modules and itself only (move command-line code to tyche/cli/)"
        ]
    finally:
        methods.unregister("probe")
    main(["--help"])
    assert "  probe " not in capsys.readouterr().out


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


def _lazy_and_typed_names(path: Path) -> tuple[set[str], set[str]]:
    """The names a package face exports lazily, and those it imports under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    lazy: set[str] = set()
    typed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and node.values and all(
            isinstance(v, ast.Constant) and str(v.value).startswith("tyche") for v in node.values
        ):
            lazy |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    typed |= {a.asname or a.name for a in sub.names}
    return lazy, typed


def test_every_lazy_name_is_visible_to_type_checkers() -> None:
    """A package face imports each lazy name under TYPE_CHECKING, so IDEs see its type."""
    faces = [ROOT / "__init__.py", *sorted(ROOT.glob("*/__init__.py"))]
    checked = 0
    for path in faces:
        lazy, typed = _lazy_and_typed_names(path)
        if lazy:
            checked += 1
            assert lazy == typed, f"{path}: lazy only {sorted(lazy - typed)}, typed only " \
                f"{sorted(typed - lazy)}"
    assert checked >= 5  # tyche and its four methods at least
