"""Removal effects of groups: each checked against something computed independently
(the pairwise matrix, a dense Newton step written out here, finite differences of the
reweighted objective, exact refits of a quadratic model)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

import skinfluence
from skinfluence import CgInfluenceScorer, DirectInfluenceScorer
from skinfluence.solvers import METHODS


@pytest.fixture(scope="module")
def binary():
    """Binary logistic regression (C=0.5) on 120 breast-cancer points, 40 test."""
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)[:, :8]
    model = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(X[:120], y[:120])
    _polish(model, X[:120], y[:120])
    return model, X[:120], y[:120], X[120:160], y[120:160]


@pytest.fixture(scope="module")
def iris():
    """3-class multinomial logistic regression (C=1) on 100 iris points, 50 test."""
    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    rng = np.random.default_rng(0)
    perm = rng.permutation(150)
    X, y = X[perm], y[perm]
    model = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(X[:100], y[:100])
    _polish(model, X[:100], y[:100])
    return model, X[:100], y[:100], X[100:], y[100:]


def direct(model, X, y):
    return DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(X, y)


# ------------------------------------------------------------------ independent references


def _logistic_objective(model, X, y):
    """sklearn's objective ``C sum_i l_i + 0.5 ||W||^2`` as a function of flat
    (W, b), and the per-sample losses, written out from its definition."""
    Xt, yt = torch.tensor(X), torch.tensor(y)
    K = model.coef_.shape[0]
    d = X.shape[1]

    def losses(theta):
        W, b = theta[: K * d].reshape(K, d), theta[K * d :]
        z = Xt @ W.T + b
        if K == 1:
            return F.binary_cross_entropy_with_logits(z[:, 0], yt.double(), reduction="none")
        return F.cross_entropy(z, yt, reduction="none")

    def objective(theta, keep):
        W = theta[: K * d]
        return model.C * losses(theta)[keep].sum() + 0.5 * (W**2).sum()

    theta = torch.tensor(np.concatenate([model.coef_.ravel(), model.intercept_]))
    return theta, losses, objective


def _polish(model, X, y):
    """Newton's method to machine precision, so that the fitted model is the
    minimiser the formulas assume."""
    theta, _, objective = _logistic_objective(model, X, y)
    keep = torch.ones(len(y), dtype=torch.bool)
    for _ in range(5):
        g = torch.autograd.functional.jacobian(lambda t: objective(t, keep), theta)
        H = torch.autograd.functional.hessian(lambda t: objective(t, keep), theta)
        theta = theta - torch.linalg.pinv(H) @ g
    K, d = model.coef_.shape
    model.coef_ = theta[: K * d].reshape(K, d).numpy().copy()
    model.intercept_ = theta[K * d :].numpy().copy()


def _dense_newton_step(model, X, y, remove):
    """theta_{-S} - theta by one Newton step on sklearn's objective without S, with
    the dense Hessian of the remaining data (pseudo-inverse: the softmax's null
    direction carries no gradient)."""
    theta, _losses, objective = _logistic_objective(model, X, y)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[torch.as_tensor(remove)] = False
    g = torch.autograd.functional.jacobian(lambda t: objective(t, keep), theta)
    H = torch.autograd.functional.hessian(lambda t: objective(t, keep), theta)
    return -(torch.linalg.pinv(H) @ g).numpy(), theta.numpy()


def _test_losses(model, theta, X, y):
    K, d = model.coef_.shape
    W, b = theta[: K * d].reshape(K, d), theta[K * d :]
    z = torch.tensor(X @ W.T + b)
    if K == 1:
        return F.binary_cross_entropy_with_logits(z[:, 0], torch.tensor(y).double(), reduction="none").numpy()
    return F.cross_entropy(z, torch.tensor(y), reduction="none").numpy()


# ------------------------------------------------------------------ first order


def test_group_influence_is_the_column_sums_of_the_pairwise_matrix(iris):
    model, X, y, Xt, yt = iris
    s = direct(model, X, y)
    labels = np.array(["a", "c", "b", "d"])[np.arange(100) % 4]
    G = s.group_influence(Xt, yt, groups=labels)
    I = s.influences(Xt, yt)
    expected = np.stack([I[:, labels == g].sum(1) for g in np.unique(labels)], 1)
    assert G.shape == (50, 4)
    np.testing.assert_allclose(G, expected, rtol=0, atol=1e-8 * np.abs(expected).max())
    # first-order effect: the same sums divided by n_train
    delta = s.predict_removal_effect(Xt, yt, remove=np.flatnonzero(labels == "c"))
    np.testing.assert_allclose(delta, expected[:, 2] / 100, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_sums_its_own_pairwise_matrix(name, binary):
    model, X, y, Xt, yt = binary
    cls = getattr(skinfluence, METHODS[name].scorer_name)
    kw = {"regularization": 0.01, "dtype": "float64", **METHODS[name].reference_settings}
    kw = {k: v for k, v in {**kw, "random_state": 0, "rank": 5}.items() if k in cls().get_params()}
    s = cls(model, **kw).fit(X, y)
    groups = [np.arange(0, 30), np.arange(20, 70), np.array([5])]  # overlapping
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        G = s.group_influence(Xt, yt, groups=groups)
        I = s.influences(Xt, yt)
    expected = np.stack([I[:, g].sum(1) for g in groups], 1)
    np.testing.assert_allclose(G, expected, rtol=0, atol=1e-8 * np.abs(expected).max())


def test_labels_and_index_lists_agree(binary):
    model, X, y, Xt, yt = binary
    s = direct(model, X, y)
    labels = np.random.default_rng(1).integers(10, 13, size=120)
    lists = [np.flatnonzero(labels == g) for g in (10, 11, 12)]
    masks = [labels == g for g in (10, 11, 12)]
    for correction in ("none", "second-order", "newton"):
        a = s.predict_removal_effect(Xt, yt, groups=labels, correction=correction)
        b = s.predict_removal_effect(Xt, yt, groups=lists, correction=correction)
        c = s.predict_removal_effect(Xt, yt, remove=masks[1], correction=correction)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(a[:, 1], c, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        s.group_influence(Xt, yt, groups=labels), s.group_influence(Xt, yt, groups=lists),
        rtol=1e-12,
    )


# ------------------------------------------------------------------ Newton


@pytest.mark.parametrize("which", ["binary", "iris"])
def test_newton_equals_a_dense_one_step_computation(which, request):
    model, X, y, Xt, yt = request.getfixturevalue(which)
    remove = np.random.default_rng(0).choice(len(y), size=15, replace=False)
    step, theta = _dense_newton_step(model, X, y, remove)
    expected = _test_losses(model, theta + step, Xt, yt) - _test_losses(model, theta, Xt, yt)
    got = direct(model, X, y).predict_removal_effect(Xt, yt, remove=remove, correction="newton",
                                                     rtol=1e-13)
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-10 * np.abs(expected).max())
    # and it is not the first order (the test can tell them apart)
    first = direct(model, X, y).predict_removal_effect(Xt, yt, remove=remove)
    assert np.abs(first - expected).max() > 1e-3 * np.abs(expected).max()


def test_iterated_newton_steps_reach_the_refit(binary):
    """Enough Newton steps are retraining: the refit's own minimiser, here by
    Newton's method on sklearn's objective without the group, written out."""
    model, X, y, Xt, yt = binary
    remove = np.arange(0, 30)  # a quarter of the data
    theta, _, objective = _logistic_objective(model, X, y)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[:30] = False
    t = theta.clone()
    for _ in range(30):
        g = torch.autograd.functional.jacobian(lambda u: objective(u, keep), t)
        t = t - torch.linalg.solve(torch.autograd.functional.hessian(lambda u: objective(u, keep), t), g)
    expected = _test_losses(model, t.numpy(), Xt, yt) - _test_losses(model, theta.numpy(), Xt, yt)
    s = direct(model, X, y)
    one = s.predict_removal_effect(Xt, yt, remove=remove, correction="newton", rtol=1e-13)
    many = s.predict_removal_effect(Xt, yt, remove=remove, correction="newton", newton_steps=8,
                                    rtol=1e-13)
    np.testing.assert_allclose(many, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
    assert np.abs(one - expected).max() > 1e-4 * np.abs(expected).max()
    with pytest.raises(ValueError, match="newton_steps"):
        s.predict_removal_effect(Xt, yt, remove=remove, correction="newton", newton_steps=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_newton_does_not_depend_on_the_method(name, binary):
    """The Newton system uses the exact remaining curvature; a method only
    preconditions it, so every method gives the same step."""
    model, X, y, Xt, yt = binary
    cls = getattr(skinfluence, METHODS[name].scorer_name)
    kw = {k: v for k, v in {"regularization": 0.0, "dtype": "float64", "random_state": 0,
                            "rank": 5}.items() if k in cls().get_params()}
    remove = np.arange(10, 40)
    ref = direct(model, X, y).predict_removal_effect(Xt, yt, remove=remove, correction="newton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            s = cls(model, **kw).fit(X, y)
        except Exception:  # a method that needs damping on this problem
            s = cls(model, **{**kw, "regularization": 1e-6}).fit(X, y)
            ref = DirectInfluenceScorer(model, regularization=1e-6, dtype="float64").fit(
                X, y).predict_removal_effect(Xt, yt, remove=remove, correction="newton")
        got = s.predict_removal_effect(Xt, yt, remove=remove, correction="newton",
                                       rtol=1e-12, maxiter=400)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())


def test_newton_is_exact_for_ridge_refits():
    X, y = load_diabetes(return_X_y=True)
    X, y = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
    model = Ridge(alpha=3.0).fit(X[:200], y[:200])
    s = DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(X[:200], y[:200])
    groups = np.arange(200) % 5
    delta = s.predict_removal_effect(X[200:], y[200:], groups=groups, correction="newton",
                                     rtol=1e-13)
    base = (model.predict(X[200:]) - y[200:]) ** 2
    for g in range(5):
        keep = groups != g
        refit = Ridge(alpha=3.0).fit(X[:200][keep], y[:200][keep])
        np.testing.assert_allclose(delta[:, g], (refit.predict(X[200:]) - y[200:]) ** 2 - base,
                                   rtol=0, atol=1e-9 * np.abs(delta).max())


# ------------------------------------------------------------------ second order


def test_second_order_against_finite_differences_of_the_reweighted_objective():
    """Ridge: the reweighted objective ``sum_i l_i - eps sum_S l_i + alpha ||w||^2`` is
    quadratic, so its minimiser's path has no third-derivative terms and the second
    order is the Taylor polynomial ``f'(0) + f''(0) / 2`` of ``f(eps) = g_test .
    theta(eps)``, measured here by finite differences of exact minimisers."""
    X, y = load_diabetes(return_X_y=True)
    X, y = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
    Xtr, ytr, Xte, yte = X[:150], y[:150], X[150:170], y[150:170]
    alpha = 2.0
    model = Ridge(alpha=alpha).fit(Xtr, ytr)
    S = np.arange(0, 150, 4)
    Z = np.hstack([Xtr, np.ones((150, 1))])
    D = np.diag([alpha] * 10 + [0.0])

    def theta(eps):
        w = np.ones(150)
        w[S] -= eps
        return np.linalg.solve(Z.T @ (w[:, None] * Z) + D, Z.T @ (w * ytr))

    th0 = theta(0.0)
    Zte = np.hstack([Xte, np.ones((20, 1))])
    g_test = 2 * (Zte @ th0 - yte)[:, None] * Zte  # gradient of (f - y)^2
    h = 1e-3  # smaller steps lose the second difference to rounding
    f = {e: g_test @ theta(e) for e in (-h, 0.0, h)}
    d1 = (f[h] - f[-h]) / (2 * h)
    d2 = (f[h] - 2 * f[0.0] + f[-h]) / h**2
    s = DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(Xtr, ytr)
    first = s.predict_removal_effect(Xte, yte, remove=S)
    second = s.predict_removal_effect(Xte, yte, remove=S, correction="second-order")
    scale = np.abs(d1).max()
    np.testing.assert_allclose(first, d1, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(second, d1 + d2 / 2, rtol=0, atol=1e-6 * scale)
    assert np.abs(second - first).max() > 1e-2 * np.abs(first).max()


def test_second_order_adds_the_group_curvature_term(binary):
    """Logistic regression: the second-order term is
    ``grad l_test . A^-1 H_S A^-1 g_S / n^2``, here from sklearn's objective written
    out (``A`` its Hessian divided by ``C n``)."""
    model, X, y, Xt, yt = binary
    s = direct(model, X, y)
    remove = np.arange(0, 40)
    first = s.predict_removal_effect(Xt, yt, remove=remove)
    second = s.predict_removal_effect(Xt, yt, remove=remove, correction="second-order")
    theta, losses, objective = _logistic_objective(model, X, y)
    keep = torch.ones(len(y), dtype=torch.bool)
    A = torch.autograd.functional.hessian(lambda t: objective(t, keep), theta).numpy() / (model.C * 120)
    HS = torch.autograd.functional.hessian(lambda t: losses(t)[remove].sum(), theta).numpy()
    gS = torch.autograd.functional.jacobian(lambda t: losses(t)[remove].sum(), theta).numpy()
    Gt = _grads_at(model, theta, Xt, yt)
    np.testing.assert_allclose(first, Gt @ np.linalg.solve(A, gS) / 120, rtol=1e-8)
    extra = Gt @ np.linalg.solve(A, HS @ np.linalg.solve(A, gS)) / 120**2
    np.testing.assert_allclose(second - first, extra, rtol=1e-8, atol=1e-12 * np.abs(extra).max())
    assert np.abs(extra).max() > 0.05 * np.abs(first).max()


def _grads_at(model, theta, X, y):
    K, d = model.coef_.shape
    t = torch.as_tensor(theta).detach().clone().requires_grad_(True)
    rows = []
    for i in range(len(y)):
        W, b = t[: K * d].reshape(K, d), t[K * d :]
        z = torch.tensor(X[i : i + 1]) @ W.T + b
        loss = F.binary_cross_entropy_with_logits(z[:, 0], torch.tensor(y[i : i + 1]).double())
        rows.append(torch.autograd.grad(loss, t)[0].numpy())
    return np.stack(rows)


# ------------------------------------------------------------------ leave one out


@pytest.mark.parametrize("which", ["binary", "iris"])
def test_newton_self_removal_effect_equals_dense_steps(which, request):
    model, X, y, _Xt, _yt = request.getfixturevalue(which)
    s = direct(model, X, y)
    newton = s.self_removal_effect()
    first = s.self_removal_effect(correction="none")
    np.testing.assert_allclose(first, s.self_influence() / len(y), rtol=1e-12)
    for j in (0, 7, 33):
        step, theta = _dense_newton_step(model, X, y, [j])
        exp = _test_losses(model, theta + step, X[j : j + 1], y[j : j + 1])[0]
        exp -= _test_losses(model, theta, X[j : j + 1], y[j : j + 1])[0]
        np.testing.assert_allclose(newton[j], exp, rtol=1e-7)
        # the same number as a one-point removal effect evaluated at x_j
        np.testing.assert_allclose(
            s.predict_removal_effect(X[j : j + 1], y[j : j + 1], remove=[j], correction="newton"),
            [exp], rtol=1e-7)


def test_leave_one_out_probabilities(iris):
    model, X, y, _Xt, _yt = iris
    s = direct(model, X, y)
    np.testing.assert_allclose(
        s.leave_one_out_probabilities(correction="none"),
        s.class_probabilities(leave_one_out=True), rtol=1e-10, atol=1e-14)
    P = s.leave_one_out_probabilities()
    j = 11
    step, theta = _dense_newton_step(model, X, y, [j])
    K, d = model.coef_.shape
    W, b = (theta + step)[: K * d].reshape(K, d), (theta + step)[K * d :]
    z = X[j] @ W.T + b
    np.testing.assert_allclose(P[j], np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-7)


# ------------------------------------------------------------------ errors


def test_bad_groups_and_indices_are_clear_errors(binary):
    model, X, y, Xt, yt = binary
    s = direct(model, X, y)
    with pytest.raises(ValueError, match=r"groups\[1\] is empty"):
        s.group_influence(Xt, yt, groups=[np.arange(3), np.array([], dtype=int)])
    with pytest.raises(ValueError, match=r"remove is empty"):
        s.predict_removal_effect(Xt, yt, remove=[])
    with pytest.raises(ValueError, match=r"remove holds unknown training indices \[120\]"):
        s.predict_removal_effect(Xt, yt, remove=[3, 120])
    with pytest.raises(ValueError, match=r"groups\[0\] holds unknown training indices \[-1\]"):
        s.group_influence(Xt, yt, groups=[[-1, 2]])
    with pytest.raises(ValueError, match="one group label per training point"):
        s.group_influence(Xt, yt, groups=np.zeros(50))
    with pytest.raises(ValueError, match="remove, groups"):
        s.predict_removal_effect(Xt, yt)
    with pytest.raises(ValueError, match="correction must be one of"):
        s.predict_removal_effect(Xt, yt, remove=[1], correction="third")
    with pytest.raises(ValueError, match="every training point"):
        s.predict_removal_effect(Xt, yt, remove=np.arange(120))
    with pytest.raises(ValueError, match="mode"):
        DirectInfluenceScorer(model, mode="perturbation").fit(X, y).group_influence(
            Xt, yt, groups=[[1]])


def test_a_torch_mlp_through_cg(binary):
    """A non-linear model and a matrix-free method: the Newton step is the one of the
    damped remaining curvature, checked against the dense one."""
    _model, X, y, Xt, yt = binary
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    Xtr, ytr = torch.tensor(X), torch.tensor(y)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(net(Xtr), ytr).backward()
        opt.step()
    kw = dict(loss=F.cross_entropy, regularization=0.1, dtype="float64")
    cg = CgInfluenceScorer(net, rtol=1e-12, **kw).fit(X, y)
    ref = DirectInfluenceScorer(net, **kw).fit(X, y)
    remove = np.arange(0, 24)
    for correction in ("none", "second-order", "newton"):
        a = cg.predict_removal_effect(Xt, yt, remove=remove, correction=correction, rtol=1e-12)
        b = ref.predict_removal_effect(Xt, yt, remove=remove, correction=correction, rtol=1e-12)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10 * np.abs(b).max())
