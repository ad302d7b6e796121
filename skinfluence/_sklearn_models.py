"""Adapters for fitted scikit-learn models: each becomes a torch module, its loss and
the L2 penalty of its own objective (divided by the number of training points), so
that the Hessian of the mean training loss plus that penalty is the Hessian of the
objective the estimator minimised.

Supported: ``LogisticRegression``, ``Ridge``, ``LinearRegression``,
``SGDClassifier(loss="log_loss")``, ``MLPClassifier``, ``MLPRegressor``, and a fitted
``Pipeline`` whose last step is any supported model (its earlier steps transform X).
"""

from __future__ import annotations

import numbers
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_array, check_is_fitted
from torch import nn

from ._adapters import (
    BINARY,
    CLASS_INDEX,
    REGRESSION,
    ModelAdapter,
    Penalty,
    _FirstOutput,
    _FlatLogit,
    _MeanSquaredError,
    _ReshapeTarget,
    resolve_dtype,
)

__all__ = ["build_sklearn_adapter"]


def build_sklearn_adapter(estimator, *, loss=None, params=None, dtype=None, device=None):
    """The adapter of a supported fitted sklearn estimator, or None if unsupported."""
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge, SGDClassifier
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        return _from_pipeline(estimator, loss, params, dtype, device)
    if isinstance(estimator, LogisticRegression):
        return _from_logistic(estimator, loss, params, dtype, device)
    if isinstance(estimator, (Ridge, LinearRegression)):
        return _from_linear_regression(estimator, loss, params, dtype, device)
    if isinstance(estimator, SGDClassifier):
        return _from_sgd_classifier(estimator, loss, params, dtype, device)
    if isinstance(estimator, (MLPClassifier, MLPRegressor)):
        return _from_mlp(estimator, loss, params, dtype, device)
    return None


def _check_sklearn_fitted(est) -> None:
    try:
        check_is_fitted(est)
    except NotFittedError as exc:
        raise NotFittedError(
            f"estimator: this {type(est).__name__} is not fitted yet; call fit on it "
            "before computing influences."
        ) from exc


def _linear_module(coef: np.ndarray, intercept, dtype) -> nn.Linear:
    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    lin = nn.Linear(coef.shape[1], coef.shape[0], bias=True).to(torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(coef))
        b = np.zeros(coef.shape[0]) if np.isscalar(intercept) and intercept == 0 else intercept
        lin.bias.copy_(torch.as_tensor(np.array(np.broadcast_to(np.asarray(b, np.float64), (coef.shape[0],)))))
    lin.requires_grad_(True)
    return lin.to(resolve_dtype(dtype) or torch.float64)


def _weight_bias_diag(adapter: ModelAdapter, weight_value: float, bias_value: float):
    parts = []
    for n, k in zip(adapter.param_names, adapter.sizes, strict=False):
        parts.append(torch.full((k,), weight_value if n == "weight" else bias_value, dtype=torch.float64))
    return torch.cat(parts)


class _LogisticPenalty:
    """L2 penalty of an sklearn LogisticRegression divided by n_train, or by the sum
    of the sample weights: ``C sum_i s_i l_i + ||w||^2 / 2`` is ``C sum(s)`` times
    the weighted mean loss plus ``||w||^2 / (2 C sum(s))`` (picklable)."""

    def __init__(self, C, fit_intercept, liblinear, intercept_scaling, multinomial):
        self.C, self.fit_intercept = C, fit_intercept
        self.liblinear, self.intercept_scaling = liblinear, intercept_scaling
        self.multinomial = multinomial

    def __call__(self, adapter: ModelAdapter, n_train: int, weight_sum: float | None = None) -> Penalty:
        total = n_train if weight_sum is None else weight_sum
        w = 0.0 if not np.isfinite(self.C) else 1.0 / (self.C * total)
        b = w / self.intercept_scaling**2 if (self.liblinear and self.fit_intercept) else 0.0
        diag = _weight_bias_diag(adapter, w, b)
        rank_one = []
        if "bias" in adapter.param_names and self.multinomial and self.fit_intercept and b == 0.0:
            # Adding the same constant to every class's intercept leaves the softmax
            # unchanged: a null direction of the objective. Every loss gradient is
            # orthogonal to it, so any positive curvature there leaves influences
            # exactly equal to those of the pseudo-inverse; use 1.
            k = adapter.sizes[adapter.param_names.index("bias")]
            u = torch.zeros(adapter.n_params, dtype=torch.float64)
            start = sum(adapter.sizes[: adapter.param_names.index("bias")])
            u[start : start + k] = 1.0 / np.sqrt(k)
            rank_one.append((1.0, u))
        return Penalty(diag if bool((diag != 0).any()) else None, rank_one)


