"""Training data read batch by batch: numpy memmaps, dask arrays and torch Datasets
give the same results as arrays, for every method and every operation, and the
scorer never holds the training inputs whole."""

import json
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import small_mlp_data
from sklearn.exceptions import ConvergenceWarning
from torch.utils.data import Dataset, TensorDataset

import skinfluence
from skinfluence import DatasetSource
from skinfluence._data import Rows
from skinfluence.solvers import METHODS

NAMES = sorted(METHODS)
SOURCES = ["memmap", "dask", "dataset"]


def make(name, model, **kw):
    cls = getattr(skinfluence, METHODS[name].scorer_name)
    names = set(cls().get_params())
    base = {"loss": F.cross_entropy, "regularization": 0.1, "random_state": 0,
            "maxiter": 4, "batch_size": 8, **kw}
    return cls(model, **{k: v for k, v in base.items() if k in names})


@pytest.fixture(scope="module")
def data():
    return small_mlp_data()


@pytest.fixture(scope="module")
def memmap(data, tmp_path_factory):
    _, Xtr, _, _, _ = data
    path = tmp_path_factory.mktemp("memmap") / "X.dat"
    out = np.memmap(path, dtype=np.float64, mode="w+", shape=Xtr.shape)
    out[:] = Xtr
    out.flush()
    del out
    return np.memmap(path, dtype=np.float64, mode="r", shape=Xtr.shape)


def source(kind, data, memmap):
    _, Xtr, ytr, _, _ = data
    if kind == "memmap":
        return memmap, ytr
    if kind == "dask":
        da = pytest.importorskip("dask.array")
        return da.from_array(Xtr, chunks=16), da.from_array(ytr, chunks=16)
    return TensorDataset(torch.tensor(Xtr), torch.tensor(ytr)), None


