"""Training data that is read batch by batch instead of held as one tensor.

``fit`` and every method of the scorers take, besides arrays, data that may not fit
in memory: a numpy ``memmap``, a dask array, or a torch ``Dataset`` of ``(x, y)``
items (see :class:`DatasetSource` for other items). The scorer then keeps a
:class:`Rows` object in place of the training tensor: it has the tensor's shape and
is indexed like it, and each read converts only the rows asked for, so a batch of
``batch_size`` rows is the most that is in memory at once.

A memmap is re-opened for each read and closed after it, so the pages read do not
stay mapped in the process (its resident memory does not grow with the file).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

__all__ = ["DatasetSource", "Rows", "is_out_of_core"]


class DatasetSource:
    """A torch ``Dataset`` as training data, read in batches through ``collate``.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        A map-style dataset (``len`` and integer indexing).
    collate : callable, default=None
        Takes a list of items and returns ``(X_batch, y_batch)`` (arrays or
        tensors). None uses ``torch.utils.data.default_collate``, which fits items
        that are ``(x, y)`` pairs.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from skinfluence import DatasetSource
    >>> ds = TensorDataset(torch.randn(10, 3), torch.arange(10) % 2)
    >>> source = DatasetSource(ds, collate=lambda items: (
    ...     torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])))
    >>> len(source)
    10
    """

    def __init__(self, dataset, collate=None):
        self.dataset = dataset
        self.collate = collate

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, idx: np.ndarray):
        collate = self.collate
        if collate is None:
            from torch.utils.data import default_collate as collate
        advice = ("pass DatasetSource(dataset, collate=...) with a collate that returns "
                  "(X_batch, y_batch).")
        try:
            out = collate([self.dataset[int(i)] for i in idx])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"X: the dataset's items could not be collated into (X, y) batches "
                f"({type(exc).__name__}: {exc}); {advice}"
            ) from exc
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise ValueError(
                f"X: the dataset's items could not be collated into (X, y) batches (the "
                f"collate returned a {type(out).__name__}); {advice}"
            )
        return _numpy(out[0]), _numpy(out[1])


class _ArraySource:
    """Rows of an array-like that is read on demand (memmap, dask array, zarr)."""

    def __init__(self, X):
        self.shape = tuple(int(d) for d in X.shape)
        self.dtype = np.dtype(X.dtype)
        if isinstance(X, np.memmap) and X.filename and X.base is getattr(X, "_mmap", None):
            # a memmap is re-opened per read: pickles small, pages are released
            self.memmap = (X.filename, int(X.offset), "F" if _fortran(X) else "C")
            self.array = None
        else:
            self.memmap, self.array = None, X

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, idx: np.ndarray):
        if self.memmap is not None:
            filename, offset, order = self.memmap
            mm = np.memmap(filename, dtype=self.dtype, mode="r", offset=offset,
                           shape=self.shape, order=order)
            try:
                out = np.array(_take(mm, idx))
            finally:
                del mm
            return out, None
        out = _take(self.array, idx)
        if hasattr(out, "compute"):  # dask
            out = out.compute()
        return np.asarray(out), None


def _fortran(X) -> bool:
    return bool(X.flags.f_contiguous and not X.flags.c_contiguous)


def _take(a, idx: np.ndarray):
    """Rows ``idx`` of ``a``: one slice when they are consecutive."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx) and np.all(np.diff(idx) == 1):
        return a[int(idx[0]):int(idx[-1]) + 1]
    return a[idx]


def _numpy(a):
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu").numpy()
    return np.asarray(a)


def is_out_of_core(X) -> bool:
    """Whether ``X`` is read batch by batch rather than converted whole."""
    if isinstance(X, (DatasetSource, np.memmap)):
        return True
    if isinstance(X, torch.Tensor):
        return False
    module = type(X).__module__ or ""
    if module.startswith("dask.") and hasattr(X, "compute") and hasattr(X, "chunks"):
        return True
    try:
        from torch.utils.data import Dataset
    except ImportError:  # pragma: no cover
        return False
    return isinstance(X, Dataset)


