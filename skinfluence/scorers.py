"""Influence scorers: sklearn estimators over a fitted model.

One base class, :class:`InfluenceScorer`, holds all behaviour: validation, batching,
fitted-state checks, ``transform`` / ``influences`` / ``influence_factors`` /
``self_influence``, all through the solver contract of
:mod:`skinfluence.solvers`. The named scorers are built from the registry
``skinfluence.solvers.METHODS``: each method's solver declares its parameters and
documentation once, and the scorer's signature, parameter validation, docstring and
fitted attributes follow from that declaration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import textwrap
import warnings
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    _check_feature_names,
    _check_sample_weight,
    _num_samples,
    check_array,
    check_is_fitted,
    validate_data,
)
from torch.func import grad, jvp, vmap

from ._adapters import BINARY, CLASS_INDEX, build_adapter, resolve_dtype
from ._data import DatasetSource, Rows, _Reader, is_out_of_core, source_of
from ._gradients import batch_slices, per_sample_grads
from .large import LargeData
from .removal import RemovalEffects
from .solvers import (
    METHODS,
    Attribute,
    BlockDiagonalSolver,
    CurvatureOperator,
    Param,
    SolveReport,
    pairwise_tile,
)

__all__ = ["InfluenceScorer", *sorted(s.scorer_name for s in METHODS.values())]

#: The one sentence on sign and scale, repeated wherever influences are returned.
SIGN_AND_SCALE = (
    "``I[i, j] = grad l(test_i)^T (H + lambda I)^-1 grad l(train_j)``, with H the "
    "Hessian of the mean training loss (the weighted mean, with ``sample_weight``; "
    "plus the estimator's own penalty). Positive means training point j helps test "
    "point i (removing it raises the test loss); removing training point j changes "
    "the loss at test point i by about ``I[i, j] / n_train``, or "
    "``w_j I[i, j] / sum(w)`` with sample weights w."
)

#: Parameters every method shares, declared once.
SHARED = {
    p.name: p
    for p in (
        Param("estimator", None, "no_validation", "fitted model", """A fitted skorch net (``NeuralNetClassifier``, ``NeuralNetBinaryClassifier``,
``NeuralNetRegressor``), a torch ``nn.Module`` together with ``loss``, a fitted
sklearn ``LogisticRegression``, ``Ridge``, ``LinearRegression``,
``MLPClassifier``, ``MLPRegressor`` or ``SGDClassifier(loss="log_loss")``, or a
fitted ``Pipeline`` ending in one of them. The model is never modified; it is
evaluated in eval mode and handed back in the mode it came in."""),
        Param("loss", None, [None, callable], "callable", """Mean-reduced ``loss(output, target)`` for a torch module (e.g.
``torch.nn.functional.cross_entropy``). None uses the estimator's own loss
(skorch's criterion, with NLLLoss applied to log-probabilities exactly as
``NeuralNetClassifier.get_loss`` does)."""),
        Param("params", None, [None, str, list, tuple], "str or list of str", """Parameter names or module prefixes to differentiate (e.g. ``"fc2"`` for a
last layer); the others are held fixed. None uses every parameter that
requires gradients; ``"last-layer"`` those of the module holding the model's
last trainable parameter."""),
        Param("regularization", "auto", [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})], 'float or "auto"', """lambda added to the curvature, in the units of torch's ``weight_decay``. For
sklearn models the model's own L2 penalty is already included, so 0 gives the
Hessian of the model's objective. ``"auto"`` picks lambda at ``fit`` from the
extreme eigenvalues of the curvature plus penalty (those of the Direct
method's dense matrix; for the other methods, estimates from a short Lanczos
run): ``lambda = max(rho * lambda_max, 1.5 max(0, -lambda_min) + 1e-6
max(lambda_max, 1))``, the second term rounded up to one significant digit,
so that the curvature plus lambda is positive definite. ``rho = 0.1`` for
torch and skorch models, the best of five decades against retraining on two
networks (``benchmarks/results/auto_regularization.md``); ``rho = 0`` for
sklearn models, whose objective is known: auto gives 0 there unless the
curvature is singular or indefinite, or the method needs ``lambda > 0`` (a
partial ``rank``, a Kronecker preconditioner), which gets ``rho = 0.1``. The
value used is ``regularization_``. To tune lambda against retraining instead,
search a grid with ``GridSearchCV`` and
:class:`skinfluence.evaluation.Counterfactuals` (``cv()``, ``scorer()``)."""),
        Param("mode", "up", [StrOptions({"up", "perturbation"})], '{"up", "perturbation"}', """"up": influence of upweighting (removing) a training point. "perturbation":
