"""Agreement with retraining: every metric against a hand-written loop of refits."""

import pickle

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, make_regression
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

from skinfluence import ArnoldiInfluenceScorer, CgInfluenceScorer, DirectInfluenceScorer
from skinfluence.evaluation import (
    Counterfactuals,
    InfluenceMethod,
    influence_score,
    linear_datamodeling_score,
    loo_agreement,
    top_k_removal,
)


class CountingLR(LogisticRegression):
    """LogisticRegression that counts its fits (class-wide, so clones count too)."""

    fits = 0

    def fit(self, X, y, sample_weight=None):
        type(self).fits += 1
        return super().fit(X, y, sample_weight)


@pytest.fixture(scope="module")
def data():
    X, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))[:110]
    X = StandardScaler().fit_transform(X[idx][:, :8])
    return X[:80], y[idx][:80], X[80:], y[idx][80:]


def _lr():
    return LogisticRegression(C=1.0, tol=1e-10, max_iter=2000)


@pytest.fixture(scope="module")
def fitted(data):
    Xtr, ytr, Xte, yte = data
    model = _lr().fit(Xtr, ytr)
    cf = Counterfactuals(model, n_subsets=16, fraction=0.5, n_loo=12, random_state=0)
    cf.fit(Xtr, ytr, Xte, yte)
    scorer = DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(Xtr, ytr)
    return model, cf, scorer


def _loss(model, X, y):
    p = model.predict_proba(X)[np.arange(len(y)), y]
    return -np.log(p)


def test_subsets_and_outcomes_match_hand_refits(data, fitted):
    Xtr, ytr, Xte, yte = data
    _, cf, _ = fitted
    assert cf.subsets_.shape == (16, 80)
    assert (cf.subsets_.sum(1) == 40).all()
    assert len({row.tobytes() for row in cf.subsets_}) == 16  # distinct random draws
    for s, keep in enumerate(cf.subsets_):
        ref = _lr().fit(Xtr[keep], ytr[keep])
        np.testing.assert_allclose(cf.subset_outcomes_["loss"][s], _loss(ref, Xte, yte), rtol=1e-7)
        p = ref.predict_proba(Xte)[np.arange(len(yte)), yte]
        np.testing.assert_allclose(cf.subset_outcomes_["margin"][s], np.log(p / (1 - p)), rtol=1e-6)
    full = _lr().fit(Xtr, ytr)
    np.testing.assert_allclose(cf.full_outcomes_["loss"], _loss(full, Xte, yte), rtol=1e-7)
    np.testing.assert_allclose(cf.full_outcomes_["log_proba"], -cf.full_outcomes_["loss"])
    assert cf.n_retrains_ == 1 + 16 + 12 and len(cf.retrain_seconds_) == 29


def test_lds_against_hand_loop(data, fitted):
    Xtr, ytr, Xte, yte = data
    _, cf, scorer = fitted
    I = scorer.influences(Xte, yte)
    refits = [_loss(_lr().fit(Xtr[keep], ytr[keep]), Xte, yte) for keep in cf.subsets_]
    rhos = []
    for i in range(len(yte)):
        actual, predicted = [], []
        for keep, losses in zip(cf.subsets_, refits, strict=True):
            actual.append(losses[i])
            predicted.append(I[i, ~keep].sum() / len(ytr))  # loss rise from the removed points
        rhos.append(spearmanr(actual, predicted)[0])
    rhos = np.array(rhos)
    lds = linear_datamodeling_score(scorer, cf)
    np.testing.assert_allclose(lds.per_point, rhos, atol=1e-12)
    assert lds.score == pytest.approx(rhos.mean())
    assert lds.stderr == pytest.approx(rhos.std(ddof=1) / np.sqrt(len(rhos)))
    assert lds.score > 0.7  # a convex model: influence ranks subsets well
    # The sign matters: reversed influences give the opposite score.
    assert linear_datamodeling_score(-I, cf).score == pytest.approx(-lds.score)
    # log-probability and margin rise where the loss falls: the same ranking, sign-corrected.
    assert linear_datamodeling_score(I, cf, outcome="log_proba").score == pytest.approx(lds.score)
    assert linear_datamodeling_score(I, cf, outcome="margin").score > 0.7
    part = linear_datamodeling_score(I, cf, points=[0, 3, 5])
    np.testing.assert_allclose(part.per_point, rhos[[0, 3, 5]], atol=1e-12)


