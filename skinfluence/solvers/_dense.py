"""The dense p x p curvature of the Direct method.

Two paths: a structured exact Hessian for models whose selected parameters are
``nn.Linear`` layers that each run once (per-sample Jacobians of the layers' output
gradients and inputs with respect to each layer's output, contracted in BLAS), and
otherwise symmetric block rows of forward-over-reverse products (exact Hessian) or
Gauss-Newton products with blocks of basis vectors; the empirical Fisher is the sum of
the outer products of per-sample gradients, one batch at a time. Only the Direct method forms the
p x p matrix.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from .._adapters import ModelAdapter
from .._gradients import batch_slices, curvature_mv, per_sample_grads
from .._modules import hooked, parameter_owners, shares_parameters

__all__ = ["dense_curvature"]


def dense_curvature(
    adapter: ModelAdapter,
    X: torch.Tensor,
    Y: torch.Tensor,
    curvature: str,
    batch_size: int,
    block: int = 512,
    progress=None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The curvature of the MEAN loss over (X, Y) as a dense p x p matrix.

    With ``weights`` (n,), of the weighted mean ``sum_i w_i l_i / sum_i w_i``.

    Built from products with blocks of at most ``block`` basis vectors, over batches
    of ``batch_size`` samples, so peak memory is about ``block * batch_size``
    activations plus the p x p result. For the exact Hessian only the blocks on and
    above the diagonal (in the order of the parameter tensors) are computed, with the
    other tensors held constant, and the rest filled in by symmetry.
    """
    p, n = adapter.n_params, X.shape[0]
    total = float(n) if weights is None else float(weights.sum(dtype=torch.float64))

    def w(s):
        return None if weights is None else weights[s]

    H = torch.zeros(p, p, dtype=adapter.dtype, device=adapter.device)
    if curvature == "empirical-fisher":
        # the mean outer product of per-sample gradients, one batch of them at a time
        steps = list(batch_slices(n, batch_size))
        for s in steps if progress is None else progress(steps, desc="empirical Fisher"):
            G = per_sample_grads(adapter, X[s], Y[s])
            H += G.T @ (G if weights is None else G * weights[s, None].to(G.dtype))
        return H / total
    if curvature == "exact":
        plan = _linear_plan(adapter, X)
        if plan is not None:
            return _linear_hessian(adapter, X, Y, plan, batch_size, progress, weights)
        steps = [
            (s, t, b)
            for s in batch_slices(n, batch_size)
            for t in range(len(adapter.param_names))
            for b in batch_slices(adapter.sizes[t], block)
        ]
        offsets = _offsets(adapter)
        for s, t, b in steps if progress is None else progress(steps, desc="Hessian"):
            rows = _hessian_rows(adapter, X[s], Y[s], t, b, w(s))
            r0, c0 = offsets[t] + b.start, offsets[t]
            H[r0 : r0 + rows.shape[0], c0:] += rows
        upper = torch.triu(H)
        H = upper + upper.T - torch.diag(torch.diagonal(H))
        # the diagonal blocks were computed whole: use them whole
        for t in range(len(adapter.sizes)):
            sl = slice(offsets[t], offsets[t + 1])
            blk = H[sl, sl]
            H[sl, sl] = 0.5 * (blk + blk.T)
        return H / total
    plan = _linear_plan(adapter, X, output_layer=True)
    if plan is not None:
        # the output is linear in the parameters: Gauss-Newton = Hessian
        return _linear_hessian(adapter, X, Y, plan, batch_size, progress, weights)
    eye = torch.eye(p, dtype=adapter.dtype, device=adapter.device)
    steps = [(s, b) for s in batch_slices(n, batch_size) for b in batch_slices(p, block)]
    for s, b in steps if progress is None else progress(steps, desc="Gauss-Newton"):
        H[b] += curvature_mv(adapter, X[s], Y[s], eye[b], curvature, w(s))
    H /= total
    return 0.5 * (H + H.T)


