"""The solver contract: what every curvature method offers the scorers.

A solver approximates ``A = C + P + lambda I`` (C the Hessian or Gauss-Newton matrix
of the mean training loss, weighted by the operator's sample weights when it has
them; P the estimator's own penalty, lambda the regularization), given as a
:class:`CurvatureOperator`. Its operations:

* ``fit(operator)`` builds the approximation;
* ``solve(G)`` applies ``A^-1`` to a block of flat gradients ``G`` (k, p);
* ``factors(X, Y)`` gives the test factors of a block of points, ``A^-1 grad l``, in
  the solver's own coordinates (the parameters' for most methods; EK-FAC keeps each
  layer's Kronecker eigenbasis), and ``parameter_factors`` brings them back to the
  parameters' coordinates;
* ``pairwise(F, X, Y)`` contracts factors with the loss gradients of a block of
  training points, (k, b); ``pairwise_blocks`` splits that product by layer (the
  blocks sum to it);
* ``self_scores(X, Y)`` gives ``grad l^T A^-1 grad l`` of each point of a block.

Defaults for the last four come from ``solve`` and per-sample gradients; a method
overrides them where it does better. A fitted solver is never changed by these
operations: per-call diagnostics go into a :class:`SolveReport` that the caller
passes in, so a fitted solver together with blocks of points is everything a tile
of the influence matrix needs (:func:`pairwise_tile`), in this process or another.

A method declares its parameters once, as :class:`Param` entries of
``parameters``; the scorer's signature, validation and docstring, and the
solver's own attributes, all come from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from .._adapters import ModelAdapter
from .._data import Rows
from .._gradients import batch_slices, curvature_mv, gradient_products, per_sample_grads
from .._linalg import (
    AUTO_RELATIVE_DAMPING,
    NotPositiveDefiniteError,
    auto_regularization,
    spectrum_ends,
)

__all__ = [
    "Attribute",
    "CurvatureOperator",
    "NotPositiveDefiniteError",
    "Param",
    "SolveReport",
    "Solver",
    "pairwise_tile",
]


# --------------------------------------------------------------------------- operator


@dataclass
class CurvatureOperator:
    """``A = C + P + lambda I`` over the training data, applied without forming it.

    The regularization lambda enters in one place: :meth:`mv` (and the dense matrix
    of the Direct method) add it; :meth:`curvature_mv` gives ``C + P`` alone, for
    the eigen-analysis of the low-rank methods, which shift the eigenvalues by it.

    Parameters
    ----------
    adapter : ModelAdapter
        The fitted model as a function of its parameters.
    X, Y : torch.Tensor
        Training inputs and targets, as the adapter converted them.
    curvature : {"exact", "gauss-newton", "empirical-fisher"}
        C is the Hessian, the Gauss-Newton matrix or the empirical Fisher (mean of
        the per-sample gradients' outer products) of the mean training loss.
    regularization : float
        lambda.
    batch_size : int
        Training samples per product step.
    weights : torch.Tensor of shape (n_train,), default=None
        Sample weights: the mean is then the weighted mean ``sum_i w_i l_i /
        sum_i w_i`` (and C its curvature). None weighs every point 1.

    Examples
    --------
    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> from skinfluence.solvers import CurvatureOperator
    >>> model = torch.nn.Linear(3, 2).double()
    >>> a = build_adapter(model, loss=torch.nn.functional.cross_entropy)
    >>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 2
    >>> a.bind(X, 10)
    >>> op = CurvatureOperator(a, X, y, "exact", regularization=0.1, batch_size=4)
    >>> op.mv(torch.eye(op.n_params, dtype=torch.float64)).shape
    torch.Size([8, 8])
    """

    adapter: ModelAdapter
    X: torch.Tensor
    Y: torch.Tensor
    curvature: str
    regularization: float
    batch_size: int
    weights: torch.Tensor | None = None

    @property
    def n_params(self) -> int:
        return self.adapter.n_params

    @property
    def n_train(self) -> int:
        return int(self.X.shape[0])

    @property
    def weight_sum(self) -> float:
        """The total weight of the training points (their number, unweighted)."""
        return float(self.n_train) if self.weights is None else float(self.weights.sum(dtype=torch.float64))

    def batch_weights(self, s) -> torch.Tensor | None:
        """The weights of the training points ``s`` (a slice or indices), or None."""
        return None if self.weights is None else self.weights[s]

    @property
    def device(self):
        return self.adapter.device

    @property
    def dtype(self):
        """The working dtype of the products."""
        return self.adapter.dtype

    @property
    def eps(self) -> float:
        """Machine epsilon of the precision the products run in."""
        return float(torch.finfo(self.adapter.dtype).eps)

    def data_sum_mv(self, V: torch.Tensor) -> torch.Tensor:
        """``V @ sum_i w_i C_i``, the curvature of the summed (weighted) training loss."""
        out = torch.zeros_like(V)
        for s in batch_slices(self.n_train, self.batch_size):
            out += curvature_mv(self.adapter, self.X[s], self.Y[s], V, self.curvature,
                                self.batch_weights(s))
        return out

    def data_mv(self, V: torch.Tensor) -> torch.Tensor:
        """``V @ C`` for the (weighted) mean training loss (no penalty, no
        regularization); zero when the points carry no weight at all."""
        out = self.data_sum_mv(V)
        total = self.weight_sum
        return out / total if total > 0 else out

    def curvature_mv(self, V: torch.Tensor) -> torch.Tensor:
        """``V @ (C + P)`` for float64 rows ``V``, in float64.

        The products run in the adapter's working dtype; the linear algebra around
        them stays in float64 so that small dense problems lose nothing to rounding.
        """
        a = self.adapter
        W = V.to(dtype=a.dtype, device=a.device)
        out = self.data_mv(W)
        if not a.penalty.is_zero:
            out = out + a.penalty.mv(W)
        return out.to(torch.float64)

    def mv(self, V: torch.Tensor) -> torch.Tensor:
        """``V @ A``: curvature, the estimator's penalty and the regularization, in
        the working dtype."""
        out = self.data_mv(V)
        if not self.adapter.penalty.is_zero:
            out = out + self.adapter.penalty.mv(V)
        return out + self.regularization * V

    def dense(self, progress=None) -> torch.Tensor:
        """``A`` as a dense p x p matrix in the working dtype (the Direct method only)."""
        from ._dense import dense_curvature

        a = self.adapter
        A = dense_curvature(a, self.X, self.Y, self.curvature, self.batch_size, progress=progress,
                            weights=self.weights)
        if not a.penalty.is_zero:
            A += a.penalty.dense(a.n_params, a.dtype, a.device)
        A.diagonal().add_(self.regularization)
        return A

    def subset(self, idx) -> CurvatureOperator:
        """The same operator over the training points ``idx`` only (a minibatch),
        with their weights: C is then the (weighted) mean over those points."""
        t = torch.as_tensor(idx, device=self.X.device)
        if isinstance(self.X, Rows):  # rows read batch by batch: a view, nothing read
            X = self.X.take(idx)
            Y = self.Y.take(idx) if isinstance(self.Y, Rows) else self.Y[t.to(self.Y.device)]
        else:
            X, Y = self.X[t], self.Y[t]
        return CurvatureOperator(
            self.adapter, X, Y, self.curvature, self.regularization,
            self.batch_size, self.batch_weights(t),
        )


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Param:
    """One parameter of a method: name, default, constraints and documentation.

    Parameters
    ----------
    name : str
        The argument name, shared by the scorer and the solver.
    default : object
        Its default value.
    constraints : list
        sklearn parameter constraints (``_parameter_constraints`` entries).
    type : str
        The numpydoc type description.
    doc : str
        The description, one paragraph or more.

    Examples
    --------
    >>> from numbers import Integral
    >>> from sklearn.utils._param_validation import Interval
    >>> rank = Param("rank", 10, [Interval(Integral, 1, None, closed="left")], "int",
    ...              "Number of eigenpairs kept.")
    >>> print(rank.entry())
        rank : int, default=10
            Number of eigenpairs kept.
    """

    name: str
    default: object
    constraints: list
    type: str
    doc: str

    def entry(self) -> str:
        """The numpydoc entry, indented for a class docstring."""
        text = "\n".join("        " + line if line else "" for line in self.doc.strip().splitlines())
        return f"    {self.name} : {self.type}, default={_show(self.default)}\n{text}"


def _show(value) -> str:
    """A default as the docstrings write it: "up", 1e-5, None."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and value and abs(value) < 1e-3:
        return f"{value:.0e}".replace("e-0", "e-")
    return repr(value)


@dataclass(frozen=True)
class Attribute:
    """A fitted attribute a scorer exposes from its solver.

    ``when="fit"`` reads the solver's attribute of that name (or ``source``);
    ``when="solve"`` the diagnostics of the most recent call that solved a system (a
    :class:`SolveReport` field, named without the trailing underscore).

    Examples
    --------
    >>> Attribute("eigenvalues_", "ndarray of shape (rank,)", "Kept eigenvalues.").when
    'fit'
    """

    name: str
    type: str
    doc: str
    when: str = "fit"
    source: str | None = None

    def entry(self) -> str:
        text = "\n".join("        " + line for line in self.doc.strip().splitlines())
        return f"    {self.name} : {self.type}\n{text}"


def random_state_param(seeds: str) -> Param:
    """The ``random_state`` entry of a randomized method, saying what it seeds.

    Examples
    --------
    >>> random_state_param("the start block").doc
    'Seeds the start block. An int gives identical results on every fit.'
    """
    return Param(
        "random_state", None, ["random_state"], "int, RandomState instance or None",
        f"Seeds {seeds}. An int gives identical results on every fit.",
    )


@dataclass
class SolveReport:
    """Diagnostics of the solves of one call, over all its blocks of right-hand sides.

    Kept apart from the fitted solver, which solving never changes.

    ``progress`` asks for one progress bar for the whole call, shared by the solves
    of all its blocks (:meth:`progress_bar`, :meth:`step`): it counts iterations
    (there is no total, since the number an iteration needs is not known in
    advance) and shows the block being solved, how many of its right-hand sides are
    left and the largest residual against the tolerance. ``True`` shows it where
    stderr is a terminal and stays quiet elsewhere (logs, CI); ``"always"`` shows it
    everywhere. The solver that opened it closes it (:meth:`close`) in its
    ``convergence_warning``, which a scorer asks once at the end of every call, or
    when a solve fails.

    Examples
    --------
    >>> import numpy as np
    >>> r = SolveReport()
    >>> r.add(3, np.array([1e-6, 1e-7]), np.array([True, True]))
    >>> r.add(5, np.array([1e-3]), np.array([False]))
    >>> r.n_iter, r.residuals.tolist(), bool(r.converged.all())
    (5, [1e-06, 1e-07, 0.001], False)
    """

    progress: bool | str = False
    n_iter: int = 0
    n_products: int = 0
    #: Block name -> the diagnostics of that block of the curvature alone, for a
    #: block-diagonal curvature (:class:`~skinfluence.solvers.BlockDiagonalSolver`);
    #: empty otherwise.
    parts: dict = field(default_factory=dict)
    _residuals: list = field(default_factory=list)
    _converged: list = field(default_factory=list)
    _bar: object = field(default=None, repr=False, compare=False)
    _blocks: int = field(default=0, repr=False, compare=False)
    _parent: SolveReport | None = field(default=None, repr=False, compare=False)

    def part(self, name: str) -> SolveReport:
        """The report of block ``name`` of a block-diagonal curvature (made on first
        use): its own figures, and this report's progress bar.

        Examples
        --------
        >>> import numpy as np
        >>> r = SolveReport()
        >>> r.part("fc1").add(4, np.array([1e-6]), np.array([True]))
        >>> list(r.parts), r.parts["fc1"].n_iter
        (['fc1'], 4)
        """
        if name not in self.parts:
            self.parts[name] = SolveReport(progress=self.progress, _parent=self)
        return self.parts[name]

    def progress_bar(self, desc: str):
        """Start the solve of a new block on the call's bar (opened by the first
        block); None when ``progress`` is off."""
        if self._parent is not None:
            return self._parent.progress_bar(desc)
        if not self.progress:
            return None
        if self._bar is None:
            from tqdm.auto import tqdm

            # disable=None: tqdm stays quiet when stderr is not a terminal
            disable = False if self.progress == "always" else None
            self._bar = tqdm(desc=desc, unit="it", leave=False, disable=disable)
        self._blocks += 1
        return self._bar

    def step(self, largest: float, tolerance: float, left: int, of: int, what: str = "residual") -> None:
        """One iteration of the current block: its largest ``what`` (a relative
        residual or update) against ``tolerance``, with ``left`` of ``of``
        right-hand sides still iterating."""
        if self._parent is not None:
            return self._parent.step(largest, tolerance, left, of, what)
        bar = self._bar
        if bar is None:
            return
        bar.set_postfix_str(
            f"block {self._blocks}: {left}/{of} left, largest {what} {largest:.1e} "
            f"{'>' if left else '<='} {tolerance:.0e}",
            refresh=False,
        )
        bar.update(1)

    def close(self) -> None:
        """Close the bar; the report keeps its figures."""
        if self._parent is not None:
            self._parent.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_bar"] = None
        return state

    def add(self, n_iter: int, residuals: np.ndarray, converged: np.ndarray, n_products: int = 0):
        self.n_iter = max(self.n_iter, int(n_iter))
        self.n_products += int(n_products)
        self._residuals.append(np.asarray(residuals))
        self._converged.append(np.asarray(converged, dtype=bool))

    @property
    def residuals(self) -> np.ndarray:
        return np.concatenate(self._residuals) if self._residuals else np.zeros(0)

    @property
    def converged(self) -> np.ndarray:
        return np.concatenate(self._converged) if self._converged else np.zeros(0, bool)

    @property
    def empty(self) -> bool:
        return not self._residuals


# --------------------------------------------------------------------------- solver


class Solver:
    """Base of the curvature solvers (see the module docstring).

    Subclasses declare ``parameters`` (scorer parameters by name, :class:`Param` for
    their own), implement ``_fit(operator, progress)`` and ``solve(G, report)``, and
    may override the other operations. Class attributes also describe the scorer
    built on the method: ``scorer_name``, ``summary``, ``description``,
    ``attributes`` and ``examples`` (see :mod:`skinfluence.scorers`).

    Examples
    --------
    A solver that ignores the curvature (the identity), to show the interface:

    >>> import torch
    >>> from skinfluence.solvers import Solver
    >>> class Identity(Solver):
    ...     def _fit(self, operator, progress=None):
    ...         return self
    ...     def solve(self, G, report=None):
    ...         return G
    >>> Identity().solve(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """

    #: Scorer parameters in signature order: names of shared ones, Param for own ones.
    parameters: tuple = ()
    #: The curvature the method approximates; None follows the scorer's ``hessian``.
    curvature: str | None = None
    #: Settings under which the method is as accurate as it gets (tight tolerances);
    #: reference runs and the common tests use them.
    reference_settings: ClassVar[dict] = {}
    #: The right-hand sides of one solve share work (a block Krylov space), so a
    #: result depends, to the tolerance, on which others it was solved with.
    block_solves: bool = False
    scorer_name: str = ""
    summary: str = ""
    description: str = ""
    curvature_note: str = ""
    notes: str = ""
    memory: str = ""
    attributes: tuple = ()
    warns: str = ""
    raises: str = ""
    examples: str = ""
    #: Own parameters that are sizes in the parameter space (a rank): a solver for
    #: a sub-problem with fewer parameters clips them to its size (:meth:`restricted`).
    sized_parameters: tuple = ()

    def __init__(self, **params):
        own = self.own_parameters()
        unknown = sorted(set(params) - set(own))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown parameters {unknown}.")
        for name, p in own.items():
            setattr(self, name, params.get(name, p.default))

    @classmethod
    def own_parameters(cls) -> dict:
        return {p.name: p for p in cls.parameters if isinstance(p, Param)}

    def restricted(self, n_params: int) -> Solver:
        """An unfitted solver with these settings for a sub-problem of ``n_params``
        parameters (one block of a block-diagonal curvature): the
        ``sized_parameters`` (a rank) are clipped to ``n_params``.

        Examples
        --------
        >>> from skinfluence.solvers import NystroemSolver
        >>> NystroemSolver(rank=10).restricted(4).rank
        4
        """
        params = {name: getattr(self, name) for name in self.own_parameters()}
        for name in self.sized_parameters:
            if params.get(name) is not None:
                params[name] = min(int(params[name]), int(n_params))
        return type(self)(**params)

    def fitted_attribute(self, name: str):
        """The fitted attribute ``name`` (a scorer exposes it); a block-diagonal
        solver gives one per block.

        Examples
        --------
        >>> from skinfluence.solvers import DirectSolver
        >>> DirectSolver().fitted_attribute("cholesky_")
        Traceback (most recent call last):
        ...
        AttributeError: 'DirectSolver' object has no attribute 'cholesky_'
        """
        return getattr(self, name)

    # ------------------------------------------------------------ fit
    def select_parameters(self, module, param_names: list[str]) -> list[str]:
        """The parameters the method works on, among those selected (all of them)."""
        return list(param_names)

    def check(self, operator: CurvatureOperator, mode: str = "up") -> None:
        """Cheap checks of the method's parameters against the problem and the
        scorer's ``mode``, before any work (rank against the number of parameters,
        say)."""

    def needs_regularization(self, operator: CurvatureOperator) -> bool:
        """Whether the method, at its settings, needs ``regularization > 0`` (a
        partial rank inverted as ``1 / lambda`` on the complement, a Kronecker
        preconditioner)."""
        return False

    def spectrum(self, operator: CurvatureOperator, progress=None) -> tuple[float, float]:
        """Smallest and largest eigenvalue of ``C + P`` (no regularization).

        A short Lanczos run on ``operator.curvature_mv`` (:func:`spectrum_ends`): 128
        products for the exact Hessian, whose negative end converges slowly (it sits
        in a cluster near 0), 32 for a positive semi-definite curvature, where only
        the top matters; exact up to that many parameters, estimates beyond (the
        smallest an upper bound). The Direct method overrides it with the dense
        matrix's eigenvalues.
        """
        k = 128 if operator.curvature == "exact" else 32
        return spectrum_ends(operator.curvature_mv, operator.n_params, operator.device, k,
                             dtype=operator.dtype)

    def auto_regularization(self, operator: CurvatureOperator, progress=None) -> float:
        """The regularization ``"auto"`` gives on ``operator`` (whose own is ignored).

        ``rho`` is :data:`~skinfluence._linalg.AUTO_RELATIVE_DAMPING` for a torch or
        skorch model, or for any model where :meth:`needs_regularization`; 0 for an
        sklearn model, whose objective (with its own penalty) the curvature already
        is. See :func:`~skinfluence._linalg.auto_regularization`.
        """
        lowest, highest = self.spectrum(operator, progress)
        damped = not operator.adapter.knows_objective or self.needs_regularization(operator)
        return auto_regularization(lowest, highest, AUTO_RELATIVE_DAMPING if damped else 0.0)

    def fit(self, operator: CurvatureOperator, progress=None, mode: str = "up") -> Solver:
        """Build the approximation of ``A`` from ``operator``; returns self."""
        self.check(operator, mode)
        self.adapter_ = operator.adapter
        self.n_params_ = operator.n_params
        self.regularization_ = float(operator.regularization)
        return self._fit(operator, progress)

    def _fit(self, operator: CurvatureOperator, progress=None) -> Solver:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------ operations
    def solve(self, G: torch.Tensor, report: SolveReport | None = None) -> torch.Tensor:  # pragma: no cover
        """``A^-1 G`` for flat gradients ``G`` (k, p), same shape and dtype."""
        raise NotImplementedError

    def convergence_warning(self, report: SolveReport) -> str | None:
        """The warning for a call whose solves did not all converge, or None."""
        return None

    def factors(self, X, Y, report: SolveReport | None = None) -> torch.Tensor:
        """Test factors ``A^-1 grad l`` of the points (X, Y), in the solver's
        coordinates (k, p)."""
        return self.solve(per_sample_grads(self.adapter_, X, Y), report)

    def parameter_factors(self, F: torch.Tensor) -> torch.Tensor:
        """Factors from :meth:`factors` in the parameters' own coordinates."""
        return F

    def pairwise(self, F: torch.Tensor, X, Y) -> torch.Tensor:
        """``F . grad l(x_j, y_j)`` for each point j of the block: (k, b)."""
        return gradient_products(self.adapter_, F, X, Y)

    def pairwise_blocks(self, F: torch.Tensor, X, Y) -> dict:
        """:meth:`pairwise` split by layer: module name -> (k, b); they sum to it."""
        G = per_sample_grads(self.adapter_, X, Y)
        out = {}
        for name, cols in self.adapter_.layer_slices().items():
            out[name] = F[:, cols] @ G[:, cols].T
        return out

    def self_scores(self, X, Y, report: SolveReport | None = None) -> torch.Tensor:
        """``grad l^T A^-1 grad l`` of each point of the block, (b,)."""
        G = per_sample_grads(self.adapter_, X, Y)
        return (self.solve(G, report) * G).sum(1)


def pairwise_tile(solver: Solver, F: torch.Tensor, X, Y, mode: str = "up") -> torch.Tensor:
    """One tile of the influence matrix: factors ``F`` against training block (X, Y).

    A pure function of a fitted solver, a block of factors and a block of training
    points (all picklable), so a tile can be computed in any process.

    Parameters
    ----------
    solver : Solver
        A fitted solver.
    F : torch.Tensor of shape (k, p)
        ``solver.factors(...)`` of the test points for ``mode="up"``; for
        ``mode="perturbation"``, ``solver.parameter_factors`` of them.
    X, Y : torch.Tensor
        A block of training points, as the solver's adapter converted them.
    mode : {"up", "perturbation"}
        Influences, or their derivatives with respect to the training features.

    Returns
    -------
    tile : torch.Tensor of shape (k, b) or (k, b, *x_shape)

    Examples
    --------
    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> from skinfluence.solvers import CurvatureOperator, DirectSolver, pairwise_tile
    >>> model = torch.nn.Linear(3, 2).double()
    >>> a = build_adapter(model, loss=torch.nn.functional.cross_entropy)
    >>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 2
    >>> a.bind(X, 10)
    >>> solver = DirectSolver().fit(CurvatureOperator(a, X, y, "exact", 0.1, 4))
    >>> pairwise_tile(solver, solver.factors(X[:2], y[:2]), X, y).shape
    torch.Size([2, 10])
    """
    adapter = solver.adapter_
    with adapter.eval_mode():
        if mode == "up":
            return solver.pairwise(F, X, Y)
        return gradient_products(adapter, F, X, Y, mode="perturbation")
