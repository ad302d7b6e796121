"""EK-FAC: Kronecker-factored curvature for ``nn.Linear`` and ``nn.Conv2d`` layers.

The curvature is block diagonal over layers. For a layer with input activations
``a`` (a 1 appended when the layer has a bias) and gradients ``g`` of the loss with
respect to its pre-activation output, the gradient of its weight matrix
``[W, b]`` (shape ``(d_out, d_in + 1)``) is ``G = sum_t g_t a_t^T``, a sum over the
positions ``t`` where the layer is applied (one for a plain ``Linear``; the output
pixels of a ``Conv2d``, whose inputs are the unfolded patches).

K-FAC approximates the layer's block of the Fisher (the Gauss-Newton matrix)
by ``S (x) A`` with

* ``A = E[a a^T]``, averaged over samples and positions,
* ``S = E[sum_t g_t g_t^T]``, summed over positions and averaged over samples,

which is KFC (Grosse & Martens, 2016): with spatially uncorrelated output gradients
the Fisher of a convolution is ``T * E_t[a a^T] (x) E_t[g g^T]``, and the factor
``T`` (number of positions) is carried by ``S``. For a ``Linear`` layer applied once
per sample both conventions agree with pyDVL's ``EkfacInfluence``; kronfluence
averages both factors over positions, a scale that only plain K-FAC sees.

Both factors are eigendecomposed in float64, ``A = Q_A L_A Q_A^T`` and
``S = Q_S L_S Q_S^T``. K-FAC's eigenvalues in the Kronecker eigenbasis are
``L_S[o] * L_A[i]``; EK-FAC (George et al., 2018) replaces them by the exact second
moments of the per-sample gradients projected on that basis,
``E[(Q_S^T G Q_A)[o, i]^2]``: the best diagonal approximation of the curvature in
that basis. How good that is depends on the basis. K-FAC's factors treat
activations and output gradients as independent; before the correction, the
factors are moved towards the nearest Kronecker product of the layer's block
(``basis_iter`` alternating updates, each reweighting one factor's covariance by
the other factor's quadratic form), which makes the block closer to diagonal in
the eigenbasis and the corrected approximation closer to the curvature. The regularization is added to these eigenvalues (as pyDVL does), and so
is the diagonal, in the same basis, of the estimator's own L2 penalty.

``g`` comes from one of three Fisher variants:

* ``"gauss-newton"``: the expectation over the model's predictive distribution,
  exactly, from the columns of a square root of each sample's Hessian of the loss in
  the model output (one backward pass per output); the factors are those of the
  Gauss-Newton matrix;
* ``"true"``: one label per sample drawn from that distribution (softmax for
  cross-entropy and skorch's NLL on probabilities, Bernoulli for binary
  cross-entropy, Gaussian for MSE): unbiased for the same matrix, one backward pass;
* ``"empirical"``: the given labels.

Influences are computed in each layer's eigenbasis, where the inverse is diagonal:
test gradients are projected there and scaled once, and training activations and
output gradients are projected (``a Q_A``, ``g Q_S``) and contracted with them, so
a layer applied once per sample never forms a per-sample training gradient.

Activations and output gradients are captured by forward hooks registered on the
user's module for the duration of one pass and removed afterwards; the module's
parameters and structure are never changed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils import check_random_state
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.nn.modules.utils import _pair

from .. import _adapters
from .._adapters import ModelAdapter, _ReshapeTarget, _SkorchNLL
from .._gradients import batch_slices
from ._base import CurvatureOperator, NotPositiveDefiniteError, Solver

__all__ = ["FISHERS", "EkfacSolver", "select_layers"]

FISHERS = ("gauss-newton", "true", "empirical")
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
# Elements of the (test rows x layer outputs x train batch) intermediate of one
# pairwise contraction; bounds its memory (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24
# Activations and output gradients kept between the passes of fit, at most.
_CACHE_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------- layers


def _owners(module: nn.Module) -> dict:
    """Parameter name -> (module name, module) of the module that holds it directly."""
    owners = {}
    for mname, m in module.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = (mname, m)
    return owners


def _describe(name: str, m: nn.Module) -> str:
    return f"{name or '<root>'} ({type(m).__name__})"


def select_layers(module: nn.Module, param_names, layers=None) -> tuple[list[str], list[str]]:
    """The layers EK-FAC works on and the parameters they take into account.

    Parameters
    ----------
    module : nn.Module
        The model.
    param_names : list of str
        The parameters selected so far (``params=`` of the scorer).
    layers : str or list of str, default=None
        Module names. None takes every module holding a selected parameter, all of
        which must then be ``nn.Linear`` or ``nn.Conv2d``.

    Returns
    -------
    layer_names, param_names : list of str
        The layers, in the model's order, and the selected parameters they hold.

    Examples
    --------
    >>> import torch
    >>> from skinfluence.solvers.ekfac import select_layers
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> select_layers(net, ["0.weight", "0.bias", "2.weight", "2.bias"], layers=["2"])
    (['2'], ['2.weight', '2.bias'])
    """
    owners = _owners(module)
    selected = [n for n in param_names if n in owners]
    if layers is None:
        names = []
        for n in selected:
            mname = owners[n][0]
            if mname not in names:
                names.append(mname)
        mods = {m: module.get_submodule(m) for m in names}
        bad = [_describe(m, mod) for m, mod in mods.items() if not isinstance(mod, SUPPORTED_LAYERS)]
        if bad:
            ok = [m for m, mod in mods.items() if isinstance(mod, SUPPORTED_LAYERS)]
            raise ValueError(
                "layers: EK-FAC supports nn.Linear and nn.Conv2d layers only, but the "
                f"selected parameters also belong to {bad}. Pass layers={ok} to leave "
                "them out (their parameters are then held fixed), or params= to select "
                "parameters of supported layers only."
            )
    else:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        names = []
        for w in wanted:
            if not isinstance(w, str):
                raise ValueError(f"layers: entries must be module names (str), got {w!r}.")
            try:
                m = module.get_submodule(w)
            except AttributeError as exc:
                avail = [n for n, mm in module.named_modules() if isinstance(mm, SUPPORTED_LAYERS)]
                raise ValueError(
                    f"layers: {w!r} is not a submodule of the model. Its nn.Linear and "
                    f"nn.Conv2d layers are {avail}."
                ) from exc
            if not isinstance(m, SUPPORTED_LAYERS):
                raise ValueError(
                    f"layers: {_describe(w, m)} is not supported; EK-FAC handles "
                    "nn.Linear and nn.Conv2d layers only."
                )
            if not any(owners[n][0] == w for n in selected):
                raise ValueError(
                    f"layers: {_describe(w, m)} has no parameter among those selected "
                    f"({list(param_names)}); check params= and requires_grad."
                )
            if w not in names:
                names.append(w)
        order = [n for n, _ in module.named_modules()]
        names.sort(key=order.index)
    for name in names:
        m = module.get_submodule(name)
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise ValueError(
                f"layers: {_describe(name, m)} has groups={m.groups}, "
                f"padding_mode={m.padding_mode!r}; EK-FAC supports convolutions with "
                "groups=1 and zero padding. Leave it out with layers=."
            )
    chosen = set(names)
    return names, [n for n in selected if owners[n][0] in chosen]


@dataclass
class _Prepared:
    """Test factors of one layer, possibly stored transposed, (n, d_out, d_in) or
    (n, d_in, d_out)."""

    F: torch.Tensor
    transposed: bool


@dataclass
class _Layer:
    """Where one layer's gradient matrix ``[W, b]`` lives in the flat parameter vector."""

    name: str
    conv: dict | None  # unfold settings for Conv2d, None for Linear
    d_out: int
    d_in: int  # columns of the gradient matrix, bias column included
    weight: slice | None  # flat slices; None when that parameter is not selected
    bias: slice | None


