"""The tutorial runner (docs/build_tutorials.py) on tiny synthetic tutorials.

The real tutorials are not run here (minutes of training); ``make docs`` runs them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "docs" / "build_tutorials.py"

GOOD = """\
# %% [markdown]
# # A tiny tutorial
#
# Some *prose* before the code.

# %%
import sys
value = 6 * 7
print("the answer is", value)
print("progress " + "bar", file=sys.stderr)

# %% [markdown]
# Now a figure, drawn from the same namespace:

# %%
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.plot([0, value])
fig.savefig("answer.png")
plt.close(fig)

# %%
print(value + 1)
"""

BAD = """\
# %% [markdown]
# # Broken

# %%
x = 1

# %%
raise RuntimeError("this cell fails")

# %%
print("never reached")
"""


def _load_runner():
    spec = importlib.util.spec_from_file_location("build_tutorials", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _build(tmp_path: Path, **scripts: str) -> subprocess.CompletedProcess:
    folder = tmp_path / "tutorials"
    folder.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (folder / f"{name}.py").write_text(text, encoding="utf-8")
    cmd = [sys.executable, str(RUNNER), "--tutorials", str(folder), "--out", str(tmp_path / "out")]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)


def test_parse_cells_kinds_lines_and_markdown_text():
    runner = _load_runner()
    cells = runner.parse_cells(GOOD)
    assert [c.kind for c in cells] == ["markdown", "code", "markdown", "code", "code"]
    assert [c.number for c in cells] == [1, 2, 3, 4, 5]
    assert cells[0].source == "# A tiny tutorial\n\nSome *prose* before the code."
    assert cells[1].line == 7  # the line after the first "# %%" marker
    assert runner.page_title(cells, "good") == "A tiny tutorial"


def test_first_cell_without_title_is_refused():
    runner = _load_runner()
    with pytest.raises(ValueError, match="Title"):
        runner.page_title(runner.parse_cells("# %%\nx = 1\n"), "untitled")


def test_page_has_markdown_output_and_image_after_its_cell(tmp_path):
    proc = _build(tmp_path, good=GOOD)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "out" / "good.md").read_text(encoding="utf-8")
    assert page.startswith("# A tiny tutorial\n\nSome *prose* before the code.\n")
    assert "```python\nimport sys\nvalue = 6 * 7\n" in page
    assert "```text\nthe answer is 42\n```" in page
    assert "progress bar" not in page  # stderr is dropped
    assert (tmp_path / "out" / "good" / "answer.png").stat().st_size > 0
    image = page.index("![answer](good/answer.png)")
    figure_cell = page.index('fig.savefig("answer.png")')
    next_cell = page.index("print(value + 1)")
    assert figure_cell < image < next_cell  # right after the cell that wrote it
    assert page.count("![") == 1
    assert "```text\n43\n```" in page  # the namespace carries over between cells
    assert "s of wall time" in page.rsplit("---", 1)[1]


def test_rebuild_empties_the_output_folder(tmp_path):
    assert _build(tmp_path, good=GOOD).returncode == 0
    stale = tmp_path / "out" / "good" / "stale.png"
    stale.write_bytes(b"not a figure")
    assert _build(tmp_path, good=GOOD).returncode == 0
    assert not stale.exists()
    page = (tmp_path / "out" / "good.md").read_text(encoding="utf-8")
    assert "stale" not in page and page.count("![answer](good/answer.png)") == 1


def test_raising_cell_fails_the_build_naming_tutorial_and_cell(tmp_path):
    proc = _build(tmp_path, bad=BAD, good=GOOD)
    assert proc.returncode == 1
    assert "tutorial bad" in proc.stderr and "cell 3 (line 8)" in proc.stderr
    assert "RuntimeError: this cell fails" in proc.stderr
    assert 'bad.py", line 8' in proc.stderr  # the traceback points into the tutorial file
    assert not (tmp_path / "out" / "bad.md").exists()
    assert (tmp_path / "out" / "good.md").exists()  # the other tutorials still build
    assert "failed: bad" in proc.stdout


def test_only_builds_the_named_tutorial_and_refuses_unknown_names(tmp_path):
    folder = tmp_path / "tutorials"
    folder.mkdir()
    (folder / "good.py").write_text(GOOD, encoding="utf-8")
    (folder / "bad.py").write_text(BAD, encoding="utf-8")
    base = [sys.executable, str(RUNNER), "--tutorials", str(folder), "--out", str(tmp_path / "o")]
    ok = subprocess.run([*base, "--only", "good"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["good", "good.md"]
    unknown = subprocess.run([*base, "--only", "nope"], capture_output=True, text=True, check=False)
    assert unknown.returncode != 0 and "no such tutorial" in unknown.stderr


def test_tutorials_are_isolated_from_each_other(tmp_path):
    first = "# %% [markdown]\n# # First\n\n# %%\nimport json\nLEAK = 1\n"
    second = (
        "# %% [markdown]\n# # Second\n\n# %%\nprint('LEAK' in globals(), 'json' in globals())\n"
    )
    proc = _build(tmp_path, a_first=first, b_second=second)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "out" / "b_second.md").read_text(encoding="utf-8")
    assert "```text\nFalse False\n```" in page


def test_header_of_comments_is_neither_run_nor_shown(tmp_path):
    runner = _load_runner()
    text = "# ruff: noqa: E402\n\n" + GOOD
    cells = runner.parse_cells(text)
    assert cells[0].kind == "markdown" and cells[0].line == 4  # the header is dropped
    assert runner.page_title(cells, "good") == "A tiny tutorial"
    # a preamble with code is a cell of its own, so the title check refuses it
    with pytest.raises(ValueError, match="Title"):
        runner.page_title(runner.parse_cells("import os\n" + GOOD), "good")


def test_carriage_returns_keep_the_last_segment():
    runner = _load_runner()
    assert runner.clean_output("10%\r50%\r100% done  \nnext\n\n") == "100% done\nnext"