its derivative with respect to the training point's features."""),
        Param("hessian", "exact", [StrOptions({"exact", "gauss-newton", "empirical-fisher"})], '{"exact", "gauss-newton", "empirical-fisher"}', """The curvature: the Hessian, the generalized Gauss-Newton matrix (positive
semi-definite, useful for non-convex networks), or the empirical Fisher, the
mean of the outer products of the per-sample gradients at the given labels
(positive semi-definite; it equals neither away from a perfect fit). With
``regularization="auto"`` the Gauss-Newton matrix scored no better than the
Hessian against retraining on two networks (equal at ``rho = 0.1``, worse at
smaller damping, where the Hessian's negative eigenvalues set lambda):
prefer "exact", and "gauss-newton" where the Hessian's negative end is not
known well enough for a positive definite solve."""),
        Param("block_structure", "full", [StrOptions({"full", "layer"}), list, tuple],
              '{"full", "layer"} or list of list of str', """The blocks of the curvature. "full": the whole matrix. "layer": only its
diagonal blocks, one per module holding parameters (the layers of
:meth:`influences_by_layer`); the curvature between layers is dropped and each
block is solved on its own by the method, as the Hessian (or Gauss-Newton
matrix) of that layer's parameters with the others held fixed, plus the same
``regularization``. The Direct method then stores the sum of the blocks'
squares instead of p^2 numbers. A list gives the blocks as groups of parameter
names or module prefixes (a string alone is a group of one); every parameter
taken into account must be in exactly one group. With blocks, ``rank`` applies
to each block (at most its size), and the method's fitted attributes hold one
entry per block (see ``blocks_``)."""),
        Param("batch_size", 256, [Interval(Integral, 1, None, closed="left")], "int",
              "Samples per step of every computation; bounds peak memory."),
        Param("dtype", None, "no_validation", '{None, "float32", "float64"}',
              "Working precision; None keeps the model's. float64 for accuracy checks."),
        Param("device", None, [None, str, torch.device], "str or torch.device",
              "Where to compute; None uses the model's device. Results are numpy on the CPU."),
        Param("progress", False, ["boolean"], "bool", "Show tqdm progress bars on long loops."),
    )
}

_COMMON_ATTRIBUTES = """
    adapter_ : object
        The fitted model seen as a function of its parameters.
    solver_ : object
        The fitted curvature solver.
    operator_ : CurvatureOperator
        The curvature the solver was fitted on (training data, curvature,
        regularization, batch size).
    regularization_ : float
        The regularization lambda used: ``regularization`` itself, or the value
        ``"auto"`` resolved to (0 for a method without curvature).
    n_train_ : int
        Number of training points given to ``fit``.
    sample_weight_ : ndarray of shape (n_train,) or None
        The sample weights given to ``fit`` (a validated copy), or None.
    n_features_in_ : int
        Number of features of the training data.
    feature_names_in_ : ndarray of str
        Feature names of a DataFrame given to ``fit``.
    n_params_ : int
        Number of parameters taken into account.
    classes_ : ndarray
        Class labels (classifiers only)."""

_AFTER_SOLVE = (
    "the first call that solves a system (influences, transform, influence_factors "
    "or self_influence)"
)


_PAIRWISE_PARAMS = """Parameters
        ----------
        X_test : array-like of shape (n_test, n_features)
            Points whose loss is influenced.
        y_test : array-like of shape (n_test,), default=None
            Their targets; None uses the model's predicted class (classifiers only).
        X, y : array-like, default=None
            Training points to score, with their targets; None uses the data given to
            ``fit``."""


def _doc(obj):
    doc = obj.__doc__.replace("{sign_and_scale}", SIGN_AND_SCALE)
    obj.__doc__ = doc.replace("{pairwise_params}", _PAIRWISE_PARAMS)
    return obj


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    def wrap(iterable, desc):
        return tqdm(iterable, desc=desc, leave=False)

    return wrap


def _iterate(progress, iterable, desc):
    return iterable if progress is None else progress(iterable, desc)


