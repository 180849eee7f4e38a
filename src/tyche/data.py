"""Turn text into token batches: :func:`chunk_and_tokenize` and :func:`iter_batches`.

Accepted text sources (``data`` argument):

- a ``datasets.Dataset`` (any version; in ``datasets`` 5.x ``ds[key]`` is a lazy ``Column``,
  which is converted to a plain list here), an ``IterableDataset``, or a one-split
  ``DatasetDict`` is refused with the split names listed;
- a ``list``/``tuple`` of strings (or of dict rows holding ``text_key``);
- a ``dict`` mapping ``text_key`` to a sequence of strings;
- a path (``str`` or ``Path``) to a local UTF-8 text file. The file is split into documents
  at blank lines (one or more empty or whitespace-only lines), so a file of paragraphs gives
  one document per paragraph and a file without blank lines is one document. Leading and
  trailing line breaks of each document are removed.

Empty (or whitespace-only) documents are skipped. Attention masks mark the tokens the tokenizer
produced (1) and the padding added here (0); they never come from ``input_ids != pad_id``, so a
real token whose id equals the pad id (e.g. Pythia, where pad=1) keeps mask 1.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tyche.errors import InputError

__all__ = [
    "NoEOSToken",
    "TooFewTokens",
    "chunk_and_tokenize",
    "iter_batches",
    "iter_texts",
    "load_texts",
    "token_ids_sha256",
]

#: Texts are tokenized this many at a time (keeps memory flat on large corpora).
_TOKENIZE_BATCH = 1000
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def token_ids_sha256(input_ids: torch.Tensor) -> str:
    """SHA-256 (64 hex characters) of token ids ``(N, T)`` in order: their shape, then the ids
    as little-endian int64, row by row. Any device, dtype or memory layout gives the same hash
    for the same ids, so two runs that read the same rows record the same hash."""
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(f"{tuple(ids.shape)}\n".encode())
    digest.update(ids.numpy().astype("<i8", copy=False).tobytes())
    return digest.hexdigest()


class TooFewTokens(InputError):
    """The data has fewer tokens than one chunk: ``n_tokens`` from ``n_documents``, against
    ``max_seq_len`` (so a command can say it in its own flags)."""

    def __init__(self, message: str, *, n_tokens: int, n_documents: int, max_seq_len: int):
        super().__init__(message)
        self.n_tokens, self.n_documents, self.max_seq_len = n_tokens, n_documents, max_seq_len


class NoEOSToken(InputError):
    """The tokenizer lacks the special token the tokenization needs (an EOS token to join
    documents with, or any of pad and EOS to pad rows with)."""


def _missing_key(text_key: str, available: Iterable[Any]) -> InputError:
    return InputError(
        f"text_key {text_key!r} not found; available keys: {sorted(map(str, available))}. "
        "Pass text_key=<one of these>."
    )


def _raw_documents(data: Any, text_key: str) -> tuple[Iterable[Any], str]:
    """An iterable over the raw documents of ``data`` and a name for error messages."""
    if isinstance(data, str | Path):
        path = Path(data)
        if not path.is_file():
            hint = " (it is a directory)" if path.is_dir() else ""
            raise InputError(
                f"data is a path but {str(path)!r} is not a readable file{hint}; pass a local "
                "text file, a list[str] of documents, a dict or a datasets.Dataset."
            )
        docs = _BLANK_LINES.split(path.read_text(encoding="utf-8"))
        return [d.strip("\r\n") for d in docs], str(path)
    if hasattr(data, "column_names") and isinstance(data, Mapping):  # DatasetDict
        raise InputError(
            f"data is a {type(data).__name__} with splits {list(data.keys())}; pick one, "
            "e.g. data['train']."
        )
    if isinstance(data, Mapping):
        if text_key not in data:
            raise _missing_key(text_key, data.keys())
        raw = data[text_key]
        if isinstance(raw, str):
            raise TypeError(f"data[{text_key!r}] is a single str; wrap it in a list: [text]")
        return raw, f"data[{text_key!r}]"
    if hasattr(data, "column_names"):  # datasets.Dataset / IterableDataset
        columns = data.column_names
        if columns is not None and text_key not in columns:
            raise _missing_key(text_key, columns)
        if hasattr(data, "__len__"):  # a lazy Column in datasets 5.x, a list before
            return data[text_key], f"dataset[{text_key!r}]"
        return (row[text_key] for row in data), f"dataset[{text_key!r}]"
    if isinstance(data, Sequence):
        if data and isinstance(data[0], Mapping):
            if text_key not in data[0]:
                raise _missing_key(text_key, data[0].keys())
            return (row[text_key] for row in data), f"data[*][{text_key!r}]"
        return data, "data"
    raise TypeError(
        f"cannot read texts from a {type(data).__name__}; pass a datasets.Dataset, a "
        "list[str], a dict {text_key: list[str]} or a path to a local text file."
    )


def iter_texts(data: Any, *, text_key: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of ``data`` (see the module docstring), lazily.

    Raises ``TypeError`` for a document that is not a ``str`` (naming its index).
    """
    raw, where = _raw_documents(data, text_key)
    for i, text in enumerate(raw):
        if not isinstance(text, str):
            raise TypeError(
                f"{where}[{i}] is a {type(text).__name__}, not a str; every document must be text"
            )
        if text.strip():
            yield text