def test_loo_against_hand_loop(data, fitted):
    Xtr, ytr, Xte, yte = data
    _, cf, scorer = fitted
    I = scorer.influences(Xte, yte)
    base = _loss(_lr().fit(Xtr, ytr), Xte, yte)
    actual, predicted = [], []
    for j in cf.loo_indices_:
        keep = np.arange(len(ytr)) != j
        actual.append(_loss(_lr().fit(Xtr[keep], ytr[keep]), Xte, yte) - base)
        predicted.append(I[:, j] / len(ytr))
    A, P = np.array(actual), np.array(predicted)
    loo = loo_agreement(scorer, cf)
    np.testing.assert_allclose(loo.actual, A, rtol=1e-6, atol=1e-12)
    assert loo.pearson == pytest.approx(pearsonr(A.ravel(), P.ravel())[0], abs=1e-9)
    assert loo.spearman == pytest.approx(spearmanr(A.ravel(), P.ravel())[0], abs=1e-9)
    per = np.mean([pearsonr(A[:, i], P[:, i])[0] for i in range(A.shape[1])])
    assert loo.pearson_per_point == pytest.approx(per, abs=1e-9)
    per_s = np.mean([spearmanr(A[:, i], P[:, i])[0] for i in range(A.shape[1])])
    assert loo.spearman_per_point == pytest.approx(per_s, abs=1e-9)
    assert loo.slope == pytest.approx((A * P).sum() / (P * P).sum())
    # The promise itself: removal changes the loss by about I / n_train.
    assert loo.pearson > 0.97 and 0.7 < loo.slope < 1.5
    margin = loo_agreement(scorer, cf, outcome="margin")
    assert margin.pearson > 0.97 and 0.7 < margin.slope < 1.5


def test_top_k_removal_against_hand_loop(data, fitted):
    Xtr, ytr, Xte, yte = data
    _, cf, scorer = fitted
    res = top_k_removal(scorer, cf, k=5, n_points=4, n_random=3, random_state=0)
    I = scorer.influences(Xte, yte)
    base = _loss(_lr().fit(Xtr, ytr), Xte, yte)
    for i, rise in zip(res.points, res.actual_top, strict=True):
        top = np.argsort(-I[i])[:5]
        keep = np.ones(len(ytr), bool)
        keep[top] = False
        ref = _loss(_lr().fit(Xtr[keep], ytr[keep]), Xte[i : i + 1], yte[i : i + 1])[0]
        assert rise == pytest.approx(ref - base[i], rel=1e-6)
        assert res.predicted_top[list(res.points).index(i)] == pytest.approx(I[i, top].sum() / 80)
    assert res.beats_random == 1.0 and res.ratio > 0.5


def test_grid_search_reuses_the_retrains(data):
    Xtr, ytr, Xte, yte = data
    model = CountingLR(tol=1e-10, max_iter=2000).fit(Xtr, ytr)
    cf = Counterfactuals(model, n_subsets=12, n_loo=6, random_state=1).fit(Xtr, ytr, Xte, yte)
    fits = CountingLR.fits
    grid = {"regularization": [0.0, 0.1, 30.0]}
    search = GridSearchCV(
        DirectInfluenceScorer(model), grid, scoring=cf.scorer(), cv=cf.cv(n_splits=2, random_state=0)
    ).fit(*cf.search_data())
    assert CountingLR.fits == fits  # no retraining during the search
    for k, params in enumerate(search.cv_results_["params"]):
        s = DirectInfluenceScorer(model, **params).fit(Xtr, ytr)
        folds = [linear_datamodeling_score(s, cf, points=test - 80).score for _, test in cf.cv(2, random_state=0)]
        assert search.cv_results_["mean_test_score"][k] == pytest.approx(np.mean(folds))
    best = max(search.cv_results_["params"], key=lambda p: influence_score(
        DirectInfluenceScorer(model, **p).fit(Xtr, ytr), Xte, yte, counterfactuals=cf))
    assert search.best_params_ in (best, {"regularization": 0.0})
    # Leave-one-out metric as the objective.
    loo = GridSearchCV(DirectInfluenceScorer(model), grid, scoring=cf.scorer("loo_pearson"),
                       cv=cf.cv()).fit(*cf.search_data())
    assert loo.best_params_ == {"regularization": 0.0}  # the model's own Hessian is best


def test_cv_splits_never_leak(fitted):
    _, cf, _ = fitted
    splits = cf.cv(n_splits=3, random_state=0)
    tests = np.concatenate([t for _, t in splits])
    assert sorted(tests) == list(range(80, 110))
    for train, test in splits:
        assert set(train) == set(range(80)) and not set(train) & set(test)
    assert [t.tolist() for _, t in cf.cv(points=[1, 2])] == [[81, 82]]
    with pytest.raises(ValueError, match="n_splits"):
        cf.cv(n_splits=0)
    with pytest.raises(ValueError, match="points"):
        cf.cv(points=[40])


