"""Influence scorers: sklearn estimators over a fitted model.

One base class, :class:`InfluenceScorer`, holds all behaviour: validation, batching,
fitted-state checks, ``transform`` / ``influences`` / ``influence_factors`` /
``self_influence``. Each public scorer declares its parameters and the solver it
builds, nothing more.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted
from torch.func import grad, vmap

from ._adapters import BINARY, CLASS_INDEX, build_adapter
from ._gradients import batch_slices, mixed_projection, per_sample_grads
from .solvers import CurvatureOperator, DirectSolver

__all__ = ["DirectInfluenceScorer", "EkfacInfluenceScorer", "InfluenceScorer"]

#: The one sentence on sign and scale, repeated wherever influences are returned.
SIGN_AND_SCALE = (
    "``I[i, j] = grad l(test_i)^T (H + lambda I)^-1 grad l(train_j)``, with H the "
    "Hessian of the mean training loss (plus the estimator's own penalty). Positive "
    "means training point j helps test point i (removing it raises the test loss); "
    "removing training point j changes the loss at test point i by about "
    "``I[i, j] / n_train``."
)


def _doc(obj):
    obj.__doc__ = obj.__doc__.replace("{sign_and_scale}", SIGN_AND_SCALE)
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


class InfluenceScorer(BaseEstimator):
    """Base class of the influence scorers; use one of its subclasses.

    Subclasses define ``__init__`` (storing their arguments) and ``_make_solver``.
    """

    _parameter_constraints: ClassVar[dict] = {
        "estimator": "no_validation",
        "loss": [None, callable],
        "params": [None, str, list, tuple],
        "regularization": [Interval(Real, 0, None, closed="left")],
        "mode": [StrOptions({"up", "perturbation"})],
        "hessian": [StrOptions({"exact", "gauss-newton"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "dtype": "no_validation",
        "device": [None, str, torch.device],
        "progress": ["boolean"],
    }

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

    def _more_tags(self):  # sklearn < 1.6
        return {"requires_y": True, "non_deterministic": False}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def _make_solver(self):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ checks
    def _check_X(self, X, name):
        X = check_array(X, allow_nd=True, dtype="numeric", input_name=name)
        if hasattr(self, "x_shape_") and tuple(X.shape[1:]) != self.x_shape_:
            raise ValueError(
                f"{name} has samples of shape {tuple(X.shape[1:])} "
                f"({X.shape[1]} features), but {type(self).__name__} was fitted on "
                f"samples of shape {self.x_shape_} ({self.n_features_in_} features)."
            )
        return X

    def _check_y(self, y, n, name, xname):
        y = check_array(y, ensure_2d=False, dtype=None, input_name=name, ensure_all_finite=True)
        if y.dtype.kind in "fc" and not np.isfinite(y).all():
            raise ValueError(f"Input {name} contains NaN or infinity.")
        if y.shape[0] != n:
            raise ValueError(
                f"{name} has {y.shape[0]} samples but {xname} has {n}; pass one target "
                "per sample."
            )
        return y

    def _targets(self, Xt, y, name):
        if y is None:
            return self.adapter_.predicted_targets(Xt)
        return self.adapter_.targets(y, name)

    def _data(self, X, y, xname, yname):
        """Validated tensors (X, Y); (None, None) means the training data."""
        if X is None:
            if y is not None:
                raise ValueError(f"{yname} was given without {xname}; pass both or neither.")
            return self.X_train_, self.y_train_
        X = self._check_X(X, xname)
        if y is not None:
            y = self._check_y(y, X.shape[0], yname, xname)
        Xt = self.adapter_.features(X)
        with self.adapter_.eval_mode():
            return Xt, self._targets(Xt, y, yname)

    # ------------------------------------------------------------------ fit
    def fit(self, X, y):
        """Build the curvature approximation over the training data.

        Parameters
        ----------
        X : array-like of shape (n_train, n_features) or (n_train, ...)
            The data the model was trained on.
        y : array-like of shape (n_train,) or (n_train, n_targets)
            Its targets (class labels for classifiers).

        Returns
        -------
        self : object
            The fitted scorer.
        """
        self._validate_params()
        X = check_array(X, allow_nd=True, dtype="numeric", input_name="X")
        y = self._check_y(y, X.shape[0], "y", "X")
        adapter = build_adapter(
            self.estimator, loss=self.loss, params=self.params, dtype=self.dtype,
            device=self.device,
        )
        Xt = adapter.features(X)
        adapter.bind(Xt, X.shape[0])
        Yt = adapter.targets(y, "y")
        operator = CurvatureOperator(
            adapter, Xt, Yt, self.hessian, float(self.regularization), int(self.batch_size)
        )
        progress = _progress(self.progress)
        with adapter.eval_mode():
            solver = self._make_solver().fit(operator, progress=progress)
        self.adapter_ = adapter
        self.solver_ = solver
        self.X_train_, self.y_train_ = Xt, Yt
        self.x_shape_ = tuple(X.shape[1:])
        self.n_features_in_ = int(X.shape[1])
        self.n_train_ = int(X.shape[0])
        self.n_params_ = adapter.n_params
        if adapter.target_kind in (CLASS_INDEX, BINARY):
            self.classes_ = adapter.classes
        return self

    # ------------------------------------------------------------------ core
    def _grads(self, X, Y):
        with self.adapter_.eval_mode():
            return per_sample_grads(self.adapter_, X, Y)

    def _factors(self, X, Y, progress=None):
        """``A^-1 g`` for each sample, (n, p) tensor."""
        out = []
        for s in _iterate(progress, list(batch_slices(X.shape[0], self.batch_size)), "factors"):
            out.append(self.solver_.solve(self._grads(X[s], Y[s])))
        return torch.cat(out) if out else torch.zeros(0, self.n_params_, dtype=self.adapter_.dtype)

    def _numpy(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu").numpy()

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
            One row per sample; ``factors @ grad l(train_j)`` is its influence row.
        """
        check_is_fitted(self)
        X, Y = self._data(X, y, "X", "y")
        with self.adapter_.eval_mode():
            return self._numpy(self._factors(X, Y, _progress(self.progress)))

    @_doc
    def influences(self, X_test, y_test=None, X=None, y=None):
        """Influence of each training point on each test point.

        {sign_and_scale}

        In ``mode="perturbation"`` the entry is a vector: the derivative of ``I[i, j]``
        with respect to the features of training point j, i.e. how the test loss
        responds when training point j is moved.

        Parameters
        ----------
        X_test : array-like of shape (n_test, n_features)
            Points whose loss is influenced.
        y_test : array-like of shape (n_test,), default=None
            Their targets; None uses the model's predicted class (classifiers only).
        X, y : array-like, default=None
            Training points to score; None uses the data given to ``fit``.

        Returns
        -------
        I : ndarray of shape (n_test, n_train) or (n_test, n_train, n_features)
            The influence matrix ("up") or tensor ("perturbation").
        """
        check_is_fitted(self)
        Xte, Yte = self._data(X_test, y_test, "X_test", "y_test")
        Xtr, Ytr = self._data(X, y, "X", "y")
        progress = _progress(self.progress)
        a = self.adapter_
        with a.eval_mode():
            F = self._factors(Xte, Yte)
            blocks = []
            for s in _iterate(progress, list(batch_slices(Xtr.shape[0], self.batch_size)), "influences"):
                if self.mode == "up":
                    blocks.append(F @ per_sample_grads(a, Xtr[s], Ytr[s]).T)
                else:
                    J = mixed_projection(a, Xtr[s], Ytr[s], F)  # (b, m, *x)
                    blocks.append(J.transpose(0, 1))
            if not blocks:
                return np.zeros((Xte.shape[0], 0) + (() if self.mode == "up" else self.x_shape_))
            return self._numpy(torch.cat(blocks, 1))

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

    def fit_transform(self, X, y):
        """Fit on (X, y), then return the influences of the training points on themselves.

        Returns
        -------
        I : ndarray of shape (n_train, n_train) or (n_train, n_train, n_features)
            Pairwise training influences; its diagonal is :meth:`self_influence`.
        """
        return self.fit(X, y).influences(X, y)

    @_doc
    def self_influence(self, X=None, y=None):
        """Influence of each point on its own loss, without forming the pairwise matrix.

        {sign_and_scale} Self-influence is the diagonal ``I[j, j]``: large values mark
        points the model finds hard to fit, often mislabelled ones.

        Parameters
        ----------
        X, y : array-like, default=None
            Points to score; None uses the data given to ``fit``.

        Returns
        -------
        s : ndarray of shape (n_samples,) or (n_samples, n_features)
            In "perturbation" mode, the derivative of ``I[j, j]`` with respect to the
            features of the training copy of point j.
        """
        check_is_fitted(self)
        X, Y = self._data(X, y, "X", "y")
        a = self.adapter_
        progress = _progress(self.progress)
        out = []
        with a.eval_mode():
            for s in _iterate(progress, list(batch_slices(X.shape[0], self.batch_size)), "self-influence"):
                G = per_sample_grads(a, X[s], Y[s])
                F = self.solver_.solve(G)
                if self.mode == "up":
                    out.append((F * G).sum(1))
                else:
                    out.append(_self_perturbation(a, X[s], Y[s], F))
        if not out:
            return np.zeros((0,) if self.mode == "up" else (0, *self.x_shape_))
        return self._numpy(torch.cat(out))


