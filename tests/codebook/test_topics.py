"""Topic codes (recall, precision, log odds ratio over documents) and topic forcing."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tyche.codebook.cache import CodeCache, build_cache, load_cache
from tyche.codebook.interventions import Intervention, intervene
from tyche.codebook.steering import word_regex
from tyche.codebook.topics import TopicResult, document_mask, topic_codes, topic_interventions
from tyche.errors import InputError

N_ROWS, T, N_CODES = 6, 5, 8
DOC = [1, 2]  # the document of the synthetic cache: rows 1 and 2


def _cache(codes: dict[str, torch.Tensor], texts: list[str] | None = None) -> CodeCache:
    """A CodeCache in memory from per-site ids ``(n, T, G, k)`` (no folder, no model)."""
    n, t = next(iter(codes.values())).shape[:2]
    texts = texts or [f"row {i}" for i in range(n)]
    manifest = {
        "sites": list(codes),
        "codebooks": {
            s: {"n_groups": c.shape[2], "num_codes": N_CODES, "k": c.shape[3], "dim": 4}
            for s, c in codes.items()
        },
        "model_fingerprint": "synthetic",
        "neurons": False,
    }
    offsets = torch.zeros(n, t + 1, dtype=torch.long)
    return CodeCache(Path("."), manifest, torch.zeros(n, t, dtype=torch.long), offsets, texts,
                     {s: c.to(torch.int32) for s, c in codes.items()})  # fmt: skip


@pytest.fixture()
def planted() -> CodeCache:
    """Head 1 of attn_heads.0 (k = 2): code 3 fires exactly on the document's tokens (slot 0),
    code 0 everywhere (slot 1), code 5 on 3 of the document's 10 tokens and 1 token outside
    (slot 0); the other slot-0 codes are 6 and 7. Head 0 and mlp_out.0 hold codes 1, 2."""
    ids = torch.zeros(N_ROWS, T, 2, 2, dtype=torch.long)
    ids[:, :, 0, 0], ids[:, :, 0, 1] = 1, 2
    ids[:, :, 1, 0] = torch.tensor([6, 7]).repeat(N_ROWS * T // 2).view(N_ROWS, T)
    ids[DOC, :, 1, 0] = 3
    ids[1, :3, 1, 0] = 5  # 3 document tokens get code 5 instead of 3
    ids[4, 0, 1, 0] = 5  # and one token outside
    ids[:, :, 1, 1] = 0
    mlp = ids[:, :, :1].clone()
    return _cache({"attn_heads.0": ids, "mlp_out.0": mlp})


def _row(result: TopicResult, site: str, head: int | None, code: int) -> dict:
    found = [r for r in result.codes if (r["site"], r["head"], r["code"]) == (site, head, code)]
    assert len(found) == 1, (site, head, code, result.codes)
    return found[0]


def test_the_planted_topic_code_ranks_first_and_the_everywhere_code_below(planted) -> None:
    result = topic_codes(planted, DOC, min_recall=0.0, min_precision=0.0, top=None)
    assert (result.n_tokens_in, result.n_tokens_out, result.document_rows) == (10, 20, DOC)
    first = result.codes[0]
    assert (first["site"], first["head"], first["code"]) == ("attn_heads.0", 1, 3)
    # 7 of the 10 document tokens (3 took code 5), none outside
    assert (first["recall"], first["precision"], first["n_acts_in"], first["n_acts_out"]) == (
        0.7, 1.0, 7, 0)  # fmt: skip
    everywhere = _row(result, "attn_heads.0", 1, 0)
    assert (everywhere["recall"], everywhere["precision"]) == (1.0, 10 / 30)
    assert everywhere["score"] < 0 < first["score"]  # fires inside less often than outside
    partial = _row(result, "attn_heads.0", 1, 5)
    assert (partial["n_acts_in"], partial["n_acts_out"], partial["precision"]) == (3, 1, 0.75)
    order = [(r["site"], r["head"], r["code"]) for r in result.codes]
    assert order.index(("attn_heads.0", 1, 5)) < order.index(("attn_heads.0", 1, 0))
    # the everywhere codes of head 0 and mlp_out.0 tie with head 1's code 0: all below code 5
    assert all(r["score"] <= everywhere["score"] for r in result.codes[order.index(
        ("attn_heads.0", 1, 0)):])  # fmt: skip
    assert _row(result, "mlp_out.0", None, 1)["head"] is None


def test_a_code_on_exactly_the_document_has_recall_and_precision_one() -> None:
    ids = torch.full((N_ROWS, T, 1, 1), 4, dtype=torch.long)
    ids[DOC] = 6
    result = topic_codes(_cache({"mlp_out.1": ids}), DOC)
    assert [(r["code"], r["recall"], r["precision"]) for r in result.codes] == [(6, 1.0, 1.0)]
    # log odds ratio with ½ per cell: (10.5 / 0.5) / (0.5 / 20.5)
    want = math.log(10.5 / 0.5) - math.log(0.5 / 20.5)
    # float64 logs in torch and in math: a few ulps apart
    assert result.codes[0]["score"] == pytest.approx(want, rel=1e-12)


def test_thresholds_filter_and_top_caps(planted) -> None:
    kept = topic_codes(planted, DOC, min_recall=0.5, min_precision=0.5, top=None)
    assert [(r["head"], r["code"]) for r in kept.codes] == [(1, 3)]  # 5: recall 0.3; 0: prec 1/3
    loose = topic_codes(planted, DOC, min_recall=0.3, min_precision=0.0, top=None)
    assert {(r["head"], r["code"]) for r in loose.codes if r["site"] == "attn_heads.0"} == {
        (1, 3), (1, 5), (1, 0), (0, 1), (0, 2)}  # fmt: skip
    assert len(topic_codes(planted, DOC, min_recall=0.0, min_precision=0.0, top=2).codes) == 2
    # mlp_out.0 holds codes that fire everywhere: kept at the default precision 0.01 (1/3),
    # dropped at 0.5
    assert len(topic_codes(planted, DOC, sites=["mlp_out.0"]).codes) == 2
    assert topic_codes(planted, DOC, sites=["mlp_out.0"], min_precision=0.5).codes == []


def test_counts_match_a_loop_over_every_token() -> None:
    """Random distinct top-k ids of 2 heads: every kept row's counts, recall, precision and
    score as a direct count over the tokens gives them."""
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(N_CODES, generator=g)[:3] for _ in range(N_ROWS * T * 2)])
    ids = ids.view(N_ROWS, T, 2, 3)
    cache = _cache({"attn_heads.1": ids})
    result = topic_codes(cache, [[0], [3, 4]], min_recall=0.0, min_precision=0.0, top=None)
    inside = [r in (0, 3, 4) for r in range(N_ROWS)]
    n_in, n_out = 3 * T, 3 * T
    rows = {(r["head"], r["code"]): r for r in result.codes}
    for head in range(2):
        for code in range(N_CODES):
            a = sum(int(code in ids[r, t, head].tolist()) for r in range(N_ROWS) for t in range(T)
                    if inside[r])  # fmt: skip
            b = sum(int(code in ids[r, t, head].tolist()) for r in range(N_ROWS) for t in range(T)
                    if not inside[r])  # fmt: skip
            if a == 0:
                assert (head, code) not in rows
                continue
            row = rows[(head, code)]
            assert (row["n_acts_in"], row["n_acts_out"]) == (a, b)
            assert (row["recall"], row["precision"]) == (a / n_in, a / (a + b))
            want = math.log((a + 0.5) / (n_in - a + 0.5)) - math.log((b + 0.5) / (n_out - b + 0.5))
            # float64 logs in torch and in math: a few ulps apart
            assert row["score"] == pytest.approx(want, rel=1e-12, abs=1e-12)
    scores = [r["score"] for r in result.codes]
    assert scores == sorted(scores, reverse=True)


def test_documents_as_rows_row_lists_regex_mask_and_words() -> None:
    texts = ["the king is here", "a kingdom falls", "KING lear", "no one", "king", "sir"]
    ids = torch.zeros(N_ROWS, T, 1, 1, dtype=torch.long)
    cache = _cache({"mlp_out.0": ids}, texts)

    def rows_of(documents, **kw) -> list[int]:
        mask, _ = document_mask(cache, documents, **kw)
        assert mask.all(1).eq(mask.any(1)).all()  # whole rows
        return torch.nonzero(mask.any(1)).flatten().tolist()

    assert rows_of([4, 0, 0]) == [0, 4] == rows_of([[4], [0]]) == rows_of(torch.tensor([4, 0]))
    assert rows_of(word_regex("king")) == [0, 2, 4]  # not "kingdom"; any case
    assert rows_of(r"king") == [0, 1, 4]
    # documents of two rows: one containing the word brings its other row along
    assert rows_of(word_regex("king"), within=[[0, 1], [2, 3], [5]]) == [0, 1, 2, 3]
    mask = torch.zeros(N_ROWS, T, dtype=torch.bool)
    mask[1, 2:4] = True  # a token span
    assert torch.equal(document_mask(cache, mask)[0], mask)
    result = topic_codes(cache, word_regex("king"), min_recall=0, min_precision=0)
    assert result.document_rows == [0, 2, 4] and result.n_tokens_in == 3 * T


def test_bad_documents_and_settings_are_refused(planted) -> None:
    cases = [
        (dict(documents=[9]), r"document rows \[9\] are not rows of the cache: it has 6 rows"),
        (dict(documents="nothing matches this"), "hold no cached token"),
        (dict(documents=list(range(N_ROWS))), "cover every cached token"),
        (dict(documents="("), "invalid regex"),
        (dict(documents=torch.ones(2, 2, dtype=torch.bool)), r"must be bool \(6, 5\)"),
        (dict(documents=DOC, min_recall=1.5), r"min_recall must be a fraction in \[0, 1\]"),
        (dict(documents=DOC, top=0), "top must be a whole number >= 1"),
        (dict(documents=DOC, sites=["mlp_out.9"]), "the cache has no codebooks at"),
        (dict(documents=DOC, within=[[0]]), "within= groups rows for a regex"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            topic_codes(planted, **kwargs)


def test_result_saves_and_loads(planted, tmp_path) -> None:
    result = topic_codes(planted, DOC, min_recall=0.0)
    again = TopicResult.load(result.save(tmp_path / "topics"))
    assert again == result
    assert "attn_heads.0" in result.table() and "score" in result.table()
    # the spec keeps at most k = 2 codes of each codebook, the best ones
    spec = result.spec()
    assert spec.split(",")[0] == "attn_heads.0/h1:3"
    books = [piece.split(":")[0] for piece in spec.split(",")]
    assert all(books.count(b) <= 2 for b in books)


# ------------------------------------------------------------------------------- forcing


@pytest.fixture(scope="module")
def model():
    from codebook_helpers import tiny_cb_model

    return tiny_cb_model(num_codes=16, k=4)


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(3, 512, (3, 9), generator=torch.Generator().manual_seed(5))


def test_topic_codes_of_one_head_fill_its_weakest_slots_at_every_position(model, ids) -> None:
    from tyche.hooks import read_activations

    layer = model.codebook("attn_heads.1")
    model(input_ids=ids)
    clean = layer.last_ids.clone()  # (B, T, G, k = 4)
    ivs = topic_interventions([("attn_heads.1", 2, 5), ("attn_heads.1", 2, 9),
                               ("attn_heads.1", 2, 11)], k=4)  # fmt: skip
    assert [(iv.mode, iv.slot, iv.positions) for iv in ivs] == [
        ("replace", 3, None), ("replace", 2, None), ("replace", 1, None)]  # fmt: skip
    with intervene(model, ivs), read_activations(model.base, "attn_heads.1") as acts:
        model(input_ids=ids)
    got = layer.last_ids
    assert got.shape == clean.shape
    want = torch.tensor([5, 9, 11]).expand(3, 9, 3)
    assert torch.equal(got[:, :, 2, 1:].flip(-1), want)  # slots 3, 2, 1 at every position
    assert torch.equal(got[:, :, 2, 0], clean[:, :, 2, 0])  # the best code stays
    assert torch.equal(got[:, :, [0, 1, 3]], clean[:, :, [0, 1, 3]])  # the other heads
    mean = layer.codebook[2][got[:, :, 2]].mean(-2)  # (B, T, d): the 4 codes' mean
    # float32 mean of 4 code vectors, summed in another order: a few ulps
    torch.testing.assert_close(acts["attn_heads.1"][:, :, 2], mean, rtol=1e-5, atol=1e-6)


def test_append_adds_a_slot_and_positions_apply(model, ids) -> None:
    layer = model.codebook("attn_heads.1")
    model(input_ids=ids)
    clean = layer.last_ids.clone()
    ivs = topic_interventions([("attn_heads.1", 2, 5)], append=True)
    with intervene(model, ivs):
        model(input_ids=ids)
    got = layer.last_ids
    assert got.shape == (3, 9, 4, 5)  # a (k + 1)-th slot
    assert (got[:, :, 2, 4] == 5).all() and (got[:, :, [0, 1, 3], 4] == -1).all()
    assert torch.equal(got[..., :4], clean)
    at = topic_interventions("mlp_out.0:7,mlp_out.0:8", positions=[-1], k=4)
    assert [(iv.code, iv.slot, iv.positions) for iv in at] == [(7, 3, (-1,)), (8, 2, (-1,))]
    with intervene(model, at):
        model(input_ids=ids)
    got = model.codebook("mlp_out.0").last_ids  # (B, T, k): a single codebook
    assert (got[:, -1, 3] == 7).all() and (got[:, -1, 2] == 8).all()


def test_more_codes_than_slots_are_refused(model) -> None:
    codes = [("attn_heads.1", 2, c) for c in range(5)]
    with pytest.raises(InputError, match=r"5 topic codes for attn_heads.1/h2, but its codebook "
                       r"has k = 4 slots: force at most 4"):  # fmt: skip
        topic_interventions(codes, k=4)
    with pytest.raises(InputError, match="say how many slots"):
        topic_interventions(codes[:2])
    assert len(topic_interventions(codes, append=True)) == 5  # extra slots: no limit
    # a code listed twice is kept once; other heads count apart
    twice = topic_interventions([*codes[:4], codes[0], ("attn_heads.1", 0, 1)], k=4)
    assert [(iv.head, iv.code, iv.slot) for iv in twice] == [
        (2, 0, 3), (2, 1, 2), (2, 2, 1), (2, 3, 0), (0, 1, 3)]  # fmt: skip


def test_a_topic_result_carries_its_slots() -> None:
    ids = torch.full((N_ROWS, T, 1, 2), 4, dtype=torch.long)
    ids[..., 1] = 5
    ids[DOC, :, :, 0], ids[DOC, :, :, 1] = 6, 7
    result = topic_codes(_cache({"mlp_out.1": ids}), DOC)
    ivs = topic_interventions(result, positions=(0,))
    assert [(iv.code, iv.slot, iv.positions) for iv in ivs] == [(6, 1, (0,)), (7, 0, (0,))]
    assert all(isinstance(iv, Intervention) for iv in ivs)


# ------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_tokenizer, tiny_texts) -> Path:
    """A cache of the tiny codebook model (k = 2 on every head and MLP), with the model."""
    from codebook_helpers import tiny_cb_model

    rows = tiny_tokenizer(" ".join(tiny_texts), return_tensors="pt")["input_ids"][0]
    rows = rows[: (rows.numel() // 16) * 16].view(-1, 16)
    folder = tmp_path_factory.mktemp("topics") / "cache"
    build_cache(tiny_cb_model(), rows, folder, tokenizer=tiny_tokenizer, progress=False)
    return folder


def test_cli_topics_by_word_saves_what_the_library_finds(cache_dir, capsys, tmp_path) -> None:
    from conftest import cli

    cache = load_cache(cache_dir)
    has = [i for i, text in enumerate(cache.texts) if re.search(r"(?i)\bking\b", text)]
    assert 0 < len(has) < cache.n_sequences  # the word splits the rows
    out = tmp_path / "found"
    run = cli(capsys, "codebook", "topics", "--cache", str(cache_dir), "--word", "king",
              "--min_recall", "0.1", "--top", "6", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    saved = TopicResult.load(out)
    assert saved.document_rows == has
    want = topic_codes(cache, word_regex("king"), min_recall=0.1, top=6)
    assert saved.codes == want.codes and saved.n_tokens_in == len(has) * cache.seq_len
    assert "the rows containing the word 'king'" in run.out
    line = next(x for x in run.out.splitlines() if x.startswith("to force them:"))
    spec = re.search(r"--topic '([^']+)'", line)[1]
    assert spec == saved.spec()
    rows = cli(capsys, "codebook", "topics", "--cache", str(cache_dir), "--rows", "0-1,3")
    assert rows.code == 0 and "topic codes of rows 0-1,3: 3 rows" in rows.out, rows.err
    # a whole word: "he" is not the "he" inside "the" (which nearly every row holds)
    has = [i for i, text in enumerate(cache.texts) if re.search(r"(?i)\bhe\b", text)]
    assert 0 < len(has) < cache.n_sequences
    run = cli(capsys, "codebook", "topics", "--cache", str(cache_dir), "--word", "he",
              "--out", str(tmp_path / "he"))  # fmt: skip
    assert run.code == 0 and TopicResult.load(tmp_path / "he").document_rows == has, run.err


def test_cli_intervene_forces_the_topic_codes_in_the_weakest_slots(
    cache_dir, capsys, monkeypatch
) -> None:
    """--topic reaches the model as replace edits of slots k-1, k-2 (k = 2), beside --force."""
    import tyche.codebook.interventions as interventions
    from conftest import cli

    seen: list[list[Intervention]] = []
    original = interventions.next_token_jsd

    def spy(model, ids, ivs, **kwargs):
        seen.append(list(ivs))
        return original(model, ids, ivs, **kwargs)

    monkeypatch.setattr(interventions, "next_token_jsd", spy)
    run = cli(capsys, "codebook", "intervene", "--cache", str(cache_dir), "--prompt", "the king",
              "--topic", "attn_heads.0/h1:4,mlp_out.1:6@-1,attn_heads.0/h1:5",
              "--force", "mlp_out.0:2", "--n_samples", "1", "--max_new_tokens", "2",
              "--temperature", "0")  # fmt: skip
    assert run.code == 0 and "JSD of the next-token distribution" in run.out, run.err
    got = [(iv.mode, iv.site, iv.head, iv.code, iv.slot, iv.positions) for iv in seen[0]]
    assert got == [
        ("force", "mlp_out.0", None, 2, -1, None),
        ("replace", "attn_heads.0", 1, 4, 1, None),
        ("replace", "mlp_out.1", None, 6, 1, (-1,)),
        ("replace", "attn_heads.0", 1, 5, 0, None),
    ]


def test_cli_bad_flags_give_one_line_errors(cache_dir, capsys) -> None:
    from conftest import cli, one_line_error

    base = ["codebook", "topics", "--cache", str(cache_dir)]
    n = load_cache(cache_dir).n_sequences
    cases = [
        ([], "give exactly one of --rows, --regex, --word .* not none"),
        (["--word", "king", "--regex", "x"], "not --regex and --word"),
        (["--rows", str(n)], rf"--rows {n}: the cache has {n} rows \(0 to {n - 1}\)"),
        (["--rows", "a,b"], "--rows: cannot read 'a'"),
        (["--regex", "("], r"--regex '\(' is not a valid regex"),
        (["--word", "zzz"], "--word 'zzz': the documents .* hold no cached token"),
        (["--word", "king", "--min_recall", "2"], "--min_recall is a share of tokens, at most 1"),
        (["--word", "king", "--min_precision", "-1"], "--min_precision must be at least 0"),
        (["--word", "king", "--top", "0"], "--top must be at least 1"),
        (["--word", "king", "--sites", "mlp_out.7"], "--sites: the cache has no codebooks at"),
    ]
    for extra, pattern in cases:
        one_line_error(cli(capsys, *base, *extra), "codebook", pattern)
    intervene = ["codebook", "intervene", "--cache", str(cache_dir), "--prompt", "the king",
                 "--n_samples", "1", "--max_new_tokens", "2"]  # fmt: skip
    three = "attn_heads.0/h1:1,attn_heads.0/h1:2,attn_heads.0/h1:3"
    one_line_error(cli(capsys, *intervene, "--topic", three), "codebook",
                   r"--topic: 3 topic codes for attn_heads.0/h1, but its codebook has k = 2 "
                   r"slots.* as extra slots with --append instead")  # fmt: skip
    one_line_error(cli(capsys, *intervene, "--topic", "mlp_out.0:1@9"), "codebook",
                   r"--topic mlp_out.0:1@9: position 9 can never apply")  # fmt: skip
    one_line_error(cli(capsys, *intervene, "--topic", "mlp_out.9:1,mlp_out.9:2"), "codebook",
                   "--topic: no codebook at site 'mlp_out.9'")  # fmt: skip
