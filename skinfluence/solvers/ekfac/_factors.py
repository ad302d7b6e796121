"""The passes over the training data that build EK-FAC's curvature factors.

1. K-FAC factors per layer (KFC for convolutions, Grosse & Martens 2016):
   ``A = E[a a^T]`` averaged over samples and positions, ``S = E[sum_t g_t g_t^T]``
   summed over positions and averaged over samples.
2. ``basis_iter`` alternating updates that move the factors towards the nearest
   Kronecker product of the layer's block (Van Loan & Pitsianis, 1993), which gives a
   better eigenbasis.
3. The eigenvalue correction (George et al., 2018): the second moments of the
   per-sample gradients projected on the Kronecker eigenbasis,
   ``E[(Q_S^T G Q_A)[o, i]^2]``.

With sample weights every average is the weighted one: the output gradients of a
sample are scaled by the square root of its weight (so that ``g g^T`` carries the
weight once), its activations are not, and ``A`` weighs each sample's positions by
the sample's weight.

Activations and output gradients of a batch are kept between passes while they fit
in ``CACHE_ELEMENTS`` numbers (twice as many in a 16-bit ``kronecker_dtype``: the
memory of as many float32 numbers); beyond that every pass recomputes them.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from ..._gradients import batch_slices
from ..._modules import capture
from ._fisher import output_cotangents

__all__ = ["CACHE_ELEMENTS", "Passes", "layer_data"]

#: Activations and output gradients kept between the passes of fit, at most.
CACHE_ELEMENTS = 1 << 25


def cache_limit(dtype) -> int:
    """Numbers of ``dtype`` the cache holds: twice ``CACHE_ELEMENTS`` in 16 bits."""
    return CACHE_ELEMENTS * (2 if dtype is not None and dtype.itemsize == 2 else 1)


def layer_data(adapter, layers, X, Y, how="empirical", family=None, sampler=None, noise=None,
               weights=None) -> dict:
    """Per layer: activations (b, T, d_in) and output gradients (r, b, T, d_out), the
    latter scaled by the square roots of the samples' ``weights`` (b,) when given."""
    names = [lay.name for lay in layers]
    modules = {n: adapter.module.get_submodule(n) for n in names}
    with capture(modules) as rec, torch.enable_grad():
        out = adapter.output_transform(
            functional_call(adapter.module, {**adapter.params, **adapter.frozen}, (X,))
        )
        unused = [n for n in names if not rec[n]]
        if unused:
            raise ValueError(
                f"layers: {unused} are not called by the model's forward pass; leave "
                "them out with layers=."
            )
        cot = output_cotangents(adapter, out.detach(), Y, how, family, sampler, noise)
        if weights is not None:
            root = weights.to(cot.dtype).clamp_min(0).sqrt()
            cot = cot * root.reshape(1, -1, *[1] * (cot.dim() - 2))
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
    for lay in layers:
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
            acts.append(lay.inputs(inp))
            grads.append(lay.output_gradients(g))
        data[lay.name] = (torch.cat(acts, 1), torch.cat(grads, 2))
    return data


class Passes:
    """Batches of layer data over the training set, cached when they are small."""

    def __init__(self, solver, X, Y, how, noise, progress, weights=None, dtype=None):
        self.solver, self.X, self.Y, self.how, self.noise = solver, X, Y, how, noise
        self.progress, self.weights, self.dtype = progress, weights, dtype
        self.steps = list(batch_slices(X.shape[0], solver.batch_size_))
        self.cache = None

    @property
    def total_weight(self) -> float:
        """The training points' total weight (their number, unweighted)."""
        total = float(self.X.shape[0]) if self.weights is None else float(self.weights.sum(dtype=torch.float64))
        return total if total > 0 else 1.0

    def _compute(self, s):
        sol = self.solver
        data = layer_data(
            sol.adapter_, sol.layers_, self.X[s], self.Y[s], self.how, sol.family_,
            sol.sampler_, None if self.noise is None else self.noise[s],
            None if self.weights is None else self.weights[s],
        )
        if self.dtype is None:
            return data
        # the products of every pass run in ``kronecker_dtype``; so does the cache
        return {name: (act.to(self.dtype), g.to(self.dtype)) for name, (act, g) in data.items()}

    def first(self, desc: str, keep: bool):
        """The first pass; ``keep`` asks to cache the data for later passes."""
        cache, cached = ([] if keep else None), 0
        limit = cache_limit(self.dtype)
        for s in self._steps(desc):
            data = self._compute(s)
            if cache is not None:
                cached += sum(act.numel() + g.numel() for act, g in data.values())
                if cached <= limit:
                    cache.append(data)
                else:
                    cache = None
            yield data
        self.cache = cache

    def again(self, desc: str):
        for k, s in enumerate(self._steps(desc)):
            yield self.cache[k] if self.cache is not None else self._compute(s)

    def _steps(self, desc):
        return self.steps if self.progress is None else self.progress(self.steps, desc)


