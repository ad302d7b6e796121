"""sklearn behaviour of the scorers and their errors on bad input."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.utils._param_validation import InvalidParameterError

from skinfluence import DirectInfluenceScorer


@pytest.fixture
def fitted(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    return DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05).fit(Xtr, ytr)


def test_init_only_stores_arguments(torch_mlp):
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.3, mode="nonsense")
    assert s.get_params(deep=False)["mode"] == "nonsense"  # validated in fit, not here
    assert s.estimator is torch_mlp
    assert not [k for k in vars(s) if k.endswith("_")]


def test_get_set_params(torch_mlp):
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy)
    s.set_params(regularization=0.5, batch_size=3)
    assert s.get_params()["regularization"] == 0.5 and s.batch_size == 3


def test_not_fitted_error(torch_mlp, wine):
    _, _, Xte, yte = wine
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy)
    for call in (lambda: s.transform(Xte, yte), lambda: s.self_influence(), lambda: s.influence_factors(Xte, yte)):
        with pytest.raises(NotFittedError):
            call()


def test_clone_keeps_a_fitted_skorch_net(skorch_net, wine):
    Xtr, ytr, Xte, yte = wine
    X, Xt = Xtr.astype(np.float32), Xte.astype(np.float32)
    s = DirectInfluenceScorer(skorch_net, regularization=0.5)
    c = clone(s)
    assert c.estimator is skorch_net and c.estimator.initialized_
    np.testing.assert_allclose(c.fit(X, ytr).transform(Xt, yte), s.fit(X, ytr).transform(Xt, yte))
    assert not hasattr(clone(s.fit(X, ytr)), "solver_")


def test_pickle_round_trip(fitted, wine):
    _, _, Xte, yte = wine
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_allclose(again.transform(Xte, yte), fitted.transform(Xte, yte))


def test_pickle_skorch_scorer(skorch_net, wine):
    Xtr, ytr, Xte, yte = wine
    s = DirectInfluenceScorer(skorch_net, regularization=0.5).fit(Xtr.astype(np.float32), ytr)
    again = pickle.loads(pickle.dumps(s))
    np.testing.assert_allclose(again.transform(Xte.astype(np.float32), yte), s.transform(Xte.astype(np.float32), yte))


def test_inputs_are_not_mutated(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    copies = [a.copy() for a in (Xtr, ytr, Xte, yte)]
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05, mode="perturbation")
    s.fit(Xtr, ytr).transform(Xte, yte)
    s.self_influence()
    for a, b in zip((Xtr, ytr, Xte, yte), copies, strict=True):
        np.testing.assert_array_equal(a, b)


def test_result_is_numpy_on_cpu_in_model_dtype(fitted, wine):
    _, _, Xte, yte = wine
    I = fitted.transform(Xte, yte)
    assert isinstance(I, np.ndarray) and I.dtype == np.float64
    assert fitted.n_train_ == 120 and fitted.n_features_in_ == 13
    np.testing.assert_array_equal(fitted.classes_, [0, 1, 2])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input(torch_mlp, wine, bad):
    Xtr, ytr, Xte, yte = wine
    Xbad = Xtr.copy()
    Xbad[3, 2] = bad
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05)
    with pytest.raises(ValueError, match="Input X contains"):
        s.fit(Xbad, ytr)
    s.fit(Xtr, ytr)
    with pytest.raises(ValueError, match="Input X_test contains"):
        s.transform(np.where(np.arange(Xte.size).reshape(Xte.shape) == 0, bad, Xte), yte)
    ybad = ytr.astype(float)
    ybad[0] = bad
    with pytest.raises(ValueError, match="Input y contains"):
        s.fit(Xtr, ybad)


def test_length_mismatch(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05)
    with pytest.raises(ValueError, match="y has 119 samples but X has 120"):
        s.fit(Xtr, ytr[:-1])
    s.fit(Xtr, ytr)
    with pytest.raises(ValueError, match="y_test has 3 samples but X_test has"):
        s.influences(Xte, yte[:3])


def test_wrong_number_of_features(torch_mlp, wine):
    Xtr, ytr, Xte, yte = wine
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05)
    with pytest.raises(ValueError, match="X: the model could not be evaluated"):
        s.fit(Xtr[:, :5], ytr)
    s.fit(Xtr, ytr)
    with pytest.raises(ValueError, match=r"X_test has samples of shape .5,. .5 features"):
        s.transform(Xte[:, :5], yte)


def test_unseen_labels(torch_mlp, wine, cancer):
    Xtr, ytr, Xte, yte = wine
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, regularization=0.05)
    with pytest.raises(ValueError, match=r"y contains labels the model was never trained on: \[7\]"):
        s.fit(Xtr, np.where(ytr == 2, 7, ytr))
    s.fit(Xtr, ytr)
    with pytest.raises(ValueError, match="y_test contains labels the model was never trained on"):
        s.transform(Xte, yte + 5)
    Xc, yc, _, _ = cancer
    m = LogisticRegression().fit(Xc, yc)
    with pytest.raises(ValueError, match="never trained on"):
        DirectInfluenceScorer(m).fit(Xc, yc + 1)


def test_unfitted_estimators(wine):
    from _models import SoftmaxMLP
    from skorch import NeuralNetClassifier

    Xtr, ytr, _, _ = wine
    with pytest.raises(NotFittedError, match=r"estimator: this NeuralNetClassifier is not fitted"):
        DirectInfluenceScorer(NeuralNetClassifier(SoftmaxMLP)).fit(Xtr, ytr)
    with pytest.raises(NotFittedError, match="estimator: this LogisticRegression is not fitted"):
        DirectInfluenceScorer(LogisticRegression()).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="estimator: pass a fitted model"):
        DirectInfluenceScorer().fit(Xtr, ytr)


def test_torch_module_needs_a_loss(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    with pytest.raises(ValueError, match=r"loss: a torch nn.Module needs loss="):
        DirectInfluenceScorer(torch_mlp).fit(Xtr, ytr)


@pytest.mark.parametrize(
    "param, value",
    [("mode", "sideways"), ("hessian", "approximate"), ("regularization", -1.0), ("batch_size", 0)],
)
def test_invalid_parameters(torch_mlp, wine, param, value):
    Xtr, ytr, _, _ = wine
    s = DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy).set_params(**{param: value})
    with pytest.raises(InvalidParameterError, match=f"The '{param}' parameter of DirectInfluenceScorer"):
        s.fit(Xtr, ytr)


def test_unknown_dtype(torch_mlp, wine):
    Xtr, ytr, _, _ = wine
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        DirectInfluenceScorer(torch_mlp, loss=F.cross_entropy, dtype="int8").fit(Xtr, ytr)


def test_progress_bar(fitted, wine, capsys):
    _, _, Xte, yte = wine
    p = clone(fitted).set_params(progress=True)
    np.testing.assert_allclose(p.fit(*wine[:2]).transform(Xte, yte), fitted.transform(Xte, yte))
    assert "influences" in capsys.readouterr().err


def test_empty_test_set(fitted, wine):
    _, _, Xte, yte = wine
    with pytest.raises(ValueError, match="0 sample"):
        fitted.transform(Xte[:0], yte[:0])


def test_image_inputs_for_a_cnn():
    """n-d inputs work, and perturbation mode returns image-shaped derivatives."""
    torch.manual_seed(0)
    X = torch.randn(20, 1, 6, 6, dtype=torch.float64).numpy()
    y = np.arange(20) % 3
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(32, 3)
    ).double()
    s = DirectInfluenceScorer(model, loss=F.cross_entropy, hessian="gauss-newton", regularization=0.1, mode="perturbation")
    P = s.fit(X, y).transform(X[:2], y[:2])
    assert P.shape == (2, 20, 1, 6, 6)
    up = DirectInfluenceScorer(model, loss=F.cross_entropy, hessian="gauss-newton", regularization=0.1).fit(X, y)
    Xp, Xm = X[:1].copy(), X[:1].copy()
    Xp[0, 0, 2, 3] += 1e-6
    Xm[0, 0, 2, 3] -= 1e-6
    fd = (up.influences(X[:2], y[:2], Xp, y[:1]) - up.influences(X[:2], y[:2], Xm, y[:1]))[:, 0] / 2e-6
    np.testing.assert_allclose(P[:, 0, 0, 2, 3], fd, rtol=1e-5, atol=1e-9)