def _build_layers(adapter: ModelAdapter, names: list[str]) -> list[_Layer]:
    offsets, o = {}, 0
    for n, k in zip(adapter.param_names, adapter.sizes, strict=True):
        offsets[n] = slice(o, o + k)
        o += k
    out = []
    for name in names:
        m = adapter.module.get_submodule(name)
        prefix = f"{name}." if name else ""
        w = offsets.get(prefix + "weight")
        b = offsets.get(prefix + "bias")
        if isinstance(m, nn.Linear):
            d_out, d_w, conv = m.out_features, m.in_features, None
        else:
            d_out = m.out_channels
            d_w = m.in_channels * int(np.prod(m.kernel_size))
            conv = {
                "kernel_size": _pair(m.kernel_size),
                "stride": _pair(m.stride),
                "padding": m.padding,
                "dilation": _pair(m.dilation),
            }
        d_in = (d_w if w is not None else 0) + (1 if b is not None else 0)
        out.append(_Layer(name, conv, d_out, d_in, w, b))
    return out


def _patches(x: torch.Tensor, conv: dict) -> torch.Tensor:
    """Unfolded input patches of a Conv2d, (b, positions, C * kh * kw)."""
    padding = conv["padding"]
    if isinstance(padding, str):
        pads = [0, 0, 0, 0]
        if padding == "same":  # stride 1; the extra pixel of an even kernel goes right
            for axis, (k, d) in enumerate(zip(conv["kernel_size"], conv["dilation"], strict=True)):
                total = d * (k - 1)
                pads[2 - 2 * axis], pads[3 - 2 * axis] = total // 2, total - total // 2
        x = F.pad(x, pads)
        padding = 0
    cols = F.unfold(x, conv["kernel_size"], conv["dilation"], padding, conv["stride"])
    return cols.transpose(1, 2)


