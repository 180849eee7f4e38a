"""Find codes by what they fire on: regex search, the neuron baseline, top contexts.

:func:`search` matches a regex against the cached texts; the token where each match starts
(or, when the pattern has a group, where group 1 starts: ``New (York)`` targets "York") is a
*matched position*; the set of them is M. For each code c of each codebook, with n_c the
matched positions where c is among the chosen k and A_c all positions where it is,

    recall(c) = n_c / |M|,        precision(c) = n_c / A_c.

Codes with recall below ``min_recall`` are dropped; the rest are ranked by precision, then
recall. The *neuron baseline* (the paper's comparison): for each dense dimension of the same
site (either sign), set its threshold so that it fires on the same share of M as the code
(the code's recall) and measure its precision; the best neuron's precision is reported next
to each code.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from tyche.codebook.cache import CodeCache, sites_of
from tyche.errors import InputError
from tyche.io import ResultIO

__all__ = ["Context", "SearchResult", "code_contexts", "match_positions", "search"]


def match_positions(
    cache: CodeCache,
    pattern: str,
    *,
    parity: Literal["even", "odd"] | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Matched positions ``(m, 2)`` long (row, token), sorted and distinct.

    ``parity`` keeps only even or odd token positions (TokFSM: ``"odd"`` are first digits).
    ``window > 0`` replaces each matched token by the ``window`` tokens that follow it in its
    row: the positions whose recent context holds the pattern (a *topic* search: codes that
    keep firing after a word was seen). Raises ``ValueError`` for an invalid regex.
    """
    if not isinstance(window, int) or window < 0:
        raise InputError(f"window must be an int >= 0, got {window!r}")
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise InputError(f"invalid regex {pattern!r}: {err}") from err
    found: list[tuple[int, int]] = []
    for row, text in enumerate(cache.texts):
        chars = [
            m.start(1) if regex.groups else m.start()
            for m in regex.finditer(text)
            if (m.group(1) if regex.groups else m.group(0))
        ]
        if not chars:
            continue
        ends = cache.offsets[row, 1:]
        tokens = torch.searchsorted(ends, torch.tensor(chars), right=True)
        found.extend((row, int(t)) for t in tokens if t < cache.seq_len)
    pos = torch.tensor(sorted(set(found)), dtype=torch.long).reshape(-1, 2)
    if window:
        shifts = torch.arange(1, window + 1)
        after = pos[:, None, :].repeat(1, window, 1)
        after[..., 1] += shifts
        after = after.reshape(-1, 2)
        after = after[after[:, 1] < cache.seq_len]
        pos = torch.unique(after, dim=0).reshape(-1, 2)
    if parity is not None:
        pos = pos[pos[:, 1] % 2 == (0 if parity == "even" else 1)]
    return pos


def _best_neuron(acts: torch.Tensor, matched: torch.Tensor, recall: float) -> tuple[float, int]:
    """Best precision of one dense dimension (either sign) firing on ``recall`` of M.

    ``acts`` ``(P, D)`` over all positions, ``matched`` bool ``(P,)``. Returns (precision,
    signed dimension index: ``-(j + 1)`` for the negated dimension j).
    """
    need = max(1, math.ceil(recall * int(matched.sum()) - 1e-9))
    best, best_j = 0.0, 0
    for sign in (1.0, -1.0):
        a = acts * sign
        tau = a[matched].topk(need, dim=0).values[-1]  # (D,): lowest kept value on M
        fires = a >= tau
        hits = (fires & matched[:, None]).sum(0).double()
        prec = hits / fires.sum(0).clamp_min(1).double()
        j = int(prec.argmax())
        if float(prec[j]) > best:
            best, best_j = float(prec[j]), (j if sign > 0 else -(j + 1))
    return best, best_j


@dataclass(frozen=True)
class SearchResult(ResultIO):
    """Codes ranked for a regex; ``matches`` rows are dicts with ``site``, ``head``, ``code``,
    ``precision``, ``recall``, ``n_matched``, ``n_fires`` and, with the neuron baseline,
    ``neuron_precision``, ``neuron`` (signed index) and ``beats_neuron``."""

    pattern: str
    n_positions: int
    matches: list[dict[str, Any]]
    model_fingerprint: str
    #: fraction of listed codes more precise than the best neuron at equal recall
    frac_beating_neurons: float | None = None
    UNITS: ClassVar[dict[str, str]] = {"precision": "fraction", "recall": "fraction"}

    def table(self, n: int | None = None) -> str:
        """The matches as a text table."""
        head = f"{'site':<16} {'head':>4} {'code':>6} {'prec':>6} {'recall':>6} {'fires':>7}"
        neuron = any("neuron_precision" in m for m in self.matches)
        if neuron:
            head += f" {'best neuron prec':>16}"
        lines = [f"pattern {self.pattern!r}: {self.n_positions} matched tokens", head]
        for m in self.matches[:n]:
            row = (
                f"{m['site']:<16} {'-' if m['head'] is None else m['head']:>4} "
                f"{m['code']:>6} {m['precision']:6.3f} {m['recall']:6.3f} {m['n_fires']:>7}"
            )
            if neuron and "neuron_precision" in m:
                row += f" {m['neuron_precision']:16.3f}"
            lines.append(row)
        if self.frac_beating_neurons is not None:
            lines.append(
                f"codes more precise than the best neuron: {100 * self.frac_beating_neurons:.0f}%"
            )
        return "\n".join(lines)