class InfluenceScorer(RemovalEffects, LargeData, BaseEstimator):
    """Base class of the influence scorers; use one of its subclasses.

    Every operation goes through the solver contract (``skinfluence.solvers``): a
    new method is a solver file and one line in ``skinfluence.solvers.METHODS``,
    from which its scorer class is built.

    Examples
    --------
    >>> from skinfluence import CgInfluenceScorer, InfluenceScorer
    >>> issubclass(CgInfluenceScorer, InfluenceScorer)
    True
    >>> sorted(CgInfluenceScorer().get_params())[:3]
    ['atol', 'batch_size', 'block_structure']
    """

    #: The solver class of the method (set on each named scorer).
    solver_class: ClassVar[type | None] = None
    _parameter_constraints: ClassVar[dict] = {}

    # ------------------------------------------------------------------ sklearn
    def __sklearn_clone__(self):
        # The wrapped model is already fitted and is never modified here, so a clone
        # shares it instead of resetting it (skorch's own clone would unfit a net).
        params = self.get_params(deep=False)
        from sklearn.base import clone

        kept = {
            k: (v if k == "estimator" else clone(v, safe=False)) for k, v in params.items()
        }
        return type(self)(**kept)

    def __sklearn_tags__(self):
        from sklearn.utils import TransformerTags

        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        # influences come out in the model's dtype, whatever the input's
        tags.transformer_tags = TransformerTags(preserves_dtype=[])
        tags.input_tags.sparse = False
        return tags

    # ------------------------------------------------------------------ checks
    def _check_fitted(self):
        """Fitted, and the parameters (possibly changed by set_params) still valid."""
        check_is_fitted(self)
        self._validate_params()

    def _check_X(self, X, name):
        X = _as_array(X)
        if _reads_raw_inputs(self.estimator):  # a Pipeline's own steps read X as given
            with _named(name):
                X = validate_data(self, X, reset=False, skip_check_array=True)
            return X
        _check_feature_names(self, X, reset=False)
        with _named(name):
            X = check_array(X, allow_nd=True, dtype="numeric", input_name=name)
        if hasattr(self, "x_shape_") and tuple(X.shape[1:]) != self.x_shape_:
            shape, fitted = tuple(X.shape[1:]), self.x_shape_
            if X.ndim == 2 and len(fitted) == 1:
                shape = f"{shape} ({X.shape[1]} features)"
                fitted = f"{fitted} ({self.n_features_in_} features)"
            raise ValueError(
                f"{name} has samples of shape {shape}, but {type(self).__name__} was "
                f"fitted on samples of shape {fitted}."
            )
        return X

    def _check_y(self, y, n, name, xname):
        if y is None:
            raise ValueError(
                f"{name}: {type(self).__name__} requires y to be passed, but the target y "
                f"is None; pass one target per sample of {xname}."
            )
        y = _as_array(y)
        if np.isscalar(y) or getattr(y, "ndim", 1) == 0:  # not np.ndim: array-likes stay as given
            raise ValueError(f"{name} is a scalar; pass one target per sample of {xname}.")
        with _named(name):
            y = check_array(y, ensure_2d=False, dtype=None, input_name=name, ensure_all_finite=True)
        if y.shape[0] != n:
            raise ValueError(
                f"{name} has {y.shape[0]} samples but {xname} has {n}; pass one target "
                "per sample."
            )
        return y

    def _data(self, X, y, xname, yname, predicted_ok=True):
        """Validated tensors (X, Y); (None, None) means the training data.

        Without ``y`` the model's predicted classes are the targets, where
        ``predicted_ok`` allows it (test points; training points need their labels).
        """
        if X is None:
            if y is not None:
                raise ValueError(f"{yname} was given without {xname}; pass both or neither.")
            return self.X_train_, self.y_train_
        if is_out_of_core(X):
            return self._rows(self.adapter_, source_of(X), y, xname, yname)
        X = self._check_X(X, xname)
        if y is None and not predicted_ok:
            raise ValueError(
                f"{yname}: the training points {xname} need their labels; pass {yname}, "
                f"or leave out both {xname} and {yname} to score the data given to fit."
            )
        if y is not None:
            y = self._check_y(y, X.shape[0], yname, xname)
        Xt = self.adapter_.features(X)
        with self.adapter_.eval_mode():
            if y is None:
                return Xt, self.adapter_.predicted_targets(Xt)
            return Xt, self.adapter_.targets(y, yname)

    # ------------------------------------------------------------------ fit
    def _solver(self):
        cls = self.solver_class
        solver = cls(**{name: getattr(self, name) for name in cls.own_parameters()})
        blocks = getattr(self, "block_structure", "full")
        if isinstance(blocks, str) and blocks == "full":
            return solver
        return BlockDiagonalSolver(solver, blocks)

    def _reset(self):
        for name in [k for k in vars(self) if k.endswith("_") and not k.startswith("__")]:
            delattr(self, name)
        self.__dict__.pop("_last_call", None)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Build the curvature approximation over the training data.

        Parameters
        ----------
        X : array-like of shape (n_train, n_features) or (n_train, ...)
            The data the model was trained on. A numpy ``memmap``, a dask array or
            a torch ``Dataset`` (of ``(x, y)`` items, or a :class:`DatasetSource`
            with its own ``collate``) is read ``batch_size`` rows at a time by every
            method and never held whole: the scorer keeps a reference to it (it
            must stay readable while the scorer is used; pickling the scorer stores
            a memmap's file name, not its contents).
        y : array-like of shape (n_train,) or (n_train, n_targets)
            Its targets (class labels for classifiers); None for a ``Dataset``,
            whose items carry them.
        sample_weight : array-like of shape (n_train,), default=None
            The weights the model was trained with (non-negative, not all zero).
            The objective is then the weighted mean training loss
            ``sum_i w_i l_i / sum_i w_i`` plus the estimator's own penalty (for
            sklearn models on the scale sklearn gives it for weighted data), and H
            its curvature. Influences stay per point, from each point's own
            gradient: removing training point j changes a test loss by about
            ``w_j I[i, j] / sum(w)``, and a point of weight 0 by nothing. None
            weighs every point 1.

        Returns
        -------
        self : object
            The fitted scorer.
        """
        self._reset()
        try:
            self._fit(X, y, sample_weight)
        except BaseException:
            self._reset()  # a failed fit leaves nothing fitted, not even n_features_in_
            raise
        return self

    def _rows(self, adapter, source, y, xname, yname):
        """Out-of-core (X, y) as lazily read rows: the source of a memmap, dask array
        or torch Dataset (:func:`source_of`) is converted batch by batch, never whole."""
        n = len(source)
        dataset = isinstance(source, DatasetSource)
        if dataset and y is not None:
            raise ValueError(
                f"{yname}: a torch Dataset carries its own targets; pass {yname}=None "
                "(or a DatasetSource whose collate returns them)."
            )
        if not dataset:
            if hasattr(y, "compute"):  # a dask array of targets: n values, small
                y = y.compute()
            y = self._check_y(y, n, yname, xname)

        Y = None if dataset else adapter.targets(y, yname)
        reader = _Reader(source, adapter, Y, xname, yname)
        first = reader.batch(np.arange(min(n, 1)))
        if n == 0 or first[0].shape[0] == 0:
            raise ValueError(f"{xname} has no samples; pass at least one.")
        row_shape = tuple(first[0].shape[1:])
        if hasattr(self, "x_shape_") and row_shape != self.x_shape_:
            raise ValueError(
                f"{xname} has samples of shape {row_shape}, but {type(self).__name__} "
                f"was fitted on samples of shape {self.x_shape_}."
            )
        Xr = Rows(reader, 0, n, row_shape, first[0].device, first[0].dtype)
        if Y is None:
            Y = Rows(reader, 1, n, tuple(first[1].shape[1:]), first[1].device, first[1].dtype)
        return Xr, Y

    def _fit(self, X, y, sample_weight=None):
        resolve_dtype(getattr(self, "dtype", None))
        if is_out_of_core(X):
            return self._fit_data(None, None, sample_weight, X, y)
        with _named("X"):
            if _reads_raw_inputs(self.estimator):
                # the Pipeline's steps take X as given: a DataFrame keeps its columns
                # (selected by name, of any dtype); the steps' output is checked instead
                X = validate_data(self, _as_array(X), reset=True, skip_check_array=True)
                _num_samples(X)
            else:
                X = validate_data(self, _as_array(X), reset=True, allow_nd=True, dtype="numeric")
        y = self._check_y(y, _num_samples(X), "y", "X")
        self._fit_data(X, y, sample_weight)

    def _fit_data(self, X, y, sample_weight, lazy_X=None, lazy_y=None):
        """Fit on validated arrays (X, y), or on out-of-core ``lazy_X``."""
        solver = self._solver()
        kw = {"loss": getattr(self, "loss", None), "dtype": getattr(self, "dtype", None),
              "device": getattr(self, "device", None)}
        adapter = build_adapter(self.estimator, params=getattr(self, "params", None), **kw)
        names = solver.select_parameters(adapter.module, adapter.param_names)
        if names != adapter.param_names:  # parameters the method leaves out are held fixed
            adapter = build_adapter(self.estimator, params=names, **kw)
        if lazy_X is None:
            n = _num_samples(X)
            sw = None if sample_weight is None else _sample_weights(sample_weight, X)
            weight_sum = None if sw is None else float(sw.sum())
            Xt = adapter.features(X)
            adapter.bind(Xt, n, weight_sum)  # before the targets: it learns the outputs
            Yt = adapter.targets(y, "y")
            x_shape = tuple(np.shape(X)[1:])
        else:
            source = source_of(lazy_X)
            n = len(source)
            if n == 0:
                raise ValueError("X has no samples; pass at least one.")
            sw = None if sample_weight is None else _sample_weights(sample_weight, np.empty((n, 0)))
            weight_sum = None if sw is None else float(sw.sum())
            adapter.bind(adapter.features(_as_array(source.read(np.arange(1))[0])), n, weight_sum)
            Xt, Yt = self._rows(adapter, source, lazy_y, "X", "y")
            x_shape = tuple(Xt.shape[1:])
            self.n_features_in_ = int(x_shape[0]) if x_shape else 1
        curvature = solver.curvature or self.hessian
        regularization = getattr(self, "regularization", 0.0)
        auto = isinstance(regularization, str)  # "auto", the only string allowed
        weights = None if sw is None else torch.as_tensor(sw, dtype=adapter.dtype, device=adapter.device)
        operator = CurvatureOperator(
            adapter, Xt, Yt, curvature, 0.0 if auto else float(regularization),
            int(self.batch_size), weights,
        )
        progress = _progress(self.progress)
        with adapter.eval_mode():
            _check_differentiable(adapter, Xt, Yt)
            if auto:
                lam = solver.auto_regularization(operator, progress)
                operator = dataclasses.replace(operator, regularization=lam)
            solver.fit(operator, progress=progress, mode=self.mode)
        self.regularization_ = float(operator.regularization)
        self.adapter_ = adapter
        self.solver_ = solver
        self.operator_ = operator
        self.X_train_, self.y_train_ = Xt, Yt
        self.x_shape_ = x_shape
        self.n_train_ = int(Xt.shape[0])
        self.sample_weight_ = sw
        self.n_params_ = adapter.n_params
        if adapter.target_kind in (CLASS_INDEX, BINARY):
            self.classes_ = adapter.classes
        self._last_call = _LastCall()

    # ------------------------------------------------------------------ core
    def _grads(self, X, Y):
        with self.adapter_.eval_mode():
            return per_sample_grads(self.adapter_, X, Y)

    def _new_report(self) -> SolveReport:
        return SolveReport(progress=self.progress)

    def _publish(self, report: SolveReport) -> None:
        """Keep the diagnostics of this call (per-call, not fitted state) and warn
        once for the whole call when some solve did not converge."""
        report.close()  # the call's one progress bar, if any
        if report.empty:
            return
        self._last_call.report = report
        message = self.solver_.convergence_warning(report)
        if message:
            warnings.warn(message, ConvergenceWarning, stacklevel=3)

    def _factors(self, X, Y, report, progress=None):
        """Test factors of (X, Y) in the solver's coordinates, (n, p) tensor."""
        out = []
        for s in _iterate(progress, list(batch_slices(X.shape[0], self.batch_size)), "factors"):
            out.append(self.solver_.factors(X[s], Y[s], report))
        if not out:
            return torch.zeros(0, self.n_params_, dtype=self.adapter_.dtype, device=self.adapter_.device)
        return torch.cat(out)

    def _numpy(self, t: torch.Tensor) -> np.ndarray:
        out = t.detach().to("cpu").numpy()
        if not np.isfinite(out).all():
            raise ValueError(
                "X: the result is not finite (inf or NaN): the inputs or the model's "
                "gradients overflowed the working precision. Standardize the features, "
                "use dtype='float64', or increase regularization."
            )
        return out

    def influence_factors(self, X, y=None):
        """Inverse-curvature-vector products ``(H + lambda I)^-1 grad l(x, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples, usually test points.
        y : array-like of shape (n_samples,), default=None
            Their targets; None uses the model's own predicted class (classifiers only).

        Returns
        -------
        factors : ndarray of shape (n_samples, n_params)
            One row per sample, laid out as the model's parameters;
            ``factors @ grad l(train_j)`` is its influence row.
        """
        self._check_fitted()
        X, Y = self._data(X, y, "X", "y")
        report = self._new_report()
        with self.adapter_.eval_mode():
            F = self.solver_.parameter_factors(self._factors(X, Y, report, _progress(self.progress)))
        self._publish(report)
        return self._numpy(F)

    def _pairwise(self, X_test, y_test, X, y, by_layer: bool):
        self._check_fitted()
        Xte, Yte = self._data(X_test, y_test, "X_test", "y_test")
        Xtr, Ytr = self._data(X, y, "X", "y", predicted_ok=False)
        solver, progress = self.solver_, _progress(self.progress)
        report = self._new_report()
        steps = list(batch_slices(Xtr.shape[0], self.batch_size))
        with self.adapter_.eval_mode():
            F = self._factors(Xte, Yte, report)
            if by_layer:
                blocks = [solver.pairwise_blocks(F, Xtr[s], Ytr[s]) for s in _iterate(progress, steps, "influences")]
            else:
                if self.mode == "perturbation":
                    F = solver.parameter_factors(F)
                blocks = [
                    pairwise_tile(solver, F, Xtr[s], Ytr[s], self.mode)
                    for s in _iterate(progress, steps, "influences")
                ]
        self._publish(report)
        if by_layer:
            names = list(self.adapter_.layer_slices()) if not blocks else list(blocks[0])
            empty = np.zeros((Xte.shape[0], 0))
            return {n: self._numpy(torch.cat([b[n] for b in blocks], 1)) if blocks else empty for n in names}
        if not blocks:
            tail = () if self.mode == "up" else self.x_shape_
            return np.zeros((Xte.shape[0], 0, *tail))
        return self._numpy(torch.cat(blocks, 1))

    @_doc
    def influences(self, X_test, y_test=None, X=None, y=None):
        """Influence of each training point on each test point.

        {sign_and_scale}

        In ``mode="perturbation"`` the entry is a vector: the derivative of ``I[i, j]``
        with respect to the features of training point j, i.e. how the test loss
        responds when training point j is moved.

        {pairwise_params}

        Returns
        -------
        I : ndarray of shape (n_test, n_train) or (n_test, n_train, n_features)
            The influence matrix ("up") or tensor ("perturbation"); in "up" mode the
            sum of :meth:`influences_by_layer`.
        """
        return self._pairwise(X_test, y_test, X, y, by_layer=False)

    @_doc
    def influences_by_layer(self, X_test, y_test=None, X=None, y=None) -> dict:
        """Influences split by layer: the part of ``I`` carried by each module's parameters.

        {sign_and_scale} Each layer's matrix is the product of the test factors and the
        training gradients restricted to that layer's parameters; the matrices sum to
        :meth:`influences`. For a curvature that is block diagonal over layers
        (EK-FAC, or ``block_structure="layer"``) each is the influence computed with
        that layer alone.

        {pairwise_params}

        Returns
        -------
        I : dict of str to ndarray of shape (n_test, n_train)
            One influence matrix per module name, in the model's order.
        """
        if self.mode != "up":
            raise ValueError(
                "mode: influences_by_layer is available in mode='up'; set mode='up' or "
                "call influences()."
            )
        return self._pairwise(X_test, y_test, X, y, by_layer=True)

    @_doc
    def transform(self, X, y=None):
        """Influence of every training point on each row of ``X``.

        {sign_and_scale}

        Parameters
        ----------
        X : array-like of shape (n_test, n_features)
            Test points.
        y : array-like of shape (n_test,), default=None
            Their targets. None uses the model's own predicted class as the target
            (classifiers only): the influences then explain the model's prediction.

        Returns
        -------
        I : ndarray of shape (n_test, n_train) or (n_test, n_train, n_features)
            Same as :meth:`influences` with the training data given to ``fit``.
        """
        return self.influences(X, y)

    def fit_transform(self, X, y, sample_weight=None):
        """Fit on (X, y), then return the influences of the training points on themselves.

        Parameters
        ----------
        X, y : array-like
            Training data, as for :meth:`fit`.
        sample_weight : array-like of shape (n_train,), default=None
            Sample weights, as for :meth:`fit`.

        Returns
        -------
        I : ndarray of shape (n_train, n_train) or (n_train, n_train, n_features)
            Pairwise training influences; its diagonal is :meth:`self_influence`.
        """
        return self.fit(X, y, sample_weight=sample_weight).influences(X, y)

    @_doc
    def self_influence(self, X=None, y=None):
        """Influence of each point on its own loss, without forming the pairwise matrix.

        {sign_and_scale} Self-influence is the diagonal ``I[j, j]``: large values mark
        points the model finds hard to fit, often mislabelled ones.

        Parameters
        ----------
        X, y : array-like, default=None
            Points to score, with their targets; None uses the data given to ``fit``.

        Returns
        -------
        s : ndarray of shape (n_samples,) or (n_samples, n_features)
            In "perturbation" mode, the derivative of ``I[j, j]`` with respect to the
            features of the training copy of point j.
        """
        self._check_fitted()
        X, Y = self._data(X, y, "X", "y", predicted_ok=False)
        a, solver = self.adapter_, self.solver_
        report = self._new_report()
        out = []
        steps = list(batch_slices(X.shape[0], self.batch_size))
        with a.eval_mode():
            for s in _iterate(_progress(self.progress), steps, "self-influence"):
                if self.mode == "up":
                    out.append(solver.self_scores(X[s], Y[s], report))
                else:
                    F = solver.solve(per_sample_grads(a, X[s], Y[s]), report)
                    out.append(_self_perturbation(a, X[s], Y[s], F))
        self._publish(report)
        if not out:
            return np.zeros((0,) if self.mode == "up" else (0, *self.x_shape_))
        return self._numpy(torch.cat(out))

    def score(self, X, y):
        """How well the influences predict actual retraining, at points (X, y).

        The linear datamodeling score (or the leave-one-out Pearson correlation) of
        the influences against the outcomes of refitted clones of ``estimator``
        that never saw (X, y), recorded by a fitted
        :class:`skinfluence.evaluation.Counterfactuals` of the same estimator and
        training data; higher is better, so ``GridSearchCV`` can maximise it. See
        :func:`skinfluence.evaluation.influence_score`.

        Parameters
        ----------
        X, y : array-like
            Evaluation points of the counterfactuals.

        Returns
        -------
        score : float

        Raises
        ------
        TypeError
            When ``estimator`` cannot be cloned and refitted (a bare torch module).
        ValueError
            When no retraining outcomes exist for these points.
        """
        from .evaluation import influence_score

        return influence_score(self, X, y)

    # ------------------------------------------------------------------ classifiers
    def class_probabilities(self, X=None, *, leave_one_out=False, classes=None):
        """The model's probability of each class, ``exp(-loss(output, c))`` normalised.

        For cross-entropy (and skorch's NLL on probabilities, binary cross-entropy on
        one logit) these are the model's predicted probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), default=None
            Points to predict; None uses the data given to ``fit``.
        leave_one_out : bool, default=False
            Training points only (``X=None``): the probabilities of the model fitted
            without each point, from the influence estimate of its parameters,
            ``theta + (H + lambda I)^-1 grad l_i / n_train`` (times ``w_i n_train /
            sum(w)`` with sample weights), pushed through the
            model's output at ``x_i`` to first order.
        classes : array-like, default=None
            The classes, in the order of the columns; None uses ``classes_``.

        Returns
        -------
        P : ndarray of shape (n_samples, n_classes)
        """
        self._check_fitted()
        a = self.adapter_
        if a.target_kind not in (CLASS_INDEX, BINARY):
            raise ValueError(
                "estimator: class probabilities need a classifier; this model is a "
                "regressor."
            )
        classes = self.classes_ if classes is None else np.asarray(classes)
        if leave_one_out:
            if X is not None:
                raise ValueError(
                    "leave_one_out: leave-one-out probabilities are defined for the "
                    "training points; leave X=None."
                )
            with a.eval_mode():
                return _class_proba(a, self._loo_outputs(), classes)
        Xt = self.X_train_ if X is None else a.features(self._check_X(X, "X"))
        with a.eval_mode():
            out = [a.outputs(Xt[s]) for s in batch_slices(Xt.shape[0], self.batch_size)]
            outputs = torch.cat(out).unsqueeze(1) if out else Xt.new_zeros(0)
            return _class_proba(a, outputs, classes)

    def _loo_outputs(self) -> torch.Tensor:
        """Outputs at each training point of the model fitted without that point, to
        first order in the output (a forward-mode product, batched over points)."""
        a, n = self.adapter_, self.n_train_
        X, Y = self.X_train_, self.y_train_
        theta = a.flat_params()
        op = self.operator_

        def shifted(x, v):
            def f(flat):
                return a.sample_output(a.unflatten(flat), x)

            out, tangent = jvp(f, (theta,), (v,))
            return out + tangent

        res = []
        for s in batch_slices(n, self.batch_size):
            G = per_sample_grads(a, X[s], Y[s])
            V = self.solver_.solve(G) / op.weight_sum
            w = op.batch_weights(s)
            V = (V if w is None else V * w[:, None].to(V.dtype)).to(theta.dtype)
            res.append(vmap(shifted)(X[s], V))
        return torch.cat(res)