def source_of(X):
    """The source object behind out-of-core ``X``."""
    if isinstance(X, DatasetSource):
        return X
    if isinstance(X, np.memmap) or (type(X).__module__ or "").startswith("dask."):
        return _ArraySource(X)
    return DatasetSource(X)


class _Reader:
    """A source with its conversion to tensors by the model's adapter, and a
    one-batch cache per thread, so that reading ``X[s]`` then ``Y[s]`` reads the
    rows once. ``Y`` holds the targets when they are in memory (arrays); a
    Dataset's come with its items."""

    def __init__(self, source, adapter, Y=None, xname="X", yname="y"):
        self.source, self.adapter, self.Y = source, adapter, Y
        self.xname, self.yname = xname, yname
        self._local = threading.local()

    def convert_x(self, x, rows) -> torch.Tensor:
        x, name = _numpy(x), self.xname
        if x.dtype.kind not in "biuf":
            raise ValueError(
                f"{name}: rows {rows[0]}..{rows[1]} are of dtype {x.dtype}; pass numeric data."
            )
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError(
                f"{name}: rows {rows[0]}..{rows[1]} contain NaN or infinity; clean them, "
                "or leave those rows out."
            )
        return self.adapter.features(x)

    def convert_y(self, y) -> torch.Tensor:
        return self.adapter.targets(_numpy(y), self.yname)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def batch(self, idx: np.ndarray):
        cached = getattr(self._local, "last", None)
        if cached is not None and np.array_equal(cached[0], idx):
            return cached[1]
        x, y = self.source.read(idx)
        rows = (int(idx.min()), int(idx.max())) if len(idx) else (0, 0)
        Xt = self.convert_x(x, rows)
        if self.Y is not None:
            Yt = self.Y[torch.as_tensor(idx, device=self.Y.device)]
        else:
            Yt = self.convert_y(y)
        out = (Xt, Yt)
        self._local.last = (idx.copy(), out)
        return out


class Rows:
    """Training inputs (``column=0``) or targets (``column=1``), read on indexing.

    Indexed like a tensor along its first axis (an int, a slice, an index array or
    tensor); the result is a tensor of those rows only. ``shape`` is the full shape.
    """

    def __init__(self, reader: _Reader, column: int, n: int, row_shape: tuple,
                 device, dtype, index: np.ndarray | None = None):
        self.reader, self.column = reader, column
        self._n, self.row_shape, self.device, self.dtype = n, tuple(row_shape), device, dtype
        self.index = index

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._n, *self.row_shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def dim(self) -> int:
        return self.ndim

    def __len__(self) -> int:
        return self._n

    def _positions(self, key) -> np.ndarray:
        if isinstance(key, slice):  # a range, not an arange of all n rows per read
            r = range(self._n)[key]
            pos = np.arange(r.start, r.stop, r.step, dtype=np.int64)
        else:
            if isinstance(key, torch.Tensor):
                key = key.detach().to("cpu").numpy()
            pos = np.asarray(key)
            if pos.dtype == bool:
                pos = np.flatnonzero(pos)
            pos = np.where(pos < 0, pos + self._n, pos).astype(np.int64)
        return pos if self.index is None else self.index[pos]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self[np.array([int(key)])][0]
        if isinstance(key, tuple):
            raise TypeError("Rows are indexed along their first axis only.")
        return self.reader.batch(self._positions(key))[self.column]

    def take(self, idx) -> Rows:
        """The rows ``idx`` as another lazy view (nothing is read)."""
        return Rows(self.reader, self.column, len(np.asarray(idx)), self.row_shape,
                    self.device, self.dtype, self._positions(idx))

    def new_zeros(self, *shape):
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"Rows(shape={tuple(self.shape)}, read batch by batch)"
