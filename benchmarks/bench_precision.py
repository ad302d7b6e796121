"""What float32 costs against float64, per method, and bfloat16 where EK-FAC offers it.

For each method the influence matrix is computed with ``dtype="float32"`` and
``dtype="float64"`` (the working precision of every product: gradients,
Hessian-vector products, the solver's own arithmetic), and for EK-FAC also with
``kronecker_dtype="bfloat16"`` / ``"float32"`` (the products over activations and
output gradients only; see :class:`skinfluence.EkfacInfluenceScorer`). Reported:
time (fit + influences), and the agreement of each matrix with the same method in
float64 and with a tight float64 reference, as the Pearson correlation over the
whole matrix and the relative Frobenius error ``||I - I_ref|| / ||I_ref||``.

Cases:

* ``panel-b``: digits MLP 64-32-32-10 (3,466 parameters), 1000 train x 200 test,
  regularization 0.1; reference the Direct method in float64 (exact Hessian).
* ``big``: MLP 64-128-128-10 (26,122 parameters), 1500 train x 200 test, the
  Gauss-Newton curvature (at regularization 0.1 the exact Hessian is not positive
  definite there); reference conjugate gradients in float64 to ``rtol=1e-10``
  (Direct is left out: its 26k x 26k matrix).
* ``cnn``: EK-FAC on the small digits CNN of ``bench_ekfac_cnn.py`` (9,930
  parameters, 2000 train x 200 test, regularization 0.01); reference the exact
  Gauss-Newton influences in float64.
* ``cnn-1200``: the same CNN on 1200 training images, whose activations and output
  gradients (50M numbers) exceed the cache of EK-FAC's passes in float32 and fit it
  in bfloat16, which keeps twice as many.
* ``resnet``: EK-FAC on ``SmallResNet(width=4)`` as in ``bench_ekfac_cnn.py``.

One torch thread. Times are the best of ``--repeats`` rounds, the settings in turn
within each round (float32 and float64 alternate), so that all see the same
machine load; methods marked slow (LiSSA and CG on the larger case) run once.
Each case's table replaces its section of benchmarks/results/precision.md.

Run:  python benchmarks/bench_precision.py [--cases panel-b,big,cnn,resnet]
      [--groups products,ekfac] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parent)]
from panels import panel_b  # noqa: E402

import skinfluence  # noqa: E402
from skinfluence import (  # noqa: E402
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    DirectInfluenceScorer,
    EkfacInfluenceScorer,
    LissaInfluenceScorer,
    NystroemInfluenceScorer,
)

warnings.filterwarnings("ignore", category=FutureWarning)
RESULTS = Path(__file__).parent / "results" / "precision.md"

#: (label, scorer class, settings, slow on the larger case)
PRODUCTS = [
    ("Direct", DirectInfluenceScorer, {}, None),
    ("CG (rtol 1e-5)", CgInfluenceScorer, {}, "big"),
    ("LiSSA (rtol 1e-4)", LissaInfluenceScorer, {"random_state": 0}, "big"),
    ("Arnoldi (rank 30)", ArnoldiInfluenceScorer, {"rank": 30, "random_state": 0}, None),
    ("Nystroem (rank 30)", NystroemInfluenceScorer, {"rank": 30, "random_state": 0}, None),
]
#: EK-FAC rows: (label, settings)
EKFAC = [
    ("float64", {"dtype": "float64"}),
    ("float32", {"dtype": "float32"}),
    ("float32, kronecker_dtype=bfloat16", {"dtype": "float32", "kronecker_dtype": "bfloat16"}),
    ("float64, kronecker_dtype=float32", {"dtype": "float64", "kronecker_dtype": "float32"}),
]


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).ravel()


def agreement(I, ref) -> tuple[float, float]:
    """Pearson over the whole matrix and the relative Frobenius error."""
    a, b = _f64(I), _f64(ref)
    return float(np.corrcoef(a, b)[0, 1]), float(np.linalg.norm(a - b) / np.linalg.norm(b))


def show_r(r: float) -> str:
    return f"1 - {1 - r:.1e}" if r > 0.99999 else f"{r:.6f}"


def race(runners: dict, repeats: int, once=()) -> dict:
    """Best wall time of each runner over ``repeats`` rounds, in turn within a round;
    the runners in ``once`` run in the first round only. Returns label -> (s, I)."""
    best, out = {}, {}
    for round_ in range(repeats):
        for label, fn in runners.items():
            if round_ and label in once:
                continue
            t0 = time.perf_counter()
            I = fn()
            t = time.perf_counter() - t0
            out.setdefault(label, I)
            best[label] = min(best.get(label, np.inf), t)
            print(f"  {label}: {t:.3f} s", flush=True)
    return {label: (best[label], out[label]) for label in runners}


def runner(cls, model, Xtr, ytr, Xte, yte, reg, **kw):
    def run():
        s = cls(model, loss=F.cross_entropy, regularization=reg, **kw)
        return s.fit(Xtr, ytr).influences(Xte, yte)
    return run


def table(rows, ref_name) -> list[str]:
    lines = [
        f"| method | precision | fit + influences, s | float64 time / this | Pearson vs same method "
        f"in float64 | rel. Frobenius error vs same in float64 | Pearson vs {ref_name} | "
        f"rel. Frobenius error vs {ref_name} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, prec, t, t64, same, ref in rows:
        lines.append(
            f"| {method} | {prec} | {t:.3f} | {t64 / t:.2f}x | {show_r(same[0])} | {same[1]:.1e} "
            f"| {show_r(ref[0])} | {ref[1]:.1e} |"
        )
    return lines


# ------------------------------------------------------------------ the cases
def mlp_case(name, args):
    reg = 0.1
    if name == "panel-b":
        model, Xtr, ytr, Xte, yte = panel_b()
    else:
        model, Xtr, ytr, Xte, yte = panel_b(hidden=128, n_train=1500)
    n_params = sum(p.numel() for p in model.parameters())
    hessian = "exact" if name == "panel-b" else "gauss-newton"
    t0 = time.perf_counter()
    if name == "panel-b":
        ref_name, ref = "Direct in float64", DirectInfluenceScorer(
            model, loss=F.cross_entropy, regularization=reg, dtype="float64"
        ).fit(Xtr, ytr).influences(Xte, yte)
    else:
        ref_name, ref = "CG in float64 to rtol 1e-10", CgInfluenceScorer(
            model, loss=F.cross_entropy, regularization=reg, dtype="float64", rtol=1e-10,
            maxiter=5000, hessian=hessian,
        ).fit(Xtr, ytr).influences(Xte, yte)
    t_ref = time.perf_counter() - t0
    print(f"{name}: {n_params} parameters, reference {t_ref:.1f} s", flush=True)
    title = (f"digits MLP 64-32-32-10 ({n_params:,} parameters), {len(ytr)} train x {len(yte)} test"
             if name == "panel-b" else
             f"MLP 64-128-128-10 ({n_params:,} parameters), {len(ytr)} train x {len(yte)} test")
    sections = {}
    if "products" in args.groups:
        runners, once = {}, set()
        for label, cls, kw, slow in PRODUCTS:
            if name == "big" and cls is DirectInfluenceScorer:
                continue
            for dt in ("float64", "float32"):
                runners[(label, dt)] = runner(cls, model, Xtr, ytr, Xte, yte, reg, dtype=dt,
                                              hessian=hessian, **kw)
                if slow == name:
                    once.add((label, dt))
        res = race(runners, args.repeats, once)
        rows = []
        for label, *_ in PRODUCTS:
            if (label, "float64") not in res:
                continue
            t64, I64 = res[(label, "float64")]
            for dt in ("float64", "float32"):
                t, I = res[(label, dt)]
                rows.append((label, dt, t, t64, agreement(I, I64), agreement(I, ref)))
        sections[f"{name}-products"] = "\n".join([
            f"### {title}: the product methods, hessian={hessian!r}, regularization {reg}", "",
            f"Reference: {ref_name} ({t_ref:.1f} s). Slow rows (one run): "
            f"{', '.join(sorted({k[0] for k in once})) or 'none'}.", "",
            *table(rows, ref_name),
        ])
    if "ekfac" in args.groups:
        sections[f"{name}-ekfac"] = ekfac_section(
            f"### {title}: EK-FAC, regularization {reg}", model, Xtr, ytr, Xte, yte, reg,
            ref, ref_name, t_ref, args)
    return sections


def ekfac_section(title, model, Xtr, ytr, Xte, yte, reg, ref, ref_name, t_ref, args, batch=256):
    runners = {label: runner(EkfacInfluenceScorer, model, Xtr, ytr, Xte, yte, reg,
                             batch_size=batch, **kw) for label, kw in EKFAC}
    res = race(runners, args.repeats)
    t64, I64 = res["float64"]
    rows = [("EK-FAC", label, t, t64, agreement(I, I64), agreement(I, ref))
            for label, (t, I) in res.items()]
    return "\n".join([title, "", f"Reference: {ref_name} ({t_ref:.1f} s); batch {batch}.", "",
                      *table(rows, ref_name)])


def cnn_case(name, args):
    from bench_ekfac_cnn import digits_setup, exact_influences

    reg = 0.01
    if name.startswith("cnn"):
        n_train = 1200 if name == "cnn-1200" else 2000
        model, Xtr, ytr, Xte, yte, acc = digits_setup(n_train, 200)
        title = (f"Small CNN on digits (9,930 parameters, test accuracy {acc:.3f}), "
                 f"{n_train} train x 200 test")
    else:
        from bench_cnn import setup as resnet_setup

        model, Xtr, ytr, Xte, yte, acc = resnet_setup(2000, 200, 32)
        torch.set_num_threads(1)
        title = ("SmallResNet(width=4), 32x32 images, stem and first block frozen "
                 f"(test accuracy {acc:.3f}), 2000 train x 200 test")
    t0 = time.perf_counter()
    ref = exact_influences(model, Xtr, ytr, Xte, yte, reg=reg)
    t_ref = time.perf_counter() - t0
    print(f"{name}: reference {t_ref:.1f} s", flush=True)
    return {f"{name}-ekfac": ekfac_section(
        f"### {title}: EK-FAC, regularization {reg}", model, Xtr, ytr, Xte, yte, reg, ref,
        "the exact Gauss-Newton influences in float64", t_ref, args)}


HEADER = """## Precision: what float32 (and bfloat16) costs against float64

