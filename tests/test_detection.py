"""MislabelDetector: detection quality, its arithmetic against independent references,
the sklearn / imbalanced-learn contracts, and the detection metrics.

Deliberate exceptions to the estimator checks (see ``IMBLEARN_EXCEPTIONS``): the
detector accepts no sparse input (influences need dense tensors), has no
``sampling_strategy`` (it picks points by the suspicion of their labels, not by
class counts), and does not carry imbalanced-learn's own tag class (its
``sample_indices_`` is tested directly). sklearn's ``check_estimator`` passes whole,
with ``refit=True`` (a classifier) and ``refit=False``.
"""

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from _models import LogitMLP
from imblearn.pipeline import Pipeline as ImbPipeline
from imblearn.utils import estimator_checks as imb_checks
from sklearn.base import clone, is_classifier
from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from skinfluence import (
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    DirectInfluenceScorer,
    EkfacInfluenceScorer,
    LissaInfluenceScorer,
    MislabelDetector,
    NystroemInfluenceScorer,
)
from skinfluence.datasets import flip_labels, make_blobs_2d
from skinfluence.metrics import detection_report, flagged_precision_recall, recall_at_k


def make_net(d_in=13, d_out=3, epochs=15, hidden=8, weight_decay=1e-3):
    from skorch import NeuralNetClassifier

    return NeuralNetClassifier(
        LogitMLP, module__d_in=d_in, module__d_h=hidden, module__d_out=d_out,
        criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.05,
        optimizer__weight_decay=weight_decay, max_epochs=epochs, batch_size=64,
        train_split=None, verbose=0,
    )


@pytest.fixture(scope="module")
def separable():
    """Two far-apart blobs with 6 of 60 labels flipped."""
    X, y = make_blobs_2d(60, separation=5.0, scale=0.5, random_state=0)
    y_noisy, flipped = flip_labels(y, 0.1, random_state=0)
    return X, y_noisy, flipped


@pytest.fixture(scope="module")
def noisy_wine(wine):
    Xtr, ytr, Xte, yte = wine
    y_noisy, flipped = flip_labels(ytr, 0.1, random_state=0)
    return Xtr.astype(np.float32), y_noisy.astype(np.int64), flipped, Xte.astype(np.float32), yte


@pytest.fixture(scope="module")
def cancer_small():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X[:120])
    y_noisy, flipped = flip_labels(y[:120], 0.1, random_state=0)
    return X, y_noisy, flipped


def logreg():
    return LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000)


# --------------------------------------------------------------------------- quality


@pytest.mark.parametrize("strategy", ["crossfit", "loo", "self", "harm"])
def test_flips_rank_first_on_separable_data(separable, strategy):
    X, y, flipped = separable
    det = MislabelDetector(LogisticRegression(), strategy=strategy, random_state=0).fit(X, y)
    assert set(det.ranking_[: flipped.sum()]) == set(np.flatnonzero(flipped))


def test_flips_rank_first_with_a_network(separable):
    X, y, flipped = separable
    net = make_net(d_in=2, d_out=2, epochs=30)
    det = MislabelDetector(net, random_state=0).fit(X.astype(np.float32), y.astype(np.int64))
    assert set(det.ranking_[: flipped.sum()]) == set(np.flatnonzero(flipped))
    # "auto" flags exactly the flips here
    np.testing.assert_array_equal(det.label_issues_, flipped)


class _OneLogit(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(2, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))).squeeze(-1)


def test_flips_rank_first_with_a_binary_network(separable):
    from skorch import NeuralNetBinaryClassifier

    X, y, flipped = separable
    net = NeuralNetBinaryClassifier(
        _OneLogit, max_epochs=30, lr=0.05, optimizer=torch.optim.Adam, train_split=None,
        verbose=0,
    )
    det = MislabelDetector(net, random_state=0).fit(X.astype(np.float32), y.astype(np.float32))
    assert set(det.ranking_[: flipped.sum()]) == set(np.flatnonzero(flipped))
    np.testing.assert_allclose(det.proba_.sum(1), 1)