def load_texts(data: Any, *, text_key: str = "text", max_examples: int | None = None) -> list[str]:
    """The first ``max_examples`` (all if None) non-empty documents of ``data`` as a list."""
    return list(itertools.islice(iter_texts(data, text_key=text_key), max_examples))


def _special_ids(tokenizer: Any) -> tuple[int, int | None]:
    """(pad id, eos id); pad falls back to eos. Raises if the tokenizer has neither."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None and eos_id is None:
        raise NoEOSToken(
            "the tokenizer has neither a pad token nor an EOS token; set one, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token, or tokenizer.add_special_tokens("
            "{'eos_token': '<|endoftext|>'})."
        )
    return (eos_id if pad_id is None else pad_id), eos_id


def _tokenize(
    tokenizer: Any, texts: Iterable[str], add_special_tokens: bool
) -> Iterator[list[int]]:
    """Token ids of each text (tokenized a batch at a time, no padding, no truncation).

    Only ids with attention mask 1 in the tokenizer's output are kept.
    """
    texts = iter(texts)
    while batch := list(itertools.islice(texts, _TOKENIZE_BATCH)):
        encoded = tokenizer(batch, add_special_tokens=add_special_tokens, verbose=False)
        masks = encoded.get("attention_mask") or [None] * len(batch)
        for ids, mask in zip(encoded["input_ids"], masks):
            yield (
                [int(i) for i in ids] if mask is None else [int(i) for i, m in zip(ids, mask) if m]
            )


def chunk_and_tokenize(
    data: Any,
    tokenizer: Any,
    *,
    text_key: str = "text",
    max_seq_len: int = 512,
    chunking: bool = True,
    max_examples: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize ``data`` into ``input_ids`` and ``attention_mask``, both LongTensor ``(N, T)``.

    ``chunking=True``: documents are tokenized without special tokens and joined into one stream
    with the EOS id *between* consecutive documents; the stream is cut into full chunks of
    exactly ``T = max_seq_len`` tokens (the last partial chunk is dropped); masks are all ones.

    ``chunking=False``: one row per document, tokenized with the tokenizer's special tokens
    (e.g. BOS), truncated to ``max_seq_len`` and right-padded with the pad id (the EOS id if the
    tokenizer has no pad token) to the longest row, so ``T <= max_seq_len``; masks are 1 on the
    tokenizer's tokens and 0 on the padding (never derived from ``input_ids != pad_id``).

    ``max_examples`` caps ``N`` (chunks when chunking, documents otherwise); documents are read
    and tokenized only until that many rows are filled. Raises ``ValueError`` for an unknown
    ``text_key`` (the available keys are listed), for empty data, when there are fewer tokens
    than one chunk (:class:`TooFewTokens`), and for a tokenizer without the EOS token chunking
    needs or with neither pad nor EOS token (:class:`NoEOSToken`); ``TypeError`` for
    non-string documents.
    """
    if max_seq_len < 1:
        raise InputError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if max_examples is not None and max_examples < 1:
        raise InputError(f"max_examples must be >= 1 or None, got {max_examples}")
    pad_id, eos_id = _special_ids(tokenizer)
    if chunking and eos_id is None:
        raise NoEOSToken(
            "chunking=True joins documents with the EOS token but the tokenizer has none; set "
            "tokenizer.eos_token or use chunking=False."
        )
    texts = iter_texts(data, text_key=text_key)
    if chunking:
        return _chunk(texts, tokenizer, eos_id, max_seq_len, max_examples, text_key)
    texts = itertools.islice(texts, max_examples)
    return _pad(texts, tokenizer, pad_id, max_seq_len, text_key)


