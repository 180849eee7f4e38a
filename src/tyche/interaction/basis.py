"""The bases of a node layer: PCA (``svd``), ``neuron`` and the local interaction basis.

Coordinates are those of the folded activation ``[f, 1]`` (width ``d + 1``); activations are
row vectors, ``f_hat = [f, 1] @ C`` are the basis's features and ``f_hat @ C_pinv`` maps back.

1. The Gram matrix ``G`` of ``[f, 1]`` (of ``[f - mu, 1]`` when centred) is eigendecomposed:
   ``G = U D U^T``, eigenvalues in descending order, those at or below
   ``threshold * max(D)`` dropped. Centred, ``G = blockdiag(Cov, 1)``, so the constant
   direction ``[0, ..., 0, 1]`` (eigenvalue 1) is put first by construction and never dropped.
2. With the centring matrix ``Y`` (``[f, 1] @ Y = [f - mu, 1]``): ``W = Y U`` and
   ``W+ = U^T Y^-1`` (the PCA basis; ``svd`` stops here: ``C = W``), and the whitening map
   ``R = W D^-1/2``, ``R+ = D^1/2 W+``.
3. ``M = R+ M' R+^T`` is the second moment of the integrated gradients of the next layer's
   features in whitened coordinates (accumulated directly in those coordinates). It is
   eigendecomposed with the first ``n_masked`` coordinates (the constant direction, when
   centred) kept as they are: ``V = blockdiag(I, V_rest)``.
4. ``Lambda``: the eigenvalues of ``M`` (``jacobian``), or ``|diag(V^T R+ Lambda' R V)|``
   (``(1-0)*alpha``, ``(1-alpha)^2``). Directions are sorted by ``Lambda`` (masked ones stay
   first) and those at or below ``threshold * max(Lambda)`` dropped.
5. ``C = R V Lambda^1/2`` and ``C+ = Lambda^-1/2 V^T R+``: ``C+`` is a left inverse of ``C``
   and ``C^T G C = diag(Lambda)`` (each feature's second moment is its ``Lambda``).

Thresholds are relative to the largest eigenvalue (the original used an absolute 1e-15, which
sits at float64's noise floor for large activations). The constant direction is always kept;
where its ``Lambda`` vanishes it keeps scale 1. Eigenvectors are signed so that their largest
entry is positive, so runs that differ only by rounding give the same signs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tyche.errors import InputError
from tyche.interaction.fold import centering_matrix
from tyche.interaction.gram import folded_gram

__all__ = [
    "BASES",
    "LIB_FORMULAS",
    "InteractionBasis",
    "PCA",
    "lib_basis",
    "neuron_basis",
    "final_pca_basis",
    "pca",
    "svd_basis",
    "unrotated_basis",
]

LIB_FORMULAS = ("jacobian", "(1-0)*alpha", "(1-alpha)^2")
BASES = (*LIB_FORMULAS, "svd", "neuron")


@dataclass(frozen=True)
class InteractionBasis:
    """The basis of one node layer.

    Attributes:
        node_layer: the node layer's name.
        C: ``(d + 1, k)`` from folded original coordinates ``[f, 1]`` to the basis; for the
            last node layer ``(d, k)`` (a rotation of its raw coordinates, ``rotate_final``)
            or None (its raw ``d`` coordinates).
        C_pinv: ``(k, d + 1)`` left inverse of ``C`` (None with ``C``).
        Lambda: ``(k,)`` importance of each direction (None for ``svd``, ``neuron`` and an
            unrotated layer). For the LIB formulas ``C^T G C = diag(Lambda)``.
        W, W_pinv: ``(d + 1, k1)`` and ``(k1, d + 1)``: the PCA basis of the layer (``Y U``).
        V: ``(k1, k)`` rotation of the whitened PCA coordinates (LIB formulas only).
        eigenvalues: ``(k1,)`` Gram eigenvalues ``D`` of the kept PCA directions.
        mean: ``(d,)`` mean activation (over rows and positions).
        formula: ``jacobian``, ``(1-0)*alpha``, ``(1-alpha)^2``, ``svd``, ``neuron`` or
            ``none`` (an unrotated final layer).
        center: whether the basis is centred (then column 0 is the constant direction).
        orig_dim: ``d + 1`` (``d`` for the last layer).
    """

    node_layer: str
    C: Tensor | None
    C_pinv: Tensor | None
    Lambda: Tensor | None
    W: Tensor | None
    W_pinv: Tensor | None
    V: Tensor | None
    eigenvalues: Tensor | None
    mean: Tensor | None
    formula: str
    center: bool
    orig_dim: int

    @property
    def dim(self) -> int:
        """Number of basis directions ``k`` (``orig_dim`` when unrotated)."""
        return self.orig_dim if self.C is None else self.C.shape[1]

    @property
    def folded(self) -> bool:
        """Whether ``C`` acts on the folded ``[f, 1]`` (else on the raw ``f`` of the last node
        layer, or there is no ``C``)."""
        return (
            self.C is not None
            and self.mean is not None
            and self.C.shape[0] == (self.mean.shape[0] + 1)
        )

    @property
    def width(self) -> int:
        """The folded width ``d + 1`` of the node layer's activation."""
        if self.mean is not None:
            return self.mean.shape[0] + 1
        return self.orig_dim + (0 if self.folded else 1)

    @property
    def importance(self) -> Tensor | None:
        """``Lambda``, or for PCA bases the variance of each direction (``eigenvalues``)."""
        if self.Lambda is not None:
            return self.Lambda
        if self.formula == "svd":
            return self.eigenvalues
        return None


