"""Block-diagonal curvature (``block_structure``) for the methods that take it.

The reference is independent of the package: the dense Hessian of the mean training
loss by ``torch.autograd.functional.hessian`` (or the Gauss-Newton matrix from
``torch.autograd.functional.jacobian`` and the softmax's output Hessian), zeroed
outside the diagonal blocks, plus lambda I, solved by ``torch.linalg.solve``, with
per-sample gradients by ``torch.autograd.grad`` one sample at a time.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import InvalidParameterError
from torch import nn
from torch.func import functional_call

import skinfluence as sk
from skinfluence.solvers import BlockDiagonalSolver, SolveReport, pairwise_tile

LAM = 0.2
#: method -> (scorer, settings under which it is exact)
METHODS = {
    "direct": (sk.DirectInfluenceScorer, {}),
    "cg": (sk.CgInfluenceScorer, {"rtol": 1e-13}),
    "lissa": (sk.LissaInfluenceScorer, {"rtol": 1e-12, "maxiter": 20000, "random_state": 0}),
    "arnoldi": (sk.ArnoldiInfluenceScorer, {"rank": 64, "rtol": 1e-10, "random_state": 0}),
    # the sketch clips negative curvature: exact for the (PSD) Gauss-Newton matrix
    "nystroem": (sk.NystroemInfluenceScorer, {"rank": 64, "hessian": "gauss-newton", "random_state": 0}),
}
TOL = {"direct": 1e-10, "cg": 1e-9, "lissa": 1e-8, "arnoldi": 1e-8, "nystroem": 1e-7}
LAYERS = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"], "4": ["4.weight", "4.bias"]}
ALL = [n for names in LAYERS.values() for n in names]


@pytest.fixture(scope="module")
def data():
    """A trained 4-5-4-3 tanh MLP (64 parameters, three layers), float64."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 4))
    y = ((X[:, 0] + X[:, 1] ** 2 > 1).astype(np.int64) + (X[:, 2] > 0.5)).astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    Xt, yt = torch.tensor(X[:60]), torch.tensor(y[:60])
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(Xt), yt).backward()
        opt.step()
    model.eval()
    return model, X[:60], y[:60], X[60:], y[60:]


@pytest.fixture(scope="module")
def reference(data):
    """Per-sample gradients and the dense curvatures, computed without the package."""
    model, Xtr, ytr, Xte, yte = data
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v):
        return dict(zip(names, (t.reshape(s) for t, s in zip(v.split(sizes), shapes, strict=True)), strict=True))

    X, Y = torch.tensor(Xtr), torch.tensor(ytr)

    def mean_loss(v):
        return F.cross_entropy(functional_call(model, unflat(v), (X,)), Y)

    hessian = torch.autograd.functional.hessian(mean_loss, theta)
    J = torch.autograd.functional.jacobian(lambda v: functional_call(model, unflat(v), (X,)), theta)  # (n, k, p)
    P = torch.softmax(model(X), 1).detach()
    S = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    ggn = torch.einsum("ikp,ikl,ilq->pq", J, S, J) / X.shape[0]

    def grads(Xs, ys):
        out = []
        for x, t in zip(torch.tensor(Xs), torch.tensor(ys), strict=True):
            v = theta.clone().requires_grad_(True)
            loss = F.cross_entropy(functional_call(model, unflat(v), (x[None],)), t[None])
            out.append(torch.autograd.grad(loss, v)[0])
        return torch.stack(out)

    offsets = np.cumsum([0, *sizes])
    cols = {n: list(range(offsets[i], offsets[i + 1])) for i, n in enumerate(names)}
    return {"exact": hessian, "gauss-newton": ggn, "g_train": grads(Xtr, ytr),
            "g_test": grads(Xte, yte), "cols": cols}


def expected(reference, curvature, blocks):
    """Influences with the curvature's diagonal blocks only (blocks: lists of names)."""
    C = reference[curvature]
    keep = torch.zeros_like(C, dtype=torch.bool)
    for group in blocks:
        idx = torch.tensor([c for n in group for c in reference["cols"][n]])
        keep[idx[:, None], idx[None, :]] = True
    A = torch.where(keep, C, torch.zeros_like(C)) + LAM * torch.eye(C.shape[0], dtype=C.dtype)
    assert float(torch.linalg.eigvalsh(A)[0]) > 0  # the problem is well posed
    return (reference["g_test"] @ torch.linalg.solve(A, reference["g_train"].T)).numpy()


def make(name, model, **kw):
    cls, settings = METHODS[name]
    return cls(model, **{"loss": F.cross_entropy, "regularization": LAM, **settings, **kw})


