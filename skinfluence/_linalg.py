"""Linear algebra shared by the curvature solvers: Krylov and randomized sketches of a
symmetric operator, the low-rank-plus-identity inverse, and the one error for a
curvature that is not positive definite (with a regularization that would be).

Everything here works on float64 rows: a block of vectors is a tensor of shape
(k, p), and an operator is a callable ``V -> V @ M`` on such blocks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "AUTO_RELATIVE_DAMPING",
    "LowRankInverse",
    "NotPositiveDefiniteError",
    "auto_regularization",
    "block_lanczos",
    "not_positive_definite",
    "nystroem_sketch",
    "orthonormal_rows",
    "random_rows",
    "spectrum_ends",
    "suggest_regularization",
]

#: rho of ``regularization="auto"``: the damping as a fraction of the curvature's
#: largest eigenvalue. Of 1e-4, 1e-3, 1e-2, 1e-1 and 1, 1e-1 gave the best mean LDS
#: against retraining on two networks, for the exact Hessian and for Gauss-Newton
#: (benchmarks/results/auto_regularization.md).
AUTO_RELATIVE_DAMPING = 0.1


class NotPositiveDefiniteError(ValueError):
    """The curvature plus regularization is not positive definite."""


def suggest_regularization(min_eigenvalue: float, max_eigenvalue: float) -> float:
    """A regularization that lifts the smallest eigenvalue safely above zero.

    Half as much again as the most negative eigenvalue, plus a relative floor for a
    singular matrix, rounded up to one significant digit.

    Parameters
    ----------
    min_eigenvalue, max_eigenvalue : float
        Extreme eigenvalues of the curvature without regularization.

    Returns
    -------
    regularization : float

    Examples
    --------
    >>> suggest_regularization(-2.59, 40.0)
    4
    """
    need = 1.5 * max(-min_eigenvalue, 0.0) + 1e-6 * max(abs(max_eigenvalue), 1.0)
    digits = math.floor(math.log10(need))
    return math.ceil(need / 10**digits) * 10**digits


def auto_regularization(min_eigenvalue: float, max_eigenvalue: float, rho: float) -> float:
    """The regularization ``"auto"`` resolves to, from the curvature's extreme eigenvalues.

    ``lambda = max(rho * lambda_max, s)`` with ``s`` the safety of
    :func:`suggest_regularization` (``1.5 max(0, -lambda_min) + 1e-6 max(lambda_max,
    1)``, rounded up to one significant digit); where ``rho`` is 0 and ``lambda_min``
    already exceeds that floor, ``lambda = 0``.

    Parameters
    ----------
    min_eigenvalue, max_eigenvalue : float
        Smallest and largest eigenvalue of the curvature plus the estimator's
        penalty, without regularization.
    rho : float
        The damping relative to ``max_eigenvalue``: :data:`AUTO_RELATIVE_DAMPING`
        for a network, 0 where the estimator's objective is known exactly.

    Returns
    -------
    regularization : float

    Examples
    --------
    >>> auto_regularization(-2.59, 40.0, rho=0.01)
    4.0
    >>> auto_regularization(0.0, 40.0, rho=0.1)
    4.0
    >>> auto_regularization(0.5, 40.0, rho=0.0)
    0.0
    """
    top = max(float(max_eigenvalue), 0.0)
    floor = 1e-6 * max(top, 1.0)
    safety = 0.0 if rho == 0 and min_eigenvalue > floor else suggest_regularization(min_eigenvalue, top)
    return float(max(rho * top, safety))


def spectrum_ends(mv, n_params: int, device, krylov_dimension: int = 32,
                  dtype=torch.float64) -> tuple[float, float]:
    """Estimates of the smallest and largest eigenvalue of a symmetric operator.

    A fixed number of block Lanczos steps (``krylov_dimension`` products, or ``p``
    when smaller, then the result is exact) from a start block seeded by 0, so the
    same problem gives the same estimates. Both are Ritz values: the largest is a
    lower bound on ``lambda_max``, the smallest an upper bound on ``lambda_min``.

    Parameters
    ----------
    mv : callable
        ``V -> V @ M`` for float64 rows ``V`` of shape (k, p).
    n_params : int
        Dimension p.
    device : torch device
        Where the vectors live.
    krylov_dimension : int, default=32
        Vectors in the Krylov basis.
    dtype : torch dtype, default=torch.float64
        Precision the basis is kept in (see :func:`block_lanczos`).

    Returns
    -------
    lowest, highest : float

    Examples
    --------
    >>> import torch
    >>> M = torch.diag(torch.tensor([-1.0, 2.0, 5.0], dtype=torch.float64))
    >>> [round(v, 8) for v in spectrum_ends(lambda V: V @ M, 3, "cpu")]
    [-1.0, 5.0]
    """
    k = min(krylov_dimension, n_params)
    theta, _, _, _ = block_lanczos(
        mv, n_params, k, krylov_dimension=k, block_size=min(8, k), rtol=0.0,
        rng=np.random.RandomState(0), device=device, which="LA", dtype=dtype,
    )
    return float(theta[-1]), float(theta[0])


def not_positive_definite(
    curvature: str,
    regularization: float,
    what: str,
    lowest: float,
    highest: float,
    *,
    bound: bool = False,
) -> NotPositiveDefiniteError:
    """The error for a curvature plus regularization that is not positive definite.

    Parameters
    ----------
    curvature : str
        "exact", "gauss-newton" or the name of an approximation, for the message.
    regularization : float
        The regularization that was used.
    what : str
        What showed it, completing "... is not positive definite: {what}".
    lowest, highest : float
        The lowest and highest eigenvalue (or Rayleigh quotient) found without
        regularization; the suggestion lifts ``lowest`` above zero.
    bound : bool, default=False
        ``lowest`` is only an upper bound on the smallest eigenvalue (a Krylov
        estimate), which the message says.

    Returns
    -------
    error : NotPositiveDefiniteError

    Examples
    --------
    >>> err = not_positive_definite("exact", 0.0, "its smallest eigenvalue is -2.59",
    ...                             -2.59, 40.0)
    >>> "Use regularization=4 or larger" in str(err)
    True
    """
    return NotPositiveDefiniteError(
        f"regularization: the {curvature} curvature plus regularization="
        f"{regularization:g} is not positive definite: {what}. Use regularization="
        f"{suggest_regularization(lowest, highest):g} or larger"
        + (" (its smallest eigenvalue may be lower still)" if bound else "")
        + (
            ", or hessian='gauss-newton', which is positive semi-definite."
            if curvature == "exact"
            else "."
        )
    )


# --------------------------------------------------------------------------- blocks


def random_rows(rng: np.random.RandomState, k: int, p: int, device) -> torch.Tensor:
    """``k`` standard Gaussian rows of length ``p`` in float64, drawn from ``rng``.

    Examples
    --------
    >>> import numpy as np
    >>> random_rows(np.random.RandomState(0), 2, 3, "cpu").shape
    torch.Size([2, 3])
    """
    return torch.from_numpy(rng.standard_normal((k, p))).to(device)


def orthonormal_rows(Z: torch.Tensor, drop: float = 1e-10) -> torch.Tensor:
    """An orthonormal basis (as rows) of the row space of ``Z``.

    Directions whose singular value is below ``drop`` times the largest are left out,
    so (nearly) dependent rows never produce a singular Gram matrix downstream.

    Examples
    --------
    >>> import torch
    >>> Z = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    >>> orthonormal_rows(Z).shape
    torch.Size([1, 2])
    """
    if Z.shape[0] == 0:
        return Z
    _, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return Z[:0]
    return Vh[S > drop * S[0]]


def _product(X: torch.Tensor, Y: torch.Tensor, dtype) -> torch.Tensor:
    """``X @ Y`` as float64, computed in ``dtype``, the precision of the basis among
    them (a basis kept in float32 is read as it is stored: no float64 copy of it)."""
    return (X.to(dtype) @ Y.to(dtype)).to(torch.float64)


def _dots(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B.T`` for rows ``B`` of a basis, see :func:`_product`."""
    return _product(A, B.T, B.dtype)


