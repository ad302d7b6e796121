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

``--peers`` adds, on the same model, data and regularization, each in a child of its
own under a wall-clock limit (``--peer-timeout``, 600 s):

* pyDVL 0.10's ``CgInfluence`` (block CG, ``solve_simultaneously=True``), plain and
  with its ``NystroemPreconditioner(rank=10)``, ``second_order_mode=GAUSS_NEWTON``.
  That mode is the mean of per-sample gradient outer products (pyDVL's
  ``GaussNewtonBatchOperation``), i.e. our ``hessian="empirical-fisher"``, not the
  Gauss-Newton matrix ``J^T H_out J`` of the other rows; so our CG with
  ``hessian="empirical-fisher"`` (plain and Nystroem rank 10) runs beside it. pyDVL
  stops block CG when ``||r|| <= max(rtol**2 * ||b||, atol**2)``; ``rtol=sqrt(1e-5)``,
  ``atol=0`` is our CG's default ``||r|| <= 1e-5 ||b||``. pyDVL 0.10's operator for
  that mode divides by the number of vectors it multiplies instead of the number of
  points (see ``pydvl_job``); each pyDVL row runs as released and with that
  averaging patched. (pyDVL's default mode, the exact Hessian, is left out: with
  regularization 0.01 it is not positive definite on this network.)
* kronfluence 1.0.1's EK-FAC, default ``FactorArguments`` (labels sampled from the
  model), ``damping_factor=0.01``, batch 256 (``bench_ekfac_cnn.kron_runner``). It
  tracks only Linear and Conv2d modules: BatchNorm's affine parameters get no
  gradient and count nowhere, as if held fixed (914 parameters, like our EK-FAC).

Both peers score ``grad l(test)^T (H + 0.01 I)^-1 grad l(train)``, our sign and scale
(pyDVL's ``influences`` in mode "up"; kronfluence's pairwise scores of per-sample
summed losses with covariances averaged over the data): every Pearson is positive,
and the least-squares scale ``<I, J> / <I, I>`` of a matrix I onto its counterpart J
(pyDVL's onto our CG on the same curvature, kronfluence's onto our EK-FAC) checks
the scale. An agreement matrix (Pearson) follows.

Run:  python benchmarks/bench_cnn.py [--fast] [--peers] [--n-train N] [--n-test N] [--size S]
``--fast``: 200 training and 20 test images (a smoke test, under a minute).
Writes benchmarks/results/cnn.md (``--fast``: prints only). The peers need pyDVL 0.10
and kronfluence 1.0.1 importable (else their rows say so).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue as queue_lib
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

# this checkout's package, whatever is installed
sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parent)]

import skinfluence  # noqa: E402
from skinfluence._adapters import build_adapter  # noqa: E402
from skinfluence._gradients import per_sample_grads  # noqa: E402
from skinfluence.datasets import SmallResNet, make_two_class_images  # noqa: E402
from skinfluence.solvers import METHODS, CurvatureOperator  # noqa: E402

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
BATCH = 256
PYDVL_BATCH = 250  # divides 2,000, 1,000 and 200: every batch the same size
PYDVL_RTOL = math.sqrt(1e-5)  # pyDVL's block CG compares ||r|| with rtol**2 * ||b||
#: label -> (runner name, settings); run with --peers
PEERS = [
    ("pyDVL CgInfluence, GAUSS_NEWTON, as released", ("pydvl_cg", {})),
    ("pyDVL CgInfluence, GAUSS_NEWTON, NystroemPreconditioner(rank=10), as released",
     ("pydvl_cg", {"rank": 10})),
    ("pyDVL CgInfluence, GAUSS_NEWTON, averaging patched",
     ("pydvl_cg", {"patched": True})),
    ("pyDVL CgInfluence, GAUSS_NEWTON, NystroemPreconditioner(rank=10), averaging patched",
     ("pydvl_cg", {"rank": 10, "patched": True})),
    ("cg, hessian='empirical-fisher' (pyDVL's curvature)",
     ("ours", {"name": "cg", "hessian": "empirical-fisher"})),
    ("cg, hessian='empirical-fisher', preconditioner='nystroem', rank=10",
     ("ours", {"name": "cg", "hessian": "empirical-fisher", "preconditioner": "nystroem",
               "rank": 10})),
    ("kronfluence 1.0.1 EK-FAC", ("kron", {})),
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
                "random_state": 0, **kw}  # kw may override the curvature
    takes = cls().get_params()
    return cls(model, **{k: v for k, v in settings.items() if k in takes})


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")  # pragma: no cover


def ours_job(name, **kw):
    """(prepare, work) for one of our scorers."""
    def work(model, Xtr, ytr, Xte, yte, _):
        t0 = time.perf_counter()
        s = scorer(name, model, **kw).fit(Xtr, ytr)
        t1 = time.perf_counter()
        I = s.influences(Xte, yte)
        return I, t1 - t0, time.perf_counter() - t1, s.n_params_
    return (lambda: None), work


