"""Topic codes: codes active throughout a document, and forcing several of them at once.

A *document* is a set of cache rows (one scene, one play, one docstring), or any set of
token positions. :func:`topic_codes` compares, for every code of every codebook (per head for
per-head codebooks), how often it is active inside the documents and outside them. With
``N_in`` / ``N_out`` the tokens inside / outside, ``n_in`` / ``n_out`` the tokens at which the
code is among the k chosen codes (any slot; the k codes of a token are distinct):

    recall    = n_in / N_in                  (share of the document's tokens it fires at)
    precision = n_in / (n_in + n_out)        (share of its firings that lie in the document)
    score     = log[(n_in + ½) / (N_in - n_in + ½)] - log[(n_out + ½) / (N_out - n_out + ½)]

Codes with recall >= ``min_recall`` and precision >= ``min_precision`` are kept (the seed
browser's defaults, 0.2 and 0.01: a topic code fires on much of a document yet may fire in
many other documents of the same topic) and ranked by ``score``, the log odds ratio (nats)
of the code being active at a token inside against outside, with Haldane's ½ added to each
cell. It is 0 for a code that fires at the same rate inside and outside, however often (a
code active everywhere has recall 1 but a score near 0, or below); it grows both with the
share of the document covered and with the rarity outside, and does not depend on the
documents' size the way precision does (precision alone would rank a code that fires once,
inside, with the exact topic code; ½ keeps such small counts from scoring infinite).

:func:`topic_interventions` turns topic codes into :class:`~tyche.codebook.Intervention`
objects as the paper forces a topic: the codes of one codebook (head) take its successive
weakest slots k-1, k-2, ... at every position (or the given positions), so up to k codes are
active together; with ``append`` each is added as an extra slot instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tyche.codebook.cache import CodeCache, sites_of
from tyche.codebook.interventions import Intervention, parse_interventions
from tyche.errors import InputError
from tyche.io import ResultIO

__all__ = ["TopicResult", "document_mask", "topic_codes", "topic_interventions"]

Documents = str | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


@dataclass(frozen=True)
class TopicResult(ResultIO):
    """Topic codes of a document set, best first. ``codes`` rows are dicts with ``site``,
    ``head`` (None for a single codebook), ``code``, ``k`` (the codebook's slots), ``recall``,
    ``precision``, ``n_acts_in``, ``n_acts_out`` (tokens where it fires inside / outside)
    and ``score`` (log odds ratio, nats; see :mod:`tyche.codebook.topics`)."""

    documents: str
    document_rows: list[int]
    n_tokens_in: int
    n_tokens_out: int
    codes: list[dict[str, Any]]
    model_fingerprint: str
    min_recall: float
    min_precision: float
    UNITS: ClassVar[dict[str, str]] = {
        "recall": "fraction",
        "precision": "fraction",
        "score": "nats (log odds ratio, inside vs outside)",
    }

    def table(self, n: int | None = None) -> str:
        """The codes as a text table (the first ``n``; None: all)."""
        lines = [
            f"topic codes of {self.documents}: {len(self.document_rows)} rows, "
            f"{self.n_tokens_in} tokens inside, {self.n_tokens_out} outside "
            f"(recall >= {self.min_recall:g}, precision >= {self.min_precision:g})",
            f"{'site':<16} {'head':>4} {'code':>6} {'recall':>6} {'prec':>6} {'in':>6} "
            f"{'out':>7} {'score':>6}",
        ]
        for c in self.codes[:n]:
            lines.append(
                f"{c['site']:<16} {'-' if c['head'] is None else c['head']:>4} {c['code']:>6} "
                f"{c['recall']:6.3f} {c['precision']:6.3f} {c['n_acts_in']:>6} "
                f"{c['n_acts_out']:>7} {c['score']:6.2f}"
            )
        if not self.codes:
            lines.append("(no code passes the thresholds)")
        return "\n".join(lines)

    def spec(self, n: int | None = None) -> str:
        """The first ``n`` codes as an intervention spec, ``"SITE[/hHEAD]:CODE,..."`` (what
        ``tyche codebook intervene --topic`` reads), keeping the best k of each codebook
        (what its k slots can hold)."""
        kept, used = [], {}
        for c in self.codes[:n]:
            book = _book(c["site"], c["head"])
            if used.get(book, 0) < c["k"]:
                used[book] = used.get(book, 0) + 1
                kept.append(f"{book}:{c['code']}")
        return ",".join(kept)


def _book(site: str, head: int | None) -> str:
    """A codebook as specs name it: ``"mlp_out.1"``, ``"attn_heads.0/h3"``."""
    return site if head is None else f"{site}/h{head}"


def document_mask(
    cache: CodeCache, documents: Documents, *, within: Sequence[Sequence[int]] | None = None
) -> tuple[torch.Tensor, str]:
    """The tokens inside the documents, bool ``(n, T)``, and a description of them.

    ``documents`` is a regex (the rows whose text it matches, ``re.search``), row indices (a
    list or an integer tensor), a list of documents each a list of rows (their union), or a
    bool ``(n, T)`` mask of token positions (spans). With a regex, ``within`` gives the
    documents it chooses among as row lists (default: each row is its own document); a
    document is inside when any of its rows matches, so a word's documents are those that
    contain it, against those that don't.
    """
    n, t = cache.n_sequences, cache.seq_len
    if isinstance(documents, torch.Tensor) and documents.dtype != torch.bool:
        documents = documents.tolist()  # row indices
    if isinstance(documents, torch.Tensor):
        if tuple(documents.shape) != (n, t):
            raise InputError(
                f"a token mask of documents must be bool ({n}, {t}) like the cache's tokens, "
                f"got {documents.dtype} {tuple(documents.shape)}"
            )
        return documents.clone(), f"{int(documents.sum())} marked tokens"
    if isinstance(documents, str):
        return _regex_rows(cache, documents, within), f"regex {documents!r}"
    if within is not None:
        raise InputError("within= groups rows for a regex; give documents as a regex, or "
                         "give the documents' rows themselves")  # fmt: skip
    rows = [r for doc in documents for r in (doc if isinstance(doc, Sequence) else [doc])]
    bad = [r for r in rows if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < n]
    if bad:
        raise InputError(f"document rows {bad[:5]} are not rows of the cache: it has {n} rows "
                         f"(0 to {n - 1})")  # fmt: skip
    mask = torch.zeros(n, t, dtype=torch.bool)
    mask[sorted(set(rows))] = True
    return mask, "rows " + _ranges(sorted(set(rows)))


def _regex_rows(
    cache: CodeCache, pattern: str, within: Sequence[Sequence[int]] | None
) -> torch.Tensor:
    """Mask of the rows of the documents (``within``; default one per row) that match."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise InputError(f"invalid regex {pattern!r}: {err}") from err
    n = cache.n_sequences
    groups = [[r] for r in range(n)] if within is None else [list(d) for d in within]
    bad = [r for d in groups for r in d if not isinstance(r, int) or not 0 <= r < n]
    if bad:
        raise InputError(f"within= rows {bad[:5]} are not rows of the cache (0 to {n - 1})")
    mask = torch.zeros(n, cache.seq_len, dtype=torch.bool)
    for doc in groups:
        if any(regex.search(cache.texts[r]) for r in doc):
            mask[doc] = True
    return mask


def _ranges(rows: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts, start = [], None
    for i, r in enumerate(rows):
        start = r if start is None else start
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            parts.append(str(r) if r == start else f"{start}-{r}")
            start = None
    return ",".join(parts)


def _code_counts(ids: torch.Tensor, inside: torch.Tensor, n_codes: int) -> tuple[torch.Tensor, ...]:
    """Tokens at which each code fires, inside and in all: two ``(G, n_codes)`` long.

    ``ids`` ``(n, T, G, k)``, ``inside`` bool ``(n, T)``. Empty slots (id -1) count nowhere.
    """
    g = ids.shape[2]
    offsets = (torch.arange(g) * n_codes).view(1, 1, g, 1)
    flat = torch.where(ids >= 0, ids + offsets, torch.full_like(ids, g * n_codes))
    size = g * n_codes + 1
    total = torch.bincount(flat.reshape(-1), minlength=size)[:-1].view(g, n_codes)
    within = torch.bincount(flat[inside].reshape(-1), minlength=size)[:-1].view(g, n_codes)
    return within, total


def _log_odds_ratio(a: torch.Tensor, n_a: int, b: torch.Tensor, n_b: int) -> torch.Tensor:
    """log of the odds ratio of firing at ``a`` of ``n_a`` tokens against ``b`` of ``n_b``,
    with ½ added to each of the four cells (nats)."""
    a, b = a.double(), b.double()
    odds_a = (a + 0.5) / ((n_a - a).clamp_min(0) + 0.5)
    odds_b = (b + 0.5) / ((n_b - b).clamp_min(0) + 0.5)
    return odds_a.log() - odds_b.log()


def topic_codes(
    cache: CodeCache,
    documents: Documents,
    *,
    sites: Sequence[str] | None = None,
    min_recall: float = 0.2,
    min_precision: float = 0.01,
    top: int | None = 20,
    within: Sequence[Sequence[int]] | None = None,
) -> TopicResult:
    """The topic codes of ``documents`` (see :func:`document_mask` for the forms it takes,
    and the module docstring for recall, precision and the score they are ranked by).

    ``sites`` limits the codebooks (default: all); ``top`` caps the rows (None: all).
    Raises ``ValueError`` for thresholds outside [0, 1], unknown sites, documents that hold
    no token, or documents that cover the whole cache (nothing outside to compare with).
    """
    for name, value in (("min_recall", min_recall), ("min_precision", min_precision)):
        if not isinstance(value, int | float) or not 0 <= value <= 1:
            raise InputError(f"{name} must be a fraction in [0, 1], got {value!r}")
    if top is not None and (not isinstance(top, int) or top < 1):
        raise InputError(f"top must be a whole number >= 1 or None, got {top!r}")
    chosen = sites_of(cache, sites)
    inside, described = document_mask(cache, documents, within=within)
    n_in = int(inside.sum())
    n_out = inside.numel() - n_in
    if n_in == 0:
        raise InputError(f"the documents ({described}) hold no cached token; choose rows that "
                         "exist or a pattern that matches some row")  # fmt: skip
    if n_out == 0:
        raise InputError(f"the documents ({described}) cover every cached token, so no token "
                         "lies outside them to compare with; choose fewer rows")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for site in chosen:
        lay = cache.layout(site)
        acts_in, total = _code_counts(cache.codes[site].long(), inside, lay["num_codes"])
        acts_out = total - acts_in
        recall = acts_in.double() / n_in
        precision = acts_in.double() / total.clamp_min(1).double()
        score = _log_odds_ratio(acts_in, n_in, acts_out, n_out)
        keep = (acts_in > 0) & (recall >= min_recall) & (precision >= min_precision)
        for g, c in torch.nonzero(keep).tolist():
            rows.append({
                "site": site,
                "head": g if lay["n_groups"] > 1 else None,
                "code": c,
                "k": lay["k"],
                "recall": float(recall[g, c]),
                "precision": float(precision[g, c]),
                "n_acts_in": int(acts_in[g, c]),
                "n_acts_out": int(acts_out[g, c]),
                "score": float(score[g, c]),
            })  # fmt: skip
    rows.sort(key=lambda r: (-r["score"], -r["recall"], r["site"], r["head"] or 0, r["code"]))
    return TopicResult(
        documents=described,
        document_rows=torch.nonzero(inside.any(1)).flatten().tolist(),
        n_tokens_in=n_in,
        n_tokens_out=n_out,
        codes=rows[:top] if top is not None else rows,
        model_fingerprint=cache.manifest["model_fingerprint"],
        min_recall=float(min_recall),
        min_precision=float(min_precision),
    )


Topic = Mapping[str, Any] | tuple[str, int | None, int] | Intervention


def _as_interventions(codes: TopicResult | str | Sequence[Topic]) -> list[Intervention]:
    """Topic codes in any accepted form as ``replace`` interventions (slots not yet set)."""
    if isinstance(codes, TopicResult):
        codes = codes.codes
    if isinstance(codes, str):
        return parse_interventions(codes, "replace")
    out = []
    for c in codes:
        if isinstance(c, Intervention):
            out.append(c)
        elif isinstance(c, Mapping):
            out.append(Intervention(c["site"], int(c["code"]), "replace", head=c.get("head")))
        elif isinstance(c, tuple) and len(c) == 3:
            out.append(Intervention(c[0], int(c[2]), "replace", head=c[1]))
        else:
            raise InputError(
                f"cannot read topic code {c!r}: give TopicResult rows, (site, head, code) "
                "tuples, Intervention objects or a 'SITE[/hHEAD]:CODE,...' spec"
            )
    return out


def _slots_of(iv: Intervention, codes: Any, k: int | Mapping[str, int] | None) -> int | None:
    """The slots of the codebook of ``iv``: from ``k``, else from its topic row."""
    if isinstance(k, Mapping):
        return k.get(iv.site)
    if k is not None:
        return int(k)
    rows = codes.codes if isinstance(codes, TopicResult) else codes
    if isinstance(rows, Sequence) and not isinstance(rows, str):
        for r in rows:
            if isinstance(r, Mapping) and r.get("site") == iv.site and "k" in r:
                return int(r["k"])
    return None


def topic_interventions(
    codes: TopicResult | str | Sequence[Topic],
    *,
    append: bool = False,
    positions: Sequence[int] | None = None,
    k: int | Mapping[str, int] | None = None,
) -> list[Intervention]:
    """Interventions forcing topic codes together, as the paper does.

    ``codes``: a :class:`TopicResult` (all its rows), its ``codes`` rows (or those of
    :func:`~tyche.codebook.search`), ``(site, head, code)`` tuples, interventions, or a spec
    ``"SITE[/hHEAD]:CODE[@POS;POS],..."``. The codes that share a codebook (site and head)
    take its successive slots from the weakest, k-1, k-2, ..., in the order given; each at
    ``positions`` (sequence indices; None: every position), unless a spec or intervention
    gives its own. With ``append`` each code is added as an extra slot instead (k+1, k+2,
    ...), with no limit. A code listed twice for one codebook is kept once.

    ``k`` (an int, or site -> k) says how many slots each codebook has; TopicResult rows
    carry it. Raises ``ValueError`` when a codebook gets more codes than its k slots, or when
    k is unknown for one that gets several (without ``append``).
    """
    where = None if positions is None else tuple(int(p) for p in positions)
    unique: dict[tuple[str, int | None, int], Intervention] = {}
    for iv in _as_interventions(codes):
        unique.setdefault((iv.site, iv.head, iv.code), iv)
    if append:
        return [
            Intervention(iv.site, iv.code, "append", iv.head, iv.positions or where)
            for iv in unique.values()
        ]
    per_book: dict[tuple[str, int | None], list[Intervention]] = {}
    for iv in unique.values():
        per_book.setdefault((iv.site, iv.head), []).append(iv)
    for (site, head), ivs in per_book.items():
        slots = _slots_of(ivs[0], codes, k)
        if slots is None and len(ivs) > 1:
            raise InputError(f"{len(ivs)} topic codes for {_book(site, head)}: say how many "
                             "slots its codebook has (k=, or TopicResult rows, which carry "
                             "it)")  # fmt: skip
        if slots is not None and len(ivs) > slots:
            raise InputError(
                f"{len(ivs)} topic codes for {_book(site, head)}, but its codebook has "
                f"k = {slots} slots: force at most {slots} codes per codebook (head), or "
                "append them as extra slots instead"
            )
    out, taken = [], {book: 0 for book in per_book}
    for iv in unique.values():
        book = (iv.site, iv.head)
        slots = _slots_of(iv, codes, k)
        slot = -1 if slots is None else slots - 1 - taken[book]  # one code, k unknown: k-1
        taken[book] += 1
        out.append(Intervention(iv.site, iv.code, "replace", iv.head,
                                iv.positions or where, slot=slot))  # fmt: skip
    return out
