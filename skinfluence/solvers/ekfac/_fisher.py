"""The three Fisher variants EK-FAC's factors can be built from.

Each gives, per sample, the gradients with respect to the model output that are
back-propagated to the layers:

* ``"gauss-newton"``: the columns of a square root of the loss's Hessian in the
  model output (one backward pass per output): the exact expectation over the
  model's predictive distribution, so the factors are the Gauss-Newton matrix's;
* ``"true"``: the gradient at one label drawn from the predictive distribution
  (softmax for cross-entropy and skorch's NLL on probabilities, Bernoulli for
  binary cross-entropy, Gaussian for MSE): unbiased for the same matrix;
* ``"empirical"``: the gradient at the given label.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad, hessian, vmap

from ..._adapters import LossFamily

__all__ = ["FISHERS", "Sampler", "output_cotangents", "sampler_for"]

FISHERS = ("gauss-newton", "true", "empirical")


class Sampler:
    """Labels drawn from the model's predictive distribution (the "true" Fisher).

    ``kind`` is "categorical", "bernoulli" or "gaussian"; ``probs`` says whether the
    model outputs probabilities rather than logits; ``variance_per_element`` whether
    the MSE averages over output elements.
    """

    def __init__(self, family: LossFamily):
        self.kind, self.probs = family.distribution, family.probs
        self.variance_per_element = family.variance_per_element
        self.on_logits = family.on_logits  # the loss is cross-entropy / BCE on logits

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


def sampler_for(adapter) -> Sampler | None:
    """The sampler of the adapter's loss, or None when its distribution is unknown."""
    family = adapter.loss_family
    return None if family.distribution is None else Sampler(family)


def require_sampler(adapter) -> Sampler:
    sampler = sampler_for(adapter)
    if sampler is None:
        raise ValueError(
            "fisher: the 'true' Fisher samples labels from the model's predictive "
            "distribution, which is known for unweighted cross-entropy, NLL, binary "
            f"cross-entropy and MSE losses, not for {adapter.output_loss!r}. Use "
            "fisher='gauss-newton' (the exact expectation, from the loss's Hessian) or "
            "fisher='empirical'."
        )
    return sampler


def output_cotangents(adapter, out, Y, how: str, family: Sampler | None, sampler, noise):
    """Gradients with respect to the model output, stacked: (r, *out.shape).

    ``family`` is the loss's sampler (for its closed-form Hessian square root, or
    None), ``sampler`` draws the labels of the "true" Fisher from ``noise``.
    """
    loss = adapter.output_loss

    def loss_one(o, y):
        return loss(o.unsqueeze(0), y.unsqueeze(0))

    if how == "gauss-newton":
        L = None if family is None else family.hessian_sqrt(out)
        if L is None:
            H = vmap(hessian(loss_one))(out, Y)
            d = out[0].numel()
            evals, evecs = torch.linalg.eigh(H.reshape(out.shape[0], d, d))
            L = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # L L^T = H per sample
        keep = L.abs().amax((0, 1)) > 0
        keep[-1] = True  # at least one column, if only of zeros
        return L[:, :, keep].permute(2, 0, 1).reshape((-1, *tuple(out.shape)))
    if how == "true":
        Y = sampler(out, noise)
    return vmap(grad(loss_one))(out, Y).unsqueeze(0)
