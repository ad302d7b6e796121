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
from ._gradients import batch_slices, influence_blocks, per_sample_grads
from .solvers import (
    ArnoldiSolver,
    CgSolver,
    CurvatureOperator,
    DirectSolver,
    LissaSolver,
    NystroemSolver,
)
from .solvers.ekfac import EkfacSolver, select_layers

__all__ = [
    "ArnoldiInfluenceScorer",
    "CgInfluenceScorer",
    "DirectInfluenceScorer",
    "EkfacInfluenceScorer",
    "InfluenceScorer",
    "LissaInfluenceScorer",
    "NystroemInfluenceScorer",
]

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

    Subclasses define ``__init__`` (storing their arguments) and ``_make_solver``,
    which returns a solver with ``fit(operator)`` and ``solve(G)``.

    Examples
    --------
    A new method is a solver plus a scorer declaring its parameters:

    >>> from skinfluence import DirectInfluenceScorer, InfluenceScorer
    >>> from skinfluence.solvers import DirectSolver
    >>> class MyScorer(InfluenceScorer):
    ...     def __init__(self, estimator=None, *, loss=None, params=None,
    ...                  regularization=0.01, mode="up", hessian="exact",
    ...                  batch_size=256, dtype=None, device=None, progress=False):
    ...         self.estimator, self.loss, self.params = estimator, loss, params
    ...         self.regularization, self.mode, self.hessian = regularization, mode, hessian
    ...         self.batch_size, self.dtype, self.device = batch_size, dtype, device
    ...         self.progress = progress
    ...     def _make_solver(self):
    ...         return DirectSolver()
    >>> sorted(MyScorer().get_params())[:3]
    ['batch_size', 'device', 'dtype']
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
        adapter = self._build_adapter()
        Xt = adapter.features(X)
        adapter.bind(Xt, X.shape[0])
        Yt = adapter.targets(y, "y")
        operator = CurvatureOperator(
            adapter, Xt, Yt, self._curvature(), float(self.regularization), int(self.batch_size)
        )
        with adapter.eval_mode():
            solver = self._make_solver().fit(operator, progress=_progress(self.progress))
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

    def _build_adapter(self):
        """The model adapter for ``estimator``; subclasses may narrow its parameters."""
        return build_adapter(
            self.estimator, loss=self.loss, params=self.params, dtype=self.dtype,
            device=self.device,
        )

    def _curvature(self) -> str:
        """Which curvature the solver approximates."""
        return self.hessian

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
        a = self.adapter_
        with a.eval_mode():
            F = self._factors(Xte, Yte)
            I = influence_blocks(
                a, F, Xtr, Ytr, self.mode, self.batch_size, _progress(self.progress)
            )
        return self._numpy(I)

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
    basis_iter : int, default=2
        With ``update_diagonal=True``: alternating updates that move each layer's
        two factors towards the nearest Kronecker product (in Frobenius norm) of its
        curvature block before their eigenbasis is taken. K-FAC's factors treat
        activations and output gradients as independent; each update reweights one
        factor's covariance by the other's quadratic form, which corrects for their
        dependence and gives a basis in which the refitted diagonal is closer to the
        curvature. Each update costs two passes over data that are usually kept in
        memory from the first pass. 0 keeps the eigenbasis of the K-FAC factors
        (George et al., 2018, and pyDVL).
    fisher : {"gauss-newton", "true", "empirical"}, default="gauss-newton"
        Output gradients the factors are built from. "gauss-newton": the expectation
        over the model's predictive distribution, computed exactly from a square root
        of the loss's Hessian with respect to the model output (one backward pass per
        output, e.g. per class; any twice-differentiable loss); the factors are then
        those of the Gauss-Newton matrix, and equal it whenever it is
        Kronecker-factored (a single linear layer with MSE loss). "true": one label per
        sample drawn from the predictive distribution (softmax for cross-entropy and
        skorch's NLL on probabilities, Bernoulli for binary cross-entropy, Gaussian for
        MSE), seeded by ``random_state``: an unbiased, noisier estimate at the cost of
        one backward pass, for models with many outputs. "empirical": the given
        labels.
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


