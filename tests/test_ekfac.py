"""EkfacInfluenceScorer against independent references: factors computed by hand,
the dense Gauss-Newton matrix projected on the Kronecker eigenbasis, the exact
Direct method where K-FAC is exact, and invariances (batch size, per-layer sums,
self-influence on the diagonal)."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import SoftmaxMLP, train
from scipy.stats import pearsonr
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LinearRegression, LogisticRegression
from torch import nn

from skinfluence import DirectInfluenceScorer, EkfacInfluenceScorer
from skinfluence._gradients import per_sample_grads
from skinfluence.solvers._dense import dense_curvature

# conv3 pads an even kernel 'same' on purpose (asymmetric padding)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def _ekfac(model, **kw):
    kw.setdefault("loss", F.cross_entropy)
    kw.setdefault("regularization", 0.05)
    return EkfacInfluenceScorer(model, **kw)


def _basis_diagonal(scorer, C):
    """diag(Q^T C Q) for each layer's Kronecker eigenbasis Q = Q_S (x) Q_A, from a
    dense p x p matrix C in the adapter's flat layout."""
    sol = scorer.solver_
    out = {}
    for lay in sol.layers_:
        qs, qa = sol.basis64_[lay.name]
        mats = torch.einsum("ok,il->kloi", qs, qa).reshape(-1, lay.d_out, lay.d_in)
        zeros = {
            other.name: torch.zeros(mats.shape[0], other.d_out, other.d_in, dtype=mats.dtype)
            for other in sol.layers_
        }
        flat = sol.from_layers({**zeros, lay.name: mats})
        out[lay.name] = ((flat @ C.to(flat.dtype)) * flat).sum(1).reshape(lay.d_out, lay.d_in)
    return out


class SmallCNN(nn.Module):
    """Two convolutions (one strided, one with 'same' padding) and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(4, 2, 2, padding="same", dilation=1)
        self.head = nn.Linear(2 * 4 * 4, 10)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = torch.tanh(self.conv3(x))
        return self.head(x.flatten(1))


@pytest.fixture(scope="module")
def digits_cnn():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).reshape(-1, 1, 8, 8)
    Xtr, ytr, Xte, yte = X[:150], y[:150], X[150:170], y[150:170]
    torch.manual_seed(0)
    model = SmallCNN().double()
    train(model, torch.as_tensor(Xtr), torch.as_tensor(ytr), F.cross_entropy, epochs=150, lr=0.02, wd=1e-3)
    return model, Xtr, ytr, Xte, yte


# --------------------------------------------------------------------------- factors


@pytest.mark.parametrize("fisher", ["empirical", "gauss-newton"])
def test_factors_equal_covariances_computed_by_hand(torch_mlp, wine, fisher):
    """A = E[a a^T] with a 1 for the bias; S = E[g g^T] of the pre-activation
    gradients, written out for out = W2 tanh(W1 x + b1) + b2 and cross-entropy."""
    Xtr, ytr, _, _ = wine
    s = _ekfac(torch_mlp, fisher=fisher, batch_size=17).fit(Xtr, ytr)
    X, y = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    W1, b1 = torch_mlp.hidden.weight.detach(), torch_mlp.hidden.bias.detach()
    W2, b2 = torch_mlp.out.weight.detach(), torch_mlp.out.bias.detach()
    h = torch.tanh(X @ W1.T + b1)
    p = torch.softmax(h @ W2.T + b2, -1)
    ones = torch.ones(len(X), 1, dtype=X.dtype)
    a_hidden, a_out = torch.cat([X, ones], 1), torch.cat([h, ones], 1)
    D = 1 - h**2  # tanh'
    if fisher == "empirical":
        g_out = p - F.one_hot(y, 3).to(p.dtype)
        g_hidden = (g_out @ W2) * D
        S_out, S_hidden = g_out.T @ g_out / len(X), g_hidden.T @ g_hidden / len(X)
    else:
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # CE Hessian in the logits
        S_out = H.mean(0)
        J = W2[None] * D[:, None, :]  # d logits / d hidden pre-activation, per sample
        S_hidden = torch.einsum("bki,bkl,blj->ij", J, H, J) / len(X)
    n = len(X)
    expected = {
        "hidden": (a_hidden.T @ a_hidden / n, S_hidden),
        "out": (a_out.T @ a_out / n, S_out),
    }
    for name, (A, S) in expected.items():
        A_fit, S_fit = s.solver_.factors_[name]
        torch.testing.assert_close(A_fit, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(S_fit, S, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fisher", ["empirical", "gauss-newton"])
def test_ekfac_eigenvalues_are_the_curvature_diagonal_in_the_kronecker_basis(torch_mlp, wine, fisher):
    """EK-FAC's corrected eigenvalues equal diag(Q^T C Q), with C the dense Gauss-Newton
    matrix (torch.func products) or the empirical Fisher from per-sample gradients."""
    Xtr, ytr, _, _ = wine
    s = _ekfac(torch_mlp, fisher=fisher).fit(Xtr, ytr)
    a = s.adapter_
    if fisher == "gauss-newton":
        C = dense_curvature(a, s.X_train_, s.y_train_, "gauss-newton", 64)
    else:
        G = per_sample_grads(a, s.X_train_, s.y_train_)
        C = G.T @ G / len(G)
    for name, d in _basis_diagonal(s, C).items():
        torch.testing.assert_close(s.solver_.eigenvalues_[name], d, rtol=1e-9, atol=1e-12)


def _layer_block(scorer, C, lay):
    """The block of a dense p x p matrix for one layer, as a 4-tensor (o, i, o', i')
    in the layer's [W, b] layout."""
    sol = scorer.solver_
    p = C.shape[0]
    idx = sol.to_layer(torch.arange(p, dtype=torch.float64)[None], lay)[0].long().reshape(-1)
    return C[idx[:, None], idx[None]].reshape(lay.d_out, lay.d_in, lay.d_out, lay.d_in)


