"""The pyDVL-style functional interface: thin calls into the scorers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import skinfluence.scorers
from skinfluence import (
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    DirectInfluenceScorer,
    LissaInfluenceScorer,
    NystroemInfluenceScorer,
)
from skinfluence.functional import (
    InverseHvpResult,
    compute_influence_factors,
    compute_influences,
    compute_influences_pert,
    compute_influences_up,
    scorer_class,
)


@pytest.fixture(scope="module")
def logistic():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    model = LogisticRegression().fit(X[:120], y[:120])
    return model, (X[:120], y[:120]), (X[120:135], y[120:135])


METHODS = {
    "direct": (DirectInfluenceScorer, {}),
    "cg": (CgInfluenceScorer, {"rtol": 1e-10}),
    "lissa": (LissaInfluenceScorer, {"rtol": 1e-6, "random_state": 0}),
    "arnoldi": (ArnoldiInfluenceScorer, {"rank": 8, "random_state": 0}),
    "nystroem": (NystroemInfluenceScorer, {"rank": 8, "random_state": 0}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compute_influences_is_the_scorer(logistic, method):
    model, train, test = logistic
    cls, kw = METHODS[method]
    I = compute_influences(model, train, test, inversion_method=method,
                           hessian_regularization=0.01, **kw)
    J = cls(model, regularization=0.01, **kw).fit(*train).influences(*test)
    np.testing.assert_array_equal(I, J)


def test_ekfac_maps_to_its_scorer(logistic):
    model, train, test = logistic
    I = compute_influences(model, train, test, inversion_method="ekfac",
                           hessian_regularization=0.01, random_state=0)
    J = scorer_class("ekfac")(model, regularization=0.01, random_state=0)
    np.testing.assert_array_equal(I, J.fit(*train).influences(*test))


def test_missing_scorer_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(skinfluence.scorers, "EkfacInfluenceScorer")
    with pytest.raises(ImportError, match="inversion_method='ekfac' needs"):
        scorer_class("ekfac")


def test_all_methods_agree_with_direct(logistic):
    """Accuracy through the functional path, against the exact method."""
    model, train, test = logistic
    ref = compute_influences(model, train, test, hessian_regularization=0.01)
    for method, kw in [("cg", {"rtol": 1e-10}), ("lissa", {"rtol": 1e-10, "maxiter": 5000}),
                       ("arnoldi", {"rank": 31, "rtol": 1e-10}), ("nystroem", {"rank": 31})]:
        I = compute_influences(model, train, test, inversion_method=method,
                               hessian_regularization=0.01, dtype="float64", **kw)
        np.testing.assert_allclose(I, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())


def test_defaults_use_the_training_data(logistic):
    model, train, _ = logistic
    I = compute_influences(model, train, hessian_regularization=0.01)
    assert I.shape == (120, 120)
    s = DirectInfluenceScorer(model, regularization=0.01).fit(*train)
    np.testing.assert_allclose(np.diag(I), s.self_influence(), rtol=1e-10)


def test_input_data(logistic):
    model, train, test = logistic
    I = compute_influences(model, train, test, input_data=(train[0][:10], train[1][:10]))
    J = compute_influences(model, train, test)
    np.testing.assert_allclose(I, J[:, :10], rtol=1e-12)


def test_dataloaders_equal_arrays(logistic):
    model, train, test = logistic

    def loader(data, bs):
        return DataLoader(TensorDataset(*map(torch.as_tensor, data)), batch_size=bs)

    I = compute_influences(model, loader(train, 32), loader(test, 4), inversion_method="cg",
                           rtol=1e-10)
    J = compute_influences(model, train, test, inversion_method="cg", rtol=1e-10)
    np.testing.assert_allclose(I, J, rtol=1e-10, atol=1e-14)


def test_factors_then_up_and_pert(logistic):
    model, train, test = logistic
    result = compute_influence_factors(model, train, test, "cg", hessian_regularization=0.01,
                                       rtol=1e-10)
    assert isinstance(result, InverseHvpResult)
    x, info = result
    assert x.shape == (15, 31)
    assert info["n_iter"] >= 1 and info["residuals"].shape == (15,)
    assert isinstance(info["scorer"], CgInfluenceScorer)
    up = compute_influences(model, train, test, hessian_regularization=0.01)
    np.testing.assert_allclose(compute_influences_up(model, train, result), up, rtol=1e-6,
                               atol=1e-9)
    np.testing.assert_allclose(compute_influences_up(model, train, x), up, rtol=1e-6, atol=1e-9)
    pert = compute_influences(model, train, test, influence_type="perturbation",
                              hessian_regularization=0.01)
    assert pert.shape == (15, 120, 30)
    np.testing.assert_allclose(compute_influences_pert(model, train, result), pert, rtol=1e-6,
                               atol=1e-9)


def test_torch_module_with_loss():
    """A torch module needs loss=; a Ridge-like linear model has a closed form."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=50)
    torch.manual_seed(0)
    module = nn.Linear(3, 1).double()
    with torch.no_grad():  # least squares, so the gradient of the mean loss is 0
        Z = np.c_[X, np.ones(50)]
        w = np.linalg.lstsq(Z, y, rcond=None)[0]
        module.weight.copy_(torch.tensor(w[:3])[None])
        module.bias.copy_(torch.tensor(w[3:]))
    I = compute_influences(module, (X, y), (X[:5], y[:5]), inversion_method="cg",
                           loss=F.mse_loss, hessian_regularization=0.1, rtol=1e-12)
    r = Z @ w - y
    G = 2 * r[:, None] * Z
    H = 2 * Z.T @ Z / 50 + 0.1 * np.eye(4)
    np.testing.assert_allclose(I, G[:5] @ np.linalg.solve(H, G.T), rtol=1e-8, atol=1e-12)


def test_ridge_matches_closed_form():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 4))
    y = X @ rng.normal(size=4) + 0.3 * rng.normal(size=40)
    model = Ridge(alpha=3.0).fit(X, y)
    I = compute_influences(model, (X, y), inversion_method="lissa", rtol=1e-12,
                           maxiter=20000, dtype="float64")
    Z = np.c_[X, np.ones(40)]
    H = 2 * Z.T @ Z / 40
    H[:4, :4] += 2 * 3.0 * np.eye(4) / 40
    G = 2 * (Z @ np.r_[model.coef_, model.intercept_] - y)[:, None] * Z
    np.testing.assert_allclose(I, G @ np.linalg.solve(H, G.T), rtol=1e-7, atol=1e-10)


def test_errors_name_the_argument(logistic):
    model, train, test = logistic
    with pytest.raises(ValueError, match="inversion_method: 'svd'"):
        compute_influences(model, train, test, inversion_method="svd")
    with pytest.raises(ValueError, match="influence_type: 'down'"):
        compute_influences(model, train, test, influence_type="down")
    with pytest.raises(TypeError, match="hessian_regularization"):
        compute_influence_factors(model, train, test, hessian_perturbation=0.1)
    with pytest.raises(ValueError, match="training_data: pass an"):
        compute_influences(model, 5, test)
    with pytest.raises(ValueError, match=r"influence_factors: expected shape \(n_test, 31\)"):
        compute_influences_up(model, train, np.zeros((3, 7)))