@contextlib.contextmanager
def _named(name: str):
    """Prefix sklearn's validation messages with the argument they are about."""
    try:
        yield
    except ValueError as exc:
        message = str(exc)
        if message.startswith(f"{name}:") or f"Input {name} " in message:
            raise
        raise ValueError(f"{name}: {message}") from exc


def _reads_raw_inputs(estimator) -> bool:
    """Whether X goes to the estimator as given: a Pipeline's first steps transform
    it (a ColumnTransformer selects DataFrame columns by name, encoders take strings),
    so it is not converted to a numeric array first."""
    from sklearn.pipeline import Pipeline

    return isinstance(estimator, Pipeline)


def _sample_weights(sample_weight, X) -> np.ndarray:
    """Validated float64 copy of the sample weights: finite, non-negative, one per
    row of X, not all zero."""
    with _named("sample_weight"):
        if isinstance(sample_weight, torch.Tensor):
            sample_weight = _as_array(sample_weight)
        sw = np.asarray(sample_weight) if not np.isscalar(sample_weight) else sample_weight
        if not np.isscalar(sw) and sw.ndim != 1:
            raise ValueError(
                f"sample_weight has shape {sw.shape}; pass one weight per training point, "
                f"a 1-d array of length {_num_samples(X)}."
            )
        return _check_sample_weight(
            sw, X, dtype=np.float64, ensure_non_negative=True, copy=True,
        )