def pydvl_job(rank=None, patched=False):
    """pyDVL 0.10 CgInfluence, block CG, GAUSS_NEWTON mode, our CG's tolerance.

    ``patched``: pyDVL 0.10's ``GaussNewtonOperator`` averages its batches with
    ``PointAveraging``, which takes the number of points from the product's first
    dimension, the number of vectors multiplied (a block of k right-hand sides: the
    curvature divided by k; one vector: by the number of parameters), so that the
    operator is not the empirical Fisher. Patched, this child's ``GaussNewtonOperator``
    averages with ``ChunkAveraging`` (the mean over batches), exact here because every
    batch holds ``PYDVL_BATCH`` points."""
    def prepare():
        from pydvl.influence.torch import CgInfluence, NystroemPreconditioner
        from pydvl.influence.torch.util import SecondOrderMode
        if patched:
            import pydvl.influence.torch.operator as operator
            from pydvl.influence.torch.batch_operation import ChunkAveraging

            operator.PointAveraging = ChunkAveraging
        return CgInfluence, NystroemPreconditioner, SecondOrderMode

    def work(model, Xtr, ytr, Xte, yte, lib):
        from torch.utils.data import DataLoader, TensorDataset

        CgInfluence, NystroemPreconditioner, SecondOrderMode = lib
        Xtr_t, ytr_t, Xte_t, yte_t = map(torch.as_tensor, (Xtr, ytr, Xte, yte))
        dl = DataLoader(TensorDataset(Xtr_t, ytr_t), batch_size=PYDVL_BATCH)
        torch.manual_seed(0)  # pyDVL's Nystroem sketch draws from torch's global RNG
        inf = CgInfluence(
            model, F.cross_entropy, regularization=REG, rtol=PYDVL_RTOL, atol=0.0,
            solve_simultaneously=True, warn_on_max_iteration=True,
            preconditioner=None if rank is None else NystroemPreconditioner(rank=rank),
            second_order_mode=SecondOrderMode.GAUSS_NEWTON,
        )
        t0 = time.perf_counter()
        inf.fit(dl)
        t1 = time.perf_counter()
        I = inf.influences(Xte_t, yte_t, Xtr_t, ytr_t).detach().numpy()
        n = sum(q.numel() for q in model.parameters() if q.requires_grad)
        return I, t1 - t0, time.perf_counter() - t1, n
    return prepare, work


def kron_job():
    """kronfluence 1.0.1 EK-FAC, default factors, as bench_ekfac_cnn.py runs it."""
    def prepare():
        import bench_ekfac_cnn  # imports kronfluence's analyzer when it is installed
        import kronfluence.analyzer  # noqa: F401
        return bench_ekfac_cnn

    def work(model, Xtr, ytr, Xte, yte, lib):
        import tempfile

        tracked = [mod for mod in model.modules()
                   if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))
                   and all(q.requires_grad for q in mod.parameters())]
        with tempfile.TemporaryDirectory() as workdir:
            I, t_fit, t_inf = lib.kron_runner(model, Xtr, ytr, Xte, yte, workdir)()
        return I, t_fit, t_inf, sum(q.numel() for mod in tracked for q in mod.parameters())
    return prepare, work


def _child(queue, job, data):
    torch.set_num_threads(1)
    prepare, work = job
    try:
        lib = prepare()
    except Exception as exc:  # a peer not installed: reported in the table
        queue.put((None, 0.0, 0.0, 0.0, 0, f"{type(exc).__name__}: {exc}"[:120]))
        return
    torch.set_num_threads(1)
    start_rss = _rss_gib()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            I, t_fit, t_inf, n_params = work(*data, lib)
        note = "; ".join(sorted({type(w.message).__name__ for w in caught
                                 if issubclass(w.category, (UserWarning, RuntimeWarning))}))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - start_rss
        queue.put((np.asarray(I), t_fit, t_inf, peak, n_params, note))
    except Exception as exc:  # reported in the table, not fatal
        queue.put((None, 0.0, 0.0, 0.0, 0, f"{type(exc).__name__}: {exc}"[:120]))


