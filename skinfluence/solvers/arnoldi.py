"""Arnoldi (Lanczos) method: the top eigenpairs of the curvature by a Krylov method.

The curvature ``C + P`` is symmetric, so Arnoldi's iteration is Lanczos's. It runs
here as a *block* Lanczos with full reorthogonalisation (``skinfluence._linalg``):
each step multiplies a block of vectors at once (one batched Hessian-vector product,
far cheaper per vector than one product at a time), and the iteration stops as soon
as the ``rank`` wanted pairs have converged, or when the basis reaches
``krylov_dimension`` vectors.

The inverse is applied exactly on the span ``V`` of the ``rank`` eigenvectors whose
eigenvalues are largest in magnitude, and as ``1 / lambda`` on its complement (the
curvature is taken to be zero there)::

    x = V^T diag(1 / (theta + lambda)) V g + (g - V^T V g) / lambda
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval

from .._linalg import LowRankInverse, block_lanczos, not_positive_definite
from ._base import Attribute, CurvatureOperator, Param, Solver, random_state_param
from .nystroem import LOW_RANK_COMPLEMENT, check_rank

__all__ = ["ArnoldiSolver"]


def default_krylov_dimension(rank: int, n_params: int) -> int:
    """An upper bound on the Krylov vectors ``rank`` well-converged pairs need.

    Examples
    --------
    >>> default_krylov_dimension(10, 1000)
    80
    """
    return min(n_params, 4 * rank + 40)


def default_block_size(rank: int) -> int:
    """Small blocks raise the polynomial degree reached per product; blocks of a
    few vectors still amortise the cost of a Hessian-vector product.

    Examples
    --------
    >>> default_block_size(30)
    15
    """
    return int(np.clip(rank // 2, 4, 32))


class ArnoldiSolver(Solver):
    """Top-``rank`` eigenpairs of ``C + P`` by block Lanczos; Woodbury inverse.

    Memory: ``2 * krylov_dimension`` vectors of length p in the working dtype while
    fitting, ``rank`` in float64 afterwards.

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

    parameters = (
        "estimator", "loss", "params", "regularization", "mode", "hessian", "block_structure",
        Param("rank", 10, [Interval(Integral, 1, None, closed="left")], "int",
              "Number of eigenpairs kept: those of largest magnitude."),
        Param("krylov_dimension", None, [None, Interval(Integral, 1, None, closed="left")], "int",
              """Most Krylov vectors (Hessian-vector products); None allows
``min(n_params, 4 * rank + 40)``. The iteration stops earlier once the
``rank`` pairs have converged."""),
        Param("rtol", 1e-2, [Interval(Real, 0, None, closed="left")], "float",
              """A Ritz pair ``(e, v)`` has converged when ``||(H + P) v - e v||`` is at most
rtol times the largest eigenvalue. Eigenvalue errors shrink with the square
of this residual: 1e-2 typically leaves them well below 1%. The basis is kept in
the working dtype, so in float32 residuals below about 1e-6 are out of reach."""),
        "batch_size", "dtype", "device", "progress",
        random_state_param("the Lanczos start block"),
    )
    reference_settings: ClassVar[dict] = {"rtol": 1e-10}
    sized_parameters = ("rank", "krylov_dimension")
    scorer_name = "ArnoldiInfluenceScorer"
    summary = "Influence functions from the top eigenpairs of the curvature (Lanczos)."
    description = f"""
    Finds the ``rank`` eigenpairs of largest magnitude of the curvature (plus the
    estimator's penalty) by block Lanczos, the symmetric form of Arnoldi's method:
    blocks of Hessian-vector products, full reorthogonalisation and a Rayleigh-Ritz
    problem in float64, stopped when the wanted pairs have converged. The inverse is
    applied exactly on their span V. {LOW_RANK_COMPLEMENT}"""
    memory = """
    Memory: the Krylov basis and its images, ``2 * krylov_dimension`` vectors of
    length p in the working dtype (float32 for a float32 model), while fitting;
    ``rank`` vectors in float64 afterwards."""
    attributes = (
        Attribute("eigenvalues_", "ndarray of shape (rank,)",
                  """Eigenvalues of the curvature plus penalty (without ``regularization``), in
decreasing order of magnitude."""),
    )
    warns = """
    ConvergenceWarning
        When ``krylov_dimension`` vectors did not make the pairs converge."""
    raises = """
    NotPositiveDefiniteError
        When a kept eigenvalue plus ``regularization`` is not positive."""
    examples = """
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import ArnoldiInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> scorer = ArnoldiInfluenceScorer(model, rank=5, regularization=0.01, random_state=0)
    >>> scorer = scorer.fit(X[:200], y[:200])
    >>> scorer.eigenvalues_.shape
    (5,)
    >>> bool(np.all(np.diff(scorer.eigenvalues_) <= 0))
    True
    >>> scorer.influences(X[200:210], y[200:210]).shape
    (10, 200)"""

    def needs_regularization(self, operator: CurvatureOperator) -> bool:
        return self.rank < operator.n_params

    def check(self, operator: CurvatureOperator, mode: str = "up") -> None:
        p = operator.n_params
        check_rank(self.rank, p, float(operator.regularization), self.scorer_name)
        dim = self.krylov_dimension or default_krylov_dimension(self.rank, p)
        if dim < self.rank:
            raise ValueError(
                f"krylov_dimension: got krylov_dimension={dim} < rank={self.rank}; "
                f"use krylov_dimension >= rank (None picks {default_krylov_dimension(self.rank, p)})."
            )

    def _fit(self, operator: CurvatureOperator, progress=None) -> ArnoldiSolver:
        p, lam = operator.n_params, self.regularization_
        dim = self.krylov_dimension or default_krylov_dimension(self.rank, p)
        theta, V, residuals, n_products = block_lanczos(
            operator.curvature_mv,
            p,
            self.rank,
            krylov_dimension=dim,
            block_size=default_block_size(self.rank),
            rtol=self.rtol,
            rng=check_random_state(self.random_state),
            device=operator.device,
            progress=progress,
            dtype=operator.dtype,
        )
        if theta.numel() < self.rank:
            warnings.warn(
                f"The Lanczos iteration found {theta.numel()} eigenpairs, fewer than "
                f"rank={self.rank}, within krylov_dimension={dim}: increase "
                "krylov_dimension, or lower rank.",
                ConvergenceWarning,
                stacklevel=4,
            )
        elif not bool((residuals <= self.rtol).all()) and n_products < p:
            worst = float(residuals.max())
            warnings.warn(
                f"The Lanczos iteration reached krylov_dimension={dim} before the "
                f"{self.rank} eigenpairs converged: the largest relative Ritz residual is "
                f"{worst:.2e} > rtol={self.rtol:g} ({int((residuals > self.rtol).sum())} "
                f"of {self.rank} pairs). Increase krylov_dimension or rtol.",
                ConvergenceWarning,
                stacklevel=4,
            )
        low = float((theta + lam).min()) if theta.numel() else lam
        if low <= 0:
            lam_min, lam_max = float(theta.min()), float(theta.abs().max())
            raise not_positive_definite(
                operator.curvature, lam, f"it has the eigenvalue {lam_min:.3g}", lam_min, lam_max
            )
        self.eigenvalues_ = theta
        self.eigenvectors_ = V
        self.residuals_ = residuals
        self.n_products_ = n_products
        self.inverse_ = LowRankInverse(theta, V, lam)
        return self

    def solve(self, G, report=None):
        return self.inverse_(G)
