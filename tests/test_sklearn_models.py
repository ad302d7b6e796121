"""sklearn's own models: MLPClassifier / MLPRegressor, SGDClassifier(loss="log_loss") and
fitted Pipelines, each checked against sklearn's loss and objective, against
retraining or a closed form, and for clear errors."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy.special import expit
from scipy.stats import pearsonr
from sklearn.datasets import load_iris, make_classification, make_regression
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from torch.func import grad, vmap

from skinfluence import CgInfluenceScorer, DirectInfluenceScorer
from skinfluence._adapters import build_adapter

LBFGS = {"solver": "lbfgs", "tol": 1e-12, "max_iter": 20000, "random_state": 0}


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    idx = np.random.default_rng(0).permutation(len(y))
    return X[idx[:90]], y[idx[:90]], X[idx[90:]], y[idx[90:]]


@pytest.fixture(scope="module")
def binary():
    X, y = make_classification(120, 5, n_informative=3, random_state=1)
    return X[:80], y[:80], X[80:], y[80:]


def _bound(est, X, y):
    a = build_adapter(est, dtype="float64")
    a.bind(a.features(X[:1]), len(X))
    return a, a.features(X), a.targets(y)


def _losses(a, Xt, Yt):
    return vmap(a.sample_loss, in_dims=(None, 0, 0))(a.params, Xt, Yt).detach().numpy()


def _l2(a):
    """The diagonal of the penalty: sklearn's own L2 term. (A rank-one term, where
    present, only gives curvature to a direction the objective is flat along.)"""
    return torch.zeros(a.n_params, dtype=torch.float64) if a.penalty.diag is None else a.penalty.diag


def _penalty_value(a):
    theta = a.flat_params()
    return 0.5 * float((_l2(a) * theta**2).sum())


def _objective_grad(a, Xt, Yt):
    """Gradient of mean loss + penalty, and of the mean loss alone."""
    mean_loss = lambda p: vmap(a.sample_loss, in_dims=(None, 0, 0))(p, Xt, Yt).mean()  # noqa: E731
    g_loss = a.flatten(grad(mean_loss)(a.params))
    return g_loss + _l2(a) * a.flat_params(), g_loss


def _leave_one_out(model, X, y, removed, test_loss):
    """Refit from the fitted optimum without each removed point (warm start)."""
    base = test_loss(model)
    out = []
    for i in removed:
        m = copy.deepcopy(model).set_params(warm_start=True)
        out.append(test_loss(m.fit(np.delete(X, i, 0), np.delete(y, i, 0))) - base)
    return np.array(out).T


# ------------------------------------------------------------------- MLPClassifier


@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic", "identity"])
def test_mlp_classifier_loss_and_objective_are_sklearns(iris, activation):
    Xtr, ytr, _, _ = iris
    m = MLPClassifier(hidden_layer_sizes=(5, 4), activation=activation, alpha=0.5, **LBFGS).fit(Xtr, ytr)
    a, Xt, Yt = _bound(m, Xtr, ytr)
    assert [n for n, _ in a.module.named_children()] == [
        "layer0", "activation0", "layer1", "activation1", "output"]
    proba = m.predict_proba(Xtr)[np.arange(len(ytr)), ytr]
    np.testing.assert_allclose(_losses(a, Xt, Yt), -np.log(proba), rtol=1e-10, atol=1e-12)
    # mean loss + alpha/(2n) ||W||^2 (weights only) is what sklearn minimised
    penalty = _penalty_value(a)
    weights = sum(float((c**2).sum()) for c in m.coefs_)
    assert penalty == pytest.approx(0.5 * m.alpha * weights / len(ytr), rel=1e-12)
    assert _losses(a, Xt, Yt).mean() + penalty == pytest.approx(m.loss_, rel=1e-10)


def test_mlp_classifier_objective_gradient_vanishes_and_loo_agrees(iris):
    Xtr, ytr, Xte, yte = iris
    m = MLPClassifier(hidden_layer_sizes=(6,), activation="tanh", alpha=1.0, **LBFGS).fit(Xtr, ytr)
    a, Xt, Yt = _bound(m, Xtr, ytr)
    g, g_loss = _objective_grad(a, Xt, Yt)
    # at sklearn's optimum the penalty's gradient cancels the loss gradient
    assert float(g.norm()) < 1e-3 * float(g_loss.norm())

    def test_loss(model):
        return -np.log(model.predict_proba(Xte)[np.arange(len(yte)), yte])

    removed = np.arange(0, 90, 6)
    actual = _leave_one_out(m, Xtr, ytr, removed, test_loss)
    scorer = DirectInfluenceScorer(m, regularization=0.0).fit(Xtr, ytr)
    predicted = scorer.influences(Xte, yte, Xtr[removed], ytr[removed]) / len(Xtr)
    assert pearsonr(predicted.ravel(), actual.ravel())[0] >= 0.99


def test_binary_mlp_classifier_is_one_logit_and_agrees_with_retraining(binary):
    Xtr, ytr, Xte, yte = binary
    labels = np.array(["no", "yes"])  # string classes map to 0/1 as sklearn's do
    m = MLPClassifier(hidden_layer_sizes=(4,), activation="tanh", alpha=5.0, **LBFGS).fit(Xtr, labels[ytr])
    a, Xt, Yt = _bound(m, Xtr, labels[ytr])
    assert a.module.output.out_features == 1
    p1 = m.predict_proba(Xtr)[:, 1]
    np.testing.assert_allclose(_losses(a, Xt, Yt), -np.log(np.where(ytr == 1, p1, 1 - p1)), rtol=1e-9)
    g, g_loss = _objective_grad(a, Xt, Yt)
    assert float(g.norm()) < 1e-2 * float(g_loss.norm())

    def test_loss(model):
        p = model.predict_proba(Xte)[:, 1]
        return -np.log(np.where(yte == 1, p, 1 - p))

    removed = np.arange(0, 80, 5)
    actual = _leave_one_out(m, Xtr, labels[ytr], removed, test_loss)
    scorer = CgInfluenceScorer(m, regularization=0.0, rtol=1e-10).fit(Xtr, labels[ytr])
    predicted = scorer.influences(Xte, labels[yte], Xtr[removed], labels[ytr[removed]]) / len(Xtr)
    assert pearsonr(predicted.ravel(), actual.ravel())[0] >= 0.99


# ------------------------------------------------------------------- MLPRegressor


def test_mlp_regressor_half_squared_error_objective_and_retraining():
    X, y = make_regression(110, 4, noise=5.0, random_state=0)
    X, y = StandardScaler().fit_transform(X), y / y.std()
    Xtr, ytr, Xte, yte = X[:80], y[:80], X[80:], y[80:]
    m = MLPRegressor(hidden_layer_sizes=(6,), activation="tanh", alpha=1.0, **LBFGS).fit(Xtr, ytr)
    a, Xt, Yt = _bound(m, Xtr, ytr)
    per_sample = 0.5 * (ytr - m.predict(Xtr)) ** 2  # sklearn's squared loss
    np.testing.assert_allclose(_losses(a, Xt, Yt), per_sample, rtol=1e-10)
    assert per_sample.mean() + _penalty_value(a) == pytest.approx(m.loss_, rel=1e-10)
    g, g_loss = _objective_grad(a, Xt, Yt)
    assert float(g.norm()) < 1e-2 * float(g_loss.norm())

    def test_loss(model):
        return 0.5 * (yte - model.predict(Xte)) ** 2

    removed = np.arange(0, 80, 5)
    actual = _leave_one_out(m, Xtr, ytr, removed, test_loss)
    scorer = DirectInfluenceScorer(m, regularization=0.0).fit(Xtr, ytr)
    predicted = scorer.influences(Xte, yte, Xtr[removed], ytr[removed]) / len(Xtr)
    assert pearsonr(predicted.ravel(), actual.ravel())[0] >= 0.99


def test_multi_output_mlp_regressor_sums_over_outputs():
    """sklearn trains on the gradient of half the squared error summed over outputs
    (its loss_ averages them: scikit-learn issue #8349); the loss here is the sum."""
    X, Y = make_regression(60, 3, n_targets=2, random_state=0)
    m = MLPRegressor(hidden_layer_sizes=(4,), alpha=0.1, max_iter=50, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(X, Y / Y.std())
    a, Xt, Yt = _bound(m, X, Y / Y.std())
    expected = 0.5 * ((Y / Y.std() - m.predict(X)) ** 2).sum(1)
    np.testing.assert_allclose(_losses(a, Xt, Yt), expected, rtol=1e-10)
    s = DirectInfluenceScorer(m, regularization=0.1, hessian="gauss-newton").fit(X, Y / Y.std())
    assert s.transform(X[:3], Y[:3] / Y.std()).shape == (3, 60)


def test_mlp_refusals_name_the_argument(iris):
    Xtr, ytr, _, _ = iris
    quick = {**LBFGS, "max_iter": 30}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged: only the refusals matter here
        m = MLPClassifier(hidden_layer_sizes=(3,), **quick).fit(Xtr, ytr)
        multilabel = np.c_[ytr == 0, ytr == 1].astype(int)
        ml = MLPClassifier(hidden_layer_sizes=(3,), **quick).fit(Xtr, multilabel)
        poisson = MLPRegressor(hidden_layer_sizes=(3,), loss="poisson", **quick).fit(Xtr, np.exp(Xtr[:, 0]))
    with pytest.raises(ValueError, match="loss: an sklearn MLPClassifier brings its own loss"):
        DirectInfluenceScorer(m, loss=torch.nn.functional.cross_entropy).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="multilabel MLPClassifier"):
        DirectInfluenceScorer(ml).fit(Xtr, multilabel)
    with pytest.raises(ValueError, match="loss='squared_error'"):
        DirectInfluenceScorer(poisson).fit(Xtr, np.exp(Xtr[:, 0]))
    with pytest.raises(NotFittedError, match="MLPRegressor is not fitted"):
        DirectInfluenceScorer(MLPRegressor()).fit(Xtr, Xtr[:, 0])
    early = MLPClassifier(hidden_layer_sizes=(3,), early_stopping=True, max_iter=20, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        early.fit(Xtr, ytr)
    with pytest.warns(UserWarning, match="early_stopping=True"):
        build_adapter(early)


def test_params_select_the_output_layer_a_softmax_regression_on_the_hidden_units(iris):
    Xtr, ytr, Xte, yte = iris
    m = MLPClassifier(hidden_layer_sizes=(6,), alpha=1.0, **LBFGS).fit(Xtr, ytr)
    last = DirectInfluenceScorer(m, regularization=0.0, params="output").fit(Xtr, ytr)
    assert last.n_params_ == 6 * 3 + 3

    # closed form: cross-entropy of softmax(W h + b), h the relu hidden units
    def parts(X, y):
        h = np.maximum(X @ m.coefs_[0] + m.intercepts_[0], 0)
        logits = h @ m.coefs_[1] + m.intercepts_[1]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        J = np.stack([np.c_[np.kron(np.eye(3), hi[None]), np.eye(3)] for hi in h])  # d logits / d (W, b)
        G = np.einsum("nk,nkp->np", p - np.eye(3)[y], J)
        return J, p, G

    J, p, Gtr = parts(Xtr, ytr)
    S = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
    H = np.einsum("nkp,nkl,nlq->pq", J, S, J) / len(ytr)
    H += np.diag(np.r_[np.full(18, m.alpha / len(ytr)), np.zeros(3)])
    u = np.r_[np.zeros(18), np.ones(3)] / np.sqrt(3)  # the softmax's flat direction
    _, _, Gte = parts(Xte, yte)
    expected = Gte @ np.linalg.solve(H + np.outer(u, u), Gtr.T)
    np.testing.assert_allclose(last.transform(Xte, yte), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(Gte @ u, 0.0, atol=1e-12)  # gradients never see that direction


# ------------------------------------------------------------------- SGDClassifier


def _ovr_closed_form(coef, intercept, alpha, Xtr, ytr, Xte, yte, classes):
    """sum_k g_k(test)^T H_k^-1 g_k(train) for one-vs-rest logistic models."""
    def aug(X):
        return np.c_[X, np.ones(len(X))]

    total = 0.0
    K = coef.shape[0]
    for k in range(K):
        w = np.r_[coef[k], intercept[k]]
        pos = classes[1] if K == 1 else classes[k]
        ttr, tte = (ytr == pos).astype(float), (yte == pos).astype(float)
        ptr, pte = expit(aug(Xtr) @ w), expit(aug(Xte) @ w)
        H = aug(Xtr).T @ (aug(Xtr) * (ptr * (1 - ptr))[:, None]) / len(Xtr)
        H += np.diag(np.r_[np.full(Xtr.shape[1], alpha), 0.0])
        Gtr, Gte = aug(Xtr) * (ptr - ttr)[:, None], aug(Xte) * (pte - tte)[:, None]
        total = total + Gte @ np.linalg.solve(H, Gtr.T)
    return total


@pytest.mark.parametrize("data", ["binary", "iris"])
def test_sgd_log_loss_matches_the_closed_form(data, request):
    Xtr, ytr, Xte, yte = request.getfixturevalue(data)
    sgd = SGDClassifier(loss="log_loss", alpha=0.01, max_iter=50, tol=None, random_state=0)
    sgd.fit(Xtr, ytr)
    scorer = DirectInfluenceScorer(sgd, regularization=0.0).fit(Xtr, ytr)
    expected = _ovr_closed_form(sgd.coef_, sgd.intercept_, sgd.alpha, Xtr, ytr, Xte, yte, sgd.classes_)
    np.testing.assert_allclose(scorer.transform(Xte, yte), expected, rtol=1e-8, atol=1e-10)


def test_sgd_penalty_is_logistic_regressions_at_c_one_over_alpha_n(binary):
    """sklearn: SGD's alpha/2 ||w||^2 + mean log-loss is LogisticRegression at C = 1/(alpha n);
    at that model's optimum the SGD adapter's objective gradient vanishes."""
    Xtr, ytr, _, _ = binary
    alpha = 0.05
    lr = LogisticRegression(C=1 / (alpha * len(ytr)), tol=1e-12, max_iter=10000).fit(Xtr, ytr)
    sgd = SGDClassifier(loss="log_loss", alpha=alpha, max_iter=5, tol=None, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged: its weights are replaced below
        sgd.fit(Xtr, ytr)
    sgd.coef_, sgd.intercept_ = lr.coef_.copy(), lr.intercept_.copy()
    a, Xt, Yt = _bound(sgd, Xtr, ytr)
    g, g_loss = _objective_grad(a, Xt, Yt)
    assert float(g.norm()) < 1e-6 * float(g_loss.norm())
    assert a.penalty.rank_one == []  # one-vs-rest has no flat direction


def test_sgd_refusals_name_the_argument_and_the_remedy(binary):
    Xtr, ytr, _, _ = binary
    kw = {"max_iter": 5, "tol": None, "random_state": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hinge = SGDClassifier(**kw).fit(Xtr, ytr)
        l1 = SGDClassifier(loss="log_loss", penalty="l1", **kw).fit(Xtr, ytr)
        enet = SGDClassifier(loss="log_loss", penalty="elasticnet", **kw).fit(Xtr, ytr)
        weighted = SGDClassifier(loss="log_loss", class_weight="balanced", **kw).fit(Xtr, ytr)
    with pytest.raises(ValueError, match=r"loss='hinge'.*Refit with loss='log_loss'"):
        DirectInfluenceScorer(hinge).fit(Xtr, ytr)
    for est in (l1, enet):
        with pytest.raises(ValueError, match=r"penalty=.*refit with penalty='l2'"):
            DirectInfluenceScorer(est).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="class_weight=None"):
        DirectInfluenceScorer(weighted).fit(Xtr, ytr)
    with pytest.raises(NotFittedError, match="SGDClassifier is not fitted"):
        DirectInfluenceScorer(SGDClassifier(loss="log_loss")).fit(Xtr, ytr)


# ------------------------------------------------------------------- Pipeline


def test_pipeline_equals_its_model_on_transformed_features(iris):
    Xtr, ytr, Xte, yte = iris
    pipe = make_pipeline(StandardScaler(), PCA(3, random_state=0), LogisticRegression(C=2.0, tol=1e-12, max_iter=10000))
    pipe.fit(Xtr, ytr)
    Ztr, Zte = pipe[:-1].transform(Xtr), pipe[:-1].transform(Xte)
    model = pipe[-1]
    for mode in ("up", "perturbation"):
        piped = DirectInfluenceScorer(pipe, regularization=0.0, mode=mode).fit(Xtr, ytr)
        plain = DirectInfluenceScorer(model, regularization=0.0, mode=mode).fit(Ztr, ytr)
        got = piped.transform(Xte, yte)
        np.testing.assert_allclose(got, plain.transform(Zte, yte), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(piped.self_influence(), plain.self_influence(), rtol=1e-10, atol=1e-12)
        assert piped.n_features_in_ == 4 and piped.n_params_ == 3 * 3 + 3
    # perturbation mode: derivatives with respect to the 3 transformed features
    assert got.shape == (len(yte), len(ytr), 3)
    restored = pickle.loads(pickle.dumps(piped))
    np.testing.assert_allclose(restored.transform(Xte, yte), got)


def test_pipeline_influences_agree_with_refitting_its_model(iris):
    """Influences are over the last step: refit it without each point, steps fixed."""
    Xtr, ytr, Xte, yte = iris
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(5,), activation="tanh", alpha=1.0, **LBFGS))
    pipe.fit(Xtr, ytr)
    Ztr, Zte = pipe[:-1].transform(Xtr), pipe[:-1].transform(Xte)

    def test_loss(model):
        return -np.log(model.predict_proba(Zte)[np.arange(len(yte)), yte])

    removed = np.arange(0, 90, 9)
    actual = _leave_one_out(pipe[-1], Ztr, ytr, removed, test_loss)
    scorer = CgInfluenceScorer(pipe, regularization=0.0, rtol=1e-10).fit(Xtr, ytr)
    predicted = scorer.influences(Xte, yte, Xtr[removed], ytr[removed]) / len(Xtr)
    assert pearsonr(predicted.ravel(), actual.ravel())[0] >= 0.99


def test_pipeline_errors_name_the_step(iris):
    Xtr, ytr, _, _ = iris
    with pytest.raises(TypeError, match=r"last step 'svc' is not a supported model"):
        DirectInfluenceScorer(make_pipeline(StandardScaler(), SVC()).fit(Xtr, ytr)).fit(Xtr, ytr)
    with pytest.raises(NotFittedError, match=r"step 'standardscaler' \(StandardScaler\) of the Pipeline is not fitted"):
        DirectInfluenceScorer(make_pipeline(StandardScaler(), LogisticRegression())).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="last step is 'passthrough'"):
        DirectInfluenceScorer(make_pipeline(StandardScaler(), "passthrough").fit(Xtr)).fit(Xtr, ytr)


def test_nested_pipeline_applies_every_step(iris):
    Xtr, ytr, Xte, yte = iris
    inner = make_pipeline(PCA(3, random_state=0), LogisticRegression(tol=1e-12, max_iter=10000))
    outer = make_pipeline(StandardScaler(), inner).fit(Xtr, ytr)
    Z = outer[0].transform(Xtr)
    plain = DirectInfluenceScorer(inner, regularization=0.0).fit(Z, ytr)
    nested = DirectInfluenceScorer(outer, regularization=0.0).fit(Xtr, ytr)
    np.testing.assert_allclose(
        nested.transform(Xte, yte), plain.transform(outer[0].transform(Xte), yte), rtol=1e-10
    )


def test_pipeline_selects_dataframe_columns_by_name_and_encodes_strings():
    """A ColumnTransformer picking columns by name, a OneHotEncoder on strings: the
    scorer hands X to the Pipeline as given and equals the model on the transformed
    features; the frame is not changed, and its columns are checked at each call."""
    pd = pytest.importorskip("pandas")
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(3)
    n = 150
    df = pd.DataFrame({
        "age": rng.normal(40, 10, n), "income": rng.normal(5, 2, n),
        "city": rng.choice(["north", "south", "east"], n), "notes": ["free text"] * n,
    })
    y = ((df.age - 40) / 10 + (df.city == "south") + rng.normal(0, 0.5, n) > 0.5).astype(int).to_numpy()
    columns = ColumnTransformer([("num", StandardScaler(), ["age", "income"]), ("cat", OneHotEncoder(), ["city"])])
    pipe = make_pipeline(columns, LogisticRegression(tol=1e-12, max_iter=10_000)).fit(df, y)
    before = df.copy()
    for mode in ("up", "perturbation"):
        piped = DirectInfluenceScorer(pipe, regularization=0.0, mode=mode).fit(df, y)
        Z = pipe[:-1].transform(df)
        plain = DirectInfluenceScorer(pipe[-1], regularization=0.0, mode=mode).fit(Z, y)
        np.testing.assert_allclose(piped.influences(df.iloc[:7], y[:7]), plain.influences(Z[:7], y[:7]), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(piped.self_influence(), plain.self_influence(), rtol=1e-10, atol=1e-12)
    assert list(piped.feature_names_in_) == ["age", "income", "city", "notes"] and piped.n_features_in_ == 4
    pd.testing.assert_frame_equal(df, before)
    with pytest.raises(ValueError, match="feature names"):
        piped.influences(df[["income", "age", "city", "notes"]].iloc[:3], y[:3])
    with pytest.raises(ValueError, match=r"^X: the Pipeline's steps before its model could not transform X"):
        piped.self_influence(df.drop(columns="city").assign(city=1.5, x=0)[["age", "income", "city", "notes"]], y)
