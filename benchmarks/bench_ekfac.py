"""EK-FAC side by side with pyDVL's EkfacInfluence, in one process.

1. Panel B (digits, MLP 64-32-32-10, 3,466 parameters, 1000 train / 200 test,
   regularization 0.1): fit + 200 x 1000 influence matrix, ours vs pyDVL's
   ``EkfacInfluence(update_diagonal=True, hessian_regularization=0.1)`` fitted on a
   DataLoader of batch 250. Accuracy: Pearson of the whole matrix against the same
   library's Direct method (ours against DirectInfluenceScorer, pyDVL's against
   pyDVL's DirectInfluence) and Spearman of the mean over test points.
2. ``--big``: the larger case (MLP 64-128-128-10, 26,122 parameters, 1,500 train /
   200 test). Reference: conjugate gradients at tight tolerance, skinfluence's
   CgInfluenceScorer when the package has it, else pyDVL's CgInfluence(rtol=1e-7,
   atol=1e-9, maxiter=2000). Also timed: pyDVL's other approximations, so that the
   table says which method is fastest.

Times are the best of ``--repeats`` rounds after one untimed round, for both
libraries alike; within a round the methods run in turn, so that all of them see the
same machine load. Writes its tables to benchmarks/results/ekfac.md.

Run:  python benchmarks/bench_ekfac.py [--big] [--repeats 5] [--threads 2]
Needs the benchmark extra: pip install -e ".[benchmarks]"
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from panels import panel_b, timed
from scipy.stats import pearsonr, spearmanr
from torch.utils.data import DataLoader, TensorDataset

import skinfluence
from skinfluence import DirectInfluenceScorer, EkfacInfluenceScorer

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="Full backward hook is firing")

REG = 0.1
OUR_VARIANTS = [
    ("skinfluence EkfacInfluenceScorer() [fisher='gauss-newton', basis_iter=2]", {}),
    ("skinfluence EkfacInfluenceScorer(basis_iter=0) (K-FAC eigenbasis)", {"basis_iter": 0}),
    ("skinfluence EkfacInfluenceScorer(fisher='true', random_state=0)", {"fisher": "true", "random_state": 0}),
    ("skinfluence EkfacInfluenceScorer(fisher='empirical')", {"fisher": "empirical"}),
    ("skinfluence EkfacInfluenceScorer(update_diagonal=False) (K-FAC)", {"update_diagonal": False}),
]
RESULTS = Path(__file__).parent / "results" / "ekfac.md"


def race(runners: dict, repeats: int) -> dict:
    """Best wall time of each runner over ``repeats`` rounds, run in turn within each
    round so that all of them see the same machine load; one untimed round first."""
    best, out = dict.fromkeys(runners, np.inf), {}
    for round_ in range(repeats + 1):
        for label, fn in runners.items():
            t0 = time.perf_counter()
            out[label] = fn()
            if round_:
                best[label] = min(best[label], time.perf_counter() - t0)
    return {label: (best[label], out[label]) for label in runners}


def _f64(a):
    return np.asarray(a, dtype=np.float64).ravel()


def accuracy(I, ref):
    """Pearson of the whole matrix, Spearman of the mean over test points."""
    return pearsonr(_f64(I), _f64(ref))[0], spearmanr(I.mean(0), ref.mean(0))[0]


def pydvl_runner(make, Xtr_t, ytr_t, Xte_t, yte_t):
    def run():
        dl = DataLoader(TensorDataset(Xtr_t, ytr_t), batch_size=250)
        return make().fit(dl).influences(Xte_t, yte_t, Xtr_t, ytr_t).detach().numpy()

    return run


def ours_runner(model, Xtr, ytr, Xte, yte, **kw):
    def run():
        s = EkfacInfluenceScorer(model, loss=F.cross_entropy, regularization=REG, **kw)
        return s.fit(Xtr, ytr).influences(Xte, yte)

    return run


def panel_b_case(repeats: int) -> str:
    from pydvl.influence.torch import DirectInfluence, EkfacInfluence

    model, Xtr, ytr, Xte, yte = panel_b()
    tensors = tuple(map(torch.as_tensor, (Xtr, ytr, Xte, yte)))
    n_params = sum(p.numel() for p in model.parameters())

    # references: each library's Direct method (one timed run each, they are slow)
    t_dd, D_ours = timed(
        lambda: DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=REG)
        .fit(Xtr, ytr).influences(Xte, yte), 1, warmup=False,
    )
    t_pd, D_pydvl = timed(
        pydvl_runner(lambda: DirectInfluence(model, F.cross_entropy, regularization=REG), *tensors),
        1, warmup=False,
    )
    pydvl_label = "pyDVL EkfacInfluence(update_diagonal=True)"
    runners = {
        pydvl_label: pydvl_runner(
            lambda: EkfacInfluence(model, update_diagonal=True, hessian_regularization=REG), *tensors
        )
    }
    for label, kw in OUR_VARIANTS:
        runners[label] = ours_runner(model, Xtr, ytr, Xte, yte, **kw)
    results = race(runners, repeats)
    t_p = results[pydvl_label][0]
    rows = [
        (label, t, *accuracy(I, D_pydvl if label == pydvl_label else D_ours))
        for label, (t, I) in results.items()
    ]
    lines = [
        f"### Panel B: digits MLP 64-32-32-10 ({n_params:,} parameters), 1000 train x 200 test, "
        f"regularization {REG}",
        "",
        "| method | fit + influences, s | pyDVL EK-FAC time / this | Pearson vs own Direct "
        "| Spearman mean-over-test vs own Direct |",
        "|---|---|---|---|---|",
    ]
    for label, t, r, rho in rows:
        lines.append(f"| {label} | {t:.3f} | {t_p / t:.1f}x | {r:.4f} | {rho:.4f} |")
    r_dd = pearsonr(_f64(D_ours), _f64(D_pydvl))[0]
    lines += [
        "",
        f"Direct references: skinfluence {t_dd:.2f} s, pyDVL {t_pd:.2f} s (one run each); "
        f"Pearson between the two Direct matrices {r_dd:.7f}.",
    ]
    return "\n".join(lines)


def _reference_cg(model, Xtr, ytr, Xte, yte, tensors):
    """A tight conjugate-gradient solution: ours if the package has it, else pyDVL's."""
    if hasattr(skinfluence, "CgInfluenceScorer"):
        cg = skinfluence.CgInfluenceScorer(
            model, loss=F.cross_entropy, regularization=REG, rtol=1e-7, atol=1e-9, maxiter=2000
        )
        t, I = timed(lambda: cg.fit(Xtr, ytr).influences(Xte, yte), 1, warmup=False)
        return "skinfluence CgInfluenceScorer(rtol=1e-7, atol=1e-9, maxiter=2000)", t, I
    from pydvl.influence.torch import CgInfluence

    def make():
        return CgInfluence(
            model, F.cross_entropy, regularization=REG, rtol=1e-7, atol=1e-9, maxiter=2000,
            solve_simultaneously=True, warn_on_max_iteration=False,
        )

    t, I = timed(pydvl_runner(make, *tensors), 1, warmup=False)
    return "pyDVL CgInfluence(rtol=1e-7, atol=1e-9, maxiter=2000, block)", t, I


