"""TokFSM: the machine, its data, and its metrics against an exact oracle model."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from tyche.codebook.tokfsm import (
    FSM,
    first_transition_accuracy,
    next_state_probs,
    purity_of,
    sample,
    state_labels,
    transition_accuracy,
)


class Oracle(torch.nn.Module):
    """The exact next-token distribution of an FSM's sequences (BOS + 2 digits per state)."""

    def __init__(self, fsm: FSM) -> None:
        super().__init__()
        self.fsm = fsm
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def _dist(self, row: list[int]) -> torch.Tensor:
        f, b = self.fsm, self.fsm.base
        p = torch.zeros(f.vocab_size)
        digits = row[1:]
        states = [digits[i] * b + digits[i + 1] for i in range(0, len(digits) - 1, 2)]
        if len(digits) % 2 == 0:  # next: the first digit of the next state
            options = f.successors[states[-1]].tolist() if states else range(f.n_states)
            for s in options:
                p[s // b] += 1
        else:  # next: the second digit, given the first
            options = f.successors[states[-1]].tolist() if states else range(f.n_states)
            for s in options:
                if s // b == digits[-1]:
                    p[s % b] += 1
        if p.sum() == 0:  # a first digit no successor has: never reached with probability > 0
            p += 1
        return (p / p.sum()).clamp_min(1e-30).log()

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        rows = input_ids.tolist()
        logits = torch.stack(
            [torch.stack([self._dist(r[: t + 1]) for t in range(len(r))]) for r in rows]
        )
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def fsm() -> FSM:
    return FSM.random(100, 10, seed=0)


def test_machine(fsm: FSM) -> None:
    assert (fsm.n_states, fsm.n_edges, fsm.digits, fsm.vocab_size) == (100, 10, 2, 11)
    assert all(len(set(row)) == 10 for row in fsm.successors.tolist())  # distinct successors
    assert fsm.edges().sum() == 1000
    assert fsm.loss_floor == pytest.approx(math.log(10) / 2, rel=1e-15)  # the same float64 formula
    assert torch.equal(FSM.random(100, 10, seed=0).successors, fsm.successors)
    assert not torch.equal(FSM.random(100, 10, seed=1).successors, fsm.successors)


def test_walks_follow_edges_and_are_uniform(fsm: FSM) -> None:
    walks = fsm.walks(4000, 20, torch.Generator().manual_seed(0))
    edges = fsm.edges()
    assert edges[walks[:, :-1], walks[:, 1:]].all()
    # each successor of a state is taken with probability 1/10: chi-square-free check on the
    # most visited state, 10 bins; 5 sigma of a binomial
    src, dst = walks[:, :-1].reshape(-1), walks[:, 1:].reshape(-1)
    s = int(torch.bincount(src).argmax())
    counts = torch.bincount(dst[src == s], minlength=100)[fsm.successors[s]].double()
    n = counts.sum()
    assert (counts - n / 10).abs().max() < 5 * math.sqrt(n * 0.1 * 0.9)


def test_encode_decode_and_tokenizer(fsm: FSM, tmp_path) -> None:
    states = torch.tensor([[7, 42, 99, 0]])
    tokens = fsm.encode(states)
    assert tokens.tolist() == [[10, 0, 7, 4, 2, 9, 9, 0, 0]]
    assert torch.equal(fsm.decode(tokens[:, 1:]), states)
    assert fsm.decode(torch.tensor([[1, 10, 3, 4]])).tolist() == [[-1, 34]]
    batch = fsm.batch(3, 64, torch.Generator().manual_seed(1))
    assert batch.shape == (3, 64) and (batch[:, 0] == 10).all()
    tok = fsm.tokenizer()
    text = fsm.text(tokens[0])
    assert text == "<|endoftext|>07429900"
    assert tok(text)["input_ids"] == tokens[0].tolist()
    assert tok.decode(tokens[0]) == text
    fsm.save(tmp_path)
    assert torch.equal(FSM.load(tmp_path).successors, fsm.successors)


def test_metrics_of_the_exact_oracle(fsm: FSM) -> None:
    oracle = Oracle(fsm)
    probs = next_state_probs(oracle, fsm, fsm.encode(torch.tensor([[3], [58]])))
    want = fsm.edges()[[3, 58]].double() / 10
    torch.testing.assert_close(probs.double(), want, atol=1e-6, rtol=0)  # float32 softmax
    assert first_transition_accuracy(oracle, fsm) == 1.0
    sampled = transition_accuracy(oracle, fsm, n=8, seq_len=21, seed=0)
    assert sampled["transition_accuracy"] == 1.0 and sampled["n_transitions"] == 8 * 9


def test_metrics_of_a_uniform_model(fsm: FSM) -> None:
    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, fsm.vocab_size))

    model = Uniform()
    acc = transition_accuracy(model, fsm, n=200, seq_len=41, seed=0)
    # a random digit pair is a valid successor with probability 10/100, unless BOS is drawn
    # (1/11 per token); 3600 pairs: 5 sigma ≈ 0.025
    p_edge = 0.1 * (10 / 11) ** 2
    assert abs(acc["transition_accuracy"] - p_edge) < 0.03
    assert torch.equal(sample(model, fsm, 2, 5, seed=3), sample(model, fsm, 2, 5, seed=3))


