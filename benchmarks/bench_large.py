"""Large influence matrices: out of core on zarr, beside pyDVL's DaskInfluenceCalculator,
streaming self-influence, and FastIF's recall and speed-up.

The model of the first three is small on purpose (multinomial logistic regression,
64 features, 10 classes: 650 parameters, a torch ``nn.Linear`` trained with Adam), so
the matrix, not the model, is what is large. Peak memory is the largest sum of the
resident set sizes of this process and all its children (the Dask workers),
sampled every 0.1 s by psutil, and, for a run in this process alone, also
``ru_maxrss``.

Run (one part per call; each prints markdown rows):
    python benchmarks/bench_large.py zarr --n-test 20000 --n-train 200000 --chunks 1000 25000
    PYTHONPATH=/tmp/pydvl_pkgs python benchmarks/bench_large.py compare --n-test 1000 --n-train 50000
    python benchmarks/bench_large.py self --n-train 1000000
    python benchmarks/bench_large.py fastif
    python benchmarks/bench_large.py fastif --case synthetic --n-train 50000 --neighbors 500 2000
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from panels import panel_b, train_mlp

from skinfluence import DirectInfluenceScorer
from skinfluence.large import FastIF

D, K = 64, 10


def data(n: int, seed: int = 0):
    """Gaussian features, labels of a noisy linear rule over 10 classes (float32)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D, K))
    X = rng.normal(size=(n, D)).astype(np.float32)
    y = np.argmax(X @ W + rng.gumbel(size=(n, K)), 1).astype(np.int64)
    return X, y


def small_model(X, y):
    torch.manual_seed(0)
    return train_mlp(nn.Linear(D, K), X[:20000], y[:20000], epochs=5, lr=0.01)


class PeakRSS:
    """Largest sum of the RSS of this process and its children, sampled in a thread."""

    def __init__(self, every: float = 0.1):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()

    def _sample(self):
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every)

    def __enter__(self):
        self._sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self._sample()


def gb(x):
    return x / 2**30


def part_zarr(args):
    """A large float32 matrix to zarr on Dask's local threads; time, throughput, RSS."""
    torch.set_num_threads(args.threads)
    X, y = data(args.n_train)
    model = small_model(X, y)
    t0 = time.perf_counter()
    s = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.01,
                              batch_size=args.batch_size).fit(X, y)
    t_fit = time.perf_counter() - t0
    Xte, yte = X[: args.n_test], y[: args.n_test]
    path = Path(args.out or tempfile.mkdtemp(prefix="influences-")) / "I.zarr"
    shutil.rmtree(path, ignore_errors=True)
    I = s.influences_tiles(Xte, yte, chunks=tuple(args.chunks))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        I.to_zarr(str(path))
        t = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import dask.array as da

    back = da.from_zarr(str(path))
    check = np.abs(back[:50, :2000].compute() - s.influences(Xte[:50], yte[:50], X[:2000], y[:2000]))
    tile_mb = 4 * args.chunks[0] * args.chunks[1] / 2**20
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"| {args.n_test:,} x {args.n_train:,} | {gb(I.nbytes):.2f} GB | {args.chunks[0]:,} x "
          f"{args.chunks[1]:,} ({tile_mb:.0f} MB) | {I.npartitions} | {t_fit:.1f} s | {t:.0f} s | "
          f"{I.size / t / 1e6:.1f} M/s | {peak.peak / 2**30:.2f} GB (ru_maxrss {maxrss:.2f} GB, "
          f"{base:.2f} before) | {gb(on_disk):.2f} GB | {check.max():.1e} |")
    if not args.out:
        shutil.rmtree(path.parent, ignore_errors=True)


