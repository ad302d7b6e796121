"""``sample_weight`` in ``fit``: the weighted mean training loss, checked against
independent references.

* integer weights are the same as repeating rows, for every method;
* weights of one are the same as no weights, for every method;
* predicted removal effects against refits of sklearn models fitted with the same
  weights (logistic regression: correlation; Ridge: exact);
* a point of weight zero has no effect and leaves the curvature of the other
  points;
* the stationarity of the weighted objective at sklearn's solution checks the scale
  of each estimator's own penalty;
* bad weights are refused, naming ``sample_weight``; the caller's array is left
  alone.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import small_mlp_data
from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from torch import nn

import skinfluence
from skinfluence._gradients import per_sample_grads
from skinfluence.solvers import METHODS
from skinfluence.solvers.cg import gauss_newton_diagonal

NAMES = sorted(METHODS)
CURVATURES = ("exact", "gauss-newton", "empirical-fisher")


def scorer_cls(name):
    return getattr(skinfluence, METHODS[name].scorer_name)


def make(name, model, **kw):
    """The method's scorer on a torch model, with its reference settings."""
    names = set(scorer_cls(name)().get_params())
    base = {"loss": F.cross_entropy, "regularization": 0.1, "random_state": 0, "batch_size": 16}
    base.update(METHODS[name].reference_settings)
    base.update(kw)
    return scorer_cls(name)(model, **{k: v for k, v in base.items() if k in names})


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.fixture(scope="module")
def data():
    return small_mlp_data()


@pytest.fixture(scope="module")
def counts(data):
    """Integer weights (some 0, some 3) and the rows they repeat."""
    n = data[1].shape[0]
    w = np.random.default_rng(1).integers(0, 4, n).astype(float)
    w[:3] = [2.0, 0.0, 3.0]
    return w, np.repeat(np.arange(n), w.astype(int))


@pytest.fixture(scope="module")
def cancer_data():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    X, y = X[idx], y[idx]
    return X[:250], y[:250], X[250:330], y[250:330]


# --------------------------------------------------------------------------- repeated rows


@pytest.mark.parametrize("name", NAMES)
def test_integer_weights_equal_repeated_rows(name, data, counts):
    model, Xtr, ytr, Xte, yte = data
    w, rows = counts
    # LiSSA's full-batch iterates are the same on both, converged or not: a few suffice
    kw = {"maxiter": 40} if name == "lissa" else {}
    weighted = make(name, model, **kw).fit(Xtr, ytr, sample_weight=w)
    repeated = make(name, model, **kw).fit(Xtr[rows], ytr[rows])
    tol = {"lissa": 1e-5}.get(name, 1e-7)
    assert rel(weighted.self_influence(Xte, yte), repeated.self_influence(Xte, yte)) < tol
    assert rel(weighted.influences(Xte[:5], yte[:5]), repeated.influences(Xte[:5], yte[:5], Xtr, ytr)) < tol


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("generic", [False, True], ids=["linear-layers", "generic"])
def test_dense_curvature_equals_repeated_rows(curvature, generic, data, counts):
    """Both paths of the dense curvature (the structured one for Linear layers, and
    the generic block rows) and the matrix-free products."""
    model, Xtr, ytr, _, _ = data
    w, rows = counts
    if generic:  # a parameter outside any nn.Linear: the generic path
        torch.manual_seed(0)
        model = nn.Sequential(_Scale(4), *model).double()
    kw = {"hessian": curvature, "regularization": 10.0}  # any lambda: A is compared
    weighted = make("direct", model, **kw).fit(Xtr, ytr, sample_weight=w)
    repeated = make("direct", model, **kw).fit(Xtr[rows], ytr[rows])
    A, B = weighted.operator_.dense(), repeated.operator_.dense()
    assert rel(A, B) < 1e-12
    V = torch.randn(3, A.shape[0], dtype=torch.float64)
    assert rel(weighted.operator_.mv(V), repeated.operator_.mv(V)) < 1e-12
    assert rel(weighted.operator_.mv(V), V @ A) < 1e-12
    if curvature != "exact":
        d = gauss_newton_diagonal(weighted.operator_)
        assert rel(d, gauss_newton_diagonal(repeated.operator_)) < 1e-12
        assert rel(d + 10.0, torch.diagonal(A)) < 1e-12


class _Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.s


