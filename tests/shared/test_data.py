"""Tests for tyche.data: every input kind, chunking and padding against a hand-built oracle."""

from __future__ import annotations

import re

import pytest
import torch

from tyche.data import chunk_and_tokenize, iter_batches, load_texts

DOCS = [
    "the king is dead .",
    "long live the queen !",
    "",  # empty documents are skipped
    "love is a sword , death is a crown , and the night is sweet .",
    "   ",
    "she speaks and he hears .",
]


def word_ids(tokenizer, text: str) -> list[int]:
    """Oracle: split on whitespace and punctuation, look every piece up in the vocabulary."""
    pieces = re.findall(r"\w+|[^\w\s]", text)
    return tokenizer.convert_tokens_to_ids(pieces)


def build_tokenizer(pad: bool, eos: bool):
    """A word-level tokenizer with or without pad / eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2}
    for w in ["the", "king", "is", "dead", "long", "live", "queen"]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"unk_token": "<unk>"}
    if pad:
        kwargs["pad_token"] = "<pad>"
    if eos:
        kwargs["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def expected_stream(tokenizer, docs: list[str]) -> list[int]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in (d for d in docs if d.strip()):
        if stream:
            stream.append(eos)
        stream.extend(word_ids(tokenizer, doc))
    return stream


@pytest.mark.parametrize("max_seq_len", [3, 5, 8])
def test_chunking_matches_oracle(tiny_tokenizer, max_seq_len):
    out = chunk_and_tokenize(DOCS, tiny_tokenizer, max_seq_len=max_seq_len)
    stream = expected_stream(tiny_tokenizer, DOCS)
    n = len(stream) // max_seq_len
    want = torch.tensor(stream[: n * max_seq_len]).view(n, max_seq_len)
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
    assert torch.equal(out["input_ids"], want)
    assert torch.equal(out["attention_mask"], torch.ones_like(want))
    # EOS sits exactly between documents: 3 non-empty separators among 4 documents
    assert stream.count(tiny_tokenizer.eos_token_id) == 3


def test_no_chunking_truncates_and_right_pads(tiny_tokenizer):
    out = chunk_and_tokenize(DOCS, tiny_tokenizer, max_seq_len=8, chunking=False)
    docs = [d for d in DOCS if d.strip()]
    rows = [word_ids(tiny_tokenizer, d)[:8] for d in docs]
    width = max(map(len, rows))
    assert out["input_ids"].shape == (len(docs), width) == out["attention_mask"].shape
    pad = tiny_tokenizer.pad_token_id
    for i, row in enumerate(rows):
        assert out["input_ids"][i, : len(row)].tolist() == row
        assert out["input_ids"][i, len(row) :].eq(pad).all()
        assert out["attention_mask"][i].tolist() == [1] * len(row) + [0] * (width - len(row))


def test_real_token_equal_to_pad_id_keeps_its_mask(tiny_tokenizer):
    """Bug of the original: masks from `input_ids != pad_id` dropped real pad-id tokens."""
    pad_text = tiny_tokenizer.pad_token  # the literal pad token inside real text
    docs = [f"the king {pad_text} is dead", "the queen"]
    out = chunk_and_tokenize(docs, tiny_tokenizer, max_seq_len=16, chunking=False)
    pad = tiny_tokenizer.pad_token_id
    assert out["input_ids"][0, 2] == pad  # a real token with the pad id ...
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 1, 1]  # ... that is not masked
    assert out["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    # the buggy rule would have masked 4 positions in total, not 3
    assert (out["input_ids"] != pad).sum() == out["attention_mask"].sum() - 1


def test_datasets_5_dataset_and_column(tiny_tokenizer):
    """Bug of the original: datasets 5.x returns lazy Column objects the tokenizer rejects."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS, "label": list(range(len(DOCS)))})
    want = chunk_and_tokenize(DOCS, tiny_tokenizer, max_seq_len=4)
    got = chunk_and_tokenize(ds, tiny_tokenizer, max_seq_len=4)
    assert isinstance(got["input_ids"], torch.Tensor) and got["input_ids"].shape[1] == 4
    assert torch.equal(got["input_ids"], want["input_ids"])
    got_pad = chunk_and_tokenize(ds, tiny_tokenizer, max_seq_len=6, chunking=False)
    want_pad = chunk_and_tokenize(DOCS, tiny_tokenizer, max_seq_len=6, chunking=False)
    assert torch.equal(got_pad["input_ids"], want_pad["input_ids"])
    # a lazy Column itself (in a dict) works too
    col = ds["text"]
    got_col = chunk_and_tokenize({"text": col}, tiny_tokenizer, max_seq_len=4)
    assert torch.equal(got_col["input_ids"], want["input_ids"])
    # an IterableDataset (no len) is read row by row
    it = ds.to_iterable_dataset()
    assert torch.equal(
        chunk_and_tokenize(it, tiny_tokenizer, max_seq_len=4)["input_ids"], want["input_ids"]
    )
    with pytest.raises(ValueError, match=r"splits \['train'\]"):
        chunk_and_tokenize(datasets.DatasetDict({"train": ds}), tiny_tokenizer)
    with pytest.raises(
        ValueError, match=r"'content' not found; available keys: \['label', 'text'\]"
    ):
        chunk_and_tokenize(ds, tiny_tokenizer, text_key="content")