def _self_perturbation(adapter, X, Y, F):
    """d/dx of f_j . grad_theta l(x, y_j) at x = x_j, for each j with its own f_j."""

    def one(x, y, f):
        def proj(xx):
            return f @ adapter.flatten(grad(adapter.sample_loss)(adapter.params, xx, y))

        return grad(proj)(x)

    return vmap(one)(X, Y, F)


_SCORER_PARAMS = """
    estimator : fitted model, default=None
        A fitted skorch net (``NeuralNetClassifier``, ``NeuralNetBinaryClassifier``,
        ``NeuralNetRegressor``), a torch ``nn.Module`` together with ``loss``, or a
        fitted sklearn ``LogisticRegression``, ``Ridge`` or ``LinearRegression``. The
        model is never modified; it is evaluated in eval mode and handed back in the
        mode it came in.
    loss : callable, default=None
        Mean-reduced ``loss(output, target)`` for a torch module (e.g.
        ``torch.nn.functional.cross_entropy``). None uses the estimator's own loss
        (skorch's criterion, with NLLLoss applied to log-probabilities exactly as
        ``NeuralNetClassifier.get_loss`` does).
    params : str or list of str, default=None
        Parameter names or module prefixes to differentiate (e.g. ``"fc2"`` for a
        last layer); the others are held fixed. None uses every parameter that
        requires gradients.
    regularization : float, default=0.01
        lambda added to the curvature, in the units of torch's ``weight_decay``. For
        sklearn linear models the model's own L2 penalty is already included, so 0
        gives the Hessian of the model's objective.
    mode : {"up", "perturbation"}, default="up"
        "up": influence of upweighting (removing) a training point. "perturbation":
        its derivative with respect to the training point's features.
    hessian : {"exact", "gauss-newton"}, default="exact"
        The curvature: the Hessian, or the generalized Gauss-Newton matrix (positive
        semi-definite, useful for non-convex networks).
    batch_size : int, default=256
        Samples per step of every computation; bounds peak memory.
    dtype : {None, "float32", "float64"}, default=None
        Working precision; None keeps the model's. float64 for accuracy checks.
    device : str or torch.device, default=None
        Where to compute; None uses the model's device. Results are numpy on the CPU.
    progress : bool, default=False
        Show tqdm progress bars on long loops."""


