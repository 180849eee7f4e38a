"""Execute the literate tutorials of ``docs/tutorials/`` and render each as a Markdown page.

A tutorial is a Python script in cells: a line ``# %% [markdown]`` starts a markdown cell
(its comment lines ``# text`` are the text), a line ``# %%`` starts a code cell. Each
tutorial runs as a plain script too (``python docs/tutorials/basin.py``).

``python docs/build_tutorials.py [--only NAME ...] [--out docs/generated/tutorials]`` runs
each tutorial in a subprocess of its own (imports and state never leak from one to the next):
its code cells are executed in order in one fresh namespace, with the working directory set
to the tutorial's output folder ``OUT/<name>/`` (emptied first, so the build is idempotent),
and ``OUT/<name>.md`` is written: the markdown cells as text (the first one's ``# Title``
heading is the page title; a header of comments before it is skipped), every code cell as a
``python`` block followed by what it printed (a ``text`` block; stderr, progress bars
included, is dropped) and, right after the cell that wrote it, a link to every PNG the cell
wrote under the output folder. The page
ends with its wall time. An exception in a cell prints its traceback with the tutorial and
the cell's number and line, and the build exits with status 1 (after the other tutorials
have run). Standard library only, besides what the tutorials import.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

DOCS = Path(__file__).resolve().parent
TUTORIALS = DOCS / "tutorials"
OUT = DOCS / "generated" / "tutorials"
CELL_MARKER = re.compile(r"^# %%(?P<rest>.*)$")
#: the last characters of a failing cell's stderr shown with its traceback
STDERR_TAIL = 2000


@dataclass
class Cell:
    """One cell of a tutorial: ``kind`` "markdown" or "code", its 1-based ``number`` among
    all cells, ``line`` (1-based) of its first source line in the file, and its ``source``
    (for markdown: the text with the comment marks removed)."""

    kind: str
    number: int
    line: int
    source: str


@dataclass
class CellRun:
    """What executing one code cell gave: ``stdout`` text, ``images`` (PNG paths relative to
    the output folder, sorted), ``seconds`` of wall time, and ``error`` (a traceback) or None."""

    number: int
    stdout: str = ""
    images: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    stderr: str = ""


# ----------------------------------------------------------------------------- parsing
def parse_cells(text: str) -> list[Cell]:
    """Split a tutorial's source into cells (blank-only code cells are dropped).

    Lines before the first ``# %%`` marker form a code cell when they hold any code; a
    header of comments only (``# ruff: noqa: E402``, a licence) is neither run nor shown.
    """
    chunks: list[tuple[str, int, list[str]]] = []
    kind, start, lines = "code", 1, []
    for number, line in enumerate(text.splitlines(), 1):
        match = CELL_MARKER.match(line)
        if match:
            chunks.append((kind, start, lines))
            kind = "markdown" if "[markdown]" in match["rest"] else "code"
            start, lines = number + 1, []
        else:
            lines.append(line)
    chunks.append((kind, start, lines))
    cells: list[Cell] = []
    if all(not line.strip() or line.lstrip().startswith("#") for line in chunks[0][2]):
        chunks = chunks[1:]  # a header of comments only
    for kind, start, lines in chunks:
        if kind == "markdown":
            source = "\n".join(_uncomment(line) for line in lines).strip("\n")
        else:
            source = "\n".join(lines)
        if source.strip():
            cells.append(Cell(kind, len(cells) + 1, start, source))
    return cells


def _uncomment(line: str) -> str:
    """A markdown cell's line without its comment mark: ``# text`` -> ``text``."""
    stripped = line.strip()
    if not stripped:
        return ""
    if not stripped.startswith("#"):
        raise ValueError(f"a markdown cell line must be a comment ('# text'), got {line!r}")
    return stripped[2:] if stripped.startswith("# ") else stripped[1:]


def page_title(cells: list[Cell], name: str) -> str:
    """The ``# Title`` that opens the tutorial's first cell, which must be markdown."""
    if not cells or cells[0].kind != "markdown" or not cells[0].source.startswith("# "):
        raise ValueError(
            f"tutorial {name!r}: the first cell must be a markdown cell opening with a "
            "'# Title' line (in the file: '# %% [markdown]' then '# # Title')"
        )
    return cells[0].source.splitlines()[0][2:].strip()


# ----------------------------------------------------------------------------- executing
def _pngs(folder: Path) -> dict[str, tuple[int, int]]:
    """Every PNG under ``folder``: relative POSIX path -> (mtime in ns, size in bytes)."""
    found = {}
    for path in folder.rglob("*.png"):
        stat = path.stat()
        found[path.relative_to(folder).as_posix()] = (stat.st_mtime_ns, stat.st_size)
    return found


def execute(script: Path, workdir: Path) -> list[CellRun]:
    """Run the code cells of ``script`` in order in one namespace, in ``workdir``.

    Stops at the first cell that raises (its run carries the traceback, starting at the
    tutorial's own frame). Each cell's stdout is captured and its stderr dropped; the PNGs
    it created or rewrote under ``workdir`` are listed with it.
    """
    cells = [c for c in parse_cells(script.read_text(encoding="utf-8")) if c.kind == "code"]
    os.chdir(workdir)
    sys.path.insert(0, str(script.parent))  # as for `python script.py`
    namespace: dict = {"__name__": "__main__", "__file__": str(script)}
    runs: list[CellRun] = []
    for cell in cells:
        run = CellRun(cell.number)
        runs.append(run)
        before = _pngs(workdir)
        out, err = io.StringIO(), io.StringIO()
        # blank lines before the cell keep tracebacks' line numbers those of the file
        code = compile("\n" * (cell.line - 1) + cell.source, str(script), "exec")
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                exec(code, namespace)
        except BaseException as exc:  # noqa: BLE001 (SystemExit and KeyboardInterrupt too)
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
            run.error = "".join(traceback.format_exception(type(exc), exc, tb))
        run.seconds = time.perf_counter() - start
        run.stdout, run.stderr = out.getvalue(), err.getvalue()[-STDERR_TAIL:]
        after = _pngs(workdir)
        run.images = sorted(p for p, stamp in after.items() if before.get(p) != stamp)
        if run.error is not None:
            break
    return runs


def _worker(script: Path, workdir: Path, result: Path) -> int:
    """The subprocess's entry point: execute ``script`` and write its runs to ``result``."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    runs = execute(script, workdir)
    result.write_text(json.dumps([asdict(r) for r in runs]), encoding="utf-8")
    return 1 if runs and runs[-1].error is not None else 0


# ----------------------------------------------------------------------------- rendering
def _fence(text: str, lang: str) -> str:
    """``text`` in a fenced block longer than any run of backticks inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text}\n{ticks}"