def curvature_of(name):
    return METHODS[name][1].get("hessian", "exact")


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("name", METHODS)
def test_layer_blocks_match_the_dense_block_diagonal_reference(name, data, reference):
    model, Xtr, ytr, Xte, yte = data
    s = make(name, model, block_structure="layer").fit(Xtr, ytr)
    I = s.influences(Xte, yte)
    want = expected(reference, curvature_of(name), LAYERS.values())
    assert rel(I, want) < TOL[name]
    # not the full curvature's influences: the blocks drop something here
    assert rel(I, expected(reference, curvature_of(name), [ALL])) > 1e-3
    assert s.blocks_ == LAYERS


@pytest.mark.parametrize("name", METHODS)
def test_layer_parts_sum_to_the_total_and_are_single_block_influences(name, data, reference):
    model, Xtr, ytr, Xte, yte = data
    s = make(name, model, block_structure="layer").fit(Xtr, ytr)
    parts = s.influences_by_layer(Xte, yte)
    assert list(parts) == list(LAYERS)
    np.testing.assert_allclose(sum(parts.values()), s.influences(Xte, yte), rtol=1e-12, atol=1e-14)
    for layer, names in LAYERS.items():
        size = sum(len(reference["cols"][n]) for n in names)
        alone = make(name, model, params=layer)
        if "rank" in alone.get_params():
            alone.set_params(rank=size)
        single = alone.fit(Xtr, ytr).influences(Xte, yte)
        assert rel(parts[layer], single) < TOL[name], layer
        # ... which is the influence of that layer's block of the reference alone
        C = reference[curvature_of(name)]
        idx = torch.tensor([c for n in names for c in reference["cols"][n]])
        A = C[idx[:, None], idx[None, :]] + LAM * torch.eye(len(idx), dtype=C.dtype)
        Gte, Gtr = reference["g_test"][:, idx], reference["g_train"][:, idx]
        assert rel(parts[layer], (Gte @ torch.linalg.solve(A, Gtr.T)).numpy()) < TOL[name], layer


@pytest.mark.parametrize("name", METHODS)
def test_full_is_unchanged(name, data, reference):
    model, Xtr, ytr, Xte, yte = data
    default = make(name, model).fit(Xtr, ytr)
    full = make(name, model, block_structure="full").fit(Xtr, ytr)
    assert default.block_structure == "full"
    assert not isinstance(full.solver_, BlockDiagonalSolver)
    I = full.influences(Xte, yte)
    np.testing.assert_array_equal(I, default.influences(Xte, yte))
    assert rel(I, expected(reference, curvature_of(name), [ALL])) < TOL[name]
    assert full.blocks_ == {"full": ALL}


@pytest.mark.parametrize("name", METHODS)
def test_custom_groups(name, data, reference):
    model, Xtr, ytr, Xte, yte = data
    spec = [["0", "2.weight"], ["2.bias", "4"]]
    s = make(name, model, block_structure=spec).fit(Xtr, ytr)
    groups = [["0.weight", "0.bias", "2.weight"], ["2.bias", "4.weight", "4.bias"]]
    assert list(s.blocks_.values()) == groups
    assert list(s.blocks_) == ["0+2.weight", "2.bias+4"]
    assert rel(s.influences(Xte, yte), expected(reference, curvature_of(name), groups)) < TOL[name]


@pytest.mark.parametrize(
    "spec, match",
    [
        ([["0"], ["2"], ["4", "5"]], "'5' matches no parameter"),
        ([["0", "2"], ["2.bias", "4"]], "'2.bias' is in group 0 and in group 1"),
        ([["0"], ["4"]], r"leave out the parameters \['2.weight', '2.bias'\]"),
        ([["0", "2"], [], ["4"]], "group 1 is"),
        ([], "non-empty list"),
    ],
)
def test_bad_groups_are_refused_naming_block_structure(spec, match, data):
    model, Xtr, ytr, _, _ = data
    for name in METHODS:
        s = make(name, model, block_structure=spec)
        with pytest.raises(ValueError, match=f"block_structure: .*{match}"):
            s.fit(Xtr, ytr)
        assert not hasattr(s, "solver_")


def test_groups_must_be_among_the_selected_parameters(data):
    model, Xtr, ytr, _, _ = data
    s = make("direct", model, params=["2", "4"], block_structure=[["0"], ["2", "4"]])
    with pytest.raises(ValueError, match=r"block_structure: .*'0' names parameters not taken into account"):
        s.fit(Xtr, ytr)
    s.set_params(block_structure=[["2"], ["4"]]).fit(Xtr, ytr)
    assert list(s.blocks_) == ["2", "4"]


