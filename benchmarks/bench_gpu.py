"""Every method on the CPU and on a CUDA device: time, memory, agreement.

Two cases: the 26,122-parameter digits MLP (1,500 train / 200 test, Gauss-Newton,
regularization 0.1; every method but Direct) and the ResNet
case of ``bench_cnn.py`` (SmallResNet with BatchNorm, frozen stem and first block,
2,000 train / 200 test images of 32x32, Gauss-Newton, regularization 0.01). For each
method: seconds for fit + the influence matrix on each device (CUDA timed after a
synchronisation, best of ``--repeats`` after an untimed warm-up run), peak CUDA
memory (``torch.cuda.max_memory_allocated``), the speed-up, and how far the CUDA
result is from the CPU one (largest relative difference over the matrix, and
Pearson).

Where CUDA is not available the CPU column is still measured and the CUDA columns
say so: the script is meant to be run as it is on a machine with a GPU
(``bash benchmarks/gpu_check.sh`` runs the CUDA tests, then this).

Run:  python benchmarks/bench_gpu.py [--fast] [--repeats N] [--threads N]
Writes benchmarks/results/gpu.md (``--fast``: prints only).
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_cnn import setup as resnet_setup
from panels import panel_b
from sklearn.exceptions import ConvergenceWarning

import skinfluence
from skinfluence.solvers import METHODS

warnings.filterwarnings("ignore", category=ConvergenceWarning)
RESULTS = Path(__file__).parent / "results" / "gpu.md"
#: (method, settings) per case; the rest of each scorer's parameters at their defaults
RUNS = {
    "mlp": [  # Direct's 26,122^2 matrix takes minutes on the CPU: it runs on the ResNet
        ("cg", {}), ("lissa", {"maxiter": 300, "minibatch_size": 256}),
        ("arnoldi", {"rank": 30}), ("nystroem", {"rank": 30}), ("ekfac", {}),
        ("gradient_similarity", {}),
    ],
    "resnet": [
        ("direct", {}), ("cg", {}), ("lissa", {"maxiter": 300, "minibatch_size": 64}),
        ("arnoldi", {"rank": 50}), ("nystroem", {"rank": 50}), ("ekfac", {}),
        ("gradient_similarity", {}),
    ],
}
SETTINGS = {
    "mlp": {"regularization": 0.1, "hessian": "gauss-newton"},
    "resnet": {"regularization": 0.01, "hessian": "gauss-newton"},
}


def scorer(name, model, case, device, **kw):
    cls = getattr(skinfluence, METHODS[name].scorer_name)
    settings = {"loss": F.cross_entropy, "random_state": 0, "device": device,
                **SETTINGS[case], **kw}
    takes = cls().get_params()
    return cls(model, **{k: v for k, v in settings.items() if k in takes})


def timed(fn, device, repeats):
    fn()  # warm-up: kernels, allocator, lazy imports
    best, out = float("inf"), None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return best, out, peak


def run_case(case, model, Xtr, ytr, Xte, yte, repeats, cuda):
    rows = []
    for name, kw in RUNS[case]:
        label = name + "".join(f", {k}={v}" for k, v in kw.items())
        times = {}
        for device in ["cpu"] + (["cuda"] if cuda else []):
            def fn(device=device):
                s = scorer(name, model, case, device, **kw)
                return np.asarray(s.fit(Xtr, ytr).influences(Xte, yte), dtype=np.float64)
            times[device] = timed(fn, device, repeats)
        t_cpu, I_cpu, _ = times["cpu"]
        if cuda:
            t_gpu, I_gpu, peak = times["cuda"]
            diff = float(np.abs(I_gpu - I_cpu).max() / np.abs(I_cpu).max())
            r = float(np.corrcoef(I_gpu.ravel(), I_cpu.ravel())[0, 1])
            rows.append(f"| {label} | {t_cpu:.2f} | {t_gpu:.2f} | {t_cpu / t_gpu:.1f}x | {peak:.0f} | "
                        f"{diff:.1e} | {r:.8f} |")
        else:
            rows.append(f"| {label} | {t_cpu:.2f} | (no CUDA) | | | | |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="small data: a smoke test")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if cuda else "none"
    sections = []
    n_mlp, n_img, n_test = (300, 200, 20) if args.fast else (1500, 2000, 200)
    model, Xtr, ytr, Xte, yte = panel_b(hidden=128, n_train=n_mlp, n_test=n_test)
    head = ["| method | CPU, s | CUDA, s | speed-up | peak CUDA MiB | max rel. difference | Pearson CUDA vs CPU |",
            "|---|---|---|---|---|---|---|"]
    sections.append("\n".join([f"### Digits MLP 64-128-128-10 (26,122 parameters), {n_mlp} train x {n_test} test",
                               "", *head, *run_case("mlp", model, Xtr, ytr, Xte, yte, args.repeats, cuda)]))
    model, Xtr, ytr, Xte, yte, _ = resnet_setup(n_img, n_test, 32)
    sections.append("\n".join([f"### SmallResNet with BatchNorm, frozen stem and first block, {n_img} train x "
                               f"{n_test} test images", "", *head,
                               *run_case("resnet", model, Xtr, ytr, Xte, yte, args.repeats, cuda)]))
    cmd = "python benchmarks/bench_gpu.py" + (" --fast" if args.fast else f" --repeats {args.repeats}")
    text = "\n\n".join([
        "## Every method on the CPU and on CUDA",
        f"CUDA device: {device_name}; CPU: {platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s); torch {torch.__version__}, skinfluence {skinfluence.__version__}. Times are "
        f"fit + influence matrix, best of {args.repeats} after a warm-up.",
        *sections,
        f"Reproduce: `{cmd}` (or `bash benchmarks/gpu_check.sh`, which runs the CUDA tests first).",
    ])
    print(text)
    if not args.fast:
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
