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
  steps contracting. ``a_max`` is then estimated on a random subset of
  ``max(8 * minibatch_size, 4096)`` training points (all of them when fewer), whose
  largest eigenvalue is on average at least the full one's, at a fraction of the
  cost of products over all points.

With ``preconditioner="ekfac"`` (or ``"kfac"``) each step is preconditioned by
``M``, the inverse of the EK-FAC (K-FAC) approximation of the Gauss-Newton matrix
plus ``lambda I`` (see :class:`EkfacInfluenceScorer`)::

    h_0 = M g,    h_{t+1} = (1 - dampen) h_t + M (g - A_t h_t / scale),    x = h / scale

a preconditioned Richardson iteration, whose error shrinks per step by the largest
``|1 - mu / scale|`` over the eigenvalues ``mu`` of ``M A`` (those of the symmetric
``M^1/2 A M^1/2``); they cluster near 1 where EK-FAC is close to the curvature. Its
fixed point is ``(A + dampen * scale * M^-1)^-1 g``. ``scale="auto"`` then takes
the largest and smallest Ritz values ``mu_max``, ``mu_min`` of ``M^1/2 A M^1/2``
from one block Lanczos run (24 products): ``scale = (1.05 mu_max + mu_min) / 2``
with all training points per step (``mu_min`` is an upper bound of the smallest
eigenvalue, so this scale is never below the optimum), ``1.05 mu_max`` with
minibatches.

A right-hand side stops once its relative update ``||h_{t+1} - h_t|| / ||h_{t+1}||``
falls below ``rtol``; each is frozen independently, so results do not depend on how
right-hand sides are grouped into batches. An iteration that grows instead of
shrinking (a scale below half the largest eigenvalue, a minibatch whose curvature
is far larger than the average, or a curvature that is not positive definite)
stops with :class:`LissaDivergenceError` rather than running into NaN.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from .._linalg import block_lanczos, not_positive_definite
from ._base import Attribute, CurvatureOperator, Param, Solver, SolveReport, random_state_param
from .ekfac import kronecker_preconditioner

__all__ = ["LissaDivergenceError", "LissaSolver"]

#: Safety margin of scale="auto" over the estimated largest eigenvalue.
AUTO_SCALE_MARGIN = 1.05
#: With minibatches, scale="auto" estimates the largest eigenvalue on this many
#: minibatches' worth of points, and at least AUTO_SCALE_SUBSET_MIN (all, if fewer).
AUTO_SCALE_SUBSET_FACTOR = 8
AUTO_SCALE_SUBSET_MIN = 4096
#: An update this many times larger than the smallest seen so far means divergence
#: (all training points per step, where a convergent iteration's updates shrink).
DIVERGENCE_FACTOR = 100.0
#: With minibatches: an iterate this many times larger than any convergent one can
#: be (``scale / lambda_min`` times its start) means divergence.
GROWTH_FACTOR = 1e4


class LissaDivergenceError(ValueError):
    """The LiSSA iteration grew instead of converging."""