def test_subset_keeps_weights(data, counts):
    """A minibatch of the weighted operator (LiSSA's) is the weighted mean over it."""
    model, Xtr, ytr, _, _ = data
    w, _ = counts
    op = make("cg", model).fit(Xtr, ytr, sample_weight=w).operator_
    idx = np.array([0, 1, 2, 5, 9, 20])
    sub_rows = np.repeat(idx, w[idx].astype(int))
    ref = make("cg", model).fit(Xtr[sub_rows], ytr[sub_rows]).operator_
    V = torch.randn(2, op.n_params, dtype=torch.float64)
    assert rel(op.subset(idx).data_mv(V), ref.data_mv(V)) < 1e-12


@pytest.mark.parametrize("fisher", ["gauss-newton", "empirical"])
def test_ekfac_factors_equal_repeated_rows(fisher, data, counts):
    model, Xtr, ytr, _, _ = data
    w, rows = counts
    weighted = make("ekfac", model, fisher=fisher).fit(Xtr, ytr, sample_weight=w)
    repeated = make("ekfac", model, fisher=fisher).fit(Xtr[rows], ytr[rows])
    for name, (Aw, Sw) in weighted.solver_.factors_.items():
        Ar, Sr = repeated.solver_.factors_[name]
        assert rel(Aw, Ar) < 1e-12 and rel(Sw, Sr) < 1e-12
        assert rel(weighted.solver_.eigenvalues_[name], repeated.solver_.eigenvalues_[name]) < 1e-10


def test_preconditioners_equal_repeated_rows(data, counts):
    """The Kronecker preconditioners of CG and LiSSA are built from the weighted data."""
    model, Xtr, ytr, _, _ = data
    w, rows = counts
    for name, pre in (("cg", "ekfac"), ("lissa", "kfac")):
        weighted = make(name, model, preconditioner=pre).fit(Xtr, ytr, sample_weight=w)
        repeated = make(name, model, preconditioner=pre).fit(Xtr[rows], ytr[rows])
        pw = weighted.solver_.preconditioner_
        pr = repeated.solver_.preconditioner_
        pw, pr = (pw[1], pr[1]) if isinstance(pw, tuple) else (pw, pr)
        G = torch.randn(3, weighted.n_params_, dtype=torch.float64)
        assert rel(pw.solve(G), pr.solve(G)) < 1e-10


@pytest.mark.parametrize("correction", ["none", "second-order", "newton"])
def test_removal_effects_equal_removing_the_repeated_rows(correction, data, counts):
    """Removing a point of weight k is removing all k of its copies."""
    model, Xtr, ytr, Xte, yte = data
    w, rows = counts
    weighted = make("direct", model).fit(Xtr, ytr, sample_weight=w)
    repeated = make("direct", model).fit(Xtr[rows], ytr[rows])
    groups = [[0], [2, 5], [1, 3]]  # point 1 has weight 0: no copies
    copies = [np.flatnonzero(np.isin(rows, g)) for g in groups]
    kw = {"correction": correction, "rtol": 1e-10}
    got = weighted.predict_removal_effect(Xte, yte, groups=groups, **kw)
    ref = repeated.predict_removal_effect(Xte, yte, groups=copies, **kw)
    assert rel(got, ref) < 1e-7
    G = weighted.group_influence(Xte, yte, groups=groups)
    assert rel(G, repeated.group_influence(Xte, yte, groups=copies)) < 1e-7


# --------------------------------------------------------------------------- weights of one


