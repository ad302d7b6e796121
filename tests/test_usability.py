"""What a new user trips on: each mistake gets an error that names the argument and
says what to do, never a raw torch or numpy message, and nothing the user passed is
changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, Ridge
from torch import nn

from skinfluence import CgInfluenceScorer, DirectInfluenceScorer, MislabelDetector
from skinfluence.functional import compute_influences, compute_influences_up


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4))
    y = (X[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(torch.tensor(X)), torch.tensor(y)).backward()
        opt.step()
    return model, X, y


def direct(model, **kw):
    return DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.1, **kw)


def test_fit_without_y_says_y_is_required(mlp):
    model, X, _ = mlp
    with pytest.raises(ValueError, match="requires y to be passed"):
        direct(model).fit(X, None)


def test_a_loss_class_instead_of_a_loss(mlp):
    model, X, y = mlp
    s = DirectInfluenceScorer(model, loss=nn.CrossEntropyLoss, regularization=0.1)
    with pytest.raises(ValueError, match=r"loss: got the class CrossEntropyLoss; .*CrossEntropyLoss\(\)"):
        s.fit(X, y)


def test_tensors_that_require_grad_are_accepted(mlp):
    model, X, y = mlp
    Xt = torch.tensor(X, requires_grad=True)
    I = direct(model).fit(Xt, torch.tensor(y)).influences(Xt[:3], torch.tensor(y[:3]))
    np.testing.assert_allclose(I, direct(model).fit(X, y).influences(X[:3], y[:3]))
    assert Xt.requires_grad and Xt.grad is None


def test_negative_strides_are_accepted(mlp):
    model, X, y = mlp
    rev = X[::-1]
    np.testing.assert_allclose(
        direct(model).fit(rev, y[::-1]).self_influence(),
        direct(model).fit(X, y).self_influence()[::-1],
    )


def test_editing_the_training_array_afterwards_changes_nothing(mlp):
    model, X, y = mlp
    X = X.copy()
    s = direct(model).fit(X, y)
    before = s.self_influence()
    X[:] = 0.0
    np.testing.assert_array_equal(s.self_influence(), before)


def test_training_points_need_their_labels(mlp):
    model, X, y = mlp
    s = direct(model).fit(X, y)
    with pytest.raises(ValueError, match="y: the training points X need their labels"):
        s.influences(X[:3], y[:3], X)


def test_an_initialized_but_untrained_skorch_net_is_not_fitted(mlp):
    from skorch import NeuralNetClassifier

    _, X, y = mlp
    net = NeuralNetClassifier(nn.Linear, module__in_features=4, module__out_features=2,
                              criterion=nn.CrossEntropyLoss, train_split=None).initialize()
    with pytest.raises(NotFittedError, match=r"never trained|no training history"):
        DirectInfluenceScorer(net).fit(X.astype(np.float32), y)


def test_skorch_internal_validation_split_is_flagged(mlp):
    from skorch import NeuralNetClassifier

    _, X, y = mlp
    net = NeuralNetClassifier(nn.Linear, module__in_features=4, module__out_features=2,
                              criterion=nn.CrossEntropyLoss, max_epochs=2, verbose=0)
    net.fit(X.astype(np.float32), y)  # skorch's default train_split holds out 20%
    with pytest.warns(UserWarning, match="train_split"):
        DirectInfluenceScorer(net, regularization=0.1).fit(X.astype(np.float32), y)


def test_image_shapes_are_not_called_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    X = np.random.default_rng(0).normal(size=(12, 1, 6, 6))
    s = DirectInfluenceScorer(model, loss=F.cross_entropy, hessian="gauss-newton", regularization=0.1)
    s.fit(X, np.arange(12) % 3)
    with pytest.raises(ValueError, match=r"samples of shape \(2, 6, 6\), but .* \(1, 6, 6\)\.$") as err:
        s.influences(np.zeros((2, 2, 6, 6)), [0, 1])
    assert "features" not in str(err.value)


def test_three_d_inputs_for_a_tabular_model(mlp):
    model, X, y = mlp
    with pytest.raises(ValueError, match="X: for one sample of shape"):
        direct(model).fit(np.repeat(X[:, None, :], 3, 1), y)


def test_targets_that_do_not_fit_the_model():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    reg = Ridge().fit(X, X[:, 0])
    with pytest.raises(ValueError, match="y has 2 target column"):
        DirectInfluenceScorer(reg).fit(X, X[:, :2])
    with pytest.raises(ValueError, match="targets must be numbers"):
        DirectInfluenceScorer(reg).fit(X, np.array(["a"] * 30))
    with pytest.raises(ValueError, match="y is a scalar"):
        DirectInfluenceScorer(reg).fit(X, 3.0)


def test_a_column_of_labels_is_one_label_per_sample(mlp):
    model, X, y = mlp
    np.testing.assert_allclose(
        direct(model).fit(X, y[:, None]).self_influence(), direct(model).fit(X, y).self_influence()
    )
    with pytest.raises(ValueError, match="one class label per sample"):
        direct(model).fit(X, np.c_[y, y])


def test_parameters_changed_after_fit_are_validated(mlp):
    from sklearn.utils._param_validation import InvalidParameterError

    model, X, y = mlp
    s = direct(model).fit(X, y)
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter"):
        s.set_params(batch_size=-1).influences(X[:2], y[:2])
    with pytest.raises(InvalidParameterError, match="'mode' parameter"):
        s.set_params(batch_size=8, mode="bogus").self_influence()


def test_overflowing_inputs_are_an_error_not_nan(mlp):
    _, X, y = mlp
    torch.manual_seed(0)
    model = nn.Linear(4, 2)  # float32: gradients of 1e30 inputs overflow the curvature
    for cls in (CgInfluenceScorer, DirectInfluenceScorer):
        s = cls(model, loss=F.cross_entropy, regularization=0.1)
        with pytest.raises(ValueError, match="not finite"):
            s.fit(X * 1e30, y).influences(X[:2] * 1e30, y[:2])


@pytest.mark.parametrize("kw, match", [
    ({"device": "cuda"}, "device: 'cuda' asks for CUDA") if not torch.cuda.is_available()
    else ({"dtype": "bfloat16"}, "dtype='bfloat16' is not supported"),
    ({"params": []}, "params: an empty list"),
    ({"dtype": "float16"}, "dtype='float16' is not supported"),
])
def test_settings_that_cannot_work_fail_early(mlp, kw, match):
    model, X, y = mlp
    with pytest.raises(ValueError, match=match):
        direct(model, **kw).fit(X, y)


def test_a_regressor_is_refused_by_the_detector():
    X = np.random.default_rng(0).normal(size=(30, 3))
    with pytest.raises(ValueError, match="estimator: Ridge is not a classifier"):
        MislabelDetector(Ridge()).fit(X, (X[:, 0] > 0).astype(int))


def test_the_default_scorer_can_be_tuned_in_a_grid():
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X[:100])
    det = MislabelDetector(LogisticRegression(), strategy="loo")
    det.set_params(scorer__regularization=0.5)
    assert det.scorer.regularization == 0.5 and det.scorer.params == "last-layer"
    assert det.fit(X, y[:100]).scores_.shape == (100,)


def test_functional_influence_type_ignores_case(mlp):
    model, X, y = mlp
    up = compute_influences(model, (X, y), (X[:3], y[:3]), loss=F.cross_entropy,
                            hessian_regularization=0.1, influence_type="Up")
    assert up.shape == (3, 40)


def test_functional_arguments_are_validated(mlp):
    model, X, y = mlp
    with pytest.raises(ValueError, match="batch_size: must be a positive integer"):
        compute_influences_up(model, (X, y), np.zeros((2, 37)), loss=F.cross_entropy, batch_size=-1)
    with pytest.raises(ValueError, match="influence_factors: contains NaN"):
        compute_influences_up(model, (X, y), np.full((2, 37), np.nan), loss=F.cross_entropy)


def test_exact_hessian_of_a_conv1d_model(monkeypatch):
    """Direct's exact Hessian of a Conv1d network equals CG's products, also through
    the reverse-mode rows used when forward-mode derivatives fail under vmap."""
    from skinfluence.solvers import _dense

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(5, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 2)).double()
    X = np.random.default_rng(0).normal(size=(20, 5, 4))
    y = np.arange(20) % 2
    kw = {"loss": F.cross_entropy, "regularization": 2.0}
    ref = CgInfluenceScorer(model, rtol=1e-12, **kw).fit(X, y).influences(X[:3], y[:3])
    np.testing.assert_allclose(DirectInfluenceScorer(model, **kw).fit(X, y).influences(X[:3], y[:3]),
                               ref, rtol=1e-8, atol=1e-12)

    def fails(*args):
        raise RuntimeError("Trying to set a forward gradient that has a different size")

    monkeypatch.setattr(_dense, "_forward_rows", fails)
    np.testing.assert_allclose(DirectInfluenceScorer(model, **kw).fit(X, y).influences(X[:3], y[:3]),
                               ref, rtol=1e-8, atol=1e-12)


def test_linear_layer_whose_weight_was_replaced():
    """The structured Hessian reads a Linear layer's sizes from its weight."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4).double()
    lin.weight = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    lin.bias = nn.Parameter(torch.randn(5, dtype=torch.float64))
    X = np.random.default_rng(1).normal(size=(30, 3))
    y = np.arange(30) % 5
    kw = {"loss": F.cross_entropy, "regularization": 0.5}
    ref = CgInfluenceScorer(lin, rtol=1e-12, **kw).fit(X, y).influences(X[:3], y[:3])
    np.testing.assert_allclose(DirectInfluenceScorer(lin, **kw).fit(X, y).influences(X[:3], y[:3]),
                               ref, rtol=1e-8, atol=1e-12)


