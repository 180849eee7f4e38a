"""Per-latent causal energies and coverage (tyche.causal.features) against slow oracles."""

from __future__ import annotations

import pytest
import torch
from interop_support import VOCAB, build_hooked, require

from conftest import build_gpt2
from tyche.causal.features import (
    FeatureOptions,
    LatentEnergies,
    coverage,
    feature_energies,
    latent_energies,
    subspace_angles,
)
from tyche.causal.lenses import LogitLens, ModelFromSite
from tyche.causal.result import CausalBasis
from tyche.dictionaries import Dictionary
from tyche.errors import InputError
from tyche.hooks import read_activations, replace_activations

SITE = "resid_pre.1"


def random_dictionary(d_in: int = 64, n: int = 24, seed: int = 0, scale: float = 0.03,
                      out_scale: float = 0.03, **kw) -> Dictionary:  # fmt: skip
    """A relu dictionary for inputs of standard deviation ``scale`` whose latents fire on about
    a third of the positions, each writing about ``out_scale`` per coordinate."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, n, generator=g) / (d_in**0.5 * scale)
    w_dec = torch.randn(n, d_in, generator=g) * 2 * out_scale
    return Dictionary(w_enc, torch.full((n,), -0.4), w_dec, torch.zeros(d_in), **kw)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_gpt2()


@pytest.fixture(scope="module")
def tokens() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (5, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    ids[1, -4:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def site_acts(model, tokens, *sites: str) -> list[torch.Tensor]:
    with torch.no_grad(), read_activations(model, list(sites)) as acts:
        model(**tokens)
    return [acts[s] for s in sites]


def masked_kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(softmax clean ‖ softmax other) per position, by hand in float64."""
    p_log, q_log = clean.double().log_softmax(-1), other.double().log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def slow_energies(run, h, x, d: Dictionary, mask) -> dict[int, tuple[float, int, float]]:
    """{latent: (energy, fires, energy when firing)}: one removal and one run per latent."""
    a, keep = d.encode(x), mask.bool()
    clean = run(h)
    out = {}
    for i in range(d.n_latents):
        fire = (a[..., i] != 0) & keep
        if not fire.any():
            continue
        changed = run(h - (a[..., i] * fire)[..., None] * d.W_dec[i])
        kl = masked_kl(clean, changed)
        out[i] = (float((kl * keep).sum() / keep.sum()), int(fire.sum()),
                  float((kl * fire).sum() / fire.sum()))  # fmt: skip
    return out


def assert_matches(result: LatentEnergies, slow: dict) -> None:
    assert sorted(result.latents.tolist()) == sorted(slow)
    energies = result.energies.tolist()
    assert energies == sorted(energies, reverse=True)
    for rank, latent in enumerate(result.latents.tolist()):
        energy, fires, firing = slow[latent]
        assert int(result.fires[rank]) == fires
        # float32 logits from batches of other compositions (BLAS blocking); a 512-way KL has
        # a rounding floor of ~1e-7 nats per position, and the generic (non-vectorised)
        # kernels measured 1.3e-4 relative on a 1.5e-3-nat mean over a few positions
        assert float(result.energies[rank]) == pytest.approx(energy, rel=1e-3, abs=1e-6)
        # the same KL terms as above, averaged over the firing positions only
        assert float(result.firing_energies[rank]) == pytest.approx(firing, rel=1e-3, abs=1e-6)


def run_model(model, tokens):
    def run(h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), replace_activations(model, {SITE: lambda _: h}):
            return model(**tokens).logits

    return run


# ----------------------------------------------------------------------------- energies
def test_model_target_energies_equal_one_run_per_latent(model, tokens) -> None:
    (h,) = site_acts(model, tokens, SITE)
    d = random_dictionary()
    # 24 positions per pass: two sequences of 12, so the pairs span many passes
    result = latent_energies(ModelFromSite(model, SITE, tokens), h, d,
                             FeatureOptions(positions_per_pass=24),
                             mask=tokens["attention_mask"])  # fmt: skip
    slow = slow_energies(run_model(model, tokens), h, h, d, tokens["attention_mask"])
    assert len(slow) > 10 and result.n_positions == int(tokens["attention_mask"].sum())
    assert_matches(result, slow)
    # the removal reaches later positions: over all positions it exceeds the firing share
    share = result.energies * result.n_positions / (result.firing_energies * result.fires)
    assert bool((share > 1.0001).any())


