"""Small models shared by the tests."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxMLP(nn.Module):
    """Outputs probabilities: the default of skorch's NeuralNetClassifier (NLLLoss)."""

    def __init__(self, d_in=13, d_h=8, d_out=3):
        super().__init__()
        self.hidden = nn.Linear(d_in, d_h)
        self.out = nn.Linear(d_h, d_out)

    def forward(self, x):
        return torch.softmax(self.out(torch.tanh(self.hidden(x))), dim=-1)


class LogitMLP(nn.Module):
    def __init__(self, d_in=13, d_h=8, d_out=3):
        super().__init__()
        self.hidden = nn.Linear(d_in, d_h)
        self.out = nn.Linear(d_h, d_out)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def train(module, X, y, loss_fn, epochs=300, lr=0.05, wd=1e-2, seed=0):
    """Full-batch Adam: a deterministic, well-fitted small model."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=wd)
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(module(X), y).backward()
        opt.step()
    return module.eval()


def small_mlp_data():
    """A trained 4-6-3 tanh MLP (51 parameters) in float64 on a 3-class problem:
    (model, X_train, y_train, X_test, y_test), 70 training and 20 test points."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 4))
    y = ((X[:, 0] + X[:, 1] ** 2 > 1).astype(np.int64) + (X[:, 2] > 0.5)).astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(Xt), yt).backward()
        opt.step()
    return model, X[:70], y[:70], X[70:], y[70:]
