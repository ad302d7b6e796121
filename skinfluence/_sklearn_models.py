"""Adapters for fitted scikit-learn models: each becomes a torch module, its loss and
the L2 penalty of its own objective (divided by the number of training points), so
that the Hessian of the mean training loss plus that penalty is the Hessian of the
objective the estimator minimised.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
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
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge

    if isinstance(estimator, LogisticRegression):
        return _from_logistic(estimator, loss, params, dtype, device)
    if isinstance(estimator, (Ridge, LinearRegression)):
        return _from_linear_regression(estimator, loss, params, dtype, device)
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
    """L2 penalty of an sklearn LogisticRegression divided by n_train (picklable)."""

    def __init__(self, C, fit_intercept, liblinear, intercept_scaling, multinomial):
        self.C, self.fit_intercept = C, fit_intercept
        self.liblinear, self.intercept_scaling = liblinear, intercept_scaling
        self.multinomial = multinomial

    def __call__(self, adapter: ModelAdapter, n_train: int) -> Penalty:
        w = 0.0 if not np.isfinite(self.C) else 1.0 / (self.C * n_train)
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
    """alpha ||W||^2 of Ridge, on the mean squared error scale (picklable)."""

    def __init__(self, alpha, n_targets):
        self.alpha, self.n_targets = alpha, n_targets

    def __call__(self, adapter: ModelAdapter, n_train: int) -> Penalty:
        if self.alpha == 0:
            return Penalty()
        # objective/(n k) = mean_i mean_k (y - f)^2 + alpha/(n k) ||W||^2
        w = 2.0 * self.alpha / (n_train * self.n_targets)
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