def _combine(C: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``C @ B`` for coefficients ``C`` and rows ``B`` of a basis, see :func:`_product`."""
    return _product(C, B, B.dtype)


def _new_directions(R: torch.Tensor, bases, scale: float, drop: float = 1e-8):
    """Orthonormal float64 rows spanning the part of ``R``'s rows orthogonal to the
    rows of every basis in ``bases``, leaving out directions below ``drop * scale``
    (rounding, not signal: they would not be orthogonal to the bases). Projected
    twice, against lost orthogonality."""
    R = R.to(torch.float64) / max(scale, 1e-300)
    for _ in range(2):
        for Q in bases:
            if Q.shape[0]:
                R = R - _combine(_dots(R, Q), Q)
    if R.shape[0] == 0:
        return R
    _, S, Vh = torch.linalg.svd(R, full_matrices=False)
    return Vh[S > drop]


# --------------------------------------------------------------------------- Krylov


def block_lanczos(
    mv,
    n_params: int,
    rank: int,
    *,
    krylov_dimension: int,
    block_size: int,
    rtol: float,
    rng: np.random.RandomState,
    device,
    which: str = "LM",
    progress=None,
    dtype=torch.float64,
):
    """Top-``rank`` eigenpairs of a symmetric operator by block Lanczos.

    Full reorthogonalisation; the Rayleigh-Ritz problem on the whole Krylov basis is
    solved in float64, and every product is kept, so the Ritz residuals come for
    free. The iteration stops once the wanted pairs have converged and one more
    random block, orthogonal to the basis, leaves them unchanged (so that copies of
    a repeated eigenvalue the start block missed are found), or at
    ``krylov_dimension`` vectors.

    Memory: the basis and its images, ``2 * krylov_dimension`` vectors of length p
    in ``dtype``, allocated once; the Rayleigh quotient grows by one block of rows
    and columns per step (``2 * block_size * size * p`` operations, not
    ``size**2 * p``).

    Parameters
    ----------
    mv : callable
        ``V -> V @ M`` for float64 rows ``V`` of shape (k, p).
    n_params : int
        Dimension p.
    rank : int
        Number of eigenpairs wanted.
    krylov_dimension : int
        Most vectors in the Krylov basis.
    block_size : int
        Vectors multiplied per step.
    rtol : float
        A Ritz pair ``(theta, v)`` has converged when
        ``||M v - theta v|| <= rtol * max |theta|``.
    rng : numpy RandomState
        Source of the start block.
    device : torch device
        Where the vectors live.
    which : {"LM", "LA"}
        Largest magnitude or largest algebraic eigenvalues.
    progress : callable, default=None
        ``progress(iterable, desc)`` wraps the steps in a progress bar.
    dtype : torch dtype, default=torch.float64
        Precision the basis and its images are kept in, and the products with them
        computed in. The precision the operator's products run in is enough: float32
        halves the memory of a float32 model's basis, and its rounding (relative
        1e-7 per entry) is that of the products themselves. The Rayleigh-Ritz
        problem is solved in float64 and the returned vectors are float64 (made
        orthonormal again) whatever it is.

    Returns
    -------
    theta : tensor (rank,)
        Ritz values, in decreasing order of magnitude ("LM") or value ("LA").
    V : tensor (rank, p)
        Orthonormal Ritz vectors, as float64 rows.
    residuals : tensor (rank,)
        Relative Ritz residuals.
    n_products : int
        Number of vectors multiplied by ``mv``.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> M = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    >>> theta, V, res, n = block_lanczos(lambda V: V @ M, 20, 3, krylov_dimension=20,
    ...     block_size=4, rtol=1e-10, rng=np.random.RandomState(0), device="cpu")
    >>> [round(t, 8) for t in theta.tolist()]
    [20.0, 19.0, 18.0]
    """
    krylov_dimension = min(max(krylov_dimension, rank), n_params)
    Q = torch.empty(krylov_dimension, n_params, dtype=dtype, device=device)
    AQ = torch.empty_like(Q)
    T = torch.zeros(krylov_dimension, krylov_dimension, dtype=torch.float64, device=device)
    block = orthonormal_rows(random_rows(rng, min(block_size, krylov_dimension), n_params, device))
    size = 0
    probe = None  # Ritz values when a random probe was added to check convergence
    steps = range(n_params)  # the loop always ends by size or convergence
    for _ in steps if progress is None else progress(steps, "Lanczos"):
        W = mv(block)
        end = size + block.shape[0]
        Q[size:end] = block
        AQ[size:end] = W
        # The Rayleigh quotient Q AQ^T gains the new block's rows and columns.
        T[:end, size:end] = _dots(Q[:end], AQ[size:end])
        T[size:end, :size] = _dots(Q[size:end], AQ[:size])
        size = end
        Ts = T[:size, :size]
        vals, vecs = torch.linalg.eigh(0.5 * (Ts + Ts.T))
        order = torch.argsort(vals.abs() if which == "LM" else vals, descending=True)[:rank]
        theta, Y = vals[order], vecs[:, order]
        V, AV = _combine(Y.T, Q[:size]), _combine(Y.T, AQ[:size])
        scale = float(theta.abs().max()) if theta.numel() else 0.0
        residuals = (AV - theta[:, None] * V).norm(dim=1) / max(scale, 1e-300)
        converged = theta.numel() >= rank and bool((residuals <= rtol).all())
        if size >= krylov_dimension:
            break
        want = min(block_size, krylov_dimension - size)
        if converged:
            # Converged Ritz pairs can still miss eigenvalues that the start block
            # barely touched (copies of a repeated eigenvalue, say): stop only once a
            # random block orthogonal to the basis has changed none of them.
            if probe is not None and torch.allclose(theta, probe, rtol=rtol, atol=0.0):
                break
            probe = theta.clone()
            extra = random_rows(rng, want, n_params, device)
            block = _new_directions(extra, [Q[:size]], scale=1.0)[:want]
            if block.shape[0] == 0:
                break
            continue
        probe = None
        # Next block: the part of M @ block not yet in the basis.
        block = _new_directions(W, [Q[:size]], scale=float(W.norm(dim=1).max()))[:want]
        if block.shape[0] < want:
            # The basis is (nearly) invariant: continue with random directions.
            extra = random_rows(rng, want - block.shape[0], n_params, device)
            block = torch.cat([block, _new_directions(extra, [Q[:size], block], scale=1.0)])[:want]
        if block.shape[0] == 0:
            break
    if dtype != torch.float64 and V.shape[0]:
        # A basis kept in lower precision is orthonormal to its rounding only.
        Qv, Rv = torch.linalg.qr(V.T)
        V = (Qv * torch.sign(Rv.diagonal())).T.contiguous()
    return theta, V, residuals, size


# --------------------------------------------------------------------------- sketches


def nystroem_sketch(
    mv, n_params: int, rank: int, rng: np.random.RandomState, eps: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized Nystroem approximation ``U diag(s) U^T`` of a PSD operator.

    The stable construction of Tropp et al. (2017): ``Y = M Omega`` for a Gaussian
    test matrix, shifted by a tiny ``nu`` to keep ``Omega^T Y`` positive definite.

    Parameters
    ----------
    mv : callable
        ``V -> V @ M`` for float64 rows ``V`` of shape (k, p).
    n_params, rank : int
        Dimension ``p`` and sketch size ``r <= p``.
    rng : numpy RandomState
        Source of the Gaussian test matrix.
    eps : float
        Relative accuracy of ``mv`` (machine epsilon of its working precision); sets
        the stabilising shift.
    device : torch device
        Where the vectors live.

    Returns
    -------
    s : tensor of shape (r,)
        Approximate eigenvalues, non-negative, in decreasing order.
    U : tensor of shape (r, p)
        Orthonormal approximate eigenvectors, as rows.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> M = torch.diag(torch.tensor([5.0, 3.0, 0.0], dtype=torch.float64))
    >>> s, U = nystroem_sketch(lambda V: V @ M, 3, 3, np.random.RandomState(0), 1e-16, "cpu")
    >>> [round(v, 6) for v in s.tolist()]
    [5.0, 3.0, 0.0]
    """
    omega = torch.linalg.qr(random_rows(rng, rank, n_params, device).T)[0].T
    Y = mv(omega)
    # The shift keeps Omega^T Y positive definite despite rounding in the products
    # (the Frobenius norm bounds the spectral one and costs no SVD).
    nu = math.sqrt(n_params) * eps * float(torch.linalg.norm(Y))
    nu = max(nu, torch.finfo(torch.float64).tiny)
    for _ in range(3):
        Y_nu = Y + nu * omega
        B = omega @ Y_nu.T
        B = 0.5 * (B + B.T)
        L, info = torch.linalg.cholesky_ex(B)
        if int(info) == 0:
            break
        # Omega^T M Omega is indefinite: M has negative curvature (an exact Hessian
        # away from a minimum). Shift past it; the negative part is clipped below.
        nu += float(-torch.linalg.eigvalsh(B)[0]) * 1.01 + nu
    else:  # pragma: no cover - three shifts always suffice in exact arithmetic
        raise NotPositiveDefiniteError("The Nystroem sketch could not be stabilised.")
    # F = Y_nu L^-T, so that F F^T = Y_nu (Omega^T Y_nu)^-1 Y_nu^T.
    F = torch.linalg.solve_triangular(L, Y_nu, upper=False)  # (r, p) = L^-1 Y_nu
    _, S, Vh = torch.linalg.svd(F, full_matrices=False)
    s = torch.clamp(S**2 - nu, min=0.0)
    return s, Vh


