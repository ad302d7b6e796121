"""Functional interface in the style of pyDVL's earlier releases (0.6 to 0.8).

For code written against ``pydvl.influence.compute_influences`` and friends: the
same four functions, with the same argument names and shapes, as thin calls into the
scorers. What changes when migrating:

* ``model`` is the fitted model itself (a skorch net, an sklearn linear model, or a
  torch ``nn.Module`` together with ``loss=``) instead of a ``TwiceDifferentiable``
  wrapper;
* data are ``(X, y)`` pairs of arrays, or torch DataLoaders yielding ``(x, y)``
  batches as before;
* results are numpy arrays; :func:`compute_influence_factors` returns
  ``InverseHvpResult(x, info)`` as before, with the fitted scorer in ``info``;
* ``inversion_method`` names a method of the registry, a key of
  :data:`INVERSION_METHODS` (``"direct"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``,
  ``"nystroem"``, ``"ekfac"``, ``"gradient_similarity"``, in any case); further
  keyword arguments go to its scorer (for example ``rank=`` or ``maxiter=``);
* the regularization is ``hessian_regularization`` everywhere (the factor
  function's old ``hessian_perturbation`` is the same number).

Sign and scale are the scorers': ``I[i, j] = grad l(test_i)^T (H + lambda I)^-1
grad l(train_j)``, positive when training point j helps test point i.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.utils.validation import check_array

from . import scorers
from ._adapters import build_adapter
from ._gradients import influence_blocks
from .scorers import _progress
from .solvers import METHODS

__all__ = [
    "InverseHvpResult",
    "compute_influence_factors",
    "compute_influences",
    "compute_influences_pert",
    "compute_influences_up",
]

#: inversion_method -> name of the scorer class in skinfluence.scorers
INVERSION_METHODS = {name: solver.scorer_name for name, solver in METHODS.items()}


class InverseHvpResult(NamedTuple):
    """Influence factors and how they were obtained.

    Attributes
    ----------
    x : ndarray of shape (n_test, n_params)
        ``(H + lambda I)^-1 grad l(test_i)`` for each test point.
    info : dict
        ``"scorer"``: the fitted scorer; for iterative methods ``"n_iter"`` and
        ``"residuals"``, for low-rank methods ``"eigenvalues"``.

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.functional import InverseHvpResult
    >>> x, info = InverseHvpResult(np.zeros((2, 3)), {})
    >>> x.shape
    (2, 3)
    """

    x: np.ndarray
    info: dict


def scorer_class(inversion_method: str):
    """The scorer class behind an ``inversion_method`` name.

    Parameters
    ----------
    inversion_method : str
        Name of the method, as in pyDVL (case does not matter): one of
        ``skinfluence.functional.INVERSION_METHODS``.

    Returns
    -------
    cls : type
        A subclass of :class:`~skinfluence.InfluenceScorer`.

    Examples
    --------
    >>> from skinfluence.functional import scorer_class
    >>> scorer_class("cg").__name__
    'CgInfluenceScorer'
    """
    name = INVERSION_METHODS.get(str(inversion_method).lower())
    if name is None:
        raise ValueError(
            f"inversion_method: {inversion_method!r} is not one of "
            f"{sorted(INVERSION_METHODS)}."
        )
    cls = getattr(scorers, name, None)
    if cls is None:
        raise ImportError(
            f"inversion_method={inversion_method!r} needs skinfluence.scorers.{name}, "
            "which this installation does not provide; use another inversion_method."
        )
    return cls


def _as_arrays(data, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` from an ``(X, y)`` pair or an iterable of ``(x, y)`` batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not _is_batch_list(data):
        X, y = data
        return _numpy(X), _numpy(y)
    try:
        batches = list(data)
    except TypeError:
        batches = None
    if not batches or not _is_batch_list(batches):
        raise ValueError(
            f"{name}: pass an (X, y) pair of arrays or a DataLoader yielding (x, y) "
            f"batches; got {type(data).__name__}."
        )
    X = np.concatenate([_numpy(b[0]) for b in batches])
    y = np.concatenate([_numpy(b[1]) for b in batches])
    return X, y


def _is_batch_list(data) -> bool:
    """Whether every element is an ``(x, y)`` batch of arrays (as a DataLoader yields)."""
    return all(
        isinstance(b, (tuple, list))
        and len(b) == 2
        and all(isinstance(t, (np.ndarray, torch.Tensor)) and t.ndim >= 1 for t in b)
        for b in data
    )


def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _check_kwargs(kwargs: dict) -> None:
    if "hessian_perturbation" in kwargs:
        raise TypeError(
            "hessian_perturbation: this interface calls it hessian_regularization "
            "(the same lambda added to the Hessian)."
        )


def compute_influence_factors(
    model,
    training_data,
    test_data,
    inversion_method: str = "direct",
    *,
    hessian_regularization: float = 0.0,
    loss=None,
    progress: bool = False,
    **kwargs: Any,
) -> InverseHvpResult:
    """Influence factors ``(H + lambda I)^-1 grad l(test_i)`` of the test points.

    Parameters
    ----------
    model : fitted model
        A skorch net, an sklearn ``LogisticRegression`` / ``Ridge`` /
        ``LinearRegression``, or a torch ``nn.Module`` together with ``loss``.
    training_data : (X, y) pair or DataLoader
        The data the model was trained on; defines H.
    test_data : (X, y) pair or DataLoader
        The points whose factors are computed.
    inversion_method : str, default="direct"
        A key of ``INVERSION_METHODS``: how ``(H + lambda I)^-1`` is applied; the
        matching scorer does the work.
    hessian_regularization : float, default=0.0
        lambda, the scorer's ``regularization``.
    loss : callable, default=None
        Mean-reduced ``loss(output, target)``, needed for a plain torch module.
    progress : bool, default=False
        Show progress bars.
    **kwargs
        Further arguments of the scorer (``rank``, ``maxiter``, ``hessian``, ...).

    Returns
    -------
    result : InverseHvpResult
        ``x`` of shape (n_test, n_params) and an ``info`` dict with the fitted
        scorer and, where the method has them, its diagnostics.

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence.functional import compute_influence_factors
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> factors, info = compute_influence_factors(
    ...     model, (X[:200], y[:200]), (X[200:205], y[200:205]), "cg")
    >>> factors.shape, info["n_iter"] > 0
    ((5, 31), True)
    """
    _check_kwargs(kwargs)
    scorer = _fit_scorer(
        model, training_data, inversion_method, hessian_regularization, loss, progress,
        "up", kwargs,
    )
    X, y = _as_arrays(test_data, "test_data")
    x = scorer.influence_factors(X, y)
    info = {"scorer": scorer}
    for key in ("n_iter_", "residuals_", "eigenvalues_"):
        try:
            info[key.rstrip("_")] = getattr(scorer, key)
        except AttributeError:
            pass
    return InverseHvpResult(x, info)


def _fit_scorer(model, training_data, method, regularization, loss, progress, mode, kwargs):
    cls = scorer_class(method)
    X, y = _as_arrays(training_data, "training_data")
    return cls(
        model, loss=loss, regularization=regularization, mode=mode, progress=progress,
        **kwargs,
    ).fit(X, y)


def _factors_array(influence_factors) -> np.ndarray:
    if isinstance(influence_factors, InverseHvpResult):
        return influence_factors.x
    return _numpy(influence_factors)


def _input_gradient_setup(model, input_data, influence_factors, loss, params, dtype, device,
                          batch_size):
    if not isinstance(batch_size, Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}.")
    X, y = _as_arrays(input_data, "input_data")
    X = check_array(X, allow_nd=True, dtype="numeric", input_name="input_data")
    adapter = build_adapter(model, loss=loss, params=params, dtype=dtype, device=device)
    Xt = adapter.features(X)
    adapter.bind(Xt, X.shape[0])
    Yt = adapter.targets(y, "input_data")
    F = torch.as_tensor(_factors_array(influence_factors), device=adapter.device)
    F = F.to(adapter.dtype)
    if not bool(torch.isfinite(F).all()):
        raise ValueError("influence_factors: contains NaN or infinity; pass finite factors.")
    if F.ndim != 2 or F.shape[1] != adapter.n_params:
        raise ValueError(
            f"influence_factors: expected shape (n_test, {adapter.n_params}) for this "
            f"model's {adapter.n_params} parameters, got {tuple(F.shape)}. Pass the "
            "factors of this model (with the same params= selection)."
        )
    return adapter, Xt, Yt, F


def compute_influences_up(
    model,
    input_data,
    influence_factors,
    *,
    loss=None,
    params=None,
    batch_size: int = 256,
    dtype=None,
    device=None,
    progress: bool = False,
) -> np.ndarray:
    """Up-weighting influences of ``input_data`` from precomputed influence factors.

    ``I[i, j] = factors[i] @ grad l(input_j)``.

    Parameters
    ----------
    model : fitted model
        The model the factors were computed for.
    input_data : (X, y) pair or DataLoader
        Points whose influence is computed.
    influence_factors : ndarray of shape (n_test, n_params) or InverseHvpResult
        From :func:`compute_influence_factors`.
    loss, params, batch_size, dtype, device : optional
        As for the scorers; ``params`` and ``dtype`` must match those the factors
        were computed with.
    progress : bool, default=False
        Show a progress bar.

    Returns
    -------
    I : ndarray of shape (n_test, n_input)

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence.functional import compute_influence_factors, compute_influences_up
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> factors = compute_influence_factors(model, (X[:200], y[:200]), (X[200:205], y[200:205]))
    >>> compute_influences_up(model, (X[:200], y[:200]), factors).shape
    (5, 200)
    """
    adapter, X, Y, F = _input_gradient_setup(
        model, input_data, influence_factors, loss, params, dtype, device, batch_size
    )
    with adapter.eval_mode():
        I = influence_blocks(adapter, F, X, Y, "up", batch_size, _progress(progress))
    return I.cpu().numpy()


def compute_influences_pert(
    model,
    input_data,
    influence_factors,
    *,
    loss=None,
    params=None,
    batch_size: int = 256,
    dtype=None,
    device=None,
    progress: bool = False,
) -> np.ndarray:
    """Perturbation influences of ``input_data`` from precomputed influence factors.

    ``I[i, j] = d/dx_j (factors[i] @ grad l(x_j, y_j))``: how test point i's loss
    responds when training point j is moved.

    Parameters
    ----------
    model : fitted model
        The model the factors were computed for.
    input_data : (X, y) pair or DataLoader
        Points whose influence is computed.
    influence_factors : ndarray of shape (n_test, n_params) or InverseHvpResult
        From :func:`compute_influence_factors`.
    loss, params, batch_size, dtype, device : optional
        As for the scorers; ``params`` and ``dtype`` must match those the factors
        were computed with.
    progress : bool, default=False
        Show a progress bar.

    Returns
    -------
    I : ndarray of shape (n_test, n_input, n_features)

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence.functional import compute_influence_factors, compute_influences_pert
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> factors = compute_influence_factors(model, (X[:200], y[:200]), (X[200:205], y[200:205]))
    >>> compute_influences_pert(model, (X[:20], y[:20]), factors).shape
    (5, 20, 30)
    """
    adapter, X, Y, F = _input_gradient_setup(
        model, input_data, influence_factors, loss, params, dtype, device, batch_size
    )
    with adapter.eval_mode():
        I = influence_blocks(adapter, F, X, Y, "perturbation", batch_size, _progress(progress))
    return I.cpu().numpy()


def compute_influences(
    model,
    training_data,
    test_data=None,
    *,
    input_data=None,
    inversion_method: str = "direct",
    influence_type: str = "up",
    hessian_regularization: float = 0.0,
    loss=None,
    progress: bool = False,
    **kwargs: Any,
) -> np.ndarray:
    """Influence of each ``input_data`` point on each ``test_data`` point.

    The scorer named by ``inversion_method`` is fitted on ``training_data`` and its
    ``influences`` computed. Sign and scale: ``I[i, j] = grad l(test_i)^T
    (H + lambda I)^-1 grad l(input_j)``, positive when point j helps test point i.

    Parameters
    ----------
    model : fitted model
        A skorch net, an sklearn ``LogisticRegression`` / ``Ridge`` /
        ``LinearRegression``, or a torch ``nn.Module`` together with ``loss``.
    training_data : (X, y) pair or DataLoader
        The data the model was trained on; defines H.
    test_data : (X, y) pair or DataLoader, default=None
        Points whose loss is influenced; None uses ``training_data``.
    input_data : (X, y) pair or DataLoader, default=None
        Points whose influence is computed; None uses ``training_data``.
    inversion_method : str, default="direct"
        A key of ``INVERSION_METHODS``: how ``(H + lambda I)^-1`` is applied; the
        matching scorer does the work.
    influence_type : {"up", "perturbation"}, default="up"
        Up-weighting influence, or its derivative with respect to the features of
        the input point.
    hessian_regularization : float, default=0.0
        lambda, the scorer's ``regularization``.
    loss : callable, default=None
        Mean-reduced ``loss(output, target)``, needed for a plain torch module.
    progress : bool, default=False
        Show progress bars.
    **kwargs
        Further arguments of the scorer (``rank``, ``maxiter``, ``hessian``, ...).

    Returns
    -------
    I : ndarray of shape (n_test, n_input) or (n_test, n_input, n_features)

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence.functional import compute_influences
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegression().fit(X[:200], y[:200])
    >>> train, test = (X[:200], y[:200]), (X[200:210], y[200:210])
    >>> direct = compute_influences(model, train, test)
    >>> cg = compute_influences(model, train, test, inversion_method="cg", rtol=1e-10)
    >>> direct.shape, bool(np.allclose(direct, cg))
    ((10, 200), True)
    """
    _check_kwargs(kwargs)
    influence_type = str(influence_type).lower()
    if influence_type not in ("up", "perturbation"):
        raise ValueError(
            f"influence_type: {influence_type!r} is not one of ['perturbation', 'up']."
        )
    scorer = _fit_scorer(
        model, training_data, inversion_method, hessian_regularization, loss, progress,
        influence_type, kwargs,
    )
    Xte, yte = _as_arrays(test_data if test_data is not None else training_data, "test_data")
    if input_data is None:
        return scorer.influences(Xte, yte)
    X, y = _as_arrays(input_data, "input_data")
    return scorer.influences(Xte, yte, X, y)
