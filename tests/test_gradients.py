"""Derivatives against closed forms and finite differences."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, Ridge

from skinfluence._adapters import build_adapter
from skinfluence._gradients import curvature_mv, mixed_projection, per_sample_grads
from skinfluence.solvers._dense import dense_curvature


def _bound(est, X, y, **kw):
    a = build_adapter(est, **kw)
    Xt = a.features(X)
    a.bind(Xt, len(X))
    return a, Xt, a.targets(y)


def _augment(X):
    return np.hstack([X, np.ones((len(X), 1))])


def test_logistic_regression_closed_form(cancer):
    Xtr, ytr, _, _ = cancer
    C = 0.3
    m = LogisticRegression(C=C, max_iter=5000).fit(Xtr, ytr)
    a, Xt, Yt = _bound(m, Xtr, ytr)
    Z = _augment(Xtr)
    w = np.concatenate([m.coef_.ravel(), m.intercept_])
    p = 1 / (1 + np.exp(-Z @ w))
    G_ref = (p - ytr)[:, None] * Z
    np.testing.assert_allclose(per_sample_grads(a, Xt, Yt).numpy(), G_ref, rtol=1e-6, atol=1e-12)
    n = len(ytr)
    H_ref = (Z * (p * (1 - p))[:, None]).T @ Z / n
    H_ref[:-1, :-1] += np.eye(Z.shape[1] - 1) / (C * n)
    for curvature in ("exact", "gauss-newton"):
        H = dense_curvature(a, Xt, Yt, curvature, batch_size=64) + a.penalty.dense(a.n_params, a.dtype, a.device)
        np.testing.assert_allclose(H.numpy(), H_ref, rtol=1e-6, atol=1e-12)


def test_ridge_closed_form(cancer):
    Xtr, _, _, _ = cancer
    X, y = Xtr[:, 1:], Xtr[:, 0]
    alpha = 2.0
    m = Ridge(alpha=alpha).fit(X, y)
    a, Xt, Yt = _bound(m, X, y)
    Z = _augment(X)
    r = Z @ np.concatenate([m.coef_, [m.intercept_]]) - y
    np.testing.assert_allclose(per_sample_grads(a, Xt, Yt).numpy(), 2 * r[:, None] * Z, rtol=1e-6, atol=1e-12)
    n = len(y)
    H_ref = 2 * Z.T @ Z / n
    H_ref[:-1, :-1] += 2 * alpha / n * np.eye(Z.shape[1] - 1)
    H = dense_curvature(a, Xt, Yt, "exact", batch_size=100) + a.penalty.dense(a.n_params, a.dtype, a.device)
    np.testing.assert_allclose(H.numpy(), H_ref, rtol=1e-6, atol=1e-12)


def test_hvp_matches_finite_differences_of_gradients(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    a, Xt, Yt = _bound(torch_mlp, Xtr, ytr, loss=F.cross_entropy)
    theta = a.flat_params()
    V = torch.randn(3, a.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def mean_grad(flat):
        return torch.func.grad(
            lambda f: torch.func.vmap(a.sample_loss, in_dims=(None, 0, 0))(a.unflatten(f), Xt, Yt).mean()
        )(flat)

    eps = 1e-5
    fd = torch.stack([(mean_grad(theta + eps * v) - mean_grad(theta - eps * v)) / (2 * eps) for v in V])
    hv = curvature_mv(a, Xt, Yt, V, "exact") / len(Xt)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)
    H = dense_curvature(a, Xt, Yt, "exact", batch_size=50, block=7)
    torch.testing.assert_close(V @ H, hv, rtol=1e-9, atol=1e-12)


def test_gauss_newton_against_jacobians(torch_mlp, wine):
    """GGN = mean_i J_i^T (d^2 l / d out^2) J_i, built from plain autograd Jacobians."""
    Xtr, ytr, _, _ = wine
    X, y = Xtr[:20], ytr[:20]
    a, Xt, Yt = _bound(torch_mlp, X, y, loss=F.cross_entropy)
    theta = a.flat_params()
    G = torch.zeros(a.n_params, a.n_params, dtype=torch.float64)
    for i in range(len(X)):
        J = torch.autograd.functional.jacobian(lambda f, x=Xt[i]: a.sample_output(a.unflatten(f), x)[0], theta)
        p = torch.softmax(a.sample_output(a.params, Xt[i])[0], -1)
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    G /= len(X)
    H = dense_curvature(a, Xt, Yt, "gauss-newton", batch_size=7, block=13)
    torch.testing.assert_close(H, G, rtol=1e-9, atol=1e-12)
    assert torch.linalg.eigvalsh(H)[0] > -1e-10  # positive semi-definite


def test_mixed_projection_matches_finite_differences(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    a, Xt, Yt = _bound(torch_mlp, Xtr[:4], ytr[:4], loss=F.cross_entropy)
    Fm = torch.randn(2, a.n_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    J = mixed_projection(a, Xt, Yt, Fm)  # (4, 2, 13)
    eps = 1e-6
    for j in range(4):
        for k in (0, 5, 12):
            e = torch.zeros_like(Xt[j])
            e[k] = eps
            gp = per_sample_grads(a, (Xt[j] + e)[None], Yt[j : j + 1])[0]
            gm = per_sample_grads(a, (Xt[j] - e)[None], Yt[j : j + 1])[0]
            fd = Fm @ (gp - gm) / (2 * eps)
            torch.testing.assert_close(J[j, :, k], fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sample_grads_batched_equals_one_by_one(torch_mlp, wine, dtype):
    Xtr, ytr, _, _ = wine
    a, Xt, Yt = _bound(torch_mlp, Xtr[:10], ytr[:10], loss=F.cross_entropy, dtype=dtype)
    whole = per_sample_grads(a, Xt, Yt)
    assert whole.dtype == dtype
    ones = torch.cat([per_sample_grads(a, Xt[i : i + 1], Yt[i : i + 1]) for i in range(10)])
    torch.testing.assert_close(whole, ones)
    np.testing.assert_equal(whole.shape, (10, a.n_params))


class _Reused(torch.nn.Module):
    """One Linear applied twice: the structured Hessian must not be used."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(13, 13)
        self.head = torch.nn.Linear(13, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def _models():
    torch.manual_seed(0)
    yield "mlp", torch.nn.Sequential(
        torch.nn.Linear(13, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5, bias=False), torch.nn.Sigmoid(), torch.nn.Linear(5, 3)
    ).double(), None
    yield "last layer only", torch.nn.Sequential(torch.nn.Linear(13, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double(), "2"
    yield "first layer only", torch.nn.Sequential(torch.nn.Linear(13, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double(), "0"
    yield "reused layer", _Reused().double(), None


@pytest.mark.parametrize("name, model, params", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_structured_hessian_equals_generic(wine, name, model, params):
    from skinfluence.solvers._dense import _linear_plan

    Xtr, ytr, _, _ = wine
    a, Xt, Yt = _bound(model, Xtr[:50], ytr[:50], loss=F.cross_entropy, params=params)
    assert (_linear_plan(a, Xt) is None) == (name == "reused layer")
    E = torch.eye(a.n_params, dtype=torch.float64)
    generic = curvature_mv(a, Xt, Yt, E, "exact") / len(Xt)
    for bs in (7, 50):
        torch.testing.assert_close(dense_curvature(a, Xt, Yt, "exact", batch_size=bs), 0.5 * (generic + generic.T), rtol=1e-9, atol=1e-12)


def test_structured_hessian_skorch_probabilities(skorch_net, wine):
    Xtr, ytr, _, _ = wine
    a, Xt, Yt = _bound(skorch_net, Xtr[:40].astype(np.float32), ytr[:40], dtype="float64")
    E = torch.eye(a.n_params, dtype=torch.float64)
    generic = curvature_mv(a, Xt, Yt, E, "exact") / len(Xt)
    torch.testing.assert_close(dense_curvature(a, Xt, Yt, "exact", batch_size=16), 0.5 * (generic + generic.T), rtol=1e-9, atol=1e-12)


def _gauss_newton_cases(skorch_net):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(13, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    yield "last layer of a network", mlp, {"loss": F.cross_entropy, "params": "2"}, True
    yield "whole network", mlp, {"loss": F.cross_entropy}, False
    yield "first layer", mlp, {"loss": F.cross_entropy, "params": "0"}, False
    soft = torch.nn.Sequential(torch.nn.Linear(13, 3), torch.nn.Softmax(-1)).double()
    yield "softmax after the layer", soft, {"loss": lambda p, y: F.nll_loss(torch.log(p), y)}, False
    yield "skorch probabilities", skorch_net, {"dtype": "float64", "params": "out"}, False
    lr = LogisticRegression(max_iter=500)
    yield "logistic regression", lr, {}, True


@pytest.mark.parametrize("case", range(6))
def test_gauss_newton_of_an_output_layer_is_its_hessian(skorch_net, wine, case):
    """Where the selected parameters are one Linear layer whose output is the model's
    output, the dense Gauss-Newton matrix is built by the structured Hessian; it must
    equal the generic Gauss-Newton products, and other models must keep those."""
    from skinfluence.solvers._dense import _linear_plan

    name, model, kw, structured = list(_gauss_newton_cases(skorch_net))[case]
    Xtr, ytr, _, _ = wine
    X = Xtr[:60].astype(np.float32) if name == "skorch probabilities" else Xtr[:60]
    if name == "logistic regression":
        model.fit(Xtr, ytr)
    a, Xt, Yt = _bound(model, X, ytr[:60], **kw)
    assert (_linear_plan(a, Xt, output_layer=True) is not None) == structured, name
    E = torch.eye(a.n_params, dtype=a.dtype)
    generic = curvature_mv(a, Xt, Yt, E, "gauss-newton") / len(Xt)
    for bs in (9, 60):
        torch.testing.assert_close(dense_curvature(a, Xt, Yt, "gauss-newton", batch_size=bs),
                                   0.5 * (generic + generic.T), rtol=1e-9, atol=1e-12)