def test_arnoldi_finds_every_copy_of_a_repeated_eigenvalue():
    """rank pairs of largest magnitude, also when the top eigenvalue is repeated
    (a block Krylov space started from few vectors sees few of its copies)."""
    from test_contract import DenseOperator

    from skinfluence.solvers import ArnoldiSolver

    rng = np.random.default_rng(0)
    p = 120
    e = np.r_[np.full(30, 5.0), np.linspace(0.1, 2.0, p - 30)]
    Q = np.linalg.qr(rng.normal(size=(p, p)))[0]
    M = torch.tensor(Q @ np.diag(e) @ Q.T)
    solver = ArnoldiSolver(rank=10, random_state=0).fit(DenseOperator(M, 0.1))
    np.testing.assert_allclose(solver.eigenvalues_.numpy(), np.full(10, 5.0), rtol=1e-3)


def test_arnoldi_returns_rank_pairs_on_a_kronecker_spectrum():
    """One Linear layer with MSE: 17 distinct eigenvalues, each 30 times."""
    from skinfluence import ArnoldiInfluenceScorer

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 16))
    Y = X @ rng.normal(size=(16, 30)) + 0.1 * rng.normal(size=(200, 30))
    torch.manual_seed(0)
    model = nn.Linear(16, 30).double()
    s = ArnoldiInfluenceScorer(model, loss=F.mse_loss, rank=200, regularization=0.1,
                               random_state=0).fit(X, Y)
    assert s.eigenvalues_.shape == (200,)


