"""DirectInfluenceScorer against independent references: retraining, finite
differences, and invariances."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.func import functional_call

from skinfluence import DirectInfluenceScorer, NotPositiveDefiniteError


def _newton_logreg(X, y, lam, init=None):
    """Multinomial logistic regression, mean CE + lam/2 ||theta||^2, to machine precision."""
    model = nn.Linear(X.shape[1], 2).double()
    if init is not None:
        model.load_state_dict(init)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    shapes = [(n, p.shape) for n, p in model.named_parameters()]

    def unflat(v):
        out, o = {}, 0
        for n, s in shapes:
            k = int(np.prod(s))
            out[n] = v[o : o + k].view(s)
            o += k
        return out

    def obj(v):
        return F.cross_entropy(functional_call(model, unflat(v), (Xt,)), yt) + 0.5 * lam * (v**2).sum()

    v = torch.cat([p.detach().ravel() for p in model.parameters()])
    for _ in range(50):
        g = torch.autograd.functional.jacobian(obj, v)
        if g.norm() < 1e-13:
            break
        v = v - torch.linalg.solve(torch.autograd.functional.hessian(obj, v), g)
    with torch.no_grad():
        for (_, p), val in zip(model.named_parameters(), unflat(v).values(), strict=True):
            p.copy_(val)
    return model


def test_leave_one_out_retraining():
    """Removing a point changes each test loss by about I / n_train (Pearson >= 0.99).

    The reference panel: breast_cancer, 300 train / 100 test, stratified split,
    standardized on the training part.
    """
    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, train_size=300, test_size=100, random_state=0, stratify=y)
    sc = StandardScaler().fit(Xtr)
    Xtr, Xte = sc.transform(Xtr), sc.transform(Xte)
    lam = 0.01
    model = _newton_logreg(Xtr, ytr, lam)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    Xte_t, yte_t = torch.as_tensor(Xte), torch.as_tensor(yte)
    with torch.no_grad():
        base = F.cross_entropy(model(Xte_t), yte_t, reduction="none").numpy()
    removed = np.random.default_rng(0).choice(len(Xtr), 60, replace=False)
    actual = []
    for i in removed:
        keep = np.arange(len(Xtr)) != i
        m = _newton_logreg(Xtr[keep], ytr[keep], lam, init)
        with torch.no_grad():
            actual.append(F.cross_entropy(m(Xte_t), yte_t, reduction="none").numpy() - base)
    actual = np.array(actual).T  # (n_test, n_removed)
    scorer = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=lam).fit(Xtr, ytr)
    predicted = scorer.influences(Xte, yte, Xtr[removed], ytr[removed]) / len(Xtr)
    r = pearsonr(predicted.ravel(), actual.ravel())[0]
    print(f"LOO Pearson over all pairs: {r:.4f}")
    assert r >= 0.99, r
    # the scale is right too, not only the ranking
    slope = (predicted.ravel() @ actual.ravel()) / (predicted.ravel() @ predicted.ravel())
    assert 0.8 < slope < 1.25


def test_leave_one_out_sklearn_logistic_regression(cancer):
    """regularization=0 on an sklearn model uses the model's own penalty: LOO agrees."""
    Xtr, ytr, Xte, yte = cancer
    Xtr, ytr = Xtr[:150], ytr[:150]
    C = 0.5

    def fit(X, y):
        return LogisticRegression(C=C * len(y) / 150, tol=1e-12, max_iter=10000).fit(X, y)

    # C scales with n so that the penalty per point is the same after a removal,
    # which is what removing a term from the objective means.
    model = fit(Xtr, ytr)

    def test_loss(m):
        p = m.predict_proba(Xte)[np.arange(len(yte)), yte]
        return -np.log(p)

    base = test_loss(model)
    removed = np.arange(0, 150, 5)
    actual = np.array([test_loss(fit(np.delete(Xtr, i, 0), np.delete(ytr, i))) - base for i in removed]).T
    scorer = DirectInfluenceScorer(model, regularization=0.0).fit(Xtr, ytr)
    predicted = scorer.influences(Xte, yte, Xtr[removed], ytr[removed]) / len(Xtr)
    assert pearsonr(predicted.ravel(), actual.ravel())[0] >= 0.99


def test_perturbation_mode_matches_finite_differences(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    up = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05).fit(Xtr, ytr)
    pert = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05, mode="perturbation").fit(Xtr, ytr)
    P = pert.transform(Xte[:3], yte[:3])
    assert P.shape == (3, len(Xtr), Xtr.shape[1])
    eps = 1e-6
    for j in (0, 7, 50):
        for k in (0, 4, 12):
            Xp, Xm = Xtr[j : j + 1].copy(), Xtr[j : j + 1].copy()
            Xp[0, k] += eps
            Xm[0, k] -= eps
            fd = (up.influences(Xte[:3], yte[:3], Xp, ytr[j : j + 1]) - up.influences(Xte[:3], yte[:3], Xm, ytr[j : j + 1])) / (2 * eps)
            np.testing.assert_allclose(P[:, j, k], fd[:, 0], rtol=1e-5, atol=1e-8)


def test_self_influence_is_the_diagonal(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    for mode in ("up", "perturbation"):
        s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05, mode=mode, batch_size=17).fit(Xtr, ytr)
        full = s.influences(Xtr, ytr)
        idx = np.arange(len(Xtr))
        np.testing.assert_allclose(s.self_influence(), full[idx, idx], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s.fit_transform(Xtr, ytr), full)


def test_batch_size_does_not_change_results(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    results = []
    for bs in (1, 7, 64, 1000):
        s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05, batch_size=bs).fit(Xtr, ytr)
        results.append((s.transform(Xte, yte), s.self_influence(), s.influence_factors(Xte, yte)))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_float32_agrees_with_float64(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    kw = dict(loss=F.cross_entropy, regularization=0.05)
    I64 = DirectInfluenceScorer(torch_mlp, **kw).fit(Xtr, ytr).transform(Xte, yte)
    s32 = DirectInfluenceScorer(torch_mlp, dtype="float32", **kw).fit(Xtr, ytr)
    I32 = s32.transform(Xte, yte)
    assert I32.dtype == np.float32 and I64.dtype == np.float64
    np.testing.assert_allclose(I32, I64, rtol=1e-3, atol=1e-4 * np.abs(I64).max())


def test_factors_and_hessian_gauss_newton(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, hessian="gauss-newton", regularization=1e-3).fit(Xtr, ytr)
    Fte = s.influence_factors(Xte, yte)
    G = s._grads(s.X_train_, s.y_train_).numpy()
    np.testing.assert_allclose(Fte @ G.T, s.transform(Xte, yte), rtol=1e-10, atol=1e-12)


def test_y_none_uses_predicted_class(torch_mlp, wine):
    Xtr, ytr, Xte, _ = wine
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05).fit(Xtr, ytr)
    with torch.no_grad():
        pred = torch_mlp(torch.as_tensor(Xte)).argmax(1).numpy()
    np.testing.assert_allclose(s.transform(Xte), s.transform(Xte, pred))


def test_not_positive_definite_suggests_a_value(wine):
    Xtr, ytr, _, _ = wine
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 3)).double()  # untrained
    with pytest.raises(NotPositiveDefiniteError, match=r"Use regularization=([0-9.e-]+) or larger") as err:
        DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.0).fit(Xtr, ytr)
    import re

    value = float(re.search(r"Use regularization=([0-9.e-]+)", str(err.value)).group(1))
    DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=value).fit(Xtr, ytr)