def test_crossfit_finds_flips_in_wine_network(noisy_wine):
    X, y, flipped, _, _ = noisy_wine
    det = MislabelDetector(make_net(epochs=60), random_state=0).fit(X, y)
    assert roc_auc_score(flipped, det.scores_) > 0.9
    precision, recall = flagged_precision_recall(flipped, det.label_issues_)
    assert precision > 0.5 and recall > 0.5


# --------------------------------------------------------------------------- arithmetic


def test_loo_probabilities_match_actual_leave_one_out(cancer_small):
    """For a convex model the influence estimate is close to retraining without i."""
    X, y, _ = cancer_small
    det = MislabelDetector(
        logreg(), strategy="loo", scorer=DirectInfluenceScorer(regularization=0.0)
    ).fit(X, y)
    in_sample = logreg().fit(X, y).predict_proba(X)[np.arange(len(y)), y]
    idx = np.r_[det.ranking_[:8], det.ranking_[-3:], np.arange(0, len(y), 20)]
    actual = []
    for i in idx:
        keep = np.arange(len(y)) != i
        actual.append(logreg().fit(X[keep], y[keep]).predict_proba(X[i : i + 1])[0, y[i]])
    actual = np.array(actual)
    estimate = det.proba_[idx, y[idx]]
    assert np.corrcoef(actual, estimate)[0, 1] > 0.999
    # much closer to leave-one-out than the in-sample probability is
    assert np.abs(actual - estimate).max() < 0.3 * np.abs(actual - in_sample[idx]).max()
    np.testing.assert_allclose(det.scores_, 1 - det.proba_[np.arange(len(y)), y])


def test_crossfit_combines_out_of_fold_and_leave_one_out(cancer_small):
    X, y, _ = cancer_small
    rng = np.random.default_rng(0)
    a = np.sort(rng.permutation(len(y))[:60])
    b = np.setdiff1d(np.arange(len(y)), a)
    det = MislabelDetector(logreg(), cv=[(a, b), (b, a)]).fit(X, y)
    expected = np.zeros((len(y), 2))
    for train, held in [(a, b), (b, a)]:
        model = logreg().fit(X[train], y[train])
        out_of_fold = model.predict_proba(X[held])  # sklearn's own, independent of us
        loo = MislabelDetector(model, strategy="loo", prefit=True).fit(X[train], y[train])
        expected[held] += 0.5 * out_of_fold
        expected[train] += 0.5 * loo.proba_
    np.testing.assert_allclose(det.proba_, expected, atol=1e-8)


def test_one_split_gives_held_out_points_their_out_of_fold_probability(cancer_small):
    X, y, _ = cancer_small
    train, held = np.arange(80), np.arange(80, len(y))
    det = MislabelDetector(logreg(), cv=[(train, held)]).fit(X, y)
    np.testing.assert_allclose(
        det.proba_[held], logreg().fit(X[train], y[train]).predict_proba(X[held]), atol=1e-8
    )


def test_harm_is_the_share_of_held_out_points_harmed_minus_helped(cancer_small):
    X, y, _ = cancer_small
    a, b = np.arange(70), np.arange(70, len(y))
    det = MislabelDetector(logreg(), strategy="harm", cv=[(a, b), (b, a)]).fit(X, y)
    for train, held in [(a, b), (b, a)]:
        model = logreg().fit(X[train], y[train])
        scorer = DirectInfluenceScorer(model, hessian="gauss-newton", regularization=0.01)
        influences = scorer.fit(X[train], y[train]).influences(X[held], y[held])  # (n_held, n_train)
        expected = (influences < 0).mean(0) - (influences > 0).mean(0)
        np.testing.assert_allclose(det.scores_[train], expected)
    with pytest.raises(ValueError, match="no training part"):
        MislabelDetector(logreg(), strategy="harm", cv=[(a, b)]).fit(X, y)


def test_self_strategy_is_the_scorers_self_influence(cancer_small):
    X, y, _ = cancer_small
    model = logreg().fit(X, y)
    scorer = DirectInfluenceScorer(regularization=0.05)
    det = MislabelDetector(model, scorer=scorer, strategy="self", prefit=True).fit(X, y)
    expected = clone(scorer).set_params(estimator=model).fit(X, y).self_influence()
    np.testing.assert_allclose(det.scores_, expected)
    assert det.proba_ is None