_SCORER_ATTRS = """
    adapter_ : object
        The fitted model seen as a function of its parameters.
    solver_ : object
        The fitted curvature solver.
    n_train_ : int
        Number of training points given to ``fit``.
    n_features_in_ : int
        Number of features of the training data.
    n_params_ : int
        Number of parameters taken into account.
    classes_ : ndarray
        Class labels (classifiers only)."""


class DirectInfluenceScorer(InfluenceScorer):
    __doc__ = f"""Influence functions with the exact inverse curvature.

    Forms the p x p Hessian (or Gauss-Newton matrix) of the mean training loss, adds
    the estimator's penalty and ``regularization``, and factorises it by Cholesky. The
    reference method: exact, affordable up to a few thousand parameters.

    {SIGN_AND_SCALE}

    Memory: the p x p matrix and its Cholesky factor, plus ``batch_size`` samples'
    gradients at a time, plus the test points' factors (n_test x p) while
    computing influences.

    Parameters
    ----------{_SCORER_PARAMS}

    Attributes
    ----------{_SCORER_ATTRS}

    Raises
    ------
    NotPositiveDefiniteError
        From ``fit``, when the curvature plus ``regularization`` is not positive
        definite; the message suggests a regularization that is.

    Examples
    --------
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
    (200,)
    """

    def __init__(
        self,
        estimator=None,
        *,
        loss=None,
        params=None,
        regularization=0.01,
        mode="up",
        hessian="exact",
        batch_size=256,
        dtype=None,
        device=None,
        progress=False,
    ):
        self.estimator = estimator
        self.loss = loss
        self.params = params
        self.regularization = regularization
        self.mode = mode
        self.hessian = hessian
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.progress = progress

    def _make_solver(self):
        return DirectSolver()


