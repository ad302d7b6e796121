"""The layer types EK-FAC works on, one class each, and which layers a model offers.

A layer's per-sample gradient is the matrix ``G = sum_t g_t a_t^T`` of shape
``(d_out, d_in)``: ``a_t`` its input at position t (a 1 appended for the bias) and
``g_t`` the gradient of the loss with respect to its output there. A layer type says
how to read ``a`` and ``g`` off the captured input and output gradient, and where
the columns of ``G`` live in the flat parameter vector.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from ..._modules import parameter_owners

__all__ = ["Conv2dLayer", "LinearLayer", "build_layers", "held_fixed", "select_layers"]


class KroneckerLayer:
    """Base of the layer types: the layout of one layer's gradient matrix ``[W, b]``.

    Attributes
    ----------
    name : str
        Module name.
    d_out, d_in : int
        Shape of the gradient matrix; ``d_in`` counts the bias column.
    weight, bias : slice or None
        Where the weight and bias live in the flat parameter vector (None when that
        parameter is not selected).
    """

    module_type: type = nn.Module
    #: registered layer types, by module class
    types: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        KroneckerLayer.types[cls.module_type] = cls

    def __init__(self, name: str, module: nn.Module, weight, bias, d_out: int, d_w: int):
        self.name, self.weight, self.bias = name, weight, bias
        self.d_out = d_out
        self.d_in = (d_w if weight is not None else 0) + (1 if bias is not None else 0)

    @classmethod
    def check(cls, name: str, module: nn.Module) -> None:
        """Raise a clear error when this module cannot be handled."""

    def activations(self, inp: torch.Tensor) -> torch.Tensor:
        """Layer inputs as (b, positions, d_w)."""
        raise NotImplementedError  # pragma: no cover

    def output_gradients(self, g: torch.Tensor) -> torch.Tensor:
        """Gradients with respect to the output, (r, b, ...) -> (r, b, positions, d_out)."""
        raise NotImplementedError  # pragma: no cover

    def inputs(self, inp: torch.Tensor) -> torch.Tensor:
        """:meth:`activations` with the bias column appended where the bias is selected."""
        act = self.activations(inp)
        parts = [act] if self.weight is not None else []
        if self.bias is not None:
            parts.append(torch.ones((*act.shape[:-1], 1), dtype=act.dtype, device=act.device))
        return torch.cat(parts, -1)

    # ------------------------------------------------------------ layout
    def to_matrix(self, G: torch.Tensor) -> torch.Tensor:
        """Flat vectors (k, p) -> this layer's gradient matrices (k, d_out, d_in)."""
        parts = []
        if self.weight is not None:
            parts.append(G[:, self.weight].reshape(G.shape[0], self.d_out, -1))
        if self.bias is not None:
            parts.append(G[:, self.bias].reshape(G.shape[0], self.d_out, 1))
        return torch.cat(parts, -1)

    def put(self, out: torch.Tensor, M: torch.Tensor) -> None:
        """Write this layer's matrices (k, d_out, d_in) into flat vectors ``out``."""
        if self.weight is not None:
            out[:, self.weight] = M[:, :, : M.shape[2] - (self.bias is not None)].reshape(M.shape[0], -1)
        if self.bias is not None:
            out[:, self.bias] = M[:, :, -1]


class LinearLayer(KroneckerLayer):
    """``nn.Linear``: one position per leading index of its input."""

    module_type = nn.Linear

    def __init__(self, name, module, weight, bias):
        d_out, d_w = module.weight.shape
        super().__init__(name, module, weight, bias, int(d_out), int(d_w))

    def activations(self, inp):
        return inp.reshape(inp.shape[0], -1, inp.shape[-1])

    def output_gradients(self, g):
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


class Conv2dLayer(KroneckerLayer):
    """``nn.Conv2d`` (KFC): the unfolded input patches at each output pixel."""

    module_type = nn.Conv2d

    def __init__(self, name, module, weight, bias):
        super().__init__(
            name, module, weight, bias, module.out_channels,
            module.in_channels * int(np.prod(module.kernel_size)),
        )
        self.kernel_size, self.stride = _pair(module.kernel_size), _pair(module.stride)
        self.padding, self.dilation = module.padding, _pair(module.dilation)

    @classmethod
    def check(cls, name, module):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(
                f"layers: {_describe(name, module)} has groups={module.groups}, "
                f"padding_mode={module.padding_mode!r}; EK-FAC supports convolutions with "
                "groups=1 and zero padding. Leave it out with layers=."
            )

    def activations(self, x):
        padding = self.padding
        if isinstance(padding, str):
            pads = [0, 0, 0, 0]
            if padding == "same":  # stride 1; the extra pixel of an even kernel goes right
                for axis, (k, d) in enumerate(zip(self.kernel_size, self.dilation, strict=True)):
                    total = d * (k - 1)
                    pads[2 - 2 * axis], pads[3 - 2 * axis] = total // 2, total - total // 2
            x = F.pad(x, pads)
            padding = 0
        cols = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)
        return cols.transpose(1, 2)

    def output_gradients(self, g):
        return g.reshape(g.shape[0], g.shape[1], g.shape[2], -1).transpose(-1, -2)


