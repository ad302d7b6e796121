"""EK-FAC on CNNs side by side with kronfluence's EK-FAC, in one process.

Two cases, both with cross-entropy, regularization (kronfluence's damping) 0.01 added
to the eigenvalues, float32:

1. A small CNN on digits: ``Conv2d(1, 16, 3) - ReLU - Conv2d(16, 32, 3) - ReLU -
   MaxPool2d(2) - Linear(512, 10)`` (9,930 parameters), trained on 8x8 digit images
   (scikit-learn's digits, shifted by up to a pixel and with noise added, so that
   2,000 train and 200 test images are distinct).
2. ``skinfluence.datasets.SmallResNet(width=4, stem_stride=4)`` on the synthetic
   two-class 32x32 images of ``benchmarks/bench_cnn.py``, stem and first block frozen
   (962 trainable parameters, 48 of them BatchNorm, which both EK-FACs hold fixed).

Each method computes the 200 x 2,000 influence matrix (fit + influences). Times are
the best of ``--repeats`` rounds after one untimed round; within a round the methods
run in turn, so that all of them see the same machine load. Accuracy: Pearson over
the influence matrix against the exact Gauss-Newton influences in float64 (the p x p
matrix formed from per-sample Jacobians and solved by Cholesky, over every trainable
parameter); ``--fast`` also checks that reference against skinfluence's
``CgInfluenceScorer(rtol=1e-10, dtype="float64")``.

kronfluence 1.0.1: ``FactorArguments(strategy="ekfac")`` (labels sampled from the
model's predictive distribution, K-FAC's eigenbasis, eigenvalues refitted),
``ScoreArguments(damping_factor=0.01)``, the same batch size (256) as ours; its
factors and scores go through its files in a temporary folder, as it always does.

Run:  python benchmarks/bench_ekfac_cnn.py [--fast] [--repeats 2] [--threads 1]
``--fast``: 200 train x 20 test images, one timed round (a smoke test).
Needs kronfluence (``pip install kronfluence==1.0.1``; without it its rows are left
out). Writes benchmarks/results/ekfac_cnn.md (``--fast``: prints only).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import TensorDataset

# this checkout's package, whatever is installed
sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parent)]
from bench_cnn import setup as resnet_setup  # noqa: E402

import skinfluence  # noqa: E402
from skinfluence import CgInfluenceScorer, EkfacInfluenceScorer  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="kronfluence")

RESULTS = Path(__file__).parent / "results" / "ekfac_cnn.md"
REG = 0.01
BATCH = 256
#: label -> EkfacInfluenceScorer settings
OURS = [
    ("EK-FAC default (fisher='auto', basis_iter='auto', random_state=0)", {"random_state": 0}),
    ("Gauss-Newton, basis_iter=2 (the default before 'auto')", {"fisher": "gauss-newton", "basis_iter": 2}),
    ("Gauss-Newton, basis_iter=1", {"fisher": "gauss-newton", "basis_iter": 1}),
    ("Gauss-Newton, basis_iter=0 (K-FAC eigenbasis)", {"fisher": "gauss-newton", "basis_iter": 0}),
    ("fisher='true', basis_iter=2", {"fisher": "true", "basis_iter": 2, "random_state": 0}),
    ("fisher='true', basis_iter=0", {"fisher": "true", "basis_iter": 0, "random_state": 0}),
]
KRON = "kronfluence 1.0.1 EK-FAC"


# ------------------------------------------------------------------ the two cases
class DigitsCNN(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10),
        )


def digits_images(n: int, rng: np.random.RandomState):
    """``n`` digit images (n, 1, 8, 8): shifted by up to one pixel, noise added."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).reshape(-1, 8, 8)
    idx = rng.randint(0, len(y), n)
    out = np.zeros((n, 8, 8))
    padded = np.pad(X[idx], ((0, 0), (1, 1), (1, 1)))
    shifts = rng.randint(0, 3, (n, 2))
    for k, (dy, dx) in enumerate(shifts):
        out[k] = padded[k, dy : dy + 8, dx : dx + 8]
    out += 0.1 * rng.standard_normal(out.shape)
    return out[:, None].astype(np.float32), y[idx].astype(np.int64)


def digits_setup(n_train: int, n_test: int):
    X, y = digits_images(n_train + n_test, np.random.RandomState(0))
    Xtr, ytr, Xte, yte = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    Xt, yt = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    for _ in range(10):
        for idx in torch.randperm(n_train).split(32):
            opt.zero_grad()
            F.cross_entropy(model(Xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.as_tensor(Xte)).argmax(1).numpy() == yte).mean())
    return model, Xtr, ytr, Xte, yte, acc