def _nearest_kronecker(block):
    """Van Loan & Pitsianis: the leading singular pair of the block rearranged so that
    each row is one (o, o') sub-block, i.e. the nearest S (x) A in Frobenius norm."""
    d_out, d_in = block.shape[0], block.shape[1]
    R = block.permute(0, 2, 1, 3).reshape(d_out * d_out, d_in * d_in)
    U, _, Vh = torch.linalg.svd(R)
    S, A = U[:, 0].reshape(d_out, d_out), Vh[0].reshape(d_in, d_in)
    return S * torch.sign(S.trace()), A * torch.sign(A.trace())


def test_basis_converges_to_that_of_the_nearest_kronecker_product(torch_mlp, wine):
    """With many alternating updates, each layer's eigenbasis diagonalises both factors
    of the nearest Kronecker product of its exact Gauss-Newton block, computed
    independently by a singular value decomposition; with none it is K-FAC's."""
    Xtr, ytr, _, _ = wine
    s = _ekfac(torch_mlp, basis_iter=60).fit(Xtr, ytr)
    C = dense_curvature(s.adapter_, s.X_train_, s.y_train_, "gauss-newton", 64)
    for lay in s.solver_.layers_:
        S, A = _nearest_kronecker(_layer_block(s, C, lay))
        qs, qa = s.solver_.basis64_[lay.name]
        for Q, M in ((qs, S), (qa, A)):
            D = Q.T @ M @ Q
            off = D - torch.diag(torch.diagonal(D))
            assert float(off.norm()) < 1e-7 * float(M.norm()), lay.name
    k = _ekfac(torch_mlp, basis_iter=0).fit(Xtr, ytr)
    for lay in k.solver_.layers_:
        Af, Sf = k.solver_.factors_[lay.name]
        qs, qa = k.solver_.basis64_[lay.name]
        for Q, M in ((qs, Sf), (qa, Af)):
            D = Q.T @ M @ Q
            assert float((D - torch.diag(torch.diagonal(D))).norm()) < 1e-9 * float(M.norm())