def test_default_scorer_uses_the_last_layer(noisy_wine):
    """Gauss-Newton of the last layer, exactly: equal to Direct restricted to it."""
    X, y, _, _, _ = noisy_wine
    net = make_net().fit(X, y)
    det = MislabelDetector(net, strategy="self", prefit=True).fit(X, y)
    ref = DirectInfluenceScorer(
        net, params="out", hessian="gauss-newton", regularization=0.01
    ).fit(X, y)
    np.testing.assert_allclose(det.scores_, ref.self_influence(), rtol=1e-4)


# --------------------------------------------------------------------------- flags


def test_float_contamination_flags_that_share_most_suspicious_first(cancer_small):
    X, y, _ = cancer_small
    det = MislabelDetector(LogisticRegression(), contamination=0.1, random_state=0).fit(X, y)
    assert det.label_issues_.sum() == 12
    np.testing.assert_array_equal(np.flatnonzero(det.label_issues_), np.sort(det.ranking_[:12]))
    assert det.threshold_ == det.scores_[det.label_issues_].min()
    assert (det.scores_[~det.label_issues_] <= det.threshold_).all()
    np.testing.assert_array_equal(det.sample_indices_, np.flatnonzero(~det.label_issues_))
    np.testing.assert_array_equal(det.ranking_, np.argsort(-det.scores_, kind="stable"))


def test_auto_counts_by_confident_learning():
    """Clean, well separated data: confident learning finds no issue."""
    X, y = make_blobs_2d(80, separation=6.0, scale=0.5, random_state=2)
    det = MislabelDetector(LogisticRegression(), random_state=0).fit(X, y)
    assert not det.label_issues_.any() and det.threshold_ == np.inf
    assert len(det.fit_resample(X, y)[1]) == len(y)


def test_never_drops_a_class_nor_empties_the_data():
    """Class 2's points all sit inside class 0: everything wants to flag them."""
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(-3, 0.5, (30, 2)), rng.normal(3, 0.5, (30, 2)), rng.normal(-3, 0.5, (6, 2))]
    y = np.r_[np.zeros(30), np.ones(30), np.full(6, 2)].astype(int)
    det = MislabelDetector(LogisticRegression(), strategy="loo", contamination=0.5)
    with pytest.warns(UserWarning, match=r"class 2: 3 of its 6 points flagged instead of 6"):
        _, y_kept = det.fit_resample(X, y)
    assert set(y_kept) == {0, 1, 2} and (y_kept == 2).sum() == 3
    for c in range(3):  # no class loses more than half
        assert (y_kept == c).sum() >= np.ceil((y == c).sum() / 2)


