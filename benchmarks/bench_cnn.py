"""Every method on a ResNet with BatchNorm and frozen layers: time, memory, agreement.

``skinfluence.datasets.SmallResNet(width=4, stem_stride=4)`` (1,382 parameters) is
trained on synthetic two-class colour images (``make_two_class_images``); its stem
and first block are then frozen, leaving the second block (3x3 and strided 1x1
convolutions, each followed by BatchNorm) and the linear head: 962 trainable
parameters. Each method computes the influence matrix of the test set on the
training set, with regularization 0.01 on the Gauss-Newton matrix, in the model's
float32; it runs in a child process of its own, so that its peak memory (resident
set size above the child's start) is its own. The reference is conjugate gradients
solved to ``rtol=1e-10`` in float64. A second table compares EK-FAC's treatment of
BatchNorm's affine parameters (held fixed) with a diagonal block over them.

Run:  python benchmarks/bench_cnn.py [--fast] [--n-train N] [--n-test N] [--size S]
``--fast``: 200 training and 20 test images (a smoke test, under a minute).
Writes benchmarks/results/cnn.md (``--fast``: prints only).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

import skinfluence
from skinfluence._adapters import build_adapter
from skinfluence._gradients import per_sample_grads
from skinfluence.datasets import SmallResNet, make_two_class_images
from skinfluence.solvers import METHODS, CurvatureOperator

RESULTS = Path(__file__).parent / "results" / "cnn.md"
FROZEN = ("conv1", "bn1", "layer1")
REG = 0.01
#: method -> settings; the rest of each scorer's parameters at their defaults
RUNS = [
    ("direct", {}),
    ("cg", {}),
    ("lissa", {"maxiter": 300, "minibatch_size": 64}),
    ("arnoldi", {"rank": 50}),
    ("nystroem", {"rank": 50}),
    ("nystroem", {"rank": 400}),
    ("ekfac", {}),
    ("gradient_similarity", {}),
]


def setup(n_train: int, n_test: int, size: int):
    X, y = make_two_class_images(n_train + n_test, size=size, noise=0.4, random_state=0)
    Xtr, ytr, Xte, yte = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    torch.manual_seed(0)
    model = SmallResNet(width=4, stem_stride=size // 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    Xt, yt = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    model.train()
    for _ in range(10):
        for idx in torch.randperm(n_train).split(32):
            opt.zero_grad()
            F.cross_entropy(model(Xt[idx]), yt[idx]).backward()
            opt.step()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN))
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.as_tensor(Xte)).argmax(1).numpy() == yte).mean())
    return model, Xtr, ytr, Xte, yte, acc


def scorer(name, model, **kw):
    cls = getattr(skinfluence, METHODS[name].scorer_name)
    settings = {"loss": F.cross_entropy, "regularization": REG, "hessian": "gauss-newton",
                "random_state": 0, **kw}
    takes = cls().get_params()
    return cls(model, **{k: v for k, v in settings.items() if k in takes})


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")  # pragma: no cover


def _child(queue, name, kw, data):
    torch.set_num_threads(1)
    model, Xtr, ytr, Xte, yte = data
    start_rss = _rss_gib()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            s = scorer(name, model, **kw).fit(Xtr, ytr)
            t1 = time.perf_counter()
            I = s.influences(Xte, yte)
            t2 = time.perf_counter()
        note = "; ".join(sorted({type(w.message).__name__ for w in caught
                                 if issubclass(w.category, (UserWarning, RuntimeWarning))}))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - start_rss
        queue.put((I, t1 - t0, t2 - t1, peak, s.n_params_, note))
    except Exception as exc:  # reported in the table, not fatal
        queue.put((None, 0.0, 0.0, 0.0, 0, f"{type(exc).__name__}: {exc}"[:120]))


def run(name, kw, data):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, name, kw, data))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def bn_diagonal_part(model, Xtr, ytr, Xte, yte, bn):
    """Influences through a diagonal block over BatchNorm's affine parameters."""
    a = build_adapter(model, loss=F.cross_entropy, params=bn, dtype="float64")
    Xa = a.features(Xtr)
    a.bind(Xa, len(ytr))
    Ya = a.targets(ytr)
    with a.eval_mode():
        op = CurvatureOperator(a, Xa, Ya, "gauss-newton", 0.0, 256)
        d = torch.diagonal(op.mv(torch.eye(a.n_params, dtype=torch.float64)))
        Gtr = per_sample_grads(a, Xa, Ya)
        Gte = per_sample_grads(a, a.features(Xte), a.targets(yte))
    return ((Gte / (d + REG)) @ Gtr.T).numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args(argv)
    if args.fast:
        args.n_train, args.n_test = 200, 20
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, Xtr, ytr, Xte, yte, acc = setup(args.n_train, args.n_test, args.size)
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    print(f"trained in {time.perf_counter() - t0:.1f} s, test accuracy {acc:.3f}, "
          f"{p} trainable parameters", flush=True)
    data = (model, Xtr, ytr, Xte, yte)
    t0 = time.perf_counter()
    ref = scorer("cg", model, rtol=1e-10, dtype="float64").fit(Xtr, ytr).influences(Xte, yte)
    t_ref = time.perf_counter() - t0
    print(f"reference (CG rtol 1e-10, float64): {t_ref:.1f} s", flush=True)

    rows = []
    for name, kw in RUNS:
        I, t_fit, t_inf, peak, n_params, note = run(name, kw, data)
        label = name + "".join(f", {k}={v}" for k, v in kw.items())
        if I is None:
            rows.append(f"| {label} | - | - | - | - | - | {note} |")
        else:
            rel = np.linalg.norm(I - ref) / np.linalg.norm(ref)
            r = pearsonr(I.ravel().astype(np.float64), ref.ravel())[0]
            rows.append(f"| {label} | {n_params} | {t_fit:.1f} | {t_inf:.1f} | {peak * 1024:.0f} | "
                        f"{r:.4f} | {rel:.2g} | {note} |")
        print(rows[-1], flush=True)

    bn = [n for n, q in model.named_parameters() if q.requires_grad
          and isinstance(model.get_submodule(n.rpartition(".")[0]), torch.nn.BatchNorm2d)]
    ek = scorer("ekfac", model, dtype="float64").fit(Xtr, ytr).influences(Xte, yte)
    diag = bn_diagonal_part(model, Xtr, ytr, Xte, yte, bn)
    cg_held = scorer("cg", model, rtol=1e-10, dtype="float64",
                     params=[n for n, q in model.named_parameters()
                             if q.requires_grad and n not in bn]).fit(Xtr, ytr).influences(Xte, yte)

    def corr(A):
        return pearsonr(A.ravel(), ref.ravel())[0]

    size = f"{args.n_train} train x {args.n_test} test, {args.size}x{args.size}"
    cmd = "python benchmarks/bench_cnn.py" + (" --fast" if args.fast else "")
    if not args.fast:
        cmd += f" --n-train {args.n_train} --n-test {args.n_test} --size {args.size}"
    text = "\n".join([
        f"## Every method on a ResNet with BatchNorm and frozen layers ({size})",
        "",
        f"`SmallResNet(width=4, stem_stride={args.size // 8})`, stem and first block frozen: "
        f"{p} trainable parameters ({sum(model.get_parameter(n).numel() for n in bn)} of them "
        f"BatchNorm); test accuracy {acc:.3f}. Gauss-Newton, regularization {REG}, float32; "
        "one thread per method, each in a process of its own. Agreement: against conjugate "
        f"gradients to rtol 1e-10 in float64 ({t_ref:.0f} s), Pearson over the influence "
        "matrix and relative Frobenius error. Memory: peak resident set size above the "
        "process's start.",
        "",
        "| method | parameters | fit, s | influences, s | peak memory, MiB | Pearson | rel. error | notes |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "EK-FAC and BatchNorm's affine parameters (Pearson against the same reference, "
        "float64):",
        "",
        "| BatchNorm affine parameters | Pearson |",
        "|---|---|",
        f"| held fixed (EK-FAC's default) | {corr(ek):.4f} |",
        f"| diagonal block of the Gauss-Newton matrix over them, added | {corr(ek + diag):.4f} |",
        f"| (CG to rtol 1e-10 with them held fixed) | {corr(cg_held):.4f} |",
        "",
        f"Machine: {mp.cpu_count()} CPU cores shared with other jobs; Python "
        f"{sys.version.split()[0]}, torch {torch.__version__}. Reproduce: `{cmd}`.",
    ])
    print(text)
    if not args.fast:
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
