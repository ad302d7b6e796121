"""Matrix-free inverse-curvature methods side by side with pyDVL, in one process.

Panel B (digits, MLP 64-32-32-10, 3,466 parameters, 1000 train / 200 test,
regularization 0.1, mode "up"): for each method, ours and pyDVL's counterpart with
the same settings, fit + influence matrix (200 x 1000) in seconds, and the Pearson
correlation of the whole matrix with the Direct method's (ours against our Direct,
pyDVL's against pyDVL's Direct; the two Directs are cross-checked too).

* CG: block CG with a rank-10 Nystroem preconditioner (pyDVL: CgInfluence with
  solve_simultaneously=True, NystroemPreconditioner(rank=10)), default tolerances.
* LiSSA: maxiter=1000 (ours: scale="auto", stops at its default rtol=1e-4).
* Arnoldi: rank 30.   * Nystroem: rank 30 (pyDVL: NystroemSketchInfluence).

--big adds the larger case (MLP 64-128-128-10, 26,122 parameters, 1,500 train /
200 test; reference = CG at rtol 1e-7, ours and pyDVL's), with the peak resident
memory of the process during each method and, in brackets, how much the method
added to what the process held before it started.

Times are the best of --repeats runs after one warm-up, ours and pyDVL's run
alternately so that both see the same machine load (pyDVL's LiSSA runs once, and in
the larger case every method runs once).
The table is printed and saved to benchmarks/results/matrix_free.md.

Run:  python benchmarks/bench_matrix_free.py [--big] [--repeats N] [--threads N]
Needs the benchmark extra: pip install -e ".[benchmarks]"
"""

from __future__ import annotations

import argparse
import re
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from panels import panel_b
from scipy.stats import pearsonr, spearmanr
from sklearn.exceptions import ConvergenceWarning
from torch.utils.data import DataLoader, TensorDataset

from skinfluence import (
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    DirectInfluenceScorer,
    LissaInfluenceScorer,
    NystroemInfluenceScorer,
)

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=ConvergenceWarning)
RESULTS = Path(__file__).parent / "results" / "matrix_free.md"
REG = 0.1


