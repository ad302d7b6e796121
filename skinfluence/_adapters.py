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
import copy
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from torch import nn
from torch.func import functional_call

__all__ = ["LossFamily", "ModelAdapter", "build_adapter", "describe_loss", "resolve_dtype"]

CLASS_INDEX = "class_index"  # integer class labels, loss on K outputs
BINARY = "binary"  # one logit, float 0/1 targets
REGRESSION = "regression"  # float targets shaped like the output
OTHER = "other"  # user loss of unknown kind: targets passed through
#: ``params=LAST_LAYER``: the parameters of the module holding the model's last
#: trainable parameter (a linear model's only layer).
LAST_LAYER = "last-layer"


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


@dataclass(frozen=True)
class LossFamily:
    """What a loss is, as far as the influence computations need to know.

    ``target``: the kind of targets it takes (``CLASS_INDEX``, ``BINARY``,
    ``REGRESSION`` or ``OTHER``). ``distribution``: the predictive distribution
    whose negative log-likelihood it is, when known and unweighted with mean
    reduction ("categorical", "bernoulli", "gaussian"), else None; ``probs``: the
    model outputs probabilities rather than logits; ``on_logits``: cross-entropy or
    binary cross-entropy on logits; ``variance_per_element``: for "gaussian", the
    loss averages over output elements (mean reduction) rather than summing.
    """

    target: str
    distribution: str | None = None
    probs: bool = False
    on_logits: bool = False
    variance_per_element: bool = True


def describe_loss(loss) -> LossFamily:
    """The :class:`LossFamily` of a loss callable (as given, or as wrapped here)."""
    inner, probs = loss, False
    if isinstance(inner, _ReshapeTarget):
        inner = inner.loss
    if isinstance(inner, _SkorchNLL):
        inner, probs = inner.criterion, True
    if isinstance(inner, _ReshapeTarget):
        inner = inner.loss
    if isinstance(inner, (nn.CrossEntropyLoss, nn.NLLLoss)) or inner in (F.cross_entropy, F.nll_loss):
        target = CLASS_INDEX
    elif isinstance(inner, (nn.BCEWithLogitsLoss, nn.BCELoss)) or inner in (
        F.binary_cross_entropy_with_logits,
        F.binary_cross_entropy,
    ):
        target = BINARY
    elif isinstance(inner, (_MeanSquaredError, nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)) or inner in (
        F.mse_loss,
        F.l1_loss,
        F.smooth_l1_loss,
        F.huber_loss,
    ):
        target = REGRESSION
    else:
        target = OTHER
    plain = getattr(inner, "weight", None) is None and getattr(inner, "pos_weight", None) is None
    plain = plain and getattr(inner, "label_smoothing", 0.0) == 0.0
    reduction = getattr(inner, "reduction", "mean")
    if plain and reduction == "mean":
        if isinstance(inner, nn.CrossEntropyLoss) or inner is F.cross_entropy:
            return LossFamily(target, "categorical", on_logits=True)
        if isinstance(inner, nn.NLLLoss) or inner is F.nll_loss:
            # skorch feeds probabilities; a torch module feeding NLLLoss gives log-probabilities
            return LossFamily(target, "categorical", probs=probs)
        if isinstance(inner, nn.BCEWithLogitsLoss) or inner is F.binary_cross_entropy_with_logits:
            return LossFamily(target, "bernoulli", on_logits=True)
        if isinstance(inner, nn.BCELoss) or inner is F.binary_cross_entropy:
            return LossFamily(target, "bernoulli", probs=True)
    if isinstance(inner, nn.MSELoss) and reduction in ("mean", "sum"):
        return LossFamily(target, "gaussian", variance_per_element=reduction == "mean")
    if inner is F.mse_loss or isinstance(inner, _MeanSquaredError):
        return LossFamily(target, "gaussian")
    return LossFamily(target)


def _loss_kind(loss) -> str:
    """Guess the target kind a loss callable expects."""
    return describe_loss(loss).target


# --------------------------------------------------------------------------- penalty