def test_refined_basis_brings_ekfac_closer_to_the_curvature(torch_mlp, wine):
    """In an orthonormal basis the refitted eigenvalues are the projection of the block
    on matrices diagonal there, so the approximation error is
    ||C||^2 - ||diag(Q^T C Q)||^2: the refined basis must capture more of the exact
    Gauss-Newton block than K-FAC's, in every layer, and the corrected eigenvalues
    stay exact in it."""
    Xtr, ytr, _, _ = wine
    fits = {it: _ekfac(torch_mlp, basis_iter=it).fit(Xtr, ytr) for it in (0, 2)}
    C = dense_curvature(fits[0].adapter_, fits[0].X_train_, fits[0].y_train_, "gauss-newton", 64)
    captured = {it: _basis_diagonal(s, C) for it, s in fits.items()}
    for lay in fits[0].solver_.layers_:
        total = float(_layer_block(fits[0], C, lay).norm() ** 2)
        err = {it: total - float((captured[it][lay.name] ** 2).sum()) for it in fits}
        assert err[2] < err[0], (lay.name, err)
        torch.testing.assert_close(fits[2].solver_.eigenvalues_[lay.name], captured[2][lay.name],
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher", ["gauss-newton", "true"])
def test_passes_without_the_activation_cache_give_the_same_result(torch_mlp, wine, fisher, monkeypatch):
    """Where activations are too many to keep, every pass recomputes them (with the
    same sampled labels for the "true" Fisher); the result must not change."""
    from skinfluence.solvers.ekfac import _factors as ekfac

    Xtr, ytr, Xte, yte = wine
    kw = {"fisher": fisher, "basis_iter": 2, "random_state": 0, "batch_size": 23}
    cached = _ekfac(torch_mlp, **kw).fit(Xtr, ytr).influences(Xte, yte)
    monkeypatch.setattr(ekfac, "CACHE_ELEMENTS", 0)
    recomputed = _ekfac(torch_mlp, **kw).fit(Xtr, ytr).influences(Xte, yte)
    np.testing.assert_allclose(recomputed, cached, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("value", [-1, 1.5, "2"])
def test_basis_iter_must_be_a_non_negative_integer(torch_mlp, wine, value):
    from sklearn.utils._param_validation import InvalidParameterError

    Xtr, ytr, _, _ = wine
    with pytest.raises(InvalidParameterError, match="'basis_iter' parameter of EkfacInfluenceScorer"):
        _ekfac(torch_mlp, basis_iter=value).fit(Xtr, ytr)


def test_basis_iter_is_ignored_by_kfac(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    a = _ekfac(torch_mlp, update_diagonal=False, basis_iter=0).fit(Xtr, ytr).influences(Xte, yte)
    b = _ekfac(torch_mlp, update_diagonal=False, basis_iter=3).fit(Xtr, ytr).influences(Xte, yte)
    np.testing.assert_array_equal(a, b)


def test_conv_layers_follow_the_same_identity(digits_cnn):
    """The unfolded-patch layout of Conv2d (stride, padding, 'same', no bias) is right:
    EK-FAC eigenvalues equal diag(Q^T GGN Q) for every layer of a CNN."""
    model, Xtr, ytr, _, _ = digits_cnn
    s = _ekfac(model, batch_size=64).fit(Xtr[:60], ytr[:60])
    C = dense_curvature(s.adapter_, s.X_train_, s.y_train_, "gauss-newton", 64)
    diag = _basis_diagonal(s, C)
    assert set(diag) == {"conv1", "conv2", "conv3", "head"}
    for name, d in diag.items():
        torch.testing.assert_close(s.solver_.eigenvalues_[name], d, rtol=1e-9, atol=1e-12)


def test_kfac_eigenvalues_are_products_of_factor_eigenvalues(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    s = _ekfac(torch_mlp, update_diagonal=False).fit(Xtr, ytr)
    for name, (A, S) in s.solver_.factors_.items():
        la, ls = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(S)
        torch.testing.assert_close(
            s.solver_.eigenvalues_[name], torch.outer(ls, la).clamp_min(0), rtol=1e-9, atol=1e-12
        )


def test_conv_factors_follow_kfc(digits_cnn):
    """KFC: A averages the unfolded patches over positions, S sums g g^T over positions."""
    model, Xtr, ytr, _, _ = digits_cnn
    s = _ekfac(model, fisher="empirical", layers=["conv1"]).fit(Xtr[:40], ytr[:40])
    X, y = torch.as_tensor(Xtr[:40]), torch.as_tensor(ytr[:40])
    patches = F.unfold(X, 3, padding=1).transpose(1, 2)  # (n, 64 positions, 9)
    a = torch.cat([patches, torch.ones(40, 64, 1, dtype=X.dtype)], -1).reshape(-1, 10)
    z1 = F.conv2d(X, model.conv1.weight.detach(), model.conv1.bias.detach(), padding=1)
    z1.requires_grad_(True)
    x = torch.tanh(model.conv3(torch.tanh(model.conv2(torch.tanh(z1)))))
    loss = F.cross_entropy(model.head(x.flatten(1)), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, z1)  # (n, 3, 8, 8)
    g = g.permute(0, 2, 3, 1).reshape(-1, 3)
    A_fit, S_fit = s.solver_.factors_["conv1"]
    torch.testing.assert_close(A_fit, a.T @ a / a.shape[0])
    torch.testing.assert_close(S_fit, g.T @ g / 40)


# --------------------------------------------------------------------------- exactness


def _regression_data(d_out=3, n=60, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    Y = X @ rng.standard_normal((5, d_out)) + 0.3 * rng.standard_normal((n, d_out))
    return X, Y


@pytest.mark.parametrize("update_diagonal", [True, False])
@pytest.mark.parametrize("regularization", [0.01, 0.0])
def test_single_linear_layer_with_mse_equals_exact_gauss_newton(update_diagonal, regularization):
    """With MSE the loss's Hessian in the output is (2/d) I whatever the sample, so the
    Gauss-Newton matrix of one linear layer is exactly (2/d) I (x) E[a a^T]: K-FAC's
    factors with the exact expectation (fisher="gauss-newton") reproduce it, and the
    eigenvalue correction changes nothing. (The sampled "true" Fisher matches it only
    in expectation, the empirical one weights samples by their squared residuals.)"""
    X, Y = _regression_data()
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    kw = {"loss": F.mse_loss, "regularization": regularization}
    ek = EkfacInfluenceScorer(model, fisher="gauss-newton", update_diagonal=update_diagonal, **kw)
    ek.fit(X[:40], Y[:40])
    di = DirectInfluenceScorer(model, hessian="gauss-newton", **kw).fit(X[:40], Y[:40])
    I_ek, I_di = ek.influences(X[40:], Y[40:]), di.influences(X[40:], Y[40:])
    scale = np.abs(I_di).max()
    np.testing.assert_allclose(I_ek, I_di, atol=1e-6 * scale, rtol=0)
    np.testing.assert_allclose(ek.self_influence(), di.self_influence(), atol=1e-6 * scale, rtol=0)
    np.testing.assert_allclose(
        ek.influence_factors(X[40:], Y[40:]), di.influence_factors(X[40:], Y[40:]), rtol=1e-6, atol=1e-10
    )


def test_sklearn_linear_regression_equals_exact_gauss_newton():
    X, Y = _regression_data(d_out=1)
    y = Y[:, 0]
    model = LinearRegression().fit(X[:40], y[:40])
    ek = EkfacInfluenceScorer(model, regularization=0.01).fit(X[:40], y[:40])
    di = DirectInfluenceScorer(model, regularization=0.01).fit(X[:40], y[:40])  # exact = GN here
    I_di = di.influences(X[40:], y[40:])
    np.testing.assert_allclose(ek.influences(X[40:], y[40:]), I_di, atol=1e-6 * np.abs(I_di).max())
    assert ek.layers_ == [""]


def test_perturbation_mode_uses_the_same_inverse():
    """Perturbation mode goes through the flat solve: exact in the exact case."""
    X, Y = _regression_data()
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    kw = {"loss": F.mse_loss, "regularization": 0.01, "mode": "perturbation"}
    ek = EkfacInfluenceScorer(model, **kw).fit(X[:30], Y[:30])
    di = DirectInfluenceScorer(model, hessian="gauss-newton", **kw).fit(X[:30], Y[:30])
    P_ek, P_di = ek.influences(X[40:45], Y[40:45]), di.influences(X[40:45], Y[40:45])
    assert P_ek.shape == (5, 30, 5)
    np.testing.assert_allclose(P_ek, P_di, atol=1e-6 * np.abs(P_di).max())
    np.testing.assert_allclose(ek.self_influence(), di.self_influence(), atol=1e-6 * np.abs(P_di).max())
    with pytest.raises(ValueError, match="mode"):
        ek.influences_by_layer(X[40:45], Y[40:45])


def test_penalty_is_its_diagonal_in_the_kronecker_basis(cancer):
    """An sklearn model's own L2 penalty (diagonal plus the rank-one term on the
    multinomial intercepts) enters as its exact diagonal in the eigenbasis."""
    Xtr, ytr, _, _ = cancer
    rng = np.random.default_rng(0)
    y3 = np.where(rng.random(len(ytr)) < 0.2, 2, ytr)  # three classes: multinomial
    model = LogisticRegression(C=0.5, max_iter=500).fit(Xtr, y3)
    s = EkfacInfluenceScorer(model, regularization=0.0).fit(Xtr, y3)
    P = s.adapter_.penalty.dense(s.n_params_, torch.float64, "cpu")
    for name, d in _basis_diagonal(s, P).items():
        torch.testing.assert_close(s.solver_.penalty_[name], d, rtol=1e-9, atol=1e-14)
    assert np.isfinite(s.transform(Xtr[:5], y3[:5])).all()


# --------------------------------------------------------------------------- invariances


@pytest.fixture(scope="module")
def fitted_mlp(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    return _ekfac(torch_mlp).fit(Xtr, ytr)


def test_per_layer_influences_sum_to_the_total(fitted_mlp, wine):
    _, _, Xte, yte = wine
    by_layer = fitted_mlp.influences_by_layer(Xte, yte)
    assert list(by_layer) == ["hidden", "out"]
    np.testing.assert_allclose(sum(by_layer.values()), fitted_mlp.influences(Xte, yte), rtol=1e-10, atol=1e-12)


def test_self_influence_is_the_diagonal(fitted_mlp, wine, digits_cnn):
    Xtr, ytr, _, _ = wine
    np.testing.assert_allclose(
        fitted_mlp.self_influence(), np.diag(fitted_mlp.influences(Xtr, ytr)), rtol=1e-10
    )
    model, Xc, yc, _, _ = digits_cnn  # several positions per sample
    s = _ekfac(model).fit(Xc[:50], yc[:50])
    np.testing.assert_allclose(s.self_influence(), np.diag(s.fit_transform(Xc[:50], yc[:50])), rtol=1e-9)


def test_factors_times_training_gradients_are_the_influences(fitted_mlp, wine):
    """The contraction path agrees with flat factors . per-sample gradients."""
    _, _, Xte, yte = wine
    Fq = fitted_mlp.influence_factors(Xte, yte)
    G = per_sample_grads(fitted_mlp.adapter_, fitted_mlp.X_train_, fitted_mlp.y_train_).numpy()
    np.testing.assert_allclose(Fq @ G.T, fitted_mlp.influences(Xte, yte), rtol=1e-9, atol=1e-12)
    Gte = per_sample_grads(fitted_mlp.adapter_, *fitted_mlp._data(Xte, yte, "X", "y")).numpy()
    flat = fitted_mlp.solver_.solve(torch.as_tensor(Gte)).numpy()
    np.testing.assert_allclose(Fq, flat, rtol=1e-10, atol=1e-12)


def test_wide_layers_contract_the_other_way():
    """Layers with more outputs than inputs are contracted over their outputs first;
    the result is the same factors . gradients product, for Linear and Conv2d."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 2)).double()
    cnn = nn.Sequential(nn.Conv2d(1, 12, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12 * 9, 2)).double()
    for model, X in ((mlp, rng.standard_normal((30, 3))), (cnn, rng.standard_normal((30, 1, 4, 4)))):
        y = rng.integers(0, 2, 30)
        s = _ekfac(model, batch_size=8).fit(X[:20], y[:20])
        Fq = s.influence_factors(X[20:], y[20:])
        G = per_sample_grads(s.adapter_, s.X_train_, s.y_train_).numpy()
        np.testing.assert_allclose(s.influences(X[20:], y[20:]), Fq @ G.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher", ["gauss-newton", "true", "empirical"])
def test_batch_size_does_not_change_results(torch_mlp, wine, fisher):
    Xtr, ytr, Xte, yte = wine
    a = _ekfac(torch_mlp, fisher=fisher, batch_size=256, random_state=3).fit(Xtr, ytr)
    b = _ekfac(torch_mlp, fisher=fisher, batch_size=7, random_state=3).fit(Xtr, ytr)
    np.testing.assert_allclose(a.influences(Xte, yte), b.influences(Xte, yte), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.self_influence(), b.self_influence(), rtol=1e-9)


def test_close_to_direct_on_a_small_mlp(fitted_mlp, torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    di = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05).fit(Xtr, ytr)
    r = pearsonr(fitted_mlp.influences(Xte, yte).ravel(), di.influences(Xte, yte).ravel())[0]
    assert r > 0.9


# --------------------------------------------------------------------------- true Fisher


def test_true_fisher_samples_the_predictive_distribution(torch_mlp, wine):
    """Sampled labels give the Gauss-Newton factors in expectation: over 200 copies of
    the data, within Monte-Carlo error; for logits (cross-entropy) and for a skorch
    net outputting probabilities (NLL), whose Fisher in the logits is the same."""
    from skorch import NeuralNetClassifier

    Xtr, ytr, _, _ = wine
    Xr, yr = np.tile(Xtr, (200, 1)), np.tile(ytr, 200)
    gn = _ekfac(torch_mlp, fisher="gauss-newton").fit(Xtr, ytr).solver_.factors_
    true = _ekfac(torch_mlp, fisher="true", random_state=0).fit(Xr, yr).solver_.factors_
    net = NeuralNetClassifier(SoftmaxMLP, train_split=None, verbose=0).initialize()
    net.module_.double().load_state_dict(torch_mlp.state_dict())  # same weights, softmax inside
    net.history.new_epoch()  # weights loaded from a trained model: it has been trained
    probs = EkfacInfluenceScorer(net, fisher="true", random_state=0).fit(Xr, yr)
    assert probs.solver_.sampler_.probs
    for name in gn:
        S = gn[name][1]
        for S_true in (true[name][1], probs.solver_.factors_[name][1]):
            assert float(torch.linalg.norm(S_true - S) / torch.linalg.norm(S)) < 0.05


def test_skorch_probabilities_use_the_categorical_sampler(skorch_net, wine):
    Xtr, ytr, Xte, yte = wine
    X = Xtr.astype(np.float32)
    s = EkfacInfluenceScorer(skorch_net, fisher="true", random_state=0, regularization=0.1).fit(X, ytr)
    assert s.solver_.sampler_.kind == "categorical" and s.solver_.sampler_.probs
    assert np.isfinite(s.transform(Xte.astype(np.float32), yte)).all()


@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_true_fisher_for_binary_and_gaussian_losses(kind):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 4))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2 if kind == "mse" else 1)).double()
    if kind == "bce":
        y, loss = (X[:, 0] > 0).astype(float), F.binary_cross_entropy_with_logits
    else:
        y, loss = X[:, :2] + 0.1 * rng.standard_normal((30, 2)), F.mse_loss
    Xr, yr = np.tile(X, (100, 1)), np.tile(y, (100,) + (1,) * (y.ndim - 1))
    gn = _ekfac(model, loss=loss, fisher="gauss-newton").fit(X, y).solver_.factors_
    true = _ekfac(model, loss=loss, fisher="true", random_state=1).fit(Xr, yr).solver_.factors_
    for name in gn:
        S, S_true = gn[name][1], true[name][1]
        assert float(torch.linalg.norm(S_true - S) / torch.linalg.norm(S)) < 0.05


def test_random_state(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    one = _ekfac(torch_mlp, fisher="true", random_state=0).fit(Xtr, ytr).influences(Xte, yte)
    same = _ekfac(torch_mlp, fisher="true", random_state=0).fit(Xtr, ytr).influences(Xte, yte)
    other = _ekfac(torch_mlp, fisher="true", random_state=1).fit(Xtr, ytr).influences(Xte, yte)
    np.testing.assert_array_equal(one, same)
    assert not np.allclose(one, other)


def test_true_fisher_needs_a_known_distribution(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    with pytest.raises(ValueError, match="fisher='gauss-newton'"):
        _ekfac(torch_mlp, loss=nn.CrossEntropyLoss(label_smoothing=0.1), fisher="true").fit(Xtr, ytr)
    s = _ekfac(torch_mlp, loss=nn.CrossEntropyLoss(label_smoothing=0.1)).fit(Xtr, ytr)
    assert np.isfinite(s.self_influence()).all()  # the Hessian path takes any loss


# --------------------------------------------------------------------------- layers


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(13, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.hidden(x))))


def test_unsupported_layers_are_listed_unless_left_out(wine):
    Xtr, ytr, _, _ = wine
    model = WithNorm().double()
    with pytest.raises(ValueError, match=r"norm \(LayerNorm\).*layers=\['hidden', 'out'\]"):
        _ekfac(model).fit(Xtr, ytr)
    s = _ekfac(model, layers=["hidden", "out"]).fit(Xtr, ytr)
    assert s.n_params_ == 13 * 6 + 6 + 6 * 3 + 3
    assert s.adapter_.param_names == ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    # the same as asking Direct for these parameters only, in the exact case
    d = DirectInfluenceScorer(model, loss=F.cross_entropy, params=["hidden", "out"], hessian="gauss-newton")
    assert d.fit(Xtr, ytr).n_params_ == s.n_params_
    assert _ekfac(model, params="out").fit(Xtr, ytr).layers_ == ["out"]


@pytest.mark.parametrize(
    ("layers", "params", "match"),
    [
        ("norm", None, "not supported"),
        ("missing", None, "not a submodule"),
        (["hidden"], "out", "no parameter among those selected"),
    ],
)
def test_layer_errors(wine, layers, params, match):
    Xtr, ytr, _, _ = wine
    with pytest.raises(ValueError, match=match):
        _ekfac(WithNorm().double(), layers=layers, params=params).fit(Xtr, ytr)


def test_grouped_convolutions_are_refused():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 2)).double()
    X = np.random.default_rng(0).standard_normal((6, 2, 3, 3))
    with pytest.raises(ValueError, match="groups=2"):
        _ekfac(model).fit(X, np.arange(6) % 2)


def test_partially_selected_layer(torch_mlp, wine):
    """Only a layer's bias selected: its gradient matrix is the output gradients."""
    Xtr, ytr, Xte, yte = wine
    s = _ekfac(torch_mlp, params=["hidden.bias", "out"]).fit(Xtr, ytr)
    assert s.n_params_ == 8 + 8 * 3 + 3
    G = per_sample_grads(s.adapter_, s.X_train_, s.y_train_).numpy()
    np.testing.assert_allclose(s.influence_factors(Xte, yte) @ G.T, s.influences(Xte, yte), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- model safety


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(13, 8)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.hidden(x))))


def test_the_model_is_left_untouched(wine):
    Xtr, ytr, Xte, yte = wine
    torch.manual_seed(0)
    model = WithDropout().double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = _ekfac(model).fit(Xtr, ytr)
    first = s.influences(Xte, yte)
    np.testing.assert_array_equal(first, s.influences(Xte, yte))  # eval mode: no dropout
    s.self_influence()
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_hooks_are_removed_when_the_forward_fails(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    with pytest.raises(ValueError):
        _ekfac(torch_mlp).fit(Xtr[:, :5], ytr)
    assert all(not m._forward_hooks for m in torch_mlp.modules())


def test_cnn_on_digit_images_end_to_end(digits_cnn):
    """Conv2d + Linear on 8x8 images: per-layer sums, and agreement with the exact
    Gauss-Newton inverse."""
    model, Xtr, ytr, Xte, yte = digits_cnn
    s = _ekfac(model, regularization=0.1).fit(Xtr, ytr)
    by_layer = s.influences_by_layer(Xte, yte)
    total = s.influences(Xte, yte)
    assert total.shape == (20, 150)
    np.testing.assert_allclose(sum(by_layer.values()), total, rtol=1e-9, atol=1e-12)
    di = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.1, hessian="gauss-newton")
    ref = di.fit(Xtr, ytr).influences(Xte, yte)
    assert pearsonr(total.ravel(), ref.ravel())[0] > 0.9


# --------------------------------------------------------------------------- sklearn


def test_sklearn_api(fitted_mlp, torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    s = _ekfac(torch_mlp, fisher="nonsense", layers=["hidden"])
    assert s.get_params()["fisher"] == "nonsense" and not [k for k in vars(s) if k.endswith("_")]
    with pytest.raises(ValueError, match="fisher"):
        s.fit(Xtr, ytr)
    with pytest.raises(NotFittedError):
        _ekfac(torch_mlp).influences_by_layer(Xte, yte)
    c = clone(fitted_mlp)
    assert c.estimator is torch_mlp and not hasattr(c, "solver_")
    np.testing.assert_allclose(c.fit(Xtr, ytr).transform(Xte, yte), fitted_mlp.transform(Xte, yte))
    again = pickle.loads(pickle.dumps(fitted_mlp))
    np.testing.assert_allclose(again.influences(Xte, yte), fitted_mlp.influences(Xte, yte))
    with pytest.raises(ValueError, match="0 sample"):
        fitted_mlp.influences(Xte[:0], yte[:0])


def test_progress_bars(torch_mlp, wine, capsys):
    Xtr, ytr, Xte, yte = wine
    s = _ekfac(torch_mlp, progress=True, batch_size=50).fit(Xtr, ytr)
    quiet = _ekfac(torch_mlp, batch_size=50).fit(Xtr, ytr)
    np.testing.assert_array_equal(s.influences(Xte, yte), quiet.influences(Xte, yte))
    assert "EK-FAC eigenvalues" in capsys.readouterr().err


def test_float32_model_gives_float32_results(skorch_net, wine):
    Xtr, ytr, Xte, yte = wine
    s = EkfacInfluenceScorer(skorch_net, regularization=0.1).fit(Xtr.astype(np.float32), ytr)
    assert s.transform(Xte.astype(np.float32), yte).dtype == np.float32
    s64 = EkfacInfluenceScorer(skorch_net, regularization=0.1, dtype="float64").fit(Xtr, ytr)
    np.testing.assert_allclose(
        s.transform(Xte.astype(np.float32), yte), s64.transform(Xte, yte), rtol=2e-3, atol=1e-4
    )


def test_binary_logistic_regression(cancer):
    Xtr, ytr, Xte, yte = cancer
    model = LogisticRegression(max_iter=1000).fit(Xtr, ytr)
    s = EkfacInfluenceScorer(model, regularization=0.0).fit(Xtr, ytr)
    di = DirectInfluenceScorer(model, regularization=0.0).fit(Xtr, ytr)
    # one layer, one output: EK-FAC takes E[p (1 - p) a a^T] as diagonal in the
    # eigenbasis of E[a a^T], a rough approximation
    r = pearsonr(s.transform(Xte, yte).ravel(), di.transform(Xte, yte).ravel())[0]
    assert r > 0.85


def test_subnormal_flushing_is_left_off_afterwards(torch_mlp, wine):
    """Fit and influences run with subnormal floats flushed to zero (a CPU speed-up);
    the mode must not leak out to the caller's arithmetic."""
    Xtr, ytr, Xte, yte = wine
    _ekfac(torch_mlp).fit(Xtr, ytr).influences(Xte, yte)
    tiny = torch.tensor([1e-20], dtype=torch.float32) * torch.tensor([1e-20], dtype=torch.float32)
    assert float(tiny[0]) > 0  # 1e-40 is subnormal in float32


# --------------------------------------------------------------------------- precision
def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def precision_cases(torch_mlp, wine, digits_cnn):
    """Per model (the MLP's rank-one layers, the CNN's convolutions): the float64
    scorer and its influences and self-influences."""
    out = {}
    for case, (model, Xtr, ytr, Xte, yte) in {"mlp": (torch_mlp, *wine), "cnn": digits_cnn}.items():
        s = _ekfac(model).fit(Xtr, ytr)
        out[case] = (model, Xtr, ytr, Xte, yte, s.influences(Xte, yte), s.self_influence(Xtr[:40], ytr[:40]))
    return out


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_kronecker_dtype_float32_agrees_with_float64_to_1e5(precision_cases, case):
    model, Xtr, ytr, Xte, yte, I64, self64 = precision_cases[case]
    s = _ekfac(model, kronecker_dtype="float32").fit(Xtr, ytr)
    I = s.influences(Xte, yte)
    assert I.dtype == np.float64  # results in the working dtype
    assert s.solver_.kronecker_basis_[s.layers_[0]][1].dtype == torch.float32
    # float32 rounding shows (a knob that did nothing would give ~1e-15) but stays small
    assert 1e-10 < _rel(I, I64) < 1e-5
    assert _rel(s.self_influence(Xtr[:40], ytr[:40]), self64) < 1e-5


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_kronecker_dtype_bfloat16_stays_within_its_documented_bound(precision_cases, case):
    """The bound the parameter's docstring gives: Pearson 0.9999, relative error 1e-2."""
    model, Xtr, ytr, Xte, yte, I64, self64 = precision_cases[case]
    s = _ekfac(model, kronecker_dtype="bfloat16").fit(Xtr, ytr)
    I = s.influences(Xte, yte)
    assert I.dtype == np.float64
    err = _rel(I, I64)
    assert 1e-4 < err < 2e-2, err  # bfloat16's 8 bits show, within the bound
    assert pearsonr(I.ravel(), I64.ravel())[0] > 0.9999
    assert _rel(s.self_influence(Xtr[:40], ytr[:40]), self64) < 2e-2
    by_layer = s.influences_by_layer(Xte, yte)
    np.testing.assert_allclose(sum(by_layer.values()), I, rtol=1e-6, atol=1e-9 * np.abs(I).max())


def test_kronecker_dtype_is_validated(torch_mlp, wine):
    from skinfluence._adapters import build_adapter
    from skinfluence.solvers import CurvatureOperator, EkfacSolver

    Xtr, ytr, _, _ = wine
    with pytest.raises(ValueError, match="kronecker_dtype"):
        _ekfac(torch_mlp, kronecker_dtype="float16").fit(Xtr, ytr)
    a = build_adapter(torch_mlp, loss=F.cross_entropy)
    X, y = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    a.bind(X, len(y))
    op = CurvatureOperator(a, X, y, "gauss-newton", regularization=0.1, batch_size=50)
    with pytest.raises(ValueError, match="kronecker_dtype: expected None or one of"):
        EkfacSolver(kronecker_dtype="half").fit(op)


def test_kronecker_dtype_survives_clone_and_pickle(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    s = _ekfac(torch_mlp, kronecker_dtype="bfloat16")
    assert clone(s).get_params()["kronecker_dtype"] == "bfloat16"
    s.fit(Xtr, ytr)
    again = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(again.influences(Xte, yte), s.influences(Xte, yte))


def test_bfloat16_keeps_twice_as_many_activations_between_passes(torch_mlp, wine, monkeypatch):
    """A 16-bit kronecker_dtype keeps twice as many numbers in the same memory: with
    a cache too small for the float32 data but not for half of it, float32
    recomputes the layer data in each of the six passes and bfloat16 computes it once."""
    from skinfluence.solvers.ekfac import _factors

    Xtr, ytr, _, _ = wine
    sizes, real = [], _factors.layer_data

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        sizes.append(sum(act.numel() + g.numel() for act, g in out.values()))
        return out

    monkeypatch.setattr(_factors, "layer_data", counting)
    kw = {"fisher": "gauss-newton", "basis_iter": 2, "batch_size": 40}
    _ekfac(torch_mlp, **kw).fit(Xtr, ytr)
    assert len(sizes) == 3  # cached: one computation per batch
    monkeypatch.setattr(_factors, "CACHE_ELEMENTS", 3 * sum(sizes) // 4)
    for kronecker_dtype, computations in [("float32", 18), ("bfloat16", 3)]:
        sizes.clear()
        _ekfac(torch_mlp, kronecker_dtype=kronecker_dtype, **kw).fit(Xtr, ytr)
        assert len(sizes) == computations, kronecker_dtype
