"""CG, LiSSA, Arnoldi and Nystroem scorers against the exact Direct method.

References: DirectInfluenceScorer in float64 (exact Cholesky of the dense curvature)
on a small softmax MLP and on sklearn linear models, a dense eigendecomposition for
the low-rank methods, and invariances (batch size, self-influence = diagonal,
determinism under a fixed random_state).
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import small_mlp_data
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler
from torch import nn

from skinfluence import (
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    DirectInfluenceScorer,
    LissaInfluenceScorer,
    NotPositiveDefiniteError,
    NystroemInfluenceScorer,
)
from skinfluence.solvers import LissaDivergenceError
from skinfluence.solvers._dense import dense_curvature

REG = 0.1
N_TRAIN = 70


@pytest.fixture(scope="module")
def mlp_data():
    """A trained 4-6-3 tanh MLP (51 parameters) in float64 on a 3-class problem.

    Softmax is invariant to shifting all logits, so the curvature has exact null
    directions (last-layer bias and weight shifts) that carry no gradient.
    """
    return small_mlp_data()


@pytest.fixture(scope="module")
def direct(mlp_data):
    model, Xtr, ytr, Xte, yte = mlp_data
    out = {}
    for h in ("exact", "gauss-newton"):
        s = DirectInfluenceScorer(model, loss=F.cross_entropy, regularization=REG, hessian=h)
        out[h] = s.fit(Xtr, ytr).influences(Xte, yte)
    return out


@pytest.fixture(scope="module")
def logistic():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    Xtr, ytr, Xte, yte = X[:150], y[:150], X[150:180], y[150:180]
    model = LogisticRegression(C=0.5).fit(Xtr, ytr)
    return model, Xtr, ytr, Xte, yte


def make(cls, model, **kw):
    kw.setdefault("regularization", REG)
    if isinstance(model, nn.Module):
        kw.setdefault("loss", F.cross_entropy)
    return cls(model, **kw)


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def pearson(a, b):
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


def eig_reference(model, Xtr, ytr, Xte, yte, hessian, keep):
    """Influences with the curvature replaced by its ``keep`` eigenpairs of largest
    magnitude and the complement inverted as 1 / REG (dense eigendecomposition)."""
    s = make(DirectInfluenceScorer, model, hessian=hessian).fit(Xtr, ytr)
    H = dense_curvature(s.adapter_, s.X_train_, s.y_train_, hessian, 256)
    e, U = torch.linalg.eigh(H)
    idx = torch.argsort(e.abs(), descending=True)[:keep]
    e, U = e[idx], U[:, idx]
    Gte, Gtr = s._grads(*s._data(Xte, yte, "X", "y")), s._grads(s.X_train_, s.y_train_)
    C = Gte @ U
    F_ = (C / (e + REG)) @ U.T + (Gte - C @ U.T) / REG
    return (F_ @ Gtr.T).numpy()


# --------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
@pytest.mark.parametrize("preconditioner", [None, "jacobi", "nystroem"])
def test_cg_matches_direct(mlp_data, direct, hessian, preconditioner):
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(CgInfluenceScorer, model, hessian=hessian, rtol=1e-10,
             preconditioner=preconditioner, rank=5, random_state=0)
    I = s.fit(Xtr, ytr).influences(Xte, yte)
    assert rel_err(I, direct[hessian]) < 1e-5
    assert s.n_iter_ >= 1
    assert s.residuals_.shape == (len(Xte),) and (s.residuals_ <= 1e-10).all()


def test_cg_preconditioning_reduces_iterations(mlp_data):
    model, Xtr, ytr, Xte, yte = mlp_data
    iters = {}
    for pre in (None, "nystroem"):
        s = make(CgInfluenceScorer, model, regularization=1e-3, hessian="gauss-newton",
                 rtol=1e-8, preconditioner=pre, rank=20, random_state=0)
        s.fit(Xtr, ytr).influence_factors(Xte[:1], yte[:1])  # one right-hand side
        iters[pre] = s.n_iter_
    assert iters["nystroem"] < iters[None]


@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
def test_lissa_matches_direct(mlp_data, direct, hessian):
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(LissaInfluenceScorer, model, hessian=hessian, random_state=0)
    I = s.fit(Xtr, ytr).influences(Xte, yte)
    assert pearson(I, direct[hessian]) >= 0.999
    # the automatic scale: Richardson's optimal step for eigenvalues in [REG, a_max]
    np.testing.assert_allclose(s.scale_, (1.05 * s.max_eigenvalue_ + REG) / 2)
    H = dense_curvature(s.adapter_, s.X_train_, s.y_train_, hessian, 256)
    top = float(torch.linalg.eigvalsh(H)[-1]) + REG
    # a Ritz value: from below, and close
    assert top * (1 - 1e-4) < s.max_eigenvalue_ <= top * (1 + 1e-12)


def test_lissa_auto_scale_with_minibatches_is_classical(mlp_data):
    model, Xtr, ytr, _, _ = mlp_data
    s = make(LissaInfluenceScorer, model, minibatch_size=20).fit(Xtr, ytr)
    np.testing.assert_allclose(s.scale_, 1.05 * s.max_eigenvalue_)


def test_lissa_tight_tolerance_is_exact(mlp_data, direct):
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(LissaInfluenceScorer, model, rtol=1e-12, maxiter=5000)
    I = s.fit(Xtr, ytr).influences(Xte, yte)
    assert rel_err(I, direct["exact"]) < 1e-6


def test_lissa_dampen_is_extra_regularization(mlp_data):
    """The fixed point with dampening d is (H + (lambda + d * scale) I)^-1 g."""
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(LissaInfluenceScorer, model, dampen=0.05, scale=2.0, rtol=1e-12, maxiter=5000)
    I = s.fit(Xtr, ytr).influences(Xte, yte)
    J = make(DirectInfluenceScorer, model, regularization=REG + 0.05 * 2.0).fit(Xtr, ytr)
    assert rel_err(I, J.influences(Xte, yte)) < 1e-8


def test_lissa_minibatches_approach_direct(mlp_data, direct):
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(LissaInfluenceScorer, model, minibatch_size=35, maxiter=300, random_state=0,
             scale=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # noise keeps it moving
        I = s.fit(Xtr, ytr).influences(Xte, yte)
    assert pearson(I, direct["exact"]) >= 0.99


@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
def test_arnoldi_rank_p_minus_one_matches_direct(mlp_data, direct, hessian):
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(ArnoldiInfluenceScorer, model, hessian=hessian, rtol=1e-10, random_state=0)
    p = s.fit(Xtr[:2], ytr[:2]).n_params_
    s.set_params(rank=p - 1)
    I = s.fit(Xtr, ytr).influences(Xte, yte)
    assert rel_err(I, direct[hessian]) < 1e-5
    assert s.eigenvalues_.shape == (p - 1,)


def test_arnoldi_low_rank_matches_dense_eigendecomposition(mlp_data):
    model, Xtr, ytr, Xte, yte = mlp_data
    ref = eig_reference(model, Xtr, ytr, Xte, yte, "exact", keep=8)
    s = make(ArnoldiInfluenceScorer, model, rank=8, rtol=1e-8, krylov_dimension=51,
             random_state=0)
    I = s.fit(Xtr, ytr).influences(Xte, yte)
    assert rel_err(I, ref) < 1e-5
    H = dense_curvature(s.adapter_, s.X_train_, s.y_train_, "exact", 256)
    e = torch.linalg.eigvalsh(H).numpy()
    top = e[np.argsort(-np.abs(e))][:8]
    np.testing.assert_allclose(s.eigenvalues_, top, rtol=1e-7, atol=1e-10)


def test_nystroem_rank_p_minus_one_matches_direct(mlp_data, direct):
    # The Gauss-Newton matrix is positive semi-definite, as the sketch assumes.
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(NystroemInfluenceScorer, model, hessian="gauss-newton", random_state=0)
    p = s.fit(Xtr[:2], ytr[:2]).n_params_
    I = s.set_params(rank=p - 1).fit(Xtr, ytr).influences(Xte, yte)
    assert rel_err(I, direct["gauss-newton"]) < 1e-5


def test_nystroem_low_rank_is_close_to_top_eigenpairs(mlp_data):
    # A rank-r sketch recovers the dominant part of the spectrum; with a few extra
    # probes it is almost the rank-r truncation.
    model, Xtr, ytr, Xte, yte = mlp_data
    ref = eig_reference(model, Xtr, ytr, Xte, yte, "gauss-newton", keep=20)
    I = make(NystroemInfluenceScorer, model, hessian="gauss-newton", rank=30,
             random_state=0).fit(Xtr, ytr).influences(Xte, yte)
    assert pearson(I, ref) > 0.999


@pytest.mark.parametrize(
    "cls, kw",
    [
        (CgInfluenceScorer, {"rtol": 1e-12}),
        (LissaInfluenceScorer, {"rtol": 1e-13, "maxiter": 20000}),
        (ArnoldiInfluenceScorer, {"rank": 31, "rtol": 1e-10}),
        (NystroemInfluenceScorer, {"rank": 31}),
    ],
)
@pytest.mark.parametrize("regularization", [0.0, 0.05])
def test_linear_model_matches_direct(logistic, cls, kw, regularization):
    """sklearn's logistic regression: convex, its own L2 penalty folded in."""
    model, Xtr, ytr, Xte, yte = logistic
    kw = {**kw, "regularization": regularization, "dtype": "float64", "random_state": 0}
    I = cls(model, **kw).fit(Xtr, ytr).influences(Xte, yte)
    J = DirectInfluenceScorer(model, regularization=regularization, dtype="float64")
    J = J.fit(Xtr, ytr).influences(Xte, yte)
    assert rel_err(I, J) < 1e-6