def _from_logistic(est, loss, params, dtype, device) -> ModelAdapter:
    _check_sklearn_fitted(est)
    if loss is not None:
        raise ValueError("loss: an sklearn LogisticRegression brings its own loss; leave loss=None.")
    l1_ratio = getattr(est, "l1_ratio", 0.0) or 0.0
    penalty = getattr(est, "penalty", "l2")
    if penalty in ("l1", "elasticnet") or (penalty in ("l2", "deprecated") and l1_ratio > 0):
        raise ValueError(
            "estimator: influence needs a twice-differentiable objective; this "
            "LogisticRegression uses an L1 penalty. Refit it with l1_ratio=0 (L2)."
        )
    if est.class_weight is not None:
        raise ValueError(
            "estimator: LogisticRegression(class_weight=...) weights the loss per class, "
            "which influences do not model yet; refit with class_weight=None."
        )
    C = np.inf if penalty is None or penalty == "none" else float(est.C)
    classes = np.asarray(est.classes_)
    binary = len(classes) == 2
    if not est.fit_intercept:
        module = _linear_module(est.coef_, 0.0, dtype)
        module.bias.requires_grad_(False)
    else:
        module = _linear_module(est.coef_, est.intercept_, dtype)
    if binary:
        output_loss, kind = _ReshapeTarget(F.binary_cross_entropy_with_logits), BINARY
        transform = _FirstOutput(_FlatLogit())
    else:
        output_loss, kind, transform = F.cross_entropy, CLASS_INDEX, _FirstOutput()
    factory = _LogisticPenalty(
        C, est.fit_intercept, est.solver == "liblinear", float(est.intercept_scaling), not binary
    )
    adapter = ModelAdapter(
        module, output_loss, target_kind=kind, output_transform=transform, classes=classes,
        label_map=True, penalty_factory=factory, params=params, dtype=dtype, device=device,
    )
    return adapter


class _RidgePenalty:
    """alpha ||W||^2 of Ridge, on the (weighted) mean squared error scale (picklable)."""

    def __init__(self, alpha, n_targets):
        self.alpha, self.n_targets = alpha, n_targets

    def __call__(self, adapter: ModelAdapter, n_train: int, weight_sum: float | None = None) -> Penalty:
        if self.alpha == 0:
            return Penalty()
        # objective/(n k) = mean_i mean_k (y - f)^2 + alpha/(n k) ||W||^2, with the
        # sum of the sample weights in place of n when they are given
        total = n_train if weight_sum is None else weight_sum
        w = 2.0 * self.alpha / (total * self.n_targets)
        return Penalty(_weight_bias_diag(adapter, w, 0.0), [])


def _from_linear_regression(est, loss, params, dtype, device) -> ModelAdapter:
    from sklearn.linear_model import Ridge

    _check_sklearn_fitted(est)
    if loss is not None:
        raise ValueError("loss: an sklearn linear model brings its own loss; leave loss=None.")
    alpha = 0.0
    if isinstance(est, Ridge):
        if not isinstance(est.alpha, numbers.Number):
            raise ValueError("estimator: Ridge with one alpha per target is not supported.")
        alpha = float(est.alpha)
    coef = np.atleast_2d(est.coef_)
    module = _linear_module(coef, est.intercept_ if est.fit_intercept else 0.0, dtype)
    if not est.fit_intercept:
        module.bias.requires_grad_(False)
    return ModelAdapter(
        module, _ReshapeTarget(_MeanSquaredError()), target_kind=REGRESSION,
        penalty_factory=_RidgePenalty(alpha, coef.shape[0]), params=params, dtype=dtype,
        device=device,
    )


