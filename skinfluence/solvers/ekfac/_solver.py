"""EK-FAC: Kronecker-factored curvature for ``nn.Linear`` and ``nn.Conv2d`` layers.

The curvature is block diagonal over layers. Each layer's block of the Fisher (the
Gauss-Newton matrix) is approximated by ``S (x) A`` (K-FAC; KFC for convolutions),
with the factors' eigenbasis refined towards the nearest Kronecker product of the
block and the eigenvalues refitted from per-sample gradients (EK-FAC, George et al.
2018); see ``_factors`` for the passes, ``_fisher`` for the output gradients
they are built from, ``_layers`` for the layer types.

The regularization is added to the eigenvalues (as pyDVL does), and so is the
diagonal, in the same basis, of the estimator's own L2 penalty.

Factors live in each layer's Kronecker eigenbasis, where the inverse is diagonal:
test gradients are projected there and scaled once; training activations and output
gradients are projected (``a Q_A``, ``g Q_S``) and contracted with them, so a layer
applied once per sample never forms a per-sample training gradient. In the flat
factor vector each layer's block is stored as (d_out, d_in), or transposed when it
has more outputs than inputs, so that each contraction runs over the longer
dimension first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from sklearn.utils import check_random_state

from ..._linalg import not_positive_definite
from .._base import CurvatureOperator, Solver
from . import _docs
from . import _factors
from ._factors import (
    Passes,
    corrected_eigenvalues,
    kfac_factors,
    layer_data,
    nearest_kronecker,
)
from ._fisher import require_sampler, sampler_for
from ._layers import build_layers, held_fixed, select_layers

#: Refinement passes of basis_iter="auto" when the layer data fits the cache.
AUTO_BASIS_ITER = 2

__all__ = ["EkfacSolver", "kronecker_preconditioner"]

# Elements of the (test rows x layer outputs x train batch) intermediate of one
# pairwise contraction; bounds its memory (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24


def _flushing_subnormals(method):
    """Run ``method`` with subnormal floats flushed to zero (where the CPU supports it).

    The output gradients of confidently fitted samples, and the Gauss-Newton columns
    ``sqrt(p_k) (e_k - p)`` of unlikely classes, are tiny; in float32 their products
    underflow to subnormal numbers, on which x86 CPUs compute many times slower (the
    influences of the small CNN in ``benchmarks/results/ekfac_cnn.md`` took 5.7x as
    long). Flushing changes each such product by less than the smallest normal
    number (1.2e-38 in float32). The mode is left off afterwards.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        supported = torch.set_flush_denormal(True)
        try:
            return method(*args, **kwargs)
        finally:
            if supported:
                torch.set_flush_denormal(False)

    return wrapper


def _kronecker_dtype(name, working: torch.dtype) -> torch.dtype:
    """``kronecker_dtype`` as a torch dtype; None is the working ``dtype``."""
    if name is None:
        return working
    if name not in _docs.KRONECKER_DTYPES:
        raise ValueError(
            f"kronecker_dtype: expected None or one of {sorted(_docs.KRONECKER_DTYPES)}, "
            f"got {name!r}."
        )
    return _docs.KRONECKER_DTYPES[name]


@dataclass(frozen=True)
class _Block:
    """Where a layer's factors sit in the flat factor vector, and in which layout."""

    start: int
    rows: int
    cols: int
    transposed: bool  # stored as (d_in, d_out)


