"""Model adapters: every supported model's per-sample loss and gradients are its own."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import LogitMLP, SoftmaxMLP
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from torch import nn

from skinfluence import DirectInfluenceScorer
from skinfluence._adapters import build_adapter
from skinfluence._gradients import per_sample_grads


def _adapter(est, X, y, **kw):
    a = build_adapter(est, **kw)
    Xt = a.features(X)
    a.bind(Xt, len(X))
    return a, Xt, a.targets(y)


def _losses(a, Xt, Yt):
    return torch.func.vmap(a.sample_loss, in_dims=(None, 0, 0))(a.params, Xt, Yt)


def _autograd_grads(module, loss_of_output, X, y):
    """Per-sample gradients by plain autograd, one sample at a time."""
    out = []
    for i in range(len(X)):
        module.zero_grad()
        loss_of_output(module(X[i : i + 1]), y[i : i + 1]).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]))
    return torch.stack(out)


def test_skorch_nll_on_probabilities_matches_get_loss(skorch_net, wine):
    Xtr, ytr, _, _ = wine
    X, y = Xtr[:40].astype(np.float32), ytr[:40]
    a, Xt, Yt = _adapter(skorch_net, X, y)
    ours = _losses(a, Xt, Yt)
    with torch.no_grad():
        theirs = skorch_net.get_loss(skorch_net.infer(torch.as_tensor(X)), torch.as_tensor(y))
    assert torch.allclose(ours.mean(), theirs, rtol=1e-5)
    ref = _autograd_grads(
        skorch_net.module_, lambda o, t: skorch_net.get_loss(o, t), torch.as_tensor(X[:5]), torch.as_tensor(y[:5])
    )
    assert torch.allclose(per_sample_grads(a, Xt[:5], Yt[:5]), ref, rtol=1e-4, atol=1e-6)


def test_skorch_cross_entropy_criterion(wine):
    from skorch import NeuralNetClassifier

    Xtr, ytr, _, _ = wine
    X = Xtr.astype(np.float32)
    net = NeuralNetClassifier(LogitMLP, criterion=nn.CrossEntropyLoss, max_epochs=5, train_split=None, verbose=0).fit(X, ytr)
    a, Xt, Yt = _adapter(net, X, ytr)
    with torch.no_grad():
        theirs = net.get_loss(net.infer(torch.as_tensor(X)), torch.as_tensor(ytr))
    assert torch.allclose(_losses(a, Xt, Yt).mean(), theirs, rtol=1e-5)


def test_skorch_binary_classifier(cancer):
    from skorch import NeuralNetBinaryClassifier

    Xtr, ytr, _, _ = cancer
    X, y = Xtr.astype(np.float32), ytr.astype(np.float32)
    net = NeuralNetBinaryClassifier(LogitMLP, module__d_in=30, module__d_out=1, max_epochs=5, train_split=None, verbose=0).fit(X, y)
    a, Xt, Yt = _adapter(net, X, y)
    with torch.no_grad():
        theirs = net.get_loss(net.infer(torch.as_tensor(X)), torch.as_tensor(y))
    assert torch.allclose(_losses(a, Xt, Yt).mean(), theirs, rtol=1e-5)
    scorer = DirectInfluenceScorer(net, hessian="gauss-newton", regularization=0.1).fit(X, y)
    assert np.isfinite(scorer.transform(X[:3], y[:3])).all()


def test_skorch_regressor(cancer):
    from skorch import NeuralNetRegressor

    Xtr, _, _, _ = cancer
    X, y = Xtr[:, 1:].astype(np.float32), Xtr[:, :1].astype(np.float32)
    net = NeuralNetRegressor(LogitMLP, module__d_in=29, module__d_out=1, max_epochs=5, train_split=None, verbose=0).fit(X, y)
    a, Xt, Yt = _adapter(net, X, y)
    with torch.no_grad():
        theirs = net.get_loss(net.infer(torch.as_tensor(X)), torch.as_tensor(y))
    assert torch.allclose(_losses(a, Xt, Yt).mean(), theirs, rtol=1e-5)
    with pytest.raises(ValueError, match="y: targets are required"):
        DirectInfluenceScorer(net, hessian="gauss-newton").fit(X, y).transform(X[:2])


def test_torch_module_with_loss(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    a, Xt, Yt = _adapter(torch_mlp, Xtr, ytr, loss=F.cross_entropy)
    with torch.no_grad():
        full = F.cross_entropy(torch_mlp(torch.as_tensor(Xtr)), torch.as_tensor(ytr))
    assert torch.allclose(_losses(a, Xt, Yt).mean(), full, rtol=1e-12)
    ref = _autograd_grads(torch_mlp, F.cross_entropy, torch.as_tensor(Xtr[:6]), torch.as_tensor(ytr[:6]))
    assert torch.allclose(per_sample_grads(a, Xt[:6], Yt[:6]), ref, rtol=1e-10, atol=1e-12)


def test_params_restricts_to_last_layer(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, params="out", regularization=0.01).fit(Xtr, ytr)
    assert s.n_params_ == 8 * 3 + 3
    # independent reference: the same model with earlier layers frozen by requires_grad
    import copy

    frozen = copy.deepcopy(torch_mlp)
    frozen.hidden.requires_grad_(False)
    ref = DirectInfluenceScorer(frozen, loss=F.cross_entropy, regularization=0.01).fit(Xtr, ytr)
    np.testing.assert_allclose(s.transform(Xte, yte), ref.transform(Xte, yte), rtol=1e-10)
    with pytest.raises(ValueError, match="params: 'nope' matches no parameter"):
        DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, params=["nope"]).fit(Xtr, ytr)


@pytest.mark.parametrize("multiclass", [False, True])
def test_logistic_regression_objective_gradient_vanishes(cancer, wine, multiclass):
    """The folded penalty is right iff the objective's gradient is zero at sklearn's optimum."""
    Xtr, ytr, _, _ = wine if multiclass else cancer
    m = LogisticRegression(C=0.5, tol=1e-12, max_iter=10000).fit(Xtr, ytr)
    a, Xt, Yt = _adapter(m, Xtr, ytr)
    g = per_sample_grads(a, Xt, Yt).mean(0) + a.penalty.mv(a.flat_params()[None])[0]
    assert g.abs().max() < 1e-7


def test_ridge_objective_gradient_vanishes(cancer):
    Xtr, _, _, _ = cancer
    X, y = Xtr[:, 1:], Xtr[:, 0]
    for m in (Ridge(alpha=5.0).fit(X, y), LinearRegression().fit(X, y)):
        a, Xt, Yt = _adapter(m, X, y)
        g = per_sample_grads(a, Xt, Yt).mean(0) + a.penalty.mv(a.flat_params()[None])[0]
        assert g.abs().max() < 1e-10


def test_string_labels_are_mapped(wine):
    Xtr, ytr, Xte, yte = wine
    names = np.array(["a", "b", "c"])
    m = LogisticRegression(max_iter=1000).fit(Xtr, names[ytr])
    m_int = LogisticRegression(max_iter=1000).fit(Xtr, ytr)
    I_str = DirectInfluenceScorer(m, regularization=0.0).fit(Xtr, names[ytr]).transform(Xte, names[yte])
    I_int = DirectInfluenceScorer(m_int, regularization=0.0).fit(Xtr, ytr).transform(Xte, yte)
    np.testing.assert_allclose(I_str, I_int, rtol=1e-6, atol=1e-10)


def test_l1_logistic_regression_is_refused(cancer):
    Xtr, ytr, _, _ = cancer
    m = LogisticRegression(l1_ratio=1.0, solver="saga", max_iter=200).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="L1 penalty"):
        DirectInfluenceScorer(m).fit(Xtr, ytr)


def test_unsupported_estimator():
    from sklearn.tree import DecisionTreeClassifier

    with pytest.raises(TypeError, match="DecisionTreeClassifier is not supported"):
        DirectInfluenceScorer(DecisionTreeClassifier()).fit([[0.0], [1.0]], [0, 1])


def test_model_mode_and_parameters_untouched(wine):
    Xtr, ytr, Xte, yte = wine
    model = SoftmaxMLP().double()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = lambda out, t: F.nll_loss(torch.log(out), t)  # noqa: E731
    DirectInfluenceScorer(model, loss=loss, hessian="gauss-newton").fit(Xtr, ytr).transform(Xte, yte)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    DirectInfluenceScorer(model, loss=loss, hessian="gauss-newton").fit(Xtr, ytr).self_influence()
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dropout_is_off_during_computation(wine):
    Xtr, ytr, Xte, yte = wine
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    s = DirectInfluenceScorer(model, loss=F.cross_entropy, hessian="gauss-newton").fit(Xtr, ytr)
    np.testing.assert_array_equal(s.transform(Xte, yte), s.transform(Xte, yte))
    assert model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_matches_cpu(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    cpu = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy).fit(Xtr, ytr).transform(Xte, yte)
    gpu = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, device="cuda").fit(Xtr, ytr).transform(Xte, yte)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-8)
