"""The same computations with two checkouts of skinfluence, side by side.

For a change that must not change behaviour: runs every method on panel B (digits
MLP 64-32-32-10, 1000 train / 200 test, regularization 0.1), self-influence, and
the MislabelDetector on panel C's wine, once with the package of this checkout and
once with the package of another checkout (``--other PATH``, e.g. a ``git
worktree`` of an earlier commit), each in its own process with one torch thread.
Prints the largest relative difference of each result between the two and the
best-of-N times of both.

Run:  python benchmarks/bench_revisions.py --other /path/to/other/checkout [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CASES = {
    "Direct": ("DirectInfluenceScorer", {}),
    "CG": ("CgInfluenceScorer", {"preconditioner": "nystroem", "rank": 10, "random_state": 0}),
    "LiSSA": ("LissaInfluenceScorer", {"random_state": 0}),
    "Arnoldi": ("ArnoldiInfluenceScorer", {"rank": 30, "random_state": 0}),
    "Nystroem": ("NystroemInfluenceScorer", {"rank": 30, "random_state": 0}),
    "EK-FAC": ("EkfacInfluenceScorer", {}),
}

WORKER = r"""
import json, sys, time, warnings
import numpy as np, torch
torch.set_num_threads(1)
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])          # the package to measure
sys.path.insert(1, sys.argv[2])          # benchmarks/ (panels)
import skinfluence
from panels import panel_b, panel_c_datasets, panel_c_split
cases, repeats, out = json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model, Xtr, ytr, Xte, yte = panel_b()
loss = torch.nn.functional.cross_entropy
res, times = {}, {}
for name, (cls, kw) in cases.items():
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        s = getattr(skinfluence, cls)(model, loss=loss, regularization=0.1, **kw).fit(Xtr, ytr)
        I = s.influences(Xte, yte)
        best = min(best, time.perf_counter() - t0)
    res[name] = I
    res[name + " self"] = s.self_influence()
    times[name] = best
Xw, yw = next((X, y) for n, X, y in panel_c_datasets() if n == "wine")
Xn, yn, _, flipped, _, _ = panel_c_split(Xw, yw)
from sklearn.linear_model import LogisticRegression
for strategy in ("crossfit", "loo", "self", "harm"):
    t0 = time.perf_counter()
    det = skinfluence.MislabelDetector(LogisticRegression(max_iter=1000), strategy=strategy,
                                       random_state=0).fit(Xn, yn)
    times["detector " + strategy] = time.perf_counter() - t0
    res["detector " + strategy] = det.scores_
np.savez(out, **res)
print(json.dumps(times))
"""


def run(package: Path, repeats: int) -> tuple[dict, dict]:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.npz")
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, str(package), str(HERE), json.dumps(CASES),
             str(repeats), out],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        times = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(out) as data:
            return {k: data[k] for k in data.files}, times


def main():
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="root of the other checkout")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--this", default=None, help="root of the checkout to compare (default: this one)")
    args = ap.parse_args()
    other_res, other_t = run(Path(args.other).resolve(), args.repeats)
    this_res, this_t = run(Path(args.this).resolve() if args.this else HERE.parent, args.repeats)
    print(f"other: {args.other}\nthis:  {args.this or HERE.parent}\n")
    print("| result | max relative difference | this, s | other, s | ratio |")
    print("|---|---|---|---|---|")
    for key in this_res:
        a, b = this_res[key], other_res[key]
        diff = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))
        t = this_t.get(key)
        ts = "" if t is None else f"{t:.3f} | {other_t[key]:.3f} | {other_t[key] / t:.2f}"
        print(f"| {key} | {diff:.1e} | {ts or ' | | '} |")


if __name__ == "__main__":
    main()
