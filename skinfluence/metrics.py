"""Evaluation of mislabel detection against a known mask of wrong labels.

Every function takes the truth as a boolean mask (True = the label is wrong, as
returned by :func:`skinfluence.datasets.flip_labels`) and either a suspicion score
(higher = more suspicious) or a boolean mask of flagged points.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "detection_report",
    "flagged_precision_recall",
    "recall_at_k",
]


def _mask(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {a.shape}.")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be a boolean mask (True = wrong label).")
        a = a.astype(bool)
    return a


def _check_lengths(truth: np.ndarray, other: np.ndarray, name: str) -> None:
    if truth.shape[0] != other.shape[0]:
        raise ValueError(
            f"{name} has {other.shape[0]} entries but is_wrong has {truth.shape[0]}; "
            "pass one entry per training point."
        )


def flagged_precision_recall(is_wrong, flagged) -> tuple[float, float]:
    """Precision and recall of a set of flagged points.

    Parameters
    ----------
    is_wrong : array-like of bool, shape (n_samples,)
        True where the label is known to be wrong.
    flagged : array-like of bool, shape (n_samples,)
        True where a detector flagged the label.

    Returns
    -------
    precision : float
        Share of the flagged points whose label is wrong (0 when nothing is flagged).
    recall : float
        Share of the wrong labels that were flagged (0 when no label is wrong).

    Examples
    --------
    >>> from skinfluence.metrics import flagged_precision_recall
    >>> flagged_precision_recall([True, True, False, False], [True, False, True, False])
    (0.5, 0.5)
    """
    truth, flags = _mask(is_wrong, "is_wrong"), _mask(flagged, "flagged")
    _check_lengths(truth, flags, "flagged")
    hits = int((truth & flags).sum())
    precision = hits / int(flags.sum()) if flags.any() else 0.0
    recall = hits / int(truth.sum()) if truth.any() else 0.0
    return float(precision), float(recall)


def recall_at_k(is_wrong, scores, k: int) -> float:
    """Share of the wrong labels among the ``k`` most suspicious points.

    Parameters
    ----------
    is_wrong : array-like of bool, shape (n_samples,)
        True where the label is known to be wrong.
    scores : array-like of shape (n_samples,)
        Suspicion, higher = more suspicious.
    k : int
        Number of points inspected, most suspicious first.

    Returns
    -------
    recall : float

    Examples
    --------
    >>> from skinfluence.metrics import recall_at_k
    >>> recall_at_k([True, False, True, False], [0.9, 0.8, 0.1, 0.0], k=2)
    0.5
    """
    truth = _mask(is_wrong, "is_wrong")
    scores = np.asarray(scores, dtype=float)
    _check_lengths(truth, scores, "scores")
    if not 0 <= k <= len(scores):
        raise ValueError(f"k must be in [0, {len(scores)}], got {k}.")
    if not truth.any():
        return 0.0
    top = np.argsort(-scores, kind="stable")[:k]
    return float(truth[top].sum() / truth.sum())


def detection_report(is_wrong, scores, flagged=None) -> dict:
    """AUROC, average precision and, if given, precision / recall of the flagged set.

    Parameters
    ----------
    is_wrong : array-like of bool, shape (n_samples,)
        True where the label is known to be wrong (both values must occur).
    scores : array-like of shape (n_samples,)
        Suspicion, higher = more suspicious.
    flagged : array-like of bool, shape (n_samples,), default=None
        The points a detector flagged (e.g. ``MislabelDetector.label_issues_``).

    Returns
    -------
    report : dict
        ``auroc``, ``average_precision``, ``recall_at_n_wrong`` (recall among the
        as many top-ranked points as there are wrong labels) and, with ``flagged``,
        ``n_flagged``, ``precision_flagged``, ``recall_flagged``.

    Examples
    --------
    >>> from skinfluence.metrics import detection_report
    >>> r = detection_report([True, False, False, True], [0.9, 0.1, 0.2, 0.8])
    >>> r["auroc"], r["recall_at_n_wrong"]
    (1.0, 1.0)
    """
    truth = _mask(is_wrong, "is_wrong")
    scores = np.asarray(scores, dtype=float)
    _check_lengths(truth, scores, "scores")
    if truth.all() or not truth.any():
        raise ValueError("is_wrong must contain both wrong (True) and right (False) labels.")
    report = {
        "auroc": float(roc_auc_score(truth, scores)),
        "average_precision": float(average_precision_score(truth, scores)),
        "recall_at_n_wrong": recall_at_k(truth, scores, int(truth.sum())),
    }
    if flagged is not None:
        flags = _mask(flagged, "flagged")
        precision, recall = flagged_precision_recall(truth, flags)
        report.update(n_flagged=int(flags.sum()), precision_flagged=precision, recall_flagged=recall)
    return report
