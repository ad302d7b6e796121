"""Direct method side by side with pyDVL, in one process.

1. Panel B (digits, MLP 64-32-32-10, 3,466 parameters, 1000 train / 200 test,
   regularization 0.1): fit + influence matrix, ours vs pyDVL's DirectInfluence,
   and how far apart the two matrices are.
2. Panel C setup (digits, 1,257 training points, 10% flipped labels, skorch MLP):
   self-influence of every training point, ours (one call, diagonal only) vs
   pyDVL's one influences() call per point. pyDVL's loop takes about ten minutes
   here; by default it is timed on --pydvl-points points and scaled to 1,257 (each
   call does the same work), --full runs all of them.

Run:  python benchmarks/bench_direct.py [--full] [--pydvl-points N]
Needs the benchmark extra: pip install -e ".[benchmarks]"
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from panels import MLP, panel_b, panel_c_datasets, panel_c_split, timed
from scipy.stats import pearsonr
from torch.utils.data import DataLoader, TensorDataset

from skinfluence import DirectInfluenceScorer

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)


def panel_b_direct(repeats: int):
    from pydvl.influence.torch import DirectInfluence

    model, Xtr, ytr, Xte, yte = panel_b()
    Xtr_t, ytr_t, Xte_t, yte_t = map(torch.as_tensor, (Xtr, ytr, Xte, yte))

    def ours():
        s = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.1).fit(Xtr, ytr)
        return s.transform(Xte, yte)

    def theirs():
        dl = DataLoader(TensorDataset(Xtr_t, ytr_t), batch_size=250)
        inf = DirectInfluence(model, F.cross_entropy, regularization=0.1).fit(dl)
        return inf.influences(Xte_t, yte_t, Xtr_t, ytr_t).numpy()

    t_ours, I = timed(ours, repeats, warmup=False)
    t_theirs, J = timed(theirs, repeats, warmup=False)
    rel = np.linalg.norm(I - J) / np.linalg.norm(J)
    return {
        "t_ours": t_ours, "t_pydvl": t_theirs, "pearson": pearsonr(I.ravel().astype(np.float64), J.ravel().astype(np.float64))[0],
        "rel_err": rel, "max_rel": np.abs(I - J).max() / np.abs(J).max(),
    }


def panel_c_self(full: bool, n_points: int):
    from pydvl.influence.torch import DirectInfluence
    from skorch import NeuralNetClassifier

    _, X, y = next(d for d in panel_c_datasets() if d[0] == "digits")
    Xtr, ynoisy, _, _, _, _ = panel_c_split(X, y)
    torch.manual_seed(0)
    net = NeuralNetClassifier(
        MLP, module__d_in=64, module__d_h=32, module__d_out=10, max_epochs=100, lr=0.01,
        optimizer=torch.optim.Adam, optimizer__weight_decay=1e-3, batch_size=64,
        criterion=torch.nn.CrossEntropyLoss, train_split=None, verbose=0,
    ).fit(Xtr, ynoisy)
    n = len(ynoisy)
    t0 = time.perf_counter()
    scorer = DirectInfluenceScorer(net, regularization=0.1).fit(Xtr, ynoisy)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = scorer.self_influence()
    t_self = time.perf_counter() - t0

    model = net.module_.eval()
    Xt, yt = torch.as_tensor(Xtr), torch.as_tensor(ynoisy)
    t0 = time.perf_counter()
    inf = DirectInfluence(model, F.cross_entropy, regularization=0.1).fit(DataLoader(TensorDataset(Xt, yt), batch_size=512))
    t_fit_p = time.perf_counter() - t0
    idx = np.arange(n) if full else np.random.default_rng(0).choice(n, n_points, replace=False)
    t0 = time.perf_counter()
    theirs = np.array([inf.influences(Xt[i : i + 1], yt[i : i + 1], Xt[i : i + 1], yt[i : i + 1]).item() for i in idx])
    t_loop = (time.perf_counter() - t0) * n / len(idx)
    return {
        "n": n, "t_fit": t_fit, "t_self": t_self, "t_fit_pydvl": t_fit_p, "t_loop_pydvl": t_loop,
        "timed_points": len(idx), "max_rel": np.abs(ours[idx] - theirs).max() / np.abs(theirs).max(),
        "from_pydvl": "all" if full else f"{len(idx)} timed, scaled to {n}",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="run pyDVL's self-influence loop on all points")
    ap.add_argument("--pydvl-points", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    b = panel_b_direct(args.repeats)
    c = panel_c_self(args.full, args.pydvl_points)
    lines = [
        "## Direct method vs pyDVL (same process, 2 CPU threads)",
        "",
        "| task | skinfluence, s | pyDVL, s | speed-up | agreement |",
        "|---|---|---|---|---|",
        f"| panel B: fit + 200 x 1000 influences (3,466 params) | {b['t_ours']:.2f} | {b['t_pydvl']:.2f} | "
        f"{b['t_pydvl'] / b['t_ours']:.1f}x | Pearson {b['pearson']:.7f}, rel. error {b['rel_err']:.1e} (max {b['max_rel']:.1e}) |",
        f"| panel C digits: self-influence of {c['n']} points | {c['t_self']:.2f} | {c['t_loop_pydvl']:.1f} "
        f"({c['from_pydvl']}) | {c['t_loop_pydvl'] / c['t_self']:.0f}x | max rel. difference {c['max_rel']:.1e} |",
        f"| panel C digits: fit + self-influence | {c['t_fit'] + c['t_self']:.2f} | "
        f"{c['t_fit_pydvl'] + c['t_loop_pydvl']:.1f} | {(c['t_fit_pydvl'] + c['t_loop_pydvl']) / (c['t_fit'] + c['t_self']):.0f}x | |",
        "",
        f"Times are the best of {args.repeats} runs for panel B. Reproduce: `python benchmarks/bench_direct.py`.",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "direct.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