def test_lens_target_energies_equal_one_run_per_latent(model, tokens) -> None:
    (h,) = site_acts(model, tokens, SITE)
    d = random_dictionary(seed=1)
    lens = LogitLens.from_model(model)
    result = latent_energies(
        lens, h, d, FeatureOptions(positions_per_pass=7), mask=tokens["attention_mask"]
    )

    def run(hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return lens(hidden)

    assert_matches(result, slow_energies(run, h, h, d, tokens["attention_mask"]))
    # a lens acts position by position: all of a latent's energy is where it fires
    torch.testing.assert_close(
        result.energies * result.n_positions,
        result.firing_energies * result.fires.double(),
        rtol=1e-12,
        atol=0.0,
    )  # float64 sums of the same terms, reordered


def test_transcoder_reads_one_site_and_writes_another(model, tokens) -> None:
    x, h = site_acts(model, tokens, "transformer.h.1.mlp:input", "transformer.h.1.mlp")
    d = random_dictionary(seed=2, scale=1.0, out_scale=0.01, transcoder=True)
    target = ModelFromSite(model, "transformer.h.1.mlp", tokens)
    result = latent_energies(target, h, d, mask=tokens["attention_mask"], encoder_inputs=x,
                             options=FeatureOptions(latents=(0, 3, 5, 7, 11)))  # fmt: skip

    def run(hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), replace_activations(model, {"transformer.h.1.mlp": lambda _: hidden}):
            return model(**tokens).logits

    slow = slow_energies(run, h, x, d, tokens["attention_mask"])
    assert_matches(result, {i: slow[i] for i in (0, 3, 5, 7, 11) if i in slow})


def test_feature_energies_on_a_transformer_lens_model_equal_its_own_hooks(tokens) -> None:
    require("transformer_lens")
    hooked = build_hooked()
    d = random_dictionary(seed=4, n=8, hook_name="blocks.1.hook_resid_pre")
    ids = tokens["input_ids"][[0, 2, 3]]
    result = feature_energies(hooked, ids, d)
    assert result.site == "blocks.1.hook_resid_pre" and result.target == "model"

    cache: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        clean = hooked.run_with_hooks(
            ids,
            fwd_hooks=[
                ("blocks.1.hook_resid_pre", lambda act, hook: cache.setdefault("h", act.clone()))
            ],
        )

        def run(hidden: torch.Tensor) -> torch.Tensor:
            return hooked.run_with_hooks(
                ids, fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: hidden)]
            )

        slow = slow_energies(run, cache["h"], cache["h"], d, torch.ones_like(ids))
    assert torch.equal(run(cache["h"]), clean)  # same path: the hook returns what it read
    assert_matches(result, slow)


def test_per_head_sites_are_merged_for_the_dictionary_and_split_for_the_model(model) -> None:
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    (h,) = site_acts(model, {"input_ids": ids}, "attn_heads.1")  # (3, 10, 4, 16)
    scale = float(h.std())
    d = random_dictionary(seed=3, n=10, scale=scale, out_scale=scale, hook_name="attn_heads.1")
    result = feature_energies(model, ids, d, options=FeatureOptions(positions_per_pass=20))

    def run(hidden: torch.Tensor) -> torch.Tensor:
        with (
            torch.no_grad(),
            replace_activations(model, {"attn_heads.1": lambda _: hidden.reshape(h.shape)}),
        ):
            return model(input_ids=ids).logits

    flat = h.flatten(-2)
    assert_matches(result, slow_energies(run, flat, flat, d, torch.ones(3, 10)))


def test_an_nnsight_model_gives_the_numbers_of_the_module_it_wraps(model, tokens) -> None:
    from interop_support import wrap_nnsight

    require("nnsight")
    d = random_dictionary(seed=8, hook_name="transformer.h.0")
    wrapped = feature_energies(wrap_nnsight(model), tokens, d, target="logit")
    plain = feature_energies(model, tokens, d, target="logit")
    assert torch.equal(wrapped.energies, plain.energies)  # same path: the same module inside
    assert wrapped.site == "transformer.h.0"