def _as_array(a):
    """torch tensors (also ones that require grad) as numpy arrays; others unchanged."""
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu").numpy()
    return a


def _check_differentiable(adapter, X, Y) -> None:
    """Per-sample gradients of two samples, so that a model torch.func cannot
    differentiate per sample fails here with a clear message."""
    try:
        per_sample_grads(adapter, X[:2], Y[:2])
    except RuntimeError as exc:
        raise ValueError(
            "estimator: the per-sample gradients of this model could not be computed "
            f"with torch.func ({type(exc).__name__}: {str(exc).splitlines()[0]}). Models "
            "with data-dependent control flow, in-place updates of their inputs or "
            "layers without functional support (such as nn.LSTM) are not supported; "
            "select differentiable parts with params=."
        ) from exc


class _LastCall:
    """Diagnostics of the most recent call that solved systems: a log kept beside
    the fitted state, which such calls never change."""

    report: SolveReport | None = None


def _class_proba(adapter, outputs: torch.Tensor, classes: np.ndarray) -> np.ndarray:
    """p(c | x) = exp(-loss(output, c)) for each class c, rows renormalised."""
    n = outputs.shape[0]
    if n == 0:
        return np.zeros((0, len(classes)))

    def loss(o, t):
        return adapter.output_loss(o, t.unsqueeze(0))

    cols = []
    for c in classes:
        targets = adapter.targets(np.full(n, c, dtype=np.asarray(classes).dtype), "y")
        cols.append(torch.exp(-vmap(loss)(outputs, targets)))
    P = torch.stack(cols, 1).detach().to("cpu", torch.float64).numpy()
    return P / np.clip(P.sum(1, keepdims=True), np.finfo(float).tiny, None)