class EkfacInfluenceScorer(InfluenceScorer):
    __doc__ = f"""Influence functions with EK-FAC, Kronecker-factored curvature per layer.

    The curvature is block diagonal over the model's ``nn.Linear`` and ``nn.Conv2d``
    layers. Each block is approximated by the Kronecker product of the covariance of
    the layer's input activations (a 1 appended for the bias) and that of the
    gradients with respect to its output (K-FAC; KFC for convolutions, over unfolded
    patches); with ``update_diagonal=True`` its eigenvalues are refitted from
    per-sample gradients projected on the Kronecker eigenbasis (EK-FAC, George et al.
    2018), after the factors have been moved towards the nearest Kronecker product of
    the block (``basis_iter``), which gives a better basis. ``regularization`` is
    added to those eigenvalues, as in pyDVL's ``EkfacInfluence``, together with the
    diagonal of the estimator's own L2 penalty in the same basis. The factors take
    ``2 + 2 * basis_iter`` passes over the training data (all but the first over
    activations kept in memory when they fit), and influences need no
    Hessian-vector products.

    {SIGN_AND_SCALE} Here H is the EK-FAC approximation of the Gauss-Newton (Fisher)
    matrix, block diagonal over layers; on a non-convex model it differs from the
    Hessian that :class:`DirectInfluenceScorer` uses by default.

    Convolutions follow KFC (Grosse & Martens, 2016): the activation factor is
    averaged over output positions and the gradient factor summed over them, so
    that plain K-FAC has the scale of the Fisher when output gradients are
    spatially uncorrelated.

    Memory: per layer, the two factors and their eigenvectors plus ``d_out x d_in``
    eigenvalues; while computing influences, the test points' preconditioned
    gradients (n_test x p). Training gradients of a layer applied once per sample
    are never formed: the test factors are contracted with the batch's activations
    and output gradients; convolutions form ``batch_size`` gradients at a time.

    Parameters
    ----------{_EKFAC_PARAMS}

    Attributes
    ----------{_SCORER_ATTRS}
    layers_ : list of str
        Names of the modules whose parameters are taken into account.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skorch import NeuralNetClassifier
    >>> from skinfluence import EkfacInfluenceScorer
    >>> X, y = load_digits(return_X_y=True)
    >>> X, y = (X / 16).astype(np.float32), y.astype(np.int64)
    >>> _ = torch.manual_seed(0)
    >>> module = torch.nn.Sequential(
    ...     torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    >>> net = NeuralNetClassifier(
    ...     module, criterion=torch.nn.CrossEntropyLoss, max_epochs=20, lr=0.1,
    ...     train_split=None, verbose=0).fit(X[:300], y[:300])
    >>> scorer = EkfacInfluenceScorer(net, regularization=0.1)
    >>> scorer = scorer.fit(X[:300], y[:300])
    >>> scorer.influences(X[300:310], y[300:310]).shape
    (10, 300)
    >>> by_layer = scorer.influences_by_layer(X[300:310], y[300:310])
    >>> sorted(by_layer)
    ['0', '2']
    >>> bool(np.allclose(sum(by_layer.values()), scorer.influences(X[300:310], y[300:310]),
    ...                  rtol=1e-4, atol=1e-6))
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        **InfluenceScorer._parameter_constraints,
        "update_diagonal": ["boolean"],
        "basis_iter": [Interval(Integral, 0, None, closed="left")],
        "fisher": [StrOptions({"true", "gauss-newton", "empirical"})],
        "layers": [None, str, list, tuple],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator=None,
        *,
        loss=None,
        params=None,
        regularization=0.01,
        update_diagonal=True,
        basis_iter=2,
        fisher="gauss-newton",
        layers=None,
        mode="up",
        batch_size=256,
        dtype=None,
        device=None,
        progress=False,
        random_state=None,
    ):
        self.estimator = estimator
        self.loss = loss
        self.params = params
        self.regularization = regularization
        self.update_diagonal = update_diagonal
        self.basis_iter = basis_iter
        self.fisher = fisher
        self.layers = layers
        self.mode = mode
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.progress = progress
        self.random_state = random_state

    def _make_solver(self):
        return EkfacSolver(
            layers=self.layers_, fisher=self.fisher, update_diagonal=self.update_diagonal,
            basis_iter=self.basis_iter, random_state=self.random_state,
        )

    def _build_adapter(self):
        kw = {"loss": self.loss, "dtype": self.dtype, "device": self.device}
        adapter = build_adapter(self.estimator, params=self.params, **kw)
        layers, names = select_layers(adapter.module, adapter.param_names, self.layers)
        if names != adapter.param_names:  # parameters of left-out layers are held fixed
            adapter = build_adapter(self.estimator, params=names, **kw)
        self.layers_ = layers
        return adapter

    def _curvature(self) -> str:
        return "gauss-newton"

    def fit(self, X, y):
        """Compute the Kronecker factors, their eigenbases and eigenvalues.

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
        return super().fit(X, y)

    def _test_factors(self, X, Y, progress=None) -> dict:
        parts = {name: [] for name in self.layers_}
        for s in _iterate(progress, list(batch_slices(X.shape[0], self.batch_size)), "factors"):
            for name, v in self.solver_.test_factors(X[s], Y[s]).items():
                parts[name].append(v)
        return {
            lay.name: torch.cat(parts[lay.name]) if parts[lay.name]
            else torch.zeros(0, lay.d_out, lay.d_in, dtype=self.adapter_.dtype, device=self.adapter_.device)
            for lay in self.solver_.layers_
        }

    def _pairwise(self, X_test, y_test, X, y, by_layer: bool):
        check_is_fitted(self)
        Xte, Yte = self._data(X_test, y_test, "X_test", "y_test")
        Xtr, Ytr = self._data(X, y, "X", "y")
        progress = _progress(self.progress)
        blocks = {name: [] for name in self.layers_} if by_layer else []
        with self.adapter_.eval_mode():
            factors = self.solver_.prepare(self._test_factors(Xte, Yte))
            steps = list(batch_slices(Xtr.shape[0], self.batch_size))
            for s in _iterate(progress, steps, "influences"):
                scores = self.solver_.pairwise(factors, Xtr[s], Ytr[s])
                if by_layer:
                    for name, v in scores.items():
                        blocks[name].append(v)
                else:
                    blocks.append(sum(scores.values()))
        empty = np.zeros((Xte.shape[0], 0))
        if by_layer:
            return {k: self._numpy(torch.cat(v, 1)) if v else empty for k, v in blocks.items()}
        return self._numpy(torch.cat(blocks, 1)) if blocks else empty

    @_doc
    def influences(self, X_test, y_test=None, X=None, y=None):
        """Influence of each training point on each test point.

        {sign_and_scale}

        In ``mode="perturbation"`` the entry is a vector: the derivative of ``I[i, j]``
        with respect to the features of training point j.

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
            The influence matrix ("up") or tensor ("perturbation"); the sum of
            :meth:`influences_by_layer` in "up" mode.
        """
        if self.mode != "up":
            return super().influences(X_test, y_test, X, y)
        return self._pairwise(X_test, y_test, X, y, by_layer=False)

    @_doc
    def influences_by_layer(self, X_test, y_test=None, X=None, y=None) -> dict:
        """Influences split by layer: the curvature is block diagonal over layers.

        {sign_and_scale} Each layer's matrix is the part of ``I`` carried by that
        layer's parameters; the matrices sum to :meth:`influences`.

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
        I : dict of str to ndarray of shape (n_test, n_train)
            One influence matrix per module name in ``layers_``.
        """
        if self.mode != "up":
            raise ValueError(
                "mode: influences_by_layer is available in mode='up'; set mode='up' or "
                "call influences()."
            )
        return self._pairwise(X_test, y_test, X, y, by_layer=True)

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
        check_is_fitted(self)
        X, Y = self._data(X, y, "X", "y")
        with self.adapter_.eval_mode():
            factors = self._test_factors(X, Y, _progress(self.progress))
        return self._numpy(self.solver_.from_layers(self.solver_.from_eigenbasis(factors)))

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
        if self.mode != "up":
            return super().self_influence(X, y)
        check_is_fitted(self)
        X, Y = self._data(X, y, "X", "y")
        out = []
        with self.adapter_.eval_mode():
            steps = list(batch_slices(X.shape[0], self.batch_size))
            for s in _iterate(_progress(self.progress), steps, "self-influence"):
                out.append(sum(self.solver_.self_scores(X[s], Y[s]).values()))
        return self._numpy(torch.cat(out)) if out else np.zeros(0)


