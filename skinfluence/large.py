"""Influence at scale: tiled, lazy and streaming computations (methods of the scorers).

An influence matrix ``n_test x n_train`` is cut into independent tiles, each one a
pure function of (fitted solver, block of test factors, block of training points):
:func:`skinfluence.solvers.pairwise_tile`, called batch by batch inside the tile.
:meth:`LargeData.influences_tiles` lays these tiles out as a lazy ``dask.array``,
which any Dask scheduler computes (local threads by default, or a
``distributed.Client``) and which ``to_zarr`` writes out of core, one tile at a
time. :meth:`LargeData.top_influential` streams over training blocks and keeps only
the strongest proponents and opponents of each test point. :class:`FastIF` prunes
the training points to the nearest neighbours of each test point first (Guo et al.,
2021), an approximation whose recall is measured in ``benchmarks/bench_large.py``.
"""

from __future__ import annotations

import os
import threading
import uuid
from numbers import Integral
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import Bunch
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from ._data import Rows
from ._gradients import batch_slices, per_sample_grads
from .solvers import pairwise_tile

__all__ = ["FastIF", "LargeData"]

_WHICH = ("both", "helpful", "harmful")


# --------------------------------------------------------------------------- tasks
# Module-level functions of picklable arguments: the tasks of the Dask graphs, run
# in this process (threads) or in any worker process.

# torch.func's forward-mode transforms (the jvp in Hessian products) keep their
# level in process-wide state, and a solver call switches the model to eval mode and
# back: two threads must not run them at once. Each solver call holds this lock;
# copying, compressing and writing tiles run outside it, in parallel.
_COMPUTE_LOCK = threading.RLock()


def _factor_block(solver, block, batch_size: int, parameter: bool):
    """Test factors of a block of points, ``batch_size`` at a time (as the scorer's
    in-memory methods batch them, so block solves see the same right-hand sides)."""
    X, Y = block
    out = []
    for s in batch_slices(X.shape[0], batch_size):
        with _COMPUTE_LOCK, solver.adapter_.eval_mode():
            out.append(solver.factors(X[s], Y[s]))
    F = torch.cat(out)
    if parameter:
        with _COMPUTE_LOCK:
            F = solver.parameter_factors(F)
    return F


def _influence_tile(solver, F, block, mode: str, batch_size: int, progress=None) -> np.ndarray:
    """One tile: ``pairwise_tile`` over the training block, ``batch_size`` points at a
    time, written into one preallocated array (peak memory: the tile plus a batch)."""
    X, Y = block
    out = None
    for s in batch_slices(X.shape[0], batch_size):
        with _COMPUTE_LOCK:
            t = pairwise_tile(solver, F, X[s], Y[s], mode).detach().to("cpu").numpy()
        if out is None:
            out = np.empty((t.shape[0], X.shape[0], *t.shape[2:]), dtype=t.dtype)
        out[:, s] = t
    if progress is not None:
        progress.update()
    return out


def _self_block(solver, block, mode: str, batch_size: int, progress=None) -> np.ndarray:
    """Self-influence of a block of points, ``batch_size`` at a time."""
    from .scorers import _self_perturbation

    X, Y = block
    out = []
    for s in batch_slices(X.shape[0], batch_size):
        with _COMPUTE_LOCK, solver.adapter_.eval_mode():
            if mode == "up":
                out.append(solver.self_scores(X[s], Y[s]))
            else:
                G = per_sample_grads(solver.adapter_, X[s], Y[s])
                out.append(_self_perturbation(solver.adapter_, X[s], Y[s], solver.solve(G)))
    if progress is not None:
        progress.update()
    return torch.cat(out).detach().to("cpu").numpy()


_BARS: dict = {}
_BARS_LOCK = threading.Lock()
_IMPORTED = uuid.uuid4().hex


def _process():
    return os.getpid(), _IMPORTED