def part_compare(args):
    """Ours and pyDVL's DaskInfluenceCalculator, same model, sizes and tiles, to zarr,
    on LocalClusters of 1 and 2 single-threaded worker processes (and ours on local
    threads). Workers import both libraries before the timed runs (a cold worker
    spends some seconds importing torch and the library)."""
    import dask.array as da
    from distributed import Client, LocalCluster
    from pydvl.influence import DaskInfluenceCalculator
    from pydvl.influence.torch import DirectInfluence
    from pydvl.influence.torch.util import TorchNumpyConverter
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    X, y = data(args.n_train)
    model = small_model(X, y)
    Xte, yte = X[: args.n_test], y[: args.n_test]
    rows, cols = args.chunks
    ours = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.01,
                                 batch_size=args.batch_size).fit(X, y)
    theirs = DirectInfluence(model, F.cross_entropy, regularization=0.01).fit(
        DataLoader(TensorDataset(torch.as_tensor(X), torch.as_tensor(y)), batch_size=4096))
    tmp = Path(tempfile.mkdtemp(prefix="compare-"))
    results = {}

    def run(label, make):
        """Twice: a cold run (first tasks of their kind on fresh workers: torch.func
        and zarr warm up there) and the warm run that is compared."""
        times = []
        for _ in range(2):
            path = tmp / f"{label}.zarr"
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                make().to_zarr(str(path))
                times.append(time.perf_counter() - t0)
            shutil.rmtree(path, ignore_errors=True)
        results[label] = (times[1], peak.peak)
        print(f"| {label} | {times[1]:.1f} s | {times[0]:.1f} s | {gb(peak.peak):.2f} GB |",
              flush=True)

    print(f"\n{args.n_test:,} x {args.n_train:,} float32, tiles {rows:,} x {cols:,}\n")
    print("| run | time (warm) | time (cold, first run) | peak RSS (all processes, warm run) |\n"
          "|---|---|---|---|")
    run("skinfluence, local threads", lambda: ours.influences_tiles(Xte, yte, chunks=(rows, cols)))
    for n in args.workers:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            # both libraries imported on every worker first, so neither run pays for it
            client.run(lambda: [__import__(m) for m in ("skinfluence", "pydvl.influence.torch")])
            run(f"skinfluence, {n} worker process(es)",
                lambda client=client: ours.influences_tiles(Xte, yte, chunks=(rows, cols),
                                                            client=client))
            calc = DaskInfluenceCalculator(theirs, TorchNumpyConverter(), client)
            run(f"pyDVL DaskInfluenceCalculator, {n} worker process(es)",
                lambda calc=calc: calc.influences(da.from_array(Xte, chunks=(rows, D)),
                                        da.from_array(yte, chunks=rows),
                                        da.from_array(X, chunks=(cols, D)),
                                        da.from_array(y, chunks=cols)))
    I = ours.influences(Xte[:20], yte[:20], X[:500], y[:500])
    J = theirs.influences(torch.as_tensor(Xte[:20]), torch.as_tensor(yte[:20]),
                          torch.as_tensor(X[:500]), torch.as_tensor(y[:500])).numpy()
    print(f"\nmax relative difference ours vs pyDVL on 20 x 500: "
          f"{np.abs(I - J).max() / np.abs(J).max():.1e}")
    for n in args.workers:
        a = results[f"skinfluence, {n} worker process(es)"]
        b = results[f"pyDVL DaskInfluenceCalculator, {n} worker process(es)"]
        print(f"{n} worker(s): pyDVL / ours time {b[0] / a[0]:.1f}x, peak memory {b[1] / a[1]:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


def part_self(args):
    """Streaming self-influence of many training points, in blocks, bounded memory."""
    torch.set_num_threads(args.threads)
    X, y = data(args.n_train)
    model = small_model(X, y)
    t0 = time.perf_counter()
    s = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.01,
                              batch_size=args.batch_size).fit(X, y)
    t_fit = time.perf_counter() - t0
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        v = s.self_influence_tiles(chunks=65536).compute()
        t = time.perf_counter() - t0
    print(f"| self-influence of {args.n_train:,} points (650 params) | fit {t_fit:.1f} s | "
          f"{t:.1f} s | {args.n_train / t:,.0f} points/s | peak RSS {gb(peak.peak):.2f} GB "
          f"(training data {gb(X.nbytes):.2f} GB) | {v.shape} |")


def part_fastif(args):
    """Recall@10 of the exact top 10 and speed-up: panel B (digits MLP, 1,000 training
    points; embedding: inputs or the first hidden layer), or ``--n-train`` points of
    the synthetic logistic regression (embedding: inputs)."""
    torch.set_num_threads(args.threads)
    if args.case == "panel-b":
        model, Xtr, ytr, Xte, yte = panel_b()
        embeddings = (None, "2")
    else:
        X, y = data(args.n_train + 1000)
        model = small_model(X, y)
        Xtr, ytr, Xte, yte = X[:args.n_train], y[:args.n_train], X[args.n_train:], y[args.n_train:]
        embeddings = (None,)
    s = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.1,
                              batch_size=1024).fit(Xtr, ytr)
    n_queries = args.queries

    def best(fn, r=3):
        times = []
        for _ in range(r):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    print("| embedding | n_neighbors | test points | recall@10 helpful | recall@10 harmful | "
          "exact top-10 | FastIF (fit + query) | speed-up |\n|---|---|---|---|---|---|---|---|")
    for q in n_queries:
        t_exact, exact = best(lambda q=q: s.top_influential(Xte[:q], yte[:q], k=10))
        for emb in embeddings:
            for m in args.neighbors:
                def fast(q=q, m=m, emb=emb):
                    return FastIF(s, n_neighbors=m, embedding=emb, batch_size=1).fit().top_influential(
                        Xte[:q], yte[:q], k=10)
                t_fast, top = best(fast)
                rec = {
                    key: np.mean([len(set(a) & set(b)) / 10 for a, b in
                                  zip(top[f"{key}_indices"], exact[f"{key}_indices"], strict=True)])
                    for key in ("helpful", "harmful")
                }
                name = "inputs" if emb is None else "hidden layer (net 2, tanh)"
                name = f"{args.case}, {len(Xtr):,} train: {name}"
                print(f"| {name} | {m} | {q} | {rec['helpful']:.2f} | {rec['harmful']:.2f} | "
                      f"{t_exact * 1e3:.0f} ms | {t_fast * 1e3:.0f} ms | {t_exact / t_fast:.2f}x |",
                      flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["zarr", "compare", "self", "fastif"])
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--chunks", type=int, nargs=2, default=[1000, 25_000])
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--neighbors", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--queries", type=int, nargs="+", default=[10, 200])
    ap.add_argument("--case", choices=["panel-b", "synthetic"], default="panel-b")
    ap.add_argument("--out", default=None, help="keep the zarr store under this folder")
    args = ap.parse_args()
    {"zarr": part_zarr, "compare": part_compare, "self": part_self, "fastif": part_fastif}[args.part](args)


if __name__ == "__main__":
    main()