def _no_text(text_key: str) -> InputError:
    return InputError(
        f"no text found in data: no documents, or all of them empty (text_key={text_key!r})"
    )


def _chunk(
    texts: Iterator[str],
    tokenizer: Any,
    eos_id: int,
    max_seq_len: int,
    max_examples: int | None,
    text_key: str,
) -> dict[str, torch.Tensor]:
    stream: list[int] = []
    wanted = None if max_examples is None else max_examples * max_seq_len
    n_docs = 0
    for ids in _tokenize(tokenizer, texts, add_special_tokens=False):
        if n_docs > 0:
            stream.append(eos_id)
        stream.extend(ids)
        n_docs += 1
        if wanted is not None and len(stream) >= wanted:
            break
    if n_docs == 0:
        raise _no_text(text_key)
    n_chunks = len(stream) // max_seq_len
    if max_examples is not None:
        n_chunks = min(n_chunks, max_examples)
    if n_chunks == 0:
        raise TooFewTokens(
            f"the data has only {len(stream)} tokens (from {n_docs} documents), fewer than "
            f"one chunk of max_seq_len={max_seq_len}; use chunking=False or a smaller "
            "max_seq_len, or give more text.",
            n_tokens=len(stream), n_documents=n_docs, max_seq_len=max_seq_len,
        )
    ids = torch.tensor(stream[: n_chunks * max_seq_len], dtype=torch.long)
    ids = ids.view(n_chunks, max_seq_len)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pad(
    texts: Iterable[str], tokenizer: Any, pad_id: int, max_seq_len: int, text_key: str
) -> dict[str, torch.Tensor]:
    rows = [ids[:max_seq_len] for ids in _tokenize(tokenizer, texts, add_special_tokens=True)]
    if not rows:
        raise _no_text(text_key)
    if not any(rows):
        raise InputError(f"the tokenizer produced no tokens for any of the {len(rows)} documents")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def iter_batches(
    tokens: Mapping[str, torch.Tensor], batch_size: int, *, drop_last: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield consecutive row slices ``{key: tensor[i : i + batch_size]}`` of ``tokens``.

    Every value must be a tensor with the same first dimension ``N``. The last batch may be
    smaller unless ``drop_last=True``. Slices are views (no copy).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if not tokens:
        raise InputError("tokens is empty; expected e.g. {'input_ids': ..., 'attention_mask': ...}")
    sizes = {
        k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        for k, v in tokens.items()
    }
    firsts = {s[0] if isinstance(s, tuple) and s else None for s in sizes.values()}
    if None in firsts or len(firsts) != 1:
        raise InputError(
            f"every value of tokens must be a tensor with the same first dimension; got {sizes}"
        )
    n = firsts.pop()
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield {k: v[start : start + batch_size] for k, v in tokens.items()}