@pytest.mark.parametrize("cls, kw", [
    (CgInfluenceScorer, {"rtol": 1e-12}),
    (ArnoldiInfluenceScorer, {"rank": 6, "rtol": 1e-10}),
    (NystroemInfluenceScorer, {"rank": 6}),
])
def test_ridge_closed_form(cls, kw):
    """Ridge: H = 2 (X^T X + alpha I) / n with the intercept unpenalised; compare with
    the closed form of its influence."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5))
    y = X @ rng.normal(size=5) + 0.3 * rng.normal(size=40)
    model = Ridge(alpha=2.0).fit(X, y)
    I = cls(model, regularization=0.0, dtype="float64", random_state=0, **kw).fit(X, y)
    I = I.influences(X[:7], y[:7])
    Z = np.c_[X, np.ones(len(X))]
    n = len(X)
    H = 2 * Z.T @ Z / n
    H[:5, :5] += 2 * 2.0 * np.eye(5) / n
    r = Z @ np.r_[model.coef_, model.intercept_] - y
    G = 2 * r[:, None] * Z
    np.testing.assert_allclose(I, G[:7] @ np.linalg.solve(H, G.T), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cls", [CgInfluenceScorer, LissaInfluenceScorer])
def test_perturbation_mode_matches_direct(mlp_data, cls):
    model, Xtr, ytr, Xte, yte = mlp_data
    kw = {"mode": "perturbation", "rtol": 1e-10}
    if cls is LissaInfluenceScorer:
        kw["maxiter"] = 5000
    I = make(cls, model, **kw).fit(Xtr, ytr).influences(Xte[:4], yte[:4])
    J = make(DirectInfluenceScorer, model, mode="perturbation").fit(Xtr, ytr)
    J = J.influences(Xte[:4], yte[:4])
    assert I.shape == J.shape == (4, N_TRAIN, 4)
    assert rel_err(I, J) < 1e-6


# --------------------------------------------------------------------------- invariances
ALL = [
    (CgInfluenceScorer, {"rtol": 1e-10, "preconditioner": "nystroem", "rank": 5}),
    (LissaInfluenceScorer, {"rtol": 1e-9, "maxiter": 2000}),
    (ArnoldiInfluenceScorer, {"rank": 12}),
    (NystroemInfluenceScorer, {"rank": 12}),
]


@pytest.mark.parametrize("cls, kw", ALL)
def test_batch_size_does_not_change_results(mlp_data, cls, kw):
    model, Xtr, ytr, Xte, yte = mlp_data
    a = make(cls, model, random_state=0, batch_size=256, **kw).fit(Xtr, ytr)
    b = make(cls, model, random_state=0, batch_size=23, **kw).fit(Xtr, ytr)
    assert rel_err(b.influences(Xte, yte), a.influences(Xte, yte)) < 1e-7


@pytest.mark.parametrize("cls, kw", ALL)
def test_self_influence_is_the_diagonal(mlp_data, cls, kw):
    model, Xtr, ytr, _, _ = mlp_data
    s = make(cls, model, random_state=0, **kw).fit(Xtr, ytr)
    pairwise = s.influences(Xtr, ytr)
    np.testing.assert_allclose(s.self_influence(), np.diag(pairwise), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("cls, kw", [
    (CgInfluenceScorer, {"preconditioner": "nystroem", "rank": 5, "rtol": 1e-3}),
    (LissaInfluenceScorer, {"minibatch_size": 20, "maxiter": 30, "scale": 20.0}),
    (ArnoldiInfluenceScorer, {"rank": 5, "krylov_dimension": 12}),
    (NystroemInfluenceScorer, {"rank": 5}),
])
def test_same_random_state_same_results(mlp_data, cls, kw):
    model, Xtr, ytr, Xte, yte = mlp_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        runs = [make(cls, model, random_state=rs, **kw).fit(Xtr, ytr).influences(Xte, yte)
                for rs in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_float32_model_works_in_float32(mlp_data, direct):
    model, Xtr, ytr, Xte, yte = mlp_data
    m32 = clone_module(model).float()
    for cls, kw in ALL:
        if cls in (CgInfluenceScorer, LissaInfluenceScorer):
            kw = {**kw, "rtol": 1e-5}
        I = make(cls, m32, random_state=0, **kw).fit(
            Xtr.astype(np.float32), ytr).influences(Xte.astype(np.float32), yte)
        assert I.dtype == np.float32
        ref = direct["exact"]
        if cls in (ArnoldiInfluenceScorer, NystroemInfluenceScorer):
            assert pearson(I, ref) > 0.9
        else:
            assert rel_err(I, ref) < 1e-3


def clone_module(m):
    return pickle.loads(pickle.dumps(m))


# --------------------------------------------------------------------------- diagnostics
def test_cg_warns_when_maxiter_is_too_small(mlp_data):
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(CgInfluenceScorer, model, rtol=1e-12, maxiter=1).fit(Xtr, ytr)
    with pytest.warns(ConvergenceWarning, match=r"did not converge for \d+ of 20 .*maxiter=1"):
        s.influences(Xte, yte)
    assert s.n_iter_ == 1
    assert (s.residuals_ > 1e-12).any()


def test_lissa_warns_when_maxiter_is_too_small(mlp_data):
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(LissaInfluenceScorer, model, maxiter=3).fit(Xtr, ytr)
    with pytest.warns(ConvergenceWarning, match=r"LiSSA did not converge .*maxiter=3"):
        s.influences(Xte, yte)
    assert s.n_iter_ == 3


def test_arnoldi_warns_when_krylov_space_is_too_small(mlp_data):
    model, Xtr, ytr, _, _ = mlp_data
    s = make(ArnoldiInfluenceScorer, model, rank=10, krylov_dimension=12, rtol=1e-12)
    with pytest.warns(ConvergenceWarning, match="krylov_dimension=12"):
        s.fit(Xtr, ytr)


def test_lissa_divergence_is_a_clear_error_not_nan(mlp_data):
    model, Xtr, ytr, Xte, yte = mlp_data
    auto = make(LissaInfluenceScorer, model).fit(Xtr, ytr).scale_
    s = make(LissaInfluenceScorer, model, scale=auto / 4).fit(Xtr, ytr)
    with pytest.raises(LissaDivergenceError, match=r"scale: LiSSA diverged at iteration \d+"):
        s.influences(Xte, yte)


def test_not_positive_definite_is_reported(mlp_data):
    _, Xtr, ytr, _, _ = mlp_data
    torch.manual_seed(1)
    untrained = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(NotPositiveDefiniteError):
        make(DirectInfluenceScorer, untrained, regularization=0.0).fit(Xtr, ytr)
    with pytest.raises(NotPositiveDefiniteError, match="regularization"):
        make(CgInfluenceScorer, untrained, regularization=0.0).fit(Xtr, ytr).influences(Xtr, ytr)
    p = sum(t.numel() for t in untrained.parameters())
    with pytest.raises(NotPositiveDefiniteError, match="regularization="):
        make(ArnoldiInfluenceScorer, untrained, regularization=0.0, rank=p).fit(Xtr, ytr)


def test_diagnostics_before_fit_and_before_solve(mlp_data):
    model, Xtr, ytr, _, _ = mlp_data
    s = make(CgInfluenceScorer, model)
    with pytest.raises(NotFittedError):
        s.n_iter_  # noqa: B018
    s.fit(Xtr, ytr)
    with pytest.raises(AttributeError, match="n_iter_ is available after"):
        s.n_iter_  # noqa: B018
    assert not hasattr(s, "residuals_")


# --------------------------------------------------------------------------- sklearn API
@pytest.mark.parametrize("cls, kw", ALL)
def test_clone_pickle_and_params(mlp_data, cls, kw):
    model, Xtr, ytr, Xte, yte = mlp_data
    s = make(cls, model, random_state=0, **kw)
    params = s.get_params()
    assert params["random_state"] == 0 and params["regularization"] == REG
    for k, v in kw.items():
        assert params[k] == v
    c = clone(s)
    assert c.estimator is model and c.get_params() == params
    s.fit(Xtr, ytr)
    I = s.influences(Xte, yte)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(s)).influences(Xte, yte), I)
    np.testing.assert_array_equal(clone(s).fit(Xtr, ytr).influences(Xte, yte), I)
    assert s.set_params(regularization=0.5) is s and s.regularization == 0.5


@pytest.mark.parametrize("cls, bad, match", [
    (CgInfluenceScorer, {"preconditioner": "ilu"}, "preconditioner"),
    (CgInfluenceScorer, {"rtol": -1.0}, "rtol"),
    (LissaInfluenceScorer, {"scale": "big"}, "scale"),
    (LissaInfluenceScorer, {"dampen": 1.5}, "dampen"),
    (ArnoldiInfluenceScorer, {"rank": 0}, "rank"),
    (NystroemInfluenceScorer, {"random_state": "seed"}, "random_state"),
])
def test_bad_parameters_are_named(mlp_data, cls, bad, match):
    model, Xtr, ytr, _, _ = mlp_data
    with pytest.raises(ValueError, match=match):
        make(cls, model, **bad).fit(Xtr, ytr)


@pytest.mark.parametrize("cls", [ArnoldiInfluenceScorer, NystroemInfluenceScorer])
def test_low_rank_argument_errors(mlp_data, cls):
    model, Xtr, ytr, _, _ = mlp_data
    with pytest.raises(ValueError, match=r"rank: .*rank=500.*51 parameters"):
        make(cls, model, rank=500).fit(Xtr, ytr)
    with pytest.raises(ValueError, match=r"regularization: .*must be > 0"):
        make(cls, model, rank=5, regularization=0.0).fit(Xtr, ytr)


def test_progress_bars_do_not_change_results(mlp_data):
    model, Xtr, ytr, Xte, yte = mlp_data
    for cls, kw in ALL[:2]:
        a = make(cls, model, random_state=0, progress=True, **kw).fit(Xtr, ytr)
        b = make(cls, model, random_state=0, **kw).fit(Xtr, ytr)
        np.testing.assert_array_equal(a.influences(Xte, yte), b.influences(Xte, yte))


def test_cg_negative_curvature_is_reported_not_crashed():
    """An indefinite Hessian gives NotPositiveDefiniteError with a suggestion, even
    when the search block is linearly dependent (many identical right-hand sides)."""
    from skinfluence import CgInfluenceScorer, NotPositiveDefiniteError

    torch.manual_seed(3)
    X = torch.randn(60, 5, dtype=torch.float64).numpy()
    y = np.arange(60) % 3
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    s = CgInfluenceScorer(model, loss=F.cross_entropy, regularization=1e-3, hessian="exact")
    with pytest.raises(NotPositiveDefiniteError, match="Use regularization="):
        s.fit(X, y).transform(np.repeat(X[:1], 8, 0), np.repeat(y[:1], 8))