# --------------------------------------------------------------------------- matrix-free
# The four methods below never form the p x p curvature: they only multiply it with
# blocks of vectors (batched Hessian-vector products over ``batch_size`` samples).

_MF_ENTRIES = _param_entries(_SCORER_PARAMS)
_MF_RANDOM_STATE = """
    random_state : int, RandomState instance or None, default=None
        Seeds {what}. An int gives identical results on every fit."""


def _mf_params(own: str, random_state: str | None = None) -> str:
    """The shared parameters in signature order, with a method's own after ``hessian``."""
    head = [_MF_ENTRIES[k] for k in ("estimator", "loss", "params", "regularization", "mode", "hessian")]
    tail = [_MF_ENTRIES[k] for k in ("batch_size", "dtype", "device", "progress")]
    rs = [] if random_state is None else [_MF_RANDOM_STATE.format(what=random_state)]
    return "".join([*head, own, *tail, *rs])


def _solver_attribute(scorer, name: str, when: str):
    check_is_fitted(scorer)
    try:
        return getattr(scorer.solver_, name)
    except AttributeError:
        raise AttributeError(f"{name} is available after {when}.") from None


_AFTER_SOLVE = (
    "the first call that solves a system (influences, transform, influence_factors "
    "or self_influence)"
)

_CG_PARAMS = """
    rtol, atol : float, default=1e-5, 0.0
        Stop when ``||g - A x|| <= max(rtol * ||g||, atol)`` for every right-hand side
        ``g`` (A the curvature plus penalty plus regularization).
    maxiter : int, default=None
        Most block iterations per solve; None allows ``n_params``, the number exact
        arithmetic would need at most.
    preconditioner : {None, "nystroem", "jacobi"}, default=None
        "nystroem": a randomized Nystroem sketch of rank ``rank`` removes the largest
        eigenvalues from the spectrum (Frangella, Tropp & Udell 2023). "jacobi": the
        inverse of the exact Gauss-Newton diagonal (the Gauss-Newton part of the
        Hessian's diagonal for ``hessian="exact"``), from per-sample output Jacobians.
    rank : int, default=10
        Rank of the Nystroem preconditioner."""


