"""Where parameters live in a torch module, and capture of layer inputs and outputs.

Used by both the structured dense curvature of the Direct method and EK-FAC: which
module owns each parameter, and forward hooks that record a layer's input and make
its output differentiable, registered for one pass and always removed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["capture", "hooked", "parameter_owners", "shares_parameters"]


def parameter_owners(module: nn.Module) -> dict:
    """Parameter name -> (module name, module, local name) of the module holding it.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> parameter_owners(net)["1.bias"][:1]
    ('1',)
    """
    owners = {}
    for mname, m in module.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = (mname, m, pname)
    return owners


def shares_parameters(module: nn.Module) -> bool:
    """Whether some parameter tensor is registered under more than one name.

    Examples
    --------
    >>> import torch
    >>> shares_parameters(torch.nn.Linear(2, 2))
    False
    """
    return len(list(module.named_parameters(remove_duplicate=False))) != len(
        list(module.named_parameters())
    )


@contextlib.contextmanager
def hooked(layers: dict, on_call):
    """Call ``on_call(name, input, output)`` on every call of the given layers while
    the block runs; a result other than None replaces the layer's output. The hooks
    are removed on exit, whatever happens.

    Parameters
    ----------
    layers : dict of str to nn.Module
        The layers to watch, by name.
    on_call : callable
        ``on_call(name, input, output) -> output or None``.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1)
    >>> seen = []
    >>> with hooked({"lin": lin}, lambda name, x, out: seen.append((name, x.shape))):
    ...     _ = lin(torch.ones(4, 2))
    >>> seen, lin._forward_hooks
    ([('lin', torch.Size([4, 2]))], OrderedDict())
    """
    handles = []
    try:
        for n, m in layers.items():
            handles.append(
                m.register_forward_hook(lambda mod, inputs, out, n=n: on_call(n, inputs[0], out))
            )
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(layers: dict):
    """Record each layer's inputs and make its outputs differentiable.

    Each call of a watched layer stores its (detached) input and a zero tensor
    ``z`` that requires grad and is added to the output, so that ``d loss / d z``
    is the gradient with respect to the layer's output even when no parameter
    requires grad.

    Parameters
    ----------
    layers : dict of str to nn.Module
        The layers to watch, by name.

    Yields
    ------
    records : dict of str to list
        Per layer, one ``(input, z)`` per call.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1)
    >>> with capture({"lin": lin}) as rec:
    ...     _ = lin(torch.ones(4, 2))
    >>> rec["lin"][0][0].shape, lin._forward_hooks
    (torch.Size([4, 2]), OrderedDict())
    """
    records = {n: [] for n in layers}

    def on_call(name, x, output):
        z = torch.zeros_like(output, requires_grad=True)
        records[name].append((x.detach(), z))
        return output + z

    with hooked(layers, on_call):
        yield records
