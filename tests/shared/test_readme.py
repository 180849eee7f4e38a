"""Every Python block of the README and of the docs pages (``docs/*.md``) runs as printed.

The blocks load "your" model from the paths their ``# setup`` lines name; this test puts a
tiny GPT-NeoX there (with its tokenizer, and an HF-Trainer-style ``optimizer.pt`` in
``checkpoint-500/``) and a small ``notes.txt``, then executes each block in a fresh namespace
in that folder. A block that needs something the test did not provide fails. Only blocks
fenced ``python`` run: a fragment that is not meant to run (a skeleton, a signature) is fenced
``py``, which GitHub and the site highlight alike.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from interop_support import require

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks(page: Path) -> list[str]:
    """The ```python blocks of ``page``, in order."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


BLOCKS = _python_blocks(README)
#: (page name relative to the repository, block index, code) for every page
ALL_BLOCKS = [(str(page.relative_to(ROOT)), i, code)
              for page in PAGES for i, code in enumerate(_python_blocks(page))]  # fmt: skip


#: pages whose blocks need an optional extra: they skip without it (fail in CI, which has it)
REQUIRES = {"docs/interop.md": ("transformer_lens", "nnsight", "sae_lens", "sparsify")}


def _trainer_style_checkpoint(folder: Path) -> None:
    """A tiny NeoX after 3 AdamW steps, saved with an optimizer.pt grouped as the HF Trainer
    groups it (weight-decay parameters, then biases and norm weights)."""
    from conftest import build_neox, make_tiny_tokenizer

    model = build_neox()
    params = dict(model.named_parameters())
    no_decay = [n for n in params if "bias" in n or "norm" in n]
    decay = [n for n in params if n not in no_decay]
    groups = [{"params": [params[n] for n in decay], "weight_decay": 0.1},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups)
    ids = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    torch.save(opt.state_dict(), folder / "optimizer.pt")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from conftest import build_neox, make_tiny_tokenizer, tiny_text_list

    root = tmp_path_factory.mktemp("readme")
    build_neox().save_pretrained(root / "runs" / "my-lm")
    make_tiny_tokenizer().save_pretrained(root / "runs" / "my-lm")
    _trainer_style_checkpoint(root / "runs" / "my-lm" / "checkpoint-500")
    (root / "notes.txt").write_text("\n\n".join(tiny_text_list()[:12]))
    return root


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize(("page", "index", "code"), ALL_BLOCKS,
                         ids=[f"{page}:block{i}" for page, i, _ in ALL_BLOCKS])  # fmt: skip
def test_readme_block_runs_as_printed(page: str, index: int, code: str, workdir: Path,
                                      monkeypatch) -> None:  # fmt: skip
    for module in REQUIRES.get(page, ()):
        require(module)
    monkeypatch.chdir(workdir)
    warnings.simplefilter("ignore")  # ESS warnings are part of the results, not of this test
    exec(compile(code, f"{page} python block {index}", "exec"), {"__name__": "__readme__"})


def test_the_docs_pages_have_python_blocks() -> None:
    """Each method page shows its Python API in blocks that run."""
    pages = {page for page, _, _ in ALL_BLOCKS}
    for method in ("basin", "causal", "codebook", "interaction"):
        assert f"docs/{method}.md" in pages, f"docs/{method}.md has no ```python block"


def test_the_readme_names_every_registered_method() -> None:
    """The front page's method table has a row for each method of the registry."""
    from tyche.methods import METHODS

    table = [line for line in README.read_text().splitlines() if line.startswith("| ")]
    missing = [m.name for m in METHODS if not any(f"`tyche {m.name}`" in row for row in table)]
    assert not missing, f"README's method table lacks {missing}"


def test_the_readme_is_a_front_page() -> None:
    """At most 150 lines; it names the four seed papers by arXiv id, shows a checked-in figure
    and points to a CITATION.cff that exists."""
    text = README.read_text()
    assert len(text.splitlines()) <= 150, f"README.md has {len(text.splitlines())} lines"
    for arxiv in ("2501.18812", "2303.08112", "2310.17230", "2405.10928"):
        assert f"arXiv:{arxiv}" in text, f"README.md does not cite arXiv:{arxiv}"
    assert "CITATION.cff" in text and (ROOT / "CITATION.cff").is_file()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert figures, "README.md shows no figure"
    missing = [f for f in figures if not (ROOT / f).is_file()]
    assert not missing, f"README.md shows figures that are not checked in: {missing}"
