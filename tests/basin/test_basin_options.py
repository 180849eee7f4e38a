"""`BasinOptions` (the settings of `estimate_basin`, checked on construction) and the one
preconditioner builder the command line and `VolumeEstimator` share."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import tyche
import tyche.basin
from conftest import cli
from tyche.basin.options import BasinOptions
from tyche.basin.preconditioners import (
    adam_preconditioner,
    build_preconditioner,
    diag_preconditioner,
    fisher_diagonal,
)
from tyche.basin.result import VolumeResult
from tyche.errors import InputError


def _n_params(fn) -> int:
    return len([p for p in inspect.signature(fn).parameters.values() if p.name != "self"])


def test_basin_functions_take_at_most_ten_parameters() -> None:
    from tyche.basin.core import estimate_basin
    from tyche.codebook.cache import build_cache

    for fn in (estimate_basin, build_preconditioner, build_cache):
        assert _n_params(fn) <= 10, fn.__name__
    assert "options" in inspect.signature(estimate_basin).parameters
    assert "progress" in inspect.signature(build_cache).parameters
    assert "show_progress" not in inspect.signature(build_cache).parameters


def test_basin_options_is_exported_frozen_and_canonical() -> None:
    assert tyche.BasinOptions is BasinOptions and tyche.basin.BasinOptions is BasinOptions
    opts = BasinOptions(cutoffs=[1e-2, 1e-4, 1e-3], n_samples=4)
    assert opts.cutoffs == (1e-4, 1e-3, 1e-2) and opts.targets == [1e-4, 1e-3, 1e-2]
    assert BasinOptions(cutoff=1, n_samples=1).targets == [1.0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.n_samples = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        BasinOptions(1e-2, 4)  # type: ignore[misc]  # keywords only


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cutoff": 0.1, "cutoffs": [0.1]}, "either cutoff="),
        ({"cutoffs": []}, "cutoffs is empty"),
        ({"cutoffs": "1e-3,1e-2"}, "cutoffs must be a sequence"),
        ({"n_samples": True}, "n_samples"),
        ({"n_samples": 2.0}, "n_samples"),
        ({"sigma": float("inf")}, "sigma"),
        ({"sigma": "1"}, "sigma"),
        ({"prior": "laplace"}, "prior"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": 1.5}, "seed"),
        ({"rtol": 0.0}, r"rtol must lie in \(0, 1\)"),
        ({"rtol": "1e-2"}, "rtol"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_memory": 0}, "max_memory must be a positive integer"),
        ({"max_memory": "4GiB"}, "max_memory.*parse_size"),
        ({"max_radius": float("nan")}, "max_radius"),
        ({"max_radius": -1.0}, "max_radius"),
    ],
)
def test_bad_options_name_the_field(kwargs, message) -> None:
    args = {"cutoff": 0.1, "n_samples": 2, **kwargs}
    if "cutoffs" in kwargs and "cutoff" not in kwargs:
        del args["cutoff"]
    with pytest.raises(InputError, match=message):
        BasinOptions(**args)


def test_estimate_basin_refuses_anything_but_options() -> None:
    from tyche.basin.core import estimate_basin

    with pytest.raises(InputError, match="options must be a BasinOptions"):
        estimate_basin(lambda d: d.square().sum(-1), torch.ones(3), {"cutoff": 0.1})


def test_build_preconditioner_kinds_and_errors() -> None:
    model = torch.nn.Linear(3, 4).eval()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert build_preconditioner("none", model, x, names=["weight"]) is None
    with pytest.raises(InputError, match="unknown preconditioner kind 'magic'"):
        build_preconditioner("magic", model, x, names=["weight"])
    with pytest.raises(InputError, match="adam preconditioner needs optimizer_state"):
        build_preconditioner("adam", model, x, names=["weight"])
    with pytest.raises(InputError, match="unknown: \\['nope'\\]"):
        build_preconditioner("adam", model, x, names=["nope"], optimizer_state={})


def test_build_preconditioner_is_the_direct_recipe_bit_for_bit() -> None:
    """The builder is the old two copies' recipe: adam_preconditioner on the model's shapes,
    and diag_preconditioner of a Fisher whose labels come from a generator seeded with seed."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    model.eval()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    gen = torch.Generator().manual_seed(2)
    state = {
        n: {"exp_avg": torch.randn(s, generator=gen), "exp_avg_sq": torch.rand(s, generator=gen)}
        for n, s in zip(names, shapes)
    }
    for order, eps, exponent in ((2, 1e-3, 0.5), (1, 1e-5, 0.7)):
        got = build_preconditioner("adam", model, x, names=names, optimizer_state=state,
                                   order=order, eps=eps, exponent=exponent)  # fmt: skip
        expect = adam_preconditioner(state, names, shapes, order=order, eps=eps,
                                     exponent=exponent, model=model)  # fmt: skip
        assert torch.equal(got, expect)
    fisher = fisher_diagonal(model, x, names=names, generator=torch.Generator().manual_seed(7))
    expect = diag_preconditioner(fisher, eps=1e-4, exponent=0.5)
    got = build_preconditioner("fisher", model, x, names=names, eps=1e-4, seed=7)
    assert torch.equal(got, expect)
    # the seed matters (sampled labels), so a wrong seed would show
    other = build_preconditioner("fisher", model, x, names=names, eps=1e-4, seed=8)
    assert not torch.equal(other, expect)


