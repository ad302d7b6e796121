"""Direct method: the exact p x p curvature, factorised once by Cholesky."""

from __future__ import annotations

import torch

from .._linalg import not_positive_definite, spectrum_ends
from ._base import CurvatureOperator, Solver

__all__ = ["MAX_BYTES", "DirectSolver"]

#: The most memory the Direct method's p x p matrix and its Cholesky factor may take
#: (``2 * p**2`` numbers); above it ``fit`` refuses before any work. Raise it here
#: on a machine with the memory to spare.
#: Above this many parameters ``regularization="auto"`` estimates the extreme
#: eigenvalues of the dense matrix by Lanczos instead of a full eigendecomposition.
EXACT_SPECTRUM_MAX = 4096

MAX_BYTES = 8 * 2**30


class DirectSolver(Solver):
    """Forms ``A = C + P + lambda I`` densely and keeps its Cholesky factor.

    Memory: the p x p matrix and its factor (2 p^2 numbers).

    Examples
    --------
    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> from skinfluence.solvers import CurvatureOperator, DirectSolver
    >>> model = torch.nn.Linear(3, 2).double()
    >>> a = build_adapter(model, loss=torch.nn.functional.cross_entropy)
    >>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.arange(10) % 2
    >>> a.bind(X, 10)
    >>> op = CurvatureOperator(a, X, y, "exact", regularization=0.1, batch_size=4)
    >>> solver = DirectSolver().fit(op)
    >>> G = torch.randn(5, op.n_params, dtype=torch.float64)
    >>> torch.allclose(op.mv(solver.solve(G)), G)
    True
    """

    parameters = (
        "estimator", "loss", "params", "regularization", "mode", "hessian", "block_structure",
        "batch_size", "dtype", "device", "progress",
    )
    scorer_name = "DirectInfluenceScorer"
    summary = "Influence functions with the exact inverse curvature."
    description = """
    Forms the p x p Hessian (or Gauss-Newton matrix) of the mean training loss, adds
    the estimator's penalty and ``regularization``, and factorises it by Cholesky. The
    reference method: exact, affordable up to a few thousand parameters."""
    memory = """
    Memory: the p x p matrix and its Cholesky factor, plus ``batch_size`` samples'
    gradients at a time, plus the test points' factors (n_test x p) while
    computing influences."""
    raises = """
    NotPositiveDefiniteError
        From ``fit``, when the curvature plus ``regularization`` is not positive
        definite; the message suggests a regularization that is.
    MemoryError
        From ``fit``, before any work, when the p x p matrix and its factor would
        take more than ``skinfluence.solvers.direct.MAX_BYTES`` (8 GiB)."""
    examples = """
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import DirectInfluenceScorer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> scorer = DirectInfluenceScorer(model, regularization=0.0).fit(X[:200], y[:200])
    >>> scorer.transform(X[200:210], y[200:210]).shape
    (10, 200)
    >>> scorer.self_influence().shape
    (200,)"""

    def check(self, operator: CurvatureOperator, mode: str = "up") -> None:
        p = operator.n_params
        itemsize = torch.empty((), dtype=operator.dtype).element_size()
        need = 2 * p * p * itemsize
        if need > MAX_BYTES:
            raise MemoryError(
                f"params: the Direct method forms the {p} x {p} curvature and its "
                f"Cholesky factor, {need / 2**30:.3g} GiB, above its bound of "
                f"{MAX_BYTES / 2**30:.3g} GiB (skinfluence.solvers.direct.MAX_BYTES). "
                "Select fewer parameters with params= (e.g. the last layers), or use a "
                "method that never forms the matrix: CgInfluenceScorer, "
                "ArnoldiInfluenceScorer, NystroemInfluenceScorer or EkfacInfluenceScorer."
            )

    def spectrum(self, operator: CurvatureOperator, progress=None) -> tuple[float, float]:
        """The extreme eigenvalues of the dense ``C + P``, which is kept for ``fit``:
        exact up to :data:`EXACT_SPECTRUM_MAX` parameters; beyond, where a full
        eigendecomposition would cost several Cholesky factorisations, the same
        128-step Lanczos run as the other methods, on the dense matrix."""
        self.check(operator)
        A = operator.dense(progress)
        A.diagonal().sub_(operator.regularization)
        self._unregularized = A
        if not bool(torch.isfinite(A).all()):
            return 0.0, 0.0  # fit reports the non-finite curvature
        if A.shape[0] > EXACT_SPECTRUM_MAX:
            return spectrum_ends(lambda V: (V.to(A.dtype) @ A).to(torch.float64),
                                 A.shape[0], A.device, 128)
        eig = torch.linalg.eigvalsh(A.double())
        return float(eig[0]), float(eig[-1])

    def _fit(self, operator: CurvatureOperator, progress=None) -> DirectSolver:
        A = self.__dict__.pop("_unregularized", None)
        if A is None:
            A = operator.dense(progress)
        else:  # the matrix ``spectrum`` formed, without regularization
            A.diagonal().add_(operator.regularization)
        if not bool(torch.isfinite(A).all()):
            raise ValueError(
                "X: the curvature is not finite (inf or NaN): the inputs or the model's "
                "gradients overflowed the working precision. Standardize the features or "
                "use dtype='float64'."
            )
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            A.diagonal().sub_(operator.regularization)
            eig = torch.linalg.eigvalsh(A.double())
            lam_min, lam_max = float(eig[0]), float(eig[-1])
            raise not_positive_definite(
                operator.curvature, operator.regularization,
                f"its smallest eigenvalue without regularization is {lam_min:.3g}",
                lam_min, lam_max,
            )
        self.cholesky_ = L
        return self

    def solve(self, G: torch.Tensor, report=None) -> torch.Tensor:
        return torch.cholesky_solve(G.T.to(self.cholesky_.dtype), self.cholesky_).T
