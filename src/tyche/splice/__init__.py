"""Spliced faithfulness: how much of a language model survives a bottleneck at some of its sites.

A *bottleneck* replaces the activation ``h`` at one or more sites by a function of it: a
codebook's snapped codes, a sparse dictionary's reconstruction, a rank-k projection. Splicing
it into the model (:func:`tyche.hooks.replace_activations`) and running the model on token rows
gives, against the clean model on the same rows:

- ``kl``: ``KL(clean || spliced)`` of the next-token distributions, nats per token, the mean
  over every non-masked position (the clean log-probabilities are computed once,
  :class:`tyche.divergence.AnchorCache`, and compared by :func:`tyche.divergence.masked_kl`);
- ``ce``: the next-token cross-entropy (nats, mean over positions ``t`` whose token and next
  token are both unmasked) of the clean, the spliced and the *ablated* model, where ablation
  replaces the same sites by zero (``zero``) or by their mean over the rows (``mean``);
- ``ce_recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)``: 1 when the
  bottleneck loses nothing, 0 when it is no better than the ablation. Where ablating changes
  the loss by at most :data:`RECOVERED_EPS` nats the ratio is undefined: it is NaN in the
  result, ``n/a`` in the table and ``null`` in JSON;
- ``accuracy``: the next-token top-1 accuracy (same positions as ``ce``), clean and spliced.

Every bottleneck is measured with all its sites spliced at once and, when it has several
sites and ``each_site`` is on, at every site alone. A projection (:func:`projection`) keeps
the site's mean: ``h -> mu + (h - mu) V_k D_k`` with ``mu`` the mean of ``h`` over the rows
(:func:`site_moments`), ``V_k`` ``(d, k)`` the directions and ``D_k`` ``(k, d)`` their dual
(``V_k^T`` for orthonormal directions, the matching rows of a pseudo-inverse otherwise), so
``k = 0`` is mean ablation and a full basis is the identity.

Under ``torchrun`` the rows are split by rank (:func:`tyche.distributed.shard_range`) and every
mean and sum is all-reduced, so the numbers are those of one process (up to float rounding of
the summation order). This module knows no method: bottlenecks come as
``{site: replacement function}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tyche._lazy import lazy_exports

__all__ = [
    "RECOVERED_EPS",
    "Bottleneck",
    "FromSite",
    "SiteMoments",
    "SpliceOptions",
    "SpliceResult",
    "pca_directions",
    "projection",
    "site_moments",
    "splice_faithfulness",
]

if TYPE_CHECKING:  # lazy names, for IDEs and type checkers
    from tyche.splice.core import (
        Bottleneck,
        FromSite,
        SiteMoments,
        pca_directions,
        projection,
        site_moments,
        splice_faithfulness,
    )
    from tyche.splice.options import SpliceOptions
    from tyche.splice.result import RECOVERED_EPS, SpliceResult

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "RECOVERED_EPS": "tyche.splice.result",
        "Bottleneck": "tyche.splice.core",
        "FromSite": "tyche.splice.core",
        "SiteMoments": "tyche.splice.core",
        "SpliceOptions": "tyche.splice.options",
        "SpliceResult": "tyche.splice.result",
        "pca_directions": "tyche.splice.core",
        "projection": "tyche.splice.core",
        "site_moments": "tyche.splice.core",
        "splice_faithfulness": "tyche.splice.core",
    },
)
