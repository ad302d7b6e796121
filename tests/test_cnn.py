"""Every method on a small ResNet with BatchNorm, residual blocks and frozen layers.

The network (``skinfluence.datasets.SmallResNet``, 1,382 parameters) is trained on
synthetic 3x16x16 two-class images; its stem and first block are then frozen
(``requires_grad=False``), leaving 962 trainable parameters in the second block
(two 3x3 convolutions and a strided 1x1 shortcut, each followed by BatchNorm) and
the linear head. Each method is compared with conjugate gradients solved to
``rtol=1e-10`` in float64 on the Gauss-Newton matrix.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

import skinfluence
from skinfluence import (
    CgInfluenceScorer,
    DirectInfluenceScorer,
    EkfacInfluenceScorer,
)
from skinfluence.datasets import SmallResNet, make_two_class_images
from skinfluence.solvers import METHODS
from skinfluence.solvers import direct as direct_module

FROZEN = ("conv1", "bn1", "layer1")
REG = 0.1
#: Parameters every method can afford at full rank in a test: a strided 1x1
#: convolution, its BatchNorm and the linear head (66 of the 962 trainable).
SUBSET = ["layer2.downsample", "fc"]
#: What each method is held to against the tight CG reference on SUBSET: the
#: relative Frobenius error of the influence matrix for the methods that solve the
#: system (at full rank for Arnoldi and Nystroem), the Pearson correlation over its
#: entries for EK-FAC (measured: 0.993 on SUBSET, 0.951 on all trainable parameters).
MAX_RELATIVE_ERROR = {"direct": 1e-8, "cg": 1e-5, "arnoldi": 1e-8, "nystroem": 1e-8,
                      "lissa": 1e-4}
MIN_PEARSON = {"ekfac": 0.95}


def _is_bn(name: str) -> bool:
    return ".bn" in name or name.startswith("bn") or "downsample.1" in name


def trained_resnet():
    """The trained network, frozen, and its data (Xtr, ytr, Xte, yte)."""
    X, y = make_two_class_images(72, size=16, noise=0.5, random_state=0)
    Xtr, ytr, Xte, yte = X[:64], y[:64], X[64:], y[64:]
    torch.manual_seed(0)
    model = SmallResNet(width=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-3)
    Xt, yt = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    model.train()
    for _ in range(25):
        for i in torch.randperm(64).split(16):
            opt.zero_grad()
            F.cross_entropy(model(Xt[i]), yt[i]).backward()
            opt.step()
    for name, p in model.named_parameters():
        if name.startswith(FROZEN):
            p.requires_grad_(False)
    model.eval()
    return model, Xtr, ytr, Xte, yte


@pytest.fixture(scope="module")
def resnet():
    return trained_resnet()


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _make(name, model, **kw):
    """The method's scorer with the shared settings, those it takes."""
    cls = getattr(skinfluence, METHODS[name].scorer_name)
    settings = {"loss": F.cross_entropy, "regularization": REG, "dtype": "float64",
                "hessian": "gauss-newton", "random_state": 0, **kw}
    takes = cls().get_params()
    return cls(model, **{k: v for k, v in settings.items() if k in takes})


@pytest.fixture(scope="module")
def reference(resnet):
    """Tight CG on all trainable parameters and on SUBSET."""
    model, Xtr, ytr, Xte, yte = resnet
    out = {}
    for key, params in (("all", None), ("subset", SUBSET)):
        scorer = _make("cg", model, rtol=1e-10, maxiter=5000, params=params).fit(Xtr, ytr)
        out[key] = scorer.influences(Xte, yte)
    return out


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _n(model, names):
    return sum(model.get_parameter(n).numel() for n in names)