# every method on a memmap; the other sources (the same Rows behind them) with the
# exact method and EK-FAC, which reads the data in passes of its own
CASES = [(name, "memmap") for name in NAMES] + [
    (name, kind) for kind in ("dask", "dataset") for name in ("direct", "ekfac")]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_every_method_and_operation_equals_the_in_memory_one(name, kind, data, memmap):
    model, Xtr, ytr, Xte, yte = data
    X, y = source(kind, data, memmap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = make(name, model).fit(Xtr, ytr)
        s = make(name, model).fit(X, y)
        assert isinstance(s.X_train_, Rows) and isinstance(s.operator_.X, Rows)
        assert s.n_train_ == 70 and s.n_features_in_ == 4
        np.testing.assert_array_equal(s.influences(Xte, yte), ref.influences(Xte, yte))
        np.testing.assert_array_equal(s.self_influence(), ref.self_influence())
        # the training points given again, out of core, to the methods that take X
        np.testing.assert_array_equal(s.influences(Xte, yte, X, y), ref.influences(Xte, yte))
        np.testing.assert_array_equal(s.self_influence(X, y), ref.self_influence())
        top, top_ref = s.top_influential(Xte, yte, k=5), ref.top_influential(Xte, yte, k=5)
        np.testing.assert_array_equal(top.helpful_indices, top_ref.helpful_indices)
        np.testing.assert_array_equal(top.harmful_values, top_ref.harmful_values)
        np.testing.assert_array_equal(s.class_probabilities(), ref.class_probabilities())
        np.testing.assert_array_equal(s.predict_removal_effect(Xte, yte, remove=[1, 5, 9]),
                                      ref.predict_removal_effect(Xte, yte, remove=[1, 5, 9]))


@pytest.mark.parametrize("kind", SOURCES)
def test_newton_removal_reads_the_remaining_rows(kind, data, memmap):
    """The Newton step's curvature of the remaining data, over a view of the rows."""
    model, Xtr, ytr, Xte, yte = data
    X, y = source(kind, data, memmap)
    s, ref = make("direct", model).fit(X, y), make("direct", model).fit(Xtr, ytr)
    for correction in ("newton", "second-order"):
        got = s.predict_removal_effect(Xte, yte, groups=[[1, 5, 9], [2, 40]], correction=correction)
        want = ref.predict_removal_effect(Xte, yte, groups=[[1, 5, 9], [2, 40]], correction=correction)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", SOURCES)
def test_tiles_read_their_own_blocks(kind, data, memmap):
    """Dask tiles over out-of-core data: each task reads its block of rows; the graph
    carries no training tensor."""
    pytest.importorskip("dask.array")
    model, Xtr, ytr, Xte, yte = data
    X, y = source(kind, data, memmap)
    s = make("direct", model).fit(X, y)
    ref = make("direct", model).fit(Xtr, ytr)
    I = s.influences_tiles(Xte, yte, chunks=(7, 16))
    tensors = [v for v in I.__dask_graph__().values()
               if isinstance(v, tuple) and any(isinstance(e, torch.Tensor) and e.shape[0] == 16 for e in v)]
    assert not tensors
    np.testing.assert_allclose(I.compute(), ref.influences(Xte, yte), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s.self_influence_tiles(chunks=16).compute(), ref.self_influence(), rtol=1e-12)


def test_lissa_minibatches_and_views_of_a_memmap(data, memmap):
    """LiSSA's random minibatches read random rows; a memmap that is a view of
    another (rows 10 onwards) reads its own rows, not the file's first ones."""
    model, Xtr, ytr, Xte, yte = data
    kw = {"minibatch_size": 16, "maxiter": 10}
    np.testing.assert_array_equal(
        make("lissa", model, **kw).fit(memmap, ytr).influences(Xte, yte),
        make("lissa", model, **kw).fit(Xtr, ytr).influences(Xte, yte),
    )
    view = memmap[10:]
    np.testing.assert_array_equal(
        make("direct", model).fit(view, ytr[10:]).self_influence(),
        make("direct", model).fit(Xtr[10:], ytr[10:]).self_influence(),
    )


def test_a_pickled_scorer_keeps_the_file_name_not_the_data(data, memmap):
    model, Xtr, ytr, _, _ = data
    s = make("direct", model).fit(memmap, ytr)
    blob = pickle.dumps(s)
    restored = pickle.loads(blob)
    assert isinstance(restored.X_train_, Rows)
    np.testing.assert_array_equal(restored.self_influence(), s.self_influence())
    # the array scorer's pickle holds the 70 x 4 float64 inputs; this one does not
    in_memory = pickle.dumps(make("direct", model).fit(Xtr, ytr))
    assert len(in_memory) - len(blob) > 0.5 * Xtr.nbytes


class _Records(Dataset):
    """Items that are dicts, as many datasets return them."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {"features": torch.tensor(self.X[i]), "label": int(self.y[i])}


def test_dataset_source_with_its_own_collate(data):
    model, Xtr, ytr, Xte, yte = data
    ds = _Records(Xtr, ytr)

    def collate(items):
        return (torch.stack([it["features"] for it in items]),
                torch.tensor([it["label"] for it in items]))

    s = make("direct", model).fit(DatasetSource(ds, collate=collate), None)
    np.testing.assert_array_equal(s.influences(Xte, yte), make("direct", model).fit(Xtr, ytr).influences(Xte, yte))
    with pytest.raises(ValueError, match=r"^X: the dataset's items could not be collated .*DatasetSource\(dataset, collate"):
        make("direct", model).fit(ds, None)


def test_errors_name_the_argument_and_the_rows(data, memmap, tmp_path):
    model, Xtr, ytr, _, _ = data
    bad = np.memmap(tmp_path / "bad.dat", dtype=np.float64, mode="w+", shape=Xtr.shape)
    bad[:] = Xtr
    bad[33, 2] = np.nan
    bad.flush()
    with pytest.raises(ValueError, match=r"^X: rows 32..39 contain NaN or infinity"):
        make("direct", model).fit(bad, ytr)
    with pytest.raises(ValueError, match=r"^y: a torch Dataset carries its own targets"):
        make("direct", model).fit(TensorDataset(torch.tensor(Xtr), torch.tensor(ytr)), ytr)
    with pytest.raises(ValueError, match=r"^y has 69 samples but X has 70"):
        make("direct", model).fit(memmap, ytr[:69])
    s = make("direct", model).fit(Xtr, ytr)
    wrong = np.memmap(tmp_path / "wrong.dat", dtype=np.float64, mode="w+", shape=(70, 3))
    with pytest.raises(ValueError, match=r"^X has samples of shape \(3,\), but DirectInfluenceScorer was fitted on samples of shape \(4,\)"):
        s.self_influence(wrong, ytr)


_CAPPED = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    import torch.nn.functional as F
    from skinfluence import DirectInfluenceScorer

    path, n, d, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    X = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
    y = np.load(path + ".y.npy")
    torch.manual_seed(0)
    model = torch.nn.Linear(d, 2)

    def data_size():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    # warm up (torch imports parts of itself on first use), then cap: the heap,
    # anonymous maps and stacks may grow by `cap` bytes from here; a
    # read-only file mapping is not counted, so the memmap itself is allowed
    DirectInfluenceScorer(model, loss=F.cross_entropy).fit(np.asarray(X[:64]), y[:64]).self_influence()
    limit = data_size() + cap
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        np.ones(n * d, dtype=np.float32)  # what holding X in memory would take
        control = "allocated"
    except MemoryError:
        control = "refused"
    s = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=0.1,
                              batch_size=4096).fit(X, y)
    v = s.self_influence()
    top = s.top_influential(np.asarray(X[:2]), y[:2], k=3)
    print(json.dumps({"control": control, "n": int(v.shape[0]), "finite": bool(np.isfinite(v).all()),
                      "top": top.helpful_indices.tolist()}))
""")


def test_fit_self_influence_and_top_k_under_a_memory_cap_below_the_data(tmp_path):
    """A 102 MB memmap, a process whose memory may grow by 48 MB: fit, self-influence
    and the top-k pass all run (the same allocation as holding X is refused)."""
    n, d = 200_000, 128
    path = tmp_path / "X.dat"
    X = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    rng = np.random.default_rng(0)
    for i in range(0, n, 40_000):
        X[i:i + 40_000] = rng.normal(size=(40_000, d)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    X.flush()
    del X
    np.save(str(path) + ".y.npy", y)
    cap = 48 * 2**20
    # glibc's dynamic mmap threshold would keep freed batch buffers in the heap,
    # which counts against the cap though the memory is free; fix the threshold
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _CAPPED, str(path), str(n), str(d), str(cap)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["control"] == "refused", r
    assert r["n"] == n and r["finite"], r
    assert len(r["top"]) == 2 and all(len(t) == 3 for t in r["top"])
