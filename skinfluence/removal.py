"""Removal effects of groups of training points (methods of the influence scorers).

What happens to the test losses when a set S of m training points (a data source, a
cluster, the top suspects) is dropped and the model refitted. The model's objective
is taken as ``J(theta) = sum_i l_i(theta) + n R(theta)``, with ``R`` the estimator's
own penalty (sklearn's ``C`` or ``alpha``, which do not change when points are
dropped) plus ``regularization / 2 ||theta||^2``; its Hessian is ``n A``, with
``A = H + P + lambda I`` the matrix every solver inverts. Removing S moves the
minimiser by ``d = theta_{-S} - theta``:

* first order (Koh et al., 2019): ``d1 = A^-1 g_S / n``, ``g_S`` the sum of the
  group's loss gradients; the change of a test loss is ``grad l_test . d1``, the sum
  of the group's influences divided by n;
* second order (Basu et al., 2020): ``d2 = d1 + A^-1 H_S A^-1 g_S / n^2``, ``H_S``
  the summed curvature of the group: the next term of the expansion in the weight
  of the group, without the third derivatives of the loss (as Basu et al.);
* Newton: one Newton step on the objective without S,
  ``dN = (A - H_S / n)^-1 g_S / n``, the curvature of the remaining data; exact for
  quadratic objectives (Ridge), and the test loss is evaluated at ``theta + dN``.

With sample weights w the objective is ``sum_i w_i l_i + W R(theta)``, ``W = sum_i
w_i``: n becomes W, and a group's summed gradient and curvature are weighted,
``g_S = sum_{j in S} w_j grad l_j`` and ``H_S = sum_{j in S} w_j H_j``.

Everything goes through the solver contract (``solve``, ``factors``,
``parameter_factors``, ``pairwise``) and curvature products of the training data,
so every method offers these effects; the Newton system is solved by conjugate
gradients preconditioned with the fitted solver.
"""

from __future__ import annotations

import dataclasses
import warnings
from numbers import Integral

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted
from torch.func import grad, hessian, jacrev, vmap

from ._gradients import batch_slices

__all__ = ["RemovalEffects"]

CORRECTIONS = ("none", "second-order", "newton")

#: The one sentence on sign and units of removal effects.
REMOVAL_SIGN = (
    "Effects are changes of each test loss, ``loss after removal - loss now``, in the "
    "loss's own units (no division by ``n_train`` is left to do): positive means the "
    "removed points helped that test point."
)


def _doc(obj):
    obj.__doc__ = obj.__doc__.replace("{removal_sign}", REMOVAL_SIGN)
    return obj


# --------------------------------------------------------------------------- groups


def _as_index_lists(groups, n: int, name: str):
    """Groups as (list of sorted int arrays, labels), from labels per point or index lists."""
    if groups is None:
        raise ValueError(f"{name}: pass a group label per training point or a list of index arrays.")
    is_lists = isinstance(groups, (list, tuple)) and len(groups) > 0 and all(
        np.ndim(g) == 1 for g in groups
    )
    if is_lists:
        out = []
        for k, g in enumerate(groups):
            out.append(_as_indices(g, n, f"{name}[{k}]"))
        return out, np.arange(len(out))
    labels = np.asarray(groups)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{name} has shape {labels.shape}; pass one group label per training point "
            f"({n} labels, as sklearn's GroupKFold takes them) or a list of index arrays."
        )
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ValueError(f"{name} contains NaN or inf; give every training point a group label.")
    uniq, inverse = np.unique(labels, return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in range(len(uniq))], uniq


def _as_indices(idx, n: int, name: str) -> np.ndarray:
    """One set of training points: integer indices or a boolean mask of length n."""
    a = np.asarray(idx)
    if a.ndim != 1:
        raise ValueError(f"{name} has shape {a.shape}; pass a 1-d array of training indices.")
    if a.dtype == bool:
        if a.shape[0] != n:
            raise ValueError(
                f"{name} is a boolean mask of length {a.shape[0]}, but there are {n} "
                "training points; pass one flag per training point."
            )
        a = np.flatnonzero(a)
    elif a.size and not np.issubdtype(a.dtype, np.integer):
        if not (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a))):
            raise ValueError(f"{name} has {a.dtype} entries; pass integer training indices.")
        a = a.astype(np.int64)
    if a.size == 0:
        raise ValueError(f"{name} is empty; a group needs at least one training point.")
    bad = a[(a < 0) | (a >= n)]
    if bad.size:
        raise ValueError(
            f"{name} holds unknown training indices {bad[:5].tolist()}; indices run from 0 "
            f"to {n - 1} over the data given to fit."
        )
    a = np.unique(a.astype(np.int64))
    if a.size == n:
        raise ValueError(f"{name} removes every training point; nothing would be left to fit.")
    return a


