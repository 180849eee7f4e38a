"""The original causal basis extraction (the 2023 gist), re-implemented for comparison.

One layer, a lens target, KL energy, as the gist does it:

* the clean log-probabilities of all tokens are computed once;
* per direction j, a fresh ``torch.optim.LBFGS`` (strong-Wolfe line search, ``max_iter``
  100, ``tolerance_change`` = float32 eps, the other settings torch's defaults: history 100,
  ``tolerance_grad`` 1e-7) optimises a raw parameter that starts at the standard basis
  vector e_j; the objective projects it onto the complement of the earlier directions and
  renormalises it (``x / (‖x‖ + eps)``), ablates it from every token at once (no chunks) and
  returns minus the mean KL over all tokens;
* the direction kept is the projected final parameter, its energy the last one the closure
  computed; the directions are sorted by energy at the end.

The ablation itself is ``tyche.ablation.remove_subspace`` (the same maths as the gist's).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from tyche.ablation import remove_subspace

__all__ = ["gist_causal_basis"]


def gist_causal_basis(
    lens: torch.nn.Module, hiddens: Tensor, k: int, *, mode: str = "mean", max_iter: int = 100
) -> dict:
    """``{"vectors": (d, k), "energies": (k,), "evals": [per direction], "seconds": [...]}``."""
    d = hiddens.shape[-1]
    eye = torch.eye(d, dtype=hiddens.dtype)
    basis = eye[:, :k].clone()
    energies = torch.zeros(k)
    tol = torch.finfo(hiddens.dtype).eps
    with torch.no_grad():
        log_p = lens(hiddens).log_softmax(-1)
    p = log_p.exp()
    evals, seconds = [], []
    for j in range(k):
        start = time.perf_counter()
        proj = eye - basis[:, :j] @ basis[:, :j].T if j else eye

        def project(x: Tensor, proj: Tensor = proj) -> Tensor:
            x = proj @ x
            return x / (x.norm() + torch.finfo(x.dtype).eps)

        basis[:, j] = project(basis[:, j])
        v = torch.nn.Parameter(basis[:, j].clone())
        opt = torch.optim.LBFGS(
            [v], line_search_fn="strong_wolfe", max_iter=max_iter, tolerance_change=tol
        )
        state = {"energy": torch.tensor(0.0), "evals": 0}

        def closure(v: torch.nn.Parameter = v, opt=opt, state=state, project=project) -> Tensor:
            state["evals"] += 1
            opt.zero_grad()
            ablated = remove_subspace(hiddens, project(v), mode)
            log_q = lens(ablated).log_softmax(-1)
            loss = -torch.sum(p * (log_p - log_q), dim=-1).mean()
            loss.backward()
            state["energy"] = -loss.detach()
            return loss

        opt.step(closure)
        basis[:, j] = project(v.data)
        energies[j] = state["energy"]
        evals.append(state["evals"])
        seconds.append(time.perf_counter() - start)
    order = energies.argsort(descending=True)
    return {
        "vectors": basis[:, order],
        "energies": energies[order],
        "evals": [evals[i] for i in order.tolist()],
        "seconds": [seconds[i] for i in order.tolist()],
    }
