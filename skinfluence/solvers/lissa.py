"""LiSSA: the (stochastic) Neumann series for ``(C + P + lambda I)^-1 g``.

The iteration of Agarwal, Bullins & Hazan (2017), as used by Koh & Liang::

    h_0 = g,    h_{t+1} = g + (1 - dampen) h_t - A_t h_t / scale,    x = h / scale

with ``A_t`` the curvature plus penalty plus ``lambda I`` over a minibatch drawn at
step t (or over all training points when ``minibatch_size`` is None, which makes the
iteration deterministic). Its fixed point is ``(A + dampen * scale * I)^-1 g``, so
``dampen`` acts as extra regularization. It converges when every eigenvalue of
``A / scale`` lies in (0, 2); the error shrinks per step by the largest of
``|1 - a / scale|`` over the eigenvalues ``a`` of A.

``scale="auto"`` starts from the largest eigenvalue ``a_max`` of A, estimated by a
few steps of block Lanczos (a Krylov refinement of power iteration):

* with all training points per step, ``scale = (1.05 a_max + lambda) / 2``. When the
  curvature is positive semi-definite the eigenvalues of A lie in
  ``[lambda, a_max]``, and this is the scale that shrinks the error fastest, by
  about ``(a_max - lambda) / (a_max + lambda)`` per step (Richardson's optimal
  step); twice as fast as ``scale = a_max`` when lambda is small;
* with minibatches, ``scale = 1.05 a_max``, the classical condition of LiSSA: a
  single minibatch curves more than the average, and the larger scale keeps its
  steps contracting.

A right-hand side stops once its relative update ``||h_{t+1} - h_t|| / ||h_{t+1}||``
falls below ``rtol``; each is frozen independently, so results do not depend on how
right-hand sides are grouped into batches. An iteration that grows instead of
shrinking (a scale below half the largest eigenvalue, a minibatch whose curvature
is far larger than the average, or a curvature that is not positive definite)
stops with :class:`LissaDivergenceError` rather than running into NaN.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from ._base import CurvatureOperator, NotPositiveDefiniteError, Solver
from .arnoldi import block_lanczos
from .direct import suggest_regularization
from .nystroem import curvature_mv64

__all__ = ["LissaDivergenceError", "LissaSolver"]

#: Safety margin of scale="auto" over the estimated largest eigenvalue.
AUTO_SCALE_MARGIN = 1.05
#: An update this many times larger than the smallest seen so far means divergence.
DIVERGENCE_FACTOR = 100.0


class LissaDivergenceError(ValueError):
    """The LiSSA iteration grew instead of converging."""


class LissaSolver(Solver):
    """LiSSA, see the module docstring.

    Memory: three blocks of k vectors of length p for k right-hand sides.

    After ``fit``: ``scale_`` (the scale used) and ``max_eigenvalue_`` (the Lanczos
    estimate, with ``scale="auto"``). After each ``solve``: ``n_iter_`` (iterations
    of the slowest right-hand side), ``residuals_`` (final relative update of each)
    and ``converged_``.

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import LissaInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = (X - X.mean(0)) / X.std(0)
    >>> model = LogisticRegression().fit(X, y)
    >>> scorer = LissaInfluenceScorer(model, dtype="float64", random_state=0)
    >>> solver = scorer.fit(X, y).solver_
    >>> type(solver).__name__
    'LissaSolver'
    >>> g = torch.ones(2, 31, dtype=torch.float64)  # two flat gradients
    >>> solver.solve(g).shape
    torch.Size([2, 31])
    >>> bool(solver.converged_.all()), solver.n_iter_ < 1000
    (True, True)
    """

    def __init__(
        self,
        scale="auto",
        dampen: float = 0.0,
        maxiter: int = 1000,
        rtol: float = 1e-4,
        minibatch_size=None,
        random_state=None,
        show_progress: bool = False,
    ):
        self.scale = scale
        self.dampen = dampen
        self.maxiter = maxiter
        self.rtol = rtol
        self.minibatch_size = minibatch_size
        self.random_state = random_state
        self.show_progress = show_progress

    def fit(self, operator: CurvatureOperator, progress=None) -> LissaSolver:
        rng = check_random_state(self.random_state)
        lam = float(operator.regularization)
        self.max_eigenvalue_ = None
        if isinstance(self.scale, str):  # "auto"
            p = operator.n_params
            theta, _, _, _ = block_lanczos(
                lambda V: curvature_mv64(operator, V),
                p,
                1,
                krylov_dimension=min(p, 24),
                block_size=min(p, 8),
                rtol=1e-3,
                rng=rng,
                device=operator.adapter.device,
                which="LA",
                progress=progress,
            )
            top = float(theta[0]) + lam
            if top <= 0:
                raise NotPositiveDefiniteError(
                    f"regularization: the largest eigenvalue of the {operator.curvature} "
                    f"curvature plus regularization={lam:g} is {top:.3g} <= 0. Use "
                    f"regularization={suggest_regularization(top - lam, top - lam):g} or larger."
                )
            self.max_eigenvalue_ = top
            if self._stochastic(operator):
                self.scale_ = AUTO_SCALE_MARGIN * top
            else:
                self.scale_ = max(0.5 * (AUTO_SCALE_MARGIN * top + lam), 0.55 * top)
        else:
            self.scale_ = float(self.scale)
        self.seed_ = int(rng.randint(np.iinfo(np.int32).max))
        self.operator_ = operator
        return self

    def _stochastic(self, operator: CurvatureOperator) -> bool:
        return self.minibatch_size is not None and self.minibatch_size < operator.n_train

    def _mv(self, H: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
        op = self.operator_
        if self._stochastic(op):
            idx = rng.choice(op.n_train, self.minibatch_size, replace=False)
            idx = torch.as_tensor(idx, device=op.X.device)
            op = CurvatureOperator(
                op.adapter, op.X[idx], op.Y[idx], op.curvature, op.regularization, op.batch_size
            )
        return curvature_mv64(op, H) + float(op.regularization) * H

    def solve(self, G: torch.Tensor) -> torch.Tensor:
        s, keep = self.scale_, 1.0 - float(self.dampen)
        rng = np.random.RandomState(self.seed_)
        B = G.to(torch.float64)
        k = B.shape[0]
        H = B.clone()
        residuals = torch.zeros(k, dtype=torch.float64, device=B.device)
        smallest = torch.full_like(residuals, float("inf"))
        active = torch.nonzero(B.norm(dim=1) > 0).flatten()
        n_iter = 0
        steps = range(self.maxiter)
        if self.show_progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="LiSSA", leave=False)
        for t in steps:
            if not active.numel():
                break
            Ha = H[active]
            new = B[active] + keep * Ha - self._mv(Ha, rng) / s
            update = (new - Ha).norm(dim=1)
            size = new.norm(dim=1)
            n_iter = t + 1
            self._check_divergence(t, update, size, smallest[active])
            smallest[active] = torch.minimum(smallest[active], update)
            H[active] = new
            rel = update / size
            residuals[active] = rel
            active = active[rel > self.rtol]
        if hasattr(steps, "close"):
            steps.close()
        converged = residuals <= self.rtol
        self.n_iter_ = n_iter
        self.residuals_ = residuals.cpu().numpy()
        self.converged_ = converged.cpu().numpy()
        if not bool(converged.all()):
            warnings.warn(
                f"LiSSA did not converge for {int((~converged).sum())} of {k} right-hand "
                f"sides within maxiter={self.maxiter} iterations: the largest relative "
                f"update is {float(residuals.max()):.2e} > rtol={self.rtol:g}. Increase "
                "maxiter or regularization"
                + (", or use a larger minibatch_size (minibatch noise keeps the iterate "
                   "moving)" if self.minibatch_size is not None else "")
                + ".",
                ConvergenceWarning,
                stacklevel=3,
            )
        return (H / s).to(G.dtype)

    def _check_divergence(self, t, update, size, smallest):
        finite = bool(torch.isfinite(update).all() and torch.isfinite(size).all())
        grew = (update > DIVERGENCE_FACTOR * smallest) & (update > 1e-3 * size)
        if finite and not bool(grew.any()):
            return
        op = self.operator_
        if finite:
            i = int(torch.argmax(torch.where(grew, update / smallest, torch.zeros_like(update))))
            what = (
                f"the update of a right-hand side grew from {float(smallest[i]):.3g} "
                f"to {float(update[i]):.3g}"
            )
        else:
            what = "the iterate overflowed to inf/NaN"
        auto = (
            f" (scale='auto', from the largest eigenvalue estimate "
            f"{self.max_eigenvalue_:.4g})"
            if self.max_eigenvalue_ is not None
            else ""
        )
        raise LissaDivergenceError(
            f"scale: LiSSA diverged at iteration {t + 1}: {what}. It used "
            f"scale={self.scale_:.4g}{auto}, dampen={self.dampen:g}, "
            f"regularization={float(op.regularization):g}, "
            f"minibatch_size={self.minibatch_size}. The iteration converges only when "
            "every eigenvalue of (H + regularization I) / scale lies in (0, 2): use "
            "scale='auto' or a larger scale, a larger minibatch_size, dampen > 0, or a "
            "larger regularization. A curvature that is not positive definite "
            "(hessian='exact' away from a minimum) also diverges: try "
            "hessian='gauss-newton'."
        )