def _hessian_rows(adapter: ModelAdapter, X, Y, t: int, b: slice, weights=None) -> torch.Tensor:
    """Rows of the summed (weighted, with ``weights``) loss Hessian for entries ``b`` of parameter tensor ``t``,
    against tensor ``t`` and every later one: shape (len(b), sum of their sizes).

    Tensors before ``t`` are closed over as constants, so neither the forward
    tangents nor the backward pass touch more of the model than these rows need.
    """
    names = adapter.param_names
    name, later = names[t], names[t:]
    fixed = {n: adapter.params[n] for n in names[:t]}

    def grads_of_later(theta_t):
        def loss(lp):
            full = {**fixed, **lp}
            losses = vmap(adapter.sample_loss, in_dims=(None, 0, 0))(full, X, Y)
            return losses.sum() if weights is None else (weights.to(losses.dtype) * losses).sum()

        lp = {n: adapter.params[n] for n in later}
        lp[name] = theta_t
        g = grad(loss)(lp)
        return torch.cat([g[n].reshape(-1) for n in later])

    shape = adapter.params[name].shape
    k = adapter.sizes[t]
    E = torch.zeros(b.stop - b.start, k, dtype=adapter.dtype, device=adapter.device)
    E[torch.arange(E.shape[0]), torch.arange(b.start, b.stop)] = 1.0
    theta_t = adapter.params[name]
    try:
        return _forward_rows(grads_of_later, theta_t, E, shape)
    except RuntimeError:
        # Some layers' forward-mode derivatives fail under vmap (tangent shapes that
        # differ from the primal's, seen with nn.Conv1d): reverse mode gives the
        # same rows, at the cost of the whole block of the Jacobian.
        J = jacrev(grads_of_later)(theta_t).reshape(-1, k)  # (later, k)
        return J.T[b.start : b.stop]


def _forward_rows(f, theta, E, shape):
    """Rows ``d f / d theta`` along the basis vectors ``E`` (forward over reverse)."""
    return vmap(lambda v: jvp(f, (theta,), (v.reshape(shape),))[1])(E)


def _offsets(adapter: ModelAdapter) -> list[int]:
    offsets = [0]
    for k in adapter.sizes:
        offsets.append(offsets[-1] + k)
    return offsets


def _linear_plan(adapter: ModelAdapter, X: torch.Tensor, output_layer: bool = False):
    """Linear layers in forward order, when the structured exact Hessian applies.

    It applies when every selected parameter is the weight or bias of an
    ``nn.Linear`` that runs exactly once per forward pass on 2-d input and shares no
    tensor with another module. Returns [(layer, weight name or None, bias name or
    None)] in the order the layers run, or None. With ``output_layer=True`` it also
    requires a single such layer whose output is the model's output, unchanged: the
    output is then linear in the selected parameters, and the Gauss-Newton matrix
    equals the Hessian (a linear model, or the last layer of a network).
    """
    module = adapter.module
    if shares_parameters(module):
        return None
    owner = {
        n: (m, pname) for n, (_, m, pname) in parameter_owners(module).items()
        if isinstance(m, nn.Linear)
    }
    if not all(n in owner for n in adapter.param_names):
        return None
    layers = {id(owner[n][0]): owner[n][0] for n in adapter.param_names}
    if output_layer and len(layers) != 1:
        return None
    calls, shapes, outputs = [], [], []

    def record(key, x, output):
        calls.append(key)
        shapes.append(x.dim())
        outputs.append(output)

    with torch.no_grad(), adapter.eval_mode(), hooked(layers, record):
        final = functional_call(module, {**adapter.params, **adapter.frozen}, (X[:2],))
    if sorted(calls) != sorted(layers) or len(set(calls)) != len(calls) or set(shapes) != {2}:
        return None
    if output_layer and not (outputs[0] is final and getattr(adapter.output_transform, "is_linear", False)):
        return None
    plan = []
    for i in calls:
        names = {owner[n][1]: n for n in adapter.param_names if owner[n][0] is layers[i]}
        plan.append((layers[i], names.get("weight"), names.get("bias")))
    return plan


