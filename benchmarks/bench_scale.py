"""The matrix-free methods at 405,610 parameters and 16,000 training points, beside pyDVL.

The panel (``scale_panel.py``): a tanh MLP 64-600-600-10 trained to a minimum of the
cross-entropy plus a small weight decay on 16,000 synthetic points; exact Hessian,
regularization 0.1. Both libraries run in one process, alternately, one torch
thread; each run's peak resident memory is measured on its own (the kernel's
high-water mark is reset before it) and reported with how much the run added to
what the process held.

What each run computes is the inverse-curvature product ``(H + 0.1 I)^-1 g`` of test
gradients (``influence_factors``): the whole cost of an influence computation beyond
one gradient per training point, and directly comparable between the libraries.
Accuracy: relative error (Frobenius) and Pearson correlation of those products
against a reference, conjugate gradients to ``rtol=1e-7`` on the first ``--n-ref``
test points; for Arnoldi also the largest relative residual ``||H v - e v|| / e_max``
of the eigenpairs each library returns, measured with one more product.

One Hessian-vector product over the 16,000 points costs about a second per vector
on one core of this machine, so the iterative solvers (CG, LiSSA)
solve for ``--n-ref`` test points (default 2) and the low-rank methods (Arnoldi,
Nystroem, EK-FAC), whose cost is their fit, for all 20.

Run:  PYTHONPATH=/path/to/pydvl python benchmarks/bench_scale.py [--methods ...]
      [--threads 1] [--n-ref 2] [--cache PATH]
Writes benchmarks/results/scale.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_matrix_free import PeakMemory
from scale_panel import WEIGHT_DECAY, load
from sklearn.exceptions import ConvergenceWarning
from torch.utils.data import DataLoader, TensorDataset

from skinfluence import (
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    EkfacInfluenceScorer,
    LissaInfluenceScorer,
    NystroemInfluenceScorer,
)
from skinfluence._adapters import build_adapter
from skinfluence._linalg import spectrum_ends
from skinfluence.solvers import CurvatureOperator

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=ConvergenceWarning)
warnings.filterwarnings("ignore", message="Full backward hook is firing")
RESULTS = Path(__file__).parent / "results" / "scale.md"
REG = 0.1
RTOL = 1e-6
CAPTURED = {}


# --------------------------------------------------------------------------- the case
class Case:
    def __init__(self, cache: Path, n_ref: int, log=print):
        self.model, self.Xtr, self.ytr, self.Xte, self.yte, self.info = load(cache, log=log)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.n_ref = n_ref
        t = [torch.as_tensor(a) for a in (self.Xtr, self.ytr, self.Xte, self.yte)]
        self.Xtr_t, self.ytr_t, self.Xte_t, self.yte_t = t
        self.loader = DataLoader(TensorDataset(self.Xtr_t, self.ytr_t), batch_size=1000)
        self.cache = cache

    def operator(self, batch_size=1000):
        a = build_adapter(self.model, loss=F.cross_entropy)
        X = a.features(self.Xtr)
        a.bind(X, len(X))
        return CurvatureOperator(a, X, a.targets(self.ytr), "exact", REG, batch_size)

    def _cached(self, key, compute):
        path = self.cache.with_suffix(f".{key}.pt")
        if path.exists():
            return torch.load(path, weights_only=False)
        out = compute()
        torch.save(out, path)
        return out

    def spectrum(self):
        """Smallest and largest eigenvalue of H (without regularization)."""
        def compute():
            t0 = time.perf_counter()
            lo, hi = spectrum_ends(self.operator().curvature_mv, self.n_params, "cpu",
                                   krylov_dimension=64)
            return {"min": lo, "max": hi, "seconds": time.perf_counter() - t0}
        return self._cached("spectrum", compute)

    def reference(self):
        """CG to rtol 1e-7 for the first n_ref test points."""
        def compute():
            s = CgInfluenceScorer(self.model, loss=F.cross_entropy, regularization=REG,
                                  rtol=1e-7, maxiter=2000)
            t0 = time.perf_counter()
            Fx = s.fit(self.Xtr, self.ytr).influence_factors(self.Xte[: self.n_ref],
                                                             self.yte[: self.n_ref])
            rep = s._last_call.report
            return {"factors": np.asarray(Fx, dtype=np.float64), "seconds": time.perf_counter() - t0,
                    "iterations": rep.n_iter}
        return self._cached(f"reference{self.n_ref}", compute)

    def check_eigenpairs(self, values, vectors) -> float:
        """Largest ``||H v - e v|| / max|e|`` over the pairs (one product)."""
        V = torch.as_tensor(np.asarray(vectors, dtype=np.float64))
        e = torch.as_tensor(np.asarray(values, dtype=np.float64))
        HV = self.operator().curvature_mv(V)
        return float(((HV - e[:, None] * V).norm(dim=1) / e.abs().max()).max())


# --------------------------------------------------------------------------- runs
def ours(case: Case, cls, n_test, **kw):
    s = cls(case.model, loss=F.cross_entropy, regularization=REG, **kw)
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        Fx = s.fit(case.Xtr, case.ytr).influence_factors(case.Xte[:n_test], case.yte[:n_test])
        dt = time.perf_counter() - t0
    return {"seconds": dt, "peak": pm.peak_mb, "added": pm.added_mb,
            "factors": np.asarray(Fx, dtype=np.float64), "scorer": s}


def theirs(case: Case, inf, n_test, loader=None):
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        inf.fit(loader or case.loader)
        Fx = inf.influence_factors(case.Xte_t[:n_test], case.yte_t[:n_test])
        dt = time.perf_counter() - t0
    return {"seconds": dt, "peak": pm.peak_mb, "added": pm.added_mb,
            "factors": Fx.detach().double().numpy(), "model": inf}


def _capture_spectral():
    """Keep the eigenpairs pyDVL's Arnoldi computes, and count its products."""
    from pydvl.influence.torch import influence_function_model as ifm

    inner = ifm.operator_spectral_approximation

    def wrapped(operator, *args, **kw):
        apply = operator.apply
        CAPTURED["products"] = 0

        def counted(x):
            CAPTURED["products"] += 1 if x.ndim == 1 else x.shape[0]
            return apply(x)

        operator.apply = counted
        out = inner(operator, *args, **kw)
        CAPTURED["values"] = out.eigen_vals.detach().double().numpy()
        CAPTURED["vectors"] = out.projections.detach().double().numpy().T
        return out

    ifm.operator_spectral_approximation = wrapped


