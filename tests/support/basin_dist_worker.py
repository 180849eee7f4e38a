"""Run estimate_basin on a small MLP; rank 0 writes the estimates as JSON (argv[1])."""

import json
import sys

import torch
from torch import nn

from tyche import distributed as dist
from tyche.basin.core import estimate_basin
from tyche.basin.loss import ModelLoss
from tyche.basin.options import BasinOptions

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5)).eval()
loss = ModelLoss(model, torch.randn(32, 8))
res = estimate_basin(
    loss, loss.anchor, BasinOptions(cutoff=1e-2, n_samples=7, batch_size=2, seed=3), progress=False
)
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(
            {
                "world_size": dist.get_world_size(),
                "estimates": res.estimates.tolist(),
                "radii": res.radii.tolist(),
            },
            f,
        )
