"""Derivatives of the training loss, all through ``torch.func``.

Every function works on one batch of samples and returns a tensor; loops over
batches live in the callers, which decide how much memory a step may take. Vectors
in parameter space are flat, laid out as ``ModelAdapter.flatten`` does, and batches
of vectors are stacked on the first dimension: ``V`` has shape (k, p).

* ``per_sample_grads``: gradient of each sample's loss, (b, p).
* ``curvature_mv``: products ``V @ C`` with C the Hessian ("exact") or the generalized
  Gauss-Newton matrix ("gauss-newton") of the loss summed over the batch.
* ``mixed_projection``: for perturbation mode, the derivative with respect to each
  input ``x_j`` of ``F @ grad_theta l(x_j, y_j)``, (b, m, *x_shape).
* ``dense_curvature``: the p x p matrix, one block of basis vectors at a time (only
  the Direct method calls it).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

from ._adapters import ModelAdapter

CURVATURES = ("exact", "gauss-newton")


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def per_sample_grads(adapter: ModelAdapter, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Per-sample loss gradients of a batch, shape (b, p)."""
    g = vmap(grad(adapter.sample_loss), in_dims=(None, 0, 0))(adapter.params, X, Y)
    return adapter.flatten(g, batched=True)


def _summed_loss(adapter: ModelAdapter, X, Y):
    def f(flat):
        losses = vmap(adapter.sample_loss, in_dims=(None, 0, 0))(adapter.unflatten(flat), X, Y)
        return losses.sum()

    return f


def _outputs(adapter: ModelAdapter, X):
    def f(flat):
        return vmap(adapter.sample_output, in_dims=(None, 0))(adapter.unflatten(flat), X)

    return f


def curvature_mv(
    adapter: ModelAdapter, X: torch.Tensor, Y: torch.Tensor, V: torch.Tensor, curvature: str
) -> torch.Tensor:
    """``V @ C_batch`` for the loss SUMMED over the batch; V has shape (k, p)."""
    theta = adapter.flat_params()
    if curvature == "exact":
        g = grad(_summed_loss(adapter, X, Y))
        return vmap(lambda v: jvp(g, (theta,), (v,))[1])(V)
    outputs = _outputs(adapter, X)
    out, vjp_fn = vjp(outputs, theta)  # out: (b, 1, ...)
    # Hessian of each sample's loss with respect to its own output.
    out_shape = out.shape[1:]
    H_out = vmap(hessian(lambda o, y: adapter.output_loss(o, y.unsqueeze(0))))(out, Y)
    d = out_shape.numel()
    H_out = H_out.reshape(out.shape[0], d, d)
    Jv = vmap(lambda v: jvp(outputs, (theta,), (v,))[1])(V)  # (k, b, 1, ...)
    HJv = torch.einsum("bij,kbj->kbi", H_out, Jv.reshape(V.shape[0], out.shape[0], d))
    return vmap(lambda u: vjp_fn(u.reshape(out.shape))[0])(HJv)


def dense_curvature(
    adapter: ModelAdapter,
    X: torch.Tensor,
    Y: torch.Tensor,
    curvature: str,
    batch_size: int,
    block: int = 512,
    progress=None,
) -> torch.Tensor:
    """The curvature of the MEAN loss over (X, Y) as a dense p x p matrix.

    Built from products with blocks of at most ``block`` basis vectors, over batches
    of ``batch_size`` samples, so peak memory is about ``block * batch_size``
    activations plus the p x p result. For the exact Hessian only the blocks on and
    above the diagonal (in the order of the parameter tensors) are computed, with the
    other tensors held constant, and the rest filled in by symmetry.
    """
    p, n = adapter.n_params, X.shape[0]
    H = torch.zeros(p, p, dtype=adapter.dtype, device=adapter.device)
    if curvature == "exact":
        steps = [
            (s, t, b)
            for s in batch_slices(n, batch_size)
            for t in range(len(adapter.param_names))
            for b in batch_slices(adapter.sizes[t], block)
        ]
        offsets = _offsets(adapter)
        for s, t, b in steps if progress is None else progress(steps, desc="Hessian"):
            rows = _hessian_rows(adapter, X[s], Y[s], t, b)
            r0, c0 = offsets[t] + b.start, offsets[t]
            H[r0 : r0 + rows.shape[0], c0:] += rows
        upper = torch.triu(H)
        H = upper + upper.T - torch.diag(torch.diagonal(H))
        # the diagonal blocks were computed whole: use them whole
        for t in range(len(adapter.sizes)):
            sl = slice(offsets[t], offsets[t + 1])
            blk = H[sl, sl]
            H[sl, sl] = 0.5 * (blk + blk.T)
        return H / n
    eye = torch.eye(p, dtype=adapter.dtype, device=adapter.device)
    steps = [(s, b) for s in batch_slices(n, batch_size) for b in batch_slices(p, block)]
    for s, b in steps if progress is None else progress(steps, desc="Gauss-Newton"):
        H[b] += curvature_mv(adapter, X[s], Y[s], eye[b], curvature)
    H /= n
    return 0.5 * (H + H.T)


def _hessian_rows(adapter: ModelAdapter, X, Y, t: int, b: slice) -> torch.Tensor:
    """Rows of the summed-loss Hessian for entries ``b`` of parameter tensor ``t``,
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
            return vmap(adapter.sample_loss, in_dims=(None, 0, 0))(full, X, Y).sum()

        lp = {n: adapter.params[n] for n in later}
        lp[name] = theta_t
        g = grad(loss)(lp)
        return torch.cat([g[n].reshape(-1) for n in later])

    shape = adapter.params[name].shape
    k = adapter.sizes[t]
    E = torch.zeros(b.stop - b.start, k, dtype=adapter.dtype, device=adapter.device)
    E[torch.arange(E.shape[0]), torch.arange(b.start, b.stop)] = 1.0
    theta_t = adapter.params[name]
    return vmap(lambda v: jvp(grads_of_later, (theta_t,), (v.reshape(shape),))[1])(E)


def mixed_projection(
    adapter: ModelAdapter, X: torch.Tensor, Y: torch.Tensor, F: torch.Tensor
) -> torch.Tensor:
    """d/dx_j of ``F @ grad_theta l(x_j, y_j)`` for each sample j: (b, m, *x_shape)."""

    def proj(x, y):
        g = grad(adapter.sample_loss)(adapter.params, x, y)
        return F @ adapter.flatten(g)

    jac = jacfwd(proj) if X[0].numel() <= F.shape[0] else jacrev(proj)
    return vmap(jac)(X, Y)


def _offsets(adapter: ModelAdapter) -> list[int]:
    offsets = [0]
    for k in adapter.sizes:
        offsets.append(offsets[-1] + k)
    return offsets
