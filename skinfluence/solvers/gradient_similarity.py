"""Gradient similarity: the identity in place of the inverse curvature.

``I[i, j] = grad l(test_i) . grad l(train_j)``, or with ``normalize=True`` the cosine
of the angle between the two gradients. No curvature is formed or inverted, so it is
the cheapest influence there is: the baseline that TracIn-style methods (one
checkpoint) and gradient-matching data selection use. It ranks points by how much a
gradient step on them moves the test loss, not by what removing them does.
"""

from __future__ import annotations

import torch

from .._gradients import per_sample_grads
from ._base import CurvatureOperator, Param, Solver

__all__ = ["GradientSimilaritySolver"]


class GradientSimilaritySolver(Solver):
    """Identity curvature: plain gradient dot products, or their cosine.

    Memory: one batch of per-sample gradients at a time.

    Examples
    --------
    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> from skinfluence.solvers import CurvatureOperator, GradientSimilaritySolver
    >>> model = torch.nn.Linear(3, 2).double()
    >>> a = build_adapter(model, loss=torch.nn.functional.cross_entropy)
    >>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 2
    >>> a.bind(X, 10)
    >>> solver = GradientSimilaritySolver(normalize=True).fit(CurvatureOperator(a, X, y, "exact", 0.0, 4))
    >>> torch.allclose(solver.self_scores(X, y), torch.ones(10, dtype=torch.float64))
    True
    """

    curvature = "identity"
    parameters = (
        "estimator", "loss", "params",
        Param("normalize", False, ["boolean"], "bool", """Divide each gradient by its norm: ``I[i, j]`` is then the cosine similarity
of the test and training gradients, in [-1, 1], and self-influence is 1.
``mode="perturbation"`` needs ``normalize=False``."""),
        "mode", "batch_size", "dtype", "device", "progress",
    )
    scorer_name = "GradientSimilarityScorer"
    summary = "Influence as gradient similarity: the identity in place of the inverse curvature."
    description = """
    ``I[i, j] = grad l(test_i) . grad l(train_j)``, the dot product of the two loss
    gradients (with ``normalize=True``, their cosine). No curvature is formed or
    inverted: the cheapest influence, and the baseline that TracIn-style methods and
    gradient-matching data selection use. It ranks training points by how much a
    gradient step on them would lower each test loss; it does not estimate what
    removing them does, so its scale is not that of a removal."""
    curvature_note = """Here H + lambda I is replaced by the identity, so the
    scale sentence does not apply: the entries are gradient dot products (or cosines),
    positive when the gradients point the same way."""
    memory = """
    Memory: ``batch_size`` per-sample gradients at a time, plus the test points'
    gradients (n_test x p)."""
    examples = """
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import GradientSimilarityScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> cos = GradientSimilarityScorer(model, normalize=True).fit(X[:200], y[:200])
    >>> I = cos.influences(X[200:210], y[200:210])
    >>> I.shape, bool(np.abs(I).max() <= 1 + 1e-6)
    ((10, 200), True)"""

    def check(self, operator: CurvatureOperator, mode: str = "up") -> None:
        if self.normalize and mode != "up":
            raise ValueError(
                "normalize: the cosine similarity has no perturbation form; use "
                "normalize=False with mode='perturbation', or mode='up'."
            )

    def _fit(self, operator, progress=None):
        return self

    def _grads(self, X, Y):
        G = per_sample_grads(self.adapter_, X, Y)
        if self.normalize:
            n = G.norm(dim=1, keepdim=True)
            G = G / torch.where(n > 0, n, torch.ones_like(n))
        return G

    def solve(self, G, report=None):
        return G

    def factors(self, X, Y, report=None):
        return self._grads(X, Y)

    def pairwise(self, F, X, Y):
        return F @ self._grads(X, Y).T

    def pairwise_blocks(self, F, X, Y):
        G = self._grads(X, Y)
        return {name: F[:, cols] @ G[:, cols].T for name, cols in self.adapter_.layer_slices().items()}

    def self_scores(self, X, Y, report=None):
        G = self._grads(X, Y)
        return (G * G).sum(1)