# ----------------------------------------------------------------------------- coverage
def test_subspace_angles_equal_scipy() -> None:
    linalg = require("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 5, generator=g, dtype=torch.float64)
    cases = [torch.randn(40, 9, generator=g, dtype=torch.float64),  # more columns than a
             torch.randn(40, 3, generator=g, dtype=torch.float64),  # fewer
             a @ torch.randn(5, 5, generator=g, dtype=torch.float64)  # the same span
             + 1e-9 * torch.randn(40, 5, generator=g, dtype=torch.float64)]  # fmt: skip
    for b in cases:
        ours = subspace_angles(a, b)
        theirs = torch.from_numpy(linalg.subspace_angles(a.numpy(), b.numpy())).flip(0)
        # float64 SVDs of well-conditioned 40-row bases; sines for the small angles
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    assert float(subspace_angles(a, cases[2]).max()) < 1e-7  # tiny angles stay accurate


def test_a_decoder_spanning_the_causal_subspace_covers_it_at_zero_degrees(model, tokens) -> None:
    g = torch.Generator().manual_seed(5)
    basis_vectors = torch.linalg.qr(torch.randn(64, 3, generator=g))[0]
    rows = torch.randn(6, 3, generator=g) @ basis_vectors.T  # 6 latents inside the span
    noise = torch.randn(10, 64, generator=g)  # 10 latents outside it
    d = Dictionary(torch.randn(64, 16, generator=g), torch.zeros(16), torch.cat([rows, noise]),
                   torch.zeros(64))  # fmt: skip
    inside = torch.arange(6)
    found = coverage(basis_vectors, d, torch.cat([inside, torch.arange(6, 16)]), [2, 3, 6, 12])
    assert found.m == [2, 3, 6, 12] and found.k == 3
    assert [len(x) for x in found.degrees] == [2, 3, 3, 3]
    for degrees in found.degrees[1:]:
        assert float(degrees.max()) < 1e-4  # float32 decoder rows, angles in degrees
    torch.testing.assert_close(
        found.cosines[2], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9
    )  # cos of angles below 1e-4 degrees
    outside = coverage(basis_vectors, d, torch.arange(6, 16), [3])
    assert float(outside.degrees[0].min()) > 5  # random directions miss the subspace


def test_feature_energies_save_and_hold_the_coverage(model, tokens, tmp_path) -> None:
    (h,) = site_acts(model, tokens, SITE)
    d = random_dictionary(seed=6, hook_name="blocks.1.hook_resid_pre")  # translated to resid_pre.1
    vectors = torch.linalg.qr(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))[0]
    basis = CausalBasis(vectors, torch.ones(2), torch.ones(2), site=SITE)
    options = FeatureOptions(coverage_m=(2, 5))
    result = feature_energies(model, tokens, d, options=options, target="logit", basis=basis)
    direct = latent_energies(LogitLens.from_model(model), h, d, mask=tokens["attention_mask"])
    assert torch.equal(result.latents, direct.latents)  # same path: the same call inside
    torch.testing.assert_close(result.energies, direct.energies)  # same path, as above
    expected = coverage(vectors, d, direct.latents, [2, 5])
    torch.testing.assert_close(result.coverage.degrees[1], expected.degrees[1])  # same path
    back = LatentEnergies.load(result.save(tmp_path / "features"))
    assert torch.equal(back.energies, result.energies) and back.coverage.m == [2, 5]
    assert back.dictionary["hook_name"] == "blocks.1.hook_resid_pre"


def test_bad_inputs_are_refused(model, tokens) -> None:
    (h,) = site_acts(model, tokens, SITE)
    with pytest.raises(InputError, match="reads d_in=32, but site resid_pre.1 has width 64"):
        feature_energies(model, tokens, random_dictionary(d_in=32), site=SITE)
    with pytest.raises(InputError, match="does not name its site"):
        feature_energies(model, tokens, random_dictionary())
    with pytest.raises(InputError, match="writes width d_out=32"):
        latent_energies(LogitLens.from_model(model), h, random_dictionary(d_in=32))
    with pytest.raises(InputError, match="mask has shape"):
        latent_energies(LogitLens.from_model(model), h, random_dictionary(), mask=torch.ones(2, 2))
    with pytest.raises(InputError, match="causal basis has shape"):
        coverage(torch.eye(5), random_dictionary(), torch.arange(3), [2])


