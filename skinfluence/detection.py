"""Finding wrong labels: score every training label, flag the suspicious, drop, refit.

:class:`MislabelDetector` fits clones of a classifier on the data (so that cross-
validation around it never leaks), scores each training label with influence
functions, flags the most suspicious and, as an imbalanced-learn sampler, hands back
the rest; as a meta-estimator it refits the classifier on the rest and predicts with it.

The scores come from one of four strategies (``strategy=``):

``"crossfit"``
    K-fold cross-fitting. Each fold's model predicts the probability of the given
    label of the points it did not see (out-of-fold), and, through influence, the
    leave-one-out probability of the points it was trained on: the first-order
    effect of removing point i, ``theta_{-i} = theta + (H + lambda I)^-1 grad l_i / n``,
    pushed through the Jacobian of the model's output at ``x_i``. The two are averaged
    and the score is ``1 - p(given label)``.
``"loo"``
    The same leave-one-out probability, from one model fitted on all the data.
``"self"``
    Self-influence ``grad l_i^T (H + lambda I)^-1 grad l_i`` of one model fitted on all
    the data.
``"harm"``
    Cross-fitted harm: each fold's model scores the points it was trained on by the
    share of the held-out points whose loss they raise (negative influence) minus
    the share whose loss they lower.
"""

from __future__ import annotations

import contextlib
import warnings
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    MetaEstimatorMixin,
    OneToOneFeatureMixin,
    clone,
    is_classifier,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import RepeatedStratifiedKFold, check_cv
from sklearn.utils import _safe_indexing, check_random_state, get_tags
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from ._adapters import LAST_LAYER
from ._gradients import batch_slices
from .scorers import DirectInfluenceScorer, InfluenceScorer, _named
from .solvers import NotPositiveDefiniteError

__all__ = ["STRATEGIES", "MislabelDetector", "default_scorer", "harm_votes"]

#: Regularization of the default scorer (exact inverse of the last layer's
#: Gauss-Newton curvature); on the reference panels the scores change by less than
#: 0.002 AUROC between 1e-3 and 1e-1.
DEFAULT_REGULARIZATION = 0.01



