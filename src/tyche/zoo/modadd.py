"""``zoo:modadd``: the modular-addition transformer of the local-interaction-basis paper.

Recipe (Bushnaq et al. 2024, after Nanda et al. 2023): inputs ``(a, b, =)`` with
``a, b < p = 113`` and ``=`` the token 113 (vocabulary 114); the label is ``(a + b) mod p``,
predicted at the last position. All 12,769 pairs are split by a seeded permutation into 30%
for training (3,830 pairs) and 70% for testing (8,939). The model has one layer, width 128,
4 heads of 32, an MLP of 512 ReLU units, learned position embeddings, biases everywhere and
no LayerNorm; weights start from N(0, 0.8/sqrt(128)), biases at zero. It is trained with
full-batch AdamW (lr 1e-3, weight decay 1.0, betas 0.9/0.98, a 10-step linear warm-up) on
the cross-entropy at the last position, in float32 on one intra-op thread (fixed, so runs
repeat exactly), until the test accuracy reaches 99% and then for ``extra_steps`` more,
which lets weight decay clean up the Fourier circuit after it has formed. Measured training
run and time: BENCHMARKS.md, Local interaction basis (on our own ``zoo:modadd``).

The module layout follows the usual transformer names so :mod:`tyche.sites` finds its
aliases (``embed``, ``resid_pre.0``, ``attn_out.0``, ``mlp_out.0``, ``resid_post.0``,
``unembed``). As in the paper's model, everything after attention runs on the last position
only: ``blocks.0.resid_mid`` is the residual stream after attention at that position
``(B, 128)``, ``unembed`` the residual after the MLP, and the logits are ``(B, 114)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyche.errors import InputError
from tyche.zoo.entry import METRICS_FILE, ZooEntry, ZooError, atomic_folder, write_json

#: the paper's node layers, in the names of this module (ln1.0, ln2.0, unembed, output there)
NODE_LAYERS = ("resid_pre.0", "blocks.0.resid_mid", "unembed", "output")


@dataclass(frozen=True)
class ModAddConfig:
    """Settings of the modular-addition transformer and its training (the paper's recipe)."""

    p: int = 113
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    frac_train: float = 0.3
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 10
    #: stop once the test accuracy reaches this ...
    target_test_accuracy: float = 0.99
    #: ... after this many further steps
    extra_steps: int = 2000
    max_steps: int = 60_000
    eval_every: int = 100
    threads: int = 1

    @property
    def vocab(self) -> int:
        """Tokens ``0 .. p - 1`` and ``=`` (id ``p``)."""
        return self.p + 1


class Attention(nn.Module):
    """Multi-head attention of the last position over all positions; biased q/k/v/o.

    The other positions' queries are never used by the model (it predicts at the last
    position only), so they are not computed: ``(B, T, d) -> (B, d)``.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise InputError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, T, d)``; ``last`` is ``x[:, -1]`` if the caller has it already."""
        b, t, d = x.shape
        h = self.n_heads
        last = x[:, -1] if last is None else last
        q = self.q_proj(last).view(b, 1, h, d // h)
        k = self.k_proj(x).view(b, t, h, d // h)
        v = self.v_proj(x).view(b, t, h, d // h)
        # T = 3: elementwise products beat batched matmuls of 1 x 32 x 3
        weights = ((q * k).sum(-1) / math.sqrt(d // h)).softmax(1)  # (B, T, h)
        mixed = (weights.unsqueeze(-1) * v).sum(1).reshape(b, d)
        return self.o_proj(mixed)


class MLP(nn.Module):
    """``Linear(d, d_mlp) -> ReLU -> Linear(d_mlp, d)``."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_mlp)
        self.act = nn.ReLU()
        self.fc_out = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    """Attention over all positions, then the residual and MLP at the last position only."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.attn = Attention(d_model, n_heads)
        self.resid_mid = nn.Identity()  # a named site for the residual stream after attention
        self.mlp = MLP(d_model, d_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d) -> (B, d)`` (the last position)."""
        last = x[:, -1]
        resid = self.resid_mid(last + self.attn(x, last))
        return resid + self.mlp(resid)


class ModAddTransformer(nn.Module):
    """The one-layer modular-addition transformer: ``(B, 3)`` token ids -> ``(B, p + 1)`` logits."""

    def __init__(self, config: ModAddConfig | None = None) -> None:
        super().__init__()
        cfg = config or ModAddConfig()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(3, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg.d_model, cfg.n_heads, cfg.d_mlp)])
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] != 3 or input_ids.is_floating_point():
            raise InputError(
                f"zoo:modadd takes integer token ids of shape (B, 3): (a, b, {self.config.p}); "
                f"got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        positions = torch.arange(3, device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)

    def reset_parameters(self, seed: int) -> None:
        """Weights ~ N(0, 0.8 / sqrt(d_model)), biases 0 (TransformerLens's default init)."""
        gen = torch.Generator().manual_seed(seed)
        std = 0.8 / math.sqrt(self.config.d_model)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * std)


def fast_logits(model: ModAddTransformer, pairs: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``(a, b, =)`` rows, computed from per-token tables.

    The same function as ``model(pairs)``, cheaper: the query reads the constant ``=``
    position, so it is one vector; keys and values of positions 0 and 1 take only ``p``
    values each, so they are tables indexed by ``a`` and ``b``. Only the MLP and the
    unembedding run per row. Used for training (about twice as fast as the module forward).
    """
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    h, d = attn.n_heads, model.config.d_model
    a, b = pairs[:, 0], pairs[:, 1]
    emb, pos = model.embed_tokens.weight, model.pos_embed.weight
    eq = emb[pairs[0, 2]] + pos[2]  # the "=" position, the same in every row
    tables = torch.stack([emb + pos[0], emb + pos[1], eq.expand_as(emb)])  # (3, V, d)
    q = attn.q_proj(eq).view(h, d // h)
    k = attn.k_proj(tables).view(3, -1, h, d // h)
    v = attn.v_proj(tables).view(3, -1, h, d // h)
    scores = (k * q).sum(-1) / math.sqrt(d // h)  # (3, V, h)
    rows = torch.stack([scores[0, a], scores[1, b], scores[2, a]], dim=1)  # (B, 3, h)
    weights = rows.softmax(1).unsqueeze(-1)
    mixed = weights[:, 0] * v[0, a] + weights[:, 1] * v[1, b] + weights[:, 2] * v[2, 0]
    resid = eq + attn.o_proj(mixed.reshape(len(pairs), d))
    resid = resid + mlp(resid)
    return model.lm_head(resid)


@dataclass(frozen=True)
class ModAddData:
    """All pairs split into train and test: ``x_*`` (N, 3) token ids, ``y_*`` (N,) labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def modadd_data(config: ModAddConfig | None = None) -> ModAddData:
    """Every ``(a, b, =)`` with label ``(a + b) mod p``, split by a seeded permutation."""
    cfg = config or ModAddConfig()
    a, b = torch.meshgrid(torch.arange(cfg.p), torch.arange(cfg.p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.stack([a, b, torch.full_like(a, cfg.p)], dim=1)
    y = (a + b) % cfg.p
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    n_train = int(cfg.frac_train * len(x))
    train, test = perm[:n_train], perm[n_train:]
    return ModAddData(x[train], y[train], x[test], y[test])


@torch.no_grad()
def _accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return (logits.argmax(-1) == y).double().mean().item(), nn.functional.cross_entropy(
        logits, y
    ).item()


def train_modadd(
    config: ModAddConfig | None = None, *, progress: bool = True
) -> tuple[ModAddTransformer, dict[str, Any]]:
    """Train the transformer (CPU, float32, ``config.threads`` threads); return it and metrics.

    Raises ``ZooError`` if the test accuracy has not reached the target after ``max_steps``.
    """
    cfg = config or ModAddConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: ModAddConfig, progress: bool) -> tuple[ModAddTransformer, dict[str, Any]]:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    data = modadd_data(cfg)
    model = ModAddTransformer(cfg)
    model.reset_parameters(cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / cfg.warmup_steps, 1.0)
    )
    history: list[dict[str, float]] = []
    reached: int | None = None
    stop = cfg.max_steps
    bar = tqdm(total=cfg.max_steps, desc="modadd", disable=not progress, unit="step")
    step = 0
    while step < stop:
        model.train()
        loss = nn.functional.cross_entropy(fast_logits(model, data.x_train), data.y_train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % cfg.eval_every == 0 or step == stop:
            model.eval()
            test_acc, test_loss = _accuracy_and_loss(model, data.x_test, data.y_test)
            history.append(
                {"step": step, "train_loss": loss.item(), "test_loss": test_loss,
                 "test_accuracy": test_acc}
            )  # fmt: skip
            bar.set_postfix(loss=f"{loss.item():.3g}", test_acc=f"{test_acc:.3f}")
            if reached is None and test_acc >= cfg.target_test_accuracy:
                reached = step
                stop = min(cfg.max_steps, step + cfg.extra_steps)
    bar.close()
    model.eval()
    if reached is None:
        raise ZooError(
            f"zoo:modadd did not reach test accuracy {cfg.target_test_accuracy} in "
            f"{cfg.max_steps} steps (last {history[-1]['test_accuracy']:.3f})"
        )
    train_acc, train_loss = _accuracy_and_loss(model, data.x_train, data.y_train)
    test_acc, test_loss = _accuracy_and_loss(model, data.x_test, data.y_test)
    metrics = {
        "config": asdict(cfg),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "steps": step,
        "step_reached_target": reached,
        "history": history,
        "train_seconds": time.perf_counter() - start,
        "torch_threads": cfg.threads,
        "units": {"train_loss": "nats/example", "test_loss": "nats/example"},
    }
    return model, metrics


class ModAddEntry(ZooEntry):
    """Zoo entry that trains and caches the modular-addition transformer."""

    name = "modadd"
    kind = "model"
    description = "LIB paper's modular-addition transformer (p=113, 1 layer, 128 wide), CPU"

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        if self.is_ready() and not force:
            return self.metrics()
        from safetensors.torch import save_file

        model, metrics = train_modadd(progress=progress)
        with atomic_folder(self.path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()},
                str(tmp / "model.safetensors"),
            )
            write_json(tmp / METRICS_FILE, metrics)
        return metrics


def load_modadd(*, prepare: bool = True) -> tuple[ModAddTransformer, ModAddData]:
    """The cached transformer in eval mode (trained on first use unless ``prepare=False``)
    and its data split."""
    from safetensors.torch import load_file

    entry = ModAddEntry()
    if not entry.is_ready():
        if not prepare:
            raise ZooError("zoo:modadd is not trained yet: run `tyche zoo train modadd`")
        entry.prepare()
    saved = dict(entry.metrics()["config"])
    saved["betas"] = tuple(saved["betas"])
    cfg = ModAddConfig(**saved)
    model = ModAddTransformer(cfg)
    model.load_state_dict(load_file(str(Path(entry.path) / "model.safetensors")))
    return model.eval(), modadd_data(cfg)
