"""Quickstart: which training points does a skorch MLP rely on, and which labels are wrong?

Wine data (178 samples, 13 features), 10% of the training labels flipped, a skorch
MLP 13-16-16-3. DirectInfluenceScorer computes the exact influence of every
training point on every test point, and each training point's self-influence.

Run:  python examples/quickstart_demo.py [OUTPUT_DIR] [--fast]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_wine
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier
from torch import nn

from skinfluence import DirectInfluenceScorer
from skinfluence.datasets import flip_labels


class MLP(nn.Module):
    def __init__(self, d_in=13, d_h=16, d_out=3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, d_h), nn.Tanh(), nn.Linear(d_h, d_h), nn.Tanh(), nn.Linear(d_h, d_out)
        )

    def forward(self, x):
        return self.net(x)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default="output", help="folder for the figure")
    parser.add_argument("--fast", action="store_true", help="fewer epochs (for tests)")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    X, y = load_wine(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    X_train = scaler.transform(X_train).astype(np.float32)
    X_test = scaler.transform(X_test).astype(np.float32)
    y_noisy, flipped = flip_labels(y_train, 0.1, random_state=0)

    t0 = time.perf_counter()
    net = NeuralNetClassifier(
        MLP, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
        optimizer__weight_decay=1e-3, max_epochs=20 if args.fast else 100, batch_size=64,
        train_split=None, verbose=0,
    ).fit(X_train, y_noisy)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    scorer = DirectInfluenceScorer(net, regularization=0.1).fit(X_train, y_noisy)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    influence = scorer.transform(X_test, y_test)  # (n_test, n_train)
    t_influence = time.perf_counter() - t0
    t0 = time.perf_counter()
    self_influence = scorer.self_influence()  # (n_train,)
    t_self = time.perf_counter() - t0

    harm = -influence.mean(0)  # positive: removing the point would lower the test loss
    n_top = int(flipped.sum())
    top_self = np.argsort(-self_influence)[:n_top]
    top_harm = np.argsort(-harm)[:n_top]
    report = {
        "n_train": len(y_train),
        "n_flipped": n_top,
        "n_params": scorer.n_params_,
        "auroc_self": roc_auc_score(flipped, self_influence),
        "ap_self": average_precision_score(flipped, self_influence),
        "auroc_harm": roc_auc_score(flipped, harm),
        "found_self": int(flipped[top_self].sum()),
        "found_harm": int(flipped[top_harm].sum()),
    }
    print("skinfluence quickstart: wine, skorch MLP 13-16-16-3, 10% of training labels flipped")
    print(f"  training points: {report['n_train']}, flipped: {n_top}, model parameters: {scorer.n_params_}")
    print(f"  train the MLP                         {t_train:6.2f} s")
    print(f"  exact Hessian + Cholesky (fit)        {t_fit:6.2f} s")
    print(f"  influence matrix {influence.shape[0]} x {influence.shape[1]}          {t_influence:6.2f} s")
    print(f"  self-influence of all training points {t_self:6.2f} s")
    print("How the flipped labels rank:")
    print(
        f"  self-influence:            AUROC {report['auroc_self']:.3f}, AP {report['ap_self']:.3f}, "
        f"{report['found_self']} of the {n_top} most suspicious are flipped"
    )
    print(
        f"  harm to the test set:      AUROC {report['auroc_harm']:.3f}, "
        f"{report['found_harm']} of the {n_top} most harmful are flipped"
    )
    best = int(np.argmax(self_influence))
    print(
        f"  most self-influential point: #{best}, label {y_noisy[best]}, "
        f"{f'FLIPPED (true label {y_train[best]})' if flipped[best] else 'not flipped'}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.logspace(np.log10(max(self_influence.min(), 1e-6)), np.log10(self_influence.max()), 30)
    axes[0].hist(self_influence[~flipped], bins=bins, alpha=0.7, label="clean labels")
    axes[0].hist(self_influence[flipped], bins=bins, alpha=0.8, color="crimson", label="flipped labels")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("self-influence (log scale)")
    axes[0].set_ylabel("training points")
    axes[0].set_title(f"Self-influence (AUROC {report['auroc_self']:.2f})")
    axes[0].legend()
    order = np.argsort(-self_influence)
    axes[1].scatter(np.arange(len(order)), harm[order], s=12, c=np.where(flipped[order], "crimson", "tab:blue"))
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_xlabel("training points, most self-influential first")
    axes[1].set_ylabel("harm to the test loss  (-mean influence)")
    axes[1].set_title("Flipped points (red) among the training set")
    fig.tight_layout()
    path = out / "quickstart_self_influence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"Figure saved to {path}: flipped points should sit at the right of the histogram.")
    return report


if __name__ == "__main__":
    main()