# ------------------------------------------------------------------ reference
def exact_influences(model, Xtr, ytr, Xte, yte, reg=REG, batch=50):
    """``G_test (GN + reg I)^-1 G_train^T`` in float64, with GN the mean Gauss-Newton
    matrix of the cross-entropy over every trainable parameter, formed from
    per-sample Jacobians of the logits: ``J^T (diag(p) - p p^T) J``."""
    m = copy.deepcopy(model).double().eval()
    names = [n for n, q in m.named_parameters() if q.requires_grad]
    fixed = {**{n: q.detach() for n, q in m.named_parameters() if not q.requires_grad},
             **dict(m.named_buffers())}
    params = {n: m.get_parameter(n).detach() for n in names}

    def logits(p, x):
        return functional_call(m, {**fixed, **p}, (x[None],))[0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))

    def parts(X, y):
        X = torch.as_tensor(X, dtype=torch.float64)
        J = jac(params, X)
        J = torch.cat([J[n].reshape(X.shape[0], -1, params[n].numel()) for n in names], 2)
        with torch.no_grad():
            out = vmap(logits, in_dims=(None, 0))(params, X)
        prob = torch.softmax(out, -1)
        r = prob.sqrt()
        L = torch.diag_embed(r) - prob[:, :, None] * r[:, None, :]  # L L^T = diag(p) - p p^T
        resid = prob - F.one_hot(torch.as_tensor(y), prob.shape[1]).to(prob.dtype)
        grads = torch.einsum("bcp,bc->bp", J, resid)
        return J, L, grads

    p = sum(q.numel() for q in params.values())
    GN = torch.zeros(p, p, dtype=torch.float64)
    Gtr = []
    for s in range(0, len(ytr), batch):
        J, L, g = parts(Xtr[s : s + batch], ytr[s : s + batch])
        V = torch.einsum("bck,bcp->bkp", L, J).reshape(-1, p)
        GN.addmm_(V.T, V)
        Gtr.append(g)
    Gtr = torch.cat(Gtr)
    Gte = torch.cat([parts(Xte[s : s + batch], yte[s : s + batch])[2] for s in range(0, len(yte), batch)])
    GN /= len(ytr)
    GN.diagonal().add_(reg)
    C = torch.linalg.cholesky(GN)
    return (torch.cholesky_solve(Gte.T, C).T @ Gtr.T).numpy()


def cg_reference(model, Xtr, ytr, Xte, yte):
    return CgInfluenceScorer(model, loss=F.cross_entropy, hessian="gauss-newton",
                             regularization=REG, rtol=1e-10, dtype="float64").fit(
        Xtr, ytr).influences(Xte, yte)


# ------------------------------------------------------------------ runners
def ours_runner(model, Xtr, ytr, Xte, yte, kw):
    def run():
        t0 = time.perf_counter()
        s = EkfacInfluenceScorer(model, loss=F.cross_entropy, regularization=REG,
                                 batch_size=BATCH, **kw).fit(Xtr, ytr)
        t1 = time.perf_counter()
        I = s.influences(Xte, yte)
        return I, t1 - t0, time.perf_counter() - t1
    return run