def big_case(repeats: int) -> str:
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        EkfacInfluence,
        NystroemPreconditioner,
        NystroemSketchInfluence,
    )

    model, Xtr, ytr, Xte, yte = panel_b(hidden=128, n_train=1500, n_test=200)
    tensors = tuple(map(torch.as_tensor, (Xtr, ytr, Xte, yte)))
    n_params = sum(p.numel() for p in model.parameters())
    ref_label, t_ref, R = _reference_cg(model, Xtr, ytr, Xte, yte, tensors)

    rows = []
    slow = {  # seconds each: timed once
        "pyDVL ArnoldiInfluence(rank=30)": lambda: ArnoldiInfluence(
            model, F.cross_entropy, regularization=REG, rank=30
        ),
        "pyDVL CgInfluence(block, Nystroem preconditioner rank 10)": lambda: CgInfluence(
            model, F.cross_entropy, regularization=REG, solve_simultaneously=True,
            preconditioner=NystroemPreconditioner(rank=10), warn_on_max_iteration=False,
        ),
    }
    for label, make in slow.items():
        t, I = timed(pydvl_runner(make, *tensors), 1, warmup=False)
        rows.append((label, t, pearsonr(_f64(I), _f64(R))[0]))
    # the package's other approximations, where it has them (timed once)
    others = {
        "skinfluence CgInfluenceScorer() (rtol=1e-5)": ("CgInfluenceScorer", {}),
        "skinfluence ArnoldiInfluenceScorer(rank=30)": ("ArnoldiInfluenceScorer", {"rank": 30, "random_state": 0}),
    }
    for label, (name, kw) in others.items():
        cls = getattr(skinfluence, name, None)
        if cls is None:
            continue
        scorer = cls(model, loss=F.cross_entropy, regularization=REG, **kw)
        try:
            t, I = timed(lambda s=scorer: s.fit(Xtr, ytr).influences(Xte, yte), 1, warmup=False)
        except Exception as exc:  # report, do not stop the comparison
            print(f"{label}: {type(exc).__name__}: {exc}")
            continue
        rows.append((label, t, pearsonr(_f64(I), _f64(R))[0]))
    pydvl_label = "pyDVL EkfacInfluence(update_diagonal=True)"
    runners = {
        pydvl_label: pydvl_runner(
            lambda: EkfacInfluence(model, update_diagonal=True, hessian_regularization=REG), *tensors
        ),
        "pyDVL NystroemSketchInfluence(rank=30)": pydvl_runner(
            lambda: NystroemSketchInfluence(model, F.cross_entropy, regularization=REG, rank=30),
            *tensors,
        ),
    }
    for label, kw in OUR_VARIANTS[:2]:
        runners[label] = ours_runner(model, Xtr, ytr, Xte, yte, **kw)
    if hasattr(skinfluence, "NystroemInfluenceScorer"):
        nys = skinfluence.NystroemInfluenceScorer(
            model, loss=F.cross_entropy, regularization=REG, rank=30, random_state=0
        )
        runners["skinfluence NystroemInfluenceScorer(rank=30)"] = (
            lambda: nys.fit(Xtr, ytr).influences(Xte, yte)
        )
    results = race(runners, repeats)
    t_p = results[pydvl_label][0]
    rows += [(label, t, pearsonr(_f64(I), _f64(R))[0]) for label, (t, I) in results.items()]

    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    t_floor, _ = timed(lambda: (g(params, tensors[0], tensors[1]), g(params, tensors[2], tensors[3])), repeats)

    lines = [
        f"### Larger case: MLP 64-128-128-10 ({n_params:,} parameters), 1500 train x 200 test, "
        f"regularization {REG}",
        "",
        f"Reference: {ref_label}, {t_ref:.1f} s.",
        "",
        "| method | fit + influences, s | pyDVL EK-FAC time / this | Pearson vs reference |",
        "|---|---|---|---|",
    ]
    for label, t, r in sorted(rows, key=lambda row: row[1]):
        lines.append(f"| {label} | {t:.3f} | {t_p / t:.1f}x | {r:.4f} |")
    lines.append(f"| per-sample gradients of all 1,700 points (floor) | {t_floor:.3f} | | |")
    lines += [
        "",
        "pyDVL's LissaInfluence (197 s in shared/ANCHORS.md) and skinfluence's Lissa are "
        "left out. CG and Arnoldi (both libraries) are timed once without warm-up; the "
        "other rows are the best of the rounds.",
    ]
    return "\n".join(lines)


def save(section: str, text: str) -> None:
    """Replace one section (by its ### title) of the results file, keeping the others."""
    RESULTS.parent.mkdir(exist_ok=True)
    header = "## EK-FAC vs pyDVL (same process; threads and load on each run's last line)\n"
    old = RESULTS.read_text() if RESULTS.exists() else header
    parts = re.split(r"(?m)^(?=### )", old)
    kept = [p for p in parts[1:] if not p.startswith(section)]
    body = [parts[0].rstrip() + "\n"] + [p.rstrip() + "\n" for p in kept] + [text.rstrip() + "\n"]
    RESULTS.write_text("\n".join(body))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true", help="also run the 26k-parameter case")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load:.1f} at start; run {time.strftime('%Y-%m-%d %H:%M')}"
    )
    text = panel_b_case(args.repeats) + f"\n\n{env}. Reproduce: `python benchmarks/bench_ekfac.py`."
    print(text, flush=True)
    save("### Panel B", text)
    if args.big:
        text = big_case(args.repeats) + f"\n\n{env}. Reproduce: `python benchmarks/bench_ekfac.py --big`."
        print("\n" + text)
        save("### Larger case", text)


if __name__ == "__main__":
    main()