def accuracy(case: Case, factors) -> tuple[float, float]:
    ref = case.reference()["factors"]
    F_ = factors[: case.n_ref]
    err = float(np.linalg.norm(F_ - ref) / np.linalg.norm(ref))
    r = float(np.corrcoef(F_.ravel(), ref.ravel())[0, 1])
    return err, r


def run_method(case: Case, name: str, log=print):
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        EkfacInfluence,
        LissaInfluence,
        NystroemPreconditioner,
        NystroemSketchInfluence,
    )

    rows = []
    n_all = len(case.Xte)
    if name == "arnoldi":
        _capture_spectral()
        a = ours(case, ArnoldiInfluenceScorer, n_all, rank=10, random_state=0)
        s = a["scorer"]
        a["note"] = (f"{s.solver_.n_products_} products; eigenpair residual "
                     f"{case.check_eigenpairs(s.eigenvalues_, s.solver_.eigenvectors_):.1e}")
        b = theirs(case, ArnoldiInfluence(case.model, F.cross_entropy, regularization=REG, rank=10), n_all)
        b["note"] = (f"{CAPTURED['products']} products; eigenpair residual "
                     f"{case.check_eigenpairs(CAPTURED['values'], CAPTURED['vectors']):.1e}")
        rows += [("Arnoldi rank 10, ours (rtol 1e-2)", a), ("Arnoldi rank 10, pyDVL (ARPACK, tol 1e-6)", b)]
    elif name == "nystroem":
        a = ours(case, NystroemInfluenceScorer, n_all, rank=10, random_state=0)
        b = theirs(case, NystroemSketchInfluence(case.model, F.cross_entropy, regularization=REG, rank=10), n_all)
        rows += [("Nystroem rank 10, ours", a), ("Nystroem rank 10, pyDVL", b)]
    elif name == "ekfac":
        a = ours(case, EkfacInfluenceScorer, n_all, random_state=0)
        s = a["scorer"]
        a["note"] = f"resolved: fisher={s.fisher_!r}, basis_iter={s.basis_iter_}"
        a2 = ours(case, EkfacInfluenceScorer, n_all, fisher="gauss-newton", basis_iter=2)
        b = theirs(case, EkfacInfluence(case.model, update_diagonal=True, hessian_regularization=REG), n_all)
        rows += [("EK-FAC, ours (defaults, random_state=0)", a),
                 ("EK-FAC, ours, fisher='gauss-newton', basis_iter=2 (the former default)", a2),
                 ("EK-FAC, pyDVL (update_diagonal=True)", b)]
    elif name == "cg":
        k = case.n_ref
        a = ours(case, CgInfluenceScorer, k, rtol=RTOL, maxiter=2000)
        a["note"] = f"{a['scorer']._last_call.report.n_iter} iterations"
        b = theirs(case, CgInfluence(case.model, F.cross_entropy, regularization=REG, rtol=np.sqrt(RTOL),
                                     atol=0.0, maxiter=2000, solve_simultaneously=True,
                                     preconditioner=NystroemPreconditioner(rank=10),
                                     warn_on_max_iteration=False), k)
        rows += [(f"block CG to {RTOL:g}, ours (no preconditioner), {k} test points", a),
                 (f"block CG to {RTOL:g}, pyDVL (Nystroem rank 10), {k} test points", b)]
    elif name == "lissa":
        k = case.n_ref
        a = ours(case, LissaInfluenceScorer, k, minibatch_size=256, random_state=0, maxiter=1000)
        s = a["scorer"]
        steps = s._last_call.report.n_iter
        a["note"] = f"scale {s.scale_:.3g} (auto), {steps} iterations"
        loader = DataLoader(TensorDataset(case.Xtr_t, case.ytr_t), batch_size=256, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        b = theirs(case, LissaInfluence(case.model, F.cross_entropy, regularization=REG,
                                        maxiter=steps, scale=s.scale_, rtol=1e-4,
                                        warn_on_max_iteration=False), k, loader)
        b["note"] = f"scale {s.scale_:.3g} (ours), maxiter {steps}"
        a2 = ours(case, LissaInfluenceScorer, k, minibatch_size=256, random_state=0, maxiter=1000,
                  scale=s.scale_)
        a2["note"] = "the same scale given: no estimate in fit"
        rows += [(f"LiSSA minibatch 256, ours, {k} test points", a),
                 (f"LiSSA minibatch 256, ours, scale given, {k} test points", a2),
                 (f"LiSSA minibatch 256, pyDVL, {k} test points", b)]
    else:
        raise ValueError(name)
    for label, r in rows:
        r["error"], r["pearson"] = accuracy(case, r["factors"])
        log(f"{label}: {r['seconds']:.1f} s, peak {r['peak']:.0f} MB (+{r['added']:.0f}), "
            f"rel. error {r['error']:.3g}, Pearson {r['pearson']:.4f} {r.get('note', '')}")
    return rows


def table(case: Case, results) -> str:
    spec, ref = case.spectrum(), case.reference()
    lines = [
        f"## Matrix-free methods at {case.n_params:,} parameters and {len(case.Xtr):,} training points",
        "",
        f"Produced by `python benchmarks/bench_scale.py --threads {torch.get_num_threads()} "
        f"--n-ref {case.n_ref}` (both libraries in one process, alternately, CPU). Panel: tanh MLP "
        f"64-600-600-10 trained to a minimum of the cross-entropy plus {WEIGHT_DECAY:g} / 2 "
        f"||theta||^2 (training loss {case.info['loss']:.3g}, gradient norm "
        f"{case.info['grad_norm']:.1e}, test accuracy {case.info['test_accuracy']:.2f}); exact "
        f"Hessian, regularization {REG}: eigenvalues of H + {REG} I from "
        f"{spec['min'] + REG:.3g} to {spec['max'] + REG:.3g} (Lanczos). Reference: CG to rtol 1e-7 "
        f"on {case.n_ref} test points ({ref['iterations']} iterations, {ref['seconds']:.0f} s).",
        "",
        "| run | seconds | ratio (pyDVL / ours) | peak MB (added) | rel. error vs reference | "
        "Pearson vs reference | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in results:
        b = group[-1][1]  # pyDVL's run, last in each group
        for k, (label, r) in enumerate(group):
            ratio = f"{b['seconds'] / r['seconds']:.2f}x" if k < len(group) - 1 else ""
            lines.append(
                f"| {label} | {r['seconds']:.1f} | {ratio} | {r['peak']:.0f} ({r['added']:.0f}) | "
                f"{r['error']:.3g} | {r['pearson']:.4f} | {r.get('note', '')} |"
            )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["arnoldi", "nystroem", "ekfac", "lissa", "cg"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-ref", type=int, default=2)
    ap.add_argument("--cache", type=Path,
                    default=Path(tempfile.gettempdir()) / "skinfluence_scale_panel.pt")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    case = Case(args.cache, args.n_ref)
    spec = case.spectrum()
    print(f"H eigenvalues [{spec['min']:.4g}, {spec['max']:.4g}] ({spec['seconds']:.0f} s)", flush=True)
    ref = case.reference()
    print(f"reference: {ref['iterations']} CG iterations, {ref['seconds']:.0f} s", flush=True)
    # every method's rows are kept beside the cached panel, so that one method can be
    # measured again without the others
    store = args.cache.with_suffix(".results.json")
    kept = json.loads(store.read_text()) if store.exists() else {}
    for m in args.methods:
        rows = run_method(case, m, log=lambda s: print(s, flush=True))
        kept[m] = [(label, {k: v for k, v in r.items() if k not in ("factors", "scorer", "model")})
                   for label, r in rows]
        store.write_text(json.dumps(kept))
    order = ["arnoldi", "nystroem", "ekfac", "lissa", "cg"]
    results = [kept[m] for m in order if m in kept]
    text = table(case, results)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
