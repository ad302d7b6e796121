"""What every curvature solver shares: the operator it inverts and its interface.

A solver is a small object with two methods and nothing else:

* ``fit(operator)`` builds its approximation of ``A = C + P + lambda I`` from a
  :class:`CurvatureOperator` (C the Hessian or Gauss-Newton matrix of the mean
  training loss, P the estimator's own penalty, lambda the regularization);
* ``solve(G)`` applies ``A^-1`` to a batch of flat gradients ``G`` of shape (k, p)
  and returns a tensor of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._adapters import ModelAdapter
from .._gradients import batch_slices, curvature_mv


class NotPositiveDefiniteError(ValueError):
    """The curvature plus regularization is not positive definite."""


@dataclass
class CurvatureOperator:
    """``A = C + P + lambda I`` over the training data, applied without forming it.

    Parameters
    ----------
    adapter : ModelAdapter
        The fitted model as a function of its parameters.
    X, Y : torch.Tensor
        Training inputs and targets, as the adapter converted them.
    curvature : {"exact", "gauss-newton"}
        C is the Hessian or the Gauss-Newton matrix of the mean training loss.
    regularization : float
        lambda.
    batch_size : int
        Training samples per product step.

    Examples
    --------
    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> from skinfluence.solvers import CurvatureOperator
    >>> model = torch.nn.Linear(3, 2).double()
    >>> a = build_adapter(model, loss=torch.nn.functional.cross_entropy)
    >>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 2
    >>> a.bind(X, 10)
    >>> op = CurvatureOperator(a, X, y, "exact", regularization=0.1, batch_size=4)
    >>> op.mv(torch.eye(op.n_params, dtype=torch.float64)).shape
    torch.Size([8, 8])
    """

    adapter: ModelAdapter
    X: torch.Tensor
    Y: torch.Tensor
    curvature: str
    regularization: float
    batch_size: int

    @property
    def n_params(self) -> int:
        return self.adapter.n_params

    @property
    def n_train(self) -> int:
        return int(self.X.shape[0])

    def data_mv(self, V: torch.Tensor) -> torch.Tensor:
        """``V @ C`` for the mean training loss (no penalty, no regularization)."""
        out = torch.zeros_like(V)
        for s in batch_slices(self.n_train, self.batch_size):
            out += curvature_mv(self.adapter, self.X[s], self.Y[s], V, self.curvature)
        return out / self.n_train

    def mv(self, V: torch.Tensor) -> torch.Tensor:
        """``V @ A``: curvature, the estimator's penalty and the regularization."""
        out = self.data_mv(V)
        if not self.adapter.penalty.is_zero:
            out = out + self.adapter.penalty.mv(V)
        return out + self.regularization * V


class Solver:
    """Interface of a curvature solver (see module docstring).

    Examples
    --------
    A solver that ignores the curvature (the identity), to show the interface:

    >>> import torch
    >>> from skinfluence.solvers import Solver
    >>> class Identity(Solver):
    ...     def fit(self, operator, progress=None):
    ...         return self
    ...     def solve(self, G):
    ...         return G
    >>> Identity().fit(None).solve(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """

    def fit(self, operator: CurvatureOperator, progress=None) -> Solver:  # pragma: no cover
        raise NotImplementedError

    def solve(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