# --------------------------------------------------------------------------- helpers


def _sample_losses(adapter, params, X, Y, batch_size):
    f = vmap(adapter.sample_loss, in_dims=(None, 0, 0))
    out = [f(params, X[s], Y[s]) for s in batch_slices(X.shape[0], batch_size)]
    return torch.cat(out) if out else X.new_zeros(0)


def _check_correction(correction):
    if correction not in CORRECTIONS:
        raise ValueError(
            f"correction must be one of {list(CORRECTIONS)}, got {correction!r}."
        )


class RemovalEffects:
    """Group influence and removal-effect methods shared by every scorer.

    Examples
    --------
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.removal import RemovalEffects
    >>> issubclass(DirectInfluenceScorer, RemovalEffects)
    True
    """

    # ------------------------------------------------------------------ pieces
    def _total_weight(self) -> float:
        """n_train, or the sum of the sample weights given to fit."""
        return self.operator_.weight_sum

    def _removal_mode_check(self):
        check_is_fitted(self)
        if getattr(self, "mode", "up") != "up":
            raise ValueError(
                "mode: removal effects are defined for mode='up'; refit the scorer with "
                "mode='up'."
            )

    def _group_sums(self, F, index_lists):
        """``sum_{j in group} w_j F . grad l_j`` for each group: (k, n_groups), batched
        over the training data so that no k x n_train matrix is held (w_j the sample
        weights, 1 without them)."""
        n = self.n_train_
        member = np.full(n, -1, dtype=np.int64)
        overlap = False
        for g, idx in enumerate(index_lists):
            overlap |= bool((member[idx] >= 0).any())
            member[idx] = g
        solver, X, Y = self.solver_, self.X_train_, self.y_train_
        dtype, device = F.dtype, F.device
        out = torch.zeros(F.shape[0], len(index_lists), dtype=dtype, device=device)
        if overlap:  # groups that share points: an indicator matrix per batch
            M = torch.zeros(n, len(index_lists), dtype=dtype, device=device)
            for g, idx in enumerate(index_lists):
                M[torch.as_tensor(idx, device=device), g] = 1.0
        else:
            member_t = torch.as_tensor(member, device=device)
        for s in batch_slices(n, self.batch_size):
            if overlap:
                Mb = M[s]
                keep = Mb.any(1)
            else:
                keep = member_t[s] >= 0
            if not bool(keep.any()):
                continue
            rows = torch.arange(s.start, s.stop, device=device)[keep]
            P = solver.pairwise(F, X[rows], Y[rows])  # (k, b)
            w = self.operator_.batch_weights(rows)
            if w is not None:
                P = P * w.to(P.dtype)
            if overlap:
                out += P @ Mb[keep]
            else:
                out.index_add_(1, member_t[rows], P)
        return out

    def _gradient_sums(self, index_lists):
        """Summed (weighted) loss gradients of each group, (n_groups, p)."""
        from ._gradients import per_sample_grads

        a, op = self.adapter_, self.operator_
        out = []
        for idx in index_lists:
            t = torch.as_tensor(idx, device=self.X_train_.device)
            g = torch.zeros(a.n_params, dtype=a.dtype, device=a.device)
            for s in batch_slices(len(idx), self.batch_size):
                G = per_sample_grads(a, self.X_train_[t[s]], self.y_train_[t[s]])
                w = op.batch_weights(t[s])
                g += (G if w is None else G * w[:, None].to(G.dtype)).sum(0)
            out.append(g)
        return torch.stack(out)

    def _newton_steps(self, index_lists, rtol=1e-8, maxiter=None, n_steps=1):
        """``theta_{-S} - theta`` for each group, (n_groups, p): ``n_steps`` Newton steps
        on the objective without the group, the first ``(A - H_S / n)^-1 g_S / n``
        (n the total weight, with sample weights).

        Each step's system (the remaining data's curvature at the current point) is
        solved by conjugate gradients preconditioned by the fitted solver. The
        gradient of the remaining objective at ``theta + d`` is taken as
        ``-g_S / n`` plus its change since ``theta`` (so a model fitted to a loose
        tolerance is treated as the minimiser, as in the first step).
        """
        import copy

        from ._gradients import per_sample_grads

        a, n = self.adapter_, self.n_train_
        op = self.operator_
        total = self._total_weight()
        B = self._gradient_sums(index_lists) / total
        maxiter = maxiter or max(50, min(a.n_params, 500))
        theta = a.flat_params()
        X, Y = self.X_train_, self.y_train_

        def grad_sum(adapter, Xs, Ys, ws):
            g = torch.zeros(a.n_params, dtype=a.dtype, device=a.device)
            for s in batch_slices(Xs.shape[0], self.batch_size):
                G = per_sample_grads(adapter, Xs[s], Ys[s])
                g += (G if ws is None else G * ws[s, None].to(G.dtype)).sum(0)
            return g

        def damping(V):  # penalty and regularization: the same at every point
            out = op.regularization * V
            return out + a.penalty.mv(V) if not a.penalty.is_zero else out

        steps, worst, diverged = [], 0.0, False
        for g, idx in enumerate(index_lists):
            keep = torch.as_tensor(np.setdiff1d(np.arange(n), idx), device=X.device)
            Xk, Yk, wk = X[keep], Y[keep], op.batch_weights(keep)
            d = torch.zeros_like(theta)
            rest_grad0 = None
            last = float(B[g].norm())
            for step in range(n_steps):
                if step == 0:
                    at, rhs = a, B[g : g + 1]
                else:
                    at = copy.copy(a)
                    at.params = a.unflatten(theta + d)
                    if rest_grad0 is None:
                        rest_grad0 = grad_sum(a, Xk, Yk, wk)
                    resid = (grad_sum(at, Xk, Yk, wk) - rest_grad0) / total + damping(d[None])[0] - B[g]
                    rhs = -resid[None]
                    last = float(resid.norm())
                rest = dataclasses.replace(op, adapter=at, X=Xk, Y=Yk, weights=wk)

                def mv(V, rest=rest):
                    # the remaining data's summed curvature on the scale of the whole
                    return rest.data_sum_mv(V) / total + damping(V)

                # every step to the accuracy asked of the whole, ||B_g|| rtol
                x, _, res = self._pcg(mv, rhs, rtol, maxiter, g, float(B[g].norm()))
                d = d + x[0]
                worst = max(worst, res)
            # one step may overshoot and the next recover; no progress at all since
            # the start (above the accuracy asked for) means the steps do not converge
            diverged |= n_steps > 1 and last > max(float(B[g].norm()), 10 * rtol)
            steps.append(d)
        if worst > rtol:
            warnings.warn(
                f"The Newton step did not reach rtol={rtol:g} in {maxiter} iterations "
                f"(relative residual {worst:.2g}); the effects are less accurate.",
                ConvergenceWarning, stacklevel=3,
            )
        if diverged:
            warnings.warn(
                f"newton_steps={n_steps}: after {n_steps - 1} Newton steps the gradient of "
                "the objective without the group is no smaller than at the start (a "
                "non-convex model, or a curvature that is not the objective's); the "
                "steps do not converge, use newton_steps=1.",
                ConvergenceWarning, stacklevel=3,
            )
        return torch.stack(steps)

    def _pcg(self, mv, b, rtol, maxiter, g, scale):
        """Conjugate gradients on ``mv`` for one right-hand side b (1, p), started at
        the solver's own solution and preconditioned by it, until the residual is
        below ``rtol * scale``."""
        from .solvers import SolveReport

        solver = self.solver_
        x = solver.solve(b, SolveReport()).to(b.dtype)
        r = b - mv(x)
        bnorm = scale or 1.0
        res = float(r.norm()) / bnorm
        if res <= rtol:
            return x, 0, res
        z = solver.solve(r, SolveReport()).to(b.dtype)
        p = z.clone()
        rz = float((r * z).sum())
        it = 0
        while it < maxiter:
            Ap = mv(p)
            pAp = float((p * Ap).sum())
            if pAp <= 0:
                raise ValueError(
                    "regularization: the curvature of the remaining training data is not "
                    f"positive definite (removing group {g}); raise regularization for a "
                    "Newton step."
                )
            alpha = rz / pAp
            x = x + alpha * p
            r = r - alpha * Ap
            res = float(r.norm()) / bnorm
            it += 1
            if res <= rtol:
                break
            z = solver.solve(r, SolveReport()).to(b.dtype)
            rz_new = float((r * z).sum())
            p = z + (rz_new / rz) * p
            rz = rz_new
        return x, it, res

    def _group_curvature_products(self, V, index_lists):
        """``H_S v_g`` (summed, weighted, over the group's points) for each group's row
        of V."""
        op = self.operator_
        rows = []
        for g, idx in enumerate(index_lists):
            rows.append(op.subset(idx).data_sum_mv(V[g : g + 1])[0])
        return torch.stack(rows)

    def _effects(self, X_test, y_test, index_lists, correction, rtol=1e-8, maxiter=None,
                 newton_steps=1):
        """Predicted change of each test loss for each group: (n_test, n_groups) tensor."""
        from .solvers import SolveReport

        _check_correction(correction)
        a, n = self.adapter_, self._total_weight()
        Xte, Yte = self._data(X_test, y_test, "X_test", "y_test", predicted_ok=True)
        with a.eval_mode():
            if correction == "newton":
                D = self._newton_steps(index_lists, rtol=rtol, maxiter=maxiter, n_steps=newton_steps)
                theta = a.flat_params()
                base = _sample_losses(a, a.params, Xte, Yte, self.batch_size)
                cols = []
                for d in D:
                    shifted = a.unflatten(theta + d.to(theta.dtype))
                    cols.append(_sample_losses(a, shifted, Xte, Yte, self.batch_size) - base)
                if not cols:
                    return Xte.new_zeros(Xte.shape[0], 0)
                return torch.stack(cols, 1)
            report = SolveReport(progress=getattr(self, "progress", False))
            F = self._factors(Xte, Yte, report)
            out = self._group_sums(F, index_lists) / n
            if correction == "second-order":
                V = self.solver_.solve(self._gradient_sums(index_lists), SolveReport())
                W = self._group_curvature_products(V, index_lists)  # H_S A^-1 g_S
                out = out + self.solver_.parameter_factors(F) @ W.T / n**2
            self._publish(report)
            return out

    # ------------------------------------------------------------------ public
    @_doc
    def group_influence(self, X_test, y_test=None, *, groups):
        """Summed influence of each group of training points on each test point.

        ``G[i, g] = sum_{j in group g} I[i, j]`` (first order, Koh et al. 2019), with
        ``I`` the influence matrix of :meth:`influences`; positive means the group
        helps test point i, and removing group g changes the loss at test point i by
        about ``G[i, g] / n_train``. With sample weights w the sum is weighted,
        ``G[i, g] = sum_{j in group g} w_j I[i, j]``, and the change is about
        ``G[i, g] / sum(w)``. The n_test x n_train matrix is never formed: the
        test factors meet the training gradients one batch at a time. For sizes that
        are right beyond the first order, see :meth:`predict_removal_effect`.

        Parameters
        ----------
        X_test : array-like of shape (n_test, n_features)
            Points whose loss is influenced.
        y_test : array-like of shape (n_test,), default=None
            Their targets; None uses the model's predicted class (classifiers only).
        groups : array-like of shape (n_train,) or list of array-like
            A group label per training point (as sklearn's ``GroupKFold`` takes
            them; columns in the order of ``np.unique(groups)``), or a list of
            arrays of training indices (columns in the list's order; groups may
            overlap).

        Returns
        -------
        G : ndarray of shape (n_test, n_groups)

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.datasets import load_breast_cancer
        >>> from sklearn.linear_model import LogisticRegression
        >>> from sklearn.preprocessing import StandardScaler
        >>> from skinfluence import DirectInfluenceScorer
        >>> X, y = load_breast_cancer(return_X_y=True)
        >>> X = StandardScaler().fit_transform(X)[:200]
        >>> y = y[:200]
        >>> model = LogisticRegression().fit(X[:150], y[:150])
        >>> scorer = DirectInfluenceScorer(model, regularization=0.0).fit(X[:150], y[:150])
        >>> source = np.arange(150) % 3  # three data sources
        >>> G = scorer.group_influence(X[150:], y[150:], groups=source)
        >>> G.shape
        (50, 3)
        >>> I = scorer.influences(X[150:], y[150:])
        >>> bool(np.allclose(G[:, 1], I[:, source == 1].sum(1)))
        True
        """
        self._removal_mode_check()
        index_lists, _ = _as_index_lists(groups, self.n_train_, "groups")
        from .solvers import SolveReport

        Xte, Yte = self._data(X_test, y_test, "X_test", "y_test", predicted_ok=True)
        report = SolveReport(progress=getattr(self, "progress", False))
        with self.adapter_.eval_mode():
            F = self._factors(Xte, Yte, report)
            G = self._group_sums(F, index_lists)
        self._publish(report)
        return self._numpy(G)

    @_doc
    def predict_removal_effect(
        self, X_test, y_test=None, *, remove=None, groups=None, correction="none",
        newton_steps=1, rtol=1e-8, maxiter=None,
    ):
        """Predicted change of each test loss when training points are removed and the
        model refitted.

        {removal_sign}

        The corrections (objective ``sum_i l_i + n R(theta)``, ``R`` the estimator's
        own penalty plus ``regularization / 2 ||theta||^2``, both unchanged by the
        removal; ``A`` the solver's curvature of the mean loss, ``g_S`` and ``H_S`` the
        group's summed loss gradients and curvature; with sample weights, ``n`` is
        their sum and ``g_S``, ``H_S`` are weighted by them):

        * ``"none"``: first order, ``grad l_test . A^-1 g_S / n``, the group's
          influences summed and divided by n. Cost: one pass over the training data
          (as :meth:`group_influence`).
        * ``"second-order"``: Basu et al. (2020), adding
          ``grad l_test . A^-1 H_S A^-1 g_S / n^2`` (third derivatives of the loss
          left out, as they do); still linear in the test gradient. Cost over the
          first order: two solves and curvature products over the group's points,
          per group.
        * ``"newton"``: one Newton step on the objective without the group,
          ``d = (A - H_S / n)^-1 g_S / n``, solved by conjugate gradients on the
          remaining data's curvature preconditioned by the fitted solver, and the
          test loss evaluated at ``theta + d`` (not linearised). Cost: per group, a
          few iterations, each a curvature product over the remaining points and
          one solve. Exact for a
          quadratic objective (Ridge, linear regression). ``newton_steps > 1``
          iterates, each further step with the gradient and curvature of the
          remaining data at the current point: retraining by Newton's method, for
          groups too large or too coherent for one step.

        Parameters
        ----------
        X_test : array-like of shape (n_test, n_features)
            Points whose loss changes.
        y_test : array-like of shape (n_test,), default=None
            Their targets; None uses the model's predicted class (classifiers only).
        remove : array-like of int or bool, default=None
            One set of training points to remove: indices into the data given to
            ``fit``, or a boolean mask over it.
        groups : array-like of shape (n_train,) or list of array-like, default=None
            Several sets instead, each removed on its own: a group label per training
            point (columns in the order of ``np.unique(groups)``) or a list of index
            arrays. Pass either ``remove`` or ``groups``.
        correction : {"none", "second-order", "newton"}, default="none"
            How the change is computed (above).
        newton_steps : int, default=1
            Newton steps taken for ``correction="newton"``. More than one is meant
            for convex models; steps that make no progress on the gradient of the
            objective without the group are warned about.
        rtol : float, default=1e-8
            Relative residual at which the Newton system's iteration stops.
        maxiter : int, default=None
            Most iterations of the Newton system per group; None allows
            ``max(50, min(n_params, 500))``.

        Returns
        -------
        delta : ndarray of shape (n_test,) or (n_test, n_groups)
            (n_test,) for ``remove``, one column per group for ``groups``.

        Warns
        -----
        ConvergenceWarning
            When the Newton system does not reach ``rtol``, or iterated Newton
            steps move away from the minimiser.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.datasets import load_diabetes
        >>> from sklearn.linear_model import Ridge
        >>> from skinfluence import DirectInfluenceScorer
        >>> X, y = load_diabetes(return_X_y=True)
        >>> X, y = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
        >>> model = Ridge(alpha=1.0).fit(X[:300], y[:300])
        >>> scorer = DirectInfluenceScorer(model, regularization=0.0).fit(X[:300], y[:300])
        >>> drop = np.arange(60)  # the first data source
        >>> delta = scorer.predict_removal_effect(X[300:], y[300:], remove=drop, correction="newton")
        >>> keep = np.setdiff1d(np.arange(300), drop)
        >>> refit = Ridge(alpha=1.0).fit(X[keep], y[keep])
        >>> actual = (refit.predict(X[300:]) - y[300:]) ** 2 - (model.predict(X[300:]) - y[300:]) ** 2
        >>> bool(np.allclose(delta, actual))  # exact for a quadratic objective
        True
        """
        self._removal_mode_check()
        if (remove is None) == (groups is None):
            raise ValueError(
                "remove, groups: pass one set of training indices as remove= or several "
                "groups as groups=, not both and not neither."
            )
        if not isinstance(rtol, (int, float)) or rtol <= 0:
            raise ValueError(f"rtol must be a positive float, got {rtol!r}.")
        if maxiter is not None and (not isinstance(maxiter, Integral) or maxiter < 1):
            raise ValueError(f"maxiter must be a positive int or None, got {maxiter!r}.")
        if not isinstance(newton_steps, Integral) or newton_steps < 1:
            raise ValueError(f"newton_steps must be a positive int, got {newton_steps!r}.")
        if remove is not None:
            index_lists = [_as_indices(remove, self.n_train_, "remove")]
        else:
            index_lists, _ = _as_index_lists(groups, self.n_train_, "groups")
        out = self._numpy(
            self._effects(X_test, y_test, index_lists, correction, rtol, maxiter, newton_steps)
        )
        return out[:, 0] if remove is not None else out

    # ------------------------------------------------------------------ leave one out
    def _loo_newton_parts(self):
        """Per training point j: its output o_j, the output shift of the refit without
        it (first order and Newton), for the whole training set."""
        a, solver, n = self.adapter_, self.solver_, self.n_train_
        op, total = self.operator_, self._total_weight()
        X, Y = self.X_train_, self.y_train_
        outputs = vmap(a.sample_output, in_dims=(None, 0))
        jacobians = vmap(jacrev(a.sample_output), in_dims=(None, 0))

        def out_loss(o, y):
            return a.output_loss(o, y.unsqueeze(0))

        res_o, res_first, res_newton = [], [], []
        for s in batch_slices(n, self.batch_size):
            Xb, Yb = X[s], Y[s]
            b = Xb.shape[0]
            o = outputs(a.params, Xb)  # (b, 1, k)
            k = o[0].numel()
            J = jacobians(a.params, Xb)
            J = torch.cat([J[name].reshape(b, k, -1) for name in a.param_names], 2)  # (b,k,p)
            r = vmap(grad(out_loss))(o, Yb).reshape(b, k)
            S = vmap(hessian(out_loss))(o, Yb).reshape(b, k, k)
            AJ = solver.solve(J.reshape(b * k, -1)).reshape(b, k, -1)
            Q = torch.einsum("bkp,blp->bkl", J, AJ.to(J.dtype)) / total  # J A^-1 J^T / n
            w = op.batch_weights(s)
            if w is not None:  # removing point j removes weight w_j
                Q = Q * w.to(Q.dtype)[:, None, None]
            Q = 0.5 * (Q + Q.transpose(1, 2))
            first = torch.einsum("bkl,bl->bk", Q, r)
            eye = torch.eye(k, dtype=Q.dtype, device=Q.device)
            # J (nA - J^T S J)^-1 J^T = Q (I - S Q)^-1, so the shift is Q (I - S Q)^-1 r
            z = torch.linalg.solve(eye - S @ Q, r.unsqueeze(-1))[..., 0]
            newton = torch.einsum("bkl,bl->bk", Q, z)
            res_o.append(o.reshape(b, k))
            res_first.append(first)
            res_newton.append(newton)
        return torch.cat(res_o), torch.cat(res_first), torch.cat(res_newton)

    def _loo_shifted_outputs(self, correction):
        if correction not in ("none", "newton"):
            raise ValueError(f"correction must be 'none' or 'newton', got {correction!r}.")
        with self.adapter_.eval_mode():
            o, first, newton = self._loo_newton_parts()
        return o, (first if correction == "none" else newton)

    @_doc
    def self_removal_effect(self, correction="newton"):
        """Change of each training point's own loss when it alone is removed (leave
        one out), without forming any pairwise matrix.

        {removal_sign} Large values mark points the rest of the data does not
        support, often mislabelled ones.

        * ``"none"``: first order, ``self_influence() / n_train`` (``w_j
          self_influence() / sum(w)`` with sample weights).
        * ``"newton"``: a Newton step with the curvature of the remaining data, for
          which point j's own curvature is taken as ``J_j^T S_j J_j`` (``J_j`` the
          Jacobian of its outputs, ``S_j`` the curvature of the loss in them: exact
          for linear models, the Gauss-Newton part otherwise); by the
          Sherman-Morrison-Woodbury identity the shift of its outputs is
          ``Q (I - S_j Q)^-1 r_j`` with ``Q = J_j A^-1 J_j^T / n`` and ``r_j`` the
          loss gradient in the outputs, and the loss is evaluated at the shifted
          outputs. Cost: one solve per output per training point.

        Parameters
        ----------
        correction : {"none", "newton"}, default="newton"

        Returns
        -------
        delta : ndarray of shape (n_train,)

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.datasets import load_breast_cancer
        >>> from sklearn.linear_model import LogisticRegression
        >>> from sklearn.preprocessing import StandardScaler
        >>> from skinfluence import DirectInfluenceScorer
        >>> X, y = load_breast_cancer(return_X_y=True)
        >>> X, y = StandardScaler().fit_transform(X)[:150], y[:150]
        >>> scorer = DirectInfluenceScorer(LogisticRegression().fit(X, y), regularization=0.0).fit(X, y)
        >>> first = scorer.self_removal_effect(correction="none")
        >>> bool(np.allclose(first, scorer.self_influence() / 150, rtol=1e-3, atol=1e-6))
        True
        >>> bool((scorer.self_removal_effect() >= first - 1e-9).all())  # Newton: larger
        True
        """
        self._removal_mode_check()
        a = self.adapter_
        if correction == "none":
            w = self.sample_weight_
            return self.self_influence() * (1.0 if w is None else w) / self._total_weight()
        o, shift = self._loo_shifted_outputs(correction)
        f = vmap(self._output_loss_fn())
        with a.eval_mode():
            return self._numpy(f(o + shift, self.y_train_) - f(o, self.y_train_))

    def _output_loss_fn(self):
        """The loss of one flattened output against its target."""
        a = self.adapter_
        shape = a.sample_output(a.params, self.X_train_[0]).shape

        def f(o, y):
            return a.output_loss(o.reshape(shape), y.unsqueeze(0))

        return f

    def leave_one_out_probabilities(self, correction="newton", classes=None):
        """Class probabilities at each training point of the model refitted without it.

        The Newton-corrected counterpart of
        ``class_probabilities(leave_one_out=True)`` (which is the first order): the
        outputs at ``x_j`` shifted as in :meth:`self_removal_effect`, pushed through
        the loss to probabilities, ``exp(-loss(output, c))`` normalised.

        Parameters
        ----------
        correction : {"none", "newton"}, default="newton"
            First order, or the Newton step with the remaining data's curvature.
        classes : array-like, default=None
            The classes, in the order of the columns; None uses ``classes_``.

        Returns
        -------
        P : ndarray of shape (n_train, n_classes)

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.datasets import load_breast_cancer
        >>> from sklearn.linear_model import LogisticRegression
        >>> from sklearn.preprocessing import StandardScaler
        >>> from skinfluence import DirectInfluenceScorer
        >>> X, y = load_breast_cancer(return_X_y=True)
        >>> X, y = StandardScaler().fit_transform(X)[:150], y[:150]
        >>> scorer = DirectInfluenceScorer(LogisticRegression().fit(X, y), regularization=0.0).fit(X, y)
        >>> P = scorer.leave_one_out_probabilities()
        >>> P.shape, bool(np.allclose(P.sum(1), 1))
        ((150, 2), True)
        """
        from ._adapters import BINARY, CLASS_INDEX
        from .scorers import _class_proba

        self._removal_mode_check()
        a = self.adapter_
        if a.target_kind not in (CLASS_INDEX, BINARY):
            raise ValueError(
                "estimator: class probabilities need a classifier; this model is a regressor."
            )
        classes = self.classes_ if classes is None else np.asarray(classes)
        o, shift = self._loo_shifted_outputs(correction)
        probe = a.sample_output(a.params, self.X_train_[0])
        with a.eval_mode():
            outs = (o + shift).reshape(o.shape[0], *probe.shape)
            return _class_proba(a, outs, classes)
