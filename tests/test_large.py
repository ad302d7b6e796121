"""Tiled, out-of-core and streaming influences (skinfluence.large).

Nothing here names a method: the equalities run for every entry of
``skinfluence.solvers.METHODS``. Each result is compared with the in-memory one
(``influences``, ``self_influence``, argsort of the full matrix); the memory bound is
measured as the peak RSS of a subprocess that writes a matrix many times the tile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch.nn.functional as F
from _models import small_mlp_data
from sklearn.exceptions import ConvergenceWarning
from torch import nn

import skinfluence
from skinfluence.large import FastIF
from skinfluence.solvers import METHODS

da = pytest.importorskip("dask.array")
NAMES = sorted(METHODS)


def make(name, model, **kw):
    """The method's scorer, iterative ones cut short (``maxiter``): tiles repeat the
    in-memory computation on the same blocks of right-hand sides, so they must agree
    whether or not a solve converged."""
    cls = getattr(skinfluence, METHODS[name].scorer_name)
    names = set(cls().get_params())
    base = {"loss": F.cross_entropy, "regularization": 0.1, "random_state": 0,
            "maxiter": 20, **kw}
    return cls(model, **{k: v for k, v in base.items() if k in names})


@pytest.fixture(scope="module")
def data():
    """A trained 4-6-3 tanh MLP (51 parameters), float64, 70 train / 20 test."""
    return small_mlp_data()


@pytest.fixture(scope="module")
def fitted(data):
    model, Xtr, ytr, _, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return {name: make(name, model, batch_size=8).fit(Xtr, ytr) for name in NAMES}


def close(a, b, rtol=1e-7):
    scale = max(np.abs(b).max(), 1e-300)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


# --------------------------------------------------------------------------- tiles


@pytest.mark.parametrize("name", NAMES)
def test_tiles_equal_the_in_memory_influences(name, data, fitted):
    """Tiles of uneven sizes (8 x 16 over 12 x 70; batch_size 8 splits each tile's
    training block) give the in-memory matrix and self-influence."""
    _, Xtr, ytr, Xte, yte = data
    s = fitted[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        I = s.influences_tiles(Xte[:12], yte[:12], chunks=(8, 16))
        assert isinstance(I, da.Array) and I.chunks == ((8, 4), (16, 16, 16, 16, 6))
        close(I.compute(), s.influences(Xte[:12], yte[:12]))
        # other training points than fit's, and predicted targets for the test points
        close(s.influences_tiles(Xte[:8], None, Xtr[:30], ytr[:30], chunks=(16, 9)).compute(),
              s.influences(Xte[:8], None, Xtr[:30], ytr[:30]))
        v = s.self_influence_tiles(Xtr[:20], ytr[:20], chunks=16)
        assert v.chunks == ((16, 4),)
        close(v.compute(), s.self_influence(Xtr[:20], ytr[:20]))


@pytest.mark.parametrize("name", NAMES)
def test_perturbation_tiles_equal_the_in_memory_tensor(name, data):
    model, Xtr, ytr, Xte, yte = data
    try:
        s = make(name, model, mode="perturbation").fit(Xtr, ytr)
    except ValueError as exc:  # a method that offers only mode="up" says so at fit
        assert "mode" in str(exc)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        P = s.influences_tiles(Xte[:5], yte[:5], chunks=(8, 16))
        assert P.shape == (5, 70, 4)
        close(P.compute(), s.influences(Xte[:5], yte[:5]))
        close(s.self_influence_tiles(Xtr[:10], ytr[:10], chunks=8).compute(),
              s.self_influence(Xtr[:10], ytr[:10]))


def test_graph_holds_the_solver_once_and_each_tile_is_a_task(data, fitted):
    _, _, _, Xte, yte = data
    s = fitted[NAMES[0]]
    I = s.influences_tiles(Xte, yte, chunks=(5, 10))
    graph = dict(I.__dask_graph__())
    solvers = [k for k in graph if "solver" in str(k)]
    assert len(solvers) == 1
    assert sum("-tile-" in str(k) for k in graph) == 4 * 7
    assert sum("-factors-" in str(k) for k in graph) == 4


def test_a_model_in_training_mode_is_handed_back_so(data):
    """Tiles on several threads share one eval-mode switch: the module comes back in
    training mode, and dropout plays no part in the tiles."""
    model, Xtr, ytr, Xte, yte = data
    net = nn.Sequential(nn.Dropout(0.5), *list(model)).double()
    s = make(NAMES[0], net).fit(Xtr, ytr)
    net.train()
    I = s.influences_tiles(Xte, yte, chunks=(2, 5)).compute(scheduler="threads", num_workers=4)
    assert net.training and all(m.training for m in net.modules())
    close(I, s.influences(Xte, yte))


def test_progress_counts_the_tiles(data, fitted, capsys):
    _, _, _, Xte, yte = data
    s = fitted[NAMES[0]]
    s.set_params(progress=True)
    try:
        s.influences_tiles(Xte, yte, chunks=(10, 35)).compute()
    finally:
        s.set_params(progress=False)
    err = capsys.readouterr().err
    assert "influence tiles" in err and "4/4" in err


def test_bad_arguments_are_named(data, fitted):
    _, _, _, Xte, yte = data
    s = fitted[NAMES[0]]
    with pytest.raises(ValueError, match="chunks"):
        s.influences_tiles(Xte, yte, chunks=(0, 10))
    with pytest.raises(ValueError, match="chunks"):
        s.influences_tiles(Xte, yte, chunks=100)
    with pytest.raises(ValueError, match="chunks"):
        s.self_influence_tiles(chunks=(10, 10))
    with pytest.raises(TypeError, match="client"):
        s.influences_tiles(Xte, yte, client="tcp://localhost:8786")
    with pytest.raises(ValueError, match="X_test"):
        s.influences_tiles(Xte[:, :3], yte)
    with pytest.raises(ValueError, match="which"):
        s.top_influential(Xte, yte, which="best")
    with pytest.raises(ValueError, match="k"):
        s.top_influential(Xte, yte, k=71)
    with pytest.raises(ValueError, match="k must"):
        s.top_influential(Xte, yte, k=0)


# --------------------------------------------------------------------------- out of core


def test_zarr_written_and_read_back_lazily(data, fitted, tmp_path):
    zarr = pytest.importorskip("zarr")
    _, _, _, Xte, yte = data
    s = fitted[NAMES[0]]
    path = str(tmp_path / "influences.zarr")
    s.influences_tiles(Xte, yte, chunks=(8, 16)).to_zarr(path)
    assert zarr.open_array(path, mode="r").chunks == (8, 16)
    back = da.from_zarr(path)
    assert back.chunks == ((8, 8, 4), (16, 16, 16, 16, 6))  # lazy, tile by tile
    close(back[3:11, 20:50].compute(), s.influences(Xte, yte)[3:11, 20:50])


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch, torch.nn.functional as F
    from torch import nn
    torch.set_num_threads(1)
    import skinfluence
    from skinfluence.solvers import METHODS
    import skinfluence.large as large

    cls = getattr(skinfluence, METHODS[sys.argv[2]].scorer_name)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60_000, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    params = set(cls().get_params())
    kw = {k: v for k, v in dict(loss=F.cross_entropy, regularization=0.1,
          hessian="gauss-newton", batch_size=2048, random_state=0).items() if k in params}
    s = cls(model, **kw).fit(X, y)
    seen = []
    tile = large._influence_tile
    def watched(solver, F_, block, *args):
        out = tile(solver, F_, block, *args)
        seen.append(out.nbytes)
        return out
    large._influence_tile = watched
    s.influences_tiles(X[:100], y[:100], chunks=(100, 10_000)).compute()  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    I = s.influences_tiles(X[:2000], y[:2000], chunks=(250, 10_000))
    I.to_zarr(sys.argv[1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"matrix": I.nbytes, "tile": max(seen), "growth": after - before}))
""")


