"""Block-diagonal curvature (block_structure="layer") against the full curvature.

digits, standardized, 1000 train / 200 test, the panels' 3-layer tanh MLP
64-128-128-10 (26,122 parameters in blocks of 8,320, 16,512 and 1,290), float32,
regularization 0.1, the empirical Fisher (positive semi-definite; the exact
Hessian of this network plus 0.1 I is not positive definite on 1,500 of these
points, benchmarks/results/preconditioned.md). For each method and structure: the time to fit
and to compute the 200 x 1000 influence matrix, the peak resident memory of the
process above what it held before fitting, the numbers the fitted solver keeps,
and the Pearson correlation of the influences with those of the full-curvature
Direct method (the exact reference). Each configuration runs in a fresh process,
so that its peak memory is its own.

Run:  python benchmarks/bench_block_structure.py [--methods direct cg arnoldi]
          [--threads 2] [--regularization 0.1]
Writes benchmarks/results/block_structure.md (block_structure_<lambda>.md for
another regularization).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from panels import panel_b
from scipy.stats import pearsonr

import skinfluence as sk

SETTINGS = {
    "direct": (sk.DirectInfluenceScorer, {}),
    "cg": (sk.CgInfluenceScorer, {}),
    "arnoldi": (sk.ArnoldiInfluenceScorer, {"rank": 50, "random_state": 0}),
}
COMMON = {"loss": F.cross_entropy, "hessian": "empirical-fisher", "batch_size": 64}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover - Linux only


def _kept_numbers(solver) -> int:
    """Numbers the fitted solver holds in its dense factors or low-rank bases."""
    parts = getattr(solver, "solvers_", [solver])
    total = 0
    for s in parts:
        for name in ("cholesky_", "eigenvectors_"):
            t = getattr(s, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel()
    return total


def one(method: str, structure: str, out: Path, threads: int, regularization: float) -> None:
    """Fit and score one configuration; write its influences and figures."""
    torch.set_num_threads(threads)
    model, Xtr, ytr, Xte, yte = torch.load(out / "data.pt", weights_only=False)
    cls, kw = SETTINGS[method]
    scorer = cls(model, block_structure=structure, regularization=regularization, **COMMON, **kw)
    base = _rss_mb()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer.fit(Xtr, ytr)
        t1 = time.perf_counter()
        I = scorer.influences(Xte, yte)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(out / f"{method}-{structure}.npy", I)
    figures = {
        "fit_s": t1 - t0, "influences_s": t2 - t1, "peak_mb": peak - base,
        "kept": _kept_numbers(scorer.solver_), "n_params": scorer.n_params_,
    }
    (out / f"{method}-{structure}.json").write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--regularization", type=float, default=0.1)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "STRUCTURE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], args.one[1], Path(args.one[2]), args.threads, args.regularization)
        return
    here = Path(__file__).parent
    name = "block_structure.md" if args.regularization == 0.1 else f"block_structure_{args.regularization:g}.md"
    configs = [("direct", "full")] + [
        (m, s) for m in args.methods for s in ("full", "layer") if (m, s) != ("direct", "full")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.threads)
        torch.save(panel_b(hidden=128), Path(tmp) / "data.pt")
        done = []
        for method, structure in configs:
            print(f"{method} {structure} ...", flush=True)
            subprocess.run(
                [sys.executable, __file__, "--one", method, structure, tmp, "--threads", str(args.threads),
                 "--regularization", str(args.regularization)],
                check=True,
            )
            done.append((method, structure))
            text = _table(Path(tmp), done, args)
            (here / "results" / name).write_text(text)
    print(text)


def _table(tmp: Path, configs, args) -> str:
    reference = np.load(tmp / "direct-full.npy").astype(np.float64).ravel()
    rows = []
    for method, structure in configs:
        fig = json.loads((tmp / f"{method}-{structure}.json").read_text())
        I = np.load(tmp / f"{method}-{structure}.npy").astype(np.float64).ravel()
        fig["pearson"] = float(pearsonr(I, reference)[0])
        rows.append((method, structure, fig))
    p = rows[0][2]["n_params"]
    blocks = "8,320, 16,512 and 1,290"
    lines = [
        "# Block-diagonal curvature: block_structure=\"layer\" against \"full\"",
        "",
        f"digits, 1000 train / 200 test, MLP 64-128-128-10 ({p:,} parameters; layer blocks "
        f"of {blocks}), float32, regularization {args.regularization:g}, "
        "hessian=\"empirical-fisher\", batch_size 64, "
        f"{args.threads} torch thread(s), each configuration in a fresh process. Peak memory: "
        "the process's peak resident memory above what it held before fitting. Kept: "
        "numbers the fitted solver stores (Cholesky factors, eigenvectors). Pearson: of "
        "the 200 x 1000 influences with those of the full-curvature Direct method.",
        "",
        f"Command: `python benchmarks/bench_block_structure.py --methods {' '.join(args.methods)} "
        f"--threads {args.threads}"
        + (f" --regularization {args.regularization:g}`" if args.regularization != 0.1 else "`"),
        "",
        "| method | block_structure | fit (s) | influences (s) | peak memory (MB) | kept (M numbers) | Pearson vs full Direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, structure, f in rows:
        lines.append(
            f"| {method} | {structure} | {f['fit_s']:.1f} | {f['influences_s']:.1f} | "
            f"{f['peak_mb']:.0f} | {f['kept'] / 1e6:.1f} | {f['pearson']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