def run(job, data, timeout=None):
    """Run ``job`` in a forked child; past ``timeout`` seconds of wall time the child is
    killed and the row says so."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, job, data))
    t0 = time.perf_counter()
    proc.start()
    try:
        out = queue.get(timeout=timeout)
    except queue_lib.Empty:
        proc.kill()
        out = (None, 0.0, 0.0, 0.0, 0, f"timed out after {time.perf_counter() - t0:.0f} s")
    proc.join()
    return out


def _row(label, out, ref, scale=False):
    I, t_fit, t_inf, peak, n_params, note = out
    if I is None:
        return f"| {label} | - | - | - | - | - | - |{' - |' if scale else ''} {note} |"
    I = np.asarray(I, np.float64)
    rel = np.linalg.norm(I - ref) / np.linalg.norm(ref)
    r = pearsonr(I.ravel(), ref.ravel())[0]
    extra = f" {np.vdot(I, ref) / np.vdot(I, I):.3g} |" if scale else ""
    return (f"| {label} | {n_params} | {t_fit:.2f} | {t_inf:.2f} | {peak * 1024:.0f} | "
            f"{r:.4f} | {rel:.2g} |{extra} {note} |")


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


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--peers", action="store_true",
                    help="also pyDVL's CgInfluence and kronfluence's EK-FAC")
    ap.add_argument("--peer-timeout", type=float, default=600.0,
                    help="wall-clock seconds each peer's child may take")
    args = ap.parse_args(argv)
    wall0, cpu0 = time.perf_counter(), os.times()
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

    rows, results = [], {}
    for name, kw in RUNS:
        label = name + "".join(f", {k}={v}" for k, v in kw.items())
        results[label] = run(ours_job(name, **kw), data)
        rows.append(_row(label, results[label], ref))
        print(rows[-1], flush=True)

    peer_rows = []
    if args.peers:
        jobs = {"ours": lambda name, **kw: ours_job(name, **kw), "pydvl_cg": pydvl_job,
                "kron": lambda: kron_job()}
        for label, (runner, kw) in PEERS:
            timeout = None if runner == "ours" else args.peer_timeout
            results[label] = run(jobs[runner](**kw), data, timeout)
            peer_rows.append(_row(label, results[label], ref, scale=True))
            print(peer_rows[-1], flush=True)

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
    if args.peers:
        cmd += " --peers"
    peers = []
    if args.peers:
        cols = {"reference (CG float64, Gauss-Newton)": ref}
        for short, label in [("cg (Gauss-Newton)", "cg"),
                             ("cg, empirical Fisher", PEERS[4][0]),
                             ("pyDVL CG", PEERS[0][0]),
                             ("pyDVL CG, patched", PEERS[2][0]),
                             ("ekfac", "ekfac"),
                             ("kronfluence EK-FAC", PEERS[6][0])]:
            if results.get(label, (None,))[0] is not None:
                cols[short] = np.asarray(results[label][0], np.float64)
        names = list(cols)

        def fit_scale(a, b):  # least squares: c minimising ||c A - B||
            return np.vdot(cols[a], cols[b]) / np.vdot(cols[a], cols[a])

        scales = [f"Least-squares scale of \"{a}\" onto \"{b}\": {fit_scale(a, b):.4g}."
                  for a, b in [("pyDVL CG", "cg, empirical Fisher"),
                               ("pyDVL CG, patched", "cg, empirical Fisher"),
                               ("kronfluence EK-FAC", "ekfac")]
                  if a in cols and b in cols]
        matrix = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for a in names:
            matrix.append(f"| {a} | " + " | ".join(
                f"{pearsonr(cols[a].ravel(), cols[b].ravel())[0]:.4f}" for b in names) + " |")
        peers = [
            "",
            "Peers on the same model, data and regularization, each in a child of its "
            f"own (one thread, {args.peer_timeout:.0f} s wall-clock limit for pyDVL and "
            "kronfluence), against the same reference. pyDVL's `GAUSS_NEWTON` mode is "
            "the empirical Fisher (mean of per-sample gradient outer products), so our "
            "CG on that curvature runs beside it; pyDVL's block CG to "
            "`rtol=sqrt(1e-5)`, `atol=0` (it compares the residual with "
            "`rtol**2 * ||b||`), our CG's default `rtol=1e-5`, batches of 250 for "
            "pyDVL. As released, pyDVL 0.10's `GaussNewtonOperator` averages over "
            "batches with `PointAveraging`, which counts the vectors multiplied as the "
            "points (a block of k right-hand sides gets the curvature divided by k); "
            "\"averaging patched\" replaces it, in that child only, by "
            "`ChunkAveraging`, the mean over batches, exact here with batches of equal "
            "size. pyDVL's default mode, the exact Hessian, is left out: plus 0.01 it "
            "is not positive definite on this network. kronfluence: default factors "
            "(EK-FAC, sampled labels), damping 0.01, batch 256, its factors and scores "
            "through files in a temporary folder; it tracks Linear and Conv2d modules "
            "only, so BatchNorm's parameters are left out, as our EK-FAC holds them "
            "fixed. Scale: the least-squares factor `<I, ref> / <I, I>` onto the "
            "reference.",
            "",
            "| method | parameters | fit, s | influences, s | peak memory, MiB | Pearson | "
            "rel. error | scale | notes |",
            "|---|---|---|---|---|---|---|---|---|",
            *peer_rows,
            "",
            "Agreement (Pearson over the influence matrix, float32 runs above, reference "
            "float64):",
            "",
            *matrix,
            "",
            *scales,
        ]
    wall = time.perf_counter() - wall0
    t = os.times()
    cpu = sum(t[:4]) - sum(cpu0[:4])
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
        *peers,
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
        f"{sys.version.split()[0]}, torch {torch.__version__}"
        + (f", pyDVL {_version('pydvl')}, kronfluence {_version('kronfluence')}"
           if args.peers else "")
        + f". Reproduce: `{cmd}`.",
        "",
        f"This run took {wall // 60:.0f} min {wall % 60:.0f} s of wall time for "
        f"{cpu // 60:.0f} min {cpu % 60:.0f} s of CPU time (user and system, all processes).",
    ])
    print(text)
    if not args.fast:
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
