"""Small models shared by the tests."""

import torch
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
