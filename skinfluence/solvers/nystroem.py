"""Randomized Nystroem method: a rank-r sketch of the curvature, inverted by Woodbury.

One block of ``r`` Hessian-vector products with a random Gaussian test matrix
``Omega`` gives ``Y = (C + P) Omega``; the stable construction of Tropp et al.
(2017) and Frangella, Tropp & Udell (2023) turns it into eigenpairs ``(U, s)`` with
``U diag(s) U^T = Y (Omega^T Y)^+ Y^T`` (shifted by a tiny ``nu`` to keep the
Cholesky factorisation well defined). The inverse is then applied exactly for that
low-rank matrix plus ``lambda I``::

    x = U diag(1 / (s + lambda)) U^T g + (g - U U^T g) / lambda

so on the complement of the sketched subspace the curvature is taken to be zero.

The sketch is also the Nystroem preconditioner of the conjugate-gradient solver.
Small helpers shared by the matrix-free solvers live here too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.utils import check_random_state

from ._base import CurvatureOperator, NotPositiveDefiniteError, Solver

__all__ = ["NystroemSolver"]


def curvature_mv64(operator: CurvatureOperator, V: torch.Tensor) -> torch.Tensor:
    """``V @ (C + P)`` (no regularization) for float64 rows ``V``, returned in float64.

    The products run in the adapter's working dtype; the linear algebra around them
    stays in float64 so that small dense problems lose nothing to rounding.
    """
    a = operator.adapter
    W = V.to(dtype=a.dtype, device=a.device)
    out = operator.data_mv(W)
    if not a.penalty.is_zero:
        out = out + a.penalty.mv(W)
    return out.to(torch.float64)


def random_rows(rng: np.random.RandomState, k: int, p: int, device) -> torch.Tensor:
    """``k`` standard Gaussian rows of length ``p`` in float64, drawn from ``rng``."""
    return torch.from_numpy(rng.standard_normal((k, p))).to(device)


def orthonormal_rows(Z: torch.Tensor, drop: float = 1e-10) -> torch.Tensor:
    """An orthonormal basis (as rows) of the row space of ``Z``.

    Directions whose singular value is below ``drop`` times the largest are left out,
    so (nearly) dependent rows never produce a singular Gram matrix downstream.
    """
    if Z.shape[0] == 0:
        return Z
    _, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return Z[:0]
    return Vh[S > drop * S[0]]


def working_eps(operator: CurvatureOperator) -> float:
    """Machine epsilon of the precision the Hessian-vector products run in."""
    return float(torch.finfo(operator.adapter.dtype).eps)


def nystroem_sketch(
    mv, n_params: int, rank: int, rng: np.random.RandomState, eps: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized Nystroem approximation ``U diag(s) U^T`` of a PSD operator.

    Parameters
    ----------
    mv : callable
        ``V -> V @ M`` for float64 rows ``V`` of shape (k, p).
    n_params, rank : int
        Dimension ``p`` and sketch size ``r <= p``.
    rng : numpy RandomState
        Source of the Gaussian test matrix.
    eps : float
        Relative accuracy of ``mv`` (machine epsilon of its working precision); sets
        the stabilising shift.

    Returns
    -------
    s : tensor of shape (r,)
        Approximate eigenvalues, non-negative, in decreasing order.
    U : tensor of shape (r, p)
        Orthonormal approximate eigenvectors, as rows.
    """
    omega = torch.linalg.qr(random_rows(rng, rank, n_params, device).T)[0].T
    Y = mv(omega)
    # The shift keeps Omega^T Y positive definite despite rounding in the products
    # (the Frobenius norm bounds the spectral one and costs no SVD).
    nu = math.sqrt(n_params) * eps * float(torch.linalg.norm(Y))
    nu = max(nu, torch.finfo(torch.float64).tiny)
    for _ in range(3):
        Y_nu = Y + nu * omega
        B = omega @ Y_nu.T
        B = 0.5 * (B + B.T)
        L, info = torch.linalg.cholesky_ex(B)
        if int(info) == 0:
            break
        # Omega^T M Omega is indefinite: M has negative curvature (an exact Hessian
        # away from a minimum). Shift past it; the negative part is clipped below.
        nu += float(-torch.linalg.eigvalsh(B)[0]) * 1.01 + nu
    else:  # pragma: no cover - three shifts always suffice in exact arithmetic
        raise NotPositiveDefiniteError("The Nystroem sketch could not be stabilised.")
    # F = Y_nu L^-T, so that F F^T = Y_nu (Omega^T Y_nu)^-1 Y_nu^T.
    F = torch.linalg.solve_triangular(L, Y_nu, upper=False)  # (r, p) = L^-1 Y_nu
    _, S, Vh = torch.linalg.svd(F, full_matrices=False)
    s = torch.clamp(S**2 - nu, min=0.0)
    return s, Vh


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

    def __init__(self, rank: int = 10, random_state=None):
        self.rank = rank
        self.random_state = random_state

    def fit(self, operator: CurvatureOperator, progress=None) -> NystroemSolver:
        p, lam = operator.n_params, float(operator.regularization)
        check_rank(self.rank, p, lam, "NystroemInfluenceScorer")
        rng = check_random_state(self.random_state)
        s, U = nystroem_sketch(
            lambda V: curvature_mv64(operator, V),
            p,
            self.rank,
            rng,
            working_eps(operator),
            operator.adapter.device,
        )
        if lam == 0 and float(s[-1]) <= 0:
            raise NotPositiveDefiniteError(
                "regularization: the sketched curvature is singular and "
                "regularization=0; use regularization > 0."
            )
        self.eigenvalues_ = s
        self.eigenvectors_ = U
        self.regularization_ = lam
        self.n_params_ = p
        self.inverse_ = LowRankInverse(s, U, lam)
        return self

    def solve(self, G: torch.Tensor) -> torch.Tensor:
        return self.inverse_(G)


def check_rank(rank: int, n_params: int, regularization: float, name: str) -> None:
    """The rank must fit the model, and a partial rank needs ``regularization > 0``."""
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


class LowRankInverse:
    """``(U^T diag(s) U + lambda I)^-1`` for orthonormal rows ``U``, applied to rows.

    The complement of ``U`` is scaled by ``1 / lambda`` (it is empty when ``U`` spans
    the whole space, and ``lambda`` may then be 0)::

        x = g / lambda + ((g U^T) diag(1 / (s + lambda) - 1 / lambda)) U

    Products run in float64: the complement term is a difference scaled by
    ``1 / lambda``, which would amplify float32 rounding by up to
    ``(s_max + lambda) / lambda``.
    """

    def __init__(self, s: torch.Tensor, U: torch.Tensor, regularization: float):
        full = U.shape[0] >= U.shape[1]
        self.U = U
        self.identity = 0.0 if full else 1.0 / regularization
        self.W = (1.0 / (s + regularization) - self.identity)[:, None] * U

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        G64 = G.to(torch.float64)
        out = torch.addmm(G64, G64 @ self.U.T, self.W, beta=self.identity)
        return out.to(G.dtype)
