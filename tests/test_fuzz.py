"""Property-based fuzzing of the public entry points (hypothesis).

Each case feeds a scorer (every method of the registry), the detector or the
functional interface inputs that are wrong in some way - NaN, inf, huge values,
empty or single samples, wrong shapes and dtypes, pandas / list / tensor /
non-contiguous inputs, string labels, bad hyperparameters, the wrong call order.
The outcome must be a finite result or an error of an sklearn kind
(ValueError, TypeError, NotFittedError) whose message names the argument; never a
raw torch or numpy error, NaN in a result, or a change to what was passed.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

import skinfluence
from skinfluence.functional import compute_influences
from skinfluence.solvers import METHODS

RNG = np.random.default_rng(0)
X0 = RNG.normal(size=(30, 4))
Y0 = (X0[:, 0] + 0.3 * RNG.normal(size=30) > 0).astype(np.int64)
MODEL = LogisticRegression().fit(X0, Y0)
ARGUMENTS = {"X", "y", "X_test", "y_test", "estimator", "model", "influence_factors",
             "training_data", "test_data", "input_data", "inversion_method",
             "influence_type", "hessian_regularization", "batch_size"}
NAMES = sorted(METHODS)


def _variant(kind: str, base: np.ndarray):
    """One wrong (or merely unusual) version of an input."""
    a = base.copy()
    if kind == "nan":
        a = a.astype(float)
        a.flat[0] = np.nan
    elif kind == "inf":
        a = a.astype(float)
        a.flat[-1] = np.inf
    elif kind == "huge":
        a = a.astype(float) * 1e30
    elif kind == "empty":
        a = a[:0]
    elif kind == "single":
        a = a[:1]
    elif kind == "one_dim":
        a = a.reshape(-1)
    elif kind == "three_dim":
        a = a[..., None] if a.ndim else a
    elif kind == "list":
        a = a.tolist()
    elif kind == "frame":
        a = pd.DataFrame(a) if a.ndim == 2 else pd.Series(a)
    elif kind == "tensor":
        a = torch.tensor(a)
    elif kind == "strided":
        a = np.repeat(a, 2, axis=0)[::2]
    elif kind == "strings":
        a = np.array([f"s{v}" for v in a.ravel()]).reshape(a.shape)
    elif kind == "floats":
        a = a.astype(float) + 0.5
    elif kind == "short":
        a = a[:-1]
    return a


KINDS = ["ok", "nan", "inf", "huge", "empty", "single", "one_dim", "three_dim", "list",
         "frame", "tensor", "strided", "strings", "floats", "short"]


def _snapshot(a):
    if isinstance(a, torch.Tensor):
        return a.clone()
    if isinstance(a, (pd.DataFrame, pd.Series)):
        return a.copy(deep=True)
    return np.array(a, dtype=object) if isinstance(a, list) else np.copy(a)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (pd.DataFrame, pd.Series)):
        return a.equals(b)
    try:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaN equals NaN
    except AssertionError:
        return False
    return True


def _check_outcome(call, *inputs):
    """Run ``call``; a result must be finite, an error of the right kind must name an
    argument; inputs and the model must be unchanged."""
    before = [_snapshot(a) for a in inputs]
    params = {k: v.detach().clone() for k, v in MODEL_PARAMS().items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call()
    except (ValueError, TypeError, NotFittedError) as exc:
        message = str(exc)
        named = any(re.search(rf"\b{re.escape(n)}\b", message) for n in ARGUMENTS | PARAMS)
        assert named, f"{type(exc).__name__} names no argument: {message}"
        assert "Traceback" not in message
    else:
        arrays = out if isinstance(out, (list, tuple)) else [out]
        for arr in arrays:
            if isinstance(arr, np.ndarray) and arr.dtype.kind == "f":
                assert np.isfinite(arr).all(), "a result contains NaN or inf"
    for a, b in zip(inputs, before, strict=True):
        assert _same(a, b), "an input was changed"
    for k, v in MODEL_PARAMS().items():
        assert torch.equal(v, params[k]), "the model was changed"


def MODEL_PARAMS():
    return {"coef": torch.tensor(MODEL.coef_), "intercept": torch.tensor(MODEL.intercept_)}


PARAMS = set()
for _n in NAMES:
    PARAMS |= set(getattr(skinfluence, METHODS[_n].scorer_name)._parameter_constraints)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(NAMES),
    x_kind=st.sampled_from(KINDS),
    y_kind=st.sampled_from(KINDS),
    test_kind=st.sampled_from(KINDS),
    order=st.sampled_from(["fit_then_transform", "transform_first", "self_influence"]),
)
def test_scorers_fail_clearly(name, x_kind, y_kind, test_kind, order):
    cls = getattr(skinfluence, METHODS[name].scorer_name)
    kw = {k: v for k, v in {"regularization": 0.1, "random_state": 0, "rank": 3}.items()
          if k in cls._parameter_constraints}
    scorer = cls(MODEL, **kw)
    X, y = _variant(x_kind, X0), _variant(y_kind, Y0)
    Xt = _variant(test_kind, X0[:5])
    if order == "transform_first":
        _check_outcome(lambda: scorer.transform(Xt, Y0[:5]), Xt)
    elif order == "self_influence":
        _check_outcome(lambda: scorer.fit(X, y).self_influence(), X, y)
    else:
        _check_outcome(lambda: scorer.fit(X, y).transform(Xt, Y0[:5]), X, y, Xt)


BAD_PARAMS = [("regularization", -1.0), ("regularization", "big"), ("batch_size", 0),
              ("batch_size", 2.5), ("mode", "sideways"), ("dtype", "int8"),
              ("dtype", "float16"), ("params", []), ("params", "nope"), ("device", 3),
              ("rank", 0), ("rank", 10_000), ("rtol", -1.0), ("maxiter", 0),
              ("random_state", "seed"), ("loss", 3), ("estimator", None),
              ("estimator", "model"), ("layers", []), ("fisher", "x"), ("normalize", "yes")]


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(NAMES), bad=st.sampled_from(BAD_PARAMS))
def test_bad_hyperparameters_fail_clearly(name, bad):
    cls = getattr(skinfluence, METHODS[name].scorer_name)
    key, value = bad
    if key not in cls._parameter_constraints:
        return
    scorer = cls(MODEL).set_params(**{key: value})
    _check_outcome(lambda: scorer.fit(X0, Y0).influences(X0[:3], Y0[:3]))


@settings(max_examples=25, deadline=None)
@given(x_kind=st.sampled_from(KINDS), y_kind=st.sampled_from(KINDS),
       strategy=st.sampled_from(["crossfit", "loo", "self", "harm"]))
def test_detector_fails_clearly(x_kind, y_kind, strategy):
    X, y = _variant(x_kind, X0), _variant(y_kind, Y0)
    det = skinfluence.MislabelDetector(LogisticRegression(), strategy=strategy, random_state=0)
    _check_outcome(lambda: det.fit(X, y).scores_, X, y)


@settings(max_examples=25, deadline=None)
@given(x_kind=st.sampled_from(KINDS), method=st.sampled_from([*NAMES, "Direct", "bogus"]),
       influence_type=st.sampled_from(["up", "Up", "perturbation", "sideways"]))
def test_functional_fails_clearly(x_kind, method, influence_type):
    X = _variant(x_kind, X0)
    _check_outcome(
        lambda: compute_influences(MODEL, (X, Y0), (X0[:3], Y0[:3]), inversion_method=method,
                                   influence_type=influence_type, hessian_regularization=0.1),
        X,
    )


def test_same_random_state_gives_identical_arrays():
    for name in NAMES:
        cls = getattr(skinfluence, METHODS[name].scorer_name)
        if "random_state" not in cls._parameter_constraints:
            continue
        kw = {k: v for k, v in {"regularization": 0.1, "rank": 3}.items()
              if k in cls._parameter_constraints}
        a = cls(MODEL, random_state=5, **kw).fit(X0, Y0).influences(X0[:4], Y0[:4])
        b = cls(MODEL, random_state=5, **kw).fit(X0, Y0).influences(X0[:4], Y0[:4])
        np.testing.assert_array_equal(a, b)


pytestmark = pytest.mark.filterwarnings("ignore")
