"""How well influences predict actual retraining, and what choosing settings by it costs.

1. Convex: sklearn LogisticRegression on digits (1,000 train / 200 test, stratified,
   standardized), its own L2 penalty only (C=1, solved to tol 1e-10). Direct's
   leave-one-out Pearson and LDS (50 subsets of 50%), next to dattri's published
   logistic regression on MNIST (LOO about 0.88, LDS about 0.80), and the top-10
   removal check.
2. Non-convex: panel B's digits MLP 64-32-32-10 (skorch, Adam lr 0.01, weight decay
   1e-3, 60 epochs, batch 64), 50 retrains on subsets of 50%. LDS per method at the
   default regularization (0.01) and at the one GridSearchCV picks from a 9-point
   grid on 200 validation points, both measured on 200 other, held-out points;
   pyDVL's DirectInfluence (regularization 0.1, the reference panels' setting) on the
   same retrains if pyDVL is importable.
3. The cost: retrains once, then every grid point is one scorer fit plus an
   influence matrix; against 9 times the retrains a per-setting check would need.

Run:  python benchmarks/bench_evaluation.py [--fast] [--n-jobs 2]
``--fast`` uses 10 subsets, 20 left-out points and 20 epochs (a smoke test, minutes).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from panels import MLP
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.preprocessing import StandardScaler

from skinfluence import (
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    DirectInfluenceScorer,
    EkfacInfluenceScorer,
    NystroemInfluenceScorer,
)
from skinfluence.evaluation import (
    Counterfactuals,
    linear_datamodeling_score,
    loo_agreement,
    top_k_removal,
)

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
GRID = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0]


def digits_split(n_train=1000, n_eval=400):
    X, y = load_digits(return_X_y=True)
    Xtr, Xev, ytr, yev = train_test_split(
        X, y, train_size=n_train, test_size=n_eval, random_state=0, stratify=y
    )
    sc = StandardScaler().fit(Xtr)
    return (sc.transform(Xtr).astype(np.float32), ytr.astype(np.int64),
            sc.transform(Xev).astype(np.float32), yev.astype(np.int64))


def convex(args, lines):
    Xtr, ytr, Xev, yev = digits_split(1000, 200)
    Xtr, Xev = Xtr.astype(np.float64), Xev.astype(np.float64)
    model = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(Xtr, ytr)
    cf = Counterfactuals(model, n_subsets=args.subsets, n_loo=args.loo, n_jobs=args.n_jobs,
                         random_state=0).fit(Xtr, ytr, Xev, yev)
    t0 = time.perf_counter()
    scorer = DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(Xtr, ytr)
    I = scorer.influences(Xev, yev)
    t_inf = time.perf_counter() - t0
    lds = linear_datamodeling_score(I, cf)
    loo = loo_agreement(I, cf)
    loo_m = loo_agreement(I, cf, outcome="margin")
    topk = top_k_removal(I, cf, k=10, n_points=20, n_random=5, random_state=0)
    # Why first order falls short: one Newton step with the curvature of the remaining
    # points, (H_-j)^-1 g_j / (n - 1), from a Direct scorer fitted without point j.
    n = len(ytr)
    newton = np.empty_like(loo.predicted)
    for k, j in enumerate(cf.loo_indices_):
        keep = np.arange(n) != j
        s_j = DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(Xtr[keep], ytr[keep])
        newton[k] = s_j.influences(Xev, yev, Xtr[j : j + 1], ytr[j : j + 1])[:, 0] / (n - 1)
    a = loo.actual.ravel()
    newton_r = np.corrcoef(a, newton.ravel())[0, 1]
    newton_slope = (a * newton.ravel()).sum() / (newton.ravel() ** 2).sum()
    big = np.abs(a) >= np.quantile(np.abs(a), 0.99)
    r_small = np.corrcoef(a[~big], loo.predicted.ravel()[~big])[0, 1]
    well = LogisticRegression(C=0.1, tol=1e-10, max_iter=10000).fit(Xtr, ytr)
    cf_well = Counterfactuals(well, n_subsets=0, n_loo=args.loo, n_jobs=args.n_jobs,
                              random_state=0).fit(Xtr, ytr, Xev, yev)
    loo_well = loo_agreement(
        DirectInfluenceScorer(well, regularization=0.0, dtype="float64").fit(Xtr, ytr), cf_well)
    lines += [
        "## 1. Convex: LogisticRegression (C=1) on digits, 1,000 train / 200 test, Direct with the model's own penalty",
        "",
        "| check | skinfluence Direct | dattri, LR on MNIST (published) |",
        "|---|---|---|",
        f"| LOO Pearson, loss, all {loo.actual.size} pairs ({args.loo} points removed) | {loo.pearson:.3f} (Spearman {loo.spearman:.3f}; per test point {loo.pearson_per_point:.3f}) | about 0.88 |",
        f"| LOO slope actual ~ predicted (1 = right size) | {loo.slope:.2f} | |",
        f"| LOO Pearson, margin of the true class | {loo_m.pearson:.3f} (slope {loo_m.slope:.2f}) | |",
        f"| LDS, loss ({args.subsets} subsets of 50%) | {lds.score:.3f} +- {lds.stderr:.3f} | about 0.80 |",
        f"| LOO Pearson without the 1% largest actual changes | {r_small:.3f} | |",
        f"| LOO Pearson, one Newton step with the remaining points' curvature | {newton_r:.3f} (slope {newton_slope:.2f}) | |",
        f"| LOO Pearson, better conditioned C=0.1 (first order) | {loo_well.pearson:.3f} (slope {loo_well.slope:.2f}) | |",
        f"| top-10 removal: beats 10 random points | {topk.beats_random:.0%} of 20 test points | |",
        f"| top-10 removal: actual / predicted loss rise | {topk.ratio:.2f} | |",
        "",
        "LDS on the margin equals LDS on the loss here: for one test point the margin is a "
        "decreasing function of its loss, and Spearman sees only ranks.",
        "",
        f"Retrains: {cf.n_retrains_} in {cf.fit_seconds_:.1f} s (n_jobs={args.n_jobs}); "
        f"Direct fit + 200 x 1000 influences {t_inf:.2f} s.",
        "",
    ]
    return loo


def skorch_net(epochs):
    from skorch import NeuralNetClassifier

    return NeuralNetClassifier(
        MLP, module__d_in=64, module__d_h=32, module__d_out=10, max_epochs=epochs, lr=0.01,
        optimizer=torch.optim.Adam, optimizer__weight_decay=1e-3, batch_size=64,
        criterion=torch.nn.CrossEntropyLoss, train_split=None, verbose=0,
    )


def methods(net):
    return {
        "Direct": DirectInfluenceScorer(net),
        "CG": CgInfluenceScorer(net),
        "Arnoldi (rank 30)": ArnoldiInfluenceScorer(net, rank=30, random_state=0),
        "Nystroem (rank 30)": NystroemInfluenceScorer(net, rank=30, random_state=0),
        "EK-FAC": EkfacInfluenceScorer(net),
    }


def nonconvex(args, lines):
    Xtr, ytr, Xev, yev = digits_split(1000, 400)
    val, test = np.arange(200), np.arange(200, 400)
    net = skorch_net(args.epochs)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net.fit(Xtr, ytr)
    acc = (net.predict(Xev) == yev).mean()
    cf = Counterfactuals(net, n_subsets=args.subsets, fraction=0.5, n_jobs=args.n_jobs,
                         progress=args.progress, random_state=0).fit(Xtr, ytr, Xev, yev)
    retrain_s = cf.fit_seconds_
    rows, grid_seconds, grid_fits = [], {}, 0
    Xs, ys = cf.search_data()
    for name, scorer in methods(net).items():
        def lds_at(reg, pts, scorer=scorer):
            try:
                s = type(scorer)(**{**scorer.get_params(deep=False), "regularization": reg})
                return linear_datamodeling_score(s.fit(Xtr, ytr), cf, points=pts)
            except Exception as exc:  # e.g. negative curvature at a small regularization
                return exc

        default_val, default_test = lds_at(0.01, val), lds_at(0.01, test)
        t0 = time.perf_counter()
        search = GridSearchCV(scorer, {"regularization": GRID}, scoring=cf.scorer(),
                              cv=cf.cv(points=val), refit=False, error_score=np.nan).fit(Xs, ys)
        grid_seconds[name] = time.perf_counter() - t0
        grid_fits += len(GRID)
        best = search.best_params_["regularization"]
        tuned_test = lds_at(best, test)
        rows.append((name, default_val, default_test, best, search.best_score_, tuned_test))
    # Gradient similarity: (H + lambda I)^-1 ~ I / lambda for a huge lambda.
    g = lds_at_matrix(DirectInfluenceScorer(net, regularization=1e6), Xtr, ytr, cf, val, test)
    rows.append(("gradient similarity (Direct, lambda=1e6)", g[0], g[1], None, None, None))
    pydvl = pydvl_lds(net, Xtr, ytr, Xev, yev, cf, val, test)
    ours_at_pydvl = linear_datamodeling_score(
        DirectInfluenceScorer(net, regularization=0.1).fit(Xtr, ytr), cf, points=test)

    def fmt(r):
        return "failed" if isinstance(r, Exception) else f"{r.score:.3f} +- {r.stderr:.3f}"

    lines += [
        "## 2. Non-convex: panel B MLP 64-32-32-10 (skorch), digits 1,000 train",
        "",
        f"Accuracy of the trained net on the 400 evaluation points: {acc:.3f}. "
        f"{args.subsets} retrains on random halves ({args.epochs} epochs each, one fixed seed). "
        "LDS on the loss; regularization tuned by GridSearchCV over "
        f"{GRID} on 200 validation points, LDS reported on 200 held-out test points.",
        "",
        "| method | LDS, default reg 0.01 (held-out) | tuned reg | LDS tuned (validation) | LDS tuned (held-out) | held-out gain |",
        "|---|---|---|---|---|---|",
    ]
    for name, _dv, dt, best, bv, tt in rows:
        if best is None:
            lines.append(f"| {name} | {fmt(dt)} | | | | |")
            continue
        gain = "" if isinstance(dt, Exception) or isinstance(tt, Exception) else f"{tt.score - dt.score:+.3f}"
        lines.append(f"| {name} | {fmt(dt)} | {best:g} | {bv:.3f} | {fmt(tt)} | {gain} |")
    if pydvl is None:
        lines.append("| pyDVL DirectInfluence | not importable here | | | | |")
    else:
        lines.append(f"| pyDVL 0.10 DirectInfluence(regularization=0.1) | {fmt(pydvl)} (ours at 0.1: {fmt(ours_at_pydvl)}) | | | | |")
    lines += [
        "",
        "Published anchor: dattri reports LDS about 0.26 for CG on an MNIST MLP.",
        "",
        "## 3. Cost",
        "",
        "| step | count | seconds |",
        "|---|---|---|",
        f"| retrains (once, shared by every row above) | {cf.n_retrains_} | {retrain_s:.1f} |",
    ]
    for name, s in grid_seconds.items():
        lines.append(f"| {name}: 9-point grid (9 scorer fits + influences) | 9 | {s:.1f} |")
    lines += [
        f"| all grids together | {grid_fits} evaluations | {sum(grid_seconds.values()):.1f} |",
        f"| what 9 separate retraining checks of one grid would cost | {9 * cf.n_retrains_} retrains | {9 * retrain_s:.0f} |",
        "",
    ]


def lds_at_matrix(scorer, Xtr, ytr, cf, val, test):
    s = scorer.fit(Xtr, ytr)
    return linear_datamodeling_score(s, cf, points=val), linear_datamodeling_score(s, cf, points=test)


def pydvl_lds(net, Xtr, ytr, Xev, yev, cf, val, test):
    try:
        from pydvl.influence.torch import DirectInfluence
    except ImportError:
        return None
    from torch.utils.data import DataLoader, TensorDataset

    model = net.module_.eval()
    Xt, yt = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    dl = DataLoader(TensorDataset(Xt, yt), batch_size=250)
    inf = DirectInfluence(model, F.cross_entropy, regularization=0.1).fit(dl)
    I = inf.influences(torch.as_tensor(Xev), torch.as_tensor(yev), Xt, yt).numpy()
    return linear_datamodeling_score(I[test], cf, points=test)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true")
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--skip-convex", action="store_true")
    args = p.parse_args()
    args.subsets, args.loo, args.epochs = (10, 20, 20) if args.fast else (50, 100, 60)
    torch.set_num_threads(1)
    lines = [f"## Influence against retraining{' (--fast)' if args.fast else ''}", ""]
    t0 = time.perf_counter()
    if not args.skip_convex:
        convex(args, lines)
    nonconvex(args, lines)
    lines.append(
        f"Total {time.perf_counter() - t0:.0f} s on this machine. Reproduce: "
        f"`python benchmarks/bench_evaluation.py{' --fast' if args.fast else ''} --n-jobs {args.n_jobs}`."
    )
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "evaluation.md"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