def _describe(name: str, m: nn.Module) -> str:
    return f"{name or '<root>'} ({type(m).__name__})"


def _supported(m: nn.Module) -> bool:
    return type(m) in KroneckerLayer.types or isinstance(m, tuple(KroneckerLayer.types))


def _layer_type(m: nn.Module) -> type:
    for mtype, cls in KroneckerLayer.types.items():
        if isinstance(m, mtype):
            return cls
    raise KeyError(type(m).__name__)  # pragma: no cover - callers check _supported


def held_fixed(module: nn.Module, param_names) -> list[str]:
    """The selected parameters EK-FAC holds fixed: the affine parameters (weight
    and bias) of BatchNorm layers.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> held_fixed(net, ["0.weight", "0.bias", "1.weight", "1.bias"])
    ['1.weight', '1.bias']
    """
    owners = parameter_owners(module)
    return [n for n in param_names if n in owners and isinstance(owners[n][1], _BatchNorm)]


def select_layers(module: nn.Module, param_names, layers=None) -> tuple[list[str], list[str]]:
    """The layers EK-FAC works on and the parameters they take into account.

    The affine parameters of BatchNorm layers are left out (held fixed, see
    :func:`held_fixed`), whether or not they are selected.

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
    owners = {n: (mname, m) for n, (mname, m, _) in parameter_owners(module).items()}
    fixed = held_fixed(module, param_names)
    selected = [n for n in param_names if n in owners and n not in fixed]
    if not selected and fixed:
        raise ValueError(
            f"params: the selected parameters {fixed} all belong to BatchNorm layers, "
            "whose affine parameters EK-FAC holds fixed; select parameters of nn.Linear "
            "or nn.Conv2d layers, or use another method (e.g. CgInfluenceScorer)."
        )
    if layers is None:
        names = []
        for n in selected:
            mname = owners[n][0]
            if mname not in names:
                names.append(mname)
        mods = {m: module.get_submodule(m) for m in names}
        bad = [_describe(m, mod) for m, mod in mods.items() if not _supported(mod)]
        if bad:
            ok = [m for m, mod in mods.items() if _supported(mod)]
            raise ValueError(
                "layers: EK-FAC supports nn.Linear and nn.Conv2d layers only, but the "
                f"selected parameters also belong to {bad}. Pass layers={ok} to leave "
                "them out (their parameters are then held fixed), or params= to select "
                "parameters of supported layers only."
            )
    else:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        if not wanted:
            raise ValueError(
                "layers: an empty list selects no layer; pass module names, or None for "
                "every layer holding a selected parameter."
            )
        names = []
        for w in wanted:
            if not isinstance(w, str):
                raise ValueError(f"layers: entries must be module names (str), got {w!r}.")
            try:
                m = module.get_submodule(w)
            except AttributeError as exc:
                avail = [n for n, mm in module.named_modules() if _supported(mm)]
                raise ValueError(
                    f"layers: {w!r} is not a submodule of the model. Its nn.Linear and "
                    f"nn.Conv2d layers are {avail}."
                ) from exc
            if not _supported(m):
                why = (" (the affine parameters of BatchNorm layers are held fixed)"
                       if isinstance(m, _BatchNorm) else "")
                raise ValueError(
                    f"layers: {_describe(w, m)} is not supported; EK-FAC handles "
                    f"nn.Linear and nn.Conv2d layers only{why}."
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
        _layer_type(m).check(name, m)
    chosen = set(names)
    return names, [n for n in selected if owners[n][0] in chosen]


def build_layers(adapter, names: list[str]) -> list[KroneckerLayer]:
    """One layer object per module name, with its place in the adapter's flat layout."""
    offsets, o = {}, 0
    for n, k in zip(adapter.param_names, adapter.sizes, strict=True):
        offsets[n] = slice(o, o + k)
        o += k
    out = []
    for name in names:
        m = adapter.module.get_submodule(name)
        prefix = f"{name}." if name else ""
        out.append(_layer_type(m)(name, m, offsets.get(prefix + "weight"), offsets.get(prefix + "bias")))
    return out