def kfac_factors(passes: Passes, layers, keep: bool, device) -> dict:
    """K-FAC factors ``(A, S)`` per layer, in float64."""
    f64 = torch.float64
    A = {lay.name: torch.zeros(lay.d_in, lay.d_in, dtype=f64, device=device) for lay in layers}
    S = {lay.name: torch.zeros(lay.d_out, lay.d_out, dtype=f64, device=device) for lay in layers}
    positions = dict.fromkeys(A, 0.0)
    for s, data in zip(passes.steps, passes.first("K-FAC factors", keep), strict=True):
        w = None if passes.weights is None else passes.weights[s]
        for name, (act, g) in data.items():
            # one batch in the working precision, the running sums in float64
            act2, g2 = act.reshape(-1, act.shape[-1]), g.reshape(-1, g.shape[-1])
            if w is None:
                A[name] += (act2.T @ act2).to(f64)
                positions[name] += act2.shape[0]
            else:  # each sample's positions weighed by the sample's weight
                wr = w.to(act.dtype)[:, None].expand(act.shape[0], act.shape[1]).reshape(-1)
                A[name] += ((act2 * wr[:, None]).T @ act2).to(f64)
                positions[name] += float(wr.sum())
            S[name] += (g2.T @ g2).to(f64)
    n = passes.total_weight
    return {lay.name: (A[lay.name] / max(positions[lay.name], 1e-300), S[lay.name] / n) for lay in layers}


def nearest_kronecker(factors: dict, passes: Passes, basis_iter: int, dtype) -> dict:
    """Move each layer's factors towards the nearest Kronecker product of its block.

    The block is ``C = sum a a^T (x) g g^T`` over samples, positions and output
    gradient columns. ``S (x) A`` is closest to it in Frobenius norm when
    ``A ~ sum <g g^T, S> a a^T`` and ``S ~ sum <a a^T, A> g g^T`` (Van Loan &
    Pitsianis, 1993); alternating these updates from the K-FAC factors is a power
    iteration for that pair. K-FAC's factors assume activations and output
    gradients independent; the weights correct for their dependence, which gives
    an eigenbasis in which the curvature is closer to diagonal. Each half of an
    iteration (A, then S) is one pass over the data; only the eigenbases are used
    (the eigenvalues are refitted), so the factors' scale does not matter and each
    is normalised to unit trace.
    """
    f64 = torch.float64
    cur = {name: [Af / Af.trace().clamp_min(1e-300), Sf / Sf.trace().clamp_min(1e-300)]
           for name, (Af, Sf) in factors.items()}
    for _ in range(int(basis_iter)):
        for which in (0, 1):  # A from S, then S from the new A
            acc = {name: torch.zeros_like(v[which]) for name, v in cur.items()}
            other = {name: v[1 - which].to(dtype) for name, v in cur.items()}  # weights from
            for data in passes.again("Kronecker basis"):
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


def corrected_eigenvalues(passes: Passes, basis: dict, template: dict) -> dict:
    """EK-FAC's eigenvalues: second moments of the gradients in each eigenbasis."""
    f64 = torch.float64
    diag = {name: torch.zeros_like(v) for name, v in template.items()}
    for data in passes.again("EK-FAC eigenvalues"):
        for name, (act, g) in data.items():
            qs, qa = basis[name]
            aq, gq = act @ qa, g @ qs
            if aq.shape[1] == 1:  # one position: the projected gradient is rank one
                diag[name] += ((gq[:, :, 0] ** 2).sum(0).T @ aq[:, 0] ** 2).to(f64)
            else:
                for gr in gq:
                    diag[name] += (torch.einsum("bto,bti->boi", gr, aq) ** 2).sum(0).to(f64)
    n = passes.total_weight
    return {name: d / n for name, d in diag.items()}
