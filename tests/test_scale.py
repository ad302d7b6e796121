"""Methods at scale: what the Krylov basis keeps, and LiSSA's minibatch scale."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from skinfluence._linalg import block_lanczos


def _diagonal(p, seed=0):
    d = torch.from_numpy(np.random.default_rng(seed).uniform(0.1, 1.0, p))
    d[:6] = torch.tensor([40.0, 30.0, 20.0, 12.0, 9.0, 7.0], dtype=torch.float64)
    return d


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_block_lanczos_basis_in_lower_precision_finds_the_same_pairs(dtype, tol):
    p = 3000
    d = _diagonal(p)
    theta, V, res, n = block_lanczos(
        lambda B: B * d, p, 5, krylov_dimension=80, block_size=5, rtol=tol,
        rng=np.random.RandomState(0), device="cpu", dtype=dtype,
    )
    assert V.dtype == torch.float64
    np.testing.assert_allclose(theta.numpy(), [40, 30, 20, 12, 9], rtol=tol)
    # orthonormal to float64 rounding whatever the basis was kept in
    np.testing.assert_allclose((V @ V.T).numpy(), np.eye(5), atol=1e-12)
    top = V.abs().argmax(dim=1).tolist()
    assert top == [0, 1, 2, 3, 4]
    assert float(res.max()) <= tol


_CAPPED = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    from skinfluence._linalg import block_lanczos

    p, dim, cap, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    d = torch.from_numpy(np.random.default_rng(0).uniform(0.1, 1.0, p))
    d[:3] = torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64)

    def data_size():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    block_lanczos(lambda B: B * d[:100], 100, 2, krylov_dimension=8, block_size=4, rtol=1e-3,
                  rng=np.random.RandomState(0), device="cpu")  # warm up
    limit = data_size() + cap
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        theta, V, res, n = block_lanczos(
            lambda B: B * d, p, 3, krylov_dimension=dim, block_size=4, rtol=0.0,
            rng=np.random.RandomState(0), device="cpu", dtype=getattr(torch, dtype))
        print(json.dumps({"ok": True, "n": n, "theta": theta.tolist()}))
    except (MemoryError, RuntimeError) as e:
        print(json.dumps({"ok": False, "error": str(e)[:200]}))
""")


def _capped(p, dim, cap, dtype):
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _CAPPED, str(p), str(dim), str(cap), dtype],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lanczos_memory_is_its_basis_and_images_allocated_once():
    """p = 400,000 and 60 Krylov vectors: the float32 basis and its images take
    192 MB, and the whole run fits in 400 MB of new memory; the same run keeping
    them in float64 (384 MB) does not (nor did the former iteration, which
    concatenated the basis anew at every step: four float64 copies, 768 MB)."""
    p, dim, cap = 400_000, 60, 400 * 2**20
    r = _capped(p, dim, cap, "float32")
    assert r["ok"], r
    assert r["n"] == dim
    np.testing.assert_allclose(r["theta"], [5.0, 4.0, 3.0], rtol=1e-5)
    assert not _capped(p, dim, cap, "float64")["ok"]