def test_method_choice_with_influence_method(data, fitted):
    Xtr, ytr, Xte, yte = data
    model, cf, _ = fitted
    grid = [
        {"scorer": [DirectInfluenceScorer(model)], "scorer__regularization": [0.0, 1.0]},
        {"scorer": [ArnoldiInfluenceScorer(model, regularization=0.01, random_state=0)],
         "scorer__rank": [1, 3]},
    ]
    search = GridSearchCV(InfluenceMethod(DirectInfluenceScorer(model)), grid,
                          scoring=cf.scorer(), cv=cf.cv()).fit(*cf.search_data())
    scores = search.cv_results_["mean_test_score"]
    assert len(scores) == 4
    arn = ArnoldiInfluenceScorer(model, regularization=0.01, rank=3, random_state=0).fit(Xtr, ytr)
    assert scores[3] == pytest.approx(linear_datamodeling_score(arn, cf).score)
    # Default scoring goes through score(), which finds these retrains by itself.
    plain = GridSearchCV(InfluenceMethod(DirectInfluenceScorer(model)), grid,
                         cv=cf.cv()).fit(*cf.search_data())
    np.testing.assert_allclose(plain.cv_results_["mean_test_score"], scores)
    # The chosen setting, fitted on the training data only.
    best = InfluenceMethod(DirectInfluenceScorer(model)).set_params(**search.best_params_)
    assert best.fit(Xtr, ytr).influences(Xte, yte).shape == (30, 80)
    assert best.score(Xte, yte) == pytest.approx(search.best_score_)


