"""How far can I trust these numbers? Tuning influence for a skorch MLP on digits.

A skorch MLP (64-32-32-10) is trained on sklearn's 8x8 digits. ``Counterfactuals``
retrains clones of it on random halves of the training data, once, and records the
loss at evaluation points the retrains never saw. ``GridSearchCV`` then chooses the
influence method and its regularization by the linear datamodeling score (LDS: how
well the influences rank what retraining actually does) on half of the evaluation
points, reusing the same retrains for every candidate; the chosen setting is checked
on the other half.

Run::

    python examples/plot_trust_digits.py OUTPUT_DIR [--fast]

``--fast`` uses fewer points, retrains and epochs (used by the test suite).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import FitFailedWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier
from torch import nn

from skinfluence import (
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    DirectInfluenceScorer,
    EkfacInfluenceScorer,
    NystroemInfluenceScorer,
)
from skinfluence.evaluation import Counterfactuals, InfluenceMethod


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, d_hidden: int = 32, d_out: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, d_hidden), nn.Tanh(),
            nn.Linear(d_hidden, d_hidden), nn.Tanh(),
            nn.Linear(d_hidden, d_out),
        )

    def forward(self, x):
        return self.net(x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="folder for the PNG figures")
    parser.add_argument("--fast", action="store_true", help="small version, for tests")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    # Too small a regularization fails on a non-convex net; those candidates score nan.
    warnings.filterwarnings("ignore", category=FitFailedWarning)
    warnings.filterwarnings("ignore", message="One or more of the test scores are non-finite")
    warnings.filterwarnings("ignore", message="Scoring failed")
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    n_train, n_eval, n_subsets, epochs = (300, 80, 10, 10) if args.fast else (1000, 400, 50, 60)
    regs = [3e-2, 0.3] if args.fast else [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
    n_jobs = 1 if args.fast else 2  # starting worker processes costs more than 10 small fits

    X, y = load_digits(return_X_y=True)
    X_train, X_eval, y_train, y_eval = train_test_split(
        X, y, train_size=n_train, test_size=n_eval, stratify=y, random_state=0
    )
    scale = StandardScaler().fit(X_train)
    X_train = scale.transform(X_train).astype(np.float32)
    X_eval = scale.transform(X_eval).astype(np.float32)
    y_train, y_eval = y_train.astype(np.int64), y_eval.astype(np.int64)

    net = NeuralNetClassifier(
        MLP, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
        optimizer__weight_decay=1e-3, max_epochs=epochs, batch_size=64, train_split=None,
        verbose=0,
    )
    torch.manual_seed(0)
    net.fit(X_train, y_train)

    # The ground truth, once: retrains on random halves, outcomes at the evaluation points.
    start = time.perf_counter()
    cf = Counterfactuals(net, n_subsets=n_subsets, fraction=0.5, n_jobs=n_jobs, random_state=0)
    cf.fit(X_train, y_train, X_eval, y_eval)
    retrain_s = time.perf_counter() - start
    tune, check = np.arange(n_eval // 2), np.arange(n_eval // 2, n_eval)

    # Every method and regularization, scored against the same retrains.
    candidates = {
        "Direct": DirectInfluenceScorer(net),
        "CG": CgInfluenceScorer(net),
        "Arnoldi": ArnoldiInfluenceScorer(net, rank=30, random_state=0),
        "Nystroem": NystroemInfluenceScorer(net, rank=30, random_state=0),
        "EK-FAC": EkfacInfluenceScorer(net),
    }
    if args.fast:
        candidates = {k: candidates[k] for k in ("Direct", "Arnoldi", "EK-FAC")}
    grid = [{"scorer": [s], "scorer__regularization": regs} for s in candidates.values()]
    start = time.perf_counter()
    search = GridSearchCV(
        InfluenceMethod(), grid, scoring=cf.scorer(), cv=cf.cv(points=tune), refit=False,
        error_score=np.nan,  # a regularization too small for a non-convex net fails
    ).fit(*cf.search_data())
    search_s = time.perf_counter() - start

    # Each method at its own best regularization, checked on the held-out points.
    results = search.cv_results_
    best_per_method = []
    for s in candidates.values():
        rows = [k for k, p in enumerate(results["params"]) if type(p["scorer"]) is type(s)]
        scores = np.nan_to_num(results["mean_test_score"][rows], nan=-np.inf)
        reg = results["params"][rows[int(np.argmax(scores))]]["scorer__regularization"]
        best_per_method.append(clone(s).set_params(regularization=reg))
    report = cf.report(best_per_method, names=list(candidates), points=check)
    best = search.best_params_
    best_name = next(n for n, s in candidates.items() if type(s) is type(best["scorer"]))
    best_row = report.rows[list(candidates).index(best_name)]
    default = cf.report([clone(best["scorer"]).set_params(regularization=0.01)],
                        names=[f"{best_name}, default 0.01"], points=check).rows[0]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for name, s in candidates.items():
        rows = [k for k, p in enumerate(results["params"]) if type(p["scorer"]) is type(s)]
        r = np.array([results["params"][k]["scorer__regularization"] for k in rows])
        order = np.argsort(r)
        ax1.plot(r[order], results["mean_test_score"][rows][order], marker="o", label=name)
    ax1.set_xscale("log")
    ax1.set_xlabel("regularization")
    ax1.set_ylabel(f"LDS on {len(tune)} tuning points")
    ax1.set_title("GridSearchCV: one set of retrains, every candidate", fontsize=10)
    ax1.legend(frameon=False, fontsize=8)
    report.plot(ax=ax2)
    ax2.set_title(f"Held-out {len(check)} points, each method at its best regularization",
                  fontsize=10)
    fig.savefig(args.output / "trust_digits.png", dpi=110)

    lds, se = best_row["lds"], best_row["lds_stderr"]
    verdict = ("good: rankings of training points are reliable" if lds > 0.6 else
               "moderate: trust the ranking of large effects, not small ones" if lds > 0.3 else
               "weak: use the influences only as a rough hint")
    print(f"""{cf.n_retrains_} retrains on random halves: {retrain_s:.1f} s (once)
GridSearchCV over {len(results['params'])} candidates reusing them: {search_s:.1f} s
{report}

Use {best_name} with regularization={best['scorer__regularization']:g} (chosen on {len(tune)} tuning points).
On {len(check)} held-out points: LDS {lds:.3f} +- {se:.3f}; at the default regularization
0.01: {default['lds']:.3f} +- {default['lds_stderr']:.3f}.
How much to trust it: {verdict}.
(LDS is the mean Spearman correlation between what the influences predict and what
retraining did, over {n_subsets} random halves of the training data; 1 is perfect.)

What to look at (figures in {args.output}/):
* trust_digits.png, left: the tuning score of each method against its regularization;
  too small a regularization lets the net's negative curvature distort the inverse
  (or fail, missing points), too large a one turns every method into a gradient
  dot product. Right: each method at its best setting on points not used to choose it,
  with its standard error and the seconds it took; the green bar is the best there.""")


if __name__ == "__main__":
    main()
