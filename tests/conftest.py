"""Shared fixtures: small data sets and fitted models, built once per session."""

import numpy as np
import pytest
import torch
from _models import LogitMLP, SoftmaxMLP, train
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.preprocessing import StandardScaler
from torch import nn

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def wine():
    X, y = load_wine(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    X = StandardScaler().fit_transform(X)[idx]
    y = y[idx]
    return X[:120], y[:120], X[120:], y[120:]


@pytest.fixture(scope="session")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    return X[:300], y[:300], X[300:400], y[300:400]


@pytest.fixture(scope="session")
def torch_mlp(wine):
    """A float64 tanh MLP on wine with its cross-entropy loss."""
    Xtr, ytr, _, _ = wine
    torch.manual_seed(0)
    model = LogitMLP().double()
    Xt, yt = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    return train(model, Xt, yt, nn.functional.cross_entropy)


@pytest.fixture(scope="session")
def skorch_net(wine):
    from skorch import NeuralNetClassifier

    Xtr, ytr, _, _ = wine
    torch.manual_seed(0)
    net = NeuralNetClassifier(
        SoftmaxMLP, max_epochs=60, lr=0.05, optimizer=torch.optim.Adam,
        optimizer__weight_decay=1e-3, train_split=None, verbose=0, batch_size=32,
    )
    return net.fit(Xtr.astype(np.float32), ytr.astype(np.int64))