# --------------------------------------------------------------------------- hooks


@contextlib.contextmanager
def _capture(module: nn.Module, names: list[str]):
    """Record each layer's inputs and make its outputs differentiable.

    Each call of a hooked layer stores its input and a zero tensor ``z`` that
    requires grad and is added to the output, so that ``d loss / d z`` is the
    gradient with respect to the layer's output even though no parameter requires
    grad. The hooks are removed on exit, whatever happens.
    """
    records = {n: [] for n in names}
    handles = []

    def make(store):
        def hook(mod, inputs, output):
            z = torch.zeros_like(output, requires_grad=True)
            store.append((inputs[0].detach(), z))
            return output + z

        return hook

    try:
        for n in names:
            handles.append(module.get_submodule(n).register_forward_hook(make(records[n])))
        yield records
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- sampling


class _Sampler:
    """Labels drawn from the model's predictive distribution (the "true" Fisher).

    ``kind`` is "categorical", "bernoulli" or "gaussian"; ``probs`` says whether the
    model outputs probabilities rather than logits; ``variance`` is the Gaussian's
    (its negative log-likelihood is the MSE loss up to a constant).
    """

    def __init__(
        self, kind: str, probs: bool = False, variance_per_element: bool = True,
        on_logits: bool = False,
    ):
        self.kind, self.probs = kind, probs
        self.variance_per_element = variance_per_element
        self.on_logits = on_logits  # the loss is cross-entropy / BCE on logits

    def hessian_sqrt(self, out: torch.Tensor) -> torch.Tensor | None:
        """``L`` with ``L L^T`` the loss's Hessian in the output, (b, d, d), when it has
        a closed form that does not depend on the label; None otherwise."""
        b, d = out.shape[0], out[0].numel()
        if self.kind == "gaussian":
            scale = np.sqrt(2.0 / (d if self.variance_per_element else 1))
            eye = torch.eye(d, dtype=out.dtype, device=out.device)
            return (scale * eye).expand(b, d, d)
        if not self.on_logits:
            return None
        if self.kind == "categorical":  # column k: sqrt(p_k) (e_k - p)
            p = torch.softmax(out, -1)
            r = p.sqrt()
            return torch.diag_embed(r) - p[:, :, None] * r[:, None, :]
        p = torch.sigmoid(out.reshape(b))
        return (p * (1 - p)).sqrt().reshape(b, 1, 1)

    def noise(self, rng: np.random.RandomState, n: int, out_shape: tuple) -> torch.Tensor:
        if self.kind == "gaussian":
            return torch.as_tensor(rng.standard_normal((n, *tuple(out_shape))))
        return torch.as_tensor(rng.random_sample(n))

    def __call__(self, out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        u = u.to(device=out.device)
        if self.kind == "categorical":
            p = out.clamp_min(0) if self.probs else torch.softmax(out, -1)
            c = torch.cumsum(p / p.sum(-1, keepdim=True), -1)
            y = (c < u.to(c.dtype)[:, None]).sum(-1)
            return y.clamp_max(out.shape[-1] - 1)
        if self.kind == "bernoulli":
            p = out.clamp(0, 1) if self.probs else torch.sigmoid(out)
            return (u.to(p.dtype) < p).to(out.dtype)
        d = out[0].numel()
        # MSE averaged over d elements is the NLL of N(out, d/2); summed, of N(out, 1/2)
        sigma = np.sqrt((d if self.variance_per_element else 1) / 2.0)
        return out + sigma * u.to(out.dtype)


def _sampler(adapter: ModelAdapter) -> _Sampler:
    sampler = _loss_family(adapter)
    if sampler is None:
        raise ValueError(
            "fisher: the 'true' Fisher samples labels from the model's predictive "
            "distribution, which is known for unweighted cross-entropy, NLL, binary "
            f"cross-entropy and MSE losses, not for {adapter.output_loss!r}. Use "
            "fisher='gauss-newton' (the exact expectation, from the loss's Hessian) or "
            "fisher='empirical'."
        )
    return sampler


def _loss_family(adapter: ModelAdapter) -> _Sampler | None:
    """The predictive distribution whose negative log-likelihood is the loss, if known."""
    loss, probs = adapter.output_loss, False
    if isinstance(loss, _ReshapeTarget):
        loss = loss.loss
    if isinstance(loss, _SkorchNLL):
        loss, probs = loss.criterion, True
    plain = getattr(loss, "weight", None) is None and getattr(loss, "pos_weight", None) is None
    plain = plain and getattr(loss, "label_smoothing", 0.0) == 0.0
    reduction = getattr(loss, "reduction", "mean")
    if plain and reduction == "mean":
        if isinstance(loss, nn.CrossEntropyLoss) or loss is F.cross_entropy:
            return _Sampler("categorical", on_logits=True)
        if isinstance(loss, nn.NLLLoss) or loss is F.nll_loss:
            # skorch feeds probabilities; a torch module feeding NLLLoss gives log-probabilities
            return _Sampler("categorical", probs=probs)
        if isinstance(loss, nn.BCEWithLogitsLoss) or loss is F.binary_cross_entropy_with_logits:
            return _Sampler("bernoulli", on_logits=True)
        if isinstance(loss, nn.BCELoss) or loss is F.binary_cross_entropy:
            return _Sampler("bernoulli", probs=True)
    if isinstance(loss, nn.MSELoss) and reduction in ("mean", "sum"):
        return _Sampler("gaussian", variance_per_element=reduction == "mean")
    # the adapters may stand in their own mean-reduced MSE for torch's
    mean_mse = getattr(_adapters, "_MeanSquaredError", None)
    if loss is F.mse_loss or (mean_mse is not None and isinstance(loss, mean_mse)):
        return _Sampler("gaussian")
    return None


# --------------------------------------------------------------------------- solver


class EkfacSolver(Solver):
    """Block-diagonal EK-FAC (or K-FAC) curvature over Linear and Conv2d layers.

    Parameters
    ----------
    layers : list of str, default=None
        Module names; None takes every module that holds a selected parameter.
    fisher : {"gauss-newton", "true", "empirical"}, default="gauss-newton"
        How output gradients are formed (see the module docstring).
    update_diagonal : bool, default=True
        EK-FAC's eigenvalue correction; False gives plain K-FAC.
    basis_iter : int, default=2
        With ``update_diagonal=True``: alternating updates that move each layer's
        factors towards the nearest Kronecker product of its curvature block before
        their eigenbasis is taken (two passes over the data each); 0 keeps the
        eigenbasis of the K-FAC factors.
    random_state : int, RandomState or None
        Seeds the labels of the "true" Fisher.

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

    def __init__(
        self, layers=None, fisher="gauss-newton", update_diagonal=True, basis_iter=2, random_state=None
    ):
        self.layers = layers
        self.fisher = fisher
        self.update_diagonal = update_diagonal
        self.basis_iter = basis_iter
        self.random_state = random_state

    # ------------------------------------------------------------ passes
    def _cotangents(self, out, Y, how, noise):
        """Gradients with respect to the model output, stacked: (r, *out.shape)."""
        loss = self.adapter_.output_loss

        def loss_one(o, y):
            return loss(o.unsqueeze(0), y.unsqueeze(0))

        if how == "gauss-newton":
            L = None if self.family_ is None else self.family_.hessian_sqrt(out)
            if L is None:
                H = vmap(hessian(loss_one))(out, Y)
                d = out[0].numel()
                evals, evecs = torch.linalg.eigh(H.reshape(out.shape[0], d, d))
                L = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # L L^T = H per sample
            keep = L.abs().amax((0, 1)) > 0
            keep[-1] = True  # at least one column, if only of zeros
            return L[:, :, keep].permute(2, 0, 1).reshape((-1, *tuple(out.shape)))
        if how == "true":
            Y = self.sampler_(out, noise)
        return vmap(grad(loss_one))(out, Y).unsqueeze(0)

    def _layer_data(self, X, Y, how="empirical", noise=None):
        """Per layer: activations (b, T, d_in) and output gradients (r, b, T, d_out)."""
        a = self.adapter_
        names = [lay.name for lay in self.layers_]
        with _capture(a.module, names) as rec, torch.enable_grad():
            out = a.output_transform(functional_call(a.module, {**a.params, **a.frozen}, (X,)))
            unused = [n for n in names if not rec[n]]
            if unused:
                raise ValueError(
                    f"layers: {unused} are not called by the model's forward pass; leave "
                    "them out with layers=."
                )
            cot = self._cotangents(out.detach(), Y, how, noise)
            zs = [z for n in names for _, z in rec[n]]
            if cot.shape[0] == 1:
                gs = torch.autograd.grad(out, zs, cot[0], allow_unused=True)
                gs = [None if g is None else g.unsqueeze(0) for g in gs]
            else:
                try:
                    gs = torch.autograd.grad(out, zs, cot, allow_unused=True, is_grads_batched=True)
                except RuntimeError:  # an op without a batching rule: one pass per column
                    cols = [torch.autograd.grad(out, zs, c, allow_unused=True, retain_graph=True) for c in cot]
                    gs = [
                        None if col[0] is None else torch.stack(col)
                        for col in zip(*cols, strict=True)
                    ]
        data, k = {}, 0
        r, b = cot.shape[0], X.shape[0]
        for lay in self.layers_:
            acts, grads = [], []
            for inp, z in rec[lay.name]:
                g = gs[k] if gs[k] is not None else torch.zeros((r, *tuple(z.shape)), dtype=z.dtype, device=z.device)
                k += 1
                if inp.shape[0] != b:
                    raise ValueError(
                        f"layers: layer {lay.name!r} received an input whose first "
                        f"dimension ({inp.shape[0]}) is not the batch ({b}); EK-FAC needs "
                        "layers applied with the batch dimension first."
                    )
                if lay.conv is None:
                    act = inp.reshape(b, -1, inp.shape[-1])
                    g = g.reshape(r, b, -1, g.shape[-1])
                else:
                    act = _patches(inp, lay.conv)
                    g = g.reshape(r, b, g.shape[2], -1).transpose(-1, -2)
                parts = [act] if lay.weight is not None else []
                if lay.bias is not None:
                    parts.append(torch.ones((*act.shape[:-1], 1), dtype=act.dtype, device=act.device))
                acts.append(torch.cat(parts, -1))
                grads.append(g)
            data[lay.name] = (torch.cat(acts, 1), torch.cat(grads, 2))
        return data

    def _batches(self, n, progress, desc):
        steps = list(batch_slices(n, self.batch_size_))
        return steps if progress is None else progress(steps, desc)

    # ------------------------------------------------------------ fit
    def fit(self, operator: CurvatureOperator, progress=None) -> EkfacSolver:
        a = operator.adapter
        X, Y = operator.X, operator.Y
        n = operator.n_train
        if n == 0:
            raise ValueError("X: EK-FAC needs at least one training sample.")
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher: expected one of {FISHERS}, got {self.fisher!r}.")
        names, params = select_layers(a.module, a.param_names, self.layers)
        if params != list(a.param_names):
            left = [p for p in a.param_names if p not in params]
            raise ValueError(
                f"layers: the parameters {left} are selected but belong to no layer EK-FAC "
                "works on; select them out with params= or add their layers."
            )
        self.adapter_ = a
        self.layers_ = _build_layers(a, names)
        self.batch_size_ = operator.batch_size
        self.regularization_ = float(operator.regularization)
        noise = None
        self.family_ = _loss_family(a)
        if self.fisher == "true":
            self.sampler_ = _sampler(a)
            rng = check_random_state(self.random_state)
            with torch.no_grad():
                out_shape = tuple(a.outputs(X[:1]).shape[1:])
            noise = self.sampler_.noise(rng, n, out_shape)
        how = "empirical" if self.fisher == "empirical" else self.fisher
        f64 = torch.float64
        A = {lay.name: torch.zeros(lay.d_in, lay.d_in, dtype=f64, device=a.device) for lay in self.layers_}
        S = {lay.name: torch.zeros(lay.d_out, lay.d_out, dtype=f64, device=a.device) for lay in self.layers_}
        positions = dict.fromkeys(A, 0)
        # The eigenvalue pass needs the same activations and output gradients: keep
        # them when they are small (they are not per-sample gradients: a Linear layer
        # applied once holds d_in + d_out numbers per sample, not d_in * d_out).
        cache, cached = [] if self.update_diagonal else None, 0
        for s in self._batches(n, progress, "K-FAC factors"):
            data = self._layer_data(X[s], Y[s], how, None if noise is None else noise[s])
            if cache is not None:
                cached += sum(act.numel() + g.numel() for act, g in data.values())
                if cached <= _CACHE_ELEMENTS:
                    cache.append(data)
                else:
                    cache = None
            for name, (act, g) in data.items():
                # one batch in the working precision, the running sums in float64
                act2, g2 = act.reshape(-1, act.shape[-1]), g.reshape(-1, g.shape[-1])
                A[name] += (act2.T @ act2).to(f64)
                S[name] += (g2.T @ g2).to(f64)
                positions[name] += act2.shape[0]
        def passes(desc):
            for k, s in enumerate(self._batches(n, progress, desc)):
                if cache is not None:
                    yield cache[k]
                else:
                    yield self._layer_data(X[s], Y[s], how, None if noise is None else noise[s])

        self.factors_, self.eigenvalues_, self.basis_, self.basis64_ = {}, {}, {}, {}
        for lay in self.layers_:
            self.factors_[lay.name] = (A[lay.name] / positions[lay.name], S[lay.name] / n)
        kron = self.factors_
        if self.update_diagonal and self.basis_iter:
            kron = self._nearest_kronecker(kron, passes)
        for lay in self.layers_:
            Af, Sf = kron[lay.name]
            la, qa = torch.linalg.eigh(0.5 * (Af + Af.T))
            ls, qs = torch.linalg.eigh(0.5 * (Sf + Sf.T))
            self.eigenvalues_[lay.name] = torch.outer(ls.clamp_min(0), la.clamp_min(0))
            self._set_basis(lay.name, qs, qa)
        if self.update_diagonal:
            diag = {name: torch.zeros_like(v) for name, v in self.eigenvalues_.items()}
            for data in passes("EK-FAC eigenvalues"):
                for name, (act, g) in data.items():
                    qs, qa = self.basis_[name]
                    aq, gq = act @ qa, g @ qs
                    if aq.shape[1] == 1:  # one position: the projected gradient is rank one
                        diag[name] += ((gq[:, :, 0] ** 2).sum(0).T @ aq[:, 0] ** 2).to(f64)
                    else:
                        for gr in gq:
                            diag[name] += (torch.einsum("bto,bti->boi", gr, aq) ** 2).sum(0).to(f64)
            self.eigenvalues_ = {name: d / n for name, d in diag.items()}
        self.penalty_ = self._penalty_diagonal()
        self._set_inverse()
        return self

    def _nearest_kronecker(self, factors: dict, passes) -> dict:
        """Move each layer's factors towards the nearest Kronecker product of its block.

        The block is ``C = sum a a^T (x) g g^T`` over samples, positions and output
        gradient columns. ``S (x) A`` is closest to it in Frobenius norm when
        ``A ~ sum <g g^T, S> a a^T`` and ``S ~ sum <a a^T, A> g g^T`` (Van Loan &
        Pitsianis, 1993); alternating these updates from the K-FAC factors is a power
        iteration for that pair. K-FAC's factors assume activations and output
        gradients independent; the weights correct for their dependence, which gives
        an eigenbasis in which the curvature is closer to diagonal. Each half of an
        iteration (A, then S) is one pass over the data; only the eigenbases are used (the eigenvalues are
        refitted), so the factors' scale does not matter and each is normalised to
        unit trace.
        """
        f64, dt = torch.float64, self.adapter_.dtype
        cur = {name: [Af / Af.trace().clamp_min(1e-300), Sf / Sf.trace().clamp_min(1e-300)]
               for name, (Af, Sf) in factors.items()}
        for _ in range(int(self.basis_iter)):
            for which in (0, 1):  # A from S, then S from the new A
                acc = {name: torch.zeros_like(v[which]) for name, v in cur.items()}
                other = {name: v[1 - which].to(dt) for name, v in cur.items()}  # weights from
                for data in passes("Kronecker basis"):
                    for name, (act, g) in data.items():
                        act2 = act.reshape(-1, act.shape[-1])  # (positions, d_in)
                        g3 = g.reshape(g.shape[0], -1, g.shape[-1])  # (columns, positions, d_out)
                        if which == 0:  # weight each position by <g g^T, S>
                            w = ((g3 @ other[name]) * g3).sum((0, 2))
                            acc[name] += ((act2 * w[:, None]).T @ act2).to(f64)
                        else:  # weight each position by <a a^T, A>
                            u = ((act2 @ other[name]) * act2).sum(1)
                            g2 = g3.reshape(-1, g3.shape[-1])
                            acc[name] += ((g3 * u[:, None]).reshape(-1, g3.shape[-1]).T @ g2).to(f64)
                for name, M in acc.items():
                    tr = float(M.trace())
                    if tr > 0:  # an all-zero update (no signal) keeps the previous factor
                        cur[name][which] = M / tr
        return {name: (Af, Sf) for name, (Af, Sf) in cur.items()}

    def _set_basis(self, name, qs, qa):
        self.basis64_[name] = (qs, qa)
        dt = self.adapter_.dtype
        self.basis_[name] = (qs.to(dt), qa.to(dt))

    def _penalty_diagonal(self) -> dict:
        """The estimator's penalty, diagonal in each layer's Kronecker eigenbasis."""
        pen = self.adapter_.penalty
        out = {}
        for lay in self.layers_:
            qs, qa = self.basis64_[lay.name]
            d = torch.zeros(lay.d_out, lay.d_in, dtype=torch.float64, device=qs.device)
            if pen.diag is not None:
                D = self.to_layer(pen.diag[None].to(torch.float64), lay)[0]
                d += (qs**2).T @ D @ qa**2
            for c, u in pen.rank_one:
                U = self.to_layer(u[None].to(torch.float64), lay)[0]
                d += c * (qs.T @ U @ qa) ** 2
            out[lay.name] = d
        return out

    def _set_inverse(self):
        self.inverse_ = {}
        for lay in self.layers_:
            denom = self.eigenvalues_[lay.name] + self.penalty_[lay.name] + self.regularization_
            # With no regularization, directions of zero curvature are left out
            # (a pseudo-inverse), as the gradients have no component along them.
            cutoff = float(denom.abs().max()) * torch.finfo(torch.float64).eps * max(denom.shape)
            if float(denom.min()) < -cutoff:
                raise NotPositiveDefiniteError(
                    f"regularization: EK-FAC eigenvalues of layer {lay.name!r} plus "
                    f"regularization={self.regularization_:g} are negative; use a "
                    "non-negative regularization."
                )
            inv = torch.where(denom > cutoff, 1.0 / denom, torch.zeros_like(denom))
            self.inverse_[lay.name] = inv.to(self.adapter_.dtype)

    # ------------------------------------------------------------ layouts
    def to_layer(self, G: torch.Tensor, lay: _Layer) -> torch.Tensor:
        """Flat vectors (k, p) -> the layer's gradient matrices (k, d_out, d_in)."""
        parts = []
        if lay.weight is not None:
            parts.append(G[:, lay.weight].reshape(G.shape[0], lay.d_out, -1))
        if lay.bias is not None:
            parts.append(G[:, lay.bias].reshape(G.shape[0], lay.d_out, 1))
        return torch.cat(parts, -1)

    def from_layers(self, mats: dict) -> torch.Tensor:
        """Per-layer matrices (k, d_out, d_in) -> flat vectors (k, p)."""
        first = next(iter(mats.values()))
        out = torch.zeros(first.shape[0], self.adapter_.n_params, dtype=first.dtype, device=first.device)
        for lay in self.layers_:
            M = mats[lay.name]
            if lay.weight is not None:
                out[:, lay.weight] = M[:, :, : M.shape[2] - (lay.bias is not None)].reshape(M.shape[0], -1)
            if lay.bias is not None:
                out[:, lay.bias] = M[:, :, -1]
        return out

    # ------------------------------------------------------------ products
    def precondition(self, name: str, G: torch.Tensor) -> torch.Tensor:
        """``(C + P + lambda I)^-1`` on a layer's gradient matrices (k, d_out, d_in)."""
        qs, qa = self.basis_[name]
        G = G.to(qs.dtype)
        return qs @ ((qs.T @ G @ qa) * self.inverse_[name]) @ qa.T

    def solve(self, G: torch.Tensor) -> torch.Tensor:
        return self.from_layers(
            {lay.name: self.precondition(lay.name, self.to_layer(G, lay)) for lay in self.layers_}
        )

    def gradients(self, X, Y) -> dict:
        """Per layer: the samples' loss gradients in factored form (activations, output
        gradients), shapes (b, T, d_in) and (b, T, d_out)."""
        return {k: (act, g[0]) for k, (act, g) in self._layer_data(X, Y).items()}

    def projected_gradients(self, X, Y) -> dict:
        """:meth:`gradients` with activations and output gradients expressed in the
        eigenbases of A and S: ``a Q_A`` and ``g Q_S``."""
        out = {}
        for name, (act, g) in self.gradients(X, Y).items():
            qs, qa = self.basis_[name]
            out[name] = (act.to(qa.dtype) @ qa, g.to(qs.dtype) @ qs)
        return out

    def test_factors(self, X, Y) -> dict:
        """Per layer: ``(C + P + lambda I)^-1 grad l`` of each sample, in the layer's
        Kronecker eigenbasis (there the inverse is diagonal), (b, d_out, d_in)."""
        out = {}
        for name, (aq, gq) in self.projected_gradients(X, Y).items():
            if aq.shape[1] == 1:
                P = gq[:, 0, :, None] * aq[:, 0, None, :]
            else:
                P = torch.einsum("bto,bti->boi", gq, aq)
            out[name] = P.mul_(self.inverse_[name])
        return out

    def from_eigenbasis(self, factors: dict) -> dict:
        """Test factors back in the parameters' own basis: ``Q_S W Q_A^T`` per layer."""
        out = {}
        for name, W in factors.items():
            qs, qa = self.basis_[name]
            out[name] = qs @ W @ qa.T
        return out

    def prepare(self, factors: dict) -> dict:
        """Lay test factors out for :meth:`pairwise` (once for all training batches).

        A layer applied once per sample is contracted over its larger dimension
        first (one matrix product with the longer inner dimension), so its factors
        are kept as (n, d_out, d_in) or transposed to (n, d_in, d_out).
        """
        out = {}
        for lay in self.layers_:
            W = factors[lay.name]
            if isinstance(W, _Prepared):
                out[lay.name] = W
            elif lay.d_in >= lay.d_out:
                out[lay.name] = _Prepared(W, transposed=False)
            else:
                out[lay.name] = _Prepared(W.transpose(1, 2).contiguous(), transposed=True)
        return out

    def pairwise(self, factors: dict, X, Y) -> dict:
        """Per layer: ``factors . grad l(x_j, y_j)`` for the batch (X, Y): (n_test, b).

        ``factors`` come from :meth:`test_factors` (or :meth:`prepare`), in the
        Kronecker eigenbasis, where the batch's activations and output gradients are
        projected too. For a layer applied once per sample the factors are contracted
        with them directly, so no per-sample gradient is formed; otherwise the
        batch's gradient matrices are formed first, which is cheaper than
        contracting at every position.
        """
        factors = self.prepare(factors)
        out = {}
        for name, (aq, gq) in self.projected_gradients(X, Y).items():
            prep = factors[name]
            W = prep.F
            q, b = W.shape[0], aq.shape[0]
            if aq.shape[1] == 1:
                # W (q, left, right) @ right-vectors, then weighted by left-vectors
                right, left = aq[:, 0], gq[:, 0]
                if prep.transposed:
                    right, left = left, right
                rightT, leftT = right.T.contiguous(), left.T.contiguous()
                d_left, d_right = W.shape[1], W.shape[2]
                step = max(1, _CHUNK_ELEMENTS // max(1, d_left * b))
                rows = []
                for c in range(0, q, step):
                    tmp = (W[c : c + step].reshape(-1, d_right) @ rightT).reshape(-1, d_left, b)
                    rows.append(tmp.mul_(leftT).sum(1))
                out[name] = torch.cat(rows) if rows else W.new_zeros(0, b)
            else:
                P = torch.einsum("bto,bti->boi", gq, aq)
                if prep.transposed:
                    P = P.transpose(1, 2)
                out[name] = W.reshape(q, -1) @ P.reshape(b, -1).T
        return out

    def self_scores(self, X, Y) -> dict:
        """Per layer: ``grad l^T (C + P + lambda I)^-1 grad l`` of each sample, (b,)."""
        out = {}
        for name, (aq, gq) in self.projected_gradients(X, Y).items():
            inv = self.inverse_[name]
            if aq.shape[1] == 1:
                out[name] = ((gq[:, 0] ** 2 @ inv) * aq[:, 0] ** 2).sum(-1)
            else:
                P = torch.einsum("bto,bti->boi", gq, aq)
                out[name] = (P**2 * inv).sum((1, 2))
        return out
