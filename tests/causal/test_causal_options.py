"""CausalOptions: the search settings of a causal basis, one validated object for the library
and the command line."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch
from test_causal import SoftmaxTarget, random_hiddens

from tyche.ablation import ABLATION_MODES
from tyche.causal import (
    AblationObjective,
    CausalOptions,
    extract_causal_bases,
    extract_causal_basis,
)
from tyche.errors import InputError

BAD_VALUES = [
    ("mode", "median", "unknown ablation mode 'median'"),
    ("objective", "mse", "unknown objective 'mse'"),
    ("max_iter", -1, r"need max_iter >= 0"),
    ("max_iter", 2.5, r"need max_iter >= 0 \(a whole number\), got 2.5"),
    ("n_init", -1, r"need n_init >= 0"),
    ("n_pca", True, r"need n_pca >= 0 \(a whole number\), got True"),
    ("n_starts", 0, r"n_starts >= 1"),
    ("screen_positions", 0, r"need screen_positions >= 1"),
    ("min_energy", float("nan"), r"min_energy must be a number"),
    ("tol", 0.0, r"tol must be > 0"),
    ("tol", "small", r"tol must be > 0"),
    ("refine", "both", r"refine must be 'none' or 'joint'"),
    ("batch_size", 0, r"batch_size must be a positive number of rows"),
    ("fast", 1, r"fast must be True or False"),
    ("cache_gb", -1.0, r"cache_gb must be >= 0"),
]


@pytest.mark.parametrize("name,value,pattern", BAD_VALUES, ids=lambda x: str(x)[:20])
def test_every_field_is_checked_when_made(name, value, pattern):
    with pytest.raises(InputError, match=pattern):
        CausalOptions(**{name: value})


def test_defaults_are_the_documented_ones_and_frozen():
    options = CausalOptions()
    assert (options.mode, options.objective, options.max_iter, options.tol) == (
        "mean", "kl", 100, 1e-2,
    )  # fmt: skip
    assert (options.n_init, options.n_starts, options.n_pca, options.refine) == (4, 2, 16, "none")
    assert options.batch_size is None and options.cache_gb is None and options.fast
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_iter = 3  # type: ignore[misc]
    # every field has a docstring (the command line's help for its flag)
    from tyche.cli.commandline import _attribute_docs

    docs = _attribute_docs(CausalOptions)
    assert set(docs) == {f.name for f in dataclasses.fields(CausalOptions)}


def test_the_modes_are_those_of_the_ablation_module():
    mode = typing.get_type_hints(CausalOptions)["mode"]
    assert set(typing.get_args(mode)) == set(ABLATION_MODES)


def test_the_functions_take_the_options_whole():
    for fn in (extract_causal_basis, extract_causal_bases, AblationObjective.__init__):
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert len(params) <= 10, (fn.__qualname__, params)
        assert "options" in params and "max_iter" not in params and "mode" not in params
    h = random_hiddens((4, 5, 3))
    with pytest.raises(InputError, match="options must be a CausalOptions"):
        extract_causal_basis(SoftmaxTarget(3), h, 1, {"max_iter": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_iter"):
        extract_causal_basis(SoftmaxTarget(3), h, 1, max_iter=3)  # type: ignore[call-arg]


def test_the_objective_reads_its_fields_from_the_options():
    h = random_hiddens((6, 5, 3))
    obj = AblationObjective(SoftmaxTarget(3), h, CausalOptions(mode="zero", batch_size=2,
                                                               cache_gb=0.0))  # fmt: skip
    assert (obj.mode, obj.batch_size, obj.cache_gb) == ("zero", 2, 0.0)
    default = AblationObjective(SoftmaxTarget(3), h)
    assert default.mode == "mean" and default.batch_size >= 1


def test_the_command_line_embeds_the_options_with_its_own_flags():
    from tyche.cli.causal import CausalConfig, SearchFlags
    from tyche.cli.commandline import CommandError, build_parser, config_flags, parse_config

    cfg = parse_config(CausalConfig, ["--max_iter", "7", "--batch_size", "4", "--no-fast"], "t")
    assert isinstance(cfg.search, CausalOptions)
    assert (cfg.search.max_iter, cfg.search.batch_size, cfg.search.fast) == (7, 4, False)
    assert config_flags(cfg) == ["--max_iter", "7", "--batch_size", "4", "--no-fast"]
    # the library defaults the command line has no flag for
    assert cfg.search.n_init == CausalOptions().n_init
    assert cfg.search.screen_positions == CausalOptions().screen_positions
    text = build_parser(CausalConfig, "tyche causal").format_help()
    assert "--n_init" not in text and "--screen_positions" not in text
    assert text.count("[--batch_size N]") == 1  # one flag (a second would not build)
    # checked in the command line's words, as the flags are parsed
    with pytest.raises(CommandError, match="--max_iter must be at least 0, got -1"):
        parse_config(CausalConfig, ["--max_iter", "-1"], "t")
    with pytest.raises(CommandError, match="--batch_size must be at least 1"):
        SearchFlags(batch_size=0)
    # the extraction's own copy (its batch size filled in) keeps the command line's class
    assert dataclasses.replace(SearchFlags(), batch_size=3).batch_size == 3


def test_extract_causal_bases_reads_and_searches_in_the_options_batch_size(
    gpt2_model, token_batch, monkeypatch
):
    import tyche.causal.extraction as extraction

    seen = {}
    read, extract = extraction.read_site_activations, extraction.extract_causal_basis

    def spy_read(model, tokens, names, batch_size):
        seen["read"] = batch_size
        return read(model, tokens, names, batch_size)

    def spy_extract(target, hiddens, k, options, **kwargs):
        seen["search"] = options.batch_size
        return extract(target, hiddens, k, options, **kwargs)

    monkeypatch.setattr(extraction, "read_site_activations", spy_read)
    monkeypatch.setattr(extraction, "extract_causal_basis", spy_extract)
    for given, expected in ((None, 16), (3, 3)):
        basis = extract_causal_bases(gpt2_model, token_batch, 1, "resid_pre.1",
                                     CausalOptions(max_iter=2, n_pca=0, batch_size=given),
                                     progress=False)["resid_pre.1"]  # fmt: skip
        assert seen == {"read": expected, "search": expected}
        assert torch.isfinite(basis.vectors).all()
