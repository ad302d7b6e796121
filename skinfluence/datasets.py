"""Label noise, small synthetic data and a small image network for examples, tests
and benchmarks.

:class:`SmallResNet` is defined here rather than in each script because the image
example, the tests and the CNN benchmark share it; its modules carry the names of
torchvision's ``resnet18`` (``conv1``, ``bn1``, ``layer1``, ..., ``fc``,
``downsample``), so code that freezes or selects its layers works unchanged on a
torchvision ResNet.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from sklearn.utils import check_random_state
from torch import nn

__all__ = ["BasicBlock", "SmallResNet", "flip_labels", "make_blobs_2d", "make_two_class_images"]


def flip_labels(y, fraction=0.1, *, noise_matrix=None, random_state=None):
    """Flip a share of the labels, returning the noisy labels and which were flipped.

    Parameters
    ----------
    y : array-like or pandas Series of shape (n_samples,)
        Clean labels (any hashable values; at least two classes).
    fraction : float, default=0.1
        Share of the samples whose label is changed, in [0, 1).
    noise_matrix : array-like of shape (n_classes, n_classes), default=None
        Class-conditional noise: row ``a`` gives the probabilities that a flipped
        sample of class ``a`` (classes in sorted order) receives each other class;
        the diagonal is ignored and each row is renormalised. None flips uniformly
        to any other class.
    random_state : int, RandomState instance or None, default=None
        Seed of the choice of samples and new labels.

    Returns
    -------
    y_noisy : ndarray or pandas Series of shape (n_samples,)
        Labels with ``round(fraction * n_samples)`` entries changed. ``y`` itself is
        left untouched. A Series ``y`` gives a Series with its index, name and dtype.
    flipped : ndarray or pandas Series of bool, shape (n_samples,)
        True where the label was changed; a Series with ``y``'s index when ``y`` is
        one.

    Examples
    --------
    >>> from skinfluence.datasets import flip_labels
    >>> y_noisy, flipped = flip_labels([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], 0.2, random_state=0)
    >>> int(flipped.sum())
    2
    >>> import pandas as pd
    >>> s = pd.Series(["a", "b", "a", "b"], index=[10, 11, 12, 13], name="label")
    >>> s_noisy, s_flipped = flip_labels(s, 0.5, random_state=0)
    >>> s_noisy.index.tolist(), s_noisy.name, int(s_flipped.sum())
    ([10, 11, 12, 13], 'label', 2)
    """
    series = _as_series_like(y)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-dimensional, got shape {y.shape}.")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}.")
    classes = np.unique(y)
    k = len(classes)
    if k < 2:
        raise ValueError("y must contain at least two classes to flip labels between.")
    rng = check_random_state(random_state)
    if noise_matrix is None:
        T = np.ones((k, k))
    else:
        T = np.array(noise_matrix, dtype=float)
        if T.shape != (k, k) or (T < 0).any():
            raise ValueError(
                f"noise_matrix must be a non-negative ({k}, {k}) array, one row per class."
            )
    np.fill_diagonal(T, 0.0)
    rows = T.sum(1)
    if (rows == 0).any():
        raise ValueError("noise_matrix: every row needs a positive off-diagonal entry.")
    T /= rows[:, None]
    n = len(y)
    idx = rng.choice(n, round(fraction * n), replace=False)
    y_noisy = y.copy()
    codes = np.searchsorted(classes, y)
    for i in idx:
        y_noisy[i] = classes[rng.choice(k, p=T[codes[i]])]
    flipped = np.zeros(n, bool)
    flipped[idx] = True
    if series is not None:
        pd = sys.modules["pandas"]
        noisy = pd.Series(y_noisy, index=series.index, name=series.name)
        try:
            noisy = noisy.astype(series.dtype)
        except (TypeError, ValueError):  # a dtype the flipped values cannot take
            pass
        return noisy, pd.Series(flipped, index=series.index, name="flipped")
    return y_noisy, flipped


def _as_series_like(y):
    """``y`` if it is a pandas Series (pandas is not imported unless it already is)."""
    pd = sys.modules.get("pandas")
    return y if pd is not None and isinstance(y, pd.Series) else None


def make_blobs_2d(n_samples=1000, *, separation=1.0, scale=0.5, random_state=None):
    """Two Gaussian blobs in 2-d, centred at +-separation/2 on the diagonal.

    Parameters
    ----------
    n_samples : int, default=1000
        Number of points; each gets class 0 or 1 with equal probability.
    separation : float, default=1.0
        Distance between the two centres along each axis.
    scale : float, default=0.5
        Standard deviation of each blob.
    random_state : int, RandomState instance or None, default=None
        Seed.

    Returns
    -------
    X : ndarray of shape (n_samples, 2)
    y : ndarray of shape (n_samples,) with labels 0 and 1

    Examples
    --------
    >>> from skinfluence.datasets import make_blobs_2d
    >>> X, y = make_blobs_2d(10, random_state=1)
    >>> X.shape, sorted(set(y.tolist()))
    ((10, 2), [0, 1])
    """
    rng = check_random_state(random_state)
    y = rng.randint(0, 2, n_samples)
    means = np.array([[-0.5, -0.5], [0.5, 0.5]]) * separation
    X = means[y] + scale * rng.standard_normal((n_samples, 2))
    return X, y


def make_two_class_images(n_samples=200, size=16, *, noise=0.3, random_state=None):
    """Colour images of two classes: a filled square (0) or a hollow ring (1).

    Each image has one shape of random size, position and colour on a dark
    background, plus Gaussian pixel noise; the classes differ only in the shape's
    interior, so a classifier has to look at spatial structure, not at colour or
    brightness.

    Parameters
    ----------
    n_samples : int, default=200
        Number of images; each gets class 0 or 1 with equal probability.
    size : int, default=16
        Height and width in pixels (at least 8).
    noise : float, default=0.3
        Standard deviation of the pixel noise.
    random_state : int, RandomState instance or None, default=None
        Seed.

    Returns
    -------
    X : ndarray of shape (n_samples, 3, size, size), float32
        Images, channels first as torch's ``nn.Conv2d`` takes them.
    y : ndarray of shape (n_samples,), int64
        Labels 0 (square) and 1 (ring).

    Examples
    --------
    >>> from skinfluence.datasets import make_two_class_images
    >>> X, y = make_two_class_images(6, size=16, random_state=0)
    >>> X.shape, X.dtype.name, sorted(set(y.tolist()))
    ((6, 3, 16, 16), 'float32', [0, 1])
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size!r}.")
    rng = check_random_state(random_state)
    y = rng.randint(0, 2, n_samples).astype(np.int64)
    X = np.zeros((n_samples, 3, size, size))
    rows, cols = np.mgrid[0:size, 0:size]
    for i in range(n_samples):
        side = rng.randint(size // 3, size // 2 + 2)
        r0, c0 = rng.randint(0, size - side + 1, 2)
        inside = (rows >= r0) & (rows < r0 + side) & (cols >= c0) & (cols < c0 + side)
        if y[i] == 1:
            wall = max(1, side // 4)
            hole = (rows >= r0 + wall) & (rows < r0 + side - wall)
            hole &= (cols >= c0 + wall) & (cols < c0 + side - wall)
            inside &= ~hole
        colour = 0.5 + 0.5 * rng.random_sample(3)
        X[i] = colour[:, None, None] * inside
    X += noise * rng.standard_normal(X.shape)
    return X.astype(np.float32), y


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-ReLU-conv-BN plus a shortcut, then ReLU.

    The shortcut is the identity, or a strided 1x1 convolution with BatchNorm
    (``downsample``) when the block changes the width or the resolution, as in
    torchvision's ``BasicBlock``.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the block's input and output.
    stride : int, default=1
        Stride of the first convolution (and of the shortcut's).

    Examples
    --------
    >>> import torch
    >>> from skinfluence.datasets import BasicBlock
    >>> block = BasicBlock(4, 8, stride=2)
    >>> block(torch.zeros(1, 4, 16, 16)).shape, type(block.downsample[1]).__name__
    (torch.Size([1, 8, 8, 8]), 'BatchNorm2d')
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class SmallResNet(nn.Module):
    """A ResNet with the layout of torchvision's ``resnet18``, scaled down.

    A stem (3x3 convolution, BatchNorm, ReLU), one :class:`BasicBlock` per stage
    (``layer1`` keeps the width, each later stage doubles it and halves the
    resolution), global average pooling and a linear head ``fc``. Module names
    follow torchvision's, so ``params=["layer2", "fc"]`` or freezing ``conv1``,
    ``bn1`` and ``layer1`` means the same on both.

    Parameters
    ----------
    width : int, default=8
        Channels of the stem and of ``layer1``.
    stages : int, default=2
        Number of stages (blocks).
    num_classes : int, default=2
        Outputs of ``fc`` (logits).
    in_channels : int, default=3
        Channels of the input images.
    stem_stride : int, default=1
        Stride of the stem's convolution; 4 brings 64x64 images down to 16x16 at
        once (torchvision's stem does the same with a strided 7x7 convolution and a
        max pool).

    Examples
    --------
    >>> import torch
    >>> from skinfluence.datasets import SmallResNet
    >>> net = SmallResNet(width=4)
    >>> net(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 2])
    >>> sum(p.numel() for p in net.parameters())
    1382
    """

    def __init__(self, width: int = 8, stages: int = 2, num_classes: int = 2,
                 in_channels: int = 3, stem_stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        channels = width
        for k in range(1, stages + 1):
            out = width * 2 ** (k - 1)
            setattr(self, f"layer{k}", BasicBlock(channels, out, 1 if k == 1 else 2))
            channels = out
        self.stages = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for k in range(1, self.stages + 1):
            x = getattr(self, f"layer{k}")(x)
        return self.fc(self.avgpool(x).flatten(1))