class LissaSolver(Solver):
    """LiSSA, see the module docstring.

    Memory: three blocks of k vectors of length p for k right-hand sides.

    After ``fit``: ``scale_`` (the scale used) and ``max_eigenvalue_`` (the Lanczos
    estimate, with ``scale="auto"``). Each ``solve`` adds to the
    :class:`~skinfluence.solvers.SolveReport` it is given the iterations of the
    slowest right-hand side, the final relative update of each and whether each
    converged.

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import LissaInfluenceScorer
    >>> from skinfluence.solvers import SolveReport
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = (X - X.mean(0)) / X.std(0)
    >>> model = LogisticRegression().fit(X, y)
    >>> scorer = LissaInfluenceScorer(model, dtype="float64", random_state=0)
    >>> solver = scorer.fit(X, y).solver_
    >>> type(solver).__name__
    'LissaSolver'
    >>> g = torch.ones(2, 31, dtype=torch.float64)  # two flat gradients
    >>> report = SolveReport()
    >>> solver.solve(g, report).shape
    torch.Size([2, 31])
    >>> bool(report.converged.all()), report.n_iter < 1000
    (True, True)
    """

    parameters = (
        "estimator", "loss", "params", "regularization", "mode", "hessian", "block_structure",
        Param("scale", "auto", [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither")],
              '"auto" or float', """s in ``h <- g + (1 - dampen) h - (H + lambda I) h / s``. The iteration
converges when every eigenvalue of ``(H + lambda I) / s`` lies in (0, 2).
"auto" starts from the largest eigenvalue ``a_max``, estimated by a few block
Lanczos steps (``max_eigenvalue_``): with all training points per step it
takes ``(1.05 a_max + lambda) / 2``, the scale that converges fastest when
the curvature is positive semi-definite; with minibatches it takes
``1.05 a_max``, the classical LiSSA condition, with ``a_max`` estimated on a
random subset of ``max(8 * minibatch_size, 4096)`` points."""),
        Param("dampen", 0.0, [Interval(Real, 0, 1, closed="left")], "float",
              """Shrinks the iterate each step; the result is ``(H + (lambda + dampen * s) I)^-1
g``, so dampening is extra regularization that speeds up convergence."""),
        Param("maxiter", 1000, [Interval(Integral, 1, None, closed="left")], "int",
              "Most iterations per solve."),
        Param("rtol", 1e-4, [Interval(Real, 0, None, closed="left")], "float",
              """A right-hand side stops when its relative update ``||h_new - h|| / ||h_new||``
falls below rtol."""),
        Param("minibatch_size", None, [None, Interval(Integral, 1, None, closed="left")], "int",
              """Training points per step, drawn without replacement (seeded by
``random_state``). None uses all of them: the iteration is then deterministic
and converges linearly. A minibatch makes a step cheaper but leaves noise in
the result that more iterations do not remove."""),
        Param("preconditioner", None, [None, StrOptions({"ekfac", "kfac"})], '{None, "ekfac", "kfac"}',
              """"ekfac": precondition every step with the inverse of the EK-FAC
approximation of the Gauss-Newton matrix plus regularization (as
:class:`EkfacInfluenceScorer` builds it, block diagonal over the ``nn.Linear``
/ ``nn.Conv2d`` layers, which must hold every selected parameter), a
preconditioned Richardson iteration that needs far fewer steps; "kfac": the
same without the refitted eigenvalues. Both need ``regularization > 0``. With
a preconditioner ``scale`` applies to the preconditioned curvature and
``dampen`` adds ``dampen * scale`` times the EK-FAC curvature instead of the
identity."""),
        "batch_size", "dtype", "device", "progress",
        random_state_param("the Lanczos start of scale='auto' and the minibatches"),
    )
    reference_settings: ClassVar[dict] = {"rtol": 1e-8}
    scorer_name = "LissaInfluenceScorer"
    summary = "Influence functions by LiSSA, the stochastic Neumann series."
    description = """
    Iterates ``h <- g + (1 - dampen) h - A_t h / scale`` from ``h = g`` and returns
    ``h / scale`` (Agarwal et al. 2017; Koh & Liang 2017), with ``A_t`` the curvature
    plus penalty plus regularization over a minibatch, or over all training points
    when ``minibatch_size`` is None. ``scale="auto"`` picks the scale from the
    largest eigenvalue, so the series converges without tuning; an iteration that
    grows stops with a :class:`~skinfluence.solvers.LissaDivergenceError` that says
    what to change, instead of running into NaN."""
    memory = """
    Memory: three blocks of ``batch_size`` vectors of length p while solving."""
    attributes = (
        Attribute("scale_", "float", "The scale used."),
        Attribute("max_eigenvalue_", "float or None", """Estimated largest eigenvalue of the curvature plus regularization (with
``scale="auto"``), preconditioned when ``preconditioner`` is set."""),
        Attribute("n_iter_", "int", """Iterations of the slowest right-hand side of the most recent call that solved
systems: a diagnostic of that call, not fitted state.""", when="solve"),
        Attribute("residuals_", "ndarray of shape (n_rhs,)",
                  "Final relative updates of every right-hand side of that call.", when="solve"),
    )
    warns = """
    ConvergenceWarning
        When a right-hand side did not reach ``rtol`` within ``maxiter``."""
    raises = """
    LissaDivergenceError
        When the iteration diverges; the message gives the scale used and the
        remedies."""
    examples = """
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import DirectInfluenceScorer, LissaInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> lissa = LissaInfluenceScorer(model, regularization=0.1, rtol=1e-8, random_state=0)
    >>> I = lissa.fit(X[:200], y[:200]).influences(X[200:210], y[200:210])
    >>> exact = DirectInfluenceScorer(model, regularization=0.1).fit(X[:200], y[:200])
    >>> bool(np.corrcoef(I.ravel(), exact.influences(X[200:210], y[200:210]).ravel())[0, 1] > 0.999)
    True"""

    def needs_regularization(self, operator: CurvatureOperator) -> bool:
        return self.preconditioner in ("ekfac", "kfac")

    def _fit(self, operator: CurvatureOperator, progress=None) -> LissaSolver:
        rng = check_random_state(self.random_state)
        lam = self.regularization_
        self.max_eigenvalue_ = None
        self.preconditioner_ = None
        self._low = None  # the smallest Ritz value of scale="auto", when preconditioned
        # with minibatches the largest eigenvalue is estimated on a random subset: its
        # curvature's is at least as large on average (the largest eigenvalue is
        # convex), the safe side for a scale that must also cover the minibatches
        sample = operator
        if isinstance(self.scale, str) and self._stochastic(operator):
            k = max(AUTO_SCALE_SUBSET_FACTOR * self.minibatch_size, AUTO_SCALE_SUBSET_MIN)
            if k < operator.n_train:
                sample = operator.subset(np.sort(rng.choice(operator.n_train, k, replace=False)))
        if self.preconditioner is not None:
            self.preconditioner_ = kronecker_preconditioner(operator, self.preconditioner, progress)
            if isinstance(self.scale, str):
                self._preconditioned_scale(sample, rng, progress)
            else:
                self.scale_ = float(self.scale)
        elif isinstance(self.scale, str):  # "auto"
            p = operator.n_params
            theta, _, _, _ = block_lanczos(
                sample.curvature_mv,
                p,
                1,
                krylov_dimension=min(p, 24),
                block_size=min(p, 8),
                rtol=1e-3,
                rng=rng,
                device=operator.device,
                which="LA",
                progress=progress,
                dtype=operator.dtype,
            )
            top = float(theta[0]) + lam
            if top <= 0:
                raise not_positive_definite(
                    operator.curvature, lam, f"its largest eigenvalue is {top:.3g} <= 0",
                    top - lam, top - lam,
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
        # ||h|| <= ||h_0|| * scale / lambda_min for a convergent iteration
        low = self._low if self.preconditioner is not None else lam
        self._growth = GROWTH_FACTOR * max(self.scale_ / low, 1.0) if low and low > 0 else float("inf")
        return self

    def _preconditioned_scale(self, operator: CurvatureOperator, rng, progress) -> None:
        """scale="auto" from the extreme Ritz values of ``M^1/2 A M^1/2``."""
        M, lam, wd = self.preconditioner_, self.regularization_, operator.dtype

        def mv(V):
            W = M.solve_root(V.to(wd)).to(torch.float64)
            AW = operator.curvature_mv(W) + lam * W
            return M.solve_root(AW.to(wd)).to(torch.float64)

        p = operator.n_params
        k = min(p, 24)
        theta, _, _, _ = block_lanczos(
            mv, p, k, krylov_dimension=k, block_size=min(p, 8), rtol=1e-3, rng=rng,
            device=operator.device, which="LA", progress=progress, dtype=operator.dtype,
        )
        top, low = float(theta[0]), float(theta[-1])
        self._low = low
        if low <= 0:
            raise not_positive_definite(
                operator.curvature, lam,
                f"the preconditioned curvature has the Rayleigh quotient {low:.3g} <= 0",
                low - lam, top - lam, bound=True,
            )
        self.max_eigenvalue_ = top
        if self._stochastic(operator):
            self.scale_ = AUTO_SCALE_MARGIN * top
        else:
            self.scale_ = max(0.5 * (AUTO_SCALE_MARGIN * top + low), 0.55 * top)

    def _precondition(self, R: torch.Tensor) -> torch.Tensor:
        M = self.preconditioner_
        return M.solve(R.to(self.operator_.dtype)).to(R.dtype)

    def _stochastic(self, operator: CurvatureOperator) -> bool:
        return self.minibatch_size is not None and self.minibatch_size < operator.n_train

    def _mv(self, H: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
        op = self.operator_
        if self._stochastic(op):
            op = op.subset(rng.choice(op.n_train, self.minibatch_size, replace=False))
        return op.curvature_mv(H).add_(H, alpha=float(op.regularization))

    def solve(self, G: torch.Tensor, report: SolveReport | None = None) -> torch.Tensor:
        s, keep = self.scale_, 1.0 - float(self.dampen)
        rng = np.random.RandomState(self.seed_)
        B = G.to(torch.float64)
        k = B.shape[0]
        pre = getattr(self, "preconditioner_", None)
        H = B.clone() if pre is None else self._precondition(B)
        start = H.norm(dim=1)
        residuals = torch.zeros(k, dtype=torch.float64, device=B.device)
        smallest = torch.full_like(residuals, float("inf"))
        active = torch.nonzero(B.norm(dim=1) > 0).flatten()
        bar = report.progress_bar("LiSSA") if report is not None and active.numel() else None
        try:
            H, n_iter, n_products = self._iterate(
                B, H, residuals, smallest, start, active, keep, s, pre, rng,
                None if bar is None else report,
            )
        except BaseException:
            if report is not None:
                report.close()
            raise
        if report is not None:
            converged = residuals <= self.rtol
            report.add(n_iter, residuals.cpu().numpy(), converged.cpu().numpy(), n_products)
        return (H / s).to(G.dtype)

    def _iterate(self, B, H, residuals, smallest, start, active, keep, s, pre, rng, report):
        """The iteration on H (in place while some right-hand sides have stopped);
        fills residuals and returns the iterate, the iterations of the slowest
        right-hand side and the products taken."""
        n_iter, n_products, k = 0, 0, int(active.numel())
        for t in range(self.maxiter):
            if not active.numel():
                break
            # while every right-hand side is still moving, work on H itself
            full = active.numel() == H.shape[0]
            Ha = H if full else H[active]
            Ba = B if full else B[active]
            AH = self._mv(Ha, rng)
            if pre is None:
                new = AH.mul_(-1.0 / s).add_(Ba).add_(Ha, alpha=keep)
            else:
                new = self._precondition(AH.mul_(-1.0 / s).add_(Ba)).add_(Ha, alpha=keep)
            n_products += Ha.shape[0]
            update = torch.linalg.vector_norm(new - Ha, dim=1)
            size = torch.linalg.vector_norm(new, dim=1)
            n_iter = t + 1
            self._check_divergence(t, update, size, smallest if full else smallest[active],
                                   start if full else start[active])
            if full:
                torch.minimum(smallest, update, out=smallest)
                H = new
            else:
                smallest[active] = torch.minimum(smallest[active], update)
                H[active] = new
            rel = update / size
            residuals[active] = rel
            active = active[rel > self.rtol]
            if report is not None:
                report.step(float(rel.max()), self.rtol, int(active.numel()), k, "relative update")
        return H, n_iter, n_products

    def convergence_warning(self, report: SolveReport) -> str | None:
        report.close()  # the end of the call: its progress bar is done
        converged = report.converged
        if converged.all():
            return None
        return (
            f"LiSSA did not converge for {int((~converged).sum())} of {converged.size} "
            f"right-hand sides within maxiter={self.maxiter} iterations: the largest "
            f"relative update is {float(report.residuals.max()):.2e} > rtol={self.rtol:g}. "
            "Increase maxiter or regularization"
            + (", or use a larger minibatch_size (minibatch noise keeps the iterate "
               "moving)" if self.minibatch_size is not None else "")
            + "."
        )

    def _check_divergence(self, t, update, size, smallest, start):
        finite = bool(torch.isfinite(update).all() and torch.isfinite(size).all())
        op = self.operator_
        stochastic = self._stochastic(op)
        if stochastic:
            # Minibatch noise keeps every update moving, and the smallest update seen
            # can be a lucky step a hundred times below the next: divergence shows
            # instead as an iterate growing past any convergent one.
            ratio = size / start.clamp_min(1e-300)
            grew = ratio > self._growth
        else:
            ratio = update / smallest
            grew = (update > DIVERGENCE_FACTOR * smallest) & (update > 1e-3 * size)
        if finite and not bool(grew.any()):
            return
        if finite:
            i = int(torch.argmax(torch.where(grew, ratio, torch.zeros_like(ratio))))
            what = (
                f"the iterate of a right-hand side grew from norm {float(start[i]):.3g} "
                f"to {float(size[i]):.3g}" if stochastic else
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
