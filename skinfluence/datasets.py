"""Label noise and small synthetic data for examples, tests and benchmarks."""

from __future__ import annotations

import sys

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["flip_labels", "make_blobs_2d"]


def flip_labels(y, fraction=0.1, *, noise_matrix=None, random_state=None):
    """Flip a share of the labels, returning the noisy labels and which were flipped.

    Parameters
    ----------
    y : array-like or pandas Series of shape (n_samples,)
        Clean labels (any hashable values; at least two classes).
    fraction : float, default=0.1
        Share of the samples whose label is changed, in [0, 1).
    noise_matrix : array-like of shape (n_classes, n_classes), default=None
        Class-conditional noise: row ``a`` gives the probabilities that a flipped
        sample of class ``a`` (classes in sorted order) receives each other class;
        the diagonal is ignored and each row is renormalised. None flips uniformly
        to any other class.
    random_state : int, RandomState instance or None, default=None
        Seed of the choice of samples and new labels.

    Returns
    -------
    y_noisy : ndarray or pandas Series of shape (n_samples,)
        Labels with ``round(fraction * n_samples)`` entries changed. ``y`` itself is
        left untouched. A Series ``y`` gives a Series with its index, name and dtype.
    flipped : ndarray or pandas Series of bool, shape (n_samples,)
        True where the label was changed; a Series with ``y``'s index when ``y`` is
        one.

    Examples
    --------
    >>> from skinfluence.datasets import flip_labels
    >>> y_noisy, flipped = flip_labels([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], 0.2, random_state=0)
    >>> int(flipped.sum())
    2
    >>> import pandas as pd
    >>> s = pd.Series(["a", "b", "a", "b"], index=[10, 11, 12, 13], name="label")
    >>> s_noisy, s_flipped = flip_labels(s, 0.5, random_state=0)
    >>> s_noisy.index.tolist(), s_noisy.name, int(s_flipped.sum())
    ([10, 11, 12, 13], 'label', 2)
    """
    series = _as_series_like(y)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-dimensional, got shape {y.shape}.")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}.")
    classes = np.unique(y)
    k = len(classes)
    if k < 2:
        raise ValueError("y must contain at least two classes to flip labels between.")
    rng = check_random_state(random_state)
    if noise_matrix is None:
        T = np.ones((k, k))
    else:
        T = np.array(noise_matrix, dtype=float)
        if T.shape != (k, k) or (T < 0).any():
            raise ValueError(
                f"noise_matrix must be a non-negative ({k}, {k}) array, one row per class."
            )
    np.fill_diagonal(T, 0.0)
    rows = T.sum(1)
    if (rows == 0).any():
        raise ValueError("noise_matrix: every row needs a positive off-diagonal entry.")
    T /= rows[:, None]
    n = len(y)
    idx = rng.choice(n, round(fraction * n), replace=False)
    y_noisy = y.copy()
    codes = np.searchsorted(classes, y)
    for i in idx:
        y_noisy[i] = classes[rng.choice(k, p=T[codes[i]])]
    flipped = np.zeros(n, bool)
    flipped[idx] = True
    if series is not None:
        pd = sys.modules["pandas"]
        noisy = pd.Series(y_noisy, index=series.index, name=series.name)
        try:
            noisy = noisy.astype(series.dtype)
        except (TypeError, ValueError):  # a dtype the flipped values cannot take
            pass
        return noisy, pd.Series(flipped, index=series.index, name="flipped")
    return y_noisy, flipped


def _as_series_like(y):
    """``y`` if it is a pandas Series (pandas is not imported unless it already is)."""
    pd = sys.modules.get("pandas")
    return y if pd is not None and isinstance(y, pd.Series) else None


def make_blobs_2d(n_samples=1000, *, separation=1.0, scale=0.5, random_state=None):
    """Two Gaussian blobs in 2-d, centred at +-separation/2 on the diagonal.

    Parameters
    ----------
    n_samples : int, default=1000
        Number of points; each gets class 0 or 1 with equal probability.
    separation : float, default=1.0
        Distance between the two centres along each axis.
    scale : float, default=0.5
        Standard deviation of each blob.
    random_state : int, RandomState instance or None, default=None
        Seed.

    Returns
    -------
    X : ndarray of shape (n_samples, 2)
    y : ndarray of shape (n_samples,) with labels 0 and 1

    Examples
    --------
    >>> from skinfluence.datasets import make_blobs_2d
    >>> X, y = make_blobs_2d(10, random_state=1)
    >>> X.shape, sorted(set(y.tolist()))
    ((10, 2), [0, 1])
    """
    rng = check_random_state(random_state)
    y = rng.randint(0, 2, n_samples)
    means = np.array([[-0.5, -0.5], [0.5, 0.5]]) * separation
    X = means[y] + scale * rng.standard_normal((n_samples, 2))
    return X, y