# --------------------------------------------------------------------------- EK-FAC "auto"
def _mlp_case(n=120, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.integers(0, 4, n)
    return model, X, y


def test_ekfac_auto_takes_the_exact_fisher_and_refinement_while_the_data_fits():
    from skinfluence import EkfacInfluenceScorer

    model, X, y = _mlp_case()
    auto = EkfacInfluenceScorer(model, loss=torch.nn.functional.cross_entropy,
                                regularization=0.1).fit(X, y)
    assert (auto.fisher_, auto.basis_iter_) == ("gauss-newton", 2)
    explicit = EkfacInfluenceScorer(model, loss=torch.nn.functional.cross_entropy,
                                    regularization=0.1, fisher="gauss-newton", basis_iter=2).fit(X, y)
    np.testing.assert_array_equal(auto.influences(X[:5], y[:5]), explicit.influences(X[:5], y[:5]))


def test_ekfac_auto_samples_the_fisher_and_skips_refinement_beyond_the_cache(monkeypatch):
    from skinfluence import EkfacInfluenceScorer
    from skinfluence.solvers.ekfac import _factors

    model, X, y = _mlp_case()
    # per sample: activations 6 + 9, output gradients 4 x (8 + 4) for the exact
    # Fisher, 8 + 4 sampled; 120 samples: 7,560 and 3,240 numbers
    kw = {"loss": torch.nn.functional.cross_entropy, "regularization": 0.1, "random_state": 0}
    monkeypatch.setattr(_factors, "CACHE_ELEMENTS", 5000)
    mid = EkfacInfluenceScorer(model, **kw).fit(X, y)
    assert (mid.fisher_, mid.basis_iter_) == ("true", 2)
    monkeypatch.setattr(_factors, "CACHE_ELEMENTS", 3000)
    low = EkfacInfluenceScorer(model, **kw).fit(X, y)
    assert (low.fisher_, low.basis_iter_) == ("true", 0)
    same = EkfacInfluenceScorer(model, fisher="true", basis_iter=0, **kw).fit(X, y)
    np.testing.assert_array_equal(low.influences(X[:5], y[:5]), same.influences(X[:5], y[:5]))
    # explicit values are kept whatever the cache
    kept = EkfacInfluenceScorer(model, fisher="gauss-newton", basis_iter=1, **kw).fit(X, y)
    assert (kept.fisher_, kept.basis_iter_) == ("gauss-newton", 1)
    # a loss without a known predictive distribution keeps the exact Fisher
    monkeypatch.setattr(_factors, "CACHE_ELEMENTS", 100)
    mse = EkfacInfluenceScorer(torch.nn.Linear(5, 3), loss=lambda o, t: ((o - t) ** 2).sum(-1).mean(),
                               regularization=0.1).fit(X, np.random.default_rng(0).normal(size=(120, 3)).astype(np.float32))
    assert (mse.fisher_, mse.basis_iter_) == ("gauss-newton", 0)


def test_ekfac_auto_parameters_are_validated():
    from skinfluence import EkfacInfluenceScorer

    model, X, y = _mlp_case()
    with pytest.raises(ValueError, match="basis_iter"):
        EkfacInfluenceScorer(model, loss=torch.nn.functional.cross_entropy, basis_iter="often").fit(X, y)
    with pytest.raises(ValueError, match="fisher"):
        EkfacInfluenceScorer(model, loss=torch.nn.functional.cross_entropy, fisher="exact").fit(X, y)


# --------------------------------------------------------------------------- LiSSA with minibatches
def _outlier_logistic(n=4000, d=10):
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[:20] *= 12  # confident points: right-hand sides near 1e-14
    y = (X @ rng.normal(size=d) + rng.normal(size=n) > 0).astype(np.int64)
    torch.manual_seed(0)
    model = torch.nn.Linear(d, 2)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(Xt), yt) + 1e-3 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model, X, y


def test_minibatch_lissa_is_not_stopped_by_the_noise_of_its_updates():
    """With minibatches the updates never shrink steadily: a lucky small step a
    hundred times below the next once stopped the iteration as 'diverged' (here
    within 6 to 1,286 steps, for every minibatch size and seed). It must run to the
    end and land near the exact solution."""
    import torch.nn.functional as F

    from skinfluence import DirectInfluenceScorer, LissaInfluenceScorer

    model, X, y = _outlier_logistic()
    kw = {"loss": F.cross_entropy, "regularization": 0.01, "dtype": "float64"}
    exact = DirectInfluenceScorer(model, **kw).fit(X, y).influence_factors(X[:5], y[:5])
    with pytest.warns(ConvergenceWarning):
        s = LissaInfluenceScorer(model, minibatch_size=256, maxiter=1500, random_state=0, **kw).fit(X, y)
        F_ = s.influence_factors(X[:5], y[:5])
    assert np.linalg.norm(F_ - exact) / np.linalg.norm(exact) < 0.35
    assert np.corrcoef(F_.ravel(), exact.ravel())[0, 1] > 0.95


def test_minibatch_lissa_still_stops_a_growing_iterate():
    import torch.nn.functional as F

    from skinfluence import LissaInfluenceScorer
    from skinfluence.solvers import LissaDivergenceError

    model, X, y = _outlier_logistic()
    s = LissaInfluenceScorer(model, loss=F.cross_entropy, regularization=0.01, dtype="float64",
                             minibatch_size=256, scale=0.05, maxiter=3000, random_state=0).fit(X, y)
    with pytest.raises(LissaDivergenceError, match=r"the iterate of a right-hand side grew from norm"):
        s.influence_factors(X[20:25], y[20:25])


def test_minibatch_lissa_estimates_its_scale_on_a_subset(monkeypatch):
    """scale='auto' with minibatches: the largest eigenvalue from max(8 * minibatch,
    4096) points, not all of them, and close to the one over all points."""
    import torch.nn.functional as F

    from skinfluence import LissaInfluenceScorer
    from skinfluence.solvers import CurvatureOperator

    model, X, y = _outlier_logistic(n=6000)
    kw = {"loss": F.cross_entropy, "regularization": 0.01, "dtype": "float64", "random_state": 0}
    full = LissaInfluenceScorer(model, **kw).fit(X, y)
    sizes, subset = [], CurvatureOperator.subset

    def recording(self, rows):
        sizes.append(len(rows))
        return subset(self, rows)

    monkeypatch.setattr(CurvatureOperator, "subset", recording)
    mini = LissaInfluenceScorer(model, minibatch_size=64, **kw).fit(X, y)
    assert sizes == [4096]
    np.testing.assert_allclose(mini.max_eigenvalue_, full.max_eigenvalue_, rtol=0.1)
    sizes.clear()
    LissaInfluenceScorer(model, minibatch_size=1000, **kw).fit(X, y)
    assert sizes == []  # 8,000 points asked for: all 6,000 are used