class EkfacSolver(Solver):
    """Block-diagonal EK-FAC (or K-FAC) curvature over Linear and Conv2d layers.

    Memory: per layer, the two factors' eigenvectors and the ``d_out x d_in``
    eigenvalues, i.e. far less than the number of parameters squared.

    Examples
    --------
    On a single Linear layer with a squared error the Gauss-Newton K-FAC is exact:

    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> from skinfluence.solvers import CurvatureOperator, EkfacSolver
    >>> model = torch.nn.Linear(3, 2).double()
    >>> a = build_adapter(model, loss=torch.nn.functional.mse_loss)
    >>> X, Y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    >>> a.bind(X, 20)
    >>> op = CurvatureOperator(a, X, Y, "gauss-newton", regularization=0.1, batch_size=8)
    >>> solver = EkfacSolver().fit(op)
    >>> G = torch.randn(4, op.n_params, dtype=torch.float64)
    >>> torch.allclose(op.mv(solver.solve(G)), G)
    True
    """

    curvature = "gauss-newton"
    parameters = _docs.PARAMETERS
    scorer_name = _docs.SCORER_NAME
    summary = _docs.SUMMARY
    description = _docs.DESCRIPTION
    curvature_note = _docs.CURVATURE_NOTE
    notes = _docs.NOTES
    memory = _docs.MEMORY
    attributes = _docs.ATTRIBUTES
    examples = _docs.EXAMPLES

    # ------------------------------------------------------------ parameters
    def select_parameters(self, module, param_names):
        # the BatchNorm parameters among those selected are recorded: they are held
        # fixed on purpose (see the scorer's Notes), not lost
        self.fixed_params_ = held_fixed(module, param_names)
        return select_layers(module, param_names, self.layers)[1]

    # ------------------------------------------------------------ fit
    def _resolve_auto(self, a, X, Y, n, limit: int) -> tuple[str, int]:
        """``fisher`` and ``basis_iter`` with "auto" resolved from the size of the
        layer data one pass produces (measured on a few samples): the exact
        Gauss-Newton factors and the refinement passes while that data fits the
        cache kept between passes (``limit`` numbers), the sampled Fisher and the
        K-FAC eigenbasis beyond, where each would cost full passes over the data."""
        fisher, basis_iter = self.fisher, self.basis_iter
        if fisher != "auto" and basis_iter != "auto":
            return fisher, int(basis_iter)
        probe = min(n, 4)
        gn = layer_data(a, self.layers_, X[:probe], Y[:probe], "gauss-newton", self.family_)
        acts = sum(act.numel() for act, _ in gn.values()) / probe
        grads = sum(g.numel() for _, g in gn.values()) / probe  # every output column
        columns = max(next(iter(gn.values()))[1].shape[0], 1)
        if fisher == "auto":
            fits = n * (acts + grads) <= limit
            fisher = "gauss-newton" if fits or sampler_for(a) is None else "true"
        if basis_iter == "auto":
            per_sample = acts + (grads if fisher == "gauss-newton" else grads / columns)
            basis_iter = AUTO_BASIS_ITER if n * per_sample <= limit else 0
        return fisher, int(basis_iter)

    @_flushing_subnormals
    def _fit(self, operator: CurvatureOperator, progress=None) -> EkfacSolver:
        a = operator.adapter
        X, Y, n = operator.X, operator.Y, operator.n_train
        if n == 0:
            raise ValueError("X: EK-FAC needs at least one training sample.")
        names, params = select_layers(a.module, a.param_names, self.layers)
        if params != list(a.param_names):
            left = [p for p in a.param_names if p not in params]
            raise ValueError(
                f"layers: the parameters {left} are selected but belong to no layer EK-FAC "
                "works on; select them out with params= or add their layers."
            )
        if not hasattr(self, "fixed_params_"):  # fitted directly, not through a scorer
            self.fixed_params_ = []
        self.layers_ = build_layers(a, names)
        self.layer_names_ = list(names)
        self.batch_size_ = operator.batch_size
        self.family_ = sampler_for(a)
        kdt = self.kronecker_dtype_ = _kronecker_dtype(self.kronecker_dtype, a.dtype)
        self.fisher_, self.basis_iter_ = self._resolve_auto(a, X, Y, n, _factors.cache_limit(kdt))
        self.sampler_, noise = None, None
        if self.fisher_ == "true":
            self.sampler_ = require_sampler(a)
            rng = check_random_state(self.random_state)
            with torch.no_grad():
                out_shape = tuple(a.outputs(X[:1]).shape[1:])
            noise = self.sampler_.noise(rng, n, out_shape)
        passes = Passes(self, X, Y, self.fisher_, noise, progress, operator.weights, kdt)
        self.factors_ = kfac_factors(passes, self.layers_, self.update_diagonal, a.device)
        kron = self.factors_
        if self.update_diagonal and self.basis_iter_:
            kron = nearest_kronecker(kron, passes, self.basis_iter_, kdt)
        self.eigenvalues_, self.basis_, self.basis64_, self.kronecker_basis_ = {}, {}, {}, {}
        for lay in self.layers_:
            Af, Sf = kron[lay.name]
            la, qa = torch.linalg.eigh(0.5 * (Af + Af.T))
            ls, qs = torch.linalg.eigh(0.5 * (Sf + Sf.T))
            self.eigenvalues_[lay.name] = torch.outer(ls.clamp_min(0), la.clamp_min(0))
            self.basis64_[lay.name] = (qs, qa)
            self.basis_[lay.name] = (qs.to(a.dtype), qa.to(a.dtype))
            self.kronecker_basis_[lay.name] = (qs.to(kdt), qa.to(kdt))
        if self.update_diagonal:
            self.eigenvalues_ = corrected_eigenvalues(passes, self.kronecker_basis_, self.eigenvalues_)
        passes.cache = None
        self.penalty_ = self._penalty_diagonal()
        self._set_inverse(operator.curvature)
        self._blocks = self._layout()
        return self

    def _penalty_diagonal(self) -> dict:
        """The estimator's penalty, diagonal in each layer's Kronecker eigenbasis."""
        pen = self.adapter_.penalty
        out = {}
        for lay in self.layers_:
            qs, qa = self.basis64_[lay.name]
            d = torch.zeros(lay.d_out, lay.d_in, dtype=torch.float64, device=qs.device)
            if pen.diag is not None:
                D = lay.to_matrix(pen.diag[None].to(torch.float64))[0]
                d += (qs**2).T @ D @ qa**2
            for c, u in pen.rank_one:
                U = lay.to_matrix(u[None].to(torch.float64))[0]
                d += c * (qs.T @ U @ qa) ** 2
            out[lay.name] = d
        return out

    def _set_inverse(self, curvature: str):
        self.inverse_ = {}
        lam = self.regularization_
        for lay in self.layers_:
            denom = self.eigenvalues_[lay.name] + self.penalty_[lay.name] + lam
            # With no regularization, directions of zero curvature are left out
            # (a pseudo-inverse), as the gradients have no component along them.
            cutoff = float(denom.abs().max()) * torch.finfo(torch.float64).eps * max(denom.shape)
            if float(denom.min()) < -cutoff:
                low = float(denom.min()) - lam
                raise not_positive_definite(
                    f"EK-FAC {curvature}", lam,
                    f"layer {lay.name!r} has the eigenvalue {low:.3g}", low, float(denom.max()),
                )
            inv = torch.where(denom > cutoff, 1.0 / denom, torch.zeros_like(denom))
            self.inverse_[lay.name] = inv.to(self.adapter_.dtype)

    def _layout(self) -> dict:
        blocks, o = {}, 0
        for lay in self.layers_:
            t = lay.d_in < lay.d_out
            blocks[lay.name] = _Block(o, lay.d_in if t else lay.d_out, lay.d_out if t else lay.d_in, t)
            o += lay.d_out * lay.d_in
        return blocks

    # ------------------------------------------------------------ layouts
    def to_layer(self, G: torch.Tensor, lay) -> torch.Tensor:
        """Flat vectors (k, p) -> the layer's gradient matrices (k, d_out, d_in)."""
        return lay.to_matrix(G)

    def from_layers(self, mats: dict) -> torch.Tensor:
        """Per-layer matrices (k, d_out, d_in) -> flat vectors (k, p)."""
        first = next(iter(mats.values()))
        out = torch.zeros(first.shape[0], self.adapter_.n_params, dtype=first.dtype, device=first.device)
        for lay in self.layers_:
            lay.put(out, mats[lay.name])
        return out

    def _split(self, F: torch.Tensor) -> dict:
        """Flat factors (k, p) -> per layer (k, rows, cols) views in the stored layout."""
        return {
            name: F[:, b.start : b.start + b.rows * b.cols].reshape(F.shape[0], b.rows, b.cols)
            for name, b in self._blocks.items()
        }

    # ------------------------------------------------------------ products
    def _projected(self, X, Y) -> dict:
        """Per layer: activations and output gradients of the points' own loss,
        expressed in the eigenbases of A and S: ``a Q_A`` (b, T, d_in) and ``g Q_S``
        (b, T, d_out), in ``kronecker_dtype``."""
        out = {}
        for name, (act, g) in layer_data(self.adapter_, self.layers_, X, Y).items():
            qs, qa = self.kronecker_basis_[name]
            out[name] = (act.to(qa.dtype) @ qa, g[0].to(qs.dtype) @ qs)
        return out

    @_flushing_subnormals
    def solve(self, G: torch.Tensor, report=None) -> torch.Tensor:
        mats = {}
        for lay in self.layers_:
            qs, qa = self.basis_[lay.name]
            M = lay.to_matrix(G).to(qs.dtype)
            mats[lay.name] = qs @ ((qs.T @ M @ qa) * self.inverse_[lay.name]) @ qa.T
        return self.from_layers(mats)

    def solve_root(self, G: torch.Tensor) -> torch.Tensor:
        """The square root of :meth:`solve`, ``A_kron^-1/2 G``: the symmetric
        splitting of a preconditioner, ``A_kron^-1/2 A A_kron^-1/2``, whose
        eigenvalues are those of ``A_kron^-1 A``."""
        mats = {}
        for lay in self.layers_:
            qs, qa = self.basis_[lay.name]
            M = lay.to_matrix(G).to(qs.dtype)
            mats[lay.name] = qs @ ((qs.T @ M @ qa) * self.inverse_[lay.name].sqrt()) @ qa.T
        return self.from_layers(mats)

    @_flushing_subnormals
    def factors(self, X, Y, report=None) -> torch.Tensor:
        parts = []
        for name, (aq, gq) in self._projected(X, Y).items():
            if aq.shape[1] == 1:
                P = gq[:, 0, :, None] * aq[:, 0, None, :]
            else:
                P = torch.einsum("bto,bti->boi", gq, aq)
            P = P.to(self.adapter_.dtype).mul_(self.inverse_[name])
            if self._blocks[name].transposed:
                P = P.transpose(1, 2)
            parts.append(P.reshape(P.shape[0], -1))
        return torch.cat(parts, 1)

    def parameter_factors(self, F: torch.Tensor) -> torch.Tensor:
        mats = {}
        for name, W in self._split(F).items():
            if self._blocks[name].transposed:
                W = W.transpose(1, 2)
            qs, qa = self.basis_[name]
            mats[name] = qs @ W @ qa.T
        return self.from_layers(mats)

    def pairwise(self, F, X, Y):
        return sum(self.pairwise_blocks(F, X, Y).values())

    @_flushing_subnormals
    def pairwise_blocks(self, F: torch.Tensor, X, Y) -> dict:
        """Per layer: ``F . grad l(x_j, y_j)`` for the batch (X, Y), (n_test, b).

        For a layer applied once per sample the factors are contracted with the
        projected activations and output gradients directly, so no per-sample
        gradient is formed; otherwise the batch's gradient matrices are formed
        first, which is cheaper than contracting at every position.
        """
        split = self._split(F)
        out, kdt, wdt = {}, self.kronecker_dtype_, self.adapter_.dtype
        for name, (aq, gq) in self._projected(X, Y).items():
            W, transposed = split[name], self._blocks[name].transposed
            q, b = W.shape[0], aq.shape[0]
            if aq.shape[1] == 1:
                # W (q, left, right) @ right-vectors, then weighted by left-vectors
                right, left = aq[:, 0], gq[:, 0]
                if transposed:
                    right, left = left, right
                rightT, leftT = right.T.contiguous(), left.T.contiguous()
                d_left, d_right = W.shape[1], W.shape[2]
                step = max(1, _CHUNK_ELEMENTS // max(1, d_left * b))
                rows = []
                for c in range(0, q, step):
                    tmp = (W[c : c + step].reshape(-1, d_right).to(kdt) @ rightT).reshape(-1, d_left, b)
                    rows.append(tmp.mul_(leftT).sum(1).to(wdt))
                out[name] = torch.cat(rows) if rows else W.new_zeros(0, b)
            else:
                P = torch.einsum("bto,bti->boi", gq, aq)
                if transposed:
                    P = P.transpose(1, 2)
                out[name] = (W.reshape(q, -1).to(kdt) @ P.reshape(b, -1).T).to(wdt)
        return out

    @_flushing_subnormals
    def self_scores(self, X, Y, report=None) -> torch.Tensor:
        total, wdt = 0, self.adapter_.dtype
        for name, (aq, gq) in self._projected(X, Y).items():
            inv = self.inverse_[name]
            if aq.shape[1] == 1:
                total = total + (((gq[:, 0] ** 2).to(wdt) @ inv) * (aq[:, 0] ** 2).to(wdt)).sum(-1)
            else:
                P = torch.einsum("bto,bti->boi", gq, aq).to(wdt)
                total = total + (P**2 * inv).sum((1, 2))
        return total


def kronecker_preconditioner(operator: CurvatureOperator, kind: str, progress=None) -> EkfacSolver:
    """EK-FAC (``kind="ekfac"``) or K-FAC (``"kfac"``) factors of the operator's
    layers, fitted as a preconditioner of ``A = C + P + lambda I``.

    The factors are those of the Gauss-Newton matrix for an exact or Gauss-Newton
    curvature (for an exact Hessian they approximate its Gauss-Newton part, which is
    enough for a preconditioner), and of the empirical Fisher (the given labels'
    output gradients) for that curvature. With ``lambda > 0`` the inverse is
    symmetric positive definite.

    Parameters
    ----------
    operator : CurvatureOperator
        The operator to precondition; every selected parameter must belong to an
        ``nn.Linear`` or ``nn.Conv2d`` layer.
    kind : {"ekfac", "kfac"}
        With the eigenvalues refitted in the Kronecker eigenbasis, or the products
        of the factors' eigenvalues.
    progress : callable, default=None
        Wraps the passes over the training data.

    Returns
    -------
    solver : EkfacSolver
        Fitted; its ``solve`` applies the approximate inverse.

    Raises
    ------
    ValueError
        Naming ``preconditioner`` when some selected parameter belongs to another
        kind of module, or ``regularization`` when it is 0.

    Examples
    --------
    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> from skinfluence.solvers import CurvatureOperator
    >>> from skinfluence.solvers.ekfac import kronecker_preconditioner
    >>> model = torch.nn.Linear(3, 2).double()
    >>> a = build_adapter(model, loss=torch.nn.functional.mse_loss)
    >>> X, Y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    >>> a.bind(X, 20)
    >>> op = CurvatureOperator(a, X, Y, "exact", regularization=0.1, batch_size=8)
    >>> M = kronecker_preconditioner(op, "kfac")
    >>> G = torch.randn(4, op.n_params, dtype=torch.float64)
    >>> torch.allclose(op.mv(M.solve(G)), G)  # exact for one linear layer and MSE
    True
    """
    if not float(operator.regularization) > 0:
        raise ValueError(
            f"regularization: preconditioner={kind!r} needs regularization > 0, which "
            "keeps its inverse positive definite along directions of zero curvature "
            "(got 0). Use regularization > 0, or preconditioner='nystroem' / 'jacobi'."
        )
    a = operator.adapter
    try:
        _, params = select_layers(a.module, a.param_names)
    except ValueError as exc:
        raise ValueError(
            f"preconditioner: {kind!r} is built from nn.Linear and nn.Conv2d layers: "
            f"{str(exc).partition(': ')[2]} Use preconditioner='nystroem' or 'jacobi' "
            "for other modules."
        ) from None
    if params != list(a.param_names):
        left = [p for p in a.param_names if p not in params]
        bn = held_fixed(a.module, left)
        why = (" (the affine parameters of BatchNorm layers, which the Kronecker factors "
               "do not cover)" if bn else "")
        raise ValueError(
            f"preconditioner: {kind!r} is built from nn.Linear and nn.Conv2d layers, but "
            f"the selected parameters {left} belong to none{why}; select them out with "
            "params= (they are then held fixed) or use another preconditioner: CG offers "
            "'nystroem' and 'jacobi'."
        )
    fisher = "empirical" if operator.curvature == "empirical-fisher" else "gauss-newton"
    solver = EkfacSolver(update_diagonal=kind == "ekfac", fisher=fisher, basis_iter=2)
    return solver.fit(operator, progress=progress)
