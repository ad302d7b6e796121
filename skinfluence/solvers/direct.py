"""Direct method: the exact p x p curvature, factorised once by Cholesky."""

from __future__ import annotations

import torch

from .._linalg import not_positive_definite
from ._base import CurvatureOperator, Solver

__all__ = ["DirectSolver"]


class DirectSolver(Solver):
    """Forms ``A = C + P + lambda I`` densely and keeps its Cholesky factor.

    Memory: the p x p matrix and its factor (2 p^2 numbers).

    Examples
    --------
    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> from skinfluence.solvers import CurvatureOperator, DirectSolver
    >>> model = torch.nn.Linear(3, 2).double()
    >>> a = build_adapter(model, loss=torch.nn.functional.cross_entropy)
    >>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 2
    >>> a.bind(X, 10)
    >>> op = CurvatureOperator(a, X, y, "exact", regularization=0.1, batch_size=4)
    >>> solver = DirectSolver().fit(op)
    >>> G = torch.randn(5, op.n_params, dtype=torch.float64)
    >>> torch.allclose(op.mv(solver.solve(G)), G)
    True
    """

    parameters = (
        "estimator", "loss", "params", "regularization", "mode", "hessian", "batch_size",
        "dtype", "device", "progress",
    )
    scorer_name = "DirectInfluenceScorer"
    summary = "Influence functions with the exact inverse curvature."
    description = """
    Forms the p x p Hessian (or Gauss-Newton matrix) of the mean training loss, adds
    the estimator's penalty and ``regularization``, and factorises it by Cholesky. The
    reference method: exact, affordable up to a few thousand parameters."""
    memory = """
    Memory: the p x p matrix and its Cholesky factor, plus ``batch_size`` samples'
    gradients at a time, plus the test points' factors (n_test x p) while
    computing influences."""
    raises = """
    NotPositiveDefiniteError
        From ``fit``, when the curvature plus ``regularization`` is not positive
        definite; the message suggests a regularization that is."""
    examples = """
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import DirectInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> scorer = DirectInfluenceScorer(model, regularization=0.0).fit(X[:200], y[:200])
    >>> scorer.transform(X[200:210], y[200:210]).shape
    (10, 200)
    >>> scorer.self_influence().shape
    (200,)"""

    def spectrum(self, operator: CurvatureOperator, progress=None) -> tuple[float, float]:
        """The exact extreme eigenvalues of the dense ``C + P``, kept for ``fit``."""
        A = operator.dense(progress)
        A.diagonal().sub_(operator.regularization)
        self._unregularized = A
        eig = torch.linalg.eigvalsh(A.double()) if bool(torch.isfinite(A).all()) else None
        if eig is None:
            return 0.0, 0.0  # fit reports the non-finite curvature
        return float(eig[0]), float(eig[-1])

    def _fit(self, operator: CurvatureOperator, progress=None) -> DirectSolver:
        A = self.__dict__.pop("_unregularized", None)
        if A is None:
            A = operator.dense(progress)
        else:  # the matrix ``spectrum`` formed, without regularization
            A.diagonal().add_(operator.regularization)
        if not bool(torch.isfinite(A).all()):
            raise ValueError(
                "X: the curvature is not finite (inf or NaN): the inputs or the model's "
                "gradients overflowed the working precision. Standardize the features or "
                "use dtype='float64'."
            )
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            A.diagonal().sub_(operator.regularization)
            eig = torch.linalg.eigvalsh(A.double())
            lam_min, lam_max = float(eig[0]), float(eig[-1])
            raise not_positive_definite(
                operator.curvature, operator.regularization,
                f"its smallest eigenvalue without regularization is {lam_min:.3g}",
                lam_min, lam_max,
            )
        self.cholesky_ = L
        return self

    def solve(self, G: torch.Tensor, report=None) -> torch.Tensor:
        return torch.cholesky_solve(G.T.to(self.cholesky_.dtype), self.cholesky_).T
