"""Conjugate gradients: ``(C + P + lambda I) x = g`` for a block of right-hand sides.

All right-hand sides of a call share one block Krylov space: the breakdown-free
block preconditioned CG of Ji & Li (2017). Each iteration multiplies one block of
search directions by the curvature (a single batched Hessian-vector product), the
search block is re-orthonormalised (dropping directions that became dependent, so
the small ``P^T A P`` systems never become singular), and right-hand sides that have
converged leave the block. A system of k right-hand sides costs about
``k * n_iter`` Hessian-vector products, far fewer than k separate CG runs.

Right-hand sides are scaled to unit norm before the iteration, so the stopping rule
``||g - A x|| <= max(rtol * ||g||, atol)`` treats small and large gradients alike.

Preconditioners (applied to the residual block):

* ``"nystroem"``: the randomized Nystroem preconditioner of Frangella, Tropp & Udell
  (2023), ``(s_r + lambda) U (S + lambda)^-1 U^T + (I - U U^T)`` from a rank-``rank``
  sketch of the curvature; it removes the largest eigenvalues from the spectrum.
* ``"jacobi"``: the inverse diagonal. The diagonal used is the exact diagonal of the
  Gauss-Newton matrix, ``sum_i diag(J_i^T S_i J_i) / n`` with ``J_i`` the Jacobian of
  sample i's outputs and ``S_i`` the Hessian of its loss in those outputs, computed
  from per-sample Jacobians one batch at a time (one backward pass per output), plus
  the diagonal of the estimator's penalty and ``lambda``. For ``hessian="exact"`` this
  is the Gauss-Newton part of the Hessian's diagonal; it is always positive, so the
  preconditioner stays symmetric positive definite. For the empirical Fisher it is
  that matrix's own diagonal, the mean of the squared per-sample gradients.
* ``"ekfac"`` / ``"kfac"``: the inverse of the EK-FAC (K-FAC) approximation of the
  Gauss-Newton matrix plus ``lambda I``, block diagonal over the model's
  ``nn.Linear`` / ``nn.Conv2d`` layers and applied in each layer's Kronecker
  eigenbasis (a few small matrix products per layer); symmetric positive definite
  for ``lambda > 0``. It narrows the spectrum where the curvature is far from
  ``lambda I``; where the regularization already dominates it (eigenvalues of A in a
  range of 2-3), block CG with many right-hand sides converges in a few iterations
  and there is little left to gain (``benchmarks/results/preconditioned.md``).
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from torch.func import hessian, jacrev, vmap

from .._gradients import batch_slices, per_sample_grads
from .._linalg import not_positive_definite, nystroem_sketch
from ._base import Attribute, CurvatureOperator, Param, Solver, SolveReport, random_state_param
from .ekfac import kronecker_preconditioner

__all__ = ["CgSolver"]


def gauss_newton_diagonal(operator: CurvatureOperator) -> torch.Tensor:
    """Exact diagonal of the Gauss-Newton matrix of the (weighted) mean loss (of the
    empirical Fisher, for that curvature) plus the estimator's penalty, float64 (p,)."""
    a = operator.adapter
    n = operator.n_train
    total = max(operator.weight_sum, torch.finfo(torch.float64).tiny)
    diag = torch.zeros(a.n_params, dtype=torch.float64, device=a.device)

    def weighted(t, s):  # per-sample rows t (b, ...) times the points' weights
        w = operator.batch_weights(s)
        return t if w is None else t * w.to(t.dtype).reshape(-1, *[1] * (t.dim() - 1))

    if operator.curvature == "empirical-fisher":
        for s in batch_slices(n, operator.batch_size):
            G2 = per_sample_grads(a, operator.X[s], operator.Y[s]) ** 2
            diag += weighted(G2, s).sum(0).to(torch.float64)
        return _with_penalty(diag / total, a.penalty)
    outputs = vmap(a.sample_output, in_dims=(None, 0))
    jacobians = vmap(jacrev(a.sample_output), in_dims=(None, 0))
    out_hessians = vmap(hessian(lambda o, y: a.output_loss(o, y.unsqueeze(0))))
    d_out = max(int(np.prod(a.n_outputs or 1)), 1)
    # Per-sample Jacobians take d_out * p numbers each: bound a step by batch_size * p.
    step = max(1, operator.batch_size // d_out)
    for s in batch_slices(n, step):
        X, Y = operator.X[s], operator.Y[s]
        b = X.shape[0]
        out = outputs(a.params, X)
        k = out[0].numel()
        J = jacobians(a.params, X)
        J = torch.cat([J[name].reshape(b, k, -1) for name in a.param_names], 2)  # (b, k, p)
        S = out_hessians(out, Y).reshape(b, k, k)
        diag += weighted(J * torch.einsum("bij,bjp->bip", S, J), s).sum((0, 1)).to(torch.float64)
    return _with_penalty(diag / total, a.penalty)


def _with_penalty(diag: torch.Tensor, pen) -> torch.Tensor:
    if pen.diag is not None:
        diag += pen.diag.to(torch.float64)
    for c, u in pen.rank_one:
        diag += c * u.to(torch.float64) ** 2
    return diag


class CgSolver(Solver):
    """Block preconditioned conjugate gradients (see module docstring).

    Memory: about six blocks of k vectors of length p for k right-hand sides, plus
    the preconditioner (``rank`` vectors, or one vector for Jacobi).

    Each ``solve`` adds to the :class:`~skinfluence.solvers.SolveReport` it is given
    the iterations, the final relative residual of each right-hand side (as tracked
    by the recurrence) and whether each met the tolerance; the solver itself is not
    changed.

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import CgInfluenceScorer
    >>> from skinfluence.solvers import SolveReport
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = (X - X.mean(0)) / X.std(0)
    >>> model = LogisticRegression().fit(X, y)
    >>> scorer = CgInfluenceScorer(model, dtype="float64", preconditioner="nystroem", rank=5, random_state=0)
    >>> solver = scorer.fit(X, y).solver_
    >>> type(solver).__name__
    'CgSolver'
    >>> g = torch.ones(2, 31, dtype=torch.float64)  # two flat gradients
    >>> report = SolveReport()
    >>> solver.solve(g, report).shape
    torch.Size([2, 31])
    >>> report.n_iter > 0, bool(report.converged.all())
    (True, True)
    """

    parameters = (
        "estimator", "loss", "params", "regularization", "mode", "hessian", "block_structure",
        Param("rtol", 1e-5, [Interval(Real, 0, None, closed="left")], "float",
              """Stop when ``||g - A x|| <= max(rtol * ||g||, atol)`` for every right-hand side
``g`` (A the curvature plus penalty plus regularization)."""),
        Param("atol", 0.0, [Interval(Real, 0, None, closed="left")], "float",
              "Absolute tolerance of the same rule."),
        Param("maxiter", None, [None, Interval(Integral, 1, None, closed="left")], "int",
              """Most block iterations per solve; None allows ``n_params``, the number exact
arithmetic would need at most."""),
        Param("preconditioner", None, [None, StrOptions({"nystroem", "jacobi", "ekfac", "kfac"})],
              '{None, "nystroem", "jacobi", "ekfac", "kfac"}',
              """"nystroem": a randomized Nystroem sketch of rank ``rank`` removes the largest
eigenvalues from the spectrum (Frangella, Tropp & Udell 2023). "jacobi": the
inverse of the exact Gauss-Newton diagonal (the Gauss-Newton part of the
Hessian's diagonal for ``hessian="exact"``), from per-sample output Jacobians;
for ``hessian="empirical-fisher"`` the empirical Fisher's own diagonal.
"ekfac": the inverse of the EK-FAC approximation of the Gauss-Newton matrix
plus regularization (as :class:`EkfacInfluenceScorer` builds it, block diagonal
over the ``nn.Linear`` / ``nn.Conv2d`` layers, which must hold every selected
parameter); "kfac": the same without the refitted eigenvalues (one pass over
the data). Both need ``regularization > 0``, which keeps them positive
definite; for ``hessian="exact"`` they approximate its Gauss-Newton part."""),
        Param("rank", 10, [Interval(Integral, 1, None, closed="left")], "int",
              "Rank of the Nystroem preconditioner."),
        "batch_size", "dtype", "device", "progress",
        random_state_param("the Nystroem preconditioner's sketch"),
    )
    reference_settings: ClassVar[dict] = {"rtol": 1e-12}
    block_solves = True
    sized_parameters = ("rank",)
    scorer_name = "CgInfluenceScorer"
    summary = "Influence functions by conjugate gradients, without forming the Hessian."
    description = """
    Solves ``(H + lambda I) x = grad l(test)`` for all test points of a batch at once
    with block preconditioned conjugate gradients (Ji & Li 2017): the right-hand sides
    share one block Krylov space, so k of them cost about ``k * n_iter_``
    Hessian-vector products, and converged ones leave the block. Exact up to the
    tolerance; the curvature plus regularization must be positive definite."""
    memory = """
    Memory: about six blocks of ``batch_size`` vectors of length p while solving,
    plus the preconditioner (``rank`` vectors)."""
    attributes = (
        Attribute("n_iter_", "int", """Iterations of the most recent call that solved systems (the largest over
its blocks of right-hand sides): a diagnostic of that call, not fitted state.""",
                  when="solve"),
        Attribute("residuals_", "ndarray of shape (n_rhs,)", """Final relative residuals ``||g - A x|| / ||g||`` of every right-hand side of
the most recent call that solved systems.""", when="solve"),
    )
    warns = """
    ConvergenceWarning
        When a right-hand side did not reach the tolerance within ``maxiter``."""
    raises = """
    NotPositiveDefiniteError
        When the iteration meets negative curvature: increase ``regularization`` or
        use ``hessian="gauss-newton"``."""
    examples = """
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import CgInfluenceScorer, DirectInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> cg = CgInfluenceScorer(model, regularization=0.01, rtol=1e-8, dtype="float64")
    >>> I = cg.fit(X[:200], y[:200]).influences(X[200:210], y[200:210])
    >>> I.shape, cg.n_iter_ <= 31
    ((10, 200), True)
    >>> exact = DirectInfluenceScorer(model, regularization=0.01, dtype="float64")
    >>> bool(np.allclose(I, exact.fit(X[:200], y[:200]).influences(X[200:210], y[200:210])))
    True"""

    def needs_regularization(self, operator: CurvatureOperator) -> bool:
        return self.preconditioner in ("ekfac", "kfac")

    def check(self, operator: CurvatureOperator, mode: str = "up") -> None:
        p = operator.n_params
        if self.preconditioner == "nystroem" and self.rank > p:
            raise ValueError(
                f"rank: the Nystroem preconditioner got rank={self.rank}, but the model "
                f"has only {p} parameters; use rank <= {p}."
            )

    # ------------------------------------------------------------------ fit
    def _fit(self, operator: CurvatureOperator, progress=None) -> CgSolver:
        self.operator_ = operator
        lam = self.regularization_
        self.preconditioner_ = None
        if self.preconditioner == "nystroem":
            s, U = nystroem_sketch(
                operator.curvature_mv, operator.n_params, self.rank,
                check_random_state(self.random_state), operator.eps, operator.device,
            )
            keep = s + lam > 0
            s, U = s[keep], U[keep]
            wd = operator.dtype
            # P^-1 r = r + U^T ((s_r + lam) / (s + lam) - 1) U r, in working precision
            self.preconditioner_ = (
                ("nystroem", U.to(wd), ((s[-1] + lam) / (s + lam) - 1.0).to(wd))
                if s.numel()
                else None
            )
        elif self.preconditioner == "jacobi":
            d = gauss_newton_diagonal(operator) + lam
            if not bool((d > 0).all()):
                raise not_positive_definite(
                    operator.curvature, lam,
                    "some parameters have zero curvature, so the Jacobi preconditioner "
                    "has no positive diagonal (use preconditioner='nystroem' or "
                    "regularization > 0)",
                    0.0, float(d.max()),
                )
            self.preconditioner_ = ("jacobi", d.to(operator.dtype))
        elif self.preconditioner in ("ekfac", "kfac"):
            self.preconditioner_ = ("kronecker", kronecker_preconditioner(operator, self.preconditioner, progress))
        return self

    def _precondition(self, R: torch.Tensor) -> torch.Tensor:
        pre = self.preconditioner_
        if pre is None:
            return R
        if pre[0] == "jacobi":
            return R / pre[1]
        if pre[0] == "kronecker":
            return pre[1].solve(R)
        _, U, factor = pre
        return R + ((R @ U.T) * factor) @ U

    def _mv(self, V: torch.Tensor) -> torch.Tensor:
        return self.operator_.mv(V.to(self.operator_.dtype)).to(V.dtype)

    # ------------------------------------------------------------------ solve
    def solve(self, G: torch.Tensor, report: SolveReport | None = None) -> torch.Tensor:
        op = self.operator_
        # Blocks of vectors stay in the working precision (float32 for most models:
        # half the memory and time of the many k x p products); the small k x k
        # systems are solved in float64.
        wd = op.dtype
        norms = G.to(torch.float64).norm(dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        tol = torch.clamp(self.atol / safe, min=self.rtol)  # relative to each ||g||
        X = torch.zeros(G.shape, dtype=wd, device=G.device)
        residuals = (norms > 0).to(torch.float64)
        active = torch.nonzero(residuals > tol).flatten()
        R = (G[active].to(torch.float64) / safe[active, None]).to(wd)
        maxiter = self._maxiter()
        n_iter, n_products = 0, 0
        P = _unit_rows(self._precondition(R))
        bar = None
        if report is not None and active.numel():
            bar = report.progress_bar("conjugate gradients")
        k = int(active.numel())
        try:
            while active.numel() and n_iter < maxiter:
                Q = self._mv(P)
                n_products += P.shape[0]
                # A-orthonormalise the search block through the eigenvectors of
                # P A P^T, dropping directions that became dependent (the block
                # breakdown of plain block CG).
                PAP = (P @ Q.T).to(torch.float64)
                evals, U = torch.linalg.eigh(0.5 * (PAP + PAP.T))
                top = float(evals[-1])
                if top <= 0 or float(evals[0]) < -1e-3 * top:
                    raise _negative_curvature(op, P, PAP)
                keep = evals > _DEPENDENT[wd] * top
                if not bool(keep.any()):  # no usable direction left: stagnation
                    break
                W = (U[:, keep] / evals[keep].sqrt()).T.to(wd)
                P, Q = W @ P, W @ Q
                alpha = P @ R.T  # (s, k_active): P A P^T = I
                X[active] += alpha.T @ P
                R = R - alpha.T @ Q
                n_iter += 1
                res = R.to(torch.float64).norm(dim=1)
                residuals[active] = res
                left = res > tol[active]
                if bar is not None:
                    report.step(float(res.max()), self.rtol, int(left.sum()), k)
                if not bool(left.any()):
                    active = active[:0]
                    break
                active, R = active[left], R[left]
                Z = self._precondition(R)
                P = _unit_rows(Z - (Q @ Z.T).T @ P)
        except BaseException:
            if report is not None:
                report.close()
            raise
        X = X.to(torch.float64) * safe[:, None]
        if report is not None:
            converged = residuals <= tol
            report.add(n_iter, residuals.cpu().numpy(), converged.cpu().numpy(), n_products)
        return X.to(G.dtype)

    def _maxiter(self) -> int:
        return self.maxiter if self.maxiter is not None else self.operator_.n_params

    def convergence_warning(self, report: SolveReport) -> str | None:
        report.close()  # the end of the call: its progress bar is done
        converged = report.converged
        if converged.all():
            return None
        return (
            f"Conjugate gradients did not converge for {int((~converged).sum())} of "
            f"{converged.size} right-hand sides within maxiter={self._maxiter()} "
            f"iterations: the largest relative residual is {float(report.residuals.max()):.2e} "
            f"(rtol={self.rtol:g}, atol={self.atol:g}). Increase maxiter, use "
            "preconditioner='nystroem' with a larger rank, or increase regularization."
        )


def _negative_curvature(op: CurvatureOperator, P, PAP):
    """The error for a search block along which A is not positive definite, with the
    most negative Rayleigh quotient found (an upper bound on A's smallest eigenvalue)."""
    # The block may be linearly dependent: work on the range of its Gram matrix.
    gram = (P @ P.T).to(torch.float64)
    s, V = torch.linalg.eigh(0.5 * (gram + gram.T))
    keep = s > 1e-10 * s.max().clamp_min(torch.finfo(torch.float64).tiny)
    W = V[:, keep] / s[keep].sqrt()
    M = W.T @ PAP.to(torch.float64) @ W
    quotients = torch.linalg.eigvalsh(0.5 * (M + M.T))
    lam = float(op.regularization)
    lowest, highest = float(quotients[0]) - lam, float(quotients[-1]) - lam
    return not_positive_definite(
        op.curvature, lam,
        f"conjugate gradients found a direction along which the curvature is {lowest:.3g}",
        lowest, highest, bound=True,
    )


#: Eigenvalues of P A P^T below this fraction of the largest mark dependent directions.
_DEPENDENT = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def _unit_rows(Z: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm: the span is unchanged, and a right-hand side with a
    small residual keeps as much weight in the search block as one with a large one."""
    n = Z.norm(dim=1, keepdim=True)
    return Z[n[:, 0] > 0] / n[n[:, 0] > 0]