def test_state_labels_and_purity(fsm: FSM) -> None:
    tokens = fsm.encode(torch.tensor([[12, 34, 56]]))  # BOS 1 2 3 4 5 6
    state, trigram = state_labels(fsm, tokens)
    assert state.tolist() == [[-1, -1, 12, -1, 34, -1, 56]]
    assert trigram.tolist() == [[-1, -1, -1, 123, -1, 345, -1]]
    codes = torch.tensor([0, 0, 0, 1, 1, 2, 5])
    labels = torch.tensor([3, 3, 4, 7, 7, 9, -1])
    rep = purity_of(codes, labels, num_codes=6)
    # code 0: 2/3 pure, code 1: 1, code 2: 1; the -1 label is ignored (code 5 never fires)
    assert rep["n_firing"] == 3
    # ratios of counts ≤ 7: a float64 mean of ≤ 3 of them (≤ 3 eps64), and weighted_purity a
    # float32 quotient (one rounding, ≤ 6e-8 relative); rel 1e-6 (a wrong count is ≥ 5% off)
    assert rep["frac_pure_90"] == pytest.approx(2 / 3, rel=1e-6)
    assert rep["mean_purity"] == pytest.approx((2 / 3 + 1 + 1) / 3, rel=1e-6)  # as above
    assert rep["weighted_purity"] == pytest.approx(5 / 6, rel=1e-6)  # as above


def _tiny_codebook_model(fsm: FSM, arch: str, seed: int = 0):
    """An untrained 2-layer, width-32 model of the zoo's TokFSM family for ``fsm``'s tokens,
    with 16-code codebooks on every head and MLP."""
    from tyche.codebook.model import attach
    from tyche.zoo.tokfsm import TokFSMConfig, build_base

    cfg = TokFSMConfig(arch=arch, seed=seed, n_layers=2, hidden=32, n_heads=2, mlp=64, seq_len=32)
    return attach(build_base(cfg, fsm), ["attn_heads.*", "mlp_out.*"], num_codes=16).eval()


def test_code_purity_and_state_forcing_run_on_a_codebook_model(fsm: FSM) -> None:
    from tyche.codebook.steering import state_codes, state_forcing
    from tyche.codebook.tokfsm import code_purity

    cb = _tiny_codebook_model(fsm, "gpt_neox")
    report = code_purity(cb, fsm, n=8, seq_len=33)
    assert set(report) == {
        "attn_heads.0/head0",
        "attn_heads.0/head1",
        "mlp_out.0",
        "attn_heads.1/head0",
        "attn_heads.1/head1",
        "mlp_out.1",
    }
    assert report["mlp_out.0"]["state"]["n_tokens"] == 8 * 16
    codes = state_codes(cb, fsm, ["mlp_out.0"], n=8, seq_len=33)
    assert codes["mlp_out.0"].shape == (100,)
    forcing = state_forcing(copy.deepcopy(cb), fsm, n_trials=3, prefix_states=2, n_walks=8)
    assert forcing["n_trials"] == 3 and 0 <= forcing["success_rate"] <= 1
    assert forcing["jsd_patched"] >= 0 and forcing["jsd_unpatched"] >= 0
    assert 0 <= forcing["next_token_success_rate"] <= 1
    for key in ("next_token_target_mass", "next_token_baseline_mass"):
        assert 0 <= forcing[key] <= 1 + 1e-6
    assert 0 <= forcing["next_token_jsd_patched"] <= math.log(2) + 1e-6

    # an intervention that changes nothing: the patched distributions are the unpatched ones,
    # so no trial moves closer to the other state and every patched figure equals its baseline
    import contextlib

    from tyche.codebook import steering

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steering, "intervene", lambda model, ivs: contextlib.nullcontext())
        null = state_forcing(copy.deepcopy(cb), fsm, n_trials=4, prefix_states=2, n_walks=8)
    assert null["next_token_success_rate"] == 0
    # the two sides are float32 forward passes of other batch shapes (1 prefix vs 4; reductions
    # split differently): log-probs a few ulps apart move a JSD of ~8e-4 by ≲ 1e-7 (measured
    # 6e-9 with 2 threads on AVX2, 0 with 1); a real forcing moves it by ~6e-5 here (60x)
    assert null["next_token_jsd_patched"] == pytest.approx(
        null["next_token_jsd_unpatched"], rel=0, abs=1e-6
    )
    # sums of ≤ 10 probabilities from log-probs a few ulps apart (≲ 1e-6 in all, measured 0);
    # a real forcing moves the mass by ~2e-3 here
    assert null["next_token_target_mass"] == pytest.approx(
        null["next_token_baseline_mass"], rel=0, abs=1e-5
    )
    # (float32 sums in other batch shapes: the masses and JSDs agree to rounding)
    assert null["carried_mass_on_target"] == pytest.approx(null["baseline_mass"], rel=1e-4)
    # as above (measured 6e-9); a real carried forcing moves this JSD by ~2e-3
    assert null["carried_jsd_patched"] == pytest.approx(null["jsd_unpatched"], abs=1e-5)
    assert 0 <= forcing["carried_success_rate"] <= 1
    assert 0 <= forcing["carried_mass_on_target"] <= 1 + 1e-6
    # exact: both count argmax hits over the same 4 trials, divided alike; they could differ
    # only where two states' probabilities tie within float32 rounding
    assert null["success_rate"] == null["baseline_rate"]
    # float32 passes of other batch shapes, as for the next-token JSD: measured 5e-9 on AVX2;
    # a real forcing moves it by ~1e-4 here
    assert null["jsd_patched"] == pytest.approx(null["jsd_unpatched"], rel=0, abs=1e-6)