@dataclass(frozen=True)
class PCA:
    """Step 1-2 of a node layer: ``U``, ``D``, ``W``, ``W+``, ``R``, ``R+`` and the mean."""

    U: Tensor
    D: Tensor
    W: Tensor
    W_pinv: Tensor
    R: Tensor
    R_pinv: Tensor
    mean: Tensor
    center: bool

    @property
    def n_masked(self) -> int:
        """Coordinates kept out of the rotation: the constant direction when centred."""
        return 1 if self.center else 0


def _signed(vectors: Tensor) -> Tensor:
    """Columns flipped so each column's entry of largest magnitude is positive."""
    if vectors.numel() == 0:
        return vectors
    idx = vectors.abs().argmax(0)
    signs = torch.sign(vectors.gather(0, idx.unsqueeze(0))).squeeze(0)
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def eigh_desc(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, float64) and signed eigenvectors of a symmetric matrix."""
    sym = (matrix + matrix.T).double() / 2
    values, vectors = torch.linalg.eigh(sym)
    order = values.flip(0).argsort(descending=True, stable=True)
    values, vectors = values.flip(0)[order], vectors.flip(1)[:, order]
    return values, _signed(vectors)


def _kept(values: Tensor, threshold: float) -> Tensor:
    top = values.max() if values.numel() else values.new_zeros(())
    return values > threshold * top if top > 0 else torch.zeros_like(values, dtype=torch.bool)


def pca(mean: Tensor, covariance: Tensor, *, center: bool, threshold: float) -> PCA:
    """Steps 1-2 from the mean ``(d,)`` and covariance ``(d, d)`` of a node layer."""
    mean, cov = mean.double(), covariance.double()
    d = mean.shape[0]
    if center:
        values, vectors = eigh_desc(cov)
        keep = _kept(values, threshold)
        D = torch.cat([values.new_ones(1), values[keep]])
        U = torch.zeros(d + 1, 1 + int(keep.sum()), dtype=torch.float64, device=mean.device)
        U[d, 0] = 1.0
        U[:d, 1:] = vectors[:, keep]
    else:
        values, vectors = eigh_desc(folded_gram(mean, cov, center=False))
        keep = _kept(values, threshold)
        D, U = values[keep], vectors[:, keep]
    Y = centering_matrix(mean) if center else torch.eye(d + 1, dtype=torch.float64)
    Y_inv = centering_matrix(mean, inverse=True) if center else Y
    W, W_pinv = Y @ U, U.T @ Y_inv
    R, R_pinv = W * D.rsqrt(), D.sqrt().unsqueeze(1) * W_pinv
    return PCA(U, D, W, W_pinv, R, R_pinv, mean, center)


def svd_basis(name: str, p: PCA) -> InteractionBasis:
    """The PCA basis itself: ``C = W``, ``C+ = W+``; no ``Lambda``."""
    return InteractionBasis(name, p.W, p.W_pinv, None, p.W, p.W_pinv, None, p.D, p.mean,
                            "svd", p.center, p.W.shape[0])  # fmt: skip


def neuron_basis(name: str, p: PCA) -> InteractionBasis:
    """The identity basis over ``[f, 1]`` (uncentred only)."""
    if p.center:
        raise InputError(
            "the neuron basis is the identity and cannot be centred; pass center=False"
        )
    eye = torch.eye(p.W.shape[0], dtype=torch.float64, device=p.W.device)
    return InteractionBasis(name, eye, eye.clone(), None, p.W, p.W_pinv, None, p.D, p.mean,
                            "neuron", False, eye.shape[0])  # fmt: skip


def final_pca_basis(name: str, mean: Tensor, cov: Tensor, threshold: float) -> InteractionBasis:
    """The last node layer's PCA rotation: ``C`` ``(d, k)``, the covariance's eigenvectors.

    Nothing runs after the last node layer, so its basis is only a coordinate system for the
    edges into it: a pure rotation of its ``d`` raw coordinates (no constant coordinate, no
    shift), which leaves every earlier basis and edge exactly as without it.
    """
    values, vectors = eigh_desc(cov.double())
    keep = _kept(values, threshold)
    V = vectors[:, keep]
    return InteractionBasis(name, V, V.T.clone(), None, V, V.T.clone(), None, values[keep],
                            mean.double(), "svd", False, V.shape[0])  # fmt: skip


def unrotated_basis(name: str, d: int, mean: Tensor | None) -> InteractionBasis:
    """A final node layer left in its raw ``d`` coordinates (``C = None``)."""
    return InteractionBasis(name, None, None, None, None, None, None, None, mean, "none",
                            False, d)  # fmt: skip


def lib_basis(
    name: str,
    p: PCA,
    m: Tensor,
    lambda_dash: Tensor | None,
    formula: str,
    threshold: float,
) -> InteractionBasis:
    """Steps 3-5: the local interaction basis from ``M`` (whitened, ``(k1, k1)``).

    ``lambda_dash``: ``R+ Lambda' R`` ``(k1, k1)`` for the ``(1-0)*alpha`` and
    ``(1-alpha)^2`` formulas (None for ``jacobian``).
    """
    if formula not in LIB_FORMULAS:
        raise InputError(f"unknown basis formula {formula!r}; choose one of {BASES}")
    nm, k1 = p.n_masked, p.D.shape[0]
    m = m.double()
    values, vectors = eigh_desc(m[nm:, nm:])
    V = torch.zeros(k1, k1, dtype=torch.float64, device=m.device)
    V[:nm, :nm] = torch.eye(nm, dtype=torch.float64)
    V[nm:, nm:] = vectors
    if formula == "jacobian":
        lam = torch.cat([m.diagonal()[:nm], values])
    else:
        if lambda_dash is None:
            raise InputError(f"the {formula} basis needs Lambda'")
        lam = (V.T @ lambda_dash.double() @ V).diagonal().abs()
        if lam[nm:].numel() and lam[nm:].std() == 0 and lam[nm:].max() == 0:
            raise InputError(
                f"node layer {name!r}: every Lambda of the {formula} basis is 0, so every "
                "direction would be dropped. The 'gradient' rule gives 0 for (1-alpha)^2 "
                "(its integrand vanishes at alpha = 1); integrate with 'trapezoidal' or "
                "'gauss-legendre' and n_intervals > 0"
            )
    rest = lam[nm:]
    order = rest.argsort(descending=True, stable=True)
    rest = rest[order]
    keep = _kept(rest, threshold)
    cols = torch.cat([torch.arange(nm, device=m.device), nm + order[keep]])
    lam = torch.cat([lam[:nm], rest[keep]])
    scale = lam.clone()
    if nm:  # the constant direction keeps scale 1 where its Lambda vanishes
        scale[:nm] = torch.where(lam[:nm] > 0, lam[:nm], torch.ones_like(lam[:nm]))
    V = V[:, cols]
    C = p.R @ V * scale.sqrt()
    C_pinv = (V.T @ p.R_pinv) / scale.sqrt().unsqueeze(1)
    return InteractionBasis(name, C, C_pinv, lam, p.W, p.W_pinv, V, p.D, p.mean, formula,
                            p.center, p.W.shape[0])  # fmt: skip
