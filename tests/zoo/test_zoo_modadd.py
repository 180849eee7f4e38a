"""``zoo:modadd`` (the LIB paper's modular-addition transformer) and ``zoo:fashion-mlp``."""

from __future__ import annotations

import pytest
import torch

from tyche.hooks import read_activations
from tyche.sites import resolve_sites
from tyche.zoo.fashion_mlp import MLP
from tyche.zoo.fashion_mnist import fashion_mnist_dir
from tyche.zoo.modadd import (
    NODE_LAYERS,
    ModAddConfig,
    ModAddTransformer,
    fast_logits,
    modadd_data,
    train_modadd,
)


def test_data_split_is_the_papers() -> None:
    data = modadd_data()
    assert len(data.x_train) == 3830 and len(data.x_test) == 8939
    x = torch.cat([data.x_train, data.x_test])
    assert len({tuple(r) for r in x.tolist()}) == 113 * 113  # every pair once
    assert (x[:, 2] == 113).all()
    assert torch.equal(data.y_train, (data.x_train[:, 0] + data.x_train[:, 1]) % 113)
    assert torch.equal(modadd_data().x_train, data.x_train)  # seeded


def test_fast_logits_equal_the_module_forward() -> None:
    model = ModAddTransformer(ModAddConfig(p=13, d_model=16, n_heads=2, d_mlp=24))
    model.reset_parameters(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    pairs = modadd_data(ModAddConfig(p=13)).x_train
    # the same function in float32, summed in another order: ~1e-6 of the logits' scale
    torch.testing.assert_close(fast_logits(model, pairs), model(pairs), rtol=1e-5, atol=1e-5)


def test_sites_and_node_layers() -> None:
    model = ModAddTransformer(ModAddConfig(p=7, d_model=8, n_heads=2, d_mlp=16))
    names = [s.name for s in resolve_sites(model, list(NODE_LAYERS[:3]))]
    assert names == ["resid_pre.0", "blocks.0.resid_mid", "unembed"]
    pairs = modadd_data(ModAddConfig(p=7)).x_train
    with torch.no_grad(), read_activations(model, [*NODE_LAYERS[:3], "attn_out.0"]) as acts:
        logits = model(pairs)
    assert acts["resid_pre.0"].shape == (len(pairs), 3, 8)
    assert acts["blocks.0.resid_mid"].shape == acts["unembed"].shape == (len(pairs), 8)
    assert logits.shape == (len(pairs), 8)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        model(torch.zeros(2, 4, dtype=torch.long))


def test_training_is_deterministic_and_stops_after_the_target() -> None:
    cfg = ModAddConfig(p=11, d_model=16, n_heads=2, d_mlp=16, target_test_accuracy=0.0,
                       extra_steps=7, eval_every=5, max_steps=100)  # fmt: skip
    a, metrics = train_modadd(cfg, progress=False)
    b, _ = train_modadd(cfg, progress=False)
    assert metrics["step_reached_target"] == 5 and metrics["steps"] == 12
    # exact: one process, the same seeds, threads and kernels: the same ops in the same order
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values()))  # fmt: skip
    with pytest.raises(Exception, match="did not reach test accuracy"):
        train_modadd(ModAddConfig(p=11, d_model=8, n_heads=2, d_mlp=8, max_steps=3,
                                  eval_every=1), progress=False)  # fmt: skip


def test_fashion_mlp_layout() -> None:
    model = MLP((784, 20, 20, 10))
    names = [s.name for s in resolve_sites(model, ["layers.1:input", "layers.2:input"])]
    assert names == ["layers.1:input", "layers.2:input"]
    assert model(torch.zeros(3, 28, 28)).shape == (3, 10)


@pytest.mark.slow
def test_cached_modadd_groks() -> None:
    """The trained model in the test cache (training runs until the model groks: many
    thousand full-batch steps, not yet timed on a quiet machine): train it with
    ``tyche zoo train modadd`` and run with ``TYCHE_TEST_CACHE=~/.cache/tyche``."""
    from tyche.zoo import cache_root

    folder = cache_root() / "modadd"
    if not (folder / "zoo.json").is_file():
        pytest.skip(
            "zoo:modadd is not trained in the test cache: tyche zoo train modadd, then run "
            "with TYCHE_TEST_CACHE=~/.cache/tyche"
        )
    import json

    metrics = json.loads((folder / "zoo.json").read_text())
    assert metrics["test_accuracy"] >= 0.99 and metrics["n_train"] == 3830


@pytest.mark.slow
@pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs apt-get install dataset-fashion-mnist")  # fmt: skip
def test_fashion_mlp_trains() -> None:
    from tyche.zoo.fashion_mlp import FashionMLPConfig, train_fashion_mlp

    _, metrics = train_fashion_mlp(FashionMLPConfig(epochs=1), progress=False)
    assert metrics["test_accuracy"] > 0.8