class LowRankInverse:
    """``(U^T diag(s) U + lambda I)^-1`` for orthonormal rows ``U``, applied to rows.

    The complement of ``U`` is scaled by ``1 / lambda`` (it is empty when ``U`` spans
    the whole space, and ``lambda`` may then be 0)::

        x = g / lambda + ((g U^T) diag(1 / (s + lambda) - 1 / lambda)) U

    Products run in float64: the complement term is a difference scaled by
    ``1 / lambda``, which would amplify float32 rounding by up to
    ``(s_max + lambda) / lambda``.

    Parameters
    ----------
    s : tensor of shape (r,)
        Eigenvalues.
    U : tensor of shape (r, p)
        Orthonormal eigenvectors, as rows.
    regularization : float
        lambda.

    Examples
    --------
    >>> import torch
    >>> inv = LowRankInverse(torch.tensor([3.0], dtype=torch.float64),
    ...                      torch.tensor([[1.0, 0.0]], dtype=torch.float64), 1.0)
    >>> inv(torch.tensor([[4.0, 2.0]], dtype=torch.float64)).tolist()
    [[1.0, 2.0]]
    """

    def __init__(self, s: torch.Tensor, U: torch.Tensor, regularization: float):
        full = U.shape[0] >= U.shape[1]
        self.U = U
        self.identity = 0.0 if full else 1.0 / regularization
        self.W = (1.0 / (s + regularization) - self.identity)[:, None] * U

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        G64 = G.to(torch.float64)
        out = torch.addmm(G64, G64 @ self.U.T, self.W, beta=self.identity)
        return out.to(G.dtype)
