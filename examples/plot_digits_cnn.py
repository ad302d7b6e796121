"""Influence for an image classifier: a small CNN on the 8x8 digits images.

A two-layer convolutional network (skorch) is trained on sklearn's 8x8 digits after
10% of the training labels were flipped. EK-FAC, which handles Conv2d as well as
Linear layers, gives the influence of every training image on one test image:

* the distribution of those influences by training label: images of the test image's
  own class help (positive), a few mislabelled ones hurt;
* the most helpful and the most harmful training images, as image grids.

Then :class:`~skinfluence.MislabelDetector` flags suspected wrong labels, and a network
refit on the filtered training set is compared with the one fit on the noisy set.

Run::

    python examples/plot_digits_cnn.py OUTPUT_DIR [--fast]

``--fast`` uses fewer images and epochs (used by the test suite).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier
from torch import nn

from skinfluence import EkfacInfluenceScorer, MislabelDetector
from skinfluence.datasets import flip_labels
from skinfluence.plotting import plot_influence_by_label, plot_top_influential


class CNN(nn.Module):
    """conv 3x3 (8) - pool - conv 3x3 (16) - pool - linear: about 1,900 parameters."""

    def __init__(self, channels: int = 8, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 2 * 2, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def make_net(epochs: int) -> NeuralNetClassifier:
    return NeuralNetClassifier(
        CNN, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
        optimizer__weight_decay=1e-3, max_epochs=epochs, batch_size=64, train_split=None,
        verbose=0,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="folder for the PNG figures")
    parser.add_argument("--fast", action="store_true", help="fewer images and epochs, for tests")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    torch.manual_seed(0)

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # (n, channels, height, width)
    if args.fast:
        X, y = X[:600], y[:600]
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, stratify=y, random_state=0
    )
    y_noisy, flipped = flip_labels(y_train, 0.1, random_state=0)
    epochs = 10 if args.fast else 30
    net = make_net(epochs).fit(X_train, y_noisy)
    noisy_score = net.score(X_test, y_test)
    print(f"CNN trained on {len(y_noisy)} images, {flipped.sum()} with flipped labels; "
          f"clean test accuracy {noisy_score:.3f}")

    # Influence of each training image on one test image.
    scorer = EkfacInfluenceScorer(net, regularization=0.1).fit(X_train, y_noisy)
    i = 0
    row = scorer.influences(X_test[[i]], y_test[[i]])[0]

    ax = plot_influence_by_label(row, y_noisy, kind="strip")
    ax.set_title(f"Influence of each training image on test image #{i} (a {y_test[i]}), "
                 "by training label", fontsize=10)
    ax.set_ylabel("training label (as given, 10% flipped)")
    ax.figure.savefig(args.output / "digits_influence_by_label.png", dpi=110)

    shown = [f"{g} (was {t})" if f else str(g)
             for g, t, f in zip(y_noisy, y_train, flipped, strict=True)]
    fig = plot_top_influential(row, X_train, n=8, labels=shown, reference=X_test[i],
                               reference_label=y_test[i])
    fig.savefig(args.output / "digits_top_influential.png", dpi=110)
    helpful, harmful = np.argsort(-row)[:8], np.argsort(row)[:8]

    # Detect wrong labels, filter them out, refit.
    start = time.perf_counter()
    detector = MislabelDetector(
        make_net(epochs), scorer=EkfacInfluenceScorer(regularization=0.1),
        contamination="auto",
    )
    X_clean, y_clean = detector.fit_resample(X_train, y_noisy)
    seconds = time.perf_counter() - start
    flagged = detector.label_issues_
    found = int((flagged & flipped).sum())
    auroc = roc_auc_score(flipped, detector.scores_)
    clean_score = make_net(epochs).fit(X_clean, y_clean).score(X_test, y_test)

    fig, axes = plt.subplots(2, 8, figsize=(11, 3.6), layout="constrained")
    for ax, j in zip(axes.ravel(), detector.ranking_[:16], strict=False):
        ax.imshow(X_train[j, 0], cmap="gray_r")
        truth = f"(was {y_train[j]})" if flipped[j] else "(correct)"
        ax.set_title(f"given {y_noisy[j]}\n{truth}", fontsize=8,
                     color="#D55E00" if flipped[j] else "black")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("The 16 most suspicious training labels (red: really flipped)", fontsize=10)
    fig.savefig(args.output / "digits_suspects.png", dpi=110)

    print(f"""
MislabelDetector ({seconds:.1f} s): flagged {flagged.sum()} of {len(y_noisy)} images,
{found} of the {flipped.sum()} flipped ones (precision {found / max(flagged.sum(), 1):.2f},
recall {found / flipped.sum():.2f}); AUROC of its scores against the flips {auroc:.3f}.
Clean test accuracy: fit on the noisy labels {noisy_score:.3f}, refit on the filtered
set {clean_score:.3f}.

What to look at (figures in {args.output}/):
* digits_influence_by_label.png: the spread is widest for the test image's own label
  ({y_test[i]}) and the extremes on both sides are few: influence concentrates on a
  handful of training images.
* digits_top_influential.png: {flipped[helpful].sum()} of the 8 most helpful and
  {flipped[harmful].sum()} of the 8 most harmful images have flipped labels ("was ..."):
  a label the network had to memorise gives a large gradient, so such images move the
  prediction on this test image most, in either direction.
* digits_suspects.png: what the detector flags first; red titles are real flips.""")


if __name__ == "__main__":
    main()
