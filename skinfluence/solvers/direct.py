"""Direct method: the exact p x p curvature, factorised once by Cholesky."""

from __future__ import annotations

import math

import torch

from .._gradients import dense_curvature
from ._base import CurvatureOperator, NotPositiveDefiniteError, Solver


def suggest_regularization(min_eigenvalue: float, max_eigenvalue: float) -> float:
    """A regularization that lifts the smallest eigenvalue safely above zero.

    Half as much again as the most negative eigenvalue, plus a relative floor for a
    singular matrix, rounded up to one significant digit.

    Parameters
    ----------
    min_eigenvalue, max_eigenvalue : float
        Extreme eigenvalues of the curvature without regularization.

    Returns
    -------
    regularization : float

    Examples
    --------
    >>> suggest_regularization(-2.59, 40.0)
    4
    """
    need = 1.5 * max(-min_eigenvalue, 0.0) + 1e-6 * max(abs(max_eigenvalue), 1.0)
    digits = math.floor(math.log10(need))
    return math.ceil(need / 10**digits) * 10**digits


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

    def fit(self, operator: CurvatureOperator, progress=None) -> DirectSolver:
        a = operator.adapter
        A = dense_curvature(
            a, operator.X, operator.Y, operator.curvature, operator.batch_size, progress=progress
        )
        if not a.penalty.is_zero:
            A += a.penalty.dense(a.n_params, a.dtype, a.device)
        A.diagonal().add_(operator.regularization)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            A.diagonal().sub_(operator.regularization)
            eig = torch.linalg.eigvalsh(A.double())
            lam_min, lam_max = float(eig[0]), float(eig[-1])
            raise NotPositiveDefiniteError(
                f"regularization: the {operator.curvature} curvature plus "
                f"regularization={operator.regularization:g} is not positive definite "
                f"(its smallest eigenvalue without regularization is {lam_min:.3g}). "
                f"Use regularization={suggest_regularization(lam_min, lam_max):g} or larger"
                + (
                    ", or hessian='gauss-newton', which is positive semi-definite."
                    if operator.curvature == "exact"
                    else "."
                )
            )
        self.cholesky_ = L
        self.n_params_ = a.n_params
        return self

    def solve(self, G: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(G.T.to(self.cholesky_.dtype), self.cholesky_).T
