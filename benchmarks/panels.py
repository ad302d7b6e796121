"""The reference panels of the benchmarks, built exactly as the published figures were.

Panel A: breast_cancer, logistic regression solved to machine precision (LOO check).
Panel B: digits, tanh MLP trained with Adam (approximations against the exact inverse).
Panel C: wine / breast_cancer / digits / 2-d blobs with 10% flipped labels (detection).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn


def mlp(d_in: int, d_h: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_h), nn.Tanh(), nn.Linear(d_h, d_h), nn.Tanh(), nn.Linear(d_h, d_out)
    )


class MLP(nn.Module):
    """The panel's MLP as a skorch module class (keyword arguments d_in, d_h, d_out)."""

    def __init__(self, d_in: int = 64, d_h: int = 32, d_out: int = 10):
        super().__init__()
        self.net = mlp(d_in, d_h, d_out)

    def forward(self, x):
        return self.net(x)


def train_mlp(model, X, y, epochs=60, lr=0.01, wd=1e-3, bs=64, seed=0):
    """Adam with weight decay, fixed seeds: the panels' training recipe."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    Xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
    for _ in range(epochs):
        perm = torch.randperm(len(Xt), generator=g)
        for b in range(0, len(Xt), bs):
            i = perm[b : b + bs]
            opt.zero_grad()
            F.cross_entropy(model(Xt[i]), yt[i]).backward()
            opt.step()
    return model.eval()


def panel_b(hidden: int = 32, n_train: int = 1000, n_test: int = 200):
    """digits, standardized, stratified split; trained MLP 64-h-h-10.

    Returns (model, Xtr, ytr, Xte, yte) with float32 features and int64 labels.
    """
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(
        X, y, train_size=n_train, test_size=n_test, random_state=0, stratify=y
    )
    sc = StandardScaler().fit(Xtr)
    Xtr = sc.transform(Xtr).astype(np.float32)
    Xte = sc.transform(Xte).astype(np.float32)
    torch.manual_seed(0)
    model = train_mlp(mlp(64, hidden, 10), Xtr, ytr, epochs=60)
    return model, Xtr, ytr.astype(np.int64), Xte, yte.astype(np.int64)


def panel_c_datasets():
    """(name, X, y) for the detection panel, in the panel's order."""
    for name, loader in [("wine", load_wine), ("breast_cancer", load_breast_cancer), ("digits", load_digits)]:
        X, y = loader(return_X_y=True)
        yield name, X, y
    yield "blobs", *draw_blobs(1000, seed=1)


def draw_blobs(n: int, seed: int):
    """Panel C's 2-d blobs: equally likely classes, Gaussians of standard deviation
    0.5 around (-0.5, -0.5) and (0.5, 0.5); the Bayes rule is x1 + x2 > 0."""
    rng = np.random.default_rng(seed)
    yb = rng.integers(0, 2, n)
    means = np.array([[-0.5, -0.5], [0.5, 0.5]])
    return means[yb] + 0.5 * rng.standard_normal((n, 2)), yb


def panel_c_split(X, y, frac: float = 0.1):
    """70/30 stratified split, standardized, ``frac`` of training labels flipped.

    The flips follow the panel's recipe exactly (numpy default_rng(0), each flipped
    label drawn uniformly among the other classes). Returns
    (Xtr, ynoisy, ytr_clean, flipped_mask, Xval, yval).
    """
    Xtr, Xval, ytr, yval = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    sc = StandardScaler().fit(Xtr)
    Xtr = sc.transform(Xtr).astype(np.float32)
    Xval = sc.transform(Xval).astype(np.float32)
    rng = np.random.default_rng(0)
    k = len(np.unique(y))
    ynoisy = ytr.copy()
    idx = rng.choice(len(ytr), round(frac * len(ytr)), replace=False)
    for i in idx:
        ynoisy[i] = rng.choice([c for c in range(k) if c != ynoisy[i]])
    flipped = np.zeros(len(ytr), bool)
    flipped[idx] = True
    return Xtr, ynoisy.astype(np.int64), ytr.astype(np.int64), flipped, Xval, yval.astype(np.int64)


def timed(fn, repeats: int, warmup: bool = True):
    """Best wall time of ``repeats`` runs (after one untimed run unless ``warmup=False``) and the last result."""
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out