def clean_output(text: str) -> str:
    """Printed text as a terminal shows it: each line's last carriage-return segment kept,
    trailing blanks dropped."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def render(
    name: str, cells: list[Cell], runs: list[CellRun], seconds: float, source: str = ""
) -> str:
    """The Markdown page of tutorial ``name`` from its cells and their runs; ``source`` is
    the script's path as the footer names it (default ``docs/tutorials/<name>.py``)."""
    source = source or f"docs/tutorials/{name}.py"
    by_number = {run.number: run for run in runs}
    parts: list[str] = []
    for cell in cells:
        if cell.kind == "markdown":
            parts.append(cell.source)
            continue
        parts.append(_fence(cell.source.strip("\n"), "python"))
        run = by_number[cell.number]
        printed = clean_output(run.stdout)
        if printed:
            parts.append(_fence(printed, "text"))
        for image in run.images:
            parts.append(f"![{Path(image).stem}]({name}/{image})")
    parts.append(
        f"---\n\n*This page was generated by `python docs/build_tutorials.py`, which executed "
        f"`{source}` cell by cell in {seconds:.1f} s of wall time "
        f"(Python {sys.version_info.major}.{sys.version_info.minor}, {os.cpu_count()} CPU "
        "cores).*"
    )
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- building
def build_one(script: Path, out: Path) -> tuple[bool, float]:
    """Execute ``script`` in a subprocess and write ``out/<name>.md``; (ok, seconds).

    On failure the traceback is printed on stderr, naming the tutorial and the cell, and no
    page is left for the tutorial.
    """
    name = script.stem
    cells = parse_cells(script.read_text(encoding="utf-8"))
    page_title(cells, name)  # checked before anything runs
    workdir, page = out / name, out / f"{name}.md"
    shutil.rmtree(workdir, ignore_errors=True)
    page.unlink(missing_ok=True)
    workdir.mkdir(parents=True)
    result = out / f".{name}.runs.json"
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(script.resolve()),
         str(workdir.resolve()), str(result.resolve())],
        env=env, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if not result.exists():
        print(f"tutorial {name}: the worker exited with status {proc.returncode} before "
              "reporting its cells", file=sys.stderr)  # fmt: skip
        return False, seconds
    runs = [CellRun(**r) for r in json.loads(result.read_text(encoding="utf-8"))]
    result.unlink()
    failed = next((r for r in runs if r.error is not None), None)
    sys.stdout.flush()
    if failed is not None or proc.returncode != 0:
        cell = next((c for c in cells if failed and c.number == failed.number), None)
        where = f"cell {cell.number} (line {cell.line})" if cell else "after its last cell"
        stderr = f"its stderr ended with:\n{failed.stderr}\n" if failed and failed.stderr else ""
        print(f"tutorial {name} ({script}): {where} raised:\n{stderr}"
              f"{failed.error if failed else ''}", file=sys.stderr)  # fmt: skip
        return False, seconds
    page.write_text(render(name, cells, runs, seconds, _shown(script)), encoding="utf-8")
    return True, seconds


def _shown(script: Path) -> str:
    """``script`` relative to the repository when inside it, else as an absolute path."""
    path = script.resolve()
    inside = path.is_relative_to(DOCS.parent)
    return path.relative_to(DOCS.parent).as_posix() if inside else str(path)


def _scripts(folder: Path, only: list[str] | None) -> list[Path]:
    found = {p.stem: p for p in sorted(folder.glob("*.py"))}
    if not found:
        raise SystemExit(f"build_tutorials: no tutorial (*.py) in {folder}")
    unknown = sorted(set(only or ()) - set(found))
    if unknown:
        raise SystemExit(
            f"build_tutorials: --only {', '.join(unknown)}: no such tutorial in {folder}; "
            f"the tutorials are {', '.join(found)}"
        )
    return [found[n] for n in only] if only else list(found.values())


def main(argv: list[str] | None = None) -> int:
    """Build the pages; 0 when every tutorial ran, 1 when any raised."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="tutorials to build (names)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument("--tutorials", type=Path, default=TUTORIALS,
                        help=f"folder of the tutorial scripts (default {TUTORIALS})")  # fmt: skip
    parser.add_argument("--worker", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(*args.worker)
    args.out.mkdir(parents=True, exist_ok=True)
    failed, total = [], 0.0
    for script in _scripts(args.tutorials, args.only):
        ok, seconds = build_one(script, args.out)
        total += seconds
        status = "ok" if ok else "FAILED"
        print(f"tutorial {script.stem}: {status} in {seconds:.1f} s -> {args.out}/{script.stem}.md",
              flush=True)  # fmt: skip
        if not ok:
            failed.append(script.stem)
    print(f"tutorials: {total:.1f} s in all" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
