"""How far influences can be trusted: agreement with actual retraining.

Influences promise that removing training point j changes the loss at test point i
by about ``I[i, j] / n_train``. This module checks that promise on the user's own
model and data, by retraining:

- :class:`Counterfactuals` refits clones of the estimator on random subsets of the
  training data and without single points, once, and keeps what actually happened
  at the evaluation points (their loss, log-probability and margin of the true
  class). These outcomes do not depend on any influence method, so they score any
  number of scorer settings.
- :func:`linear_datamodeling_score` (LDS, as dattri and TRAK define it) and
  :func:`loo_agreement` compare a scorer's predictions with those outcomes;
  :func:`top_k_removal` removes each point's most helpful training points and
  measures what that does, against random ones.
- :func:`influence_score` is the number ``scorer.score(X, y)`` returns;
  ``Counterfactuals.scorer()`` and ``Counterfactuals.cv()`` let ``GridSearchCV`` pick
  the regularization, rank, curvature or the method itself (wrapped in
  :class:`InfluenceMethod`) with the retrains made once.
"""

from __future__ import annotations

import pickle
import time
import weakref
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, clone, is_classifier
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted

__all__ = [
    "Counterfactuals",
    "DatamodelingScore",
    "InfluenceMethod",
    "InfluenceReport",
    "LooAgreement",
    "TopKRemoval",
    "influence_score",
    "linear_datamodeling_score",
    "loo_agreement",
    "top_k_removal",
]

OUTCOMES = ("loss", "log_proba", "margin")

# Fitted Counterfactuals, so that ``scorer.score(X, y)`` finds the retraining outcomes
# of its own estimator without being handed them. Weak: nothing is kept alive here.
_REGISTRY: weakref.WeakSet = weakref.WeakSet()
_FIT_COUNT = [0]


# ---------------------------------------------------------------------------- refits
def _check_refittable(estimator, who: str):
    """A clone of ``estimator`` that can be fit, or a clear error."""
    if isinstance(estimator, torch.nn.Module):
        raise TypeError(
            f"{who} needs an estimator it can clone and refit, but got a bare torch "
            f"{type(estimator).__name__}, which has no fit method. Wrap the module in a "
            "skorch NeuralNetClassifier or NeuralNetRegressor (with the training "
            "settings you used) and pass that."
        )
    if estimator is None or not hasattr(estimator, "fit"):
        raise TypeError(
            f"{who} needs an estimator with fit(X, y) that sklearn.base.clone can copy; "
            f"got {type(estimator).__name__}."
        )
    try:
        return clone(estimator)
    except Exception as exc:  # clone raises TypeError or RuntimeError
        raise TypeError(
            f"{who} cannot clone the estimator ({type(estimator).__name__}: {exc}); pass "
            "an sklearn or skorch estimator whose get_params describe how to refit it."
        ) from exc


def _true_class_log_proba(est, X, y):
    """(log p(y), log of the summed probability of the other classes), float64."""
    if hasattr(est, "predict_log_proba") and not hasattr(est, "module_"):
        L = np.asarray(est.predict_log_proba(X), dtype=np.float64)
    else:
        P = np.asarray(est.predict_proba(X), dtype=np.float64)
        L = np.log(np.clip(P, np.finfo(np.float64).tiny, None))
    classes = getattr(est, "classes_", None)
    if classes is not None and len(classes) == L.shape[1]:
        classes = np.asarray(classes)
        col = np.searchsorted(classes, y)
        col = np.clip(col, 0, len(classes) - 1)
        known = classes[col] == y
    else:  # skorch: output column k is label k
        col = np.asarray(y).astype(int)
        known = (col >= 0) & (col < L.shape[1])
        col = np.clip(col, 0, L.shape[1] - 1)
    rows = np.arange(L.shape[0])
    own = np.where(known, L[rows, col], np.log(np.finfo(np.float64).tiny))
    others = L.copy()
    others[rows[known], col[known]] = -np.inf
    return own, logsumexp(others, axis=1)


def _outcomes(est, X_test, y_test, classifier: bool) -> dict:
    """The actual outcomes of a fitted estimator at the evaluation points."""
    if classifier:
        own, rest = _true_class_log_proba(est, X_test, y_test)
        return {"loss": -own, "log_proba": own, "margin": own - rest}
    pred = np.asarray(est.predict(X_test), dtype=np.float64).reshape(len(X_test), -1)
    target = np.asarray(y_test, dtype=np.float64).reshape(len(X_test), -1)
    return {"loss": ((pred - target) ** 2).mean(axis=1)}


def _refit(estimator, X, y, keep, X_test, y_test, seeds, classifier):
    """Refit a clone on the kept points once per seed; the mean outcomes and seconds."""
    start = time.perf_counter()
    if isinstance(estimator, bytes):
        estimator = pickle.loads(estimator)
    runs = []
    for seed in seeds:
        est = clone(estimator)
        if "random_state" in est.get_params(deep=False) and est.get_params()["random_state"] is None:
            est.set_params(random_state=int(seed))
        # A fixed torch seed per retrain (skorch initialises and shuffles with torch's
        # RNG); fork_rng leaves the caller's global RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            est.fit(X[keep], y[keep])
            runs.append(_outcomes(est, X_test, y_test, classifier))
    out = {k: np.mean([r[k] for r in runs], axis=0) for k in runs[0]}
    return out, time.perf_counter() - start


def _run_refits(estimator, X, y, masks, X_test, y_test, seeds, classifier, n_jobs, progress, desc):
    from joblib import Parallel, delayed, effective_n_jobs

    if effective_n_jobs(n_jobs) != 1:
        # By value, so that a module class defined in a script or notebook (__main__)
        # reaches the worker processes.
        try:
            import cloudpickle
        except ImportError:  # joblib < 1.5 vendors it
            from joblib.externals import cloudpickle

        # An unfitted clone: a fitted skorch net pickles its module with torch.save,
        # which would refer to the class by name again.
        estimator = cloudpickle.dumps(clone(estimator))
    tasks = (
        delayed(_refit)(estimator, X, y, keep, X_test, y_test, seeds, classifier) for keep in masks
    )
    if not progress:
        return list(Parallel(n_jobs=n_jobs)(tasks))
    from tqdm.auto import tqdm

    results = Parallel(n_jobs=n_jobs, return_as="generator")(tasks)
    return list(tqdm(results, total=len(masks), desc=desc, leave=False))


