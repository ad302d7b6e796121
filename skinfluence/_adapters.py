"""Model adapters: a fitted model seen as a differentiable function of its parameters.

An adapter turns a fitted skorch net, a torch module with a loss callable, or an
sklearn linear model into the few things the influence computations need:

* the parameters taken into account, as a dict of detached tensors and as a flat
  vector layout (``flatten`` / ``unflatten``);
* ``sample_output(params, x)`` and ``output_loss(out, y)``, whose composition is the
  loss of one sample (no batch dimension), ready for ``torch.func.vmap``;
* the estimator's own L2 penalty as a matrix ``P`` (diagonal plus rank one), so that
  the Hessian of the model's objective is ``H_mean_loss + P``;
* the device and dtype the work is done in, and conversions of user data.

Adapters never modify the model: parameters are copied, and ``eval_mode`` hands the
module back in the train/eval mode it came in.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.func import functional_call

__all__ = ["ModelAdapter", "build_adapter", "resolve_dtype"]

CLASS_INDEX = "class_index"  # integer class labels, loss on K outputs
BINARY = "binary"  # one logit, float 0/1 targets
REGRESSION = "regression"  # float targets shaped like the output
OTHER = "other"  # user loss of unknown kind: targets passed through


# --------------------------------------------------------------------------- losses
# Losses are small picklable classes (no lambdas), called on a batch of one sample.


class _SkorchNLL:
    """skorch's ``NeuralNetClassifier.get_loss`` for NLLLoss: log(p + eps) first."""

    def __init__(self, criterion):
        self.criterion = criterion

    def __call__(self, out, y):
        eps = torch.finfo(out.dtype).eps
        return self.criterion(torch.log(out + eps), y)


class _ReshapeTarget:
    """Apply ``loss(out, y)`` with ``y`` reshaped to ``out``'s shape (MSE, BCE)."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, out, y):
        if y.numel() == out.numel():
            y = y.reshape(out.shape)
        return self.loss(out, y)


class _MeanSquaredError:
    """``mse_loss`` with mean reduction, written out: torch's own fails under
    forward-over-reverse differentiation (jvp of grad) on zero tangents."""

    def __call__(self, out, y):
        return ((out - y) ** 2).mean()


def _replace_mse(loss):
    """Swap a mean-reduced MSE for the equivalent that supports jvp of grad."""
    if loss is F.mse_loss or (isinstance(loss, nn.MSELoss) and loss.reduction == "mean"):
        return _MeanSquaredError()
    return loss


class _FlatLogit:
    """A binary classifier's output reshaped to (n,), as skorch's binary net does."""

    is_linear = True

    def __call__(self, out):
        return out.reshape(-1)


class _FirstOutput:
    """Take the first element when a module returns a tuple."""

    def __init__(self, then=None):
        self.then = then

    @property
    def is_linear(self) -> bool:
        """Whether the transform is linear in the output (a selection or reshape)."""
        return self.then is None or bool(getattr(self.then, "is_linear", False))

    def __call__(self, out):
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out if self.then is None else self.then(out)


def _loss_kind(loss) -> str:
    """Guess the target kind a loss callable expects."""
    target = loss.criterion if isinstance(loss, _SkorchNLL) else loss
    if isinstance(target, _ReshapeTarget):
        target = target.loss
    if isinstance(target, (nn.CrossEntropyLoss, nn.NLLLoss)) or target in (
        F.cross_entropy,
        F.nll_loss,
    ):
        return CLASS_INDEX
    if isinstance(target, (nn.BCEWithLogitsLoss, nn.BCELoss)) or target in (
        F.binary_cross_entropy_with_logits,
        F.binary_cross_entropy,
    ):
        return BINARY
    if isinstance(target, (_MeanSquaredError, nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)) or target in (
        F.mse_loss,
        F.l1_loss,
        F.smooth_l1_loss,
        F.huber_loss,
    ):
        return REGRESSION
    return OTHER


# --------------------------------------------------------------------------- penalty


@dataclass
class Penalty:
    """The estimator's own quadratic penalty ``P = diag(d) + sum_k c_k u_k u_k^T``.

    Added to the Hessian of the mean training loss, it gives the Hessian of the
    objective the estimator minimised (divided by the number of training points).
    """

    diag: torch.Tensor | None = None
    rank_one: list = field(default_factory=list)  # [(c, u)], u a flat unit vector

    @property
    def is_zero(self) -> bool:
        return self.diag is None and not self.rank_one

    def mv(self, V: torch.Tensor) -> torch.Tensor:
        """``V @ P`` for a batch of flat vectors ``V`` of shape (k, p)."""
        out = torch.zeros_like(V)
        if self.diag is not None:
            out = out + V * self.diag
        for c, u in self.rank_one:
            out = out + c * (V @ u)[:, None] * u[None, :]
        return out

    def dense(self, p: int, dtype, device) -> torch.Tensor:
        P = torch.zeros(p, p, dtype=dtype, device=device)
        if self.diag is not None:
            P += torch.diag(self.diag)
        for c, u in self.rank_one:
            P += c * torch.outer(u, u)
        return P

    def to(self, dtype, device) -> Penalty:
        return Penalty(
            None if self.diag is None else self.diag.to(dtype=dtype, device=device),
            [(c, u.to(dtype=dtype, device=device)) for c, u in self.rank_one],
        )


# --------------------------------------------------------------------------- adapter


def resolve_dtype(dtype) -> torch.dtype | None:
    """Accept torch dtypes, numpy dtypes and their names; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    table = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}
    if name not in table:
        raise ValueError(
            f"dtype={dtype!r} is not supported; use None (the model's dtype), "
            "'float32' or 'float64'."
        )
    return table[name]


