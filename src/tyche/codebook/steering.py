"""Causal checks of codes: state forcing on TokFSM and topic steering of text.

- :func:`state_forcing`: in a TokFSM model, force at the last token of a prefix ending in state
  s the codes that state s' most often gets (per MLP codebook) and see whether the model now
  predicts as if it were in s' (the paper's patching experiment). Measured on the next token
  (the prediction made at the forced position: the first digit of the next state) and on the
  whole next state (two tokens; the second digit is predicted one position later, where no
  code is forced and the model can read the real state from its digits again): rates, and
  JSDs to the distributions after a prefix that really ends in s'. A third measure carries
  the codes of the run ending in s' through the next state's digits too.
- :func:`word_codes` + :func:`topic_steering`: find codes that fire on a word by regex search
  over a cache, force them at every position while sampling, and count how many continuations
  contain the word, against the same sampling without the intervention.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from tyche.codebook.cache import CodeCache
from tyche.codebook.code_search import search
from tyche.codebook.interventions import Intervention, generate, intervene, target_rate
from tyche.codebook.model import CodebookModel
from tyche.codebook.tokfsm import FSM, next_state_probs, state_labels
from tyche.divergence import token_jsd
from tyche.errors import InputError

__all__ = ["state_codes", "state_forcing", "topic_steering", "word_codes"]


@torch.no_grad()
def state_codes(
    model: CodebookModel,
    fsm: FSM,
    sites: Sequence[str],
    *,
    n: int = 256,
    seq_len: int = 64,
    seed: int = 11,
) -> dict[str, torch.Tensor]:
    """Per site, the code each state most often gets at its last digit: ``(n_states,)`` long
    (-1 for a state never seen). Sites must hold single codebooks (not per head)."""
    tokens = fsm.batch(n, seq_len, torch.Generator().manual_seed(seed))
    labels, _ = state_labels(fsm, tokens)
    model(input_ids=tokens.to(model.device))
    out = {}
    for site in sites:
        layer = model.codebook(site)
        if layer.n_groups != 1:
            raise InputError(f"state_codes needs single codebooks; {site} has one per head")
        ids = layer.last_ids.reshape(*tokens.shape, -1)[..., 0].cpu()
        keep = labels >= 0
        table = torch.zeros(fsm.n_states, layer.num_codes, dtype=torch.long)
        table.index_put_(
            (labels[keep], ids[keep]),
            torch.ones(int(keep.sum()), dtype=torch.long),
            accumulate=True,
        )
        out[site] = torch.where(
            table.sum(-1) > 0, table.argmax(-1), torch.full((fsm.n_states,), -1)
        )
    return out


def _log(p: torch.Tensor) -> torch.Tensor:
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return p.clamp_min(1e-30).log()


def _next_digit_logp(model: CodebookModel, fsm: FSM, prefixes: torch.Tensor) -> torch.Tensor:
    """log P(next token) over the digit tokens, renormalised: ``(n, base)``."""
    logits = model(input_ids=prefixes.to(model.device)).logits[:, -1, : fsm.base].float()
    return torch.log_softmax(logits, dim=-1).cpu()


@torch.no_grad()
def _carried_next_state(
    model: CodebookModel,
    fsm: FSM,
    sites: Sequence[str],
    prefix: torch.Tensor,
    donor: torch.Tensor,
) -> torch.Tensor:
    """P(next state) ``(n_states,)`` after ``prefix`` ``(L,)`` with the top code of every
    codebook at ``sites`` taken from the run of ``donor`` ``(L,)`` (a prefix ending in another
    state) at each position where a digit of the next state is predicted: the last token and
    the next state's own digits so far (the same ones in both runs). Chain rule over digits."""
    b, d, last = fsm.base, fsm.digits, prefix.shape[0] - 1
    # every string of the next state's first d - 1 digits: (b ** (d - 1), d - 1)
    heads = torch.cartesian_prod(*[torch.arange(b)] * (d - 1)) if d > 1 else torch.zeros(1, 0)
    heads = heads.reshape(-1, d - 1).long()
    donors = torch.cat([donor.expand(heads.shape[0], -1), heads], 1).to(model.device)
    model(input_ids=donors)
    codes = {s: model.codebook(s).last_ids.reshape(*donors.shape, -1)[..., 0].cpu() for s in sites}
    logp = torch.empty(heads.shape[0], d, b)  # per row, per digit position: log P(digit)
    for r in range(heads.shape[0]):
        ivs = [
            Intervention(s, int(codes[s][r, last + j]), "force", positions=(last + j,))
            for s in sites
            for j in range(d)
        ]
        row = torch.cat([prefix, heads[r]])[None].to(model.device)
        with intervene(model, ivs):
            logits = model(input_ids=row).logits[0, last:].float()
        # over the whole vocabulary, as next_state_probs: mass on other tokens is lost
        logp[r] = torch.log_softmax(logits, -1)[:, :b].cpu()
    # state with digits (h, x): sum of log P(h_j) read in row h, then log P(x) at the end
    states = torch.arange(b**d)
    rows = states // b  # row index of the state's first d - 1 digits (base-b number)
    total = logp[rows, d - 1, states % b]
    for j in range(d - 1):
        total += logp[rows, j, heads[rows, j]]
    return total.exp()[: fsm.n_states]