def _self_perturbation(adapter, X, Y, F):
    """d/dx of f_j . grad_theta l(x, y_j) at x = x_j, for each j with its own f_j."""

    def one(x, y, f):
        def proj(xx):
            return f @ adapter.flatten(grad(adapter.sample_loss)(adapter.params, xx, y))

        return grad(proj)(x)

    return vmap(one)(X, Y, F)


# --------------------------------------------------------------------------- building


def _indent(text: str, by: str = "    ") -> str:
    text = textwrap.dedent(text).strip("\n")
    return "\n".join(by + line if line.strip() else "" for line in text.splitlines())


def _declared(solver_cls) -> list[Param]:
    return [SHARED[p] if isinstance(p, str) else p for p in solver_cls.parameters]


def _docstring(solver_cls, params: list[Param]) -> str:
    s = solver_cls
    head = [s.summary, "", _indent(s.description)]
    scale = SIGN_AND_SCALE + (" " + " ".join(s.curvature_note.split()) if s.curvature_note else "")
    head += ["", _indent("\n".join(textwrap.wrap(scale, 84)))]
    for extra in (s.notes, s.memory):
        if extra:
            head += ["", _indent(extra)]
    own = list(s.attributes)
    if any(p.name == "block_structure" for p in params):
        own = [
            dataclasses.replace(a, doc=a.doc.rstrip() + "\n" + _PER_BLOCK[a.when]) for a in own
        ] + [_BLOCKS]
    attrs = _COMMON_ATTRIBUTES + "".join("\n" + a.entry() for a in own)
    parts = ["\n".join(head), "", "    Parameters", "    ----------",
             "\n".join(p.entry() for p in params), "", "    Attributes", "    ----------",
             attrs.strip("\n")]
    for title, body in (("Warns", s.warns), ("Raises", s.raises)):
        if body:
            parts += ["", f"    {title}", "    " + "-" * len(title), _indent(body)]
    parts += ["", "    Examples", "    --------", _indent(s.examples), "    "]
    return "\n".join(parts)