def test_volume_estimator_fisher_keeps_the_seed_compatible_recipe(
    gpt2_model, tiny_tokenizer, tiny_texts
) -> None:
    from tyche import VolumeConfig, VolumeEstimator

    cfg = VolumeConfig(model=gpt2_model, tokenizer=tiny_tokenizer, dataset=tiny_texts,
                       n_samples=1, max_seq_len=8, val_size=2, preconditioner_type="fisher",
                       tqdm=False)  # fmt: skip
    est = VolumeEstimator.from_config(cfg)
    names = list(est.loss.layout.names)
    generator = torch.Generator().manual_seed(42)  # VolumeConfig's seed
    fisher = fisher_diagonal(gpt2_model, est.tokens, names=names, generator=generator)
    assert torch.equal(est.preconditioner, diag_preconditioner(fisher, eps=1e-5, exponent=0.5))
    with pytest.raises(InputError, match="unknown preconditioner_type 'none'"):
        VolumeEstimator.from_config(dataclasses.replace(cfg, preconditioner_type="none"))


def test_cli_preconditioners_are_the_library_recipe(tmp_path, capsys) -> None:
    """`tyche basin --preconditioners adam,fisher` samples with exactly the p of the direct
    recipe (--eps 1e-3, --exponent 0.5, Fisher labels seeded with --seed)."""
    from tyche.basin.core import estimate_basin
    from tyche.basin.loss import ModelLoss
    from tyche.zoo import load_digits_mlp

    out = tmp_path / "run"
    run = cli(capsys, "basin", "--n_samples", "2", "--preconditioners", "adam,fisher",
              "--seed", "3", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    mlp = load_digits_mlp()
    names = [n for n, _ in mlp.model.named_parameters()]
    shapes = [p.shape for _, p in mlp.model.named_parameters()]
    generator = torch.Generator().manual_seed(3)
    fisher = fisher_diagonal(mlp.model, mlp.x_train, names=names, generator=generator)
    pres = {
        "adam": adam_preconditioner(
            mlp.optimizer_state, names, shapes, eps=1e-3, exponent=0.5, model=mlp.model
        ),  # fmt: skip
        "fisher": diag_preconditioner(fisher, eps=1e-3, exponent=0.5),
    }
    loss = ModelLoss(mlp.model, mlp.x_train)
    opts = BasinOptions(cutoffs=[1e-2], sigma=mlp.prior_sigma, n_samples=2, seed=3)
    for kind, pre in pres.items():
        got = VolumeResult.load(out / f"{kind}-cutoff0.01")
        with pytest.warns(UserWarning, match="effective sample size"):  # 2 samples: a bound
            expect = estimate_basin(loss, loss.anchor, opts, preconditioner=pre, progress=False)
        # exact: the same p bits, loss, seed and cutoff give the same draws and searches
        assert torch.equal(got.props, expect.props)
        assert torch.equal(got.estimates, expect.estimates[:, 0])
