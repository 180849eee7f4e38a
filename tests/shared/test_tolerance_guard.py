"""Every float comparison in tests/ states its tolerance and why (an AST check, no torch).

A call of ``pytest.approx``, ``torch.allclose`` / ``isclose`` (and the tensor methods),
``torch.testing.assert_close``, ``numpy.allclose`` / ``isclose``,
``numpy.testing.assert_allclose`` or ``math.isclose`` must either

* pass an explicit tolerance (``rel``/``abs``, ``rtol``/``atol``, ``rel_tol``/``abs_tol``, or
  positionally) and carry a comment giving the reason, on one of the call's lines or in the
  comment lines directly above it or above its statement; or
* pass no tolerance and carry a comment containing ``same path`` in those places, saying that
  both sides come from the same code path on the same inputs (so the default, near-exact
  tolerance is a claim of bit-identity that holds on every CPU and thread count).

A default tolerance between two different computations (batch shapes, thread counts, dtypes,
kernels) holds on one CPU and breaks on the next; this guard keeps that class of defect out.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

#: comparison functions and the number of positional arguments before the tolerances
COMPARISONS = {"approx": 1, "allclose": 2, "isclose": 2, "assert_close": 2, "assert_allclose": 2}
#: module spellings under which the comparisons are called as functions (else: a tensor method)
MODULES = {"pytest", "torch", "np", "numpy", "math", "testing", "torch.testing", "np.testing"}
MODULES |= {"numpy.testing"}
TOLERANCE_KEYWORDS = {"rel", "abs", "rtol", "atol", "rel_tol", "abs_tol"}
#: statements whose header's comment also speaks for the first statement of their body
BLOCKS = (ast.For, ast.While, ast.If, ast.With)


@dataclass(frozen=True)
class Finding:
    """One comparison that breaks the rule: where, and what is missing."""

    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _comparison(call: ast.Call) -> tuple[str, int] | None:
    """(name, positional arguments before the tolerances) if ``call`` is a comparison."""
    func = call.func
    if isinstance(func, ast.Name) and func.id in COMPARISONS:
        return func.id, COMPARISONS[func.id]
    if isinstance(func, ast.Attribute) and func.attr in COMPARISONS:
        if _dotted(func.value) in MODULES:
            return func.attr, COMPARISONS[func.attr]
        if func.attr in ("allclose", "isclose"):  # tensor.allclose(other, rtol, atol)
            return func.attr, 1
    return None


def _has_tolerance(call: ast.Call, n_required: int) -> bool:
    """Whether the call passes a tolerance by keyword, positionally or through ``**kwargs``."""
    if len(call.args) > n_required or any(isinstance(a, ast.Starred) for a in call.args):
        return True
    return any(k.arg is None or k.arg in TOLERANCE_KEYWORDS for k in call.keywords)


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    found: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string
    return found


def _block_above(line: int, comments: dict[int, str], lines: list[str]) -> list[str]:
    """The comment-only lines directly above ``line`` (1-based), nearest last."""
    block: list[str] = []
    i = line - 1
    while i >= 1 and i in comments and lines[i - 1].lstrip().startswith("#"):
        block.insert(0, comments[i])
        i -= 1
    return block


def _statements(tree: ast.AST) -> dict[ast.AST, list[ast.stmt]]:
    """Every node -> the statement that contains it, then each enclosing statement whose body
    that one opens (a comment above ``for ...:`` speaks for the loop's first statement)."""
    owner: dict[ast.AST, list[ast.stmt]] = {}

    def visit(node: ast.AST, chain: list[ast.stmt]) -> None:
        if isinstance(node, ast.stmt):
            outer = chain[0] if chain else None
            opens = isinstance(outer, BLOCKS) and outer.body[0] is node
            chain = [node, *chain] if opens else [node]
        if chain:
            owner[node] = chain
        for child in ast.iter_child_nodes(node):
            visit(child, chain)

    visit(tree, [])
    return owner


def check_source(source: str, path: str) -> list[Finding]:
    """The comparisons in one file's ``source`` that break the rule."""
    tree = ast.parse(source)
    comments = _comments(source)
    lines = source.splitlines()
    owner = _statements(tree)
    findings = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or (kind := _comparison(node)) is None:
            continue
        name, n_required = kind
        end = node.end_lineno or node.lineno
        near = [comments[i] for i in range(node.lineno, end + 1) if i in comments]
        near += _block_above(node.lineno, comments, lines)
        for stmt in owner.get(node, []):
            near += _block_above(stmt.lineno, comments, lines)
        if _has_tolerance(node, n_required):
            if not near:
                findings.append(Finding(path, node.lineno, f"{name}: tolerance without a reason"))
        elif not any("same path" in c for c in near):
            problem = f"{name}: default tolerance without a 'same path' comment"
            findings.append(Finding(path, node.lineno, problem))
    return sorted(findings, key=lambda f: f.line)


def check_tree(folder: Path = TESTS) -> list[Finding]:
    """The findings over every ``*.py`` file in ``folder`` and its sub-folders."""
    findings = []
    for file in sorted(folder.rglob("*.py")):
        findings += check_source(file.read_text(encoding="utf-8"), str(file.relative_to(folder)))
    return findings


def test_every_comparison_in_tests_states_its_tolerance_and_reason() -> None:
    findings = check_tree()
    assert not findings, "\n".join(
        ["each comparison needs rel=/abs= (rtol=/atol=) and a reason comment, or a comment"]
        + ["saying 'same path' (both sides from one code path on the same inputs):"]
        + [str(f) for f in findings]
    )


BARE = """\
import pytest, torch

def test_x(a, b):
    assert a == pytest.approx(b)
"""


def test_guard_flags_a_bare_comparison_at_its_line() -> None:
    assert [str(f) for f in check_source(BARE, "t.py")] == [
        "t.py:4: approx: default tolerance without a 'same path' comment"
    ]


def test_guard_accepts_a_same_path_comment_on_the_line_or_above() -> None:
    on_line = BARE.replace("(b)\n", "(b)  # same path: both from one call\n")
    above = BARE.replace("    assert", "    # same path: one forward pass each\n    assert")
    assert check_source(on_line, "t.py") == check_source(above, "t.py") == []


def test_guard_wants_a_reason_beside_an_explicit_tolerance() -> None:
    source = """\
import torch

def test_x(a, b):
    assert torch.allclose(a, b, atol=1e-6)
    assert a.isclose(b, 1e-3).all()
    # float32 eps x 64 terms
    torch.testing.assert_close(
        a,
        b,
        rtol=1e-5,
        atol=1e-6,
    )
    assert torch.allclose(a, b)  # a comment without the words is not enough
"""
    assert [str(f) for f in check_source(source, "t.py")] == [
        "t.py:4: allclose: tolerance without a reason",
        "t.py:5: isclose: tolerance without a reason",
        "t.py:13: allclose: default tolerance without a 'same path' comment",
    ]


def test_guard_takes_a_comment_above_the_loop_the_comparison_opens() -> None:
    source = """\
import torch

def test_x(pairs):
    # float64 sums of 300 terms: 1e-12
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for a, b in pairs:
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
"""
    assert [f.line for f in check_source(source, "t.py")] == [9]


def test_guard_does_not_take_a_comment_two_lines_up() -> None:
    source = """\
import math

def test_x(a, b):
    # same path: one call
    x = 1

    assert math.isclose(a, b)
"""
    assert [f.line for f in check_source(source, "t.py")] == [7]