Produced by `python benchmarks/bench_precision.py` (one torch thread, CPU). Each
method's influence matrix in float32 is compared with the same method in float64
(the cost of the precision alone) and with a tight float64 reference (the method's
own error included). "Precision" is the scorer's `dtype` (every product);
EK-FAC's `kronecker_dtype` sets only the products over activations and output
gradients (factors' batches, projections on the eigenbases, the contractions of
the influences), its eigendecompositions and running sums staying float64.
Times are the best of the rounds, float32 and float64 in turn."""


def write(sections: dict, footer: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else HEADER + "\n"
    if not old.startswith(HEADER):
        old = HEADER + "\n" + old.split("\n\n", 1)[-1]
    for key, text in sections.items():
        block = f"<!-- {key} -->\n{text}\n\n{footer}\n<!-- /{key} -->"
        pat = re.compile(rf"<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->", re.S)
        old = pat.sub(lambda _m, b=block: b, old) if pat.search(old) else old.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(old)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="panel-b,big,cnn,resnet")
    ap.add_argument("--groups", default="products,ekfac")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.cases.split(","):
        load = os.getloadavg()[0]
        started = time.strftime("%Y-%m-%d %H:%M")
        sections = mlp_case(name, args) if name in ("panel-b", "big") else cnn_case(name, args)
        footer = (f"skinfluence {skinfluence.__version__}, torch {torch.__version__}, 1 thread, "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared "
                  f"with other work, load average {load:.1f} at start; run {started}. Reproduce: "
                  f"`python benchmarks/bench_precision.py --cases {name} --groups {args.groups} "
                  f"--repeats {args.repeats}`.")
        for text in sections.values():
            print(text, flush=True)
        write(sections, footer)


if __name__ == "__main__":
    main()
