"""The 405,610-parameter panel of bench_scale.py: a tanh MLP 64-600-600-10 trained to a
minimum on 16,000 synthetic points (10 classes), and 20 test points.

The network is trained with Adam on minibatches, then with full-batch L-BFGS on the
mean cross-entropy plus ``WEIGHT_DECAY / 2 * ||theta||^2`` until its gradient is small:
a minimum, at which the exact Hessian of the loss plus ``WEIGHT_DECAY * I`` is positive
semi-definite (without the penalty, the network would drive its training loss to zero
and its curvature with it). Training takes a few
minutes on one core; the result is cached (``--cache``) so that every method sees the
same network.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from panels import mlp
from sklearn.datasets import make_classification
from sklearn.preprocessing import StandardScaler

N_TRAIN, N_TEST, D_IN, HIDDEN, N_CLASSES = 16_000, 20, 64, 600, 10
WEIGHT_DECAY = 1e-3


def data(n_train: int = N_TRAIN, n_test: int = N_TEST):
    """Standardized float32 features and int64 labels: (Xtr, ytr, Xte, yte)."""
    X, y = make_classification(
        n_samples=n_train + n_test, n_features=D_IN, n_informative=40, n_redundant=10,
        n_classes=N_CLASSES, n_clusters_per_class=2, class_sep=1.5, flip_y=0.01,
        random_state=0,
    )
    X = StandardScaler().fit(X[:n_train]).transform(X).astype(np.float32)
    y = y.astype(np.int64)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def train(Xtr, ytr, epochs: int = 40, lbfgs_steps: int = 300, seed: int = 0, log=print):
    torch.manual_seed(seed)
    model = mlp(D_IN, HIDDEN, N_CLASSES)
    Xt, yt = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(Xt), generator=g)
        for b in range(0, len(Xt), 256):
            i = perm[b : b + 256]
            opt.zero_grad()
            F.cross_entropy(model(Xt[i]), yt[i]).backward()
            opt.step()
        sched.step()
    lb = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=lbfgs_steps, history_size=20,
                           tolerance_grad=1e-9, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def objective():
        penalty = sum((u**2).sum() for u in model.parameters())
        return F.cross_entropy(model(Xt), yt) + 0.5 * WEIGHT_DECAY * penalty

    def closure():
        lb.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    lb.step(closure)
    model.zero_grad()
    loss = objective()
    grad = torch.autograd.grad(loss, list(model.parameters()))
    gnorm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in grad)))
    loss = float(F.cross_entropy(model(Xt), yt))
    log(f"trained in {time.perf_counter() - t0:.0f} s: training loss {loss:.4g}, "
        f"gradient norm of the penalized objective {gnorm:.2e}")
    return model.eval(), loss, gnorm


def load(cache: Path | None = None, log=print):
    """(model, Xtr, ytr, Xte, yte, info), trained once and cached in ``cache``."""
    Xtr, ytr, Xte, yte = data()
    if cache is not None and Path(cache).exists():
        state = torch.load(cache, weights_only=False)
        model = mlp(D_IN, HIDDEN, N_CLASSES)
        model.load_state_dict(state["model"])
        return model.eval(), Xtr, ytr, Xte, yte, state["info"]
    model, loss, gnorm = train(Xtr, ytr, log=log)
    with torch.no_grad():
        acc = float((model(torch.as_tensor(Xte)).argmax(1).numpy() == yte).mean())
        train_acc = float((model(torch.as_tensor(Xtr)).argmax(1).numpy() == ytr).mean())
    info = {"loss": loss, "grad_norm": gnorm, "train_accuracy": train_acc, "test_accuracy": acc}
    if cache is not None:
        torch.save({"model": model.state_dict(), "info": info}, cache)
    return model, Xtr, ytr, Xte, yte, info


if __name__ == "__main__":
    torch.set_num_threads(1)
    *_, info = load(Path("/tmp/scale/model.pt"))
    print(info)