class Counterfactuals(BaseEstimator):
    """Actual outcomes of retraining: the ground truth influences are checked against.

    Refits ``sklearn.base.clone`` s of ``estimator`` on ``n_subsets`` random subsets
    holding ``fraction`` of the training points, without each of ``n_loo`` single
    points, and on all of them (the reference for leave-one-out changes), in parallel
    with joblib. At every evaluation point it records the loss and, for classifiers,
    the log-probability and margin (log-odds) of the true class. The outcomes do not
    depend on any influence method, so one set of retrains scores any number of
    scorers: pass it to :func:`linear_datamodeling_score`, :func:`loo_agreement`,
    :meth:`report`, or to ``GridSearchCV`` through :meth:`scorer` and :meth:`cv`.

    Every retrain starts from the same torch seeds (``n_seeds`` of them, drawn from
    ``random_state``; outcomes are averaged over the seeds), so subsets differ by
    their data, not by their initialisation; sklearn estimators whose
    ``random_state`` is None get the seed too. The global torch RNG is left as it
    was. Retrains start from scratch: on a network, leave-one-out changes are then
    of the size of training noise, and the datamodeling score (subsets) is the
    informative check.

    Parameters
    ----------
    estimator : sklearn or skorch estimator
        The model to retrain, fitted or not: only its parameters are used, through
        ``clone``. A bare torch module cannot be refit; wrap it in skorch.
    n_subsets : int, default=50
        Random subsets to retrain on (0 skips the datamodeling check).
    fraction : float, default=0.5
        Share of the training points each subset keeps.
    n_loo : int, default=0
        Training points, drawn at random, each left out of one retrain (0 skips the
        leave-one-out check).
    n_seeds : int, default=1
        Retrains per subset with different seeds, averaged; more seeds reduce the
        training noise of a network.
    outcome : {"loss", "log_proba", "margin"}, default="loss"
        The outcome the metrics use unless told otherwise. "log_proba" and "margin"
        (of the true class) are for classifiers only.
    n_jobs : int, default=None
        Parallel retrains (joblib); -1 uses every core.
    progress : bool, default=False
        Show a tqdm progress bar over the retrains.
    random_state : int, RandomState instance or None, default=None
        Draws the subsets, the left-out points and the seeds.

    Attributes
    ----------
    X_train_, y_train_ : ndarray
        The training data the retrains used.
    X_test_, y_test_ : ndarray
        The evaluation points the outcomes were recorded at.
    n_train_, n_test_ : int
        Their numbers.
    subsets_ : ndarray of bool, shape (n_subsets, n_train)
        True where a subset keeps a training point.
    loo_indices_ : ndarray of int, shape (n_loo,)
        The training points left out one at a time.
    seeds_ : ndarray of int, shape (n_seeds,)
        The torch (and sklearn) seeds of every retrain.
    full_outcomes_ : dict of str to ndarray of shape (n_test,)
        Outcomes of the estimator refit on all training points.
    subset_outcomes_ : dict of str to ndarray of shape (n_subsets, n_test)
        Outcomes of the subset retrains.
    loo_outcomes_ : dict of str to ndarray of shape (n_loo, n_test)
        Outcomes of the leave-one-out retrains.
    n_retrains_ : int
        Estimators fitted (seeds included).
    fit_seconds_ : float
        Wall time of ``fit``.
    retrain_seconds_ : ndarray of shape (n_subsets + n_loo + 1,)
        Time of each retrain (all its seeds), in the order full, subsets, leave-one-out.

    Examples
    --------
    >>> from sklearn.datasets import make_classification
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.evaluation import Counterfactuals, linear_datamodeling_score
    >>> X, y = make_classification(n_samples=120, n_features=5, random_state=0)
    >>> model = LogisticRegression().fit(X[:80], y[:80])
    >>> cf = Counterfactuals(model, n_subsets=20, n_loo=10, random_state=0)
    >>> cf = cf.fit(X[:80], y[:80], X[80:], y[80:])
    >>> cf.subset_outcomes_["loss"].shape, cf.n_retrains_
    ((20, 40), 31)
    >>> scorer = DirectInfluenceScorer(model, regularization=0.0).fit(X[:80], y[:80])
    >>> linear_datamodeling_score(scorer, cf).score > 0.5
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        "estimator": "no_validation",
        "n_subsets": [Interval(Integral, 0, None, closed="left")],
        "fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_loo": [Interval(Integral, 0, None, closed="left")],
        "n_seeds": [Interval(Integral, 1, None, closed="left")],
        "outcome": [StrOptions(set(OUTCOMES))],
        "n_jobs": [None, Integral],
        "progress": ["boolean"],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator=None,
        *,
        n_subsets=50,
        fraction=0.5,
        n_loo=0,
        n_seeds=1,
        outcome="loss",
        n_jobs=None,
        progress=False,
        random_state=None,
    ):
        self.estimator = estimator
        self.n_subsets = n_subsets
        self.fraction = fraction
        self.n_loo = n_loo
        self.n_seeds = n_seeds
        self.outcome = outcome
        self.n_jobs = n_jobs
        self.progress = progress
        self.random_state = random_state

    def __sklearn_clone__(self):
        # The estimator is only ever cloned before refitting, so share it as given
        # (skorch's own clone would reset a fitted net the user may still need).
        return type(self)(**self.get_params(deep=False))

    def fit(self, X, y, X_test, y_test):
        """Retrain clones of the estimator and record the outcomes at ``X_test``.

        Parameters
        ----------
        X, y : array-like of shape (n_train, ...) and (n_train,)
            The training data of the model the influences are computed for.
        X_test, y_test : array-like of shape (n_test, ...) and (n_test,)
            Evaluation points, not among the training points.

        Returns
        -------
        self : object
            The fitted counterfactuals.
        """
        self._validate_params()
        _check_refittable(self.estimator, "Counterfactuals")
        X = check_array(X, allow_nd=True, dtype="numeric", input_name="X")
        y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
        X_test = check_array(X_test, allow_nd=True, dtype="numeric", input_name="X_test")
        y_test = check_array(y_test, ensure_2d=False, dtype=None, input_name="y_test")
        for a, b, an, bn in ((X, y, "X", "y"), (X_test, y_test, "X_test", "y_test")):
            if a.shape[0] != b.shape[0]:
                raise ValueError(
                    f"{bn} has {b.shape[0]} samples but {an} has {a.shape[0]}; pass one "
                    "target per sample."
                )
        if X_test.shape[1:] != X.shape[1:]:
            raise ValueError(
                f"X_test has samples of shape {X_test.shape[1:]} but X has {X.shape[1:]}."
            )
        n = X.shape[0]
        if self.n_loo > n:
            raise ValueError(f"n_loo={self.n_loo} exceeds the {n} training points.")
        keep = round(self.fraction * n)
        if self.n_subsets and not 1 <= keep < n:
            raise ValueError(
                f"fraction={self.fraction} keeps {keep} of {n} training points; choose a "
                "fraction that keeps at least one point and removes at least one."
            )
        classifier = is_classifier(self.estimator)
        if self.outcome != "loss" and not classifier:
            raise ValueError(
                f"outcome={self.outcome!r} needs a classifier; use outcome='loss' for "
                f"{type(self.estimator).__name__}."
            )
        rng = check_random_state(self.random_state)
        subsets = np.zeros((self.n_subsets, n), dtype=bool)
        for s in range(self.n_subsets):
            subsets[s, rng.choice(n, keep, replace=False)] = True
        loo = rng.choice(n, self.n_loo, replace=False) if self.n_loo else np.zeros(0, int)
        seeds = rng.randint(0, 2**31 - 1, size=self.n_seeds)

        masks = [np.ones(n, dtype=bool), *subsets]
        for j in loo:
            m = np.ones(n, dtype=bool)
            m[j] = False
            masks.append(m)
        start = time.perf_counter()
        results = _run_refits(
            self.estimator, X, y, masks, X_test, y_test, seeds, classifier, self.n_jobs,
            self.progress, "retrains",
        )
        self.fit_seconds_ = time.perf_counter() - start
        keys = results[0][0].keys()
        self.full_outcomes_ = dict(results[0][0])
        sub, rest = results[1 : 1 + self.n_subsets], results[1 + self.n_subsets :]
        self.subset_outcomes_ = {
            k: np.stack([r[0][k] for r in sub]) if sub else np.zeros((0, len(y_test)))
            for k in keys
        }
        self.loo_outcomes_ = {
            k: np.stack([r[0][k] for r in rest]) if rest else np.zeros((0, len(y_test)))
            for k in keys
        }
        self.retrain_seconds_ = np.array([r[1] for r in results])
        self.n_retrains_ = len(masks) * self.n_seeds
        self.X_train_, self.y_train_, self.X_test_, self.y_test_ = X, y, X_test, y_test
        self.n_train_, self.n_test_ = n, int(X_test.shape[0])
        self.subsets_, self.loo_indices_, self.seeds_ = subsets, loo, seeds
        self.classifier_ = classifier
        _FIT_COUNT[0] += 1
        self._fit_order = _FIT_COUNT[0]
        _REGISTRY.add(self)
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        if "subsets_" in state:
            _REGISTRY.add(self)

    # -------------------------------------------------------------- grid search
    def search_data(self):
        """The training points followed by the evaluation points, for ``GridSearchCV``.

        ``search.fit(*cf.search_data())`` with ``cv=cf.cv()`` fits every candidate
        scorer on the training points and scores it on evaluation points.

        Returns
        -------
        X : ndarray of shape (n_train + n_test, ...)
        y : ndarray of shape (n_train + n_test,)

        Examples
        --------
        >>> from sklearn.linear_model import LogisticRegression
        >>> from skinfluence.evaluation import Counterfactuals
        >>> X, y = [[0.0], [1.0], [2.0], [3.0], [0.5], [2.5]], [0, 0, 1, 1, 0, 1]
        >>> cf = Counterfactuals(LogisticRegression(), n_subsets=0, n_loo=2, random_state=0)
        >>> Xs, ys = cf.fit(X[:4], y[:4], X[4:], y[4:]).search_data()
        >>> Xs.shape, ys.tolist()
        ((6, 1), [0, 0, 1, 1, 0, 1])
        """
        check_is_fitted(self)
        return (
            np.concatenate([self.X_train_, self.X_test_]),
            np.concatenate([self.y_train_, self.y_test_]),
        )

    def cv(self, n_splits=1, points=None, random_state=None):
        """Splits of :meth:`search_data` for ``GridSearchCV(cv=...)``.

        Every split fits on all training points (the data the model was trained on)
        and scores on evaluation points; no evaluation point was in any retrain, so
        nothing leaks. ``n_splits > 1`` scores on disjoint groups of evaluation
        points, so ``cv_results_`` gets a spread (at the price of one scorer fit per
        split).

        Parameters
        ----------
        n_splits : int, default=1
            Groups of evaluation points.
        points : array-like of int, default=None
            Evaluation points to use (indices into ``X_test_``); None uses all. Keep
            the others back to check the chosen setting on points it was not
            chosen on.
        random_state : int or None, default=None
            Shuffles the points before grouping them (when ``n_splits > 1``).

        Returns
        -------
        splits : list of (train_indices, test_indices)

        Examples
        --------
        >>> from sklearn.linear_model import LogisticRegression
        >>> from skinfluence.evaluation import Counterfactuals
        >>> X, y = [[0.0], [1.0], [2.0], [3.0], [0.5], [2.5]], [0, 0, 1, 1, 0, 1]
        >>> cf = Counterfactuals(LogisticRegression(), n_subsets=0, n_loo=2, random_state=0)
        >>> [(a.tolist(), b.tolist()) for a, b in cf.fit(X[:4], y[:4], X[4:], y[4:]).cv()]
        [([0, 1, 2, 3], [4, 5])]
        """
        check_is_fitted(self)
        pts = _points(self, points)
        if not isinstance(n_splits, Integral) or not 1 <= n_splits <= len(pts):
            raise ValueError(
                f"n_splits must be an integer from 1 to the {len(pts)} evaluation points; "
                f"got {n_splits!r}."
            )
        if n_splits > 1:
            pts = check_random_state(random_state).permutation(pts)
        train = np.arange(self.n_train_)
        return [(train, self.n_train_ + np.sort(g)) for g in np.array_split(pts, n_splits)]

    def scorer(self, metric="lds", outcome=None):
        """A scoring callable for ``GridSearchCV(scoring=...)`` reusing these retrains.

        Parameters
        ----------
        metric : {"lds", "loo_pearson", "loo_spearman"}, default="lds"
            What to maximise: the linear datamodeling score, or the leave-one-out
            Pearson or Spearman correlation over all pairs.
        outcome : {"loss", "log_proba", "margin"}, default=None
            None uses the ``outcome`` of these counterfactuals.

        Returns
        -------
        scoring : callable
            ``scoring(scorer, X, y)``: the metric of a fitted scorer (or
            :class:`InfluenceMethod`) at the evaluation points ``X, y``.

        Examples
        --------
        >>> from sklearn.datasets import make_classification
        >>> from sklearn.linear_model import LogisticRegression
        >>> from sklearn.model_selection import GridSearchCV
        >>> from skinfluence import DirectInfluenceScorer
        >>> from skinfluence.evaluation import Counterfactuals
        >>> X, y = make_classification(n_samples=100, n_features=4, random_state=0)
        >>> model = LogisticRegression().fit(X[:70], y[:70])
        >>> cf = Counterfactuals(model, n_subsets=20, random_state=0)
        >>> cf = cf.fit(X[:70], y[:70], X[70:], y[70:])
        >>> search = GridSearchCV(DirectInfluenceScorer(model),
        ...                       {"regularization": [0.0, 10.0]},
        ...                       scoring=cf.scorer(), cv=cf.cv())
        >>> search.fit(*cf.search_data()).best_params_
        {'regularization': 0.0}
        """
        check_is_fitted(self)
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {sorted(_METRICS)}; got {metric!r}.")
        return _RetrainingScorer(self, metric, outcome)

    def report(self, scorers, names=None, points=None):
        """Fit each scorer on the training data and score it against the retrains.

        Parameters
        ----------
        scorers : list of influence scorers
            Unfitted or fitted; each is cloned and fitted on ``X_train_`` (timed).
        names : list of str, default=None
            Row labels; None uses each class name and its regularization (and rank).
        points : array-like of int, default=None
            Evaluation points to score on (indices into ``X_test_``); None uses all.

        Returns
        -------
        report : InfluenceReport
            A table (``print(report)``), rows as dicts (``report.rows``) and a figure
            (``report.plot()``).

        Examples
        --------
        >>> from sklearn.datasets import make_classification
        >>> from sklearn.linear_model import LogisticRegression
        >>> from skinfluence import CgInfluenceScorer, DirectInfluenceScorer
        >>> from skinfluence.evaluation import Counterfactuals
        >>> X, y = make_classification(n_samples=100, n_features=4, random_state=0)
        >>> model = LogisticRegression().fit(X[:70], y[:70])
        >>> cf = Counterfactuals(model, n_subsets=20, n_loo=10, random_state=0)
        >>> cf = cf.fit(X[:70], y[:70], X[70:], y[70:])
        >>> report = cf.report([DirectInfluenceScorer(model, regularization=0.0),
        ...                     CgInfluenceScorer(model, regularization=0.0)])
        >>> abs(report.rows[0]["lds"] - report.rows[1]["lds"]) < 0.01
        True
        """
        check_is_fitted(self)
        if names is not None and len(names) != len(scorers):
            raise ValueError(f"names has {len(names)} entries but scorers has {len(scorers)}.")
        rows = []
        for k, s in enumerate(scorers):
            start = time.perf_counter()
            fitted = clone(s).fit(self.X_train_, self.y_train_)
            I = _influence_matrix(fitted, self, points)
            seconds = time.perf_counter() - start
            row = {"name": names[k] if names is not None else _describe(fitted), "seconds": seconds}
            if self.n_subsets:
                lds = linear_datamodeling_score(I, self, points=points)
                row.update(lds=lds.score, lds_stderr=lds.stderr)
            if len(self.loo_indices_):
                loo = loo_agreement(I, self, points=points)
                row.update(loo_pearson=loo.pearson, loo_spearman=loo.spearman, loo_slope=loo.slope)
            rows.append(row)
        return InfluenceReport(rows=rows, n_retrains=self.n_retrains_, retrain_seconds=self.fit_seconds_)


def _describe(s) -> str:
    p = s.get_params(deep=False)
    bits = []
    if "regularization" in p:
        reg = p["regularization"]
        if not isinstance(reg, str):
            bits.append(f"reg={reg:g}")
        elif hasattr(s, "regularization_"):
            bits.append(f"reg={reg} ({s.regularization_:.2g})")
        else:
            bits.append(f"reg={reg}")
    if "rank" in p and type(s).__name__ != "CgInfluenceScorer":
        bits.append(f"rank={p['rank']}")
    if p.get("hessian", "exact") != "exact":
        bits.append(p["hessian"])
    name = type(s).__name__.replace("InfluenceScorer", "")
    return f"{name}({', '.join(bits)})"


# ---------------------------------------------------------------------------- metrics
def _points(cf, points):
    if points is None:
        return np.arange(cf.n_test_)
    pts = np.asarray(points)
    if pts.dtype == bool:
        pts = np.flatnonzero(pts)
    if pts.ndim != 1 or len(pts) == 0 or pts.min() < 0 or pts.max() >= cf.n_test_:
        raise ValueError(
            f"points must be indices of evaluation points, 0 to {cf.n_test_ - 1}; got {points!r}."
        )
    return pts.astype(int)


def _influence_matrix(scorer_or_I, cf, points):
    """(n_points, n_train) influences of cf's training points on its evaluation points."""
    check_is_fitted(cf)
    pts = _points(cf, points)
    if isinstance(scorer_or_I, np.ndarray) or isinstance(scorer_or_I, list):
        I = np.asarray(scorer_or_I, dtype=np.float64)
        if I.shape == (cf.n_test_, cf.n_train_):
            return I[pts]
        if I.shape == (len(pts), cf.n_train_):
            return I
        raise ValueError(
            f"the influence matrix has shape {I.shape}; expected (n_test, n_train) = "
            f"({cf.n_test_}, {cf.n_train_}) or ({len(pts)}, {cf.n_train_}) for the points."
        )
    check_is_fitted(scorer_or_I)
    n = getattr(scorer_or_I, "n_train_", None)
    if n != cf.n_train_:
        raise ValueError(
            f"the scorer was fitted on {n} training points but the counterfactuals retrained "
            f"on {cf.n_train_}; fit the scorer on the counterfactuals' training data."
        )
    if getattr(scorer_or_I, "mode", "up") != "up":
        raise ValueError("retraining checks need influences of removal: mode='up'.")
    if getattr(scorer_or_I, "sample_weight_", None) is not None:
        raise ValueError(
            "sample_weight: the scorer was fitted with sample weights, but the "
            "counterfactuals refit the estimator without them, so their outcomes are not "
            "what the weighted influences predict; compare with refits that pass the "
            "weights (predict_removal_effect against your own refits)."
        )
    I = scorer_or_I.influences(cf.X_test_[pts], cf.y_test_[pts], cf.X_train_, cf.y_train_)
    return np.asarray(I, dtype=np.float64)