def _settings(name, p):
    """Settings under which a method solves the system as accurately as it can."""
    return {
        "arnoldi": {"rank": p, "rtol": 1e-10},
        "nystroem": {"rank": p},
        "lissa": {"rtol": 1e-5, "maxiter": 2000},
    }.get(name, {})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_frozen_parameters_are_left_out(name, resnet, monkeypatch):
    model, Xtr, ytr, _, _ = resnet
    trainable = _trainable(model)
    p = _n(model, trainable)
    assert p == 962 and not any(n.startswith(FROZEN) for n in trainable)
    if name == "direct":
        # the dense 962 x 962 matrix takes 14.8 MB; a lower bound refuses it, naming
        # the bound and the size it would need, before any work
        monkeypatch.setattr(direct_module, "MAX_BYTES", 2**20)
        with pytest.raises(MemoryError, match=r"962 x 962.*MAX_BYTES"):
            _make(name, model).fit(Xtr, ytr)
        return
    scorer = _make(name, model, maxiter=3).fit(Xtr, ytr)
    if name == "ekfac":  # BatchNorm affine parameters are held fixed, and say so
        bn = [n for n in trainable if _is_bn(n)]
        assert len(bn) == 6 and scorer.fixed_params_ == bn
        assert scorer.n_params_ == p - _n(model, bn) == 914
    else:
        assert scorer.n_params_ == p
    sub = _make(name, model, params=SUBSET, maxiter=3).fit(Xtr, ytr)
    assert sub.n_params_ == (50 if name == "ekfac" else 66)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"gradient_similarity"}))
def test_influences_agree_with_tight_cg(name, resnet, reference):
    model, Xtr, ytr, Xte, yte = resnet
    scorer = _make(name, model, params=SUBSET, **_settings(name, 66)).fit(Xtr, ytr)
    I = scorer.influences(Xte, yte)
    ref = reference["subset"]
    if name in MAX_RELATIVE_ERROR:
        assert _rel(I, ref) < MAX_RELATIVE_ERROR[name]
    else:
        assert pearsonr(I.ravel(), ref.ravel())[0] > MIN_PEARSON[name]


def test_ekfac_over_every_trainable_layer(resnet, reference):
    """Conv2d (3x3 and strided 1x1) and Linear layers, BatchNorm held fixed."""
    model, Xtr, ytr, Xte, yte = resnet
    scorer = _make("ekfac", model).fit(Xtr, ytr)
    assert scorer.layers_ == ["layer2.conv1", "layer2.conv2", "layer2.downsample.0", "fc"]
    I = scorer.influences(Xte, yte)
    assert pearsonr(I.ravel(), reference["all"].ravel())[0] > 0.9  # measured 0.951


def _manual_grads(model, X, y, names):
    """Per-sample gradients by plain autograd, the model in eval mode."""
    model = copy.deepcopy(model).double().eval()
    rows = []
    for x, t in zip(torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y), strict=True):
        loss = F.cross_entropy(model(x[None]), t[None])
        grads = torch.autograd.grad(loss, [model.get_parameter(n) for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).numpy()


def test_batchnorm_is_used_in_eval_mode_and_left_as_it_was(resnet):
    """Running statistics, not batch statistics: the gradients are those of the model
    in eval mode, whatever mode it comes in; its buffers and modes are untouched."""
    model, Xtr, ytr, Xte, yte = resnet
    model = copy.deepcopy(model)
    model.train()
    model.layer2.eval()  # a mixed state, to be handed back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    names = _trainable(model)
    for name in ("cg", "ekfac", "gradient_similarity"):
        scorer = _make(name, model).fit(Xtr, ytr)
        I = scorer.influences(Xte, yte)
        assert np.isfinite(I).all()
        scorer.self_influence()
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    # independent check: gradient similarity is G_test G_train^T, with gradients of
    # the eval-mode model; batch statistics would give other gradients
    I = _make("gradient_similarity", model).fit(Xtr, ytr).influences(Xte, yte)
    G_te, G_tr = _manual_grads(model, Xte, yte, names), _manual_grads(model, Xtr, ytr, names)
    np.testing.assert_allclose(I, G_te @ G_tr.T, rtol=1e-8, atol=1e-12)


def test_ekfac_holds_batchnorm_fixed_rather_than_mishandling_it(resnet):
    """EK-FAC with BatchNorm parameters selected gives exactly the influences of the
    same model with them frozen, lists them, and refuses to take them as a layer."""
    model, Xtr, ytr, Xte, yte = resnet
    scorer = _make("ekfac", model).fit(Xtr, ytr)
    I = scorer.influences(Xte, yte)
    bn = [n for n in _trainable(model) if _is_bn(n)]
    frozen = copy.deepcopy(model)
    for n in bn:
        frozen.get_parameter(n).requires_grad_(False)
    held = _make("ekfac", frozen).fit(Xtr, ytr)
    assert held.fixed_params_ == [] and held.n_params_ == scorer.n_params_
    np.testing.assert_allclose(I, held.influences(Xte, yte), rtol=1e-10, atol=1e-14)
    # the parts by layer are those of the Kronecker layers only, and sum to the total
    by_layer = scorer.influences_by_layer(Xte, yte)
    assert sorted(by_layer) == sorted(scorer.layers_)
    np.testing.assert_allclose(sum(by_layer.values()), I, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="BatchNorm layers are held fixed"):
        _make("ekfac", model, layers=["layer2.bn1"]).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="all belong to BatchNorm layers"):
        _make("ekfac", model, params=["layer2.bn1", "layer2.bn2"]).fit(Xtr, ytr)
    # CG over the same parameters: BatchNorm's share is small but not nothing
    cg_all = _make("cg", model, rtol=1e-10).fit(Xtr, ytr).influences(Xte, yte)
    cg_held = _make("cg", frozen, rtol=1e-10).fit(Xtr, ytr).influences(Xte, yte)
    assert 1e-4 < _rel(cg_held, cg_all) < 0.5