# ----------------------------------------------------------------------------- command line
CLI_RUN = ["--seq_len", "16", "--n_sequences", "4", "--k", "2", "--sites", "resid_pre.1",
           "--max_iter", "5", "--n_pca", "0", "--no-plot"]  # fmt: skip


def test_cli_features_prints_and_saves_what_the_library_computes(tmp_path, capsys, lm_folder,
                                                                 text_file) -> None:  # fmt: skip
    from conftest import cli
    from tyche.cli.inputs import ModelSource, TextRows
    from tyche.dictionaries import load_dictionary, save_saelens

    folder = save_saelens(random_dictionary(seed=7, hook_name="blocks.1.hook_resid_pre"),
                          tmp_path / "sae")  # fmt: skip
    out = tmp_path / "run"
    run = cli(capsys, "causal", "--model", str(lm_folder), "--data", str(text_file), *CLI_RUN,
              "--target", "model", "--features", str(folder), "--coverage_m", "2,4",
              "--features_top", "5", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    saved = LatentEnergies.load(out / "features")
    assert saved.site == "resid_pre.1" and saved.target == "model"
    assert saved.coverage is not None and saved.coverage.m == [2, 4]

    source = ModelSource(str(lm_folder)).load(16)
    rows = TextRows(str(text_file), 4, 16, 0).load(source.tokenizer)
    basis = CausalBasis.load(out / "resid_pre.1")
    options = FeatureOptions(coverage_m=(2, 4))
    dictionary = load_dictionary(folder)
    library = feature_energies(
        source.model, rows.tokens, dictionary, "resid_pre.1", options, target="model", basis=basis
    )
    assert torch.equal(saved.latents, library.latents)  # same path: one call, same inputs
    assert torch.equal(saved.energies, library.energies)  # same path, as above
    assert torch.equal(saved.coverage.degrees[1], library.coverage.degrees[1])  # same path

    lines = run.out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("latent energies at"))
    for rank, line in enumerate(lines[head + 2 : head + 7]):
        printed = line.split()
        assert printed[:2] == [str(rank + 1), str(int(saved.latents[rank]))]
        assert printed[2] == f"{float(saved.energies[rank]):.4g}"
        assert printed[3] == str(int(saved.fires[rank]))
        assert printed[4] == f"{float(saved.firing_energies[rank]):.4g}"
    angles = next(line for line in lines if line.strip().startswith("m=4"))
    assert angles.split()[1:] == [f"{a:.1f}" for a in saved.coverage.degrees[1].tolist()]


def test_cli_features_refusals_come_before_any_computation(tmp_path, capsys, lm_folder,
                                                           text_file) -> None:  # fmt: skip
    from conftest import cli, one_line_error
    from tyche.dictionaries import save_saelens

    common = ["causal", "--model", str(lm_folder), "--data", str(text_file), *CLI_RUN]
    narrow = save_saelens(random_dictionary(d_in=32, hook_name="blocks.1.hook_resid_pre"),
                          tmp_path / "narrow")  # fmt: skip
    elsewhere = save_saelens(random_dictionary(hook_name="blocks.0.hook_resid_pre"),
                             tmp_path / "elsewhere")  # fmt: skip
    (tmp_path / "empty").mkdir()
    cases = [
        (narrow, r"--features .*narrow: the dictionary reads d_in=32, but site resid_pre\.1 "
                 r"has width 64"),
        (elsewhere, r"writes blocks\.0\.hook_resid_pre \(resid_pre\.0\), which --sites "
                    r"\['resid_pre\.1'\] does not include; add it to --sites"),
        (tmp_path / "empty", r"--features: .*empty is not a dictionary folder: expected cfg\.json"),
    ]  # fmt: skip
    for folder, said in cases:
        out = tmp_path / f"out-{folder.name}"
        run = cli(capsys, *common, "--features", str(folder), "--out", str(out))
        one_line_error(run, "causal", said)
        assert not (out / "resid_pre.1").exists()  # refused before the extraction
    run = cli(capsys, *common, "--coverage_m", "3", "--out", str(tmp_path / "o"))
    one_line_error(run, "causal", r"--coverage_m applies with --features DIR only")