def _outcome(cf, outcome):
    outcome = cf.outcome if outcome is None else outcome
    if outcome not in cf.full_outcomes_:
        raise ValueError(
            f"outcome must be one of {sorted(cf.full_outcomes_)} for this estimator; got {outcome!r}."
        )
    return outcome


def _columnwise_pearson(A, B):
    """Pearson correlation of each column of A with the same column of B (nan if flat)."""
    A = A - A.mean(0)
    B = B - B.mean(0)
    den = np.sqrt((A * A).sum(0) * (B * B).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (A * B).sum(0) / den
    return np.where(den > 0, r, np.nan)


def _pearson(a, b):
    return float(_columnwise_pearson(a.reshape(-1, 1), b.reshape(-1, 1))[0])


def _spearman_cols(A, B):
    return _columnwise_pearson(rankdata(A, axis=0), rankdata(B, axis=0))


def _mean_se(v):
    ok = v[np.isfinite(v)]
    if len(ok) == 0:
        return float("nan"), float("nan")
    se = ok.std(ddof=1) / np.sqrt(len(ok)) if len(ok) > 1 else float("nan")
    return float(ok.mean()), float(se)


@dataclass(frozen=True)
class DatamodelingScore:
    """Result of :func:`linear_datamodeling_score`.

    Attributes
    ----------
    score : float
        LDS: the mean over evaluation points of the per-point Spearman correlations.
    stderr : float
        Its standard error (standard deviation of the per-point values / sqrt(count)).
    per_point : ndarray of shape (n_points,)
        Spearman correlation at each evaluation point (nan where the outcome did not
        vary over the subsets).
    n_subsets : int
        Subsets the correlations run over.

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.evaluation import DatamodelingScore
    >>> DatamodelingScore(0.7, 0.02, np.array([0.68, 0.72]), 50).score
    0.7
    """

    score: float
    stderr: float
    per_point: np.ndarray = field(repr=False)
    n_subsets: int

    def __float__(self) -> float:
        return float(self.score)


def linear_datamodeling_score(scorer, counterfactuals, *, outcome=None, points=None):
    """Linear datamodeling score (LDS) of influences against subset retrains.

    For each evaluation point i and each retrain subset S, the influences predict
    the change of the outcome from removing the points outside S,
    ``sum_{j not in S} I[i, j] / n_train`` for the loss (with the sign flipped for
    the log-probability and margin, which rise where the loss falls). The LDS is
    the Spearman correlation, across subsets, of that prediction with the actual
    outcome of the model refit on S, averaged over evaluation points (Park et al.
    2023, TRAK; the definition dattri uses). 1 means the influences rank every
    subset right; 0 means they carry no information about retraining.

    Parameters
    ----------
    scorer : fitted influence scorer or ndarray of shape (n_test, n_train)
        A scorer fitted on ``counterfactuals.X_train_``, or its influence matrix on
        the evaluation points.
    counterfactuals : Counterfactuals
        Fitted, with ``n_subsets >= 2``.
    outcome : {"loss", "log_proba", "margin"}, default=None
        None uses ``counterfactuals.outcome``.
    points : array-like of int, default=None
        Evaluation points to use (indices into ``X_test_``); None uses all.

    Returns
    -------
    result : DatamodelingScore
        ``score``, ``stderr`` and the per-point correlations.

    Examples
    --------
    >>> from sklearn.datasets import make_classification
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.evaluation import Counterfactuals, linear_datamodeling_score
    >>> X, y = make_classification(n_samples=100, n_features=4, random_state=0)
    >>> model = LogisticRegression().fit(X[:70], y[:70])
    >>> cf = Counterfactuals(model, n_subsets=30, random_state=0)
    >>> cf = cf.fit(X[:70], y[:70], X[70:], y[70:])
    >>> lds = linear_datamodeling_score(DirectInfluenceScorer(model).fit(X[:70], y[:70]), cf)
    >>> 0.5 < lds.score <= 1, lds.per_point.shape
    (True, (30,))
    """
    cf = counterfactuals
    I = _influence_matrix(scorer, cf, points)
    if cf.subsets_.shape[0] < 2:
        raise ValueError(
            "the datamodeling score needs retrains on at least 2 subsets; fit the "
            "Counterfactuals with n_subsets >= 2."
        )
    outcome = _outcome(cf, outcome)
    pts = _points(cf, points)
    removed = (~cf.subsets_).astype(np.float64)
    predicted = removed @ I.T / cf.n_train_  # predicted change of the loss, (S, T)
    if outcome != "loss":
        predicted = -predicted
    actual = cf.subset_outcomes_[outcome][:, pts]
    per_point = _spearman_cols(actual, predicted)
    score, se = _mean_se(per_point)
    return DatamodelingScore(score, se, per_point, int(cf.subsets_.shape[0]))


@dataclass(frozen=True)
class LooAgreement:
    """Result of :func:`loo_agreement`.

    Attributes
    ----------
    pearson, spearman : float
        Correlation of predicted and actual leave-one-out changes over all
        (evaluation point, removed point) pairs.
    pearson_per_point, spearman_per_point : float
        Mean over evaluation points of the correlation across the removed points.
    slope : float
        Least-squares slope of actual on predicted through the origin: 1 means the
        influences get the size right, above 1 that they underestimate it.
    actual, predicted : ndarray of shape (n_loo, n_points)
        The changes themselves.

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.evaluation import LooAgreement
    >>> a = LooAgreement(0.99, 0.9, 0.95, 0.85, 1.1, np.zeros((2, 3)), np.zeros((2, 3)))
    >>> a.pearson
    0.99
    """

    pearson: float
    spearman: float
    pearson_per_point: float
    spearman_per_point: float
    slope: float
    actual: np.ndarray = field(repr=False)
    predicted: np.ndarray = field(repr=False)


def _predicted_loo(I, cf, outcome, pts):
    pred = I[:, cf.loo_indices_].T / cf.n_train_  # predicted change of the loss, (L, T)
    if outcome == "log_proba":
        return -pred
    if outcome == "margin":
        # d margin = d log p / (1 - p): the other classes' share of the full refit.
        rest = np.exp(cf.full_outcomes_["log_proba"][pts] - cf.full_outcomes_["margin"][pts])
        return -pred / rest
    return pred


def loo_agreement(scorer, counterfactuals, *, outcome=None, points=None):
    """Agreement of influences with actual leave-one-out retraining.

    The actual change at evaluation point i from removing training point j is the
    outcome of the model refit without j minus that of the model refit on all
    points (same seeds). The influences predict ``I[i, j] / n_train`` for the loss,
    its negative for the log-probability, and that divided by the other classes'
    probability for the margin.

    Parameters
    ----------
    scorer : fitted influence scorer or ndarray of shape (n_test, n_train)
        A scorer fitted on ``counterfactuals.X_train_``, or its influence matrix.
    counterfactuals : Counterfactuals
        Fitted, with ``n_loo >= 2``.
    outcome : {"loss", "log_proba", "margin"}, default=None
        None uses ``counterfactuals.outcome``.
    points : array-like of int, default=None
        Evaluation points to use (indices into ``X_test_``); None uses all.

    Returns
    -------
    result : LooAgreement
        Pearson and Spearman over all pairs and per point, and the slope.

    Examples
    --------
    >>> from sklearn.datasets import make_classification
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.evaluation import Counterfactuals, loo_agreement
    >>> X, y = make_classification(n_samples=100, n_features=4, random_state=0)
    >>> model = LogisticRegression(tol=1e-10).fit(X[:70], y[:70])
    >>> cf = Counterfactuals(model, n_subsets=0, n_loo=15, random_state=0)
    >>> cf = cf.fit(X[:70], y[:70], X[70:], y[70:])
    >>> scorer = DirectInfluenceScorer(model, regularization=0.0).fit(X[:70], y[:70])
    >>> loo_agreement(scorer, cf).pearson > 0.95
    True
    """
    cf = counterfactuals
    I = _influence_matrix(scorer, cf, points)
    if len(cf.loo_indices_) < 2:
        raise ValueError(
            "the leave-one-out check needs at least 2 left-out points; fit the "
            "Counterfactuals with n_loo >= 2."
        )
    outcome = _outcome(cf, outcome)
    pts = _points(cf, points)
    actual = cf.loo_outcomes_[outcome][:, pts] - cf.full_outcomes_[outcome][pts]
    predicted = _predicted_loo(I, cf, outcome, pts)
    spear_all = _spearman_cols(actual.reshape(-1, 1), predicted.reshape(-1, 1))[0]
    denom = float((predicted * predicted).sum())
    return LooAgreement(
        pearson=_pearson(actual, predicted),
        spearman=float(spear_all),
        pearson_per_point=_mean_se(_columnwise_pearson(actual, predicted))[0],
        spearman_per_point=_mean_se(_spearman_cols(actual, predicted))[0],
        slope=float((actual * predicted).sum() / denom) if denom > 0 else float("nan"),
        actual=actual,
        predicted=predicted,
    )


@dataclass(frozen=True)
class TopKRemoval:
    """Result of :func:`top_k_removal`.

    Attributes
    ----------
    points : ndarray of int, shape (n_points,)
        The evaluation points checked (indices into ``X_test_``).
    actual_top : ndarray of shape (n_points,)
        Actual rise of each point's loss when its k most helpful training points are
        removed together.
    predicted_top : ndarray of shape (n_points,)
        What the influences predict for that removal (``sum of I / n_train``).
    actual_random : ndarray of shape (n_points,)
        Mean actual rise when k random training points are removed.
    beats_random : float
        Share of points where the top-k removal raised the loss more than the random
        ones did.
    ratio : float
        Mean actual over mean predicted rise of the top-k removals: above 1 means
        the influences underestimate group effects.

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.evaluation import TopKRemoval
    >>> r = TopKRemoval(np.arange(2), np.ones(2), np.ones(2), np.zeros(2), 1.0, 1.0)
    >>> r.beats_random
    1.0
    """

    points: np.ndarray = field(repr=False)
    actual_top: np.ndarray = field(repr=False)
    predicted_top: np.ndarray = field(repr=False)
    actual_random: np.ndarray = field(repr=False)
    beats_random: float
    ratio: float


def top_k_removal(scorer, counterfactuals, *, k=10, n_points=20, n_random=5, random_state=None):
    """Remove each point's k most helpful training points together, and k random ones.

    A check of what influence rankings are used for: for each of ``n_points``
    evaluation points, a clone of the estimator is refit without the k training
    points with the largest influence on it, and the rise of its loss compared with
    that of ``n_random`` refits without k random training points (shared by all the
    points). The refits use the counterfactuals' seeds and reference model, so
    this costs ``n_points + n_random`` retrains of its own (they depend on the
    scorer's ranking and cannot be shared across scorers).

    Parameters
    ----------
    scorer : fitted influence scorer or ndarray of shape (n_test, n_train)
        A scorer fitted on ``counterfactuals.X_train_``, or its influence matrix.
    counterfactuals : Counterfactuals
        Fitted; its estimator, training data, seeds and ``n_jobs`` are used.
    k : int, default=10
        Training points removed at once.
    n_points : int, default=20
        Evaluation points checked, drawn at random (all if fewer).
    n_random : int, default=5
        Random removals to compare with.
    random_state : int, RandomState instance or None, default=None
        Draws the points and the random removals.

    Returns
    -------
    result : TopKRemoval

    Examples
    --------
    >>> from sklearn.datasets import make_classification
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.evaluation import Counterfactuals, top_k_removal
    >>> X, y = make_classification(n_samples=100, n_features=4, random_state=0)
    >>> model = LogisticRegression().fit(X[:70], y[:70])
    >>> cf = Counterfactuals(model, n_subsets=0, random_state=0)
    >>> cf = cf.fit(X[:70], y[:70], X[70:], y[70:])
    >>> scorer = DirectInfluenceScorer(model, regularization=0.0).fit(X[:70], y[:70])
    >>> top_k_removal(scorer, cf, k=5, n_points=5, random_state=0).beats_random
    1.0
    """
    cf = counterfactuals
    I = _influence_matrix(scorer, cf, None)
    n = cf.n_train_
    for name, v, hi in (("k", k, n - 1), ("n_points", n_points, None), ("n_random", n_random, None)):
        if not isinstance(v, Integral) or v < 1 or (hi is not None and v > hi):
            raise ValueError(f"{name} must be an integer from 1{f' to {hi}' if hi else ''}; got {v!r}.")
    rng = check_random_state(random_state)
    pts = np.sort(rng.choice(cf.n_test_, min(n_points, cf.n_test_), replace=False))
    masks = []
    top = np.argsort(-I[pts], axis=1, kind="stable")[:, :k]
    for row in top:
        m = np.ones(n, dtype=bool)
        m[row] = False
        masks.append(m)
    for _ in range(n_random):
        m = np.ones(n, dtype=bool)
        m[rng.choice(n, k, replace=False)] = False
        masks.append(m)
    results = _run_refits(
        cf.estimator, cf.X_train_, cf.y_train_, masks, cf.X_test_[pts], cf.y_test_[pts],
        cf.seeds_, cf.classifier_, cf.n_jobs, cf.progress, "top-k retrains",
    )
    base = cf.full_outcomes_["loss"][pts]
    losses = np.stack([r[0]["loss"] for r in results])
    actual_top = losses[np.arange(len(pts)), np.arange(len(pts))] - base
    actual_random = (losses[len(pts) :] - base).mean(0)
    predicted = np.take_along_axis(I[pts], top, axis=1).sum(1) / n
    mean_pred = predicted.mean()
    return TopKRemoval(
        points=pts,
        actual_top=actual_top,
        predicted_top=predicted,
        actual_random=actual_random,
        beats_random=float((actual_top > actual_random).mean()),
        ratio=float(actual_top.mean() / mean_pred) if mean_pred != 0 else float("nan"),
    )


_METRICS = {
    "lds": lambda I, cf, o, p: linear_datamodeling_score(I, cf, outcome=o, points=p).score,
    "loo_pearson": lambda I, cf, o, p: loo_agreement(I, cf, outcome=o, points=p).pearson,
    "loo_spearman": lambda I, cf, o, p: loo_agreement(I, cf, outcome=o, points=p).spearman,
}


# ---------------------------------------------------------------------------- score()
def _match_points(cf, X, y):
    """Indices into cf.X_test_ of the rows of (X, y), or None if any is not there."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.shape[1:] != cf.X_test_.shape[1:] or len(X) != len(y):
        return None
    index = {}
    ref = np.ascontiguousarray(cf.X_test_, dtype=np.float64).reshape(cf.n_test_, -1)
    for i, (row, t) in enumerate(zip(ref, cf.y_test_, strict=True)):
        index.setdefault((row.tobytes(), str(t)), i)
    rows = np.ascontiguousarray(X, dtype=np.float64).reshape(len(X), -1)
    out = [index.get((r.tobytes(), str(t))) for r, t in zip(rows, y, strict=True)]
    return None if any(o is None for o in out) else np.array(out, dtype=int)


def _score(scorer, cf, X, y, metric, outcome):
    pts = _match_points(cf, X, y)
    if pts is None:
        raise ValueError(
            "X, y are not among the evaluation points of the counterfactuals: the "
            "retraining outcomes exist only at the X_test, y_test given to "
            "Counterfactuals.fit (score on those, e.g. with cv=cf.cv())."
        )
    I = _influence_matrix(scorer, cf, pts)
    return float(_METRICS[metric](I, cf, outcome, pts))


class _RetrainingScorer:
    """``scoring(estimator, X, y)`` for GridSearchCV, from fitted Counterfactuals."""

    def __init__(self, counterfactuals, metric, outcome):
        self.counterfactuals = counterfactuals
        self.metric = metric
        self.outcome = outcome

    def __call__(self, estimator, X, y):
        return _score(estimator, self.counterfactuals, X, y, self.metric, self.outcome)

    def __repr__(self):
        return f"Counterfactuals.scorer(metric={self.metric!r})"


def influence_score(scorer, X, y, *, counterfactuals=None, metric=None, outcome=None):
    """How well a fitted scorer's influences predict retraining, at points ``(X, y)``.

    This is what ``scorer.score(X, y)`` returns, a number to maximise: the linear
    datamodeling score (:func:`linear_datamodeling_score`) when the counterfactuals
    have subset retrains, otherwise the leave-one-out Pearson correlation
    (:func:`loo_agreement`). ``(X, y)`` must be evaluation points of a fitted
    :class:`Counterfactuals`, whose retrains never saw them. Without
    ``counterfactuals``, the most recently fitted one of the scorer's own estimator
    that holds these points is used; fit one first.

    Parameters
    ----------
    scorer : fitted influence scorer
        Fitted on the counterfactuals' training data.
    X, y : array-like
        Evaluation points (all or some of the counterfactuals' ``X_test, y_test``).
    counterfactuals : Counterfactuals, default=None
        The retraining outcomes; None looks them up as described above.
    metric : {"lds", "loo_pearson", "loo_spearman"}, default=None
        None: "lds" if there are subset retrains, else "loo_pearson".
    outcome : {"loss", "log_proba", "margin"}, default=None
        None uses the counterfactuals' ``outcome``.

    Returns
    -------
    score : float

    Raises
    ------
    TypeError
        When the scorer's estimator cannot be refit (a bare torch module, or
        something ``clone`` cannot copy): no retraining, no honest score.
    ValueError
        When no fitted counterfactuals hold the points ``(X, y)``.

    Examples
    --------
    >>> from sklearn.datasets import make_classification
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.evaluation import Counterfactuals, influence_score
    >>> X, y = make_classification(n_samples=100, n_features=4, random_state=0)
    >>> model = LogisticRegression().fit(X[:70], y[:70])
    >>> cf = Counterfactuals(model, n_subsets=30, random_state=0)
    >>> cf = cf.fit(X[:70], y[:70], X[70:], y[70:])
    >>> scorer = DirectInfluenceScorer(model).fit(X[:70], y[:70])
    >>> score = influence_score(scorer, X[70:], y[70:])
    >>> score == linear_datamodeling_score(scorer, cf).score
    True
    """
    check_is_fitted(scorer)
    cf = counterfactuals
    if cf is None:
        estimator = scorer.estimator
        _check_refittable(estimator, f"{type(scorer).__name__}.score")
        candidates = [
            c for c in _REGISTRY
            if c.estimator is estimator and c.n_train_ == scorer.n_train_
            and _match_points(c, X, y) is not None
        ]
        if not candidates:
            raise ValueError(
                f"{type(scorer).__name__}.score(X, y) compares influences with actual "
                "retraining, and no retraining outcomes exist for this estimator at "
                "these points. Fit them once: cf = skinfluence.evaluation."
                "Counterfactuals(estimator, n_subsets=50).fit(X_train, y_train, X, y); "
                "then score(X, y) uses them (or pass scoring=cf.scorer() to GridSearchCV)."
            )
        cf = max(candidates, key=lambda c: c._fit_order)
    check_is_fitted(cf)
    if metric is None:
        metric = "lds" if cf.subsets_.shape[0] >= 2 else "loo_pearson"
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}; got {metric!r}.")
    return _score(scorer, cf, X, y, metric, outcome)


# ---------------------------------------------------------------------------- method choice
class InfluenceMethod(BaseEstimator):
    """One influence scorer as a parameter, so ``GridSearchCV`` can choose the method.

    Swap the method like a pipeline step: a grid ``{"scorer": [DirectInfluenceScorer(net)],
    "scorer__regularization": [...]}`` next to ``{"scorer": [ArnoldiInfluenceScorer(net)],
    "scorer__rank": [...]}``. Fitting fits a clone of ``scorer`` (the wrapped model is
    shared, never reset); influences and scores are the fitted scorer's.

    Parameters
    ----------
    scorer : influence scorer
        The method and its settings.

    Attributes
    ----------
    scorer_ : influence scorer
        The fitted clone.
    n_train_ : int
        Training points it was fitted on.

    Examples
    --------
    >>> from sklearn.datasets import make_classification
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.model_selection import GridSearchCV
    >>> from skinfluence import ArnoldiInfluenceScorer, DirectInfluenceScorer
    >>> from skinfluence.evaluation import Counterfactuals, InfluenceMethod
    >>> X, y = make_classification(n_samples=100, n_features=4, random_state=0)
    >>> model = LogisticRegression().fit(X[:70], y[:70])
    >>> cf = Counterfactuals(model, n_subsets=20, random_state=0)
    >>> cf = cf.fit(X[:70], y[:70], X[70:], y[70:])
    >>> grid = [{"scorer": [DirectInfluenceScorer(model)], "scorer__regularization": [0.0, 1.0]},
    ...         {"scorer": [ArnoldiInfluenceScorer(model, random_state=0)], "scorer__rank": [1]}]
    >>> search = GridSearchCV(InfluenceMethod(DirectInfluenceScorer(model)), grid,
    ...                       scoring=cf.scorer(), cv=cf.cv()).fit(*cf.search_data())
    >>> len(search.cv_results_["params"])
    3
    """

    _parameter_constraints: ClassVar[dict] = {"scorer": "no_validation"}

    def __init__(self, scorer=None):
        self.scorer = scorer

    def __sklearn_clone__(self):
        return type(self)(scorer=None if self.scorer is None else clone(self.scorer))

    def fit(self, X, y):
        """Fit a clone of ``scorer`` on the training data.

        Parameters
        ----------
        X, y : array-like
            The data the model was trained on.

        Returns
        -------
        self : object
        """
        if self.scorer is None or not hasattr(self.scorer, "influences"):
            raise TypeError(f"scorer must be an influence scorer; got {self.scorer!r}.")
        self.scorer_ = clone(self.scorer).fit(X, y)
        self.n_train_ = self.scorer_.n_train_
        return self

    @property
    def mode(self):
        return getattr(self.scorer, "mode", "up")

    def influences(self, X_test, y_test=None, X=None, y=None):
        """The fitted scorer's influences (see its ``influences``).

        Returns
        -------
        I : ndarray of shape (n_test, n_train)
        """
        check_is_fitted(self)
        return self.scorer_.influences(X_test, y_test, X, y)

    def self_influence(self, X=None, y=None):
        """The fitted scorer's self-influence (see its ``self_influence``).

        Returns
        -------
        s : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        return self.scorer_.self_influence(X, y)

    def score(self, X, y):
        """:func:`influence_score` of the fitted scorer at ``(X, y)``.

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        return influence_score(self.scorer_, X, y)


# ---------------------------------------------------------------------------- report
@dataclass
class InfluenceReport:
    """Table and figure of :meth:`Counterfactuals.report`: LDS, LOO and time per method.

    Attributes
    ----------
    rows : list of dict
        One per scorer: ``name``, ``seconds`` (fit + influences), ``lds``,
        ``lds_stderr``, ``loo_pearson``, ``loo_spearman``, ``loo_slope`` (those the
        counterfactuals allow).
    n_retrains : int
        Retrains behind the figures.
    retrain_seconds : float
        Their wall time, paid once for every row.

    Examples
    --------
    >>> from skinfluence.evaluation import InfluenceReport
    >>> report = InfluenceReport([{"name": "Direct(reg=0.01)", "seconds": 0.5,
    ...                            "lds": 0.71, "lds_stderr": 0.02}], 51, 30.0)
    >>> print(report)  # doctest: +NORMALIZE_WHITESPACE
    | method | LDS | fit + influences, s |
    |---|---|---|
    | Direct(reg=0.01) | 0.710 +- 0.020 | 0.50 |
    51 retrains, 30.0 s, shared by every row.
    >>> report.best["name"]
    'Direct(reg=0.01)'
    """

    rows: list
    n_retrains: int
    retrain_seconds: float

    @property
    def best(self) -> dict:
        """The row with the highest LDS (or LOO Pearson when there is no LDS)."""
        key = "lds" if "lds" in self.rows[0] else "loo_pearson"
        return max(self.rows, key=lambda r: -np.inf if np.isnan(r[key]) else r[key])

    def __str__(self) -> str:
        has_lds, has_loo = "lds" in self.rows[0], "loo_pearson" in self.rows[0]
        head = ["method"]
        head += ["LDS"] if has_lds else []
        head += ["LOO Pearson", "LOO Spearman", "LOO slope"] if has_loo else []
        head += ["fit + influences, s"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r["name"]]
            if has_lds:
                cells.append(f"{r['lds']:.3f} +- {r['lds_stderr']:.3f}")
            if has_loo:
                cells += [f"{r['loo_pearson']:.3f}", f"{r['loo_spearman']:.3f}", f"{r['loo_slope']:.2f}"]
            cells.append(f"{r['seconds']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(f"{self.n_retrains} retrains, {self.retrain_seconds:.1f} s, shared by every row.")
        return "\n".join(lines)

    def plot(self, ax=None):
        """Bar chart of LDS (with standard errors) or LOO Pearson, time in the labels.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            None makes a new figure.

        Returns
        -------
        ax : matplotlib Axes
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 0.45 * len(self.rows) + 1.5), layout="constrained")
        key = "lds" if "lds" in self.rows[0] else "loo_pearson"
        values = [r[key] for r in self.rows]
        err = [r.get("lds_stderr", 0.0) for r in self.rows] if key == "lds" else None
        labels = [f"{r['name']}  ({r['seconds']:.2f} s)" for r in self.rows]
        y = np.arange(len(self.rows))[::-1]
        best = self.rows.index(self.best)
        colors = ["tab:green" if k == best else "tab:blue" for k in range(len(self.rows))]
        ax.barh(y, values, xerr=err, color=colors, capsize=3)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlabel("LDS (Spearman vs retraining on subsets)" if key == "lds" else "LOO Pearson")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(f"Agreement with {self.n_retrains} retrains ({self.retrain_seconds:.0f} s)", fontsize=10)
        return ax