class _TileProgress:
    """A tqdm bar over the tiles of one array, opened when the first tile is done.

    Picklable: the bar lives in a registry of the process that built the graph; in
    a worker process the lookup finds nothing and updates are no-ops (a distributed
    client has its own progress: ``distributed.progress``).
    """

    def __init__(self, total: int, desc: str):
        self.token, self.total, self.desc = uuid.uuid4().hex, int(total), desc
        self.owner = _process()

    def update(self):
        if self.owner != _process():  # another process
            return
        with _BARS_LOCK:
            bar = _BARS.get(self.token)
            if bar is None:
                from tqdm.auto import tqdm

                bar = _BARS[self.token] = tqdm(total=self.total, desc=self.desc, leave=False,
                                             mininterval=0, miniters=1)
            bar.update(1)
            if bar.n >= self.total:
                bar.close()
                del _BARS[self.token]

    def __dask_tokenize__(self):
        return self.token


# --------------------------------------------------------------------------- graph


def _dask():
    try:
        import dask
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - the dask extra is missing
        raise ImportError(
            "Tiled influences need Dask: pip install 'skinfluence[dask]' (dask[array], "
            "distributed and zarr)."
        ) from exc
    return dask, da


class _Placer:
    """Puts the inputs of the tiles into the graph once each: the fitted solver as
    one key (broadcast to every worker by a distributed client), each block of
    points as one key (scattered to some worker), never copied into each tile."""

    def __init__(self, client, name: str):
        self.client, self.name = client, name
        self.dask, _ = _dask()

    def solver(self, solver):
        if self.client is not None:
            return self.client.scatter(solver, broadcast=True, hash=False)
        return self.dask.delayed(solver, name=f"{self.name}-solver", traverse=False)

    def blocks(self, what: str, X, Y, size: int):
        slices = list(batch_slices(int(X.shape[0]), size))
        if isinstance(X, Rows):  # rows read batch by batch: each task reads its own
            data = [(X.take(np.arange(s.start, s.stop)),
                     Y.take(np.arange(s.start, s.stop)) if isinstance(Y, Rows) else Y[s])
                    for s in slices]
        else:
            data = [(X[s], Y[s]) for s in slices]
        if self.client is not None:
            return slices, self.client.scatter(data, hash=False)
        delayed = self.dask.delayed
        return slices, [
            delayed(d, name=f"{self.name}-{what}-{i}", traverse=False) for i, d in enumerate(data)
        ]


def _check_chunks(chunks, two: bool):
    """(rows, cols) of positive ints, or one positive int."""
    want = "a pair (rows, cols) of positive ints" if two else "a positive int"
    values = chunks if two else (chunks,)
    ok = (
        isinstance(values, tuple | list)
        and len(values) == (2 if two else 1)
        and all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 1 for v in values)
    )
    if not ok:
        raise ValueError(f"chunks must be {want}; got {chunks!r}.")
    return tuple(int(v) for v in values)


def _check_client(client):
    if client is None:
        return None
    if not (hasattr(client, "scatter") and hasattr(client, "compute")):
        raise TypeError(
            f"client must be a distributed.Client or None (local threads); got "
            f"{type(client).__name__}."
        )
    return client


def _numpy_dtype(torch_dtype) -> np.dtype:
    return torch.empty(0, dtype=torch_dtype).numpy().dtype


# --------------------------------------------------------------------------- top-k