@torch.no_grad()
def state_forcing(
    model: CodebookModel,
    fsm: FSM,
    *,
    sites: str | Sequence[str] = "mlp_out.*",
    n_trials: int = 100,
    prefix_states: int = 8,
    n_walks: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Force the state codes of a random other state s' at the last token of prefixes that end
    in state s (see the module docstring). A state's codes are the ones it gets most often
    at its last digit over ``n_walks`` fresh walks.

    Returns, for the next token (the first digit of the next state, predicted at the forced
    position):

    - ``next_token_success_rate``: trials whose patched next-token distribution is closer (JSD)
      to the one after a prefix really ending in s' than to the unpatched one after s;
    - ``next_token_jsd_patched`` / ``next_token_jsd_unpatched``: mean JSD (nats) of the
      patched / unpatched next-token distribution to the one after s';
    - ``next_token_target_mass`` / ``next_token_baseline_mass``: mean probability, patched /
      unpatched, of the digits that begin a successor of s';

    and for the whole next state (both digits, chain rule; the second digit is predicted one
    position after the forced one): ``success_rate`` (most likely next state is a successor
    of s'), ``baseline_rate`` (the same without the intervention), ``mass_on_target`` (mean
    probability of the successors of s', patched) and ``baseline_mass``, ``jsd_patched``
    (mean JSD in nats between the patched next-state distribution and that of a prefix ending
    in s') and ``jsd_unpatched`` (the same for the unpatched prefix); and the same for the
    whole next state with the codes carried through it: ``carried_success_rate``,
    ``carried_mass_on_target`` and ``carried_jsd_patched``, where at the last token and at the
    next state's own digits every codebook at ``sites`` gets the top code it has in the run of
    the prefix that really ends in s' (at the last token these are the codes of s' in context; one
    position later, the codes that follow them).
    """
    chosen = model.match(sites)
    codes = state_codes(model, fsm, chosen, n=n_walks)
    g = torch.Generator().manual_seed(seed)
    walks = fsm.walks(n_trials, prefix_states, g)
    targets = torch.randint(fsm.n_states - 1, (n_trials,), generator=g)
    targets = targets + (targets >= walks[:, -1]).long()  # any state but the last one
    prefixes = fsm.encode(walks)
    swapped = fsm.encode(torch.cat([walks[:, :-1], targets[:, None]], 1))
    edges = fsm.edges()
    clean = next_state_probs(model, fsm, prefixes)
    target_clean = next_state_probs(model, fsm, swapped)
    clean_tok = _next_digit_logp(model, fsm, prefixes)
    target_tok = _next_digit_logp(model, fsm, swapped)
    patched = torch.empty_like(clean)
    patched_tok = torch.empty_like(clean_tok)
    last = prefixes.shape[1] - 1
    for i in range(n_trials):
        ivs = [
            Intervention(s, int(codes[s][targets[i]]), "force", positions=(last,))
            for s in chosen
            if codes[s][targets[i]] >= 0
        ]
        with intervene(model, ivs):
            patched[i] = next_state_probs(model, fsm, prefixes[i : i + 1])[0]
            patched_tok[i] = _next_digit_logp(model, fsm, prefixes[i : i + 1])[0]
    carried = torch.stack(
        [_carried_next_state(model, fsm, chosen, prefixes[i], swapped[i]) for i in range(n_trials)]
    )
    succ = edges[targets]  # (n, N) bool
    hit = succ.gather(1, patched.argmax(-1, keepdim=True)).float()
    base_hit = succ.gather(1, clean.argmax(-1, keepdim=True)).float()
    # the digits that begin a successor of s': (n, base) bool
    first = torch.zeros(n_trials, fsm.base, dtype=torch.bool)
    first.scatter_(1, fsm.successors[targets] // fsm.base ** (fsm.digits - 1), True)
    to_target = token_jsd(patched_tok, target_tok)
    return {
        "sites": chosen,
        "n_trials": n_trials,
        "next_token_success_rate": float(
            (to_target < token_jsd(patched_tok, clean_tok)).float().mean()
        ),
        "next_token_jsd_patched": float(to_target.mean()),
        "next_token_jsd_unpatched": float(token_jsd(clean_tok, target_tok).mean()),
        "next_token_target_mass": float((patched_tok.exp() * first).sum(-1).mean()),
        "next_token_baseline_mass": float((clean_tok.exp() * first).sum(-1).mean()),
        "success_rate": float(hit.mean()),
        "baseline_rate": float(base_hit.mean()),
        "mass_on_target": float((patched * succ).sum(-1).mean()),
        "baseline_mass": float((clean * succ).sum(-1).mean()),
        "jsd_patched": float(token_jsd(_log(patched), _log(target_clean)).mean()),
        "jsd_unpatched": float(token_jsd(_log(clean), _log(target_clean)).mean()),
        "carried_success_rate": float(
            succ.gather(1, carried.argmax(-1, keepdim=True)).float().mean()
        ),
        "carried_mass_on_target": float((carried * succ).sum(-1).mean()),
        "carried_jsd_patched": float(token_jsd(_log(carried), _log(target_clean)).mean()),
    }


def word_codes(
    cache: CodeCache,
    pattern: str,
    *,
    sites: Sequence[str] | None = None,
    max_codes: int = 8,
    min_precision: float = 0.5,
    min_recall: float = 0.05,
) -> list[Intervention]:
    """Interventions forcing the most precise codes for ``pattern`` at every position.

    The codes are those of :func:`~tyche.codebook.code_search.search` with precision >=
    ``min_precision`` and recall >= ``min_recall``, best first, at most ``max_codes``; each
    becomes a ``replace`` intervention (so with k > 1 several codes of one codebook fill its
    weakest slots).
    """
    found = search(
        cache,
        pattern,
        sites=sites,
        min_recall=min_recall,
        min_precision=min_precision,
        top=max_codes,
        neurons=False,
    )
    return [Intervention(m["site"], m["code"], "replace", head=m["head"]) for m in found.matches]


def topic_steering(
    model: CodebookModel,
    tokenizer: Any,
    prompts: Sequence[str],
    word_pattern: str,
    interventions: Sequence[Intervention],
    *,
    samples_per_prompt: int = 10,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """How often sampled continuations contain ``word_pattern`` (case-insensitive regex),
    without and with the interventions; the same seeds are used for both."""
    if not prompts:
        raise InputError("topic_steering needs at least one prompt")
    texts: dict[str, list[str]] = {"baseline": [], "steered": []}
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids.repeat(samples_per_prompt, 1)
        for name, ivs in (("baseline", ()), ("steered", interventions)):
            out = generate(
                model,
                ids,
                ivs,
                seed=seed + i,
                do_sample=True,
                top_k=0,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            texts[name] += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return {
        "pattern": word_pattern,
        "n": len(texts["baseline"]),
        "baseline_rate": target_rate(texts["baseline"], word_pattern),
        "steered_rate": target_rate(texts["steered"], word_pattern),
        "codes": [
            f"{iv.site}{'' if iv.head is None else f'/h{iv.head}'}:{iv.code}"
            for iv in interventions
        ],
        "examples": {k: v[:2] for k, v in texts.items()},
    }


def word_regex(word: str, *, before: bool = False) -> str:
    """A case-insensitive regex matching ``word`` as a whole word; with ``before`` its group
    marks the token just before the word (whose codes predict it)."""
    if before:
        return rf"(?i)(\S)(?=\s*\b{re.escape(word)}\b)"
    return rf"(?i)\b{re.escape(word)}\b"
