"""Caches, regex search (precision, recall, neuron baseline) and contexts, against loops."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from tyche.codebook.cache import build_cache, load_cache
from tyche.codebook.code_search import _best_neuron, code_contexts, match_positions, search
from tyche.codebook.model import attach


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer, tiny_texts):
    from codebook_helpers import tiny_cb_model

    model = tiny_cb_model()
    rows = tiny_tokenizer(" ".join(tiny_texts), return_tensors="pt")["input_ids"][0]
    rows = rows[: (rows.numel() // 16) * 16].view(-1, 16)
    folder = tmp_path_factory.mktemp("cache")
    cache = build_cache(
        model,
        rows,
        folder,
        tokenizer=tiny_tokenizer,
        batch_size=3,
        provenance={"model_name": "tiny", "data_name": "tiny_texts"},
        progress=False,
    )
    return model, rows, cache


def test_cache_layout_and_round_trip(built) -> None:
    model, rows, cache = built
    assert cache.sites == model.sites
    assert cache.codes["attn_heads.0"].shape == (rows.shape[0], 16, 4, 2)
    assert cache.codes["mlp_out.1"].shape == (rows.shape[0], 16, 1, 2)
    assert cache.codes["mlp_out.1"].dtype == torch.int32
    model(input_ids=rows[:2])  # the cached ids are the model's ids
    # exact: integer ids, top-k of scores from batches of 3 and of 2 rows; they could differ
    # only where two codes tie within float32 rounding (negligible for random codes)
    assert torch.equal(
        cache.codes["mlp_out.1"][:2, :, 0].long(), model.codebook("mlp_out.1").last_ids
    )
    files = {p.name for p in cache.folder.iterdir()}
    assert {
        "manifest.json",
        "codes.safetensors",
        "tokens.safetensors",
        "texts.json",
        "neurons.safetensors",
        "model",
    } <= files
    assert not any(p.suffix in (".pkl", ".pickle", ".pt") for p in cache.folder.rglob("*"))
    again = load_cache(cache.folder)
    assert again.texts == cache.texts and torch.equal(again.offsets, cache.offsets)
    for r in range(rows.shape[0]):  # token t of row r is its text slice
        for t in range(16):
            assert again.token_text(r, t) == built[2].token_text(r, t)
    assert json.loads((cache.folder / "manifest.json").read_text())["model_name"] == "tiny"
    # a word-level tokenizer: the pieces keep the spaces its decoder puts between words
    assert cache.texts[0] == built[2].texts[0] and " " in cache.texts[0]
    from tyche.codebook.cache import token_pieces

    pieces = token_pieces(None, rows[:1, :3])
    assert pieces == [[f"<{int(t)}>" for t in rows[0, :3]]]
    assert cache.neurons["mlp_out.0"].shape == (rows.shape[0], 16, 64)


def test_cache_of_another_model_is_refused(built) -> None:
    model, _, cache = built
    cache.check_model(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.codebook("mlp_out.0").codebook[0, 0] += 1
    with pytest.raises(ValueError, match="built with another model"):
        cache.check_model(other)
    assert cache.load_model().fingerprint() == model.fingerprint()


def _brute_matches(cache, pattern: str) -> set[tuple[int, int]]:
    out = set()
    regex = re.compile(pattern)
    for r, text in enumerate(cache.texts):
        for m in regex.finditer(text):
            start = m.start(1) if regex.groups else m.start()
            for t in range(cache.seq_len):  # the token whose span holds the character
                if cache.offsets[r, t] <= start < cache.offsets[r, t + 1]:
                    out.add((r, t))
    return out


@pytest.mark.parametrize("pattern", [r"king", r"the(king|queen)", r"o"])
def test_match_positions_against_a_loop(built, pattern: str) -> None:
    cache = built[2]
    got = {tuple(p) for p in match_positions(cache, pattern).tolist()}
    assert got == _brute_matches(cache, pattern)


def test_window_takes_the_tokens_after_each_match(built) -> None:
    cache = built[2]
    matched = _brute_matches(cache, r"king")
    assert matched
    after = {(r, t + s) for r, t in matched for s in (1, 2, 3) if t + s < cache.seq_len}
    got = {tuple(p) for p in match_positions(cache, r"king", window=3).tolist()}
    assert got == after
    odd = {tuple(p) for p in match_positions(cache, r"king", window=3, parity="odd").tolist()}
    assert odd == {(r, t) for r, t in after if t % 2 == 1}
    with pytest.raises(ValueError, match="window"):
        match_positions(cache, r"king", window=-1)


def test_search_precision_recall_against_a_loop(built) -> None:
    cache = built[2]
    pattern = r"(the|a)"
    result = search(cache, pattern, min_recall=0.0, top=None)
    matched = _brute_matches(cache, pattern)
    assert result.n_positions == len(matched)
    assert result.matches, "some code fires on common words"
    for row in result.matches[:10]:
        ids = cache.codes[row["site"]][:, :, row["head"] or 0]  # (n, T, k)
        fires = {(r, t) for r, t in torch.nonzero((ids == row["code"]).any(-1)).tolist()}
        hits = len(fires & matched)
        # one correctly rounded float64 division of the same integer counts either side (equal
        # bit for bit, measured 0); rel 1e-12 still sees any count off by one
        assert row["recall"] == pytest.approx(hits / len(matched), rel=1e-12)
        assert row["precision"] == pytest.approx(hits / len(fires), rel=1e-12)  # as above
    precisions = [r["precision"] for r in result.matches]
    assert precisions == sorted(precisions, reverse=True)
    assert result.frac_beating_neurons is not None


def test_best_neuron_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(200, 5, generator=g)
    matched = torch.zeros(200, dtype=torch.bool)
    matched[:40] = True
    acts[:40, 2] += 2.0  # neuron 2 prefers matched positions; neuron 4 avoids them
    acts[:40, 4] -= 3.0
    recall = 0.5
    best, j = _best_neuron(acts, matched, recall)
    brute = []
    for sign in (1, -1):
        for d in range(5):
            a = sign * acts[:, d]
            tau = a[matched].sort(descending=True).values[19]  # fires on 20 of 40 matched
            fires = a >= tau
            brute.append(((fires & matched).sum() / fires.sum()).item())
    # the loop divides long tensors (a float32 quotient, ≤ 6e-8 relative off) where the code
    # divides in float64 (measured 3e-9); rel 1e-6, while another neuron or threshold changes
    # the precision by ≥ 1/200
    assert best == pytest.approx(max(brute), rel=1e-6)
    assert j == -(4 + 1)  # the negated neuron 4 is the most precise


def test_contexts_and_errors(built) -> None:
    cache = built[2]
    top = search(cache, r"king", min_recall=0.0, top=1).matches[0]
    found = code_contexts(cache, top["site"], top["code"], head=top["head"], n=5, window=3)
    assert 0 < len(found) <= 5
    for ctx in found:
        assert cache.token_text(ctx.row, ctx.position) == ctx.token
        assert f"[[{ctx.token}]]" in ctx.render()
        assert "<mark>" in ctx.render("html")
    with pytest.raises(ValueError, match="out of range"):
        code_contexts(cache, "mlp_out.0", 10_000)
    with pytest.raises(ValueError, match="give head"):
        code_contexts(cache, "attn_heads.0", 1)
    with pytest.raises(ValueError, match="invalid regex"):
        search(cache, "(unclosed")
    with pytest.raises(ValueError, match="no codebooks at"):
        search(cache, "king", sites=["mlp_out.7"])
    with pytest.raises(FileNotFoundError, match="not a codebook cache"):
        load_cache(cache.folder / "model")


def test_search_result_saves(built, tmp_path) -> None:
    from tyche.codebook.code_search import SearchResult

    result = search(built[2], r"the", top=3)
    result.save(tmp_path / "r")
    again = SearchResult.load(tmp_path / "r")
    assert again.matches == result.matches and again.pattern == result.pattern
    assert "pattern" in result.table()


def test_build_cache_rejects_bad_input(built, tmp_path, gpt2_model) -> None:
    from tyche.codebook.model import CodebookModel

    with pytest.raises(ValueError, match="at least one codebook"):
        build_cache(
            CodebookModel(copy.deepcopy(gpt2_model)), torch.ones(1, 4, dtype=torch.long), tmp_path
        )
    with pytest.raises(ValueError, match="non-empty"):
        build_cache(
            attach(copy.deepcopy(gpt2_model), "mlp_out.0", num_codes=4),
            torch.ones(4, dtype=torch.long),
            tmp_path,
        )


def test_build_cache_records_its_provenance(built, tmp_path) -> None:
    model, rows, _ = built
    folder = tmp_path / "prov"
    cache = build_cache(model, rows[:2], folder, neurons=False, copy_model=False,
                        provenance={"data_name": "tiny_texts", "split": "train"},
                        progress=False)  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_name"] is None and manifest["data_name"] == "tiny_texts"
    assert manifest["extra"] == {"split": "train"} and cache.manifest == manifest
    plain = build_cache(model, rows[:2], tmp_path / "plain", neurons=False, copy_model=False,
                        progress=False).manifest  # fmt: skip
    assert (plain["model_name"], plain["data_name"], plain["extra"]) == (None, None, {})
    with pytest.raises(ValueError, match="provenance must be a mapping"):
        build_cache(model, rows[:2], tmp_path / "bad", provenance=["tiny"], progress=False)