def test_score_and_its_errors(data, fitted):
    Xtr, ytr, Xte, yte = data
    model, cf, scorer = fitted
    expected = linear_datamodeling_score(scorer, cf, points=np.arange(5, 30)).score
    assert influence_score(scorer, Xte[5:], yte[5:]) == pytest.approx(expected)
    assert influence_score(scorer, Xte, yte, metric="loo_pearson") == pytest.approx(
        loo_agreement(scorer, cf).pearson)
    if hasattr(scorer, "score"):  # the scorers' own score() delegates here
        assert scorer.score(Xte[5:], yte[5:]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no retraining outcomes"):
        influence_score(scorer, Xtr[:5], ytr[:5])  # training points were never evaluated
    with pytest.raises(ValueError, match="not among the evaluation points"):
        influence_score(scorer, Xtr[:5], ytr[:5], counterfactuals=cf)
    with pytest.raises(ValueError, match="metric"):
        influence_score(scorer, Xte, yte, metric="r2")
    other = _lr().fit(Xtr, ytr)  # a different model object: not its retrains
    with pytest.raises(ValueError, match="no retraining outcomes"):
        influence_score(DirectInfluenceScorer(other).fit(Xtr, ytr), Xte, yte)
    small = DirectInfluenceScorer(model).fit(Xtr[:50], ytr[:50])
    with pytest.raises(ValueError, match="fitted on 50 training points"):
        linear_datamodeling_score(small, cf)
    with pytest.raises(ValueError, match="shape"):
        linear_datamodeling_score(np.zeros((3, 4)), cf)


def test_unrefittable_estimators_are_refused(data):
    from torch import nn

    Xtr, ytr, Xte, yte = data
    module = nn.Linear(8, 2).double()
    with pytest.raises(TypeError, match="skorch"):
        Counterfactuals(module).fit(Xtr, ytr, Xte, yte)
    scorer = DirectInfluenceScorer(module, loss=nn.functional.cross_entropy).fit(Xtr, ytr)
    with pytest.raises(TypeError, match="bare torch Linear"):
        influence_score(scorer, Xte, yte)
    with pytest.raises(TypeError, match="fit"):
        Counterfactuals(object()).fit(Xtr, ytr, Xte, yte)


def test_parameter_validation_and_fitted_state(data):
    Xtr, ytr, Xte, yte = data
    with pytest.raises(InvalidParameterError, match="fraction"):
        Counterfactuals(_lr(), fraction=1.5).fit(Xtr, ytr, Xte, yte)
    with pytest.raises(InvalidParameterError, match="n_subsets"):
        Counterfactuals(_lr(), n_subsets=-1).fit(Xtr, ytr, Xte, yte)
    with pytest.raises(ValueError, match="n_loo=500"):
        Counterfactuals(_lr(), n_loo=500).fit(Xtr, ytr, Xte, yte)
    with pytest.raises(ValueError, match="y_test has 3 samples"):
        Counterfactuals(_lr(), n_subsets=2).fit(Xtr, ytr, Xte, yte[:3])
    with pytest.raises(ValueError, match="contains NaN"):
        Counterfactuals(_lr(), n_subsets=2).fit(np.full_like(Xtr, np.nan), ytr, Xte, yte)
    with pytest.raises(NotFittedError):
        Counterfactuals(_lr()).cv()
    X, y = make_regression(n_samples=40, n_features=3, noise=1.0, random_state=0)
    with pytest.raises(ValueError, match="needs a classifier"):
        Counterfactuals(Ridge(), outcome="margin").fit(X[:30], y[:30], X[30:], y[30:])
    with pytest.raises(ValueError, match="at least 2 subsets"):
        cf = Counterfactuals(_lr(), n_subsets=0, n_loo=3).fit(Xtr, ytr, Xte, yte)
        linear_datamodeling_score(np.zeros((30, 80)), cf)


def test_regression_loo_and_parallel_refits():
    X, y = make_regression(n_samples=70, n_features=4, noise=5.0, random_state=0)
    model = Ridge(alpha=1.0).fit(X[:50], y[:50])
    one = Counterfactuals(model, n_subsets=6, n_loo=8, random_state=0).fit(X[:50], y[:50], X[50:], y[50:])
    two = Counterfactuals(model, n_subsets=6, n_loo=8, n_jobs=2, random_state=0).fit(
        X[:50], y[:50], X[50:], y[50:])
    for a, b in [(one.subset_outcomes_, two.subset_outcomes_), (one.loo_outcomes_, two.loo_outcomes_)]:
        np.testing.assert_allclose(a["loss"], b["loss"])
    keep = np.arange(50) != one.loo_indices_[0]
    ref = (Ridge(alpha=1.0).fit(X[:50][keep], y[:50][keep]).predict(X[50:]) - y[50:]) ** 2
    np.testing.assert_allclose(one.loo_outcomes_["loss"][0], ref)
    scorer = DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(X[:50], y[:50])
    assert loo_agreement(scorer, one).pearson > 0.97


def test_skorch_refits_are_seeded_and_leave_the_rng_alone(wine, skorch_net):
    Xtr, ytr, Xte, yte = wine
    Xtr, Xte = Xtr.astype(np.float32), Xte.astype(np.float32)
    ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
    net = clone(skorch_net).set_params(max_epochs=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = Counterfactuals(net, n_subsets=2, n_loo=1, random_state=0).fit(Xtr, ytr, Xte, yte)
    assert torch.equal(torch.get_rng_state(), state)
    b = Counterfactuals(net, n_subsets=2, n_loo=1, random_state=0).fit(Xtr, ytr, Xte, yte)
    np.testing.assert_array_equal(a.subset_outcomes_["loss"], b.subset_outcomes_["loss"])
    c = Counterfactuals(net, n_subsets=2, n_loo=1, random_state=1).fit(Xtr, ytr, Xte, yte)
    assert not np.allclose(a.full_outcomes_["loss"], c.full_outcomes_["loss"])  # other seeds
    # The hand-written equivalent of one retrain.
    with torch.random.fork_rng():
        torch.manual_seed(int(a.seeds_[0]))
        ref = clone(net).fit(Xtr[a.subsets_[0]], ytr[a.subsets_[0]])
    p = ref.predict_proba(Xte)[np.arange(len(yte)), yte].astype(np.float64)
    np.testing.assert_allclose(a.subset_outcomes_["log_proba"][0], np.log(p), rtol=1e-5)
    # The user's fitted net is untouched by its clones being refit.
    assert skorch_net.initialized_ and skorch_net.predict(Xte).shape == (len(yte),)


def test_clone_pickle_and_report(fitted):
    model, cf, scorer = fitted
    c = clone(cf)
    assert c.get_params() == cf.get_params() and not hasattr(c, "subsets_")
    back = pickle.loads(pickle.dumps(cf))
    np.testing.assert_array_equal(back.subset_outcomes_["loss"], cf.subset_outcomes_["loss"])
    assert linear_datamodeling_score(scorer, back).score == pytest.approx(
        linear_datamodeling_score(scorer, cf).score)
    report = cf.report([DirectInfluenceScorer(model, regularization=0.0),
                        CgInfluenceScorer(model, regularization=30.0)])
    assert report.rows[0]["lds"] == pytest.approx(linear_datamodeling_score(scorer, cf).score)
    assert report.rows[0]["loo_pearson"] == pytest.approx(loo_agreement(scorer, cf).pearson)
    assert report.best is report.rows[int(np.argmax([r["lds"] for r in report.rows]))]
    text = str(report)
    assert "Direct(reg=0)" in text and "Cg(reg=30)" in text and "29 retrains" in text
    import matplotlib

    matplotlib.use("Agg")
    ax = report.plot()
    assert len(ax.patches) == 2
    import matplotlib.pyplot as plt

    plt.close("all")
