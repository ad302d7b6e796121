"""Arnoldi (Lanczos) method: the top eigenpairs of the curvature by a Krylov method.

The curvature ``C + P`` is symmetric, so Arnoldi's iteration is Lanczos's. It runs
here as a *block* Lanczos with full reorthogonalisation: each step multiplies a block
of vectors at once (one batched Hessian-vector product, far cheaper per vector than
one product at a time), and the Rayleigh-Ritz problem on the whole Krylov basis is
solved in float64. Every product is kept, so the Ritz residuals
``||(C + P) v - theta v||`` come for free and the iteration stops as soon as the
``rank`` wanted pairs have converged, or when the basis reaches
``krylov_dimension`` vectors.

The inverse is applied exactly on the span ``V`` of the ``rank`` eigenvectors whose
eigenvalues are largest in magnitude, and as ``1 / lambda`` on its complement (the
curvature is taken to be zero there)::

    x = V^T diag(1 / (theta + lambda)) V g + (g - V^T V g) / lambda
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from ._base import CurvatureOperator, NotPositiveDefiniteError, Solver
from .direct import suggest_regularization
from .nystroem import (
    LowRankInverse,
    check_rank,
    curvature_mv64,
    orthonormal_rows,
    random_rows,
)

__all__ = ["ArnoldiSolver"]


def default_krylov_dimension(rank: int, n_params: int) -> int:
    """An upper bound on the Krylov vectors ``rank`` well-converged pairs need."""
    return min(n_params, 4 * rank + 40)


def default_block_size(rank: int) -> int:
    """Small blocks raise the polynomial degree reached per product; blocks of a
    few vectors still amortise the cost of a Hessian-vector product."""
    return int(np.clip(rank // 2, 4, 32))


def block_lanczos(
    mv,
    n_params: int,
    rank: int,
    *,
    krylov_dimension: int,
    block_size: int,
    rtol: float,
    rng: np.random.RandomState,
    device,
    which: str = "LM",
    progress=None,
):
    """Top-``rank`` eigenpairs of a symmetric operator by block Lanczos.

    Parameters
    ----------
    mv : callable
        ``V -> V @ M`` for float64 rows ``V`` of shape (k, p).
    which : {"LM", "LA"}
        Largest magnitude or largest algebraic eigenvalues.
    rtol : float
        A Ritz pair ``(theta, v)`` has converged when
        ``||M v - theta v|| <= rtol * max |theta|``.

    Returns
    -------
    theta : tensor (rank,)
        Ritz values, in decreasing order of magnitude ("LM") or value ("LA").
    V : tensor (rank, p)
        Orthonormal Ritz vectors, as rows.
    residuals : tensor (rank,)
        Relative Ritz residuals.
    n_products : int
        Number of vectors multiplied by ``mv``.
    """
    krylov_dimension = min(max(krylov_dimension, rank), n_params)
    block = orthonormal_rows(random_rows(rng, min(block_size, krylov_dimension), n_params, device))
    basis, images = [], []
    size = 0
    steps = range(n_params)  # the loop always ends by size or convergence
    for _ in steps if progress is None else progress(steps, "Lanczos"):
        W = mv(block)
        basis.append(block)
        images.append(W)
        size += block.shape[0]
        Q, AQ = torch.cat(basis), torch.cat(images)
        T = Q @ AQ.T
        T = 0.5 * (T + T.T)
        vals, vecs = torch.linalg.eigh(T)
        order = torch.argsort(vals.abs() if which == "LM" else vals, descending=True)[:rank]
        theta, Y = vals[order], vecs[:, order]
        V, AV = Y.T @ Q, Y.T @ AQ
        scale = float(theta.abs().max()) if theta.numel() else 0.0
        residuals = (AV - theta[:, None] * V).norm(dim=1) / max(scale, 1e-300)
        if size >= krylov_dimension or bool((residuals <= rtol).all()):
            break
        # Next block: the part of M @ block not yet in the basis.
        want = min(block_size, krylov_dimension - size)
        block = _new_directions(W, Q, scale=float(W.norm(dim=1).max()))[:want]
        if block.shape[0] < want:
            # The basis is (nearly) invariant: continue with random directions.
            extra = random_rows(rng, want - block.shape[0], n_params, device)
            basis_now = torch.cat([Q, block])
            block = torch.cat([block, _new_directions(extra, basis_now, scale=1.0)])[:want]
        if block.shape[0] == 0:
            break
    return theta, V, residuals, size


def _new_directions(R: torch.Tensor, Q: torch.Tensor, scale: float, drop: float = 1e-8):
    """Orthonormal rows spanning the part of ``R``'s rows orthogonal to the rows of
    ``Q``, leaving out directions below ``drop * scale`` (rounding, not signal: they
    would not be orthogonal to ``Q``). Projected twice, against lost orthogonality."""
    R = R / max(scale, 1e-300)
    for _ in range(2):
        R = R - (R @ Q.T) @ Q
    if R.shape[0] == 0:
        return R
    _, S, Vh = torch.linalg.svd(R, full_matrices=False)
    return Vh[S > drop]


class ArnoldiSolver(Solver):
    """Top-``rank`` eigenpairs of ``C + P`` by block Lanczos; Woodbury inverse.

    Memory: ``2 * krylov_dimension`` vectors of length p while fitting, ``rank``
    afterwards.

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import ArnoldiInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = (X - X.mean(0)) / X.std(0)
    >>> model = LogisticRegression().fit(X, y)
    >>> scorer = ArnoldiInfluenceScorer(model, dtype="float64", rank=5, random_state=0)
    >>> solver = scorer.fit(X, y).solver_
    >>> type(solver).__name__
    'ArnoldiSolver'
    >>> g = torch.ones(2, 31, dtype=torch.float64)  # two flat gradients
    >>> solver.solve(g).shape
    torch.Size([2, 31])
    >>> solver.eigenvalues_.shape
    torch.Size([5])
    """

    def __init__(
        self, rank: int = 10, krylov_dimension=None, rtol: float = 1e-2, random_state=None
    ):
        self.rank = rank
        self.krylov_dimension = krylov_dimension
        self.rtol = rtol
        self.random_state = random_state

    def fit(self, operator: CurvatureOperator, progress=None) -> ArnoldiSolver:
        p, lam = operator.n_params, float(operator.regularization)
        check_rank(self.rank, p, lam, "ArnoldiInfluenceScorer")
        dim = self.krylov_dimension or default_krylov_dimension(self.rank, p)
        if dim < self.rank:
            raise ValueError(
                f"krylov_dimension: got krylov_dimension={dim} < rank={self.rank}; "
                f"use krylov_dimension >= rank (None picks {default_krylov_dimension(self.rank, p)})."
            )
        theta, V, residuals, n_products = block_lanczos(
            lambda X: curvature_mv64(operator, X),
            p,
            self.rank,
            krylov_dimension=dim,
            block_size=default_block_size(self.rank),
            rtol=self.rtol,
            rng=check_random_state(self.random_state),
            device=operator.adapter.device,
            progress=progress,
        )
        if not bool((residuals <= self.rtol).all()) and n_products < p:
            worst = float(residuals.max())
            warnings.warn(
                f"The Lanczos iteration reached krylov_dimension={dim} before the "
                f"{self.rank} eigenpairs converged: the largest relative Ritz residual is "
                f"{worst:.2e} > rtol={self.rtol:g} ({int((residuals > self.rtol).sum())} "
                f"of {self.rank} pairs). Increase krylov_dimension or rtol.",
                ConvergenceWarning,
                stacklevel=3,
            )
        low = float((theta + lam).min()) if theta.numel() else lam
        if low <= 0:
            lam_min, lam_max = float(theta.min()), float(theta.abs().max())
            raise NotPositiveDefiniteError(
                f"regularization: the {operator.curvature} curvature has the eigenvalue "
                f"{lam_min:.3g}, so with regularization={lam:g} it is not positive "
                f"definite. Use regularization={suggest_regularization(lam_min, lam_max):g} "
                "or larger"
                + (
                    ", or hessian='gauss-newton', which is positive semi-definite."
                    if operator.curvature == "exact"
                    else "."
                )
            )
        self.eigenvalues_ = theta
        self.eigenvectors_ = V
        self.residuals_ = residuals
        self.n_products_ = n_products
        self.regularization_ = lam
        self.inverse_ = LowRankInverse(theta, V, lam)
        return self

    def solve(self, G: torch.Tensor) -> torch.Tensor:
        return self.inverse_(G)
