"""Choosing rho of ``regularization="auto"`` against retraining, on two networks.

``"auto"`` sets ``lambda = max(rho * lambda_max, 1.5 max(0, -lambda_min) + floor)``
(see :func:`skinfluence._linalg.auto_regularization`). This measures the linear
datamodeling score (LDS, Spearman correlation of summed influences with the losses
of nets retrained on random halves) of the exact inverse (Direct) at

* auto with rho in {1e-4, 1e-3, 1e-2, 1e-1, 1} (and pure ``rho * lambda_max``, which
  is not positive definite for the exact Hessian when below the safety term),
* the former fixed default 0.01,
* the regularization GridSearchCV picks on validation points from a 9-point grid
  (``Counterfactuals.cv``),

each for ``hessian="exact"`` and ``hessian="gauss-newton"``, on

A. panel B's digits MLP 64-32-32-10 (tanh, skorch, Adam, weight decay 1e-3);
B. a breast-cancer ReLU MLP 30-32-32-2 (skorch, Adam, weight decay 1e-3).

Settings are compared on validation points; LDS is reported on other, held-out
points too. rho is chosen on the validation columns.

Run:  python benchmarks/bench_auto_regularization.py [--fast] [--n-jobs 2]
``--fast`` uses 10 retrains and 20 epochs (a smoke test).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from panels import MLP
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.exceptions import FitFailedWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from skinfluence import DirectInfluenceScorer
from skinfluence._gradients import per_sample_grads
from skinfluence._linalg import AUTO_RELATIVE_DAMPING, auto_regularization
from skinfluence.evaluation import Counterfactuals, linear_datamodeling_score

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FitFailedWarning)  # grid points not PD
RHOS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
GRID = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0]


class ReluMLP(nn.Module):
    """d_in-h-h-d_out with ReLU activations."""

    def __init__(self, d_in: int = 30, d_h: int = 32, d_out: int = 2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, d_h), nn.ReLU(), nn.Linear(d_h, d_h), nn.ReLU(), nn.Linear(d_h, d_out)
        )

    def forward(self, x):
        return self.net(x)


def split(loader, n_train, n_eval):
    X, y = loader(return_X_y=True)
    Xtr, Xev, ytr, yev = train_test_split(
        X, y, train_size=n_train, test_size=n_eval, random_state=0, stratify=y
    )
    sc = StandardScaler().fit(Xtr)
    return (sc.transform(Xtr).astype(np.float32), ytr.astype(np.int64),
            sc.transform(Xev).astype(np.float32), yev.astype(np.int64))


def net(module, d_in, d_out, epochs):
    from skorch import NeuralNetClassifier

    return NeuralNetClassifier(
        module, module__d_in=d_in, module__d_h=32, module__d_out=d_out, max_epochs=epochs,
        lr=0.01, optimizer=torch.optim.Adam, optimizer__weight_decay=1e-3, batch_size=64,
        criterion=torch.nn.CrossEntropyLoss, train_split=None, verbose=0,
    )


def cases(epochs):
    yield ("A. digits MLP 64-32-32-10 (tanh), 1,000 train", net(MLP, 64, 10, epochs),
           *split(load_digits, 1000, 400))
    yield ("B. breast cancer MLP 30-32-32-2 (ReLU), 369 train", net(ReluMLP, 30, 2, epochs),
           *split(load_breast_cancer, 369, 200))


class Eigen:
    """Influences of Direct at any lambda from one eigendecomposition of the curvature
    (the dense matrix Direct forms): ``I = (G_test V) diag(1 / (e + lambda)) (G V)^T``."""

    def __init__(self, model, hessian, X, y, Xev, yev):
        s = DirectInfluenceScorer(model, hessian=hessian, regularization=1.0).fit(X, y)
        A = s.operator_.dense().double()
        A.diagonal().sub_(1.0)
        self.e, V = torch.linalg.eigh(A)
        a = s.adapter_
        with a.eval_mode():
            G = per_sample_grads(a, s.X_train_, s.y_train_).double()
            Gte = per_sample_grads(a, a.features(Xev), a.targets(yev, "y")).double()
        self.P, self.Pte = G @ V, Gte @ V
        # the same matrix as the scorer's own, at one lambda
        ref = DirectInfluenceScorer(model, hessian=hessian, regularization=0.01).fit(X, y)
        J = ref.influences(Xev[:5], yev[:5])
        np.testing.assert_allclose(self.influences(0.01)[:5], J, rtol=1e-3, atol=1e-4 * np.abs(J).max())

    @property
    def ends(self):
        return float(self.e[0]), float(self.e[-1])

    def influences(self, lam):
        d = self.e + lam
        if float(d.min()) <= 0:
            return None  # not positive definite
        return ((self.Pte / d) @ self.P.T).numpy()


def lds(eig, lam, cf, points):
    I = eig.influences(lam)
    return None if I is None else linear_datamodeling_score(I[points], cf, points=points).score


def run_case(title, model, Xtr, ytr, Xev, yev, args):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.fit(Xtr, ytr)
    acc = float((model.predict(Xev) == yev).mean())
    half = len(yev) // 2
    val, test = np.arange(half), np.arange(half, len(yev))
    t0 = time.perf_counter()
    cf = Counterfactuals(model, n_subsets=args.subsets, fraction=0.5, n_jobs=args.n_jobs,
                         random_state=0).fit(Xtr, ytr, Xev, yev)
    retrain_s = time.perf_counter() - t0
    results, notes = {}, {}
    for hessian in ("exact", "gauss-newton"):
        eig = Eigen(model, hessian, Xtr, ytr, Xev, yev)
        lo, hi = eig.ends
        notes[hessian] = (lo, hi)
        rows = []
        for rho in RHOS:
            lam = auto_regularization(lo, hi, rho)
            rows.append((f"auto, rho={rho:g}", lam))
            if rho * hi < 0.99 * lam:  # the safety term decided: pure rho * lambda_max too
                rows.append((f"rho * lambda_max alone, rho={rho:g}", rho * hi))
        rows.append(("fixed 0.01 (the former default)", 0.01))
        scored = [(name, lam, lds(eig, lam, cf, val), lds(eig, lam, cf, test)) for name, lam in rows]
        Xs, ys = cf.search_data()
        search = GridSearchCV(DirectInfluenceScorer(model, hessian=hessian), {"regularization": GRID},
                              scoring=cf.scorer(), cv=cf.cv(points=val), refit=False,
                              error_score=np.nan).fit(Xs, ys)
        best = search.best_params_["regularization"]
        scored.append(("GridSearchCV on validation points", best, search.best_score_,
                       lds(eig, best, cf, test)))
        results[hessian] = scored
    return acc, retrain_s, cf.n_retrains_, notes, results


def fmt(v):
    return "not PD" if v is None else f"{v:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true")
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()
    args.subsets, args.epochs = (10, 20) if args.fast else (30, 60)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lines = [f"## regularization=\"auto\": rho against retraining{' (--fast)' if args.fast else ''}", "",
             f"LDS of Direct (the exact inverse) on {args.subsets} retrains on random halves "
             f"({args.epochs} epochs each); validation and held-out test points are disjoint "
             f"halves of the evaluation set. The library's rho is {AUTO_RELATIVE_DAMPING:g}.", ""]
    summary = {}
    for title, model, Xtr, ytr, Xev, yev in cases(args.epochs):
        acc, retrain_s, n_retrains, notes, results = run_case(title, model, Xtr, ytr, Xev, yev, args)
        lines += [f"### {title}", "",
                  f"Accuracy on the {len(yev)} evaluation points {acc:.3f}; {n_retrains} retrains "
                  f"in {retrain_s:.0f} s. Eigenvalues of the curvature: "
                  + "; ".join(f"{h}: lambda_min {lo:.3g}, lambda_max {hi:.3g}" for h, (lo, hi) in notes.items()),
                  "", "| setting | exact: lambda | exact: LDS val | exact: LDS test | "
                  "gauss-newton: lambda | gauss-newton: LDS val | gauss-newton: LDS test |",
                  "|---|---|---|---|---|---|---|"]
        by_name = {}
        for hessian, scored in results.items():
            for name, lam, v, t in scored:
                by_name.setdefault(name, {})[hessian] = (lam, v, t)
                if name.startswith("auto,"):
                    summary.setdefault((name, hessian), []).append((v, t))
        for name, cols in by_name.items():
            cells = []
            for hessian in ("exact", "gauss-newton"):
                if hessian in cols:
                    lam, v, t = cols[hessian]
                    cells += [f"{lam:.3g}", fmt(v), fmt(t)]
                else:
                    cells += ["", "", ""]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Mean LDS of auto over the two networks", "",
              "| rho | exact: val | exact: test | gauss-newton: val | gauss-newton: test |",
              "|---|---|---|---|---|"]
    for rho in RHOS:
        cells = []
        for hessian in ("exact", "gauss-newton"):
            pairs = summary.get((f"auto, rho={rho:g}", hessian), [])
            for k in (0, 1):
                vals = [p[k] for p in pairs]
                ok = all(v is not None for v in vals) and vals
                cells.append(f"{np.mean(vals):.3f}" if ok else "not PD")
        lines.append(f"| {rho:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Total {time.perf_counter() - t0:.0f} s on this machine (2 shared cores). "
              f"Reproduce: `python benchmarks/bench_auto_regularization.py{' --fast' if args.fast else ''} "
              f"--n-jobs {args.n_jobs}`."]
    text = "\n".join(lines)
    print(text)
    name = "auto_regularization_fast.md" if args.fast else "auto_regularization.md"
    (Path(__file__).parent / "results" / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