class ModelAdapter:
    """A fitted model as a function of a flat parameter vector (see module docstring).

    Built by :func:`build_adapter`; not part of the public API.
    """

    def __init__(
        self,
        module: nn.Module,
        output_loss,
        *,
        target_kind: str,
        output_transform=None,
        classes=None,
        label_map: bool = False,
        penalty_factory=None,
        params=None,
        dtype=None,
        device=None,
        estimator_kind: str = "torch",
    ):
        self.module = module
        self.output_loss = output_loss
        self.target_kind = target_kind
        self.output_transform = output_transform or _FirstOutput()
        self.classes = None if classes is None else np.asarray(classes)
        self.label_map = label_map
        self.penalty_factory = penalty_factory
        self.estimator_kind = estimator_kind

        named = [(n, p) for n, p in module.named_parameters()]
        if not named:
            raise ValueError("estimator: the model has no parameters to compute influences for.")
        self.param_names = _select_params(named, params)
        first = dict(named)[self.param_names[0]]
        self.dtype = resolve_dtype(dtype) or first.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype: the model's parameters are {self.dtype}; pass dtype='float32'.")
        self.device = torch.device(device) if device is not None else first.device
        selected = set(self.param_names)
        self.params = {}
        self.frozen = {}
        for n, p in named:
            t = p.detach().to(device=self.device)
            t = t.to(self.dtype) if t.is_floating_point() else t
            (self.params if n in selected else self.frozen)[n] = t
        for n, b in module.named_buffers():
            t = b.detach().to(device=self.device)
            self.frozen[n] = t.to(self.dtype) if t.is_floating_point() else t
        self.shapes = [self.params[n].shape for n in self.param_names]
        self.sizes = [int(np.prod(s)) if len(s) else 1 for s in self.shapes]
        self.n_params = int(sum(self.sizes))
        self.penalty = Penalty()
        self.n_outputs = None

    # ----------------------------------------------------------- flat layout
    def flatten(self, d: dict, batched: bool = False) -> torch.Tensor:
        if batched:
            return torch.cat([d[n].reshape(d[n].shape[0], -1) for n in self.param_names], 1)
        return torch.cat([d[n].reshape(-1) for n in self.param_names])

    def unflatten(self, v: torch.Tensor) -> dict:
        out, o = {}, 0
        for n, s, k in zip(self.param_names, self.shapes, self.sizes, strict=False):
            out[n] = v[o : o + k].reshape(s)
            o += k
        return out

    def flat_params(self) -> torch.Tensor:
        return self.flatten(self.params)

    # ----------------------------------------------------------- functions
    def sample_output(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """Model output for one sample ``x`` (no batch dim); shape (1, ...)."""
        out = functional_call(self.module, {**params, **self.frozen}, (x.unsqueeze(0),))
        return self.output_transform(out)

    def sample_loss(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of one sample, a scalar."""
        return self.output_loss(self.sample_output(params, x), y.unsqueeze(0))

    def outputs(self, X: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = functional_call(self.module, {**self.params, **self.frozen}, (X,))
        return self.output_transform(out)

    @contextlib.contextmanager
    def eval_mode(self):
        """Evaluate the module in eval mode, then hand every submodule back as it was."""
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    # ----------------------------------------------------------- data
    def bind(self, X: torch.Tensor, n_train: int) -> None:
        """Learn what only data can tell (output width) and build the penalty."""
        with self.eval_mode():
            try:
                out = self.outputs(X[:1])
            except Exception as exc:  # the model cannot take X at all
                raise ValueError(
                    f"X: the model could not be evaluated on X of shape {tuple(X.shape)} "
                    f"({type(exc).__name__}: {exc}). Pass X with the number of features "
                    "the model was fitted on."
                ) from exc
        self.n_outputs = int(out.shape[-1]) if out.dim() > 1 else 1
        if self.target_kind == CLASS_INDEX and self.classes is None:
            self.classes = np.arange(self.n_outputs)
        if self.penalty_factory is not None:
            self.penalty = self.penalty_factory(self, n_train).to(self.dtype, self.device)

    def features(self, X: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(X), device=self.device).to(self.dtype)

    def targets(self, y: np.ndarray, name: str = "y") -> torch.Tensor:
        """Convert labels to what the loss takes, refusing labels the model never saw."""
        y = np.asarray(y)
        if self.target_kind in (CLASS_INDEX, BINARY) and self.classes is not None:
            known = np.isin(y, self.classes)
            if not known.all():
                bad = np.unique(y[~known])[:5].tolist()
                raise ValueError(
                    f"{name} contains labels the model was never trained on: {bad}. "
                    f"Known classes: {self.classes.tolist()}."
                )
            if self.label_map:
                y = np.searchsorted(self.classes, y)
        if self.target_kind == CLASS_INDEX:
            return torch.as_tensor(y.astype(np.int64), device=self.device)
        if self.target_kind == OTHER and np.issubdtype(y.dtype, np.integer):
            return torch.as_tensor(y.astype(np.int64), device=self.device)
        return torch.as_tensor(y.astype(np.float64), device=self.device).to(self.dtype)

    def predicted_targets(self, X: torch.Tensor) -> torch.Tensor:
        """The model's own predictions, used as targets when ``y`` is not given."""
        if self.target_kind not in (CLASS_INDEX, BINARY):
            raise ValueError(
                "y: targets are required for a model that is not a classifier (with the "
                "model's own predictions as targets its loss gradients would vanish)."
            )
        with self.eval_mode():
            out = self.outputs(X)
        if self.target_kind == CLASS_INDEX:
            return out.argmax(-1)
        return (out.reshape(-1) > 0).to(self.dtype)


def _select_params(named, params) -> list[str]:
    """Names of the parameters to use; ``params`` entries are names or module prefixes."""
    if params is None:
        names = [n for n, p in named if p.requires_grad]
        if not names:
            raise ValueError(
                "params: no parameter of the model requires gradients; pass params= "
                "with the names of the parameters to use."
            )
        return names
    if isinstance(params, str):
        params = [params]
    all_names = [n for n, _ in named]
    chosen = []
    for want in params:
        hits = [n for n in all_names if n == want or n.startswith(want + ".")]
        if not hits:
            raise ValueError(
                f"params: {want!r} matches no parameter of the model. "
                f"Available: {all_names}."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in all_names if n in chosen]  # keep the model's order


# --------------------------------------------------------------------------- builders


def build_adapter(estimator, *, loss=None, params=None, dtype=None, device=None) -> ModelAdapter:
    """Build the adapter for a fitted skorch net, torch module or sklearn linear model."""
    if estimator is None:
        raise ValueError(
            "estimator: pass a fitted model (a skorch net, a torch nn.Module with "
            "loss=..., or an sklearn linear model)."
        )
    try:
        import skorch
    except ImportError:  # pragma: no cover - skorch is a dependency
        skorch = None
    if skorch is not None and isinstance(estimator, skorch.NeuralNet):
        return _from_skorch(estimator, loss, params, dtype, device)
    if isinstance(estimator, nn.Module):
        if loss is None:
            raise ValueError(
                "loss: a torch nn.Module needs loss=, a mean-reduced callable "
                "loss(output, target) such as torch.nn.functional.cross_entropy."
            )
        kind = _loss_kind(loss)
        loss = _replace_mse(loss)
        output_loss = _ReshapeTarget(loss) if kind in (BINARY, REGRESSION) else loss
        transform = _FirstOutput(_FlatLogit()) if kind == BINARY else _FirstOutput()
        return ModelAdapter(
            estimator, output_loss, target_kind=kind, output_transform=transform,
            classes=[0, 1] if kind == BINARY else None, params=params, dtype=dtype,
            device=device, estimator_kind="torch",
        )
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge

    if isinstance(estimator, LogisticRegression):
        return _from_logistic(estimator, loss, params, dtype, device)
    if isinstance(estimator, (Ridge, LinearRegression)):
        return _from_linear_regression(estimator, loss, params, dtype, device)
    raise TypeError(
        f"estimator: {type(estimator).__name__} is not supported. Pass a fitted skorch "
        "NeuralNet, a torch nn.Module with loss=, or an sklearn LogisticRegression, "
        "Ridge or LinearRegression."
    )


def _from_skorch(net, loss, params, dtype, device) -> ModelAdapter:
    import skorch

    try:
        net.check_is_fitted()
    except NotFittedError as exc:
        raise NotFittedError(
            f"estimator: this {type(net).__name__} is not fitted yet; call fit on it "
            "before computing influences."
        ) from exc
    module = net.module_
    criterion = loss if loss is not None else net.criterion_
    is_binary = isinstance(net, skorch.NeuralNetBinaryClassifier)
    is_classifier = isinstance(net, skorch.NeuralNetClassifier)
    if is_classifier and loss is None and isinstance(criterion, nn.NLLLoss):
        output_loss = _SkorchNLL(criterion)
    else:
        output_loss = criterion
    kind = _loss_kind(criterion)
    if is_binary:
        kind = BINARY
    elif is_classifier and kind == OTHER:
        kind = CLASS_INDEX
    elif isinstance(net, skorch.NeuralNetRegressor) and kind == OTHER:
        kind = REGRESSION
    if kind in (BINARY, REGRESSION):
        output_loss = _ReshapeTarget(_replace_mse(output_loss))
    classes = None
    if is_binary:
        classes = np.array([0, 1])
    elif is_classifier:
        try:
            classes = np.asarray(net.classes_)
        except AttributeError:
            classes = None  # inferred from the output width in bind()
    transform = _FirstOutput(_FlatLogit()) if is_binary else _FirstOutput()
    return ModelAdapter(
        module, output_loss, target_kind=kind, output_transform=transform, classes=classes,
        params=params, dtype=dtype, device=device, estimator_kind="skorch",
    )


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
        estimator_kind="sklearn",
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
        device=device, estimator_kind="sklearn",
    )