def _plain(value):
    """A numpy scalar as the Python value it holds, for messages (numpy 2 reprs differ)."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- strategies
# Each strategy is a pair of small functions, usable on their own: one computes what
# a fitted scorer says about its points (a scorer fitted on the training part of a
# split, the held-out indices, the data), the other combines those results over the
# fitted models into suspicion scores and class probabilities. One-model strategies
# see a single fit on all the data with nothing held out.


def harm_votes(scorer: InfluenceScorer, X_out, y_out) -> np.ndarray:
    """Share of the points (X_out, y_out) each training point harms, minus the share it helps.

    A point harms a held-out point when its influence on it is negative (removing it
    would lower that point's loss). Counting signs, rather than averaging influences,
    gives every held-out point one vote: a mean would be dominated by the held-out
    points with the largest losses, which are the wrongly labelled ones. Works
    through the held-out points ``scorer.batch_size`` at a time.

    Parameters
    ----------
    scorer : InfluenceScorer
        A fitted scorer (mode "up").
    X_out, y_out : array-like
        Held-out points and their labels.

    Returns
    -------
    votes : ndarray of shape (n_train,)

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.detection import harm_votes
    >>> X = np.r_[np.linspace(-2, -0.5, 10), np.linspace(0.5, 2, 10)][:, None]
    >>> y = (X[:, 0] > 0).astype(int)
    >>> y[0] = 1  # a wrong label, deep in class 0
    >>> scorer = DirectInfluenceScorer(LogisticRegression().fit(X, y)).fit(X, y)
    >>> int(np.argmax(harm_votes(scorer, X[1:], y[1:])))
    0
    """
    votes = np.zeros(scorer.n_train_)
    n_out = len(X_out)
    for o in batch_slices(n_out, scorer.batch_size):
        votes -= np.sign(scorer.influences(X_out[o], y_out[o])).sum(0)
    return votes / max(n_out, 1)


def _loo_probabilities(scorer, classes, correction):
    if correction == "none":
        return scorer.class_probabilities(leave_one_out=True, classes=classes)
    return scorer.leave_one_out_probabilities(correction=correction, classes=classes)


def _loo_fold(scorer, held, X, y, classes, correction="none"):
    return _loo_probabilities(scorer, classes, correction)


def _self_fold(scorer, held, X, y, classes, correction="none"):
    return scorer.self_influence()


def _crossfit_fold(scorer, held, X, y, classes, correction="none"):
    return (
        scorer.class_probabilities(X[held], classes=classes),
        _loo_probabilities(scorer, classes, correction),
    )


def _harm_fold(scorer, held, X, y, classes, correction="none"):
    return harm_votes(scorer, X[held], y[held])


def _one_model_probabilities(fits, n, k):
    P = fits[0][2]
    return None, P, P


def _one_model_scores(fits, n, k):
    return fits[0][2], None, None


def _crossfit_combine(fits, n, k):
    """Mean out-of-fold and in-fold (leave-one-out) probabilities, averaged."""
    sums = {"out": np.zeros((n, k)), "in": np.zeros((n, k))}
    counts = {"out": np.zeros(n), "in": np.zeros(n)}
    for train, held, (p_out, p_in) in fits:
        sums["out"][held] += p_out
        sums["in"][train] += p_in
        counts["out"][held] += 1
        counts["in"][train] += 1
    if (counts["in"] + counts["out"] == 0).any():
        raise ValueError("cv: some samples are in no split; use splits that cover every sample.")
    P_out = sums["out"] / np.maximum(counts["out"], 1)[:, None]
    P_in = sums["in"] / np.maximum(counts["in"], 1)[:, None]
    both = (counts["out"] > 0) & (counts["in"] > 0)
    P = np.where((counts["out"] > 0)[:, None], P_out, P_in)
    P[both] = 0.5 * (P_out[both] + P_in[both])
    # The confident-learning count needs probabilities of models that did not see
    # the points: a network's in-fold probabilities lean towards the labels it
    # memorized, even after the leave-one-out correction.
    return None, P, (P_out if (counts["out"] > 0).all() else P)


def _harm_combine(fits, n, k):
    sums, counts = np.zeros(n), np.zeros(n)
    for train, _held, votes in fits:
        sums[train] += votes
        counts[train] += 1
    if (counts == 0).any():
        raise ValueError(
            "cv: strategy='harm' scores points in the training part of a split; "
            "some samples are in no training part."
        )
    return sums / counts, None, None


#: strategy -> (what one fitted scorer gives, how the fits combine, cross-fitted)
STRATEGIES = {
    "crossfit": (_crossfit_fold, _crossfit_combine, True),
    "loo": (_loo_fold, _one_model_probabilities, False),
    "self": (_self_fold, _one_model_scores, False),
    "harm": (_harm_fold, _harm_combine, True),
}


def _confident_count(P: np.ndarray, y_idx: np.ndarray) -> int:
    """Number of label issues estimated by confident learning (Northcutt et al. 2021).

    Class c's threshold is the mean probability of c over the points labelled c. A
    point is counted when some class reaches its threshold and the most probable of
    those classes is not its given label.
    """
    k = P.shape[1]
    t = np.array([P[y_idx == c, c].mean() if (y_idx == c).any() else 1.0 for c in range(k)])
    above = P >= t[None, :]
    confident = np.where(above, P, -np.inf).argmax(1)
    return int((above.any(1) & (confident != y_idx)).sum())


def _tukey_count(scores: np.ndarray) -> int:
    """Number of scores above Tukey's upper fence, Q3 + 1.5 (Q3 - Q1)."""
    q1, q3 = np.percentile(scores, [25, 75])
    return int((scores > q3 + 1.5 * (q3 - q1)).sum())


def default_scorer() -> DirectInfluenceScorer:
    """The detector's default scorer: the exact inverse of the Gauss-Newton curvature of
    the model's last layer (all parameters of a linear model), exact and cheap for any
    network.

    Returns
    -------
    scorer : DirectInfluenceScorer

    Examples
    --------
    >>> from skinfluence.detection import default_scorer
    >>> default_scorer().get_params()["params"]
    'last-layer'
    """
    return DirectInfluenceScorer(
        hessian="gauss-newton", regularization=DEFAULT_REGULARIZATION, params=LAST_LAYER
    )


@contextlib.contextmanager
def _torch_seed(seed):
    """Seed torch for one fit without changing the global random state afterwards."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _iterate(progress, iterable, desc):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


# --------------------------------------------------------------------------- estimator


def _refit_has(attr):
    def check(self):
        if not self.refit:
            raise AttributeError(
                f"{attr} is available with refit=True, which refits the estimator on the "
                "kept data."
            )
        return hasattr(getattr(self, "estimator_", self.estimator), attr)

    return check


class MislabelDetector(OneToOneFeatureMixin, MetaEstimatorMixin, BaseEstimator):
    """Find wrong labels with influence functions; drop them; refit.

    Scores every training label (higher = more suspicious), flags the most
    suspicious, and either hands back the kept data (``fit_resample``, an
    imbalanced-learn sampler for ``imblearn.pipeline.Pipeline``) or, with
    ``refit=True``, refits a clone of ``estimator`` on it and predicts with it (a
    classifier for ``GridSearchCV`` and ``cross_val_score``). The estimator is always
    fitted on clones inside ``fit`` unless ``prefit=True``, so no cross-validation
    around the detector leaks.

    Parameters
    ----------
    estimator : classifier
        An unfitted classifier the influence scorers support: a skorch
        ``NeuralNetClassifier`` / ``NeuralNetBinaryClassifier`` or an sklearn
        ``LogisticRegression`` (L2 or no penalty). Never modified: clones are
        fitted. With ``prefit=True``, a fitted one, used as it is.
    scorer : InfluenceScorer, default=None
        The influence method, e.g. ``CgInfluenceScorer(regularization=0.01)``. It is
        cloned for each fitted model and its ``estimator`` set to that model; its
        parameters are tunable as ``scorer__<name>`` and ``mode`` must be "up".
        Where a model's exact Hessian (``hessian="exact"``) is not positive
        definite at the scorer's regularization, as often for networks, that model
        is scored with the Gauss-Newton curvature instead, with a
        ``ConvergenceWarning`` that says so.
        None uses ``DirectInfluenceScorer(hessian="gauss-newton",
        regularization=0.01)`` on the parameters of the model's last layer (the
        module owning its last parameter; all parameters of a linear model), exact
        and cheap for any network.
    strategy : {"crossfit", "loo", "self", "harm"}, default="crossfit"
        How labels are scored.

        - "crossfit": for each split of ``cv``, a model fitted on the training part
          gives the out-of-fold probability of the given label to the held-out
          points, and the influence-function leave-one-out probability (the model's
          output at ``x_i`` after a Newton step that removes point i,
          ``theta + (H + lambda I)^-1 grad l_i / n``, to first order in the output)
          to the points it was trained on. The score is 1 minus the mean of the two.
          The most accurate: use it by default, and always for networks, which
          memorize their noisy labels so that anything computed on one final model
          sees them as fitted. There the out-of-fold half carries the signal (the
          leave-one-out step barely moves a memorized point), while for convex
          models the in-fold half is an accurate leave-one-out estimate. Costs
          ``cv * n_repeats`` fits on ``1 - 1/cv`` of the data (two fits' worth of
          epochs with the defaults, about half of 5-fold cross-validation) plus
          one influence fit each.
        - "loo": the influence leave-one-out probability of one model fitted on all
          the data; score 1 minus it. One fit: for convex, regularized models
          (logistic regression), where it is close to actual leave-one-out.
        - "self": self-influence ``grad l_i^T (H + lambda I)^-1 grad l_i`` of one
          model fitted on all the data: how much the model had to bend to fit each
          point. One fit; a ranking without probabilities.
        - "harm": cross-fitted; each model scores the points it was trained on by
          the share of the held-out points they harm (negative influence: removing
          the point would lower that held-out loss) minus the share they help.
          Flags what hurts generalization: wrong labels, but also outliers. A
          ranking without probabilities; costs an influence per held-out point.
    contamination : "auto" or float in (0, 0.5], default="auto"
        How many points to flag. A float flags that share of the points, the most
        suspicious first. "auto" estimates the number from the data: with
        "crossfit" and "loo", by confident learning (Northcutt et al., 2021) on the
        out-of-fold ("crossfit") or leave-one-out ("loo") probabilities: class c's
        threshold is the mean probability of c over the points labelled c, and a
        point counts as an issue when some class reaches its threshold and the most
        probable such class is not its label. With "self" and "harm", it counts the
        scores above Tukey's fence ``Q3 + 1.5 IQR``. Then that many points are
        flagged, most suspicious first.

        Whatever the setting, no class loses more than half of its points: flags
        beyond that are lifted (least suspicious first) with a warning. So the kept
        data is never empty and keeps every class.
    cv : int, cross-validation generator or iterable, default=2
        Splits of "crossfit" and "harm". An int is the number of stratified folds,
        repeated ``n_repeats`` times with different shuffles; each class needs at
        least ``cv`` points. On the reference panels (``benchmarks/bench_mislabel.py``)
        two folds repeated twice found wrong labels better than 5-fold out-of-fold
        probabilities, at about half their cost.
    n_repeats : int, default=2
        Repetitions of an int ``cv``; ignored for other ``cv``.
    refit : bool, default=False
        Refit a clone of ``estimator`` on the kept points in ``fit``; ``predict``,
        ``predict_proba``, ``predict_log_proba``, ``decision_function`` and
        ``score`` then delegate to it. Leave False for a sampler in a pipeline, whose
        next step fits the model.
    prefit : bool, default=False
        ``estimator`` is already fitted on the data given to ``fit``: use it as it is
        (strategies "loo" and "self" only, which need one model). Such a detector is
        not cloned for cross-validation, where the fitted model would have seen the
        validation folds.
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffles of the folds, torch's generator during each fit (torch's
        global random state is restored afterwards) and randomized scorers whose
        own ``random_state`` is None. None leaves all of them random.
    progress : bool, default=False
        Show a tqdm progress bar over the fitted models.
    loo_correction : {"none", "newton"}, default="none"
        The leave-one-out probabilities of "crossfit" and "loo": "none" takes the
        first-order step; "newton" a Newton step with the curvature of the data
        without the point (see ``leave_one_out_probabilities`` of the scorers). On
        the digits panel (logistic regression, 10% flipped labels) it raised the
        leave-one-out AUROC from 0.991 to 0.997; on breast cancer it changed
        nothing (``benchmarks/results/removal.md``).

    Attributes
    ----------
    scores_ : ndarray of shape (n_samples,)
        Suspicion of each training label, higher = more suspicious: ``1 - p(given
        label)`` for "crossfit" and "loo", self-influence for "self", the share of
        held-out points harmed minus the share helped for "harm".
    ranking_ : ndarray of shape (n_samples,)
        Indices of the training points, most suspicious first.
    label_issues_ : ndarray of bool, shape (n_samples,)
        True where the label is flagged as wrong.
    threshold_ : float
        The lowest score among the flagged points (``inf`` when none is flagged).
        Points scoring at least this are flagged, except those lifted by the
        per-class cap.
    sample_indices_ : ndarray of shape (n_kept,)
        Indices of the kept (unflagged) points, as imbalanced-learn's samplers.
    proba_ : ndarray of shape (n_samples, n_classes) or None
        The class probabilities the scores come from ("crossfit", "loo"); None for
        "self" and "harm".
    classes_ : ndarray of shape (n_classes,)
        The class labels.
    estimator_ : classifier
        The clone refitted on the kept points (``refit=True`` only).
    n_features_in_ : int
        Number of features of the training data.
    feature_names_in_ : ndarray of str
        Feature names of a DataFrame given to ``fit``.

    Notes
    -----
    Probabilities are read off the loss, ``p(c | x) = exp(-loss(f(x), c))`` (rows
    renormalised): the model's own probabilities for cross-entropy, NLL and binary
    cross-entropy losses.

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.metrics import roc_auc_score
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfluence import MislabelDetector
    >>> from skinfluence.datasets import flip_labels
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X[:300])
    >>> y_noisy, flipped = flip_labels(y[:300], 0.1, random_state=0)
    >>> det = MislabelDetector(LogisticRegression(), random_state=0).fit(X, y_noisy)
    >>> bool(roc_auc_score(flipped, det.scores_) > 0.9)
    True
    >>> X_kept, y_kept = det.fit_resample(X, y_noisy)
    >>> bool(len(y_kept) == len(y_noisy) - det.label_issues_.sum())
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        "estimator": "no_validation",
        "scorer": [None, InfluenceScorer],
        "strategy": [StrOptions(set(STRATEGIES))],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "cv": ["cv_object"],
        "n_repeats": [Interval(Integral, 1, None, closed="left")],
        "refit": ["boolean"],
        "prefit": ["boolean"],
        "random_state": ["random_state"],
        "progress": ["boolean"],
        "loo_correction": [StrOptions({"none", "newton"})],
    }

    def __init__(
        self,
        estimator=None,
        *,
        scorer=None,
        strategy="crossfit",
        contamination="auto",
        cv=2,
        n_repeats=2,
        refit=False,
        prefit=False,
        random_state=None,
        progress=False,
        loo_correction="none",
    ):
        self.estimator = estimator
        self.scorer = scorer
        self.strategy = strategy
        self.contamination = contamination
        self.cv = cv
        self.n_repeats = n_repeats
        self.refit = refit
        self.prefit = prefit
        self.random_state = random_state
        self.progress = progress
        self.loo_correction = loo_correction

    # ------------------------------------------------------------------ sklearn
    def __sklearn_clone__(self):
        if not self.prefit:
            return super().__sklearn_clone__()
        # A prefit estimator is the point of the detector: cloning would unfit it.
        params = self.get_params(deep=False)
        kept = {k: (v if k == "estimator" else clone(v, safe=False)) for k, v in params.items()}
        return type(self)(**kept)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.sparse = False
        if self.refit and self.estimator is not None:
            inner = get_tags(self.estimator)
            tags.estimator_type = inner.estimator_type
            tags.classifier_tags = inner.classifier_tags
        return tags

    # ------------------------------------------------------------------ checks
    def _check_targets(self, y, n: int):
        """1-d class labels from y; one-hot rows (imblearn's one-vs-all) become labels."""
        if hasattr(y, "to_numpy"):
            y = y.to_numpy()
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] > 1:
            if type_of_target(y) == "multilabel-indicator" and (y.sum(1) == 1).all():
                y = y.argmax(1)
            else:
                raise ValueError(
                    "y: Multilabel and multioutput targets are not supported; pass one "
                    "class label per sample."
                )
        y = column_or_1d(y, warn=True)
        if y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} samples but X has {n}; pass one label per sample.")
        check_classification_targets(y)
        if y.dtype.kind in "fc" and not np.isfinite(y).all():
            raise ValueError("Input y contains NaN or infinity.")
        return y

    def _check_config(self, y_idx: np.ndarray, classes: np.ndarray) -> None:
        if self.estimator is None:
            raise ValueError(
                "estimator: pass a classifier to clean the labels for, e.g. a skorch "
                "NeuralNetClassifier or an sklearn LogisticRegression."
            )
        if not is_classifier(self.estimator):
            raise ValueError(
                f"estimator: {type(self.estimator).__name__} is not a classifier; wrong "
                "labels are found for classifiers (a skorch NeuralNetClassifier, an "
                "sklearn LogisticRegression, MLPClassifier or SGDClassifier)."
            )
        if len(classes) < 2:
            raise ValueError(
                f"y: finding wrong labels needs at least two classes; got {len(classes)} "
                f"class ({classes.tolist()})."
            )
        if self.scorer is not None and self.scorer.mode != "up":
            raise ValueError(
                f"scorer: mode={self.scorer.mode!r} measures feature perturbations; label "
                "scores need mode='up'."
            )
        if self.prefit and STRATEGIES[self.strategy][2]:
            raise ValueError(
                f"prefit=True: strategy={self.strategy!r} fits one model per fold and "
                "cannot use a fitted one; use strategy='loo' or 'self', or prefit=False."
            )
        if STRATEGIES[self.strategy][2] and isinstance(self.cv, Integral):
            counts = np.bincount(y_idx, minlength=len(classes))
            if counts.min() < self.cv:
                c = classes[int(counts.argmin())]
                raise ValueError(
                    f"y: class {_plain(c)!r} has {counts.min()} samples, fewer than cv={self.cv} "
                    "folds; every fold's model must see every class. Lower cv or use "
                    "strategy='loo'."
                )

    # ------------------------------------------------------------------ fitting
    def _fit_clone(self, X, y, seed):
        model = clone(self.estimator)
        with _torch_seed(seed):
            try:
                return model.fit(X, y)
            except (ValueError, TypeError) as exc:
                raise type(exc)(
                    f"estimator: {type(model).__name__} could not be fitted on X of shape "
                    f"{X.shape} ({exc})"
                ) from exc

    def set_params(self, **params):
        """Set parameters; ``scorer__<name>`` also tunes the default scorer.

        Returns
        -------
        self : object
        """
        if self.scorer is None and any(k.startswith("scorer__") for k in params):
            self.scorer = default_scorer()
        return super().set_params(**params)

    def _scored(self, model, X, y, seed, compute):
        """``compute(scorer)`` with a scorer fitted on ``model`` and (X, y)."""
        scorer = clone(self.scorer) if self.scorer is not None else default_scorer()
        if seed is not None and scorer.get_params().get("random_state", 0) is None:
            scorer.set_params(random_state=seed)  # randomized solvers: reproducible
        scorer.set_params(estimator=model)
        try:
            return compute(scorer.fit(X, y))
        except (NotPositiveDefiniteError, torch.linalg.LinAlgError) as exc:
            # A network fitted to noisy labels often has negative curvature (a failed
            # Cholesky factorization says the same); the Gauss-Newton matrix is positive
            # semi-definite and serves label scores as well, so the detector goes on
            # with it rather than fail a whole search.
            if scorer.get_params().get("hessian") != "exact":
                raise
            # the Gauss-Newton matrix is only semi-definite: it needs some regularization
            # ("auto" gives it, from the Gauss-Newton matrix's own top eigenvalue)
            reg = scorer.get_params().get("regularization", 0.0) or DEFAULT_REGULARIZATION
            shown = f"{reg!r}" if isinstance(reg, str) else f"{reg:g}"
            warnings.warn(
                f"MislabelDetector: {str(exc).strip()} Scoring this model with "
                f"hessian='gauss-newton' and regularization={shown} instead; pass a scorer "
                "with hessian='gauss-newton' (or a larger regularization) to silence this "
                "warning.",
                ConvergenceWarning,
                stacklevel=5,
            )
            return compute(scorer.set_params(hessian="gauss-newton", regularization=reg).fit(X, y))

    def _splits(self, X, y, rng):
        if isinstance(self.cv, Integral):
            cv = RepeatedStratifiedKFold(
                n_splits=self.cv, n_repeats=self.n_repeats, random_state=rng.randint(2**31 - 1)
            )
        else:
            cv = check_cv(self.cv, y, classifier=True)
        return list(cv.split(X, y))

    def _score(self, X, y, classes, rng):
        """Scores or None, probabilities or None, probabilities for the "auto" count."""
        n, k = X.shape[0], len(classes)
        seeds = None if self.random_state is None else rng
        seed = (lambda: None) if seeds is None else (lambda: seeds.randint(2**31 - 1))
        per_fit, combine, crossfitted = STRATEGIES[self.strategy]
        if not crossfitted:
            model = self.estimator if self.prefit else self._fit_clone(X, y, seed())
            everything, nothing = np.arange(n), np.arange(0)
            res = self._scored(
                model, X, y, seed(),
                lambda sc: per_fit(sc, nothing, X, y, classes, self.loo_correction),
            )
            return combine([(everything, nothing, res)], n, k)
        fits = []
        for train, held in _iterate(self.progress, self._splits(X, y, rng), "folds"):
            model = self._fit_clone(X[train], y[train], seed())
            res = self._scored(
                model, X[train], y[train], seed(),
                lambda sc, held=held: per_fit(sc, held, X, y, classes, self.loo_correction),
            )
            fits.append((train, held, res))
        return combine(fits, n, k)

    def _flag(self, scores, P_count, y_idx, classes):
        n = len(scores)
        order = np.argsort(-scores, kind="stable")
        if self.contamination == "auto":
            m = _confident_count(P_count, y_idx) if P_count is not None else _tukey_count(scores)
        else:
            m = round(self.contamination * n)
        flags = np.zeros(n, dtype=bool)
        flags[order[:m]] = True
        # Wrong labels are a minority of any class in which they can be told apart;
        # a class flagged beyond half says more about the model than the labels.
        counts = np.bincount(y_idx, minlength=len(classes))
        limit = counts // 2
        capped = []
        for c in range(len(classes)):
            ranked = order[flags[order] & (y_idx[order] == c)]
            if len(ranked) > limit[c]:
                flags[ranked[limit[c]:]] = False
                capped.append(
                    f"class {_plain(classes[c])!r}: {limit[c]} of its {counts[c]} points flagged "
                    f"instead of {len(ranked)}"
                )
        if capped:
            warnings.warn(
                "MislabelDetector would have flagged more than half of a class; the flags "
                f"are capped at the most suspicious half ({'; '.join(capped)}), so that "
                "every class keeps at least half of its points. Lower contamination, or "
                "check that the estimator fits these classes.",
                UserWarning,
                stacklevel=3,
            )
        return flags, order

    def _fit(self, X, y):
        self._validate_params()
        with _named("X"):
            X = validate_data(self, X, reset=True, allow_nd=True, dtype="numeric")
        with _named("y"):
            y = self._check_targets(y, X.shape[0])
        classes, y_idx = np.unique(y, return_inverse=True)
        self._check_config(y_idx, classes)
        rng = check_random_state(self.random_state)
        scores, P, P_count = self._score(X, y, classes, rng)
        if scores is None:
            scores = 1.0 - P[np.arange(len(y)), y_idx]
        flags, order = self._flag(scores, P_count, y_idx, classes)
        self.classes_ = classes
        self.scores_ = scores
        self.proba_ = P
        self.ranking_ = order
        self.label_issues_ = flags
        self.threshold_ = float(scores[flags].min()) if flags.any() else float("inf")
        self.sample_indices_ = np.flatnonzero(~flags)
        if self.refit:
            keep = self.sample_indices_
            self.estimator_ = self._fit_clone(X[keep], y[keep], rng.randint(2**31 - 1)
                                              if self.random_state is not None else None)
        return self

    def fit(self, X, y):
        """Score every label and flag the suspicious; with ``refit=True``, refit.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, ...)
            Training data, as the estimator takes it.
        y : array-like of shape (n_samples,)
            Class labels, some possibly wrong.

        Returns
        -------
        self : object
            The fitted detector.
        """
        return self._fit(X, y)

    def fit_resample(self, X, y):
        """Fit, then return the points whose labels are not flagged.

        Follows imbalanced-learn's sampler contract: a DataFrame / Series comes back
        as a DataFrame / Series (index and names kept), a list as a list, an array
        as an array of the same dtype; ``sample_indices_`` holds the kept rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : array-like of shape (n_samples,)
            Class labels, some possibly wrong.

        Returns
        -------
        X_resampled : array-like of shape (n_kept, n_features)
        y_resampled : array-like of shape (n_kept,)
        """
        self._fit(X, y)
        keep = self.sample_indices_
        return _safe_indexing(X, keep), _safe_indexing(y, keep)

    # ------------------------------------------------------------------ refit model
    def _check_refit(self, X):
        check_is_fitted(self, "estimator_")
        with _named("X"):
            return validate_data(self, X, reset=False, allow_nd=True, dtype="numeric")

    @available_if(_refit_has("predict"))
    def predict(self, X):
        """Predict with the estimator refitted on the kept points.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        X = self._check_refit(X)
        return self.estimator_.predict(X)

    @available_if(_refit_has("predict_proba"))
    def predict_proba(self, X):
        """Class probabilities of the estimator refitted on the kept points.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        X = self._check_refit(X)
        return self.estimator_.predict_proba(X)

    @available_if(_refit_has("predict_log_proba"))
    def predict_log_proba(self, X):
        """Log class probabilities of the estimator refitted on the kept points.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
        """
        X = self._check_refit(X)
        return self.estimator_.predict_log_proba(X)

    @available_if(_refit_has("decision_function"))
    def decision_function(self, X):
        """Decision function of the estimator refitted on the kept points.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,) or (n_samples, n_classes)
        """
        X = self._check_refit(X)
        return self.estimator_.decision_function(X)

    @available_if(_refit_has("score"))
    def score(self, X, y, sample_weight=None):
        """Score of the estimator refitted on the kept points (accuracy for classifiers).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        score : float
        """
        X = self._check_refit(X)
        if sample_weight is None:
            return self.estimator_.score(X, y)
        return self.estimator_.score(X, y, sample_weight=sample_weight)