def test_zoo_cache_is_keyed_on_the_recipe(tmp_path, monkeypatch) -> None:
    """The cached folder is named after the recipe; a folder whose stored recipe differs is
    refused instead of being loaded; how the work runs (threads, processes) is not recipe."""
    from dataclasses import asdict, replace

    from tyche.zoo.entry import METRICS_FILE, ZooError, write_json
    from tyche.zoo.tokfsm import TokFSMConfig, TokFSMEntry

    monkeypatch.setenv("TYCHE_CACHE", str(tmp_path))
    cfg = TokFSMConfig()
    entry = TokFSMEntry()
    assert entry.path == tmp_path / f"tokfsm-{cfg.recipe_key()}"
    assert replace(cfg, threads=2, parallel=False).recipe_key() == cfg.recipe_key()
    changes = (
        {"lr": cfg.lr * 2},
        {"num_codes": 512},
        {"sites": ("mlp_out.*",)},
        {"arch": "gpt_neox"},
    )
    for change in changes:
        assert replace(cfg, **change).recipe_key() != cfg.recipe_key(), change
    assert not entry.is_ready()
    entry.path.mkdir()
    write_json(entry.path / METRICS_FILE, {"config": asdict(replace(cfg, parallel=False))})
    assert entry.is_ready()  # the same recipe, trained one process at a time
    write_json(entry.path / METRICS_FILE, {"config": asdict(replace(cfg, steps=cfg.steps + 1))})
    with pytest.raises(ZooError, match=r"another recipe.*\['steps'\]"):
        entry.is_ready()
    with pytest.raises(ZooError, match="another recipe"):
        entry.prepare()


def test_carried_codes_of_the_own_run_change_nothing(fsm: FSM) -> None:
    """Forcing at every digit position the codes a run already has gives back the model's own
    next-state distribution (chain rule over both digits); codes of another state's run
    change it, and the result is a distribution over states."""
    from tyche.codebook.steering import _carried_next_state
    from tyche.codebook.tokfsm import next_state_probs

    cb = _tiny_codebook_model(fsm, "gpt2", seed=1)
    walks = fsm.walks(2, 3, torch.Generator().manual_seed(0))
    prefix, donor = fsm.encode(walks)
    sites = ["mlp_out.0", "mlp_out.1"]
    own = _carried_next_state(cb, fsm, sites, prefix, prefix)
    # the same forward passes up to batch shape: float32 rounding only
    torch.testing.assert_close(
        own, next_state_probs(cb, fsm, prefix[None])[0], atol=1e-6, rtol=1e-4
    )
    other = _carried_next_state(cb, fsm, sites, prefix, donor)
    assert other.shape == (fsm.n_states,) and float(other.sum()) <= 1 + 1e-5
    # another state's codes move the next-state probabilities by ~4e-3 (measured), 40x this
    # atol, while rounding moves them by ≲ 1e-6
    assert not torch.allclose(other, own, atol=1e-4)


def test_tokfsm_base_models(fsm: FSM) -> None:
    """Both architectures build with the recipe's shape; another name is a clear error."""
    from dataclasses import replace

    from tyche.zoo.tokfsm import TokFSMConfig, build_base

    cfg = TokFSMConfig(n_layers=1, hidden=16, n_heads=2, mlp=32, seq_len=8)
    for arch, kind in (("gpt2", "GPT2LMHeadModel"), ("gpt_neox", "GPTNeoXForCausalLM")):
        model = build_base(replace(cfg, arch=arch), fsm)
        assert type(model).__name__ == kind
        assert model(input_ids=fsm.batch(2, 8, torch.Generator())).logits.shape == (2, 8, 11)
    with pytest.raises(ValueError, match="arch must be 'gpt_neox' or 'gpt2', got 'bert'"):
        build_base(replace(cfg, arch="bert"), fsm)
