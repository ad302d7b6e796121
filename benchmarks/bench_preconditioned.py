"""Curvature-preconditioned CG and LiSSA side by side with pyDVL 0.10, in one process.

Every solver is run to the same relative residual, ``||g - A x|| <= 1e-6 ||g||``
for each of the 200 test gradients g (A = curvature + 0.1 I): ours with
``rtol=1e-6``; pyDVL's block CG with ``rtol=1e-3, atol=0`` (its rule is
``||r|| <= rtol**2 ||g||``), with its ``NystroemPreconditioner(rank=10)``; pyDVL's
LiSSA with ``rtol=1e-6`` on its elementwise relative update, over the whole
training set per step (a deterministic iteration, like ours) and with the scale our
``scale="auto"`` picks (pyDVL's default scale of 10 needs thousands of steps here).
The residual each result actually reaches is measured afterwards, in float64, with
one product of the curvature.

Reported per solver: iterations, Hessian-vector products (one product of A with one
vector over all training points; pyDVL's block CG spends one block on its initial
residual), and the seconds of fit + ``influence_factors`` (the solve; the influence
matrix after it is one more gradient product, the same for every solver).

Cases:

* Panel B: digits MLP 64-32-32-10 (3,466 parameters), 1,000 train / 200 test,
  exact Hessian, regularization 0.1.
* Larger: digits MLP 64-128-128-10 (26,122 parameters), 1,500 train / 200 test,
  regularization 0.1, empirical Fisher (ours ``hessian="empirical-fisher"``, with
  EK-FAC factors from the given labels; pyDVL's ``SecondOrderMode.GAUSS_NEWTON``,
  documented as that matrix, the mean of the per-sample gradients' outer products). The
  exact Hessian plus 0.1 I is not positive definite there (its smallest eigenvalue,
  by Lanczos, is printed); EK-FAC-preconditioned CG on it stops on that negative
  curvature with NotPositiveDefiniteError, which is checked too.

Runs alternate ours and pyDVL's and keep the best of --repeats runs (CG after a
warm-up; the larger case: one run each). The tables are
printed and saved to benchmarks/results/preconditioned.md.

Run:  PYTHONPATH=/path/to/pydvl python benchmarks/bench_preconditioned.py [--big] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from panels import panel_b
from sklearn.exceptions import ConvergenceWarning
from torch.utils.data import DataLoader, TensorDataset

from skinfluence import CgInfluenceScorer, LissaInfluenceScorer, NotPositiveDefiniteError
from skinfluence._adapters import build_adapter
from skinfluence._gradients import per_sample_grads
from skinfluence._linalg import block_lanczos
from skinfluence.solvers import CurvatureOperator
from skinfluence.solvers.ekfac import kronecker_preconditioner

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=ConvergenceWarning)
RESULTS = Path(__file__).parent / "results" / "preconditioned.md"
REG = 0.1
RTOL = 1e-6
COUNT = {"products": 0, "iterations": 0}


# --------------------------------------------------------------------------- pyDVL, counted
def _count_pydvl():
    """Count the products pyDVL's CG and LiSSA take, by wrapping the methods that
    apply the regularized curvature."""
    from pydvl.influence.torch import operator as pop

    cg_apply = pop.CgOperator._reg_operator_apply

    def counted_cg(self, v):
        COUNT["products"] += v.shape[0] if v.ndim > 1 else 1
        COUNT["iterations"] += 1
        return cg_apply(self, v)

    lissa_apply = pop.LissaOperator._reg_apply

    def counted_lissa(self, batch, h):
        COUNT["products"] += h.shape[0] if h.ndim > 1 else 1
        COUNT["iterations"] += 1
        return lissa_apply(self, batch, h)

    pop.CgOperator._reg_operator_apply = counted_cg
    pop.LissaOperator._reg_apply = counted_lissa


def pydvl_cg(model, curvature):
    from pydvl.influence.torch import CgInfluence, NystroemPreconditioner
    from pydvl.influence.torch.util import SecondOrderMode

    mode = SecondOrderMode.HESSIAN if curvature == "exact" else SecondOrderMode.GAUSS_NEWTON
    return CgInfluence(
        model, F.cross_entropy, regularization=REG, rtol=np.sqrt(RTOL), atol=0.0,
        solve_simultaneously=True, preconditioner=NystroemPreconditioner(rank=10),
        warn_on_max_iteration=False, second_order_mode=mode,
    )


def pydvl_lissa(model, curvature, scale, maxiter):
    from pydvl.influence.torch import LissaInfluence
    from pydvl.influence.torch.util import SecondOrderMode

    mode = SecondOrderMode.HESSIAN if curvature == "exact" else SecondOrderMode.GAUSS_NEWTON
    return LissaInfluence(
        model, F.cross_entropy, regularization=REG, maxiter=maxiter, scale=scale, rtol=RTOL,
        warn_on_max_iteration=False, second_order_mode=mode,
    )


# --------------------------------------------------------------------------- runs
class Case:
    def __init__(self, hidden, n_train, curvature):
        self.model, self.Xtr, self.ytr, self.Xte, self.yte = panel_b(hidden=hidden, n_train=n_train)
        self.curvature = curvature
        self.n_params = sum(p.numel() for p in self.model.parameters())
        t = [torch.as_tensor(a) for a in (self.Xtr, self.ytr, self.Xte, self.yte)]
        self.Xtr_t, self.ytr_t, self.Xte_t, self.yte_t = t
        self.loader = DataLoader(TensorDataset(self.Xtr_t, self.ytr_t), batch_size=250)
        self.full_loader = DataLoader(TensorDataset(self.Xtr_t, self.ytr_t), batch_size=n_train)
        # float64 twin for measuring residuals
        a = build_adapter(copy.deepcopy(self.model).double(), loss=F.cross_entropy)
        X = a.features(self.Xtr.astype(np.float64))
        a.bind(X, len(X))
        self.op64 = CurvatureOperator(a, X, a.targets(self.ytr), curvature, REG, 500)
        # the right-hand sides every solver is given: float32 test gradients (in
        # float64 they differ by up to 3e-4 where a confident softmax cancels)
        a32 = build_adapter(self.model, loss=F.cross_entropy)
        self.G64 = per_sample_grads(a32, a32.features(self.Xte), a32.targets(self.yte)).double()

    def residual(self, factors) -> float:
        """Largest ``||g - A x|| / ||g||`` over the test gradients, A in float64."""
        Fx = torch.as_tensor(np.asarray(factors, dtype=np.float64))
        R = self.G64 - self.op64.mv(Fx)
        return float((R.norm(dim=1) / self.G64.norm(dim=1)).max())

    def ours(self, cls, hessian=None, **kw):
        s = cls(self.model, loss=F.cross_entropy, regularization=REG,
                hessian=hessian or self.curvature, rtol=RTOL, random_state=0, **kw)
        t0 = time.perf_counter()
        Fx = s.fit(self.Xtr, self.ytr).influence_factors(self.Xte, self.yte)
        dt = time.perf_counter() - t0
        rep = s._last_call.report
        return dt, rep.n_iter, rep.n_products, Fx, s

    def theirs(self, inf, loader):
        t0 = time.perf_counter()
        inf.fit(loader)
        COUNT.update(products=0, iterations=0)
        Fx = inf.influence_factors(self.Xte_t, self.yte_t)
        dt = time.perf_counter() - t0
        return dt, COUNT["iterations"], COUNT["products"], Fx.detach().numpy()

    def spectrum(self, kind=None) -> tuple[float, float]:
        """Smallest and largest eigenvalue of A (``kind=None``) or of the
        preconditioned ``M^1/2 A M^1/2`` for ``kind`` in {"kfac", "ekfac"}, by block
        Lanczos from both ends."""
        op, lam = self.op64, REG
        if kind is None:
            def mv(V):
                return op.curvature_mv(V) + lam * V
        else:
            M = kronecker_preconditioner(self.op64, kind)

            def mv(V):
                W = M.solve_root(V)
                return M.solve_root(op.curvature_mv(W) + lam * W)
        ends = []
        for sign in (1.0, -1.0):
            theta, _, _, _ = block_lanczos(
                lambda V, s=sign: s * mv(V), op.n_params, 1, krylov_dimension=96,
                block_size=8, rtol=1e-4, rng=np.random.RandomState(0), device="cpu", which="LA",
            )
            ends.append(sign * float(theta[0]))
        return ends[1], ends[0]

    def smallest_eigenvalue(self, curvature) -> float:
        op = CurvatureOperator(self.op64.adapter, self.op64.X, self.op64.Y, curvature, REG, 1500)
        theta, _, _, _ = block_lanczos(
            lambda V: -op.curvature_mv(V), op.n_params, 1, krylov_dimension=160,
            block_size=16, rtol=1e-4, rng=np.random.RandomState(0), device="cpu", which="LA",
        )
        return -float(theta[0])


def run_cg(case: Case, repeats: int):
    variants = {"ours, no preconditioner": {"preconditioner": None},
                "ours, Nystroem rank 10": {"preconditioner": "nystroem", "rank": 10},
                "ours, K-FAC": {"preconditioner": "kfac"},
                "ours, EK-FAC": {"preconditioner": "ekfac"}}
    best = {}

    def record(name, dt, it, hvp, Fx):
        if name not in best or dt < best[name][0]:
            best[name] = (dt, it, hvp, Fx)

    for r in range(repeats + (1 if repeats > 1 else 0)):
        for name, kw in variants.items():
            dt, it, hvp, Fx, _ = case.ours(CgInfluenceScorer, **kw)
            if repeats == 1 or r > 0:
                record(name, dt, it, hvp, Fx)
        dt, it, hvp, Fx = case.theirs(pydvl_cg(case.model, case.curvature), case.loader)
        if repeats == 1 or r > 0:
            record("pyDVL block CG, Nystroem rank 10", dt, it, hvp, Fx)
    return [(name, dt, it, hvp, case.residual(Fx)) for name, (dt, it, hvp, Fx) in best.items()]


def run_lissa(case: Case, repeats: int):
    variants = {"ours, no preconditioner": {}, "ours, K-FAC": {"preconditioner": "kfac"},
                "ours, EK-FAC": {"preconditioner": "ekfac"}}
    # the plain run fixes the scale and the steps pyDVL gets: pyDVL's rule (the largest
    # elementwise relative update below rtol) does not stop a float32 iteration at
    # 1e-6, as entries near zero keep changing; with our scale its iteration is ours
    # without a preconditioner, so it gets our number of steps.
    first = case.ours(LissaInfluenceScorer, maxiter=1000)
    scale, steps = first[4].scale_, first[1]
    pydvl_name = f"pyDVL LiSSA, scale {scale:.3g}, maxiter {steps}"
    best = {}
    for r in range(repeats):
        for name, kw in variants.items():
            if r == 0 and not kw:
                dt, it, hvp, Fx, _ = first
            else:
                dt, it, hvp, Fx, _ = case.ours(LissaInfluenceScorer, maxiter=1000, **kw)
            if name not in best or dt < best[name][0]:
                best[name] = (dt, it, hvp, Fx)
        out = case.theirs(pydvl_lissa(case.model, case.curvature, scale, steps), case.full_loader)
        if pydvl_name not in best or out[0] < best[pydvl_name][0]:
            best[pydvl_name] = out
    return [(name, dt, it, hvp, case.residual(Fx)) for name, (dt, it, hvp, Fx) in best.items()]


def _pydvl_operator_check(case: Case) -> str:
    """How far pyDVL's GAUSS_NEWTON operator is from the empirical Fisher here."""
    from pydvl.influence.torch.operator import GaussNewtonOperator

    a = build_adapter(case.model, loss=F.cross_entropy)
    X = a.features(case.Xtr)
    a.bind(X, len(X))
    op = CurvatureOperator(a, X, a.targets(case.ytr), "empirical-fisher", 0.0, 250)
    V = torch.randn(4, a.n_params, generator=torch.Generator().manual_seed(0))
    ours = op.data_mv(V)
    theirs = GaussNewtonOperator(case.model, F.cross_entropy, case.loader).apply(V)
    diff = ((ours - theirs).norm(dim=1) / ours.norm(dim=1)).numpy()
    return (
        "pyDVL's SecondOrderMode.GAUSS_NEWTON operator, applied to 4 random vectors, differs "
        f"from the empirical Fisher computed here by {diff.min():.0%}-{diff.max():.0%} in "
        "relative norm (ours is checked against per-sample gradients taken one sample at a "
        "time in tests/test_preconditioned.py). The last column measures every result "
        "against ours. pyDVL 0.10's operator for this mode divides the products of a "
        "block of k vectors by k instead of by the number of points "
        "(benchmarks/results/cnn.md), so its block CG solves with a curvature scaled by "
        "1/k; its LiSSA, which reached our residual, goes another way through that "
        "operator (not traced here)."
    )


