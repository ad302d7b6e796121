"""Removal effects against exact refits: is the predicted change of the test loss right
in size, for each correction?

Models (each refit is a clone of the estimator, refitted from scratch to a tight
tolerance by ``skinfluence.evaluation``'s refit machinery):

* digits: LogisticRegression (multinomial, C picked by 5-fold LogisticRegressionCV),
  1,000 train / 100 test points (stratified, standardized);
* breast_cancer: LogisticRegression (C by LogisticRegressionCV), 398 train / 100 test;
* diabetes: Ridge (alpha by RidgeCV), 300 train / 100 test, standardized.

Group kinds: ``random`` points; one ``cluster`` of a k-means partition of the
training inputs (k = 1 / fraction); the ``hardest`` points of one class (highest
training loss); each test point's ``top-k`` most helpful points (by first-order
influence; evaluated at that test point only). Sizes: single points (leave one
out), 1%, 5%, 10%, 20% of the training set. Corrections: first order
(``none``), ``second-order`` (Basu et al.), ``newton`` (the test loss re-evaluated
after the step), ``newton-lin`` (the same step, the test loss linearised) and
``newton x3`` (three Newton steps, ``newton_steps=3``).

Metrics over all (group, test point) pairs of a cell: pooled Pearson; mean over test
points of the Spearman correlation across groups (random / cluster / hardest);
slope of actual ~ predicted through the origin (above 1: the prediction is too
small); mean absolute error as a fraction of the mean absolute actual change.

Detection: 10% flipped labels (breast_cancer, digits), AUROC of first-order
self-influence, of the Newton-corrected self removal effect, and of 1 - the
leave-one-out probability of the given label (first order / Newton).

MLP (``--mlp``): digits, 64-32-10 tanh, float64, trained by L-BFGS to a minimum of
mean cross-entropy + lambda / 2 ||theta||^2 (lambda = 0.01, the scorer's
regularization); each removal retrained warm-started from the trained weights with
the penalty unchanged. Random groups only.

Run:  python benchmarks/bench_removal.py [--fast] [--mlp] [--datasets digits breast_cancer diabetes]
Writes the tables to stdout (markdown) and, with ``--figure PATH``, the predicted vs
actual figure.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.cluster import KMeans
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, Ridge, RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from skinfluence import DirectInfluenceScorer
from skinfluence._gradients import per_sample_grads
from skinfluence.datasets import flip_labels
from skinfluence.evaluation import _run_refits

warnings.filterwarnings("ignore", category=FutureWarning)
CORRECTIONS = ("none", "second-order", "newton", "newton-lin", "newton x3")
SIZES = ("1 point", 0.01, 0.05, 0.10, 0.20)


def load(name, n_test=100):
    if name == "digits":
        X, y = load_digits(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X, y, train_size=1000, test_size=200,
                                              random_state=0, stratify=y)
    elif name == "breast_cancer":
        X, y = load_breast_cancer(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    else:
        X, y = load_diabetes(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X, y, train_size=300, random_state=0)
        m, s = ytr.mean(), ytr.std()
        ytr, yte = (ytr - m) / s, (yte - m) / s
    sc = StandardScaler().fit(Xtr)
    return sc.transform(Xtr), ytr, sc.transform(Xte)[:n_test], yte[:n_test]


def model_for(name, X, y):
    if name == "diabetes":
        alpha = float(RidgeCV(alphas=np.logspace(-2, 3, 21)).fit(X, y).alpha_)
        return Ridge(alpha=alpha), f"alpha={alpha:.3g}"
    cv = LogisticRegressionCV(Cs=np.logspace(-3, 2, 11), cv=5, max_iter=3000).fit(X, y)
    C = float(np.atleast_1d(cv.C_)[0])
    return LogisticRegression(C=C, tol=1e-10, max_iter=20_000), f"C={C:.3g}"


def groups_for(kind, size, X, y, losses, I, rng, n_rep):
    """Lists of training indices (and, for top-k, the test point each belongs to)."""
    n = len(y)
    m = 1 if size == "1 point" else max(1, round(size * n))
    if kind == "random":
        reps = 3 * n_rep if size == "1 point" else n_rep
        return [rng.choice(n, m, replace=False) for _ in range(reps)], None
    if kind == "cluster":
        if size == "1 point":
            return None, None
        k = max(2, round(1 / size))
        lab = KMeans(n_clusters=k, n_init=3, random_state=0).fit_predict(X)
        ids = rng.permutation(k)[:n_rep]
        return [np.flatnonzero(lab == c) for c in ids if (lab == c).sum() < n], None
    if kind == "hardest":
        if size == "1 point" or np.issubdtype(y.dtype, np.floating):
            return None, None
        out = []
        for c in np.unique(y)[:n_rep]:
            idx = np.flatnonzero(y == c)
            out.append(idx[np.argsort(-losses[idx])[: min(m, len(idx) - 1)]])
        return out, None
    # top-k helpful of each test point
    tests = rng.choice(I.shape[0], n_rep, replace=False)
    return [np.argsort(-I[t])[:m] for t in tests], tests


def metrics(pred, act, per_test):
    p, a = pred.ravel(), act.ravel()
    slope = float((p * a).sum() / (p * p).sum())
    mae = float(np.abs(p - a).mean() / np.abs(a).mean())
    r = float(pearsonr(p, a)[0]) if len(p) > 2 else np.nan
    rho = np.nan
    if per_test and pred.shape[1] > 2:
        rho = float(np.nanmean([spearmanr(pred[i], act[i])[0] for i in range(pred.shape[0])]))
    return r, rho, slope, mae


def predictions(scorer, Xte, yte, groups):
    out, secs = {}, {}
    for c in ("none", "second-order", "newton"):
        t = time.perf_counter()
        out[c] = scorer.predict_removal_effect(Xte, yte, groups=groups, correction=c, rtol=1e-10)
        secs[c] = time.perf_counter() - t
    # the same Newton step with the test loss linearised
    D = scorer._newton_steps([np.unique(g) for g in groups], rtol=1e-10)
    a = scorer.adapter_
    Xt, Yt = scorer._data(Xte, yte, "X_test", "y_test")
    with a.eval_mode():
        Gt = per_sample_grads(a, Xt, Yt)
    out["newton-lin"] = (Gt @ D.T.to(Gt.dtype)).numpy()
    secs["newton-lin"] = secs["newton"]
    t = time.perf_counter()
    out["newton x3"] = scorer.predict_removal_effect(Xte, yte, groups=groups, correction="newton",
                                                     newton_steps=3, rtol=1e-10)
    secs["newton x3"] = time.perf_counter() - t
    return out, secs


def run_dataset(name, fast, rng):
    X, y, Xte, yte = load(name)
    est, setting = model_for(name, X, y)
    t0 = time.perf_counter()
    full = _run_refits(est, X, y, [np.ones(len(y), bool)], Xte, yte, [0],
                       name != "diabetes", 1, False, "")[0][0]["loss"]
    model = est.__class__(**est.get_params()).fit(X, y)
    scorer = DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(X, y)
    I = scorer.influences(Xte, yte)
    Xt, Yt = scorer._data(X, y, "X", "y", predicted_ok=False)
    with scorer.adapter_.eval_mode():
        a = scorer.adapter_
        losses = torch.vmap(a.sample_loss, in_dims=(None, 0, 0))(a.params, Xt, Yt).numpy()
    n_rep = 3 if fast else 8
    rows = []
    n_refits = 0
    for kind in ("random", "cluster", "hardest", "top-k"):
        for size in SIZES:
            groups, tests = groups_for(kind, size, X, y, losses, I, rng, n_rep)
            if not groups:
                continue
            masks = []
            for g in groups:
                keep = np.ones(len(y), bool)
                keep[g] = False
                masks.append(keep)
            res = _run_refits(est, X, y, masks, Xte, yte, [0], name != "diabetes", 1, False, "")
            n_refits += len(masks)
            actual = np.stack([r[0]["loss"] - full for r in res], 1)  # (n_test, n_groups)
            pred, secs = predictions(scorer, Xte, yte, groups)
            for c in CORRECTIONS:
                P, A = pred[c], actual
                if tests is not None:  # each group at its own test point
                    P, A = P[tests, np.arange(len(tests))][None], A[tests, np.arange(len(tests))][None]
                r, rho, slope, mae = metrics(P, A, tests is None)
                rows.append((kind, size, len(groups), int(np.mean([len(g) for g in groups])), c,
                             r, rho, slope, mae, secs[c] / len(groups)))
    print(f"\n### {name} ({est.__class__.__name__}, {setting}, {len(y)} train x {len(yte)} "
          f"test; {n_refits} refits in {time.perf_counter() - t0:.0f} s)\n")
    print("| kind | size | groups | points | correction | Pearson | Spearman per test | slope | MAE / mean abs actual | s per group |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, size, ng, m, c, r, rho, slope, mae, sec in rows:
        sz = size if isinstance(size, str) else f"{size:.0%}"
        rho_s = "" if np.isnan(rho) else f"{rho:.3f}"
        print(f"| {kind} | {sz} | {ng} | {m} | {c} | {r:.4f} | {rho_s} | {slope:.3f} | {mae:.1%} | {sec:.3f} |")
    return rows


def detection(name):
    """AUROC of finding 10% flipped labels, first order against Newton."""
    X, y, _, _ = load(name)
    y_noisy, flipped = flip_labels(y, 0.1, random_state=0)
    est, setting = model_for(name, X, y_noisy)
    model = est.fit(X, y_noisy)
    s = DirectInfluenceScorer(model, regularization=0.0, dtype="float64").fit(X, y_noisy)
    cols = np.searchsorted(s.classes_, y_noisy)
    rows = np.arange(len(y))
    out = {
        "self-influence (first order)": s.self_influence(),
        "self removal effect, Newton": s.self_removal_effect(),
        "1 - p(given label), fitted model": 1 - s.class_probabilities()[rows, cols],
        "1 - LOO p(given label), first order": 1 - s.leave_one_out_probabilities("none")[rows, cols],
        "1 - LOO p(given label), Newton": 1 - s.leave_one_out_probabilities("newton")[rows, cols],
    }
    print(f"\n### detection, {name} ({setting} on the noisy labels, {len(y)} train, 10% flipped)\n")
    print("| score | AUROC |")
    print("|---|---|")
    for k, v in out.items():
        print(f"| {k} | {roc_auc_score(flipped, v):.3f} |")


def _lbfgs(net, X, y, lam, n, weights=None, iters=500):
    """Minimise ``sum_i w_i l_i / n + lam / 2 ||theta||^2`` by full-batch L-BFGS."""
    import torch.nn.functional as F

    w = torch.ones(len(y), dtype=torch.float64) if weights is None else weights
    opt = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=iters, tolerance_grad=1e-11,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (w * F.cross_entropy(net(X), y, reduction="none")).sum() / n
        loss = loss + lam / 2 * sum((p**2).sum() for p in net.parameters())
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    return net


def run_mlp(fast, rng, hessian="exact"):
    """Digits MLP 64-32-10 (tanh, float64), trained to a minimum of mean CE + lam/2
    ||theta||^2 by L-BFGS; each removal retrained warm-started from the trained
    weights, the penalty kept as it was (the convention of the predictions)."""
    import copy

    import torch.nn.functional as F
    from torch import nn

    lam = 1e-2
    X, y, Xte, yte = load("digits")
    Xt, yt = torch.tensor(X), torch.tensor(y)
    n = len(y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    t0 = time.perf_counter()
    _lbfgs(net, Xt, yt, lam, n, iters=2000)
    scorer = DirectInfluenceScorer(net, loss=F.cross_entropy, regularization=lam,
                                   hessian=hessian, dtype="float64").fit(X, y)

    def test_loss(m):
        with torch.no_grad():
            return F.cross_entropy(m(torch.tensor(Xte)), torch.tensor(yte), reduction="none").numpy()

    base = test_loss(net)
    n_rep = 2 if fast else 5
    print(f"\n### digits MLP 64-32-10 (tanh, {scorer.n_params_} parameters, lambda={lam}, "
          f"hessian={hessian!r}, "
          f"{n} train x {len(yte)} test; retrains warm-started)\n")
    print("| size | groups | correction | Pearson | slope | MAE / mean abs actual |")
    print("|---|---|---|---|---|---|")
    for size in SIZES:
        m = 1 if size == "1 point" else round(size * n)
        reps = 3 * n_rep if size == "1 point" else n_rep
        groups = [rng.choice(n, m, replace=False) for _ in range(reps)]
        act = []
        for g in groups:
            w = torch.ones(n, dtype=torch.float64)
            w[torch.as_tensor(g)] = 0
            act.append(test_loss(_lbfgs(copy.deepcopy(net), Xt, yt, lam, n, w)) - base)
        act = np.stack(act, 1)
        for label, kw in (("none", {}), ("second-order", {"correction": "second-order"}),
                          ("newton", {"correction": "newton"}),
                          ("newton x3", {"correction": "newton", "newton_steps": 3})):
            try:
                p = scorer.predict_removal_effect(Xte, yte, groups=groups, **kw)
            except ValueError as exc:
                sz = size if isinstance(size, str) else f"{size:.0%}"
                print(f"| {sz} | {len(groups)} | {label} | {str(exc).split(';')[0]} | | |")
                continue
            r, _, slope, mae = metrics(p, act, False)
            sz = size if isinstance(size, str) else f"{size:.0%}"
            print(f"| {sz} | {len(groups)} | {label} | {r:.4f} | {slope:.3f} | {mae:.1%} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--datasets", nargs="*", default=["breast_cancer", "diabetes", "digits"])
    ap.add_argument("--no-detection", action="store_true")
    ap.add_argument("--mlp", action="store_true", help="also the digits MLP, warm-started")
    ap.add_argument("--mlp-hessian", default="exact", choices=["exact", "gauss-newton"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch threads: {torch.get_num_threads()}")
    for name in args.datasets:
        run_dataset(name, args.fast, np.random.default_rng(0))
    if args.mlp:
        run_mlp(args.fast, np.random.default_rng(0), args.mlp_hessian)
    if not args.no_detection:
        for name in ("breast_cancer", "digits"):
            detection(name)


if __name__ == "__main__":
    main()