def _linear_hessian(adapter, X, Y, plan, batch_size, progress, weights=None):
    """Exact Hessian of the mean (weighted mean) loss for a model whose parameters
    are Linear layers.

    For Linear layers t and c (c running at or after t), with z = W a + b, the
    output gradient delta = dl/dz, and everything per sample,

        d grad_{W_c} / dW_t[o, k] = a_t[k] * (d delta_c / dz_t[o] a_c^T
                                             + delta_c (d a_c / dz_t[o])^T),

    because a layer that runs once affects the loss, and every gradient at or after
    it, only through its output z_t. So each block needs, per sample, the small
    Jacobians d delta_c / dz_t and d a_c / dz_t (out_t forward-mode tangents), then
    matrix products with the layer inputs: about n * p^2 multiply-adds in BLAS,
    instead of a forward and backward pass per parameter. Blocks of earlier layers
    against later ones give the rest by symmetry.
    """
    names = adapter.param_names
    offsets = _offsets(adapter)
    start = {n: offsets[i] for i, n in enumerate(names)}
    size = dict(zip(names, adapter.sizes, strict=True))
    p, n = adapter.n_params, X.shape[0]
    total = float(n) if weights is None else float(weights.sum(dtype=torch.float64))
    H = torch.zeros(p, p, dtype=adapter.dtype, device=adapter.device)

    def put(r, c, block):
        if r is None or c is None:
            return
        H[start[r] : start[r] + size[r], start[c] : start[c] + size[c]] += block.reshape(size[r], size[c])
        if r != c:
            H[start[c] : start[c] + size[c], start[r] : start[r] + size[r]] += block.reshape(size[r], size[c]).T

    steps = [(s, t) for s in batch_slices(n, batch_size) for t in range(len(plan))]
    for s, t in steps if progress is None else progress(steps, desc="Hessian"):
        ws = None if weights is None else weights[s]
        a, deltas, d_delta, d_a = _layer_jacobians(adapter, X[s], Y[s], plan, t, ws)
        _, wt, bt = plan[t]
        at = a[0]  # (b, in_t)
        for k, (_, wc, bc) in enumerate(plan[t:]):
            Dd = d_delta[k]  # (b, out_t, out_c): d delta_c / d z_t
            if k == 0:
                # sum_i at[i,k] at[i,j] Dd[i,o,q] as one matrix product
                b_, d_ = at.shape
                M = (at[:, :, None] * Dd.reshape(b_, 1, -1)).reshape(b_, -1)
                ww = (at.T @ M).reshape(d_, d_, *Dd.shape[1:])  # (j, k, o, q)
                put(wt, wc, ww.permute(2, 1, 3, 0))
                put(wt, bc, torch.einsum("ik,ioq->okq", at, Dd))
                put(bt, bc, Dd.sum(0))
                continue
            ac, dc, Da = a[k], deltas[k], d_a[k]  # (b, in_c), (b, out_c), (b, out_t, in_c)
            if wc is not None:
                first = torch.einsum("ioq,ij->ioqj", Dd, ac) + torch.einsum("iq,ioj->ioqj", dc, Da)
                put(wt, wc, torch.einsum("ik,ioqj->okqj", at, first) if wt is not None else None)
                put(bt, wc, first.sum(0))
            put(wt, bc, torch.einsum("ik,ioq->okq", at, Dd))
            put(bt, bc, Dd.sum(0))
    return 0.5 * (H + H.T) / total


def _layer_jacobians(adapter, X, Y, plan, t, weights=None):
    """Per-sample inputs a_c, output gradients delta_c, and their Jacobians with
    respect to layer t's output z_t, for the layers c = t, t+1, ... of ``plan``.

    With ``weights``, each sample's loss is multiplied by its weight (so the output
    gradients and their Jacobians are, the inputs and theirs are not)."""
    later = [layer for layer, _, _ in plan[t:]]
    holder = {"eps": {}, "a": {}}

    def inject(key, x, output):
        holder["a"][key] = x
        e = holder["eps"].get(key)
        return None if e is None else output + e

    layers = {id(m): m for m in later}
    # sizes from the weights, which may have been replaced by tensors of other shapes
    width = [layer.weight.shape[0] for layer in later]
    with hooked(layers, inject):
        zeros = [torch.zeros(w, dtype=adapter.dtype, device=adapter.device) for w in width]

        def deltas_and_inputs(e, x, y, w):
            def loss(z0):
                holder["eps"] = {id(m): z0[k] + (e if k == 0 else 0) for k, m in enumerate(later)}
                holder["a"] = {}
                value = adapter.sample_loss(adapter.params, x, y) * w
                return value, [holder["a"][id(m)].reshape(-1) for m in later]

            d, a = grad(loss, has_aux=True)(zeros)
            return d, a

        basis = torch.eye(width[0], dtype=adapter.dtype, device=adapter.device)

        def per_sample(x, y, w):
            def along(v):
                return jvp(lambda e: deltas_and_inputs(e, x, y, w), (zeros[0],), (v,))

            (d, a), (dd, da) = vmap(along)(basis)
            return [q[0] for q in a], [q[0] for q in d], dd, da

        W = (torch.ones(X.shape[0], dtype=adapter.dtype, device=adapter.device)
             if weights is None else weights.to(adapter.dtype))
        a, d, dd, da = vmap(per_sample)(X, Y, W)
    holder.clear()
    # a[k]: (b, in_c); d[k]: (b, out_c); dd[k]: (b, out_t, out_c); da[k]: (b, out_t, in_c)
    return a, d, dd, da