def table(title, rows, reference) -> str:
    ref = next(r for r in rows if r[0] == reference)
    lines = [f"#### {title}", "",
             "| solver | iterations | Hessian-vector products | seconds | speed-up over pyDVL | largest relative residual |",
             "|---|---|---|---|---|---|"]
    for name, dt, it, hvp, res in rows:
        lines.append(f"| {name} | {it} | {hvp} | {dt:.3f} | {ref[1] / dt:.2f}x | {res:.1e} |")
    return "\n".join(lines)


def run(hidden, n_train, curvature, repeats, label):
    case = Case(hidden, n_train, curvature)
    head = (f"### {label}: digits MLP 64-{hidden}-{hidden}-10 ({case.n_params:,} parameters), "
            f"{n_train} train / 200 test, {curvature} curvature, regularization {REG}")
    print(head, flush=True)
    parts = [head, ""]
    if curvature != "exact":
        low = case.smallest_eigenvalue("exact")
        try:
            case.ours(CgInfluenceScorer, hessian="exact", preconditioner="ekfac")
            outcome = "converged"
        except NotPositiveDefiniteError as exc:
            found = re.search(r"direction along which the curvature is (\S+?)\.?(\s|$)", str(exc))
            outcome = ("NotPositiveDefiniteError, a direction of curvature "
                       f"{found.group(1) if found else '< 0'}")
        parts += [f"The exact Hessian's smallest eigenvalue here is {low:.3f} (block Lanczos), "
                  f"so the exact Hessian plus {REG} I is not positive definite; EK-FAC-preconditioned "
                  f"CG on it: {outcome}.", ""]
        print(parts[-2], flush=True)
    if curvature == "empirical-fisher":
        parts += [_pydvl_operator_check(case), ""]
        print(parts[-2], flush=True)
    spans = []
    for kind, label in ((None, "A"), ("kfac", "K-FAC-preconditioned A"), ("ekfac", "EK-FAC-preconditioned A")):
        lo, hi = case.spectrum(kind)
        spans.append(f"{label} [{lo:.3g}, {hi:.3g}] (condition number {hi / lo:.1f})")
    parts += ["Eigenvalues (block Lanczos, float64): " + "; ".join(spans) + ".", ""]
    print(parts[-2], flush=True)
    cg = run_cg(case, repeats)
    parts += [table("Block CG", cg, "pyDVL block CG, Nystroem rank 10"), ""]
    print(parts[-2], flush=True)
    lissa = run_lissa(case, repeats)
    parts += [table("LiSSA (all training points per step)", lissa, lissa[-1][0]), ""]
    print(parts[-2], flush=True)
    return "\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", action="store_true", help="also run the 26,122-parameter case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _count_pydvl()
    text = [
        "# Curvature-preconditioned CG and LiSSA against pyDVL 0.10",
        "",
        f"Produced by `python benchmarks/bench_preconditioned.py{' --big' if args.big else ''} "
        f"--repeats {args.repeats} --threads {args.threads}` (both libraries in one process, "
        f"CPU, {args.threads} torch thread(s), float32 models). Every solver stops at the "
        f"relative residual {RTOL:g}; the last column is the residual its result actually "
        "reaches, measured in float64. Seconds: fit + influence_factors of the 200 test "
        "points, best of the alternating runs (larger case: one run).",
        "",
        run(32, 1000, "exact", args.repeats, "Panel B"),
    ]
    if args.big:
        text.append(run(128, 1500, "empirical-fisher", 1, "Larger case"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(text).rstrip() + "\n")
    print(f"saved to {RESULTS}")


if __name__ == "__main__":
    main()