def _make_init(params: list[Param]):
    """An ``__init__`` with the declared signature that only stores its arguments."""
    defaults = {p.name: p.default for p in params}
    first, rest = params[0].name, [p.name for p in params[1:]]
    sig = ", ".join([f"{first}=_d[{first!r}]", "*", *[f"{n}=_d[{n!r}]" for n in rest]])
    body = "\n".join(f"    self.{n} = {n}" for n in [first, *rest])
    namespace = {}
    exec(f"def __init__(self, {sig}):\n{body}\n", {"_d": defaults}, namespace)
    return namespace["__init__"]


def _attribute(attr):
    def get(self):
        check_is_fitted(self)
        if attr.when == "solve":
            report = getattr(self.__dict__.get("_last_call"), "report", None)
            if report is None:
                raise AttributeError(f"{attr.name} is available after {_AFTER_SOLVE}.")
            value = getattr(report, attr.name.rstrip("_"))
        else:
            try:
                value = self.solver_.fitted_attribute(attr.source or attr.name)
            except AttributeError:
                raise AttributeError(f"{attr.name} is available after fit.") from None
        if isinstance(value, list):  # one per block of the curvature
            return [_plain(v) for v in value]
        return _plain(value)

    get.__name__ = attr.name
    return property(get, doc=f"{attr.doc.split(chr(10))[0]}")


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