def test_models_that_look_up_integer_inputs():
    """Token ids stay integers for a model with an nn.Embedding; Direct and CG agree."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, ids):
            return self.out(self.emb(ids).mean(-2))

    torch.manual_seed(0)
    model = Bag().double()
    ids = np.random.default_rng(0).integers(0, 12, size=(40, 5))
    y = (ids[:, 0] > 5).astype(np.int64)
    kw = {"loss": F.cross_entropy, "regularization": 0.5}
    I = DirectInfluenceScorer(model, **kw).fit(ids, y).influences(ids[:3], y[:3])
    J = CgInfluenceScorer(model, rtol=1e-12, **kw).fit(ids, y).influences(ids[:3], y[:3])
    np.testing.assert_allclose(I, J, rtol=1e-8, atol=1e-12)


def test_models_torch_func_cannot_differentiate_per_sample():
    class Returns(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind
            self.lin = nn.Linear(4, 2)
            self.rnn = nn.LSTM(4, 2, batch_first=True)

        def forward(self, x):
            if self.kind == "dict":
                return {"logits": self.lin(x)}
            return self.rnn(x[:, None, :])[0][:, -1]

    X = np.random.default_rng(0).normal(size=(20, 4))
    y = np.arange(20) % 2
    with pytest.raises(ValueError, match="estimator: the model returns a dict"):
        DirectInfluenceScorer(Returns("dict").double(), loss=F.cross_entropy).fit(X, y)
    with pytest.raises(ValueError, match="estimator: the per-sample gradients"):
        CgInfluenceScorer(Returns("lstm").double(), loss=F.cross_entropy).fit(X, y)


def test_an_empty_list_of_layers():
    from skinfluence import EkfacInfluenceScorer

    X = np.random.default_rng(0).normal(size=(20, 4))
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match="layers: an empty list selects no layer"):
        EkfacInfluenceScorer(model, loss=F.cross_entropy, layers=[]).fit(X, np.arange(20) % 2)