def test_largest_contamination_still_keeps_half_of_each_class():
    X, y = make_blobs_2d(41, random_state=0)
    det = MislabelDetector(LogisticRegression(), strategy="self", contamination=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, y_kept = det.fit_resample(X, y)
    assert len(y_kept) == len(y) - det.label_issues_.sum() >= len(y) / 2
    for c in (0, 1):
        assert (y_kept == c).sum() >= np.ceil((y == c).sum() / 2)


# --------------------------------------------------------------------------- user snippets


def test_snippet_standalone(noisy_wine):
    X, y, flipped, _, _ = noisy_wine
    # the exact Hessian of a network is positive definite only where it is well
    # regularized; otherwise the scorer asks for more regularization or Gauss-Newton
    net = make_net(epochs=40, weight_decay=1e-2)
    det = MislabelDetector(
        net, scorer=ArnoldiInfluenceScorer(rank=20), contamination="auto", random_state=0
    ).fit(X, y)
    assert det.label_issues_.dtype == bool and det.label_issues_.shape == y.shape
    assert roc_auc_score(flipped, det.scores_) > 0.85
    np.testing.assert_array_equal(det.ranking_, np.argsort(-det.scores_, kind="stable"))
    X_clean, y_clean = det.fit_resample(X, y)
    np.testing.assert_array_equal(X_clean, X[~det.label_issues_])
    np.testing.assert_array_equal(y_clean, y[~det.label_issues_])
    assert not hasattr(net, "module_")  # the given net is never fitted itself


def test_snippet_imblearn_pipeline_grid_search(noisy_wine):
    X, y, _, Xte, yte = noisy_wine
    net = make_net(epochs=10)
    pipe = ImbPipeline([
        ("scale", StandardScaler()),
        ("clean", MislabelDetector(net, scorer=CgInfluenceScorer(), n_repeats=1, random_state=0)),
        ("model", net),
    ])
    grid = {
        "clean__scorer__regularization": [1e-3, 1e-2, 1e-1],
        "clean__contamination": [0.05, 0.1, "auto"],
    }
    search = GridSearchCV(pipe, grid, cv=2).fit(X, y)
    assert search.best_params_["clean__scorer__regularization"] in grid["clean__scorer__regularization"]
    assert search.best_params_["clean__contamination"] in grid["clean__contamination"]
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert 0 <= search.score(Xte, yte) <= 1
    detector = search.best_estimator_.named_steps["clean"]
    assert hasattr(detector, "sample_indices_")


def test_snippet_meta_estimator_grid_search(noisy_wine):
    X, y, _, Xte, yte = noisy_wine
    det = MislabelDetector(
        make_net(epochs=10), scorer=NystroemInfluenceScorer(), refit=True, n_repeats=1,
        random_state=0,
    )
    assert is_classifier(det)
    grid = {"scorer__rank": [10, 30, 100], "scorer__regularization": [0.01, 0.1]}
    search = GridSearchCV(det, grid, cv=2).fit(X, y)
    assert search.best_params_["scorer__rank"] in grid["scorer__rank"]
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    best = search.best_estimator_
    np.testing.assert_array_equal(best.classes_, [0, 1, 2])
    proba = best.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(best.predict(Xte), best.estimator_.predict(Xte))
    assert best.score(Xte, yte) == pytest.approx(np.mean(best.predict(Xte) == yte))


@pytest.mark.parametrize(
    "scorer",
    [
        CgInfluenceScorer(hessian="gauss-newton"),
        ArnoldiInfluenceScorer(rank=20, hessian="gauss-newton"),
        NystroemInfluenceScorer(rank=20, hessian="gauss-newton"),
        LissaInfluenceScorer(hessian="gauss-newton", regularization=0.1, maxiter=200),
        EkfacInfluenceScorer(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_every_scorer_drives_the_detector(noisy_wine, scorer):
    X, y, flipped, _, _ = noisy_wine
    det = MislabelDetector(make_net(epochs=40), scorer=scorer, n_repeats=1, random_state=0)
    det.fit(X, y)
    assert roc_auc_score(flipped, det.scores_) > 0.85


def test_cg_matches_direct_on_all_parameters(noisy_wine):
    X, y, _, _, _ = noisy_wine
    net = make_net(epochs=40).fit(X, y)
    kw = dict(hessian="gauss-newton", regularization=0.05, dtype="float64")
    direct = MislabelDetector(net, scorer=DirectInfluenceScorer(**kw), strategy="loo", prefit=True)
    cg = MislabelDetector(net, scorer=CgInfluenceScorer(rtol=1e-10, **kw), strategy="loo", prefit=True)
    np.testing.assert_allclose(cg.fit(X, y).scores_, direct.fit(X, y).scores_, atol=1e-6)


# --------------------------------------------------------------------------- contracts


@parametrize_with_checks(
    [
        MislabelDetector(LogisticRegression(), refit=True, n_repeats=1, random_state=0),
        MislabelDetector(LogisticRegression(), n_repeats=1, random_state=0),
    ]
)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # per-class caps on random data
        check(estimator)


#: imbalanced-learn sampler checks that do not apply, and why.
IMBLEARN_EXCEPTIONS = {
    "check_samplers_fit": "no sampling_strategy_: points are chosen by label suspicion",
    "check_samplers_sampling_strategy_fit_resample": "no sampling_strategy parameter",
    "check_samplers_sparse": "influences need dense inputs",
    "check_samplers_pandas_sparse": "influences need dense inputs",
    "check_samplers_sample_indices": "needs imblearn's own tag class; tested directly",
    "check_samplers_string": "numeric features only",
    "check_samplers_nan": "numeric finite features only",
}
IMBLEARN_CHECKS = [
    "check_target_type",
    "check_samplers_one_label",
    "check_samplers_fit_resample",
    "check_samplers_pandas",
    "check_samplers_list",
    "check_samplers_multiclass_ova",
    "check_samplers_2d_target",
    "check_samplers_preserve_dtype",
    "check_sampler_get_feature_names_out",
    "check_sampler_get_feature_names_out_pandas",
]


@pytest.mark.parametrize("check", IMBLEARN_CHECKS)
def test_imblearn_sampler_checks(check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        getattr(imb_checks, check)(
            "MislabelDetector", MislabelDetector(LogisticRegression(), n_repeats=1, random_state=0)
        )


@pytest.mark.parametrize(
    "check", ["check_classifier_on_multilabel_or_multioutput_targets", "check_classifiers_with_encoded_labels"]
)
def test_imblearn_classifier_checks(check):
    det = MislabelDetector(LogisticRegression(max_iter=1000), refit=True, random_state=0)
    getattr(imb_checks, check)("MislabelDetector", det)


def test_pandas_round_trip(cancer_small):
    X, y, _ = cancer_small
    index = np.arange(len(y))[::-1] + 1000
    X_df = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])], index=index)
    y_s = pd.Series(y, index=index, name="label")
    det = MislabelDetector(LogisticRegression(), contamination=0.1, random_state=0)
    X_res, y_res = det.fit_resample(X_df, y_s)
    assert isinstance(X_res, pd.DataFrame) and isinstance(y_res, pd.Series)
    assert list(X_res.columns) == list(X_df.columns) and y_res.name == "label"
    np.testing.assert_array_equal(X_res.index, index[det.sample_indices_])
    np.testing.assert_array_equal(det.feature_names_in_, X_df.columns)
    X_np, y_np = clone(det).fit_resample(X, y)
    np.testing.assert_array_equal(X_res.to_numpy(), X_np)
    np.testing.assert_array_equal(y_res.to_numpy(), y_np)


def test_inputs_and_estimator_are_not_mutated(noisy_wine):
    X, y, _, _, _ = noisy_wine
    X0, y0 = X.copy(), y.copy()
    lr = LogisticRegression()
    MislabelDetector(lr, refit=True, random_state=0).fit(X, y)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(y, y0)
    assert not hasattr(lr, "coef_")
    net = make_net(epochs=5).fit(X, y)
    before = {k: v.clone() for k, v in net.module_.state_dict().items()}
    MislabelDetector(net, strategy="loo", prefit=True).fit(X, y)
    for k, v in net.module_.state_dict().items():
        assert torch.equal(v, before[k])


def test_random_state_reproduces_and_leaves_torch_rng_alone(noisy_wine):
    X, y, _, _, _ = noisy_wine
    state = torch.get_rng_state()
    a = MislabelDetector(make_net(epochs=5), n_repeats=1, random_state=3).fit(X, y)
    assert torch.equal(state, torch.get_rng_state())
    b = MislabelDetector(make_net(epochs=5), n_repeats=1, random_state=3).fit(X, y)
    np.testing.assert_array_equal(a.scores_, b.scores_)


def test_prefit_is_kept_by_clone_and_refit_works(cancer_small):
    X, y, _ = cancer_small
    model = LogisticRegression().fit(X, y)
    det = MislabelDetector(model, strategy="loo", prefit=True, refit=True, contamination=0.1)
    assert clone(det).estimator is model
    det.fit(X, y)
    assert det.estimator_ is not model
    keep = det.sample_indices_
    np.testing.assert_allclose(
        det.predict_proba(X), LogisticRegression().fit(X[keep], y[keep]).predict_proba(X)
    )
    assert clone(MislabelDetector(LogisticRegression())).estimator is not None


def test_meta_estimator_in_cross_val_score_and_pickle(cancer_small):
    X, y, _ = cancer_small
    det = MislabelDetector(LogisticRegression(), refit=True, random_state=0)
    scores = cross_val_score(det, X, y, cv=3)
    assert scores.shape == (3,) and (scores > 0.8).all()
    det.fit(X, y)
    again = pickle.loads(pickle.dumps(det))
    np.testing.assert_array_equal(again.predict(X), det.predict(X))
    np.testing.assert_array_equal(again.scores_, det.scores_)


def test_delegation_needs_refit(cancer_small):
    X, _, _ = cancer_small
    det = MislabelDetector(LogisticRegression())
    assert not hasattr(det, "predict") and not is_classifier(det)
    with pytest.raises(NotFittedError):
        MislabelDetector(LogisticRegression(), refit=True).predict(X)


@pytest.mark.parametrize(
    "kwargs, y_change, error, match",
    [
        ({}, lambda y: np.zeros_like(y), ValueError, "two classes"),
        ({"cv": 5}, lambda y: np.r_[y[:-3], [7, 7, 7]], ValueError, "class 7 has 3 samples"),
        ({"strategy": "crossfit", "prefit": True}, None, ValueError, "prefit=True"),
        ({"scorer": DirectInfluenceScorer(mode="perturbation")}, None, ValueError, "mode='up'"),
        ({"strategy": "nonsense"}, None, InvalidParameterError, "strategy"),
        ({"contamination": 0.8}, None, InvalidParameterError, "contamination"),
        ({"estimator": None}, None, ValueError, "estimator: pass a classifier"),
    ],
)
def test_errors(cancer_small, kwargs, y_change, error, match):
    X, y, _ = cancer_small
    y = y if y_change is None else y_change(y)
    params = {"estimator": LogisticRegression(), **kwargs}
    if params.get("prefit"):
        params["estimator"] = LogisticRegression().fit(X, y)
    with pytest.raises(error, match=match):
        MislabelDetector(**params).fit(X, y)


def test_continuous_targets_are_refused(cancer_small):
    X, _, _ = cancer_small
    with pytest.raises(ValueError, match="Unknown label type"):
        MislabelDetector(LogisticRegression()).fit(X, np.linspace(0, 1, len(X)))


# --------------------------------------------------------------------------- metrics


def test_detection_report_against_sklearn_and_by_hand():
    rng = np.random.default_rng(0)
    truth = rng.random(200) < 0.1
    scores = truth + rng.normal(0, 0.7, 200)
    flagged = scores > 0.8
    r = detection_report(truth, scores, flagged)
    assert r["auroc"] == pytest.approx(roc_auc_score(truth, scores))
    assert r["average_precision"] == pytest.approx(average_precision_score(truth, scores))
    assert r["precision_flagged"] == pytest.approx(truth[flagged].mean())
    assert r["recall_flagged"] == pytest.approx(flagged[truth].mean())
    assert r["n_flagged"] == flagged.sum()
    k = truth.sum()
    top = np.argsort(-scores)[:k]
    assert r["recall_at_n_wrong"] == pytest.approx(truth[top].sum() / k)
    assert recall_at_k(truth, scores, len(truth)) == 1.0 and recall_at_k(truth, scores, 0) == 0.0


def test_metric_errors():
    with pytest.raises(ValueError, match="both"):
        detection_report([True, True], [0.1, 0.2])
    with pytest.raises(ValueError, match="one entry per"):
        flagged_precision_recall([True, False], [True])
    with pytest.raises(ValueError, match="boolean mask"):
        flagged_precision_recall([0.5, 1], [True, False])
    assert flagged_precision_recall([True, False], [False, False]) == (0.0, 0.0)


def test_newton_corrected_leave_one_out(cancer_small):
    """loo_correction='newton' takes the scorer's Newton-corrected leave-one-out
    probabilities, which for logistic regression are closer to actual refits."""
    X, y, flipped = cancer_small
    kw = {"strategy": "loo", "contamination": 0.1}
    first = MislabelDetector(logreg(), **kw).fit(X, y)
    newton = MislabelDetector(logreg(), loo_correction="newton", **kw).fit(X, y)
    assert not np.allclose(first.proba_, newton.proba_)
    model = logreg().fit(X, y)
    from skinfluence.detection import default_scorer

    sc = default_scorer().set_params(estimator=model).fit(X, y)
    np.testing.assert_allclose(newton.proba_, sc.leave_one_out_probabilities(correction="newton"),
                               rtol=1e-6, atol=1e-9)
    assert roc_auc_score(flipped, newton.scores_) > 0.9