# --------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak resident memory of the process while the block runs, and how much of it
    the block added. Freed heap memory is handed back to the system first and the
    kernel's high-water mark reset (Linux), so each block is measured on its own;
    where that is not possible, RSS is sampled every 2 ms instead."""

    def __enter__(self):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._thread = None
        except OSError:
            self.peak = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak = _status_kb("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        self.peak_mb = self.peak / 2**20
        self.added_mb = (self.peak - self.base) / 2**20


# --------------------------------------------------------------------------- methods
def ours(name: str, model):
    kw = {"loss": F.cross_entropy, "regularization": REG}
    if name == "Direct":
        return DirectInfluenceScorer(model, **kw)
    if name == "CG (ref, rtol 1e-7)":
        return CgInfluenceScorer(model, rtol=1e-7, **kw)
    if name == "CG":
        return CgInfluenceScorer(model, preconditioner="nystroem", rank=10, random_state=0, **kw)
    if name == "LiSSA":
        return LissaInfluenceScorer(model, maxiter=1000, random_state=0, **kw)
    if name == "Arnoldi":
        return ArnoldiInfluenceScorer(model, rank=30, random_state=0, **kw)
    if name == "Nystroem":
        return NystroemInfluenceScorer(model, rank=30, random_state=0, **kw)
    raise ValueError(name)


def theirs(name: str, model):
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        DirectInfluence,
        LissaInfluence,
        NystroemPreconditioner,
        NystroemSketchInfluence,
    )

    loss = F.cross_entropy
    if name == "Direct":
        return DirectInfluence(model, loss, regularization=REG)
    if name == "CG (ref, rtol 1e-7)":
        return CgInfluence(
            model, loss, regularization=REG, rtol=1e-7, atol=1e-9, maxiter=2000,
            solve_simultaneously=True, warn_on_max_iteration=False,
        )
    if name == "CG":
        return CgInfluence(
            model, loss, regularization=REG, solve_simultaneously=True,
            preconditioner=NystroemPreconditioner(rank=10), warn_on_max_iteration=False,
        )
    if name == "LiSSA":
        return LissaInfluence(model, loss, regularization=REG, maxiter=1000,
                              warn_on_max_iteration=False)
    if name == "Arnoldi":
        return ArnoldiInfluence(model, loss, regularization=REG, rank=30)
    if name == "Nystroem":
        return NystroemSketchInfluence(model, loss, regularization=REG, rank=30)
    raise ValueError(name)


def timed_pair(fn_a, fn_b, repeats: int, warmup: bool):
    """Best seconds, last result and largest (peak MB, MB added) of two functions run
    alternately ``repeats`` times after a warm-up of each, so that both see the same
    machine load."""
    if warmup:
        fn_a()
        fn_b()
    stats = [[float("inf"), None, (0.0, 0.0)], [float("inf"), None, (0.0, 0.0)]]
    for _ in range(repeats):
        for k, fn in enumerate((fn_a, fn_b)):
            with PeakMemory() as pm:
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
            best, _, mem = stats[k]
            stats[k] = [min(best, dt), out, max(mem, (pm.peak_mb, pm.added_mb))]
    return stats


def pearson(a, b) -> float:
    return float(pearsonr(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0])


def fmt_r(r: float) -> str:
    return f"{r:.6f}" if r < 0.999999 else f"1 - {1 - r:.1e}"


def run_case(hidden, n_train, n_test, methods, reference, repeats, slow, seeds_for=()):
    model, Xtr, ytr, Xte, yte = panel_b(hidden=hidden, n_train=n_train, n_test=n_test)
    n_params = sum(p.numel() for p in model.parameters())
    Xtr_t, ytr_t, Xte_t, yte_t = map(torch.as_tensor, (Xtr, ytr, Xte, yte))
    dl = DataLoader(TensorDataset(Xtr_t, ytr_t), batch_size=250)

    def run_ours(name):
        return ours(name, model).fit(Xtr, ytr).influences(Xte, yte)

    def run_theirs(name):
        inf = theirs(name, model).fit(dl)
        return inf.influences(Xte_t, yte_t, Xtr_t, ytr_t).detach().numpy()

    rows, ref_ours, ref_theirs = [], None, None
    for name in [reference, *methods]:
        (t_o, I_o, m_o), (t_t, I_t, m_t) = timed_pair(
            lambda n=name: run_ours(n), lambda n=name: run_theirs(n),
            1 if name in slow else repeats, warmup=name not in slow,
        )
        if name == reference:
            ref_ours, ref_theirs = I_o, I_t
        row = {
            "method": name, "t_ours": t_o, "t_pydvl": t_t, "mem_ours": m_o, "mem_pydvl": m_t,
            "r_ours": pearson(I_o, ref_ours), "r_pydvl": pearson(I_t, ref_theirs),
            "rho_ours": float(spearmanr(I_o.mean(0), ref_ours.mean(0))[0]),
            "rho_pydvl": float(spearmanr(I_t.mean(0), ref_theirs.mean(0))[0]),
        }
        if name == reference:
            row["cross"] = pearson(I_o, I_t)
            row["cross_rel"] = float(np.linalg.norm(I_o - I_t) / np.linalg.norm(I_t))
        if name in seeds_for:
            row["seeds"] = _seed_spread(name, model, run_theirs, Xtr, ytr, Xte, yte,
                                        ref_ours, ref_theirs)
        rows.append(row)
        print(_row_text(row), flush=True)
    hvp = _hvp_parity(model, Xtr, ytr, dl)
    return n_params, rows, hvp


def _seed_spread(name, model, run_theirs, Xtr, ytr, Xte, yte, ref_ours, ref_theirs, n=5):
    """Pearson against the reference over n seeds of the random sketch, both sides."""
    mine, other = [], []
    for seed in range(n):
        s = ours(name, model).set_params(random_state=seed)
        mine.append(pearson(s.fit(Xtr, ytr).influences(Xte, yte), ref_ours))
        torch.manual_seed(seed)  # pyDVL draws its test matrix from torch's global RNG
        other.append(pearson(run_theirs(name), ref_theirs))
    return np.array(mine), np.array(other)


def _hvp_parity(model, Xtr, ytr, dl, k=200):
    """Seconds for one product of the curvature with k vectors, over all training
    points: the unit of work every method here is built from."""
    from pydvl.influence.torch.operator import HessianOperator

    from skinfluence._adapters import build_adapter
    from skinfluence.solvers import CurvatureOperator

    a = build_adapter(model, loss=F.cross_entropy)
    X = a.features(Xtr)
    a.bind(X, len(X))
    op = CurvatureOperator(a, X, a.targets(ytr), "exact", REG, 256)
    hop = HessianOperator(model, F.cross_entropy, dl)
    V = torch.randn(k, a.n_params)
    (t_o, _, _), (t_t, _, _) = timed_pair(lambda: op.data_mv(V), lambda: hop.apply(V), 3,
                                          warmup=True)
    return k, t_o, t_t


def _row_text(r) -> str:
    return (
        f"{r['method']:22s} ours {r['t_ours']:8.3f}s  pyDVL {r['t_pydvl']:8.3f}s  "
        f"x{r['t_pydvl'] / r['t_ours']:6.1f}  r ours {fmt_r(r['r_ours'])}  "
        f"r pyDVL {fmt_r(r['r_pydvl'])}  peak MB (added) ours {r['mem_ours'][0]:.0f} "
        f"({r['mem_ours'][1]:.0f}) pyDVL {r['mem_pydvl'][0]:.0f} ({r['mem_pydvl'][1]:.0f})"
    )


def table(title, n_params, rows, ref_label, memory, hvp) -> str:
    head = (
        "| method | ours, s | pyDVL, s | speed-up | Pearson vs " + ref_label + ", ours | "
        "Pearson vs " + ref_label + ", pyDVL | Spearman mean-over-test, ours | "
        "Spearman mean-over-test, pyDVL |"
        + (" peak MB (added), ours | peak MB (added), pyDVL |" if memory else "")
    )
    sep = "|" + "---|" * (8 + (2 if memory else 0))
    lines = [f"### {title} ({n_params:,} parameters)", "", head, sep]
    for r in rows:
        line = (
            f"| {r['method']} | {r['t_ours']:.3f} | {r['t_pydvl']:.3f} | "
            f"{r['t_pydvl'] / r['t_ours']:.1f}x | {fmt_r(r['r_ours'])} | {fmt_r(r['r_pydvl'])} | "
            f"{r['rho_ours']:.4f} | {r['rho_pydvl']:.4f} |"
        )
        if memory:
            line += (f" {r['mem_ours'][0]:.0f} ({r['mem_ours'][1]:.0f}) |"
                     f" {r['mem_pydvl'][0]:.0f} ({r['mem_pydvl'][1]:.0f}) |")
        lines.append(line)
    cross = rows[0]
    lines += [
        "",
        f"Our {ref_label} against pyDVL's: Pearson {fmt_r(cross['cross'])}, relative "
        f"Frobenius difference {cross['cross_rel']:.1e}.",
    ]
    for r in rows:
        if "seeds" in r:
            mine, other = r["seeds"]
            lines.append(
                f"{r['method']} over random seeds 0-{len(mine) - 1}: Pearson ours mean "
                f"{mine.mean():.4f} [{mine.min():.4f}, {mine.max():.4f}], pyDVL mean "
                f"{other.mean():.4f} [{other.min():.4f}, {other.max():.4f}]."
            )
    k, t_o, t_t = hvp
    lines.append(
        f"One product of the exact Hessian with {k} vectors over all training points: "
        f"ours {t_o:.3f} s, pyDVL {t_t:.3f} s (the unit of work of CG, LiSSA, Arnoldi "
        "and Nystroem; speed-ups beyond this ratio come from needing fewer products)."
    )
    return "\n".join(lines)


SECTIONS = ("panel-b", "big")


def save(section: str, text: str, header: str) -> None:
    """Write the header and every section, replacing only the one just measured."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = RESULTS.read_text() if RESULTS.exists() else ""
    blocks = {}
    for name in SECTIONS:
        m = re.search(rf"<!-- {name} -->.*?<!-- /{name} -->", old, re.S)
        if m:
            blocks[name] = m.group(0)
    blocks[section] = f"<!-- {section} -->\n{text}\n<!-- /{section} -->"
    RESULTS.write_text(header + "\n\n".join(blocks[n] for n in SECTIONS if n in blocks) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", action="store_true", help="also run the 26,122-parameter case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = (
        "# Matrix-free methods against pyDVL 0.10\n\n"
        "Produced by `python benchmarks/bench_matrix_free.py [--big] [--threads N]` (both "
        f"libraries in one process, on the CPU). Regularization {REG}, mode "
        '"up"; times are the best of several alternating runs after a warm-up (LiSSA and '
        "the larger case: one run each). Pearson is over the whole influence matrix; "
        "values within 1e-6 of 1 are shown as 1 - (1 - r).\n\n"
    )
    methods = ["CG", "LiSSA", "Arnoldi", "Nystroem"]
    print(f"torch threads: {args.threads}")
    print("Panel B: digits, MLP 64-32-32-10, 1000 train / 200 test")
    n_params, rows, hvp = run_case(32, 1000, 200, methods, "Direct", args.repeats,
                                   slow={"LiSSA"}, seeds_for={"Nystroem"})
    text = table(f"Panel B: digits MLP 64-32-32-10, 1000 train / 200 test, "
                 f"{args.threads} torch thread(s)", n_params, rows,
                 "Direct", memory=False, hvp=hvp)
    print(text)
    save("panel-b", text, header)
    if args.big:
        print("\nLarger case: digits, MLP 64-128-128-10, 1500 train / 200 test")
        n_params, rows, hvp = run_case(
            128, 1500, 200, methods, "CG (ref, rtol 1e-7)", 1,
            slow={"LiSSA", "CG (ref, rtol 1e-7)", "CG", "Arnoldi"},
        )
        text = table(f"Larger case: digits MLP 64-128-128-10, 1500 train / 200 test, "
                     f"{args.threads} torch thread(s)", n_params,
                     rows, "CG (ref, rtol 1e-7)", memory=True, hvp=hvp)
        print(text)
        save("big", text, header)
    print(f"\nsaved to {RESULTS}")


if __name__ == "__main__":
    main()