def test_an_unknown_structure_is_refused_by_the_parameter_validation(data):
    model, Xtr, ytr, _, _ = data
    with pytest.raises(InvalidParameterError, match="'block_structure' parameter"):
        make("cg", model, block_structure="diagonal").fit(Xtr, ytr)


# --------------------------------------------------------------------------- sklearn and the contract


@pytest.mark.parametrize("name", METHODS)
def test_get_params_clone_and_pickle(name, data):
    model, Xtr, ytr, Xte, yte = data
    spec = [["0", "2"], ["4"]]
    s = make(name, model, block_structure=spec)
    assert s.get_params()["block_structure"] is spec
    c = clone(s)
    assert c.get_params()["block_structure"] == spec
    I = s.fit(Xtr, ytr).influences(Xte, yte)
    np.testing.assert_array_equal(c.fit(Xtr, ytr).influences(Xte, yte), I)
    back = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(back.influences(Xte, yte), I)
    np.testing.assert_array_equal(back.self_influence(), s.self_influence())
    s.set_params(block_structure="layer").fit(Xtr, ytr)
    assert list(s.blocks_) == list(LAYERS)


def _tiles(jobs):
    return [pairwise_tile(solver, F_, X, Y) for solver, F_, X, Y in pickle.loads(jobs)]


def test_pairwise_tile_is_the_same_in_another_process(data):
    model, Xtr, ytr, Xte, yte = data
    jobs, want = [], []
    for name in METHODS:
        s = make(name, model, block_structure="layer").fit(Xtr, ytr)
        Xt, Yt = s._data(Xte, yte, "X", "y")
        jobs.append((s.solver_, s.solver_.factors(Xt[:5], Yt[:5]), s.X_train_[10:40], s.y_train_[10:40]))
        want.append(s.influences(Xte[:5], yte[:5])[:, 10:40])
    with mp.get_context("spawn").Pool(1) as pool:
        tiles = pool.apply(_tiles, (pickle.dumps(jobs),))
    for name, tile, w in zip(METHODS, tiles, want, strict=True):
        np.testing.assert_allclose(tile.numpy(), w, rtol=1e-10, atol=1e-13, err_msg=name)