def test_input_kinds_agree(tiny_tokenizer, tmp_path):
    want = chunk_and_tokenize(DOCS, tiny_tokenizer, max_seq_len=4)
    as_dict = chunk_and_tokenize({"body": DOCS}, tiny_tokenizer, text_key="body", max_seq_len=4)
    rows = [{"text": d} for d in DOCS]
    as_rows = chunk_and_tokenize(rows, tiny_tokenizer, max_seq_len=4)
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    as_file = chunk_and_tokenize(path, tiny_tokenizer, max_seq_len=4)
    as_str_path = chunk_and_tokenize(str(path), tiny_tokenizer, max_seq_len=4)
    for got in (as_dict, as_rows, as_file, as_str_path):
        assert torch.equal(got["input_ids"], want["input_ids"])


def test_text_file_splits_on_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line\nstill first\n\n  \nsecond\n\n\nthird\n", encoding="utf-8")
    assert load_texts(path) == ["first line\nstill first", "second", "third"]
    assert load_texts(path, max_examples=2) == ["first line\nstill first", "second"]


def test_max_examples_limits_rows(tiny_tokenizer):
    full = chunk_and_tokenize(DOCS, tiny_tokenizer, max_seq_len=3)
    assert full["input_ids"].shape[0] > 2
    two = chunk_and_tokenize(DOCS, tiny_tokenizer, max_seq_len=3, max_examples=2)
    assert torch.equal(two["input_ids"], full["input_ids"][:2])
    padded = chunk_and_tokenize(
        DOCS, tiny_tokenizer, max_seq_len=32, chunking=False, max_examples=2
    )
    assert padded["input_ids"].shape == (2, 5)  # the first two non-empty documents


def test_pad_falls_back_to_eos():
    tok = build_tokenizer(pad=False, eos=True)
    out = chunk_and_tokenize(["the king", "the queen is dead"], tok, chunking=False)
    assert out["input_ids"][0].tolist() == [3, 4, 0, 0]  # padded with eos id 0
    assert out["attention_mask"][0].tolist() == [1, 1, 0, 0]


def test_tokenizer_without_pad_or_eos_is_refused():
    tok = build_tokenizer(pad=False, eos=False)
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        chunk_and_tokenize(["the king"], tok, chunking=False)
    with pytest.raises(ValueError, match="EOS token but the tokenizer has none"):
        chunk_and_tokenize(["the king"], build_tokenizer(pad=True, eos=False))


def test_clear_errors_for_bad_data(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no text found"):
        chunk_and_tokenize([], tiny_tokenizer)
    with pytest.raises(ValueError, match="no text found"):
        chunk_and_tokenize(["", "  \n"], tiny_tokenizer, chunking=False)
    with pytest.raises(
        ValueError, match=r"only 5 tokens .*chunking=False or a smaller max_seq_len"
    ):
        chunk_and_tokenize(["the king is dead ."], tiny_tokenizer, max_seq_len=6)
    with pytest.raises(TypeError, match=r"data\[1\] is a int, not a str"):
        chunk_and_tokenize(["the king", 3], tiny_tokenizer)
    with pytest.raises(ValueError, match=r"available keys: \['body'\]"):
        chunk_and_tokenize({"body": ["x"]}, tiny_tokenizer)
    with pytest.raises(ValueError, match="not a readable file"):
        chunk_and_tokenize(str(tmp_path / "missing.txt"), tiny_tokenizer)
    with pytest.raises(TypeError, match="cannot read texts from a int"):
        chunk_and_tokenize(42, tiny_tokenizer)
    with pytest.raises(ValueError, match="max_seq_len must be >= 1"):
        chunk_and_tokenize(DOCS, tiny_tokenizer, max_seq_len=0)


def test_iter_batches():
    tokens = {"input_ids": torch.arange(20).view(10, 2), "attention_mask": torch.ones(10, 2)}
    batches = list(iter_batches(tokens, 4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), tokens["input_ids"])
    assert len(list(iter_batches(tokens, 4, drop_last=True))) == 2
    with pytest.raises(ValueError, match="same first dimension"):
        list(iter_batches({"a": torch.zeros(3), "b": torch.zeros(4)}, 2))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(iter_batches(tokens, 0))