def test_peak_memory_is_bounded_by_the_tile_not_the_matrix(tmp_path):
    """A 480 MB float32 matrix written to zarr in 10 MB tiles, in a subprocess: its
    peak RSS grows by a small fraction of the matrix (two worker threads, a tile and
    its compressed copy each), and no tile is larger than the chunks."""
    pytest.importorskip("zarr")
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "m.zarr"), NAMES[0]],
        capture_output=True, text=True, timeout=120, check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["matrix"] == 2000 * 60_000 * 4
    assert r["tile"] == 250 * 10_000 * 4
    assert r["growth"] < r["matrix"] / 4, r


# --------------------------------------------------------------------------- distributed


def test_distributed_cluster_of_two_processes(data, fitted):
    """Two worker processes on localhost: the solver is broadcast to both once, and
    the tiles and self-influence equal the in-memory ones."""
    distributed = pytest.importorskip("distributed")
    import dask

    _, _, _, Xte, yte = data
    s = fitted[NAMES[0]]
    # The active memory manager drops replicas no waiting task needs, every two
    # seconds; off here, so the broadcast can be seen after the computation.
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        I = s.influences_tiles(Xte, yte, chunks=(10, 20), client=client)
        v = s.self_influence_tiles(chunks=20, client=client)
        got, self_got = client.compute([I, v], sync=True)
        holders = {k: w for k, w in client.who_has().items() if str(k).startswith(type(s.solver_).__name__)}
        assert len(holders) == 2 and all(len(w) == 2 for w in holders.values())
    close(got, s.influences(Xte, yte))
    close(self_got, s.self_influence())


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("name", NAMES)
def test_top_influential_is_the_argsort_of_the_matrix(name, data, fitted):
    _, _, _, Xte, yte = data
    s = fitted[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        I = s.influences(Xte[:8], yte[:8])
        top = s.top_influential(Xte[:8], yte[:8], k=5)  # batch_size 8: nine blocks streamed
    order = np.argsort(-I, axis=1, kind="stable")
    np.testing.assert_array_equal(top.helpful_indices, order[:, :5])
    np.testing.assert_array_equal(top.harmful_indices, order[:, ::-1][:, :5])
    close(top.helpful_values, np.take_along_axis(I, order[:, :5], 1))
    close(top.harmful_values, np.take_along_axis(I, order[:, ::-1][:, :5], 1))


def test_top_influential_which_and_whole_range(data, fitted):
    _, _, _, Xte, yte = data
    s = fitted[NAMES[0]]
    I = s.influences(Xte, yte)
    assert set(s.top_influential(Xte, yte, k=3, which="helpful")) == {
        "helpful_indices", "helpful_values"}
    harmful = s.top_influential(Xte, yte, k=70, which="harmful")
    assert set(harmful) == {"harmful_indices", "harmful_values"}
    np.testing.assert_array_equal(harmful.harmful_indices, np.argsort(I, axis=1, kind="stable"))


# --------------------------------------------------------------------------- FastIF


def test_fastif_with_every_point_a_candidate_is_exact(data, fitted):
    _, _, _, Xte, yte = data
    s = fitted[NAMES[0]]
    exact = s.top_influential(Xte, yte, k=10)
    fast = FastIF(s, n_neighbors=70, batch_size=6).fit().top_influential(Xte, yte, k=10)
    for key in exact:
        close(fast[key], exact[key]) if "values" in key else \
            np.testing.assert_array_equal(fast[key], exact[key])


def test_fastif_ranks_its_candidates_exactly(data, fitted):
    """Among the neighbours of each test point, FastIF's order is the one of the
    exact influences restricted to them; with an embedding of a named layer and
    with a callable."""
    model, Xtr, _, Xte, yte = data
    s = fitted[NAMES[0]]
    I = s.influences(Xte, yte)
    for embedding in (None, "1", lambda x: model[0](x)):
        fast = FastIF(s, n_neighbors=15, embedding=embedding).fit()
        cand = fast.candidates(Xte)
        assert cand.shape == (20, 15)
        top = fast.top_influential(Xte, yte, k=4, which="helpful")
        sub = np.take_along_axis(I, cand, 1)
        want = np.take_along_axis(cand, np.argsort(-sub, axis=1, kind="stable")[:, :4], 1)
        np.testing.assert_array_equal(top.helpful_indices, want)
    # the neighbours of the inputs are sklearn's
    from sklearn.neighbors import NearestNeighbors

    np.testing.assert_array_equal(
        FastIF(s, n_neighbors=5).fit().candidates(Xte),
        NearestNeighbors(n_neighbors=5).fit(Xtr).kneighbors(Xte, return_distance=False))


def test_fastif_errors_name_the_argument(data, fitted):
    _, _, _, Xte, yte = data
    s = fitted[NAMES[0]]
    with pytest.raises(ValueError, match="n_neighbors"):
        FastIF(s, n_neighbors=71).fit()
    with pytest.raises(ValueError, match="embedding"):
        FastIF(s, embedding="no such layer", n_neighbors=5).fit()
    with pytest.raises(TypeError, match="scorer"):
        FastIF(object(), n_neighbors=5).fit()
    with pytest.raises(ValueError, match="k"):
        FastIF(s, n_neighbors=5).fit().top_influential(Xte, yte, k=6)