def _param_entries(fragment: str) -> dict:
    """Split a numpydoc parameter fragment into its entries, by parameter name."""
    import re

    parts = re.split(r"\n    (?=\w+ :)", fragment)
    return {p.split(" :")[0].strip(): "\n    " + p.strip("\n") for p in parts if p.strip()}


_EKFAC_ENTRIES = _param_entries(_SCORER_PARAMS)
_EKFAC_PARAMS = "".join(
    [_EKFAC_ENTRIES[k] for k in ("estimator", "loss", "params", "regularization")]
    + [
        """
    update_diagonal : bool, default=True
        Refit the eigenvalues in the Kronecker eigenbasis from per-sample gradients
        (EK-FAC). False keeps the products of the factors' eigenvalues (K-FAC).
    fisher : {"true", "gauss-newton", "empirical"}, default="true"
        Output gradients the factors are built from. "true": labels sampled from the
        model's predictive distribution (softmax for cross-entropy and skorch's NLL on
        probabilities, Bernoulli for binary cross-entropy, Gaussian for MSE), one per
        sample, seeded by ``random_state``. "gauss-newton": the exact expectation over
        that distribution, from a square root of the loss's Hessian with respect to the
        model output (one backward pass per output; any twice-differentiable loss);
        it equals the Gauss-Newton matrix whenever that is Kronecker-factored, e.g. a
        single linear layer with MSE loss. "empirical": the given labels.
    layers : str or list of str, default=None
        Names of the ``nn.Linear`` / ``nn.Conv2d`` modules to take into account, as in
        ``model.named_modules()``; the parameters of other modules are held fixed.
        None takes every module holding a selected parameter, and raises an error
        listing any that is neither Linear nor Conv2d.""",
        _EKFAC_ENTRIES["mode"],
    ]
    + [_EKFAC_ENTRIES[k] for k in ("batch_size", "dtype", "device", "progress")]
    + [
        """
    random_state : int, RandomState instance or None, default=None
        Seeds the labels sampled for ``fisher="true"``."""
    ]
)