#: The fitted attribute of the methods that take ``block_structure``.
_BLOCKS = Attribute("blocks_", "dict of str to list of str", """The blocks of the curvature: block name (the module's, for "layer"; the
group's entries joined by "+", for a list) -> its parameter names. One block,
"full", of every parameter for ``block_structure="full"``.""")

#: What the method's own attributes hold when the curvature has blocks.
_PER_BLOCK = {
    "fit": 'With ``block_structure`` other than "full", a list of these, one per\n'
           "block in the order of ``blocks_``.",
    "solve": 'With ``block_structure`` other than "full": the slowest block\'s\n'
             "iterations, and for each right-hand side its worst block's residual.",
}


def _blocks(self):
    check_is_fitted(self)
    solver = self.solver_
    if isinstance(solver, BlockDiagonalSolver):
        return {k: list(v) for k, v in solver.blocks_.items()}
    return {"full": list(self.adapter_.param_names)}


def build_scorer_class(solver_cls) -> type:
    """The named scorer of a method, built from its solver's declarations.

    Parameters
    ----------
    solver_cls : type
        A :class:`~skinfluence.solvers.Solver` subclass with ``scorer_name``,
        ``parameters`` and its documentation fields.

    Returns
    -------
    cls : type
        A subclass of :class:`InfluenceScorer` with the declared signature,
        ``_parameter_constraints``, docstring and fitted attributes.

    Examples
    --------
    >>> from skinfluence.scorers import build_scorer_class
    >>> from skinfluence.solvers import CgSolver
    >>> build_scorer_class(CgSolver).__name__
    'CgInfluenceScorer'
    """
    params = _declared(solver_cls)
    namespace = {
        "__module__": __name__,
        "__qualname__": solver_cls.scorer_name,
        "__doc__": _docstring(solver_cls, params),
        "__init__": _make_init(params),
        "solver_class": solver_cls,
        "_parameter_constraints": {p.name: p.constraints for p in params},
    }
    for attr in solver_cls.attributes:
        namespace[attr.name] = _attribute(attr)
    if "block_structure" in namespace["_parameter_constraints"]:
        namespace["blocks_"] = property(_blocks, doc=_BLOCKS.doc.split("\n")[0])
    return type(solver_cls.scorer_name, (InfluenceScorer,), namespace)


def _methods_table() -> str:
    """A table of the registered methods, for this module's documentation."""
    rows = ["| method | scorer | what it computes |", "|---|---|---|"]
    for name, solver in METHODS.items():
        rows.append(f"| `{name}` | `{solver.scorer_name}` | {solver.summary} |")
    return "\n".join(rows)


for _solver in METHODS.values():
    globals()[_solver.scorer_name] = build_scorer_class(_solver)
del _solver
__doc__ += "\nThe registered methods (``inversion_method`` of the functional interface):\n\n" + _methods_table() + "\n"