@pytest.mark.parametrize("name", NAMES)
def test_unit_weights_equal_no_weights(name, data):
    model, Xtr, ytr, Xte, yte = data
    ones = np.ones(len(ytr))
    # LiSSA also with minibatches (few iterations: only the equality is checked)
    minibatch = {"minibatch_size": 32, "maxiter": 30, "regularization": 1.0, "dampen": 0.01}
    for extra in ({"maxiter": 40}, minibatch) if name == "lissa" else ({},):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            plain = make(name, model, **extra).fit(Xtr, ytr)
            unit = make(name, model, **extra).fit(Xtr, ytr, sample_weight=ones)
            s_plain, s_unit = plain.self_influence(Xte, yte), unit.self_influence(Xte, yte)
            r_plain, r_unit = plain.self_removal_effect("none"), unit.self_removal_effect("none")
        assert plain.sample_weight_ is None
        np.testing.assert_array_equal(unit.sample_weight_, ones)
        np.testing.assert_allclose(s_unit, s_plain, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(r_unit, r_plain, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- retraining


def _log_loss(model, X, y):
    p = model.predict_proba(X)[np.arange(len(y)), y]
    return -np.log(p)


def test_logistic_removal_effects_match_refits(cancer_data):
    Xtr, ytr, Xte, yte = cancer_data
    rng = np.random.default_rng(0)
    w = rng.uniform(0.2, 3.0, len(ytr))
    kw = {"C": 0.1, "tol": 1e-12, "max_iter": 10_000}
    model = LogisticRegression(**kw).fit(Xtr, ytr, sample_weight=w)
    scorer = skinfluence.DirectInfluenceScorer(model, regularization=0.0, dtype="float64")
    scorer.fit(Xtr, ytr, sample_weight=w)
    I = scorer.influences(Xte, yte)
    base = _log_loss(model, Xte, yte)
    points = rng.choice(len(ytr), 40, replace=False)
    actual, predicted, newton, own = [], [], [], []
    for j in points:
        keep = np.setdiff1d(np.arange(len(ytr)), [j])
        refit = LogisticRegression(**kw).fit(Xtr[keep], ytr[keep], sample_weight=w[keep])
        actual.append(_log_loss(refit, Xte, yte) - base)
        own.append((_log_loss(refit, Xtr[[j]], ytr[[j]]) - _log_loss(model, Xtr[[j]], ytr[[j]]))[0])
        predicted.append(w[j] * I[:, j] / w.sum())
        first = scorer.predict_removal_effect(Xte, yte, remove=[j])
        np.testing.assert_allclose(first, predicted[-1], rtol=1e-10, atol=1e-14)
        newton.append(scorer.predict_removal_effect(Xte, yte, remove=[j], correction="newton"))
    actual, predicted, newton = (np.concatenate(v) for v in (actual, predicted, newton))
    assert np.corrcoef(actual, predicted)[0, 1] > 0.99
    assert np.corrcoef(actual, newton)[0, 1] > 0.999
    # each point's own leave-one-out change, without any pairwise matrix
    loo = scorer.self_removal_effect("newton")[points]
    np.testing.assert_allclose(loo, own, rtol=0.05, atol=1e-5)
    # I / n_train, which ignores the weights, is much further off
    unweighted = np.concatenate([I[:, j] / len(ytr) for j in points])
    err = np.linalg.norm(actual - predicted) / np.linalg.norm(actual)
    assert err < 0.6 * np.linalg.norm(actual - unweighted) / np.linalg.norm(actual)


def test_ridge_group_removal_is_exact(cancer_data):
    Xtr, _, Xte, _ = cancer_data
    rng = np.random.default_rng(1)
    ytr, yte = Xtr @ rng.normal(size=Xtr.shape[1]) + rng.normal(size=len(Xtr)), rng.normal(size=len(Xte))
    w = rng.uniform(0.0, 2.0, len(ytr))
    model = Ridge(alpha=3.0).fit(Xtr, ytr, sample_weight=w)
    scorer = skinfluence.DirectInfluenceScorer(model, regularization=0.0).fit(Xtr, ytr, sample_weight=w)
    groups = [np.arange(0, 40), np.arange(100, 130)]
    delta = scorer.predict_removal_effect(Xte, yte, groups=groups, correction="newton")
    for g, drop in enumerate(groups):
        keep = np.setdiff1d(np.arange(len(ytr)), drop)
        refit = Ridge(alpha=3.0).fit(Xtr[keep], ytr[keep], sample_weight=w[keep])
        actual = (refit.predict(Xte) - yte) ** 2 - (model.predict(Xte) - yte) ** 2
        np.testing.assert_allclose(delta[:, g], actual, rtol=1e-6, atol=1e-9)
    G = scorer.group_influence(Xte, yte, groups=groups)
    I = scorer.influences(Xte, yte)
    np.testing.assert_allclose(G[:, 0], I[:, :40] @ w[:40], rtol=1e-10)


@pytest.mark.parametrize("kind", ["logistic", "ridge", "mlp", "sgd"])
def test_penalty_scale_makes_the_fit_stationary(kind, cancer_data):
    """At sklearn's solution the gradient of the weighted mean loss plus the
    adapter's penalty vanishes: the penalty is on the right scale for weighted data."""
    Xtr, ytr, _, _ = cancer_data
    Xtr, ytr = Xtr[:120, :6], ytr[:120]
    w = np.random.default_rng(2).uniform(0.1, 4.0, len(ytr))
    if kind == "logistic":
        model = LogisticRegression(C=0.05, tol=1e-12, max_iter=10_000)
    elif kind == "ridge":
        model, ytr = Ridge(alpha=20.0), Xtr @ np.arange(6.0) + np.sin(np.arange(len(ytr)))
    elif kind == "mlp":
        model = MLPClassifier((3,), alpha=5.0, solver="lbfgs", tol=1e-14, max_iter=20_000, random_state=0)
    else:
        model = SGDClassifier(loss="log_loss", alpha=0.05, tol=None, max_iter=3000,
                              learning_rate="constant", eta0=1e-3, average=True, random_state=0)
    model.fit(Xtr, ytr, sample_weight=w)
    # only the penalty and the gradients matter here, not the curvature
    scorer = skinfluence.DirectInfluenceScorer(model, regularization=1e-3, dtype="float64",
                                               hessian="gauss-newton")
    scorer.fit(Xtr, ytr, sample_weight=w)
    a = scorer.adapter_
    g = per_sample_grads(a, scorer.X_train_, scorer.y_train_)
    data_grad = (torch.as_tensor(w)[:, None] * g).sum(0) / w.sum()
    pen = a.penalty.mv(a.flat_params()[None])[0]
    tol = {"sgd": 0.05, "mlp": 1e-2}.get(kind, 1e-5)  # stochastic, or lbfgs on a network
    # the penalty's share of the gradient cancels the data's
    assert float((data_grad + pen).norm()) < tol * float(pen.norm())
    # and with the unweighted scale it would not
    wrong = pen * w.sum() / len(w)
    assert float((data_grad + wrong).norm()) > 10 * float((data_grad + pen).norm())


# --------------------------------------------------------------------------- zero weight


def test_zero_weight_point_has_no_effect(data, counts):
    model, Xtr, ytr, Xte, yte = data
    w, _ = counts
    j = 1
    assert w[j] == 0
    scorer = make("direct", model).fit(Xtr, ytr, sample_weight=w)
    for correction in ("none", "second-order", "newton"):
        delta = scorer.predict_removal_effect(Xte, yte, remove=[j], correction=correction)
        np.testing.assert_allclose(delta, 0.0, atol=1e-12)
    assert np.abs(scorer.group_influence(Xte, yte, groups=[[j]])).max() == 0.0
    assert scorer.self_removal_effect("none")[j] == 0.0
    assert abs(scorer.self_removal_effect("newton")[j]) < 1e-14
    P = scorer.leave_one_out_probabilities()
    np.testing.assert_allclose(P[j], scorer.class_probabilities()[j], atol=1e-12)
    np.testing.assert_allclose(
        scorer.class_probabilities(leave_one_out=True)[j], scorer.class_probabilities()[j], atol=1e-12
    )
    keep = np.flatnonzero(np.arange(len(ytr)) != j)
    without = make("direct", model).fit(Xtr[keep], ytr[keep], sample_weight=w[keep])
    assert rel(scorer.operator_.dense(), without.operator_.dense()) < 1e-12
    ek = make("ekfac", model).fit(Xtr, ytr, sample_weight=w)
    ek_without = make("ekfac", model).fit(Xtr[keep], ytr[keep], sample_weight=w[keep])
    for name, (Aw, Sw) in ek.solver_.factors_.items():
        assert rel(Aw, ek_without.solver_.factors_[name][0]) < 1e-12
        assert rel(Sw, ek_without.solver_.factors_[name][1]) < 1e-12


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad",
    [
        "negative", "nan", "inf", "short", "long", "2-d", "all zero",
    ],
)
def test_bad_weights_are_refused(bad, data):
    model, Xtr, ytr, _, _ = data
    n = len(ytr)
    w = {
        "negative": np.r_[-1.0, np.ones(n - 1)],
        "nan": np.r_[np.nan, np.ones(n - 1)],
        "inf": np.r_[np.inf, np.ones(n - 1)],
        "short": np.ones(n - 1),
        "long": np.ones(n + 1),
        "2-d": np.ones((n, 1)),
        "all zero": np.zeros(n),
    }[bad]
    scorer = make("direct", model)
    with pytest.raises(ValueError, match="sample_weight"):
        scorer.fit(Xtr, ytr, sample_weight=w)
    assert not hasattr(scorer, "n_train_")  # a failed fit leaves nothing fitted


def test_weights_are_copied(data):
    model, Xtr, ytr, Xte, yte = data
    w = np.linspace(0.5, 2.0, len(ytr))
    before = w.copy()
    scorer = make("direct", model).fit(Xtr, ytr, sample_weight=w)
    np.testing.assert_array_equal(w, before)
    s = scorer.self_influence(Xte, yte)
    w[:] = 1.0  # the caller edits the array afterwards
    np.testing.assert_array_equal(scorer.sample_weight_, before)
    np.testing.assert_array_equal(scorer.self_influence(Xte, yte), s)
    ints = np.arange(1, len(ytr) + 1)
    scorer.fit(Xtr, ytr, sample_weight=ints)
    assert scorer.sample_weight_.dtype == np.float64
    np.testing.assert_array_equal(ints, np.arange(1, len(ytr) + 1))


def test_fit_transform_takes_weights(data, counts):
    model, Xtr, ytr, _, _ = data
    w, _ = counts
    I = make("direct", model).fit_transform(Xtr, ytr, sample_weight=w)
    ref = make("direct", model).fit(Xtr, ytr, sample_weight=w).influences(Xtr, ytr)
    np.testing.assert_array_equal(I, ref)
    assert rel(I, make("direct", model).fit_transform(Xtr, ytr)) > 1e-3


def test_counterfactual_scores_refuse_weighted_scorers(cancer_data):
    """The counterfactuals refit without weights: scoring a weighted scorer against
    them would compare unlike things."""
    from skinfluence.evaluation import Counterfactuals, influence_score

    Xtr, ytr, Xte, yte = cancer_data
    Xtr, ytr, Xte, yte = Xtr[:60, :4], ytr[:60], Xte[:10, :4], yte[:10]
    model = LogisticRegression().fit(Xtr, ytr)
    cf = Counterfactuals(model, n_subsets=4, n_loo=2, random_state=0).fit(Xtr, ytr, Xte, yte)
    plain = skinfluence.DirectInfluenceScorer(model).fit(Xtr, ytr)
    assert np.isfinite(influence_score(plain, Xte, yte, counterfactuals=cf))
    scorer = skinfluence.DirectInfluenceScorer(model).fit(Xtr, ytr, sample_weight=np.ones(60))
    with pytest.raises(ValueError, match="sample_weight"):
        influence_score(scorer, Xte, yte, counterfactuals=cf)


@pytest.mark.parametrize("name", ["direct", "cg", "ekfac"])
def test_float32_weights(name, data, counts):
    """Weights in the model's own float32 precision: same as repeated rows, to it."""
    import copy

    model, Xtr, ytr, Xte, yte = data
    w, rows = counts
    model32 = copy.deepcopy(model).float()
    kw = {"dtype": None, "rtol": 1e-6} if name == "cg" else {"dtype": None}
    weighted = make(name, model32, **kw).fit(Xtr.astype(np.float32), ytr, sample_weight=w)
    repeated = make(name, model32, **kw).fit(Xtr[rows].astype(np.float32), ytr[rows])
    a = weighted.self_influence(Xte.astype(np.float32), yte)
    assert a.dtype == np.float32
    assert rel(a, repeated.self_influence(Xte.astype(np.float32), yte)) < 1e-4


def test_pipeline_on_a_dataframe_takes_weights():
    """A Pipeline fitted on a DataFrame with weights routed to its model: the scorer
    given the frame and the weights equals the one on the transformed features."""
    pd = pytest.importorskip("pandas")
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(4)
    n = 120
    df = pd.DataFrame({"age": rng.normal(40, 10, n), "city": rng.choice(["north", "south"], n)})
    y = ((df.age - 40) / 10 + (df.city == "south") + rng.normal(0, 0.5, n) > 0.5).astype(int).to_numpy()
    w = pd.Series(rng.uniform(0.5, 2.0, n))
    columns = ColumnTransformer([("num", StandardScaler(), ["age"]), ("cat", OneHotEncoder(), ["city"])])
    pipe = make_pipeline(columns, LogisticRegression(tol=1e-12, max_iter=10_000))
    pipe.fit(df, y, logisticregression__sample_weight=w.to_numpy())
    piped = skinfluence.DirectInfluenceScorer(pipe, regularization=0.0).fit(df, y, sample_weight=w)
    Z = pipe[:-1].transform(df)
    plain = skinfluence.DirectInfluenceScorer(pipe[-1], regularization=0.0).fit(Z, y, sample_weight=w.to_numpy())
    np.testing.assert_allclose(piped.self_removal_effect("none"), plain.self_removal_effect("none"), rtol=1e-10)
    with pytest.raises(ValueError, match="sample_weight"):
        skinfluence.DirectInfluenceScorer(pipe).fit(df, y, sample_weight=w.to_numpy()[:-1])
