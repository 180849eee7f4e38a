"""An interrupted ``build_interaction_graph`` keeps its finished sections and a resumed build
computes only the rest, giving the graph an uninterrupted build gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_interaction_graph import TinyMLP, mlp_data

import tyche.interaction.graph as graph_module
from tyche.interaction import GraphOptions, InteractionGraph, build_interaction_graph
from tyche.interaction.checkpoint import SavedSection

#: four node layers, three sections (built in the order 2, 1, 0)
LAYERS = ["layers.0:input", "layers.1:input", "layers.2:input", "output"]


class Counter:
    """Wraps a per-section function of the builder: counts its calls and raises
    ``KeyboardInterrupt`` (as Ctrl-C does) on call number ``stop``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, stop: int | None = None):
        self.calls, self.stop, self.inner = 0, stop, getattr(graph_module, name)
        monkeypatch.setattr(graph_module, name, self)

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.inner(*args, **kwargs)

    def reset(self, stop: int | None = None) -> None:
        self.calls, self.stop = 0, stop


def _build(folder: Path | None = None, resume: bool = False, bases: InteractionGraph | None = None,
           **options) -> InteractionGraph:  # noqa: ANN003  # fmt: skip
    model, x = TinyMLP(), mlp_data()
    return build_interaction_graph(model, x, LAYERS, GraphOptions(**options), bases=bases,
                                   checkpoint=folder, resume=resume, progress=False)  # fmt: skip


def _interrupted(folder: Path, **kwargs) -> None:  # noqa: ANN003
    with pytest.raises(KeyboardInterrupt):
        _build(folder, **kwargs)