class CgInfluenceScorer(InfluenceScorer):
    __doc__ = f"""Influence functions by conjugate gradients, without forming the Hessian.

    Solves ``(H + lambda I) x = grad l(test)`` for all test points of a batch at once
    with block preconditioned conjugate gradients (Ji & Li 2017): the right-hand sides
    share one block Krylov space, so k of them cost about ``k * n_iter_``
    Hessian-vector products, and converged ones leave the block. Exact up to the
    tolerance; the curvature plus regularization must be positive definite.

    {SIGN_AND_SCALE}

    Memory: about six blocks of ``batch_size`` vectors of length p while solving,
    plus the preconditioner (``rank`` vectors).

    Parameters
    ----------{_mf_params(_CG_PARAMS, "the Nystroem preconditioner's sketch")}

    Attributes
    ----------{_SCORER_ATTRS}
    n_iter_ : int
        Iterations used by the most recent solve (one batch of right-hand sides).
    residuals_ : ndarray of shape (n_rhs,)
        Final relative residuals ``||g - A x|| / ||g||`` of the most recent solve.

    Warns
    -----
    ConvergenceWarning
        When a right-hand side did not reach the tolerance within ``maxiter``.

    Raises
    ------
    NotPositiveDefiniteError
        When the iteration meets negative curvature: increase ``regularization`` or
        use ``hessian="gauss-newton"``.

    Examples
    --------
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
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        **InfluenceScorer._parameter_constraints,
        "rtol": [Interval(Real, 0, None, closed="left")],
        "atol": [Interval(Real, 0, None, closed="left")],
        "maxiter": [None, Interval(Integral, 1, None, closed="left")],
        "preconditioner": [None, StrOptions({"nystroem", "jacobi"})],
        "rank": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator=None,
        *,
        loss=None,
        params=None,
        regularization=0.01,
        mode="up",
        hessian="exact",
        rtol=1e-5,
        atol=0.0,
        maxiter=None,
        preconditioner=None,
        rank=10,
        batch_size=256,
        dtype=None,
        device=None,
        progress=False,
        random_state=None,
    ):
        self.estimator = estimator
        self.loss = loss
        self.params = params
        self.regularization = regularization
        self.mode = mode
        self.hessian = hessian
        self.rtol = rtol
        self.atol = atol
        self.maxiter = maxiter
        self.preconditioner = preconditioner
        self.rank = rank
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.progress = progress
        self.random_state = random_state

    def _make_solver(self):
        return CgSolver(
            rtol=self.rtol, atol=self.atol, maxiter=self.maxiter,
            preconditioner=self.preconditioner, rank=self.rank,
            random_state=self.random_state, show_progress=self.progress,
        )

    @property
    def n_iter_(self) -> int:
        return _solver_attribute(self, "n_iter_", _AFTER_SOLVE)

    @property
    def residuals_(self) -> np.ndarray:
        return _solver_attribute(self, "residuals_", _AFTER_SOLVE)


_LISSA_PARAMS = """
    scale : "auto" or float, default="auto"
        s in ``h <- g + (1 - dampen) h - (H + lambda I) h / s``. The iteration
        converges when every eigenvalue of ``(H + lambda I) / s`` lies in (0, 2).
        "auto" starts from the largest eigenvalue ``a_max``, estimated by a few block
        Lanczos steps (``max_eigenvalue_``): with all training points per step it
        takes ``(1.05 a_max + lambda) / 2``, the scale that converges fastest when
        the curvature is positive semi-definite; with minibatches it takes
        ``1.05 a_max``, the classical LiSSA condition.
    dampen : float, default=0.0
        Shrinks the iterate each step; the result is ``(H + (lambda + dampen * s) I)^-1
        g``, so dampening is extra regularization that speeds up convergence.
    maxiter : int, default=1000
        Most iterations per solve.
    rtol : float, default=1e-4
        A right-hand side stops when its relative update ``||h_new - h|| / ||h_new||``
        falls below rtol.
    minibatch_size : int, default=None
        Training points per step, drawn without replacement (seeded by
        ``random_state``). None uses all of them: the iteration is then deterministic
        and converges linearly. A minibatch makes a step cheaper but leaves noise in
        the result that more iterations do not remove."""


class LissaInfluenceScorer(InfluenceScorer):
    __doc__ = f"""Influence functions by LiSSA, the stochastic Neumann series.

    Iterates ``h <- g + (1 - dampen) h - A_t h / scale`` from ``h = g`` and returns
    ``h / scale`` (Agarwal et al. 2017; Koh & Liang 2017), with ``A_t`` the curvature
    plus penalty plus regularization over a minibatch, or over all training points
    when ``minibatch_size`` is None. ``scale="auto"`` picks the scale from the
    largest eigenvalue, so the series converges without tuning; an iteration that
    grows stops with a :class:`~skinfluence.solvers.LissaDivergenceError` that says
    what to change, instead of running into NaN.

    {SIGN_AND_SCALE}

    Memory: three blocks of ``batch_size`` vectors of length p while solving.

    Parameters
    ----------{_mf_params(_LISSA_PARAMS, "the Lanczos start of scale='auto' and the minibatches")}

    Attributes
    ----------{_SCORER_ATTRS}
    scale_ : float
        The scale used.
    max_eigenvalue_ : float or None
        Estimated largest eigenvalue of the curvature plus regularization (with
        ``scale="auto"``).
    n_iter_ : int
        Iterations of the slowest right-hand side in the most recent solve.
    residuals_ : ndarray of shape (n_rhs,)
        Final relative updates of the most recent solve.

    Warns
    -----
    ConvergenceWarning
        When a right-hand side did not reach ``rtol`` within ``maxiter``.

    Raises
    ------
    LissaDivergenceError
        When the iteration diverges; the message gives the scale used and the
        remedies.

    Examples
    --------
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
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        **InfluenceScorer._parameter_constraints,
        "scale": [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither")],
        "dampen": [Interval(Real, 0, 1, closed="left")],
        "maxiter": [Interval(Integral, 1, None, closed="left")],
        "rtol": [Interval(Real, 0, None, closed="left")],
        "minibatch_size": [None, Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator=None,
        *,
        loss=None,
        params=None,
        regularization=0.01,
        mode="up",
        hessian="exact",
        scale="auto",
        dampen=0.0,
        maxiter=1000,
        rtol=1e-4,
        minibatch_size=None,
        batch_size=256,
        dtype=None,
        device=None,
        progress=False,
        random_state=None,
    ):
        self.estimator = estimator
        self.loss = loss
        self.params = params
        self.regularization = regularization
        self.mode = mode
        self.hessian = hessian
        self.scale = scale
        self.dampen = dampen
        self.maxiter = maxiter
        self.rtol = rtol
        self.minibatch_size = minibatch_size
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.progress = progress
        self.random_state = random_state

    def _make_solver(self):
        return LissaSolver(
            scale=self.scale, dampen=self.dampen, maxiter=self.maxiter, rtol=self.rtol,
            minibatch_size=self.minibatch_size, random_state=self.random_state,
            show_progress=self.progress,
        )

    @property
    def scale_(self) -> float:
        return _solver_attribute(self, "scale_", "fit")

    @property
    def max_eigenvalue_(self):
        return _solver_attribute(self, "max_eigenvalue_", "fit")

    @property
    def n_iter_(self) -> int:
        return _solver_attribute(self, "n_iter_", _AFTER_SOLVE)

    @property
    def residuals_(self) -> np.ndarray:
        return _solver_attribute(self, "residuals_", _AFTER_SOLVE)


_LOW_RANK_COMPLEMENT = (
    "On the complement of that subspace the curvature is taken to be zero, so the "
    "inverse there is ``1 / regularization`` (as in pyDVL): "
    "``x = V diag(1 / (e + lambda)) V^T g + (g - V V^T g) / lambda``. "
    "``regularization`` must therefore be positive unless ``rank`` equals the number "
    "of parameters."
)

_ARNOLDI_PARAMS = """
    rank : int, default=10
        Number of eigenpairs kept: those of largest magnitude.
    krylov_dimension : int, default=None
        Most Krylov vectors (Hessian-vector products); None allows
        ``min(n_params, 4 * rank + 40)``. The iteration stops earlier once the
        ``rank`` pairs have converged.
    rtol : float, default=1e-2
        A Ritz pair ``(e, v)`` has converged when ``||(H + P) v - e v||`` is at most
        rtol times the largest eigenvalue. Eigenvalue errors shrink with the square
        of this residual: 1e-2 typically leaves them well below 1%."""


class ArnoldiInfluenceScorer(InfluenceScorer):
    __doc__ = f"""Influence functions from the top eigenpairs of the curvature (Lanczos).

    Finds the ``rank`` eigenpairs of largest magnitude of the curvature (plus the
    estimator's penalty) by block Lanczos, the symmetric form of Arnoldi's method:
    blocks of Hessian-vector products, full reorthogonalisation and a Rayleigh-Ritz
    problem in float64, stopped when the wanted pairs have converged. The inverse is
    applied exactly on their span V. {_LOW_RANK_COMPLEMENT}

    {SIGN_AND_SCALE}

    Memory: ``2 * krylov_dimension`` vectors of length p while fitting, ``rank``
    afterwards.

    Parameters
    ----------{_mf_params(_ARNOLDI_PARAMS, "the Lanczos start block")}

    Attributes
    ----------{_SCORER_ATTRS}
    eigenvalues_ : ndarray of shape (rank,)
        Eigenvalues of the curvature plus penalty (without ``regularization``), in
        decreasing order of magnitude.

    Warns
    -----
    ConvergenceWarning
        When ``krylov_dimension`` vectors did not make the pairs converge.

    Raises
    ------
    NotPositiveDefiniteError
        When a kept eigenvalue plus ``regularization`` is not positive.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import ArnoldiInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> scorer = ArnoldiInfluenceScorer(model, rank=5, regularization=0.01, random_state=0)
    >>> scorer = scorer.fit(X[:200], y[:200])
    >>> scorer.eigenvalues_.shape
    (5,)
    >>> bool(np.all(np.diff(scorer.eigenvalues_) <= 0))
    True
    >>> scorer.influences(X[200:210], y[200:210]).shape
    (10, 200)
    """

    _parameter_constraints: ClassVar[dict] = {
        **InfluenceScorer._parameter_constraints,
        "rank": [Interval(Integral, 1, None, closed="left")],
        "krylov_dimension": [None, Interval(Integral, 1, None, closed="left")],
        "rtol": [Interval(Real, 0, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator=None,
        *,
        loss=None,
        params=None,
        regularization=0.01,
        mode="up",
        hessian="exact",
        rank=10,
        krylov_dimension=None,
        rtol=1e-2,
        batch_size=256,
        dtype=None,
        device=None,
        progress=False,
        random_state=None,
    ):
        self.estimator = estimator
        self.loss = loss
        self.params = params
        self.regularization = regularization
        self.mode = mode
        self.hessian = hessian
        self.rank = rank
        self.krylov_dimension = krylov_dimension
        self.rtol = rtol
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.progress = progress
        self.random_state = random_state

    def _make_solver(self):
        return ArnoldiSolver(
            rank=self.rank, krylov_dimension=self.krylov_dimension, rtol=self.rtol,
            random_state=self.random_state,
        )

    @property
    def eigenvalues_(self) -> np.ndarray:
        return _solver_attribute(self, "eigenvalues_", "fit").cpu().numpy()


_NYSTROEM_PARAMS = """
    rank : int, default=10
        Size of the sketch: Hessian-vector products taken while fitting."""


class NystroemInfluenceScorer(InfluenceScorer):
    __doc__ = f"""Influence functions from a randomized Nystroem sketch of the curvature.

    One block of ``rank`` Hessian-vector products with a random Gaussian test matrix
    gives a rank-``rank`` approximation ``V diag(e) V^T`` of the curvature (plus the
    estimator's penalty), built by the numerically stable construction of Tropp et
    al. (2017); the inverse follows from the Woodbury identity. The cheapest method
    here to fit. {_LOW_RANK_COMPLEMENT} The sketch assumes a positive semi-definite
    curvature: negative curvature (an exact Hessian away from a minimum) is clipped
    to zero, so prefer ``hessian="gauss-newton"`` for non-convex models.

    {SIGN_AND_SCALE}

    Memory: ``rank`` vectors of length p (two blocks while fitting).

    Parameters
    ----------{_mf_params(_NYSTROEM_PARAMS, "the Gaussian test matrix")}

    Attributes
    ----------{_SCORER_ATTRS}
    eigenvalues_ : ndarray of shape (rank,)
        Eigenvalues of the sketch (without ``regularization``), in decreasing order.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import DirectInfluenceScorer, NystroemInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> sketch = NystroemInfluenceScorer(model, rank=31, random_state=0).fit(X[:200], y[:200])
    >>> exact = DirectInfluenceScorer(model).fit(X[:200], y[:200])
    >>> I, J = sketch.influences(X[200:210], y[200:210]), exact.influences(X[200:210], y[200:210])
    >>> bool(np.allclose(I, J, rtol=1e-3, atol=1e-3 * np.abs(J).max()))
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        **InfluenceScorer._parameter_constraints,
        "rank": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator=None,
        *,
        loss=None,
        params=None,
        regularization=0.01,
        mode="up",
        hessian="exact",
        rank=10,
        batch_size=256,
        dtype=None,
        device=None,
        progress=False,
        random_state=None,
    ):
        self.estimator = estimator
        self.loss = loss
        self.params = params
        self.regularization = regularization
        self.mode = mode
        self.hessian = hessian
        self.rank = rank
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.progress = progress
        self.random_state = random_state

    def _make_solver(self):
        return NystroemSolver(rank=self.rank, random_state=self.random_state)

    @property
    def eigenvalues_(self) -> np.ndarray:
        return _solver_attribute(self, "eigenvalues_", "fit").cpu().numpy()