# --------------------------------------------------------------------------- SGDClassifier


class _OneVsRestLogLoss:
    """Sum over classes of the binary log-loss of each class against the rest.

    SGDClassifier fits one binary logistic model per class; the sum of their
    objectives is what the multiclass estimator minimised.
    """

    def __call__(self, out, y):
        # one-hot by comparison: F.one_hot reads its values, which vmap forbids
        classes = torch.arange(out.shape[-1], device=out.device)
        target = (y.unsqueeze(-1) == classes).to(out.dtype)
        return F.binary_cross_entropy_with_logits(out, target, reduction="sum") / out.shape[0]


class _SGDPenalty:
    """``alpha/2 ||W||^2`` of SGDClassifier: already on the mean-loss scale (picklable).

    With sample weights SGD minimises ``sum_i s_i l_i / n + alpha/2 ||W||^2``, which is
    ``sum(s) / n`` times the weighted mean loss plus ``alpha n / (2 sum(s)) ||W||^2``.
    """

    def __init__(self, alpha):
        self.alpha = alpha

    def __call__(self, adapter: ModelAdapter, n_train: int, weight_sum: float | None = None) -> Penalty:
        if self.alpha == 0:
            return Penalty()
        scale = 1.0 if weight_sum is None else n_train / weight_sum
        return Penalty(_weight_bias_diag(adapter, self.alpha * scale, 0.0), [])


def _from_sgd_classifier(est, loss, params, dtype, device) -> ModelAdapter:
    _check_sklearn_fitted(est)
    if loss is not None:
        raise ValueError("loss: an sklearn SGDClassifier brings its own loss; leave loss=None.")
    if est.loss != "log_loss":
        raise ValueError(
            f"estimator: SGDClassifier(loss={est.loss!r}) is not supported; influence needs "
            "a twice-differentiable loss. Refit with loss='log_loss' (logistic regression)."
        )
    if est.penalty in ("l1", "elasticnet"):
        raise ValueError(
            f"estimator: SGDClassifier(penalty={est.penalty!r}) has an L1 term, which is not "
            "twice differentiable; refit with penalty='l2' (or penalty=None)."
        )
    if est.class_weight is not None:
        raise ValueError(
            "estimator: SGDClassifier(class_weight=...) weights the loss per class, which "
            "influences do not model yet; refit with class_weight=None."
        )
    _warn_held_out(est)
    classes = np.asarray(est.classes_)
    binary = len(classes) == 2
    module = _linear_module(est.coef_, est.intercept_ if est.fit_intercept else 0.0, dtype)
    if not est.fit_intercept:
        module.bias.requires_grad_(False)
    if binary:
        output_loss, kind = _ReshapeTarget(F.binary_cross_entropy_with_logits), BINARY
        transform = _FirstOutput(_FlatLogit())
    else:
        output_loss, kind, transform = _OneVsRestLogLoss(), CLASS_INDEX, _FirstOutput()
    alpha = 0.0 if est.penalty is None else float(est.alpha)
    return ModelAdapter(
        module, output_loss, target_kind=kind, output_transform=transform, classes=classes,
        label_map=True, penalty_factory=_SGDPenalty(alpha), params=params, dtype=dtype,
        device=device,
    )


def _warn_held_out(est) -> None:
    if getattr(est, "early_stopping", False):
        warnings.warn(
            f"estimator: this {type(est).__name__} was fitted with early_stopping=True, "
            f"which trains on a random {1 - est.validation_fraction:.0%} of the data it is "
            "given; influences over all the training points then include points the model "
            "never trained on. Refit with early_stopping=False for exact influences.",
            UserWarning, stacklevel=4,
        )