@dataclass
class Penalty:
    """The estimator's own quadratic penalty ``P = diag(d) + sum_k c_k u_k u_k^T``.

    Added to the Hessian of the mean training loss, it gives the Hessian of the
    objective the estimator minimised (divided by the number of training points).
    """

    diag: torch.Tensor | None = None
    rank_one: list = field(default_factory=list)  # [(c, u)], u a flat vector

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

    def restrict(self, cols: torch.Tensor) -> Penalty:
        """The block of ``P`` on the flat coordinates ``cols``."""
        return Penalty(
            None if self.diag is None else self.diag[cols],
            [(c, u[cols]) for c, u in self.rank_one],
        )

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
    table = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name not in table:
        raise ValueError(
            f"dtype={dtype!r} is not supported; use None (the model's dtype), "
            "'float32' or 'float64' (half precision loses too much in the curvature)."
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
    ):
        self.module = module
        self.output_loss = output_loss
        self.target_kind = target_kind
        self.output_transform = output_transform or _FirstOutput()
        self.classes = None if classes is None else np.asarray(classes)
        self.label_map = label_map
        self.penalty_factory = penalty_factory

        named = [(n, p) for n, p in module.named_parameters()]
        if not named:
            raise ValueError("estimator: the model has no parameters to compute influences for.")
        self.param_names = _select_params(named, params)
        first = dict(named)[self.param_names[0]]
        self.dtype = resolve_dtype(dtype) or first.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype: the model's parameters are {self.dtype}; pass dtype='float32'.")
        self.device = torch.device(device) if device is not None else first.device
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device: {device!r} asks for CUDA, which is not available on this "
                "machine; use device=None (the model's device) or 'cpu'."
            )
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

    def layer_slices(self) -> dict:
        """Module name -> columns of the flat layout holding that module's parameters."""
        from ._modules import parameter_owners

        owners = parameter_owners(self.module)
        out, o = {}, 0
        for n, k in zip(self.param_names, self.sizes, strict=True):
            out.setdefault(owners[n][0], []).extend(range(o, o + k))
            o += k
        return {name: torch.as_tensor(cols, device=self.device) for name, cols in out.items()}

    def columns(self, names) -> torch.Tensor:
        """Columns of the flat layout holding the parameters ``names``, in the
        layout's order."""
        wanted, cols, o = set(names), [], 0
        for n, k in zip(self.param_names, self.sizes, strict=True):
            if n in wanted:
                cols.extend(range(o, o + k))
            o += k
        return torch.as_tensor(cols, dtype=torch.int64, device=self.device)

    def restrict(self, names) -> ModelAdapter:
        """The same model as a function of the parameters ``names`` alone (a subset
        of ``param_names``), the others held at their values; the penalty is its
        block on those parameters. Its flat layout is the columns
        :meth:`columns` gives, in that order."""
        names = [n for n in self.param_names if n in set(names)]
        out = copy.copy(self)
        out.param_names = names
        out.params = {n: self.params[n] for n in names}
        out.frozen = {**{n: t for n, t in self.params.items() if n not in out.params}, **self.frozen}
        index = {n: i for i, n in enumerate(self.param_names)}
        out.shapes = [self.shapes[index[n]] for n in names]
        out.sizes = [self.sizes[index[n]] for n in names]
        out.n_params = int(sum(out.sizes))
        out.penalty = self.penalty if self.penalty.is_zero else self.penalty.restrict(self.columns(names))
        return out

    @property
    def loss_family(self) -> LossFamily:
        return describe_loss(self.output_loss)

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
    @property
    def knows_objective(self) -> bool:
        """The estimator's objective is known (an sklearn model, with its own penalty
        or none): its curvature needs no damping beyond positive definiteness."""
        return self.penalty_factory is not None

    def bind(self, X: torch.Tensor, n_train: int, weight_sum: float | None = None) -> None:
        """Learn what only data can tell (output width) and build the penalty.

        The penalty is put on the scale of the mean training loss over ``n_train``
        points, or of the weighted mean when the points carry sample weights summing
        to ``weight_sum``."""
        with self.eval_mode():
            try:
                out = self.outputs(X[:1])
            except Exception as exc:  # the model cannot take X at all
                raise ValueError(
                    f"X: the model could not be evaluated on X of shape {tuple(X.shape)} "
                    f"({type(exc).__name__}: {exc}). Pass X with the number of features "
                    "the model was fitted on."
                ) from exc
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"estimator: the model returns a {type(out).__name__}, not a tensor; pass a "
                "module whose forward returns the output tensor (or a tuple whose first "
                "element is it)."
            )
        if out.dim() > 2:
            raise ValueError(
                f"X: for one sample of shape {tuple(X.shape[1:])} the model returns an "
                f"output of shape {tuple(out.shape[1:])}, not one output vector; pass X "
                "with samples shaped as the model was fitted on (e.g. 2-d X for a "
                "tabular model)."
            )
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                "X: the model's output is not finite (inf or NaN) on the first sample; "
                "check the inputs' scale (standardize the features)."
            )
        self.n_outputs = int(out.shape[-1]) if out.dim() > 1 else 1
        if self.target_kind == CLASS_INDEX and self.classes is None:
            self.classes = np.arange(self.n_outputs)
        if self.penalty_factory is not None:
            self.penalty = self.penalty_factory(self, n_train, weight_sum).to(self.dtype, self.device)

    @property
    def takes_indices(self) -> bool:
        """Whether the model looks inputs up (an ``nn.Embedding``): integer inputs
        then stay integers."""
        return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in self.module.modules())

    def features(self, X: np.ndarray) -> torch.Tensor:
        # a copy: the scorer must not see later edits of the caller's array, and
        # read-only inputs (pandas) need no special care
        X = np.ascontiguousarray(X)
        if X.dtype.kind in "iub" and self.takes_indices:
            return torch.tensor(X, dtype=torch.int64, device=self.device)
        return torch.tensor(X, dtype=self.dtype, device=self.device)

    def targets(self, y: np.ndarray, name: str = "y") -> torch.Tensor:
        """Convert labels to what the loss takes, refusing labels the model never saw."""
        y = np.asarray(y)
        if self.target_kind in (CLASS_INDEX, BINARY) and y.ndim == 2:
            if y.shape[1] != 1:
                raise ValueError(
                    f"{name} has shape {y.shape}; a classifier takes one class label per "
                    "sample: pass a 1-d array of labels."
                )
            y = y[:, 0]
        if self.target_kind == REGRESSION:
            if y.dtype.kind not in "biuf":
                raise ValueError(
                    f"{name}: the model is a regressor, so targets must be numbers; got "
                    f"values of type {y.dtype} such as {y.ravel()[:1].tolist()}."
                )
            width = y.shape[1] if y.ndim == 2 else 1
            if self.n_outputs is not None and width != self.n_outputs and y.ndim <= 2:
                raise ValueError(
                    f"{name} has {width} target column(s) but the model has "
                    f"{self.n_outputs} output(s); pass one target per output."
                )
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
    if params == LAST_LAYER:
        trainable = [n for n, p in named if p.requires_grad] or [n for n, _ in named]
        owner = trainable[-1].rpartition(".")[0]
        return [n for n in trainable if n.rpartition(".")[0] == owner]
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
    if isinstance(loss, type):
        raise ValueError(
            f"loss: got the class {loss.__name__}; pass a loss callable, e.g. an "
            f"instance loss={loss.__name__}() or a function such as "
            "torch.nn.functional.cross_entropy."
        )
    if params is not None and not isinstance(params, str) and len(params) == 0:
        raise ValueError(
            "params: an empty list selects no parameter; pass parameter names or module "
            "prefixes, or None for every parameter that requires gradients."
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
            device=device,
        )
    from ._sklearn_models import build_sklearn_adapter

    adapter = build_sklearn_adapter(estimator, loss=loss, params=params, dtype=dtype, device=device)
    if adapter is not None:
        return adapter
    raise TypeError(
        f"estimator: {type(estimator).__name__} is not supported. Pass a fitted skorch "
        "NeuralNet, a torch nn.Module with loss=, an sklearn LogisticRegression, "
        "Ridge, LinearRegression, MLPClassifier, MLPRegressor or "
        "SGDClassifier(loss='log_loss'), or a fitted Pipeline ending in one of them."
    )


def _from_skorch(net, loss, params, dtype, device) -> ModelAdapter:
    import skorch

    try:
        net.check_is_fitted()
        if not len(net.history):
            raise NotFittedError("initialized but never trained")
    except NotFittedError as exc:
        raise NotFittedError(
            f"estimator: this {type(net).__name__} is not fitted yet (an initialized "
            "net with no training history counts as unfitted); call fit on it before "
            "computing influences. If you loaded trained weights into it, load its "
            "history too (net.load_params(..., f_history=...))."
        ) from exc
    if getattr(net, "train_split", None) is not None:
        warnings.warn(
            f"estimator: this {type(net).__name__} was fitted with "
            f"train_split={net.train_split!r}, so it trained on only part of the data it "
            "was given (skorch's default holds out 20% for validation). The influences "
            "take the curvature over all of the X passed to fit, including points the net "
            "never trained on: refit the net with train_split=None, or pass only the "
            "points it trained on.",
            UserWarning,
            stacklevel=4,
        )
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
        params=params, dtype=dtype, device=device,
    )