def test_tiles_and_removal_effects(data):
    pytest.importorskip("dask")
    model, Xtr, ytr, Xte, yte = data
    s = make("cg", model, block_structure="layer").fit(Xtr, ytr)
    I = s.influences(Xte, yte)
    np.testing.assert_allclose(s.influences_tiles(Xte, yte, chunks=(7, 25)).compute(), I, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(s.self_influence_tiles(chunks=25).compute(), s.self_influence(), rtol=1e-10)
    groups = [np.arange(5), np.arange(10, 30)]
    G = s.group_influence(Xte, yte, groups=groups)
    np.testing.assert_allclose(G, np.stack([I[:, g].sum(1) for g in groups], 1), rtol=1e-10)
    first = s.predict_removal_effect(Xte, yte, groups=groups)
    np.testing.assert_allclose(first, G / len(ytr), rtol=1e-10)
    # the Newton step solves the full remaining curvature (the blocks only precondition
    # it), so it agrees with the one of the full curvature
    newton = s.predict_removal_effect(Xte, yte, groups=groups, correction="newton")
    full = make("cg", model).fit(Xtr, ytr).predict_removal_effect(Xte, yte, groups=groups, correction="newton")
    np.testing.assert_allclose(newton, full, rtol=1e-5, atol=1e-7 * np.abs(full).max())


# --------------------------------------------------------------------------- diagnostics


def test_fitted_attributes_are_per_block(data):
    model, Xtr, ytr, _, _ = data
    sizes = [25, 24, 15]
    for name in ("arnoldi", "nystroem"):
        s = make(name, model, rank=20, block_structure="layer").fit(Xtr, ytr)
        # rank applies to each block, at most its size
        assert [e.shape for e in s.eigenvalues_] == [(min(20, k),) for k in sizes]
        assert all(isinstance(e, np.ndarray) for e in s.eigenvalues_)
    lissa = make("lissa", model, block_structure="layer").fit(Xtr, ytr)
    assert len(lissa.scale_) == 3 and all(v > 0 for v in lissa.scale_)


def test_solve_diagnostics_combine_the_blocks(data):
    model, Xtr, ytr, Xte, yte = data
    s = make("cg", model, block_structure="layer").fit(Xtr, ytr)
    G = torch.randn(6, 64, dtype=torch.float64)
    report = SolveReport()
    s.solver_.solve(G, report)
    assert list(report.parts) == list(LAYERS)
    per_block = np.stack([report.parts[b].residuals for b in LAYERS])
    np.testing.assert_array_equal(report.residuals, per_block.max(0))
    assert report.n_iter == max(report.parts[b].n_iter for b in LAYERS)
    assert report.n_products == sum(report.parts[b].n_products for b in LAYERS)
    s.influences(Xte, yte)
    assert s.residuals_.shape == (len(yte),) and s.n_iter_ >= 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.set_params(maxiter=1, rtol=1e-14).fit(Xtr, ytr).influences(Xte, yte)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(messages) == 1 and "In block '0' of block_structure" in messages[0]


def test_errors_of_a_block_say_which_block(data):
    model, Xtr, ytr, _, _ = data
    s = make("arnoldi", model, regularization=0.0, rank=5, block_structure="layer")
    with pytest.raises(ValueError, match="regularization: ") as info:
        s.fit(Xtr, ytr)
    assert any("in block '0' of block_structure" in note for note in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("kind", ["mlp", "logistic"])
def test_blocks_carry_the_estimators_own_penalty(kind):
    """An sklearn model's L2 penalty (with its rank-one term for the softmax's null
    direction) restricted to each block is the penalty of that block's parameters
    alone: each part equals the influences of a scorer over that block only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 4))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)
    if kind == "mlp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = MLPClassifier((5,), alpha=1e-2, max_iter=300, random_state=0).fit(X, y)
        spec = "layer"
    else:
        est = LogisticRegression(C=0.5).fit(X, y)
        spec = [["weight"], ["bias"]]
    s = sk.DirectInfluenceScorer(est, regularization=0.05, hessian="gauss-newton", dtype="float64", block_structure=spec).fit(X, y)
    parts = s.influences_by_layer(X[:10], y[:10]) if kind == "mlp" else None
    total = s.influences(X[:10], y[:10])
    singles = [
        sk.DirectInfluenceScorer(est, regularization=0.05, hessian="gauss-newton", dtype="float64", params=names)
        .fit(X, y).influences(X[:10], y[:10])
        for names in s.blocks_.values()
    ]
    assert len(singles) == 2
    assert rel(total, sum(singles)) < 1e-10
    if parts is not None:
        for part, single in zip(parts.values(), singles, strict=True):
            assert rel(part, single) < 1e-10
    full = sk.DirectInfluenceScorer(est, regularization=0.05, hessian="gauss-newton", dtype="float64").fit(X, y)
    assert rel(total, full.influences(X[:10], y[:10])) > 1e-3


@pytest.mark.parametrize("name", METHODS)
def test_invariances_hold_with_blocks(name, data):
    """Self-influence is the diagonal, factors times gradients are the influences,
    solving leaves the fitted solver as it was; perturbation mode runs on the blocks."""
    model, Xtr, ytr, Xte, yte = data
    s = make(name, model, block_structure="layer").fit(Xtr, ytr)
    before = pickle.dumps(s.solver_)
    I = s.influences(Xtr[:12], ytr[:12])
    np.testing.assert_allclose(s.self_influence(Xtr[:12], ytr[:12]), np.diag(I[:, :12]), rtol=1e-7, atol=1e-12)
    G = s._grads(s.X_train_, s.y_train_).numpy()
    np.testing.assert_allclose(s.influence_factors(Xte, yte) @ G.T, s.influences(Xte, yte), rtol=1e-8, atol=1e-12)
    assert pickle.dumps(s.solver_) == before
    p = make(name, model, block_structure="layer", mode="perturbation").fit(Xtr, ytr)
    D = p.influences(Xte[:3], yte[:3], Xtr[:5], ytr[:5])
    assert D.shape == (3, 5, 4) and np.isfinite(D).all()
    # the derivative along a feature matches a finite difference of the influence
    eps = 1e-6
    Xp = Xtr[:5].copy()
    Xp[:, 1] += eps
    fd = (s.influences(Xte[:3], yte[:3], Xp, ytr[:5]) - s.influences(Xte[:3], yte[:3], Xtr[:5], ytr[:5])) / eps
    assert rel(D[:, :, 1], fd) < 1e-4


@pytest.mark.parametrize("method, preconditioner", [
    ("cg", "nystroem"), ("cg", "jacobi"), ("cg", "ekfac"), ("cg", "kfac"), ("lissa", "ekfac"),
])
def test_preconditioners_are_built_per_block(method, preconditioner, data, reference):
    """Each block's solver builds its preconditioner on the block's parameters alone."""
    model, Xtr, ytr, Xte, yte = data
    kw = {"rank": 8} if method == "cg" else {}
    s = make(method, model, block_structure="layer", hessian="gauss-newton", preconditioner=preconditioner, **kw)
    I = s.fit(Xtr, ytr).influences(Xte, yte)
    assert rel(I, expected(reference, "gauss-newton", LAYERS.values())) < 1e-8
