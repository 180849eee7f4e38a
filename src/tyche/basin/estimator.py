"""`VolumeEstimator`: the seed-compatible interface (`VolumeEstimator.from_config(cfg).run()`)."""

from __future__ import annotations

from typing import Any

import torch

from tyche.basin.config import VolumeConfig
from tyche.basin.core import estimate_basin
from tyche.basin.loss import ModelLoss
from tyche.basin.options import BasinOptions
from tyche.basin.preconditioners import build_preconditioner
from tyche.basin.result import VolumeResult
from tyche.data import chunk_and_tokenize
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.io import model_hash
from tyche.memory import parse_size


class VolumeEstimator:
    """Estimates the basin volume of ``config.model`` on ``config.dataset`` (see VolumeConfig).

    ``config.model`` may also be a TransformerLens ``HookedTransformer`` or an nnsight wrapper;
    it is measured as ``tyche.frameworks.as_module(config.model)`` (``self.model``).
    """

    def __init__(self, config: VolumeConfig):
        if config.model is None or config.tokenizer is None or config.dataset is None:
            raise InputError("VolumeConfig needs model, tokenizer and dataset")
        self.config = config
        self.model = as_module(config.model)
        device = next(self.model.parameters()).device
        self.tokens = chunk_and_tokenize(
            config.dataset,
            config.tokenizer,
            text_key=config.text_key,
            max_seq_len=config.max_seq_len,
            chunking=config.chunking,
            max_examples=config.val_size,
        )
        if config.val_size is not None:
            self.tokens = {k: v[: config.val_size] for k, v in self.tokens.items()}
        self.tokens = {k: v.to(device) for k, v in self.tokens.items()}
        cache_device = "cpu" if config.cache_mode == "cpu" else None
        strategy = "inplace" if config.implicit_vectors else config.strategy
        self.loss = ModelLoss(
            self.model,
            self.tokens,
            include=config.include,
            exclude=config.exclude,
            data_batch_size=config.data_batch_size,
            strategy=strategy,
            cache_device=cache_device,
        )
        self.preconditioner = self._preconditioner()

    @classmethod
    def from_config(cls, config: VolumeConfig) -> VolumeEstimator:
        return cls(config)

    def _preconditioner(self) -> torch.Tensor | None:
        cfg, layout = self.config, self.loss.layout
        if cfg.preconditioner is not None:
            return torch.as_tensor(cfg.preconditioner)
        if cfg.preconditioner_type is None:
            return None
        if cfg.preconditioner_type not in ("adam", "fisher"):
            raise InputError(
                f"unknown preconditioner_type {cfg.preconditioner_type!r}: use 'adam', 'fisher' "
                "or None"
            )
        if cfg.preconditioner_type == "adam" and cfg.optimizer_state is None:
            raise InputError(
                'preconditioner_type="adam" needs optimizer_state (a state dict, '
                "a name -> moments mapping, or a path to optimizer.pt)"
            )
        return build_preconditioner(
            cfg.preconditioner_type,
            self.model,
            self.tokens,
            names=list(layout.names),
            optimizer_state=cfg.optimizer_state,
            order=cfg.adam_order,
            eps=cfg.preconditioner_eps,
            exponent=cfg.preconditioner_exponent,
            seed=cfg.seed,
        )

    def _loss_fn(self):
        l2 = self.config.l2_reg
        if not l2:
            return self.loss
        return lambda offsets: self.loss(offsets) + 0.5 * l2 * (offsets.float() ** 2).sum(-1)

    def run(self) -> VolumeResult:
        cfg = self.config
        max_memory = None if cfg.max_memory is None else parse_size(cfg.max_memory)
        extra: dict[str, Any] = {
            "model_hash": model_hash(self.model),
            "val_size": cfg.val_size,
            "max_seq_len": cfg.max_seq_len,
            "l2_reg": cfg.l2_reg,
        }
        options = BasinOptions(
            cutoff=cfg.cutoff,
            sigma=cfg.sigma,
            n_samples=cfg.n_samples,
            prior=cfg.prior,
            batch_size=cfg.model_batch_size,
            max_memory=max_memory,
            rtol=cfg.rtol,
            seed=cfg.seed,
        )
        return estimate_basin(
            self._loss_fn(),
            self.loss.anchor,
            options,
            preconditioner=self.preconditioner,
            progress=cfg.tqdm,
            checkpoint=cfg.checkpoint,
            resume=cfg.resume,
            extra_settings=extra,
        )
