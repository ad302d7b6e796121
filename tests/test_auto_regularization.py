"""regularization="auto": positive definite where a fixed value is not, equal to its
documented rule computed independently, 0 for an sklearn objective, and a plain
sklearn parameter (validated, cloned, pickled)."""

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import LogitMLP, small_mlp_data
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.utils._param_validation import InvalidParameterError
from torch.func import functional_call

from skinfluence import (
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    DirectInfluenceScorer,
    GradientSimilarityScorer,
    MislabelDetector,
)
from skinfluence._linalg import auto_regularization
from skinfluence.solvers import DirectSolver, NotPositiveDefiniteError
from skinfluence.solvers import _base as solvers_base

RHO = 0.1  # the documented rho of a network


@pytest.fixture(scope="module")
def mlp():
    return small_mlp_data()


def exact_hessian(model, X, y):
    """The Hessian of the mean cross-entropy in the model's parameters, by autograd."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)

    def loss(theta):
        params, o = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            params[n] = theta[o : o + k].reshape(s)
            o += k
        return F.cross_entropy(functional_call(model, params, (Xt,)), yt)

    return torch.autograd.functional.hessian(loss, flat)


def documented_rule(lowest, highest, rho):
    """max(rho * lambda_max, 1.5 max(0, -lambda_min) + 1e-6 max(lambda_max, 1)), the
    second term rounded up to one significant digit; 0 when rho is 0 and lambda_min
    is above that floor."""
    floor = 1e-6 * max(highest, 1.0)
    if rho == 0 and lowest > floor:
        return 0.0
    need = 1.5 * max(-lowest, 0.0) + floor
    scale = 10.0 ** math.floor(math.log10(need))
    return max(rho * highest, math.ceil(need / scale) * scale)


def test_auto_is_the_default():
    assert DirectInfluenceScorer().get_params()["regularization"] == "auto"
    assert CgInfluenceScorer().get_params()["regularization"] == "auto"


def test_auto_is_positive_definite_where_a_fixed_value_is_not(mlp):
    model, X, y, Xte, yte = mlp
    with pytest.raises(NotPositiveDefiniteError, match="regularization"):
        DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=1e-3).fit(X, y)
    auto = DirectInfluenceScorer(model, loss=F.cross_entropy).fit(X, y)
    assert auto.regularization_ > 1e-3
    I = auto.influences(Xte, yte)
    assert np.isfinite(I).all()
    # the iterative method finds the same value (51 parameters: Lanczos is exact) and
    # its solves succeed
    cg = CgInfluenceScorer(model, loss=F.cross_entropy, rtol=1e-10).fit(X, y)
    assert cg.regularization_ == pytest.approx(auto.regularization_)
    np.testing.assert_allclose(cg.influences(Xte, yte), I, rtol=1e-5, atol=1e-7 * np.abs(I).max())


def test_auto_equals_the_documented_rule(mlp):
    model, X, y, _, _ = mlp
    e = torch.linalg.eigvalsh(exact_hessian(model, X, y))
    lowest, highest = float(e[0]), float(e[-1])
    assert lowest < 0  # a non-convex case
    scorer = DirectInfluenceScorer(model, loss=F.cross_entropy).fit(X, y)
    assert scorer.regularization_ == pytest.approx(documented_rule(lowest, highest, RHO), rel=1e-9)
    # where rho is small, the safety term decides
    assert documented_rule(lowest, highest, 1e-3) > 1e-3 * highest
    assert auto_regularization(lowest, highest, 1e-3) == pytest.approx(
        documented_rule(lowest, highest, 1e-3), rel=1e-12)
    assert isinstance(scorer.regularization_, float)
    assert scorer.operator_.regularization == scorer.regularization_
    assert scorer.solver_.regularization_ == scorer.regularization_


def test_direct_above_the_exact_spectrum_bound_uses_lanczos_on_its_matrix(mlp, monkeypatch):
    """Past EXACT_SPECTRUM_MAX parameters Direct estimates the ends by Lanczos on the
    dense matrix (exact here: 51 parameters, 128 steps), not a full eigendecomposition."""
    from skinfluence.solvers import direct

    model, X, y, _, _ = mlp
    exact = DirectInfluenceScorer(model, loss=F.cross_entropy).fit(X, y).regularization_
    calls = []
    eigvalsh = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda A: calls.append(A.shape) or eigvalsh(A))
    monkeypatch.setattr(direct, "EXACT_SPECTRUM_MAX", 10)
    estimated = DirectInfluenceScorer(model, loss=F.cross_entropy).fit(X, y).regularization_
    assert not calls
    assert estimated == pytest.approx(exact, rel=1e-9)


def test_auto_for_gauss_newton_is_rho_times_the_top_eigenvalue(mlp):
    model, X, y, _, _ = mlp
    ref = DirectInfluenceScorer(model, loss=F.cross_entropy, hessian="gauss-newton",
                                regularization=1.0).fit(X, y)
    L = ref.solver_.cholesky_
    top = float(torch.linalg.eigvalsh(L @ L.T)[-1]) - 1.0
    for cls in (DirectInfluenceScorer, CgInfluenceScorer):
        s = cls(model, loss=F.cross_entropy, hessian="gauss-newton").fit(X, y)
        assert s.regularization_ == pytest.approx(RHO * top, rel=1e-6)


def test_auto_on_logistic_regression_is_the_objective(cancer):
    """0: the model's own penalty makes its objective's Hessian positive definite, and
    the influences are those of that Hessian, computed here by hand."""
    X, y, Xte, yte = cancer
    C = 0.5
    model = LogisticRegression(C=C, tol=1e-12, max_iter=10000).fit(X, y)
    scorer = DirectInfluenceScorer(model, dtype="float64").fit(X, y)
    assert scorer.regularization_ == 0.0
    n = len(y)
    Xb = np.c_[X, np.ones(n)]
    Xbte = np.c_[Xte, np.ones(len(yte))]
    w = np.r_[model.coef_.ravel(), model.intercept_]
    p = 1 / (1 + np.exp(-Xb @ w))
    pen = np.r_[np.full(X.shape[1], 1 / (C * n)), 0.0]  # ||w||^2 / (2 C) over n points
    H = (Xb * (p * (1 - p))[:, None]).T @ Xb / n + np.diag(pen)
    G = Xb * (p - y)[:, None]
    pte = 1 / (1 + np.exp(-Xbte @ w))
    Gte = Xbte * (pte - yte)[:, None]
    expected = Gte @ np.linalg.solve(H, G.T)
    np.testing.assert_allclose(scorer.influences(Xte, yte), expected, rtol=1e-6,
                               atol=1e-9 * np.abs(expected).max())
    for cls in (CgInfluenceScorer, GradientSimilarityScorer):
        assert cls(model).fit(X, y).regularization_ == 0.0


def test_auto_damps_a_partial_rank_even_for_an_sklearn_model(cancer):
    """The complement of a rank-5 approximation is inverted as 1 / lambda: it needs
    lambda > 0, and auto gives it rho * lambda_max."""
    X, y, _, _ = cancer
    model = LogisticRegression().fit(X, y)
    s = ArnoldiInfluenceScorer(model, rank=5, random_state=0).fit(X, y)
    top = float(s.eigenvalues_.max())
    assert s.regularization_ == pytest.approx(RHO * top, rel=1e-6)


def test_auto_lifts_a_singular_linear_regression():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    X = np.c_[X, X[:, 0]]  # a repeated column: X^T X is singular
    y = X @ np.array([1.0, -1.0, 0.5, 0.0]) + 0.1 * rng.normal(size=50)
    model = LinearRegression().fit(X, y)
    with pytest.raises(NotPositiveDefiniteError):
        DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(X, y)
    s = DirectInfluenceScorer(model, dtype="float64").fit(X, y)
    Xb = np.c_[X, np.ones(50)]
    e = np.linalg.eigvalsh(2 * Xb.T @ Xb / 50)  # Hessian of the mean squared error
    assert e[0] < 1e-10
    assert s.regularization_ == pytest.approx(documented_rule(e[0], e[-1], 0.0))
    assert 0 < s.regularization_ < 1e-4 * e[-1]
    assert np.isfinite(s.influences(X[:5], y[:5])).all()


def test_a_float_is_used_as_it_is(mlp):
    model, X, y, Xte, yte = mlp
    s = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.05).fit(X, y)
    assert s.regularization_ == 0.05
    assert s.get_params()["regularization"] == 0.05
    # the same matrix as the explicit inverse of H + 0.05 I
    H = exact_hessian(model, X, y) + 0.05 * torch.eye(s.n_params_, dtype=torch.float64)
    Fa = s.solver_.factors(torch.as_tensor(Xte[:3]), torch.as_tensor(yte[:3]))  # A^-1 g
    np.testing.assert_allclose((Fa @ H).numpy(), _grads(s, Xte[:3], yte[:3]), rtol=1e-8, atol=1e-12)


def _grads(s, X, y):
    from skinfluence._gradients import per_sample_grads

    return per_sample_grads(s.adapter_, torch.as_tensor(X), torch.as_tensor(y)).numpy()


def test_auto_clones_and_pickles(mlp):
    model, X, y, Xte, yte = mlp
    s = DirectInfluenceScorer(model, loss=F.cross_entropy)
    assert clone(s).get_params()["regularization"] == "auto"
    s.fit(X, y)
    back = pickle.loads(pickle.dumps(s))
    assert back.regularization == "auto"
    assert back.regularization_ == s.regularization_
    np.testing.assert_array_equal(back.influences(Xte, yte), s.influences(Xte, yte))
    c = clone(s)
    assert not hasattr(c, "regularization_")
    assert c.fit(X, y).regularization_ == s.regularization_


@pytest.mark.parametrize("bad", ["bogus", -1.0])
def test_regularization_is_validated(mlp, bad):
    model, X, y, Xte, yte = mlp
    with pytest.raises(InvalidParameterError, match="regularization"):
        DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=bad).fit(X, y)
    s = DirectInfluenceScorer(model, loss=F.cross_entropy).fit(X, y)
    s.set_params(regularization=bad)
    with pytest.raises(InvalidParameterError, match="regularization"):
        s.influences(Xte, yte)


def test_detector_falls_back_to_gauss_newton_with_auto(mlp, monkeypatch):
    """Where auto's estimate misses negative curvature (here: told the smallest
    eigenvalue is 0, with a weak rho), the exact Hessian fails; the detector scores with the
    Gauss-Newton matrix and auto instead, and says so."""
    from skorch import NeuralNetClassifier

    _, X, y, _, _ = mlp
    X = X.astype(np.float32)
    torch.manual_seed(0)
    net = NeuralNetClassifier(
        LogitMLP, module__d_in=4, module__d_h=6, module__d_out=3, max_epochs=200, lr=0.05,
        optimizer=torch.optim.Adam, criterion=torch.nn.CrossEntropyLoss, batch_size=-1,
        train_split=None, verbose=0,
    ).fit(X, y)
    real = DirectSolver.spectrum

    def missed(self, operator, progress=None):
        _, top = real(self, operator, progress)
        return 0.0, top

    monkeypatch.setattr(DirectSolver, "spectrum", missed)
    monkeypatch.setattr(solvers_base, "AUTO_RELATIVE_DAMPING", 1e-3)  # a weak damping
    with pytest.raises(NotPositiveDefiniteError):  # what the detector meets
        DirectInfluenceScorer(net).fit(X, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = MislabelDetector(net, scorer=DirectInfluenceScorer(), strategy="self",
                               prefit=True).fit(X, y)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert any("hessian='gauss-newton' and regularization='auto'" in m for m in messages)
    ref = DirectInfluenceScorer(net, hessian="gauss-newton").fit(X, y)
    np.testing.assert_allclose(det.scores_, ref.self_influence(), rtol=1e-5)