def _saved(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_same_graph(a: InteractionGraph, b: InteractionGraph) -> None:
    # same path: both graphs from the same computations on the same inputs, bit for bit
    assert len(a.edges) == len(b.edges)
    for x, y in zip(a.edges, b.edges):
        assert torch.equal(x, y)
    for x, y in zip(a.bases, b.bases):
        for name in ("C", "C_pinv", "Lambda"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or torch.equal(u, v), (x.node_layer, name)


@pytest.fixture(scope="module")
def whole() -> InteractionGraph:
    """The uninterrupted build (jacobian basis, squared edges from the kept gradients)."""
    return _build()


@pytest.mark.parametrize("stop", [2, 3])
def test_an_interrupted_build_resumes_from_its_finished_sections(
    stop, whole, tmp_path, monkeypatch, capsys
) -> None:
    folder = tmp_path / "sections"
    moments = Counter(monkeypatch, "lib_moments", stop=stop)
    _interrupted(folder)
    # sections finish from the last backwards: before call `stop` sections 2 (.. 1) finished
    finished = list(range(3 - (stop - 1), 3))
    assert _saved(folder) == [f"section-{i}" for i in finished]
    for i in finished:
        section = SavedSection.load(folder / f"section-{i}")
        assert section.node_layer == LAYERS[i] and section.edges is not None
    moments.reset()
    resumed = build_interaction_graph(TinyMLP(), mlp_data(), LAYERS, checkpoint=folder,
                                      resume=True)  # fmt: skip
    assert moments.calls == 3 - len(finished)  # the finished sections were not recomputed
    assert f"resuming from the finished sections {finished[0]} (" in capsys.readouterr().out
    assert_same_graph(resumed, whole)
    assert _saved(folder) == ["section-0", "section-1", "section-2"]
    moments.reset()
    assert_same_graph(_build(folder, resume=True), whole)  # everything saved: nothing computed
    assert moments.calls == 0


def test_a_section_stopped_in_its_edges_is_computed_again(tmp_path, monkeypatch) -> None:
    """A section is finished when its basis and its edges are both saved."""
    kw = {"edges": "functional"}
    whole = _build(**kw)
    folder = tmp_path / "sections"
    moments = Counter(monkeypatch, "lib_moments")
    edges = Counter(monkeypatch, "section_edges", stop=2)  # in section 1's edges
    _interrupted(folder, **kw)
    assert _saved(folder) == ["section-2"] and moments.calls == 2
    moments.reset(), edges.reset()
    assert_same_graph(_build(folder, resume=True, **kw), whole)
    assert (moments.calls, edges.calls) == (2, 2)  # sections 1 and 0, basis and edges


def test_bases_only_sections_get_the_edges_asked_for(whole, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "sections"
    moments = Counter(monkeypatch, "lib_moments", stop=3)
    edges = Counter(monkeypatch, "section_edges")
    _interrupted(folder, edges=None)
    assert _saved(folder) == ["section-1", "section-2"]
    assert SavedSection.load(folder / "section-2").edges is None
    moments.reset()
    resumed = _build(folder, resume=True)
    # bases 2 and 1 loaded; their edges by one more pass each, section 0's from the kept
    # gradients of its basis
    assert (moments.calls, edges.calls) == (1, 2)
    assert_same_graph(resumed.without_edges(), whole.without_edges())
    for i, (a, b) in enumerate(zip(whole.edges, resumed.edges)):
        if i == 0:
            assert torch.equal(a, b)  # same path: both from section 0's kept gradients
        else:
            # kept and recomputed gradients: the same sums, products grouped differently
            # (the tolerance of test_edges_from_kept_gradients_equal_edges_computed_again)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14 * a.abs().max())
    # the edges computed on resume are saved with their sections
    assert SavedSection.load(folder / "section-2").edges is not None


def test_resume_refuses_other_settings_and_other_models(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "sections"
    Counter(monkeypatch, "lib_moments", stop=2)
    _interrupted(folder)
    with pytest.raises(ValueError, match=r"truncation_threshold: saved 1e-14 vs now 1e-10"):
        _build(folder, resume=True, truncation_threshold=1e-10)
    with pytest.raises(ValueError, match=r"seed: saved 0 vs now 4"):
        _build(folder, resume=True, seed=4)
    # other data with as many rows: told apart by the inputs' digest, not only their count
    with pytest.raises(ValueError, match=r"inputs: saved '[0-9a-f]{16}' vs now '[0-9a-f]{16}'"):
        build_interaction_graph(TinyMLP(), mlp_data(seed=2), LAYERS, checkpoint=folder,
                                resume=True, progress=False)  # fmt: skip
    other = TinyMLP(seed=3)
    with pytest.raises(ValueError, match=r"sections in .* belong to another model"):
        build_interaction_graph(other, mlp_data(), LAYERS, checkpoint=folder, resume=True,
                                progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"already holds sections of an earlier build: resume"):
        _build(folder)
    with pytest.raises(ValueError, match=r"resume=True needs the checkpoint folder"):
        _build(None, resume=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55  # a tensor byte: the file still loads, its digest no longer matches
    path.write_bytes(bytes(data))


def _bad_json(path: Path) -> None:
    path.write_text(path.read_text()[:-20])


@pytest.mark.parametrize(
    "spoil,file",
    [(_truncate, "tensors.safetensors"), (_flip_last_byte, "tensors.safetensors"),
     (_bad_json, "meta.json")],
    ids=["truncated", "flipped", "bad-json"],
)  # fmt: skip
def test_a_spoilt_section_is_not_trusted(spoil, file, whole, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "sections"
    _build(folder)  # every section saved
    spoil(folder / "section-1" / file)
    (folder / ".section-0.tmp").mkdir()  # a write killed half-way: never read
    moments = Counter(monkeypatch, "lib_moments")
    with pytest.warns(UserWarning, match=r"section-1 is not trusted .* computing that section"):
        resumed = _build(folder, resume=True)
    assert moments.calls == 2  # section 2 loaded; 1 (spoilt) and 0 (depends on 1) computed
    assert_same_graph(resumed, whole)
    assert _saved(folder) == ["section-0", "section-1", "section-2"]
    SavedSection.load(folder / "section-1")  # rewritten whole


def test_resume_with_given_bases(tmp_path, monkeypatch) -> None:
    """The edges stage resumed from saved bases (``bases=``) reuses the finished edges."""
    bases = _build(edges=None)
    kw = {"bases": bases, "edges": "functional"}
    whole = _build(**kw)
    folder = tmp_path / "sections"
    edges = Counter(monkeypatch, "section_edges", stop=3)
    _interrupted(folder, **kw)
    edges.reset()
    assert_same_graph(_build(folder, resume=True, **kw), whole)
    assert edges.calls == 1
    other = _build(edges=None, truncation_threshold=1e-3)
    with pytest.raises(ValueError, match=r"built on other bases than the given ones"):
        _build(folder, resume=True, bases=other, edges="functional")