def _check_k(k, n_train: int, name: str = "k") -> int:
    if not isinstance(k, Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{name} must be a positive int; got {k!r}.")
    if k > n_train:
        raise ValueError(f"{name}={k} is larger than the number of training points ({n_train}).")
    return int(k)


def _check_which(which) -> str:
    if which not in _WHICH:
        raise ValueError(f"which must be one of {list(_WHICH)}; got {which!r}.")
    return which


class _RunningTop:
    """The k largest values of each row seen so far, and their column indices."""

    def __init__(self, n_rows: int, k: int, dtype):
        self.k = k
        self.values = torch.full((n_rows, 0), float("-inf"), dtype=dtype)
        self.indices = torch.zeros((n_rows, 0), dtype=torch.long)

    def add(self, values: torch.Tensor, indices: torch.Tensor):
        v = torch.cat([self.values, values], 1)
        i = torch.cat([self.indices, indices], 1)
        top = torch.topk(v, min(self.k, v.shape[1]), dim=1, largest=True, sorted=True)
        self.values, self.indices = top.values, i.gather(1, top.indices)


class _TopK:
    """Helpful (largest) and harmful (most negative) running tops of a stream of tiles."""

    def __init__(self, n_rows: int, k: int, which: str, dtype):
        self.which = which
        self.helpful = _RunningTop(n_rows, k, dtype) if which in ("both", "helpful") else None
        self.harmful = _RunningTop(n_rows, k, dtype) if which in ("both", "harmful") else None

    def add(self, tile: torch.Tensor, columns: torch.Tensor):
        cols = columns.expand(tile.shape[0], -1)
        if self.helpful is not None:
            self.helpful.add(tile, cols)
        if self.harmful is not None:
            self.harmful.add(-tile, cols)

    def result(self) -> Bunch:
        out = Bunch()
        if self.helpful is not None:
            out.helpful_indices = self.helpful.indices.numpy()
            out.helpful_values = self.helpful.values.numpy()
        if self.harmful is not None:
            out.harmful_indices = self.harmful.indices.numpy()
            out.harmful_values = (-self.harmful.values).numpy()
        return out


_TOP_RETURNS = """top : Bunch
            ``helpful_indices`` and ``helpful_values``, arrays of shape (n_test, k):
            the training points of largest influence on each test point, most
            helpful first; ``harmful_indices`` and ``harmful_values``: those of most
            negative influence, most harmful first. Only the keys ``which`` asks for."""


# --------------------------------------------------------------------------- mixin


class LargeData:
    """Tiled, out-of-core and streaming methods shared by every scorer.

    Examples
    --------
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.large import LargeData
    >>> issubclass(DirectInfluenceScorer, LargeData)
    True
    """

    def influences_tiles(self, X_test, y_test=None, X=None, y=None, *, chunks=(1024, 16384),
                         client=None):
        """:meth:`influences` as a lazy ``dask.array``, computed tile by tile.

        ``I[i, j] = grad l(test_i)^T (H + lambda I)^-1 grad l(train_j)``, as
        :meth:`influences` returns it. Nothing is computed until the array is: by
        ``.compute()``, by ``.to_zarr(path)`` (out of core, one tile in memory per
        worker thread), or by any dask reduction. Each tile is a pure task of (fitted
        solver, block of test factors, block of training points)
        (:func:`skinfluence.solvers.pairwise_tile`, ``batch_size`` training points
        at a time); the test factors are one task per row of tiles.

        Parameters
        ----------
        X_test : array-like of shape (n_test, n_features)
            Points whose loss is influenced.
        y_test : array-like of shape (n_test,), default=None
            Their targets; None uses the model's predicted class (classifiers only).
        X, y : array-like, default=None
            Training points to score, with their targets; None uses the data given to
            ``fit``.
        chunks : tuple of (int, int), default=(1024, 16384)
            Test points and training points per tile. A tile of float32 takes
            ``4 * rows * cols`` bytes; peak memory is about one tile per worker thread
            plus the test factors of the rows being computed.
        client : distributed.Client, default=None
            None computes on any scheduler (Dask's local threads unless another is
            active). With a client, the fitted solver is broadcast to every worker
            once and each block of points scattered once, so no tile carries them.

        Returns
        -------
        I : dask.array.Array of shape (n_test, n_train) or (n_test, n_train, n_features)
            Chunked as ``chunks``; in the model's dtype. With ``progress=True`` a tqdm
            bar counts the tiles computed in this process.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.linear_model import LogisticRegression
        >>> from skinfluence import DirectInfluenceScorer
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(60, 3)); y = (X[:, 0] > 0).astype(int)
        >>> s = DirectInfluenceScorer(LogisticRegression().fit(X, y)).fit(X, y)
        >>> I = s.influences_tiles(X[:10], y[:10], chunks=(4, 25))
        >>> I.chunks
        ((4, 4, 2), (25, 25, 10))
        >>> bool(np.allclose(I.compute(), s.influences(X[:10], y[:10])))
        True
        """
        check_is_fitted(self)
        rows, cols = _check_chunks(chunks, two=True)
        client = _check_client(client)
        _, da = _dask()
        Xte, Yte = self._data(X_test, y_test, "X_test", "y_test")
        Xtr, Ytr = self._data(X, y, "X", "y", predicted_ok=False)
        tail = () if self.mode == "up" else tuple(self.x_shape_)
        dtype = _numpy_dtype(self.adapter_.dtype)
        n_test, n_train = int(Xte.shape[0]), int(Xtr.shape[0])
        if n_test == 0 or n_train == 0:
            return da.zeros((n_test, n_train, *tail), dtype=dtype, chunks=(rows, cols, *tail))
        name = f"influences-{uuid.uuid4().hex}"
        put = _Placer(client, name)
        solver = put.solver(self.solver_)
        row_slices, test_blocks = put.blocks("test", Xte, Yte, rows)
        col_slices, train_blocks = put.blocks("train", Xtr, Ytr, cols)
        progress = (_TileProgress(len(row_slices) * len(col_slices), "influence tiles")
                    if self.progress else None)
        delayed, bs = put.dask.delayed, int(self.batch_size)
        meta = np.empty((0, 0, *tail), dtype=dtype)
        grid = []
        for i, (rs, tb) in enumerate(zip(row_slices, test_blocks, strict=True)):
            F = delayed(_factor_block, pure=False)(
                solver, tb, bs, self.mode == "perturbation", dask_key_name=f"{name}-factors-{i}")
            row = []
            for j, (cs, trb) in enumerate(zip(col_slices, train_blocks, strict=True)):
                task = delayed(_influence_tile, pure=False)(
                    solver, F, trb, self.mode, bs, progress, dask_key_name=f"{name}-tile-{i}-{j}")
                shape = (rs.stop - rs.start, cs.stop - cs.start, *tail)
                row.append(da.from_delayed(task, shape=shape, dtype=dtype, meta=meta))
            grid.append(row)
        return da.concatenate([da.concatenate(row, axis=1) for row in grid], axis=0)

    def self_influence_tiles(self, X=None, y=None, *, chunks=65536, client=None):
        """:meth:`self_influence` as a lazy ``dask.array``, one task per block of points.

        ``I[j, j]`` of each point, with
        ``I[i, j] = grad l(test_i)^T (H + lambda I)^-1 grad l(train_j)`` as
        :meth:`influences` returns it. Each block is computed ``batch_size`` points at
        a time, so memory is bounded by the block, whatever the number of points.

        Parameters
        ----------
        X, y : array-like, default=None
            Points to score, with their targets; None uses the data given to ``fit``.
        chunks : int, default=65536
            Points per task.
        client : distributed.Client, default=None
            As in :meth:`influences_tiles`: the fitted solver is broadcast once per
            worker.

        Returns
        -------
        s : dask.array.Array of shape (n_samples,) or (n_samples, n_features)

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.linear_model import LogisticRegression
        >>> from skinfluence import DirectInfluenceScorer
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(60, 3)); y = (X[:, 0] > 0).astype(int)
        >>> s = DirectInfluenceScorer(LogisticRegression().fit(X, y)).fit(X, y)
        >>> v = s.self_influence_tiles(chunks=25)
        >>> v.chunks
        ((25, 25, 10),)
        >>> bool(np.allclose(v.compute(), s.self_influence()))
        True
        """
        check_is_fitted(self)
        (size,) = _check_chunks(chunks, two=False)
        client = _check_client(client)
        _, da = _dask()
        X, Y = self._data(X, y, "X", "y", predicted_ok=False)
        tail = () if self.mode == "up" else tuple(self.x_shape_)
        dtype = _numpy_dtype(self.adapter_.dtype)
        n = int(X.shape[0])
        if n == 0:
            return da.zeros((0, *tail), dtype=dtype, chunks=(size, *tail))
        name = f"self-influence-{uuid.uuid4().hex}"
        put = _Placer(client, name)
        solver = put.solver(self.solver_)
        slices, blocks = put.blocks("points", X, Y, size)
        progress = _TileProgress(len(slices), "self-influence blocks") if self.progress else None
        delayed, meta = put.dask.delayed, np.empty((0, *tail), dtype=dtype)
        parts = [
            da.from_delayed(
                delayed(_self_block, pure=False)(solver, b, self.mode, int(self.batch_size),
                                                 progress, dask_key_name=f"{name}-{i}"),
                shape=(s.stop - s.start, *tail), dtype=dtype, meta=meta)
            for i, (s, b) in enumerate(zip(slices, blocks, strict=True))
        ]
        return da.concatenate(parts)

    def top_influential(self, X_test, y_test=None, X=None, y=None, *, k=20, which="both"):
        """The ``k`` most helpful and most harmful training points of each test point.

        One streaming pass over the training points, ``batch_size`` at a time: memory
        is ``O(n_test * (k + batch_size))`` besides the test factors, never the
        ``n_test x n_train`` matrix. Influences as :meth:`influences` returns them,
        ``I[i, j] = grad l(test_i)^T (H + lambda I)^-1 grad l(train_j)``: helpful
        points have the largest, harmful the most negative.

        Parameters
        ----------
        X_test : array-like of shape (n_test, n_features)
            Points whose loss is influenced.
        y_test : array-like of shape (n_test,), default=None
            Their targets; None uses the model's predicted class (classifiers only).
        X, y : array-like, default=None
            Training points to rank, with their targets; None uses the data given to
            ``fit``.
        k : int, default=20
            Training points kept per test point and direction.
        which : {"both", "helpful", "harmful"}, default="both"
            The directions to keep.

        Returns
        -------
        {top_returns}

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.linear_model import LogisticRegression
        >>> from skinfluence import DirectInfluenceScorer
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(60, 3)); y = (X[:, 0] > 0).astype(int)
        >>> s = DirectInfluenceScorer(LogisticRegression().fit(X, y)).fit(X, y)
        >>> top = s.top_influential(X[:5], y[:5], k=3)
        >>> top.helpful_indices.shape, top.harmful_values.shape
        ((5, 3), (5, 3))
        >>> I = s.influences(X[:5], y[:5])
        >>> bool((top.helpful_indices == np.argsort(-I, axis=1)[:, :3]).all())
        True
        """
        check_is_fitted(self)
        if self.mode != "up":
            raise ValueError(
                "mode: top_influential ranks influences of mode='up'; set mode='up'."
            )
        which = _check_which(which)
        Xte, Yte = self._data(X_test, y_test, "X_test", "y_test")
        Xtr, Ytr = self._data(X, y, "X", "y", predicted_ok=False)
        k = _check_k(k, int(Xtr.shape[0]))
        from .scorers import _iterate, _progress

        report = self._new_report()
        steps = list(batch_slices(int(Xtr.shape[0]), self.batch_size))
        top = _TopK(int(Xte.shape[0]), k, which, self.adapter_.dtype)
        with self.adapter_.eval_mode():
            F = self._factors(Xte, Yte, report)
            for s in _iterate(_progress(self.progress), steps, "top influential"):
                tile = pairwise_tile(self.solver_, F, Xtr[s], Ytr[s]).detach().to("cpu")
                top.add(tile, torch.arange(s.start, s.stop).unsqueeze(0))
        self._publish(report)
        return top.result()

    top_influential.__doc__ = top_influential.__doc__.replace("{top_returns}", _TOP_RETURNS)


# --------------------------------------------------------------------------- FastIF


class FastIF(BaseEstimator):
    """Influence on each test point's nearest training points only (FastIF).

    Guo et al. (2021): the training points most influential on a test point are
    mostly among its nearest neighbours, in the input space or in a learned
    embedding. ``fit`` indexes the scorer's training points with sklearn's
    ``NearestNeighbors``; :meth:`top_influential` then computes influences only on
    the ``n_neighbors`` candidates of each test point. An approximation: a point
    outside the candidates is never ranked. Influences as the scorer's,
    ``I[i, j] = grad l(test_i)^T (H + lambda I)^-1 grad l(train_j)``.

    It pays when few test points are explained against many training points: the
    gradients of the candidates are computed per block of test points, while the
    exact ranking computes every training gradient once for all test points. The
    recall of the exact top 10 and the speed-up, measured on the benchmarks' digits
    MLP, are in ``benchmarks/results/large.md``.

    Parameters
    ----------
    scorer : InfluenceScorer
        A fitted scorer in mode "up"; its training data are the candidates' pool.
    n_neighbors : int, default=100
        Candidates per test point.
    embedding : None, str or callable, default=None
        Where neighbours are searched: None, the model's inputs (flattened); a
        module name of the model (e.g. ``"net.2"``), that module's output; a
        callable, called on a batch of inputs as the model receives them (a torch
        tensor) and returning an array of shape (batch, n_dims).
    metric : str, default="euclidean"
        The ``NearestNeighbors`` metric.
    batch_size : int, default=32
        Test points per step: the candidates of a step are scored together, so the
        gradients of candidates shared by neighbouring test points are computed once.

    Attributes
    ----------
    neighbors_ : sklearn.neighbors.NearestNeighbors
        The index over the embedded training points.
    n_train_ : int
        Number of training points indexed.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.large import FastIF
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(80, 3)); y = (X[:, 0] > 0).astype(int)
    >>> s = DirectInfluenceScorer(LogisticRegression().fit(X, y)).fit(X, y)
    >>> fast = FastIF(s, n_neighbors=80).fit()
    >>> top = fast.top_influential(X[:4], y[:4], k=5, which="helpful")
    >>> exact = s.top_influential(X[:4], y[:4], k=5, which="helpful")
    >>> bool((top.helpful_indices == exact.helpful_indices).all())
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        "scorer": "no_validation",
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "embedding": [None, str, callable],
        "metric": [str, callable],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, scorer=None, n_neighbors=100, embedding=None, metric="euclidean",
                 batch_size=32):
        self.scorer = scorer
        self.n_neighbors = n_neighbors
        self.embedding = embedding
        self.metric = metric
        self.batch_size = batch_size

    def _embed(self, X: torch.Tensor) -> np.ndarray:
        adapter = self.scorer.adapter_
        bs = int(self.scorer.batch_size)
        parts = []
        if self.embedding is None:  # the inputs themselves, read batch by batch
            for s in batch_slices(int(X.shape[0]), bs):
                parts.append(X[s].reshape(len(X[s]), -1).detach().to("cpu").numpy())
            return np.concatenate(parts) if parts else np.zeros((0, 0))
        if callable(self.embedding):
            for s in batch_slices(int(X.shape[0]), bs):
                with torch.no_grad():
                    e = self.embedding(X[s])
                e = e.detach().to("cpu").numpy() if isinstance(e, torch.Tensor) else np.asarray(e)
                parts.append(e.reshape(e.shape[0], -1))
            return np.concatenate(parts) if parts else np.zeros((0, 0))
        modules = dict(adapter.module.named_modules())
        if self.embedding not in modules:
            raise ValueError(
                f"embedding: the model has no module {self.embedding!r}; pass one of "
                f"{[n for n in modules if n]} or a callable."
            )
        seen = []
        hook = modules[self.embedding].register_forward_hook(
            lambda m, i, o: seen.append(o.detach().reshape(o.shape[0], -1)))
        try:
            with adapter.eval_mode():
                for s in batch_slices(int(X.shape[0]), bs):
                    adapter.outputs(X[s])
        finally:
            hook.remove()
        return torch.cat(seen).to("cpu", torch.float64).numpy()

    def fit(self, X=None, y=None):
        """Index the scorer's training points by their embedding.

        Parameters
        ----------
        X, y : None
            Unused: the candidates are the training points of the fitted scorer.

        Returns
        -------
        self : FastIF
            The fitted index.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.linear_model import LogisticRegression
        >>> from skinfluence import DirectInfluenceScorer
        >>> from skinfluence.large import FastIF
        >>> X = np.random.default_rng(0).normal(size=(30, 2)); y = (X[:, 0] > 0).astype(int)
        >>> s = DirectInfluenceScorer(LogisticRegression().fit(X, y)).fit(X, y)
        >>> FastIF(s, n_neighbors=5).fit().n_train_
        30
        """
        from sklearn.neighbors import NearestNeighbors

        self._validate_params()
        if self.scorer is None or not hasattr(self.scorer, "top_influential"):
            raise TypeError("scorer: pass a fitted skinfluence scorer (an InfluenceScorer).")
        check_is_fitted(self.scorer)
        if self.scorer.mode != "up":
            raise ValueError("scorer: FastIF ranks influences of mode='up'; fit a scorer "
                             "with mode='up'.")
        n = int(self.scorer.n_train_)
        _check_k(self.n_neighbors, n, "n_neighbors")
        self.neighbors_ = NearestNeighbors(n_neighbors=int(self.n_neighbors), metric=self.metric)
        self.neighbors_.fit(self._embed(self.scorer.X_train_))
        self.n_train_ = n
        return self

    def candidates(self, X_test):
        """The ``n_neighbors`` nearest training points of each test point.

        Parameters
        ----------
        X_test : array-like of shape (n_test, n_features)
            Test points.

        Returns
        -------
        indices : ndarray of shape (n_test, n_neighbors)
            Training indices, nearest first.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.linear_model import LogisticRegression
        >>> from skinfluence import DirectInfluenceScorer
        >>> from skinfluence.large import FastIF
        >>> X = np.random.default_rng(0).normal(size=(30, 2)); y = (X[:, 0] > 0).astype(int)
        >>> s = DirectInfluenceScorer(LogisticRegression().fit(X, y)).fit(X, y)
        >>> FastIF(s, n_neighbors=3).fit().candidates(X[:2])[:, 0].tolist()
        [0, 1]
        """
        check_is_fitted(self)
        Xte = self.scorer.adapter_.features(self.scorer._check_X(X_test, "X_test"))
        return self.neighbors_.kneighbors(self._embed(Xte), return_distance=False)

    def top_influential(self, X_test, y_test=None, *, k=10, which="both"):
        """The ``k`` most helpful and harmful training points among the candidates.

        Parameters
        ----------
        X_test : array-like of shape (n_test, n_features)
            Points whose loss is influenced.
        y_test : array-like of shape (n_test,), default=None
            Their targets; None uses the model's predicted class (classifiers only).
        k : int, default=10
            Training points kept per test point and direction, at most ``n_neighbors``.
        which : {"both", "helpful", "harmful"}, default="both"
            The directions to keep.

        Returns
        -------
        {top_returns}
            Indices are into the scorer's training data.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.linear_model import LogisticRegression
        >>> from skinfluence import DirectInfluenceScorer
        >>> from skinfluence.large import FastIF
        >>> X = np.random.default_rng(0).normal(size=(50, 2)); y = (X[:, 0] > 0).astype(int)
        >>> s = DirectInfluenceScorer(LogisticRegression().fit(X, y)).fit(X, y)
        >>> top = FastIF(s, n_neighbors=10).fit().top_influential(X[:3], y[:3], k=2)
        >>> top.helpful_indices.shape
        (3, 2)
        """
        check_is_fitted(self)
        which = _check_which(which)
        k = _check_k(k, int(self.n_neighbors), "k")
        sc = self.scorer
        Xte, Yte = sc._data(X_test, y_test, "X_test", "y_test")
        Xtr, Ytr = sc.X_train_, sc.y_train_
        cand = torch.as_tensor(
            self.neighbors_.kneighbors(self._embed(Xte), return_distance=False))
        from .scorers import _iterate, _progress

        report = sc._new_report()
        parts = []
        steps = list(batch_slices(int(Xte.shape[0]), int(self.batch_size)))
        with sc.adapter_.eval_mode():
            # all test factors in the scorer's batches: a solve per call costs the same
            # for one right-hand side as for a batch (a triangular solve for Direct)
            F_all = sc._factors(Xte, Yte, report)
            for s in _iterate(_progress(sc.progress), steps, "FastIF"):
                F = F_all[s]
                pool, pos = torch.unique(cand[s], return_inverse=True)
                tile = torch.cat([
                    pairwise_tile(sc.solver_, F, Xtr[pool[b]], Ytr[pool[b]]).detach().to("cpu")
                    for b in batch_slices(int(pool.shape[0]), int(sc.batch_size))
                ], 1)
                top = _TopK(int(F.shape[0]), k, which, sc.adapter_.dtype)
                top.add(tile.gather(1, pos), cand[s])
                parts.append(top.result())
        sc._publish(report)
        if not parts:
            return _TopK(0, k, which, sc.adapter_.dtype).result()
        return Bunch(**{key: np.concatenate([p[key] for p in parts]) for key in parts[0]})


FastIF.top_influential.__doc__ = FastIF.top_influential.__doc__.replace(
    "{top_returns}", _TOP_RETURNS)
