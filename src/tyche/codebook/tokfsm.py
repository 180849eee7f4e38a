"""TokFSM: the codebook paper's finite-state-machine language, its data and its metrics.

An :class:`FSM` has ``n_states`` states, each with ``n_edges`` distinct successors drawn
uniformly without replacement (self-loops possible), each taken with probability
``1/n_edges``. A state is written as ``digits`` base-``base`` digits (100 states, base 10: "00"
to "99"), one token per digit; token ``base`` (10) is ``<|endoftext|>`` (BOS, EOS and pad).
A sequence is BOS followed by the digits of a random walk from a uniform start state, cut to
``seq_len`` tokens. The loss floor is ``ln(n_edges)/digits`` nats per digit token (1.15 for
the paper's FSM); a uniform guess costs ``ln(base)`` (2.30).

Metrics of a model on the FSM:

- :func:`transition_accuracy`: sample sequences from BOS (temperature 1) and count the
  consecutive state pairs that are edges of the FSM (also: how often the first one is);
- :func:`first_transition_accuracy`: over *all* states s, the overlap of the model's top
  ``n_edges`` next states after ``BOS s`` (exact two-token chain rule) with the true
  successors, averaged;
- :func:`code_purity`: per codebook, how purely each code that fires at the second digit of
  a state belongs to one state (and at first digits, to one trigram: previous state and
  first digit).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyche.errors import InputError
from tyche.frameworks import as_module

__all__ = [
    "FSM",
    "code_purity",
    "first_transition_accuracy",
    "next_state_probs",
    "transition_accuracy",
]

FSM_FILE = "fsm.json"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class FSM:
    """A TokFSM: ``successors`` ``(n_states, n_edges)`` long, written in ``base``."""

    successors: torch.Tensor = field(repr=False)
    base: int = 10
    seed: int | None = None

    def __post_init__(self) -> None:
        s = self.successors
        if s.dim() != 2 or s.dtype != torch.long:
            raise InputError(f"successors must be a (n_states, n_edges) long tensor, got {s}")
        if s.numel() and (s.min() < 0 or s.max() >= s.shape[0]):
            raise InputError("successors must be state ids in [0, n_states)")
        if self.base < 2:
            raise InputError(f"base must be >= 2, got {self.base}")

    # ------------------------------------------------------------------ shape
    @classmethod
    def random(
        cls, n_states: int = 100, n_edges: int = 10, *, base: int = 10, seed: int = 0
    ) -> FSM:
        """Each state gets ``n_edges`` distinct uniform successors (seeded)."""
        if not 1 <= n_edges <= n_states:
            raise InputError(f"need 1 <= n_edges <= n_states, got {n_edges}, {n_states}")
        g = torch.Generator().manual_seed(seed)
        # distinct successors: the first n_edges of a random permutation per row
        keys = torch.rand(n_states, n_states, generator=g)
        succ = keys.argsort(dim=1)[:, :n_edges].sort(dim=1).values
        return cls(succ, base=base, seed=seed)

    @property
    def n_states(self) -> int:
        return self.successors.shape[0]

    @property
    def n_edges(self) -> int:
        return self.successors.shape[1]

    @property
    def digits(self) -> int:
        """Tokens per state: ``ceil(log_base n_states)`` (at least 1)."""
        return max(1, math.ceil(math.log(self.n_states, self.base) - 1e-12))

    @property
    def bos_id(self) -> int:
        return self.base

    @property
    def vocab_size(self) -> int:
        return self.base + 1

    def edges(self) -> torch.Tensor:
        """Bool transition matrix ``(n_states, n_states)``: ``[s, t]`` is an edge."""
        m = torch.zeros(self.n_states, self.n_states, dtype=torch.bool)
        m.scatter_(1, self.successors, True)
        return m

    @property
    def loss_floor(self) -> float:
        """Entropy of the next digit, nats per digit token (a perfect model's loss)."""
        return math.log(self.n_edges) / self.digits

    # ------------------------------------------------------------------ data
    def walks(self, n: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random walks of ``length`` states: long ``(n, length)``.

        Vectorised over walks: one draw of all start states and edge choices, then one
        gather per step.
        """
        start = torch.randint(self.n_states, (n,), generator=generator)
        choice = torch.randint(self.n_edges, (n, max(length - 1, 0)), generator=generator)
        states = torch.empty(n, length, dtype=torch.long)
        if length == 0:
            return states
        states[:, 0] = start
        for t in range(1, length):
            states[:, t] = self.successors[states[:, t - 1], choice[:, t - 1]]
        return states

    def encode(self, states: torch.Tensor, *, bos: bool = True) -> torch.Tensor:
        """Tokens of states ``(..., L)``: ``(..., [1 +] L * digits)``, most significant first."""
        powers = self.base ** torch.arange(self.digits - 1, -1, -1)
        tokens = (states.unsqueeze(-1) // powers) % self.base
        tokens = tokens.flatten(-2)
        if bos:
            first = torch.full((*tokens.shape[:-1], 1), self.bos_id, dtype=torch.long)
            tokens = torch.cat([first, tokens], dim=-1)
        return tokens

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """States of digit tokens ``(..., L * digits)`` (no BOS): ``(..., L)``; -1 where a
        group of digits holds a non-digit token."""
        usable = tokens.shape[-1] // self.digits * self.digits
        groups = tokens[..., :usable].unflatten(-1, (-1, self.digits))
        powers = self.base ** torch.arange(self.digits - 1, -1, -1, device=tokens.device)
        valid = ((groups >= 0) & (groups < self.base)).all(-1)
        states = (groups.clamp(0, self.base - 1) * powers).sum(-1)
        states = torch.where(valid & (states < self.n_states), states, torch.full_like(states, -1))
        return states

    def batch(self, n: int, seq_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` training sequences: BOS + digits of a walk, cut to ``seq_len`` tokens."""
        n_states = math.ceil((seq_len - 1) / self.digits)
        return self.encode(self.walks(n, n_states, generator))[:, :seq_len]

    def text(self, tokens: torch.Tensor) -> str:
        """A token row as text (digits; BOS as ``<|endoftext|>``)."""
        return "".join(EOS if t == self.bos_id else str(int(t)) for t in tokens.tolist())

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {
            "n_states": self.n_states,
            "n_edges": self.n_edges,
            "base": self.base,
            "digits": self.digits,
            "seed": self.seed,
            "successors": self.successors.tolist(),
            "tokens": {**{str(d): d for d in range(self.base)}, EOS: self.bos_id},
            "special_tokens": {"bos": EOS, "eos": EOS, "pad": EOS},
            "encoding": "a state is its digits in base `base`, most significant first, "
            "zero-padded to `digits` tokens; each digit is one token",
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``fsm.json`` into the folder ``path`` (or to ``path`` if it ends in .json)."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / FSM_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(self.to_json()) + "\n")
        return file

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FSM:
        """Read an ``fsm.json`` (a folder holding one, or the file)."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / FSM_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no {FSM_FILE} at {path}")
        data = json.loads(file.read_text())
        return cls(
            torch.tensor(data["successors"], dtype=torch.long),
            base=data["base"],
            seed=data.get("seed"),
        )

    def tokenizer(self) -> Any:
        """A ``PreTrainedTokenizerFast``: one token per digit, ``<|endoftext|>`` = BOS/EOS/pad."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {str(d): d for d in range(self.base)} if self.base <= 10 else {}
        if self.base > 10:
            raise InputError("the text tokenizer supports base <= 10 (one character per digit)")
        vocab[EOS] = self.bos_id
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|endoftext\|>|."), "isolated")
        tok.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS
        )


# ---------------------------------------------------------------------- metrics
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def next_state_probs(
    model: nn.Module, fsm: FSM, prefixes: torch.Tensor, *, batch_size: int = 1024
) -> torch.Tensor:
    """P(next state | prefix) ``(n, n_states)`` by the chain rule over its digit tokens.

    ``prefixes`` ``(n, L)`` end where a state ends. Each digit's distribution is the model's
    softmax over the whole vocabulary restricted to digit tokens (mass the model puts on BOS is
    lost, so rows may sum to less than 1). One forward pass per digit position. ``model``
    maps ``input_ids`` to ``.logits`` (or is a TransformerLens / nnsight model).
    """
    model = as_module(model)
    device = _device(model)
    n, d, b = prefixes.shape[0], fsm.digits, fsm.base
    logp = torch.zeros(n, 1, device=device)  # (n, b**depth), over digit strings so far
    seqs = prefixes.to(device).unsqueeze(1)  # (n, b**depth, L + depth)
    for _ in range(d):
        flat = seqs.reshape(-1, seqs.shape[-1])
        out = [
            model(input_ids=flat[i : i + batch_size]).logits[:, -1].float()
            for i in range(0, flat.shape[0], batch_size)
        ]
        step = torch.log_softmax(torch.cat(out), dim=-1)[:, :b].view(n, -1, b)
        logp = (logp.unsqueeze(-1) + step).reshape(n, -1)
        digits = torch.arange(b, device=device).view(1, 1, b, 1).expand(n, seqs.shape[1], b, 1)
        seqs = torch.cat([seqs.unsqueeze(2).expand(-1, -1, b, -1), digits], -1)
        seqs = seqs.reshape(n, -1, seqs.shape[-1])
    return logp.exp()[:, : fsm.n_states].cpu()


def first_transition_accuracy(model: nn.Module, fsm: FSM) -> float:
    """Mean over all states s of |top-``n_edges`` next states after ``BOS s`` ∩ successors(s)|
    / ``n_edges`` (exact, no sampling)."""
    states = torch.arange(fsm.n_states).unsqueeze(1)
    probs = next_state_probs(model, fsm, fsm.encode(states))
    top = probs.topk(fsm.n_edges, dim=-1).indices
    hits = fsm.edges().gather(1, top)
    return float(hits.float().mean())


@torch.no_grad()
def sample(model: nn.Module, fsm: FSM, n: int, seq_len: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` sequences of ``seq_len`` tokens sampled from BOS at temperature 1, seeded by
    ``seed`` (the global RNG is not used). Any model mapping ``input_ids`` to ``.logits``
    (or a TransformerLens / nnsight model)."""
    model = as_module(model)
    device = _device(model)
    g = torch.Generator().manual_seed(seed)
    seqs = torch.full((n, 1), fsm.bos_id, dtype=torch.long, device=device)
    for _ in range(seq_len - 1):
        probs = torch.softmax(model(input_ids=seqs).logits[:, -1].float(), dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=g).to(device)
        seqs = torch.cat([seqs, nxt], dim=1)
    return seqs.cpu()


def transition_accuracy(
    model: nn.Module, fsm: FSM, *, n: int = 100, seq_len: int = 128, seed: int = 0
) -> dict[str, float]:
    """Sample ``n`` sequences from BOS; ``transition_accuracy`` is the fraction of consecutive
    state pairs that are FSM edges (pairs with a non-digit token count as wrong),
    ``first_transition_sampled`` the same for the first pair of each sequence."""
    tokens = sample(model, fsm, n, seq_len, seed=seed)
    states = fsm.decode(tokens[:, 1:])
    src, dst = states[:, :-1], states[:, 1:]
    ok = (src >= 0) & (dst >= 0)
    edge = fsm.edges()[src.clamp_min(0), dst.clamp_min(0)] & ok
    return {
        "transition_accuracy": float(edge.float().mean()),
        "first_transition_sampled": float(edge[:, 0].float().mean()),
        "n_transitions": int(edge.numel()),
    }


# ---------------------------------------------------------------------- purity
def state_labels(fsm: FSM, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of BOS-first sequences ``(n, T)``: (state label at the last digit of each
    state, else -1; trigram label ``prev_state * base + digit`` at the first digit of each
    state after the first, else -1). Needs ``digits == 2`` for the trigram labels."""
    n, t = tokens.shape
    states = fsm.decode(tokens[:, 1:])  # (n, L)
    d = fsm.digits
    state_lab = torch.full((n, t), -1, dtype=torch.long)
    tri_lab = torch.full((n, t), -1, dtype=torch.long)
    last = 1 + torch.arange(states.shape[1]) * d + (d - 1)
    state_lab[:, last] = states
    if states.shape[1] > 1:
        first = 1 + torch.arange(1, states.shape[1]) * d
        first_digit = tokens[:, first]
        prev = states[:, :-1]
        tri = torch.where(prev >= 0, prev * fsm.base + first_digit, torch.full_like(prev, -1))
        tri_lab[:, first] = tri
    return state_lab, tri_lab


def purity_of(codes: torch.Tensor, labels: torch.Tensor, num_codes: int) -> dict[str, Any]:
    """Purity of codes w.r.t. labels (both ``(m,)``; labels >= 0 are used).

    For each code that fires, purity = the share of its firings on its most common label.
    Returns ``n_firing``, ``frac_pure_90`` (codes with purity >= 0.9 among those that fire),
    ``mean_purity`` (over firing codes) and ``weighted_purity`` (over firings).
    """
    keep = labels >= 0
    codes, labels = codes[keep], labels[keep]
    if codes.numel() == 0:
        return {
            "n_firing": 0,
            "frac_pure_90": float("nan"),
            "mean_purity": float("nan"),
            "weighted_purity": float("nan"),
            "n_tokens": 0,
        }
    n_labels = int(labels.max()) + 1
    table = torch.bincount(codes * n_labels + labels, minlength=num_codes * n_labels)
    table = table.view(num_codes, n_labels)
    totals = table.sum(-1)
    firing = totals > 0
    purity = table.max(-1).values[firing].double() / totals[firing].double()
    return {
        "n_firing": int(firing.sum()),
        "frac_pure_90": float((purity >= 0.9).double().mean()),
        "mean_purity": float(purity.mean()),
        "weighted_purity": float(table.max(-1).values.sum() / totals.sum()),
        "n_tokens": int(codes.numel()),
    }


@torch.no_grad()
def code_purity(
    cb_model: Any,
    fsm: FSM,
    *,
    n: int = 256,
    seq_len: int = 128,
    seed: int = 1,
    batch_size: int = 64,
) -> dict[str, dict[str, Any]]:
    """Purity of every codebook's top code against FSM state and trigram on fresh walks.

    ``cb_model`` is a :class:`~tyche.codebook.CodebookModel`. Returns ``{key: report}``
    with keys ``site`` (vanilla) or ``site/head{h}`` (grouped), each report holding
    ``state`` and ``trigram`` dicts from :func:`purity_of`.
    """
    tokens = fsm.batch(n, seq_len, torch.Generator().manual_seed(seed))
    state_lab, tri_lab = state_labels(fsm, tokens)
    layers = cb_model.layers()
    ids: dict[str, list[torch.Tensor]] = {s: [] for s in layers}
    device = cb_model.device
    for i in range(0, n, batch_size):
        cb_model(input_ids=tokens[i : i + batch_size].to(device))
        for site, layer in layers.items():
            last = layer.last_ids
            grouped = last if last.dim() == 4 else last.unsqueeze(-2)  # (B, T, G, k)
            ids[site].append(grouped[..., 0].cpu())
    out: dict[str, dict[str, Any]] = {}
    for site, layer in layers.items():
        top = torch.cat(ids[site])  # (n, T, G)
        for g in range(top.shape[-1]):
            key = site if top.shape[-1] == 1 else f"{site}/head{g}"
            codes = top[..., g].reshape(-1)
            out[key] = {
                "state": purity_of(codes, state_lab.reshape(-1), layer.num_codes),
                "trigram": purity_of(codes, tri_lab.reshape(-1), layer.num_codes),
            }
    return out