def kron_runner(model, Xtr, ytr, Xte, yte, workdir):
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError:
        return None
    tracked = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))
               and all(q.requires_grad for q in mod.parameters())]

    class CrossEntropy(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            out = model(x)
            if sample:  # labels from the predictive distribution: the true Fisher
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(out.detach(), -1), 1).flatten()
            return F.cross_entropy(out, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def get_influence_tracked_modules(self):
            return tracked

    train = TensorDataset(torch.as_tensor(Xtr), torch.as_tensor(ytr))
    query = TensorDataset(torch.as_tensor(Xte), torch.as_tensor(yte))
    threads = torch.get_num_threads()

    def run():
        torch.manual_seed(0)
        task = CrossEntropy()
        t0 = time.perf_counter()
        m = prepare_model(copy.deepcopy(model).eval(), task)
        an = Analyzer("bench", m, task, cpu=True, disable_tqdm=True, output_dir=workdir,
                      log_level=logging.WARNING)
        torch.set_num_threads(threads)
        an.fit_all_factors("factors", train, per_device_batch_size=BATCH,
                           factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        t1 = time.perf_counter()
        an.compute_pairwise_scores("scores", "factors", query, train,
                                   per_device_query_batch_size=len(yte),
                                   per_device_train_batch_size=BATCH,
                                   score_args=ScoreArguments(damping_factor=REG),
                                   overwrite_output_dir=True)
        I = an.load_pairwise_scores("scores")["all_modules"].numpy()
        return I, t1 - t0, time.perf_counter() - t1
    return run


def race(runners: dict, repeats: int) -> dict:
    """Best (fit + influences) of each runner over ``repeats`` rounds after an
    untimed one; the matrix from the first round."""
    best, out = {}, {}
    for round_ in range(repeats + 1):
        for label, fn in runners.items():
            I, t_fit, t_inf = fn()
            out.setdefault(label, I)
            if round_ and (label not in best or t_fit + t_inf < sum(best[label])):
                best[label] = (t_fit, t_inf)
    return {label: (*best[label], out[label]) for label in runners}


def case(title, model, Xtr, ytr, Xte, yte, args, workdir):
    n_params = sum(q.numel() for q in model.parameters() if q.requires_grad)
    t0 = time.perf_counter()
    ref = exact_influences(model, Xtr, ytr, Xte, yte)
    t_ref = time.perf_counter() - t0
    print(f"{title}: {n_params} trainable parameters; reference {t_ref:.1f} s", flush=True)
    check = ""
    if args.fast:
        cg = cg_reference(model, Xtr, ytr, Xte, yte)
        check = f" (Pearson with CG to rtol 1e-10: {pearsonr(cg.ravel(), ref.ravel())[0]:.8f})"
        print("reference vs CG" + check, flush=True)
    default = EkfacInfluenceScorer(model, loss=F.cross_entropy, regularization=REG,
                                   batch_size=BATCH, **OURS[0][1]).fit(Xtr, ytr)
    resolved = f" [here fisher={default.fisher_!r}, basis_iter={default.basis_iter_}]"
    runners = {label + (resolved if k == 0 else ""): ours_runner(model, Xtr, ytr, Xte, yte, kw)
               for k, (label, kw) in enumerate(OURS)}
    kron = kron_runner(model, Xtr, ytr, Xte, yte, workdir)
    if kron is not None:
        runners[KRON] = kron
    res = race(runners, args.repeats)
    t_kron = sum(res[KRON][:2]) if KRON in res else np.nan
    rows = []
    for label, (t_fit, t_inf, I) in res.items():
        r = pearsonr(np.asarray(I, np.float64).ravel(), ref.ravel())[0]
        ratio = t_kron / (t_fit + t_inf)
        rows.append(f"| {label} | {t_fit:.2f} | {t_inf:.2f} | {t_fit + t_inf:.2f} | "
                    f"{ratio:.2f}x | {r:.4f} |")
        print(rows[-1], flush=True)
    return "\n".join([
        f"### {title}", "",
        f"{n_params} trainable parameters, {len(ytr)} train x {len(yte)} test; reference "
        f"{t_ref:.0f} s{check}.", "",
        "| method | fit, s | influences, s | total, s | kronfluence time / this | Pearson vs exact |",
        "|---|---|---|---|---|---|",
        *rows,
    ])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    n_train, n_test = (200, 20) if args.fast else (2000, 200)
    if args.fast:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M")
    sections = []
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        model, Xtr, ytr, Xte, yte, acc = digits_setup(n_train, n_test)
        print(f"digits CNN trained in {time.perf_counter() - t0:.1f} s, test accuracy {acc:.3f}", flush=True)
        sections.append(case(f"Small CNN on digits (test accuracy {acc:.3f})",
                             model, Xtr, ytr, Xte, yte, args, workdir))
        t0 = time.perf_counter()
        model, Xtr, ytr, Xte, yte, acc = resnet_setup(n_train, n_test, 32)
        torch.set_num_threads(args.threads)
        print(f"SmallResNet trained in {time.perf_counter() - t0:.1f} s, test accuracy {acc:.3f}", flush=True)
        sections.append(case(f"SmallResNet(width=4), 32x32 images, stem and first block frozen "
                             f"(test accuracy {acc:.3f})", model, Xtr, ytr, Xte, yte, args, workdir))
    try:
        from kronfluence import __version__ as kron_version
    except ImportError:
        kron_version = "not installed"
    cmd = "python benchmarks/bench_ekfac_cnn.py" + (" --fast" if args.fast else "")
    if not args.fast:
        cmd += f" --repeats {args.repeats} --threads {args.threads}"
    text = "\n\n".join([
        "## EK-FAC vs kronfluence on CNNs (same process)",
        f"Regularization (kronfluence: damping) {REG}, float32, batch {BATCH}; times are the "
        f"best of {args.repeats} rounds after an untimed one, the methods in turn within "
        "each round. Pearson over the influence matrix against the exact Gauss-Newton "
        "influences in float64 (every trainable parameter, BatchNorm included).",
        *sections,
        f"skinfluence {skinfluence.__version__} ({Path(skinfluence.__file__).parent}), kronfluence {kron_version}, torch "
        f"{torch.__version__}, {args.threads} thread(s), {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at start; run {started}. "
        f"Reproduce: `{cmd}`.",
    ])
    print(text)
    if not args.fast:
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
