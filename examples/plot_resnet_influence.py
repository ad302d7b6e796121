"""Influence on a ResNet with BatchNorm and frozen layers.

A ResNet (torchvision's ``resnet18(num_classes=2)`` where torchvision is installed,
otherwise :class:`~skinfluence.datasets.SmallResNet`, the same layout scaled down:
a stem, basic blocks of conv-BN-ReLU-conv-BN with identity or 1x1-conv-BN
shortcuts, global average pooling and a linear head) learns to tell filled squares
from hollow rings in synthetic 64x64 colour images, 5% of whose training labels are
flipped. Its early layers are then frozen (``requires_grad=False``) and the rest is
fine-tuned, as when adapting a pretrained network. The scorers take the trainable
parameters only, and use BatchNorm with its running statistics (eval mode):

* conjugate gradients (:class:`~skinfluence.CgInfluenceScorer`) give the influence
  of every training image on one test image: its most helpful and most harmful
  training images, and the distribution of those influences by training label;
* EK-FAC (:class:`~skinfluence.EkfacInfluenceScorer`, which holds BatchNorm's own
  affine parameters fixed) is checked against CG on that image and then gives the
  average influence of each training image over the whole test set, where the
  flipped labels gather on the harmful side.

Run::

    python examples/plot_resnet_influence.py OUTPUT_DIR [--fast]

``--fast`` uses 160 smaller (32x32) training images (used by the test
suite). With the ``torchvision`` extra (``pip install -e ".[torchvision]"``) it runs
on resnet18, more slowly: about 4.7 million fine-tuned parameters instead of 3,714.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

from skinfluence import CgInfluenceScorer, EkfacInfluenceScorer
from skinfluence.datasets import SmallResNet, flip_labels, make_two_class_images
from skinfluence.plotting import plot_influence_by_label, plot_top_influential

NAMES = {0: "square", 1: "ring"}


def make_model(size: int, fast: bool):
    """The network, the names of the layers it fine-tunes, and which it is."""
    try:
        from torchvision.models import resnet18
    except ImportError:
        # a strided stem brings the images down to 8x8 at once (resnet18's, to 16x16)
        return SmallResNet(width=8, stem_stride=size // 8), ["layer2", "fc"], "SmallResNet"
    # the last basic block and the head; --fast keeps its last BatchNorm and the head
    tuned = ["layer4.1.bn2", "fc"] if fast else ["layer4.1", "fc"]
    return resnet18(num_classes=2), tuned, "torchvision resnet18"


def train(model, X, y, epochs: int, lr: float = 0.01) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-3)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="folder for the PNG figures")
    parser.add_argument("--fast", action="store_true", help="fewer, smaller images, for tests")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    torch.manual_seed(0)

    n_train, n_test, size = (160, 20, 32) if args.fast else (2000, 200, 64)
    X, y = make_two_class_images(n_train + n_test, size=size, noise=0.4, random_state=0)
    X_train, y_clean, X_test, y_test = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    y_train, flipped = flip_labels(y_clean, 0.05, random_state=0)

    start = time.perf_counter()
    model, tuned, which = make_model(size, args.fast)
    train(model, X_train, y_train, epochs=15 if args.fast else 10)
    # freeze the early layers, fine-tune the rest
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(tuple(tuned)))
    train(model, X_train, y_train, epochs=2, lr=0.003)
    with torch.no_grad():
        accuracy = float((model(torch.as_tensor(X_test)).argmax(1).numpy() == y_test).mean())
    n_tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"{which} trained on {n_train} {size}x{size} images ({flipped.sum()} labels "
          f"flipped) in {time.perf_counter() - start:.1f} s; test accuracy {accuracy:.3f}. "
          f"Fine-tuned layers {tuned}: {n_tuned} of {n_all} parameters.")

    # Influence of every training image on one test image, by conjugate gradients.
    common = dict(loss=F.cross_entropy, regularization=0.01)
    i = 0
    start = time.perf_counter()
    cg = CgInfluenceScorer(model, hessian="gauss-newton", **common).fit(X_train, y_train)
    row = cg.influences(X_test[[i]], y_test[[i]])[0]
    cg_seconds = time.perf_counter() - start

    shown = [f"{NAMES[g]}*" if f else NAMES[g] for g, f in zip(y_train, flipped, strict=True)]
    fig = plot_top_influential(row, X_train, n=5, labels=shown, reference=X_test[i],
                               reference_label=NAMES[y_test[i]])
    fig.savefig(args.output / "resnet_top_influential.png", dpi=80)  # noisy pixels: keep it small
    ax = plot_influence_by_label(row, y_train, label_names=NAMES, bins=40, log=True)
    ax.set_title(f"Influence of each training image on test image #{i} (a "
                 f"{NAMES[y_test[i]]}), by training label", fontsize=10)
    ax.figure.savefig(args.output / "resnet_influence_by_label.png", dpi=110)

    # EK-FAC: the same row, then every test image.
    start = time.perf_counter()
    ekfac = EkfacInfluenceScorer(model, **common).fit(X_train, y_train)
    I = ekfac.influences(X_test, y_test)
    ek_seconds = time.perf_counter() - start
    r = pearsonr(I[i], row)[0]
    mean = I.mean(axis=0)
    ax = plot_influence_by_label(mean, flipped, label_names=["label as drawn", "label flipped"],
                                 bins=40, log=True)
    ax.set_title(f"Average influence of each training image over the {n_test} test "
                 "images (EK-FAC)", fontsize=10)
    ax.figure.savefig(args.output / "resnet_mean_influence.png", dpi=110)
    helpful, harmful = np.argsort(-row)[:5], np.argsort(row)[:5]
    worst = np.argsort(mean)[: flipped.sum()]
    same = (y_train == y_test[i]) & ~flipped
    other = (y_train != y_test[i]) & ~flipped

    print(f"""
CG ({cg_seconds:.1f} s for one test image) and EK-FAC ({ek_seconds:.1f} s for all {n_test}):
Pearson correlation of their influences on test image #{i}: {r:.3f}. EK-FAC holds
BatchNorm's affine parameters fixed ({len(ekfac.fixed_params_)} tensors): it takes
{ekfac.n_params_} of the {cg.n_params_} parameters CG takes; the frozen layers count
for neither.

What to look at (figures in {args.output}/):
* resnet_top_influential.png: {flipped[helpful].sum()} of the 5 most helpful and
  {flipped[harmful].sum()} of the 5 most harmful training images for test image #{i} have
  flipped labels (marked *): a label the network had to memorise gives a large
  gradient, so such images move the prediction on this test image most, in either
  direction.
* resnet_influence_by_label.png: most influences are close to zero and a few
  images, on both sides, carry the largest ones; the mean influence of correctly
  labelled images is {row[same].mean():+.3f} for the test image's class and
  {row[other].mean():+.3f} for the other class.
* resnet_mean_influence.png: averaged over the test set, the flipped labels gather
  on the harmful side: {flipped[worst].sum()} of the {flipped.sum()} images with the
  lowest average influence are flipped ({flipped.mean():.0%} of all labels are).""")


if __name__ == "__main__":
    main()
