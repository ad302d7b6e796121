"""Randomized Nystroem method: a rank-r sketch of the curvature, inverted by Woodbury.

One block of ``r`` Hessian-vector products with a random Gaussian test matrix
``Omega`` gives ``Y = (C + P) Omega``; the stable construction of Tropp et al.
(2017) and Frangella, Tropp & Udell (2023) turns it into eigenpairs ``(U, s)`` with
``U diag(s) U^T = Y (Omega^T Y)^+ Y^T`` (shifted by a tiny ``nu`` to keep the
Cholesky factorisation well defined). The inverse is then applied exactly for that
low-rank matrix plus ``lambda I``::

    x = U diag(1 / (s + lambda)) U^T g + (g - U U^T g) / lambda

so on the complement of the sketched subspace the curvature is taken to be zero.
"""

from __future__ import annotations

from numbers import Integral

from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval

from .._linalg import LowRankInverse, not_positive_definite, nystroem_sketch
from ._base import Attribute, CurvatureOperator, Param, Solver, random_state_param

__all__ = ["NystroemSolver"]

LOW_RANK_COMPLEMENT = (
    "On the complement of that subspace the curvature is taken to be zero, so the "
    "inverse there is ``1 / regularization`` (as in pyDVL): "
    "``x = V diag(1 / (e + lambda)) V^T g + (g - V V^T g) / lambda``. "
    "``regularization`` must therefore be positive unless ``rank`` equals the number "
    "of parameters."
)


def check_rank(rank: int, n_params: int, regularization: float, name: str) -> None:
    """The rank must fit the model, and a partial rank needs ``regularization > 0``.

    Examples
    --------
    >>> check_rank(5, 10, 0.1, "NystroemInfluenceScorer")
    """
    if rank > n_params:
        raise ValueError(
            f"rank: {name} got rank={rank}, but the model has only {n_params} "
            f"parameters; use rank <= {n_params}."
        )
    if rank < n_params and regularization <= 0:
        raise ValueError(
            f"regularization: {name} inverts the complement of its rank-{rank} "
            "approximation as 1 / regularization, so regularization must be > 0 "
            f"(got {regularization:g}). Use regularization > 0, or rank={n_params} "
            "(the number of parameters) for the full curvature."
        )


class NystroemSolver(Solver):
    """Rank-``rank`` randomized Nystroem sketch of ``C + P``, inverted by Woodbury.

    Memory: ``rank`` vectors of length p (plus one block of ``rank`` products while
    fitting). Exact when ``rank == n_params`` and the curvature is positive
    semi-definite; negative curvature (an exact Hessian away from a minimum) is
    clipped to zero.

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import NystroemInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = (X - X.mean(0)) / X.std(0)
    >>> model = LogisticRegression().fit(X, y)
    >>> scorer = NystroemInfluenceScorer(model, dtype="float64", rank=5, random_state=0)
    >>> solver = scorer.fit(X, y).solver_
    >>> type(solver).__name__
    'NystroemSolver'
    >>> g = torch.ones(2, 31, dtype=torch.float64)  # two flat gradients
    >>> solver.solve(g).shape
    torch.Size([2, 31])
    >>> solver.eigenvalues_.shape
    torch.Size([5])
    """

    parameters = (
        "estimator", "loss", "params", "regularization", "mode", "hessian", "block_structure",
        Param("rank", 10, [Interval(Integral, 1, None, closed="left")], "int",
              "Size of the sketch: Hessian-vector products taken while fitting."),
        "batch_size", "dtype", "device", "progress",
        random_state_param("the Gaussian test matrix"),
    )
    sized_parameters = ("rank",)
    scorer_name = "NystroemInfluenceScorer"
    summary = "Influence functions from a randomized Nystroem sketch of the curvature."
    description = f"""
    One block of ``rank`` Hessian-vector products with a random Gaussian test matrix
    gives a rank-``rank`` approximation ``V diag(e) V^T`` of the curvature (plus the
    estimator's penalty), built by the numerically stable construction of Tropp et
    al. (2017); the inverse follows from the Woodbury identity. The cheapest method
    here to fit. {LOW_RANK_COMPLEMENT} The sketch assumes a positive semi-definite
    curvature: negative curvature (an exact Hessian away from a minimum) is clipped
    to zero, so prefer ``hessian="gauss-newton"`` for non-convex models."""
    memory = """
    Memory: ``rank`` vectors of length p (two blocks while fitting)."""
    attributes = (
        Attribute("eigenvalues_", "ndarray of shape (rank,)",
                  "Eigenvalues of the sketch (without ``regularization``), in decreasing order."),
    )
    examples = """
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import DirectInfluenceScorer, NystroemInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> sketch = NystroemInfluenceScorer(model, rank=31, random_state=0).fit(X[:200], y[:200])
    >>> exact = DirectInfluenceScorer(model).fit(X[:200], y[:200])
    >>> I, J = sketch.influences(X[200:210], y[200:210]), exact.influences(X[200:210], y[200:210])
    >>> bool(np.allclose(I, J, rtol=1e-3, atol=1e-3 * np.abs(J).max()))
    True"""

    def needs_regularization(self, operator: CurvatureOperator) -> bool:
        return self.rank < operator.n_params

    def check(self, operator: CurvatureOperator, mode: str = "up") -> None:
        check_rank(self.rank, operator.n_params, float(operator.regularization), self.scorer_name)

    def _fit(self, operator: CurvatureOperator, progress=None) -> NystroemSolver:
        lam = self.regularization_
        s, U = nystroem_sketch(
            operator.curvature_mv, operator.n_params, self.rank,
            check_random_state(self.random_state), operator.eps, operator.device,
        )
        if lam == 0 and float(s[-1]) <= 0:
            raise not_positive_definite(
                operator.curvature, lam, "the sketched curvature is singular",
                0.0, float(s[0]),
            )
        self.eigenvalues_ = s
        self.eigenvectors_ = U
        self.inverse_ = LowRankInverse(s, U, lam)
        return self

    def solve(self, G, report=None):
        return self.inverse_(G)