def test_torchvision_resnet18():
    """torchvision's resnet18 with all but its last block and head frozen."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(num_classes=2).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("layer4.1", "fc")))
    X, y = make_two_class_images(12, size=32, random_state=0)
    Xtr, ytr, Xte, yte = X[:8], y[:8], X[8:], y[8:]
    trainable = _trainable(model)
    p = _n(model, trainable)
    with pytest.raises(MemoryError, match="MAX_BYTES"):
        DirectInfluenceScorer(model, loss=F.cross_entropy).fit(Xtr, ytr)
    ekfac = EkfacInfluenceScorer(model, loss=F.cross_entropy, regularization=REG).fit(Xtr, ytr)
    bn = [n for n in trainable if _is_bn(n)]
    assert ekfac.fixed_params_ == bn and ekfac.n_params_ == p - _n(model, bn)
    assert ekfac.layers_ == ["layer4.1.conv1", "layer4.1.conv2", "fc"]
    head = dict(loss=F.cross_entropy, regularization=REG, params="fc", dtype="float64",
                hessian="gauss-newton")
    direct = DirectInfluenceScorer(model, **head).fit(Xtr, ytr)
    assert direct.n_params_ == 1026
    ref = CgInfluenceScorer(model, rtol=1e-10, **head).fit(Xtr, ytr).influences(Xte, yte)
    assert _rel(direct.influences(Xte, yte), ref) < 1e-8


@pytest.mark.parametrize("name", ["cg", "lissa"])
def test_kronecker_preconditioner_names_the_batchnorm_parameters(name, resnet):
    """The EK-FAC preconditioner does not cover BatchNorm's affine parameters: a clear
    error names them; selected out, it preconditions the rest."""
    model, Xtr, ytr, Xte, yte = resnet
    with pytest.raises(ValueError, match=r"layer2\.bn1\.weight.*BatchNorm layers"):
        _make(name, model, preconditioner="ekfac").fit(Xtr, ytr)
    kronecker = [n for n in _trainable(model) if not _is_bn(n)]
    if name == "cg":
        s = _make(name, model, preconditioner="ekfac", params=kronecker, rtol=1e-10)
        I = s.fit(Xtr, ytr).influences(Xte, yte)
        ref = _make("cg", model, params=kronecker, rtol=1e-10).fit(Xtr, ytr).influences(Xte, yte)
        assert s.n_params_ == 914 and _rel(I, ref) < 1e-6