def search(
    cache: CodeCache,
    pattern: str,
    *,
    sites: Sequence[str] | None = None,
    min_recall: float = 0.01,
    min_precision: float = 0.0,
    top: int | None = 20,
    parity: Literal["even", "odd"] | None = None,
    window: int = 0,
    neurons: bool = True,
) -> SearchResult:
    """Codes that fire on ``pattern``, ranked by precision (see the module docstring).

    ``top`` caps the rows (None: all). ``window`` searches the tokens after each match
    instead (:func:`match_positions`). ``neurons`` adds the neuron baseline when the cache
    stores dense activations. Raises ``ValueError`` for a bad regex or unknown sites.
    """
    chosen = sites_of(cache, sites)
    pos = match_positions(cache, pattern, parity=parity, window=window)
    m = pos.shape[0]
    rows: list[dict[str, Any]] = []
    if m:
        for site in chosen:
            lay = cache.layout(site)
            ids = cache.codes[site][pos[:, 0], pos[:, 1]].long()  # (m, G, k)
            total = cache.counts(site)  # (G, N)
            for g in range(lay["n_groups"]):
                hits = torch.bincount(ids[:, g].reshape(-1), minlength=lay["num_codes"])
                recall = hits.double() / m
                prec = hits.double() / total[g].clamp_min(1).double()
                keep = (recall >= min_recall) & (prec >= min_precision) & (hits > 0)
                for c in torch.nonzero(keep).flatten().tolist():
                    rows.append(
                        {
                            "site": site,
                            "head": g if lay["n_groups"] > 1 else None,
                            "code": c,
                            "precision": float(prec[c]),
                            "recall": float(recall[c]),
                            "n_matched": int(hits[c]),
                            "n_fires": int(total[g, c]),
                        }
                    )
    rows.sort(key=lambda r: (-r["precision"], -r["recall"], r["site"], r["head"] or 0, r["code"]))
    rows = rows[:top] if top is not None else rows
    frac = None
    if neurons and rows and cache.manifest.get("neurons"):
        matched = torch.zeros(cache.n_sequences, cache.seq_len, dtype=torch.bool)
        matched[pos[:, 0], pos[:, 1]] = True
        matched = matched.reshape(-1)
        by_site: dict[str, torch.Tensor] = {}
        for r in rows:
            if r["site"] not in by_site:
                by_site[r["site"]] = cache.neurons[r["site"]].reshape(matched.shape[0], -1).float()
            r["neuron_precision"], r["neuron"] = _best_neuron(
                by_site[r["site"]], matched, r["recall"]
            )
            r["beats_neuron"] = r["precision"] > r["neuron_precision"]
        frac = sum(r["beats_neuron"] for r in rows) / len(rows)
    return SearchResult(pattern, m, rows, cache.manifest["model_fingerprint"], frac)


@dataclass(frozen=True)
class Context:
    """A token where a code fired, with text around it: ``before + token + after``."""

    row: int
    position: int
    before: str
    token: str
    after: str

    def render(self, style: Literal["brackets", "html", "ansi"] = "brackets") -> str:
        """One line: the token marked with ``[[ ]]``, an HTML ``<mark>`` or ANSI colour."""
        before, token, after = (s.replace("\n", "⏎") for s in (self.before, self.token, self.after))
        if style == "html":
            return f"{html.escape(before)}<mark>{html.escape(token)}</mark>{html.escape(after)}"
        if style == "ansi":
            return f"{before}\x1b[1;31m{token}\x1b[0m{after}"
        return f"{before}[[{token}]]{after}"


def code_contexts(
    cache: CodeCache,
    site: str,
    code: int,
    *,
    head: int | None = None,
    n: int = 20,
    window: int = 12,
    slots: int | None = None,
) -> list[Context]:
    """Up to ``n`` tokens where ``code`` fired at ``site`` (``head`` for per-head codebooks),
    each with ``window`` tokens of text either side, in cache order.

    ``slots`` counts only firings among the first ``slots`` of the k slots (best codes).
    """
    lay = cache.layout(site)
    if not 0 <= code < lay["num_codes"]:
        raise InputError(f"code id {code} is out of range at {site} ({lay['num_codes']} codes)")
    if lay["n_groups"] > 1 and head is None:
        raise InputError(f"{site} has {lay['n_groups']} heads; give head=H")
    g = head or 0
    if not 0 <= g < lay["n_groups"]:
        raise InputError(f"head {head} does not exist at {site} ({lay['n_groups']} heads)")
    ids = cache.codes[site][:, :, g, : slots or lay["k"]]
    where = torch.nonzero((ids == code).any(-1))[:n]
    out = []
    for row, pos in where.tolist():
        off = cache.offsets[row]
        lo, hi = max(0, pos - window), min(cache.seq_len, pos + window + 1)
        text = cache.texts[row]
        out.append(
            Context(
                row,
                pos,
                text[int(off[lo]) : int(off[pos])],
                text[int(off[pos]) : int(off[pos + 1])],
                text[int(off[pos + 1]) : int(off[hi])],
            )
        )
    return out