# --------------------------------------------------------------------------- MLP

_ACTIVATIONS = {"identity": nn.Identity, "logistic": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


class _HalfSquaredError:
    """sklearn's squared loss of one sample: half the squared error, summed over the
    outputs.

    For one output this is exactly sklearn's ``squared_error`` loss. For several,
    sklearn's reported ``loss_`` averages over the outputs, but the gradient it
    trains with (``_backprop``: the output delta is ``prediction - y``, divided only
    by the number of samples) is that of the sum, ``n_outputs`` times larger
    (scikit-learn issue #8349); the fitted weights are a stationary point of the sum,
    so the sum is the loss whose Hessian describes them.
    """

    def __call__(self, out, y):
        return 0.5 * ((out - y) ** 2).sum() / out.shape[0]


class _MLPPenalty:
    """``alpha/2 ||W||^2`` of an sklearn MLP over its weights (not its biases), which
    sklearn divides by the number of training points, or by the sum of the sample
    weights (picklable)."""

    def __init__(self, alpha, softmax=False):
        self.alpha, self.softmax = alpha, softmax

    def __call__(self, adapter: ModelAdapter, n_train: int, weight_sum: float | None = None) -> Penalty:
        w = self.alpha / (n_train if weight_sum is None else weight_sum)
        parts = [
            torch.full((k,), w if n.endswith("weight") else 0.0, dtype=torch.float64)
            for n, k in zip(adapter.param_names, adapter.sizes, strict=True)
        ]
        diag = torch.cat(parts) if self.alpha != 0 else None
        rank_one = []
        if self.softmax and "output.bias" in adapter.param_names:
            # As for a multinomial LogisticRegression: one constant added to every
            # output bias leaves the softmax unchanged, a null direction of the
            # objective orthogonal to every loss gradient; curvature 1 there leaves
            # the influences equal to those of the pseudo-inverse.
            i = adapter.param_names.index("output.bias")
            start, k = sum(adapter.sizes[:i]), adapter.sizes[i]
            u = torch.zeros(adapter.n_params, dtype=torch.float64)
            u[start : start + k] = 1.0 / np.sqrt(k)
            rank_one.append((1.0, u))
        return Penalty(diag, rank_one)


def _mlp_module(est, dtype=None) -> nn.Sequential:
    """The torch twin of a fitted sklearn MLP, up to its output activation.

    Layers are named ``layer0``, ``layer1``, ... with the last one ``output`` (so
    ``params="output"`` selects the output layer), each hidden one followed by
    ``activation0``, ``activation1``, ... The module returns the output layer's
    pre-activation: logits for a classifier, the prediction for a regressor.
    """
    if est.activation not in _ACTIVATIONS:
        raise ValueError(f"estimator: activation={est.activation!r} is not supported.")
    layers = OrderedDict()
    n = len(est.coefs_)
    for i, (W, b) in enumerate(zip(est.coefs_, est.intercepts_, strict=True)):
        name = "output" if i == n - 1 else f"layer{i}"
        layers[name] = _linear_module(np.asarray(W).T, np.asarray(b), dtype)
        if i < n - 1:
            layers[f"activation{i}"] = _ACTIVATIONS[est.activation]()
    return nn.Sequential(layers)


def _from_mlp(est, loss, params, dtype, device) -> ModelAdapter:
    from sklearn.neural_network import MLPClassifier

    _check_sklearn_fitted(est)
    name = type(est).__name__
    if loss is not None:
        raise ValueError(f"loss: an sklearn {name} brings its own loss; leave loss=None.")
    _warn_held_out(est)
    module = _mlp_module(est, dtype)
    if isinstance(est, MLPClassifier):
        classes = np.asarray(est.classes_)
        y_type = getattr(getattr(est, "_label_binarizer", None), "y_type_", "multiclass")
        if y_type.startswith("multilabel"):
            raise ValueError(
                "estimator: a multilabel MLPClassifier (fitted on a label indicator matrix) "
                "is not supported; fit it on one label per sample."
            )
        if est.out_activation_ == "logistic":  # binary: one logit, log-loss of a sigmoid
            output_loss, kind = _ReshapeTarget(F.binary_cross_entropy_with_logits), BINARY
            transform = _FirstOutput(_FlatLogit())
        else:  # softmax outputs with the log-loss: cross-entropy of the logits
            output_loss, kind, transform = F.cross_entropy, CLASS_INDEX, _FirstOutput()
        penalty = _MLPPenalty(float(est.alpha), softmax=kind == CLASS_INDEX)
        return ModelAdapter(
            module, output_loss, target_kind=kind, output_transform=transform,
            classes=classes, label_map=True, penalty_factory=penalty,
            params=params, dtype=dtype, device=device,
        )
    if getattr(est, "loss", "squared_error") != "squared_error":
        raise ValueError(
            f"estimator: MLPRegressor(loss={est.loss!r}) is not supported; refit with "
            "loss='squared_error'."
        )
    return ModelAdapter(
        module, _ReshapeTarget(_HalfSquaredError()), target_kind=REGRESSION,
        penalty_factory=_MLPPenalty(float(est.alpha)), params=params, dtype=dtype,
        device=device,
    )


# --------------------------------------------------------------------------- Pipeline


class _PipelineAdapter(ModelAdapter):
    """The adapter of a Pipeline's last step, fed through the earlier steps.

    It takes over the state of the last step's adapter (built by ``build_adapter``,
    whatever kind of model it is) and differs in one thing: ``features`` applies the
    fitted transformers to X first. Influences are over the last step's parameters,
    and perturbation-mode derivatives are with respect to the transformed features.
    """

    def __init__(self, inner: ModelAdapter, transformer):
        self.__dict__.update(inner.__dict__)
        self.transformer = transformer

    def features(self, X, *args, **kwargs) -> torch.Tensor:
        with warnings.catch_warnings():
            # X may be an array where the steps were fitted on a DataFrame
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            try:
                Z = self.transformer.transform(X)
            except Exception as exc:
                raise ValueError(
                    f"X: the Pipeline's steps before its model could not transform X "
                    f"({type(exc).__name__}: {exc}). Pass X as the Pipeline was fitted "
                    "on (the same DataFrame columns, or the same array layout)."
                ) from exc
        if hasattr(Z, "toarray"):  # a sparse matrix
            Z = Z.toarray()
        try:
            Z = check_array(Z, dtype=np.float64, allow_nd=True, input_name="X")
        except ValueError as exc:
            raise ValueError(
                f"X: the output of the Pipeline's steps before its model is not a finite "
                f"numeric array ({exc})."
            ) from exc
        return super().features(Z, *args, **kwargs)


def _from_pipeline(pipe, loss, params, dtype, device) -> ModelAdapter:
    from ._adapters import build_adapter

    if len(pipe.steps) == 0:
        raise ValueError("estimator: the Pipeline has no steps.")
    last_name, last = pipe.steps[-1]
    if last is None or last == "passthrough":
        raise ValueError(
            "estimator: the Pipeline's last step is 'passthrough'; its last step must be "
            "the fitted model."
        )
    for name, step in pipe.steps[:-1]:
        if step is None or step == "passthrough":
            continue
        try:
            check_is_fitted(step)
        except NotFittedError as exc:
            raise NotFittedError(
                f"estimator: step {name!r} ({type(step).__name__}) of the Pipeline is not "
                "fitted yet; fit the Pipeline before computing influences."
            ) from exc
    try:
        inner = build_adapter(last, loss=loss, params=params, dtype=dtype, device=device)
    except TypeError as exc:
        raise TypeError(
            f"estimator: the Pipeline's last step {last_name!r} is not a supported model "
            f"({exc})"
        ) from exc
    transformer = pipe[:-1]
    if isinstance(inner, _PipelineAdapter):  # a nested Pipeline as the last step
        from sklearn.pipeline import make_pipeline

        transformer = make_pipeline(transformer, inner.transformer)
    return _PipelineAdapter(inner, transformer)
