"""Figures for influence values: distributions, extremes, agreement, features, 2-d data.

Every function takes plain numpy arrays (what the scorers return), draws on a given
matplotlib ``Axes`` or a new figure, and returns what it drew on, so figures compose
and can be saved with ``fig.savefig``. matplotlib is an optional dependency:
``pip install "skinfluence[plot]"``.

Nothing here selects a matplotlib backend; scripts that only save files may call
``matplotlib.use("Agg")`` before importing ``matplotlib.pyplot``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

try:
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
    raise ImportError(
        "skinfluence.plotting needs matplotlib; install it with "
        "`pip install \"skinfluence[plot]\"` (or `pip install matplotlib`)."
    ) from exc

__all__ = [
    "agreement",
    "plot_agreement",
    "plot_feature_influence",
    "plot_influence_by_label",
    "plot_influence_scatter",
    "plot_top_influential",
]

# Colour-blind friendly, distinct in greyscale too (Okabe & Ito).
_PALETTE = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
    "#000000", "#999999", "#882255",
]


# matplotlib 3.10 renamed ``vert=False`` to ``orientation="horizontal"``.
_HORIZONTAL = (
    {"orientation": "horizontal"}
    if tuple(int(p) for p in matplotlib.__version__.split(".")[:2]) >= (3, 10)
    else {"vert": False}
)


def _as_1d(values, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 1:
        raise ValueError(
            f"{name} must be 1-dimensional (one value per sample), got shape {v.shape}; "
            "reduce an influence matrix first, e.g. I.mean(axis=0) for the mean "
            "influence of each training point."
        )
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or infinity; plot finite influences only.")
    return v


def _new_axes(ax: Axes | None, figsize=(6.0, 4.0)) -> Axes:
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(
            f"{name_a} has {len(a)} entries but {name_b} has {len(b)}; pass one per sample."
        )


# --------------------------------------------------------------------------- numbers
def agreement(approx, exact, *, top: int | None = None) -> dict:
    """Pearson and Spearman correlation between approximate and exact influences.

    Parameters
    ----------
    approx : array-like
        Influences from an approximate method (any shape; flattened).
    exact : array-like
        The reference influences, same shape as ``approx``.
    top : int, default=None
        If given, only the ``top`` entries largest in absolute value of ``exact``
        are compared: agreement where it matters most, on the influential points.

    Returns
    -------
    stats : dict
        ``{"pearson": float, "spearman": float, "n": int}``, where ``n`` is the number
        of entries compared.

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.plotting import agreement
    >>> exact = np.array([3.0, -1.0, 0.5, 2.0, -4.0])
    >>> stats = agreement(exact * 2 + 1, exact)
    >>> round(stats["pearson"], 6), round(stats["spearman"], 6), stats["n"]
    (1.0, 1.0, 5)
    >>> agreement(exact ** 3, exact, top=3)["spearman"]
    1.0
    """
    from scipy.stats import pearsonr, spearmanr

    a = np.asarray(approx, dtype=float).ravel()
    e = np.asarray(exact, dtype=float).ravel()
    if a.shape != e.shape:
        raise ValueError(
            f"approx has {a.size} entries but exact has {e.size}; compare influences "
            "computed on the same test and training points."
        )
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        raise ValueError("approx and exact must be finite; an approximation produced NaN or inf.")
    if top is not None:
        if not 2 <= top:
            raise ValueError(f"top must be at least 2 to compute a correlation, got {top}.")
        idx = np.argsort(-np.abs(e), kind="stable")[:top]
        a, e = a[idx], e[idx]
    if a.size < 2:
        raise ValueError("agreement needs at least two entries to correlate.")
    return {
        "pearson": float(pearsonr(a, e)[0]),
        "spearman": float(spearmanr(a, e)[0]),
        "n": int(a.size),
    }


# --------------------------------------------------------------------------- plots
def plot_influence_by_label(
    values,
    labels,
    *,
    kind: str = "hist",
    label_names: dict | Sequence | None = None,
    bins: int = 30,
    log: bool = False,
    ax: Axes | None = None,
) -> Axes:
    """Distribution of influence values, one colour per label.

    Use it for the influence of every training point on one test point grouped by
    the training points' class, or for the mean influence of each training point
    grouped by whether its label was flipped.

    Parameters
    ----------
    values : array-like of shape (n_samples,)
        One influence per sample, e.g. a row of the influence matrix or its mean over
        test points ``I.mean(axis=0)``.
    labels : array-like of shape (n_samples,)
        The group of each sample (class labels, or a bool mask such as the flipped
        points).
    kind : {"hist", "strip"}, default="hist"
        "hist": overlaid histograms on shared bins, best for a few groups. "strip":
        one row per label with every sample as a jittered dot over a box plot, best
        for many groups (e.g. ten digit classes).
    label_names : dict or sequence, default=None
        Display names: a dict from label to name, or a sequence in the order of the
        sorted unique labels. None shows the labels themselves.
    bins : int, default=30
        Number of histogram bins (``kind="hist"``).
    log : bool, default=False
        Logarithmic count axis (``kind="hist"``), so that rare extreme values stay
        visible next to the bulk.
    ax : matplotlib Axes, default=None
        Where to draw; None makes a new figure.

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.plotting import plot_influence_by_label
    >>> rng = np.random.default_rng(0)
    >>> flipped = np.arange(100) < 10
    >>> values = rng.normal(size=100) - 3 * flipped
    >>> ax = plot_influence_by_label(values, flipped, label_names={False: "clean",
    ...                              True: "flipped"}, log=True)
    >>> [t.get_text() for t in ax.get_legend().get_texts()]
    ['clean (n=90)', 'flipped (n=10)']
    >>> ax = plot_influence_by_label(values, rng.integers(0, 3, 100), kind="strip")
    >>> [t.get_text() for t in ax.get_yticklabels()]
    ['0', '1', '2']
    """
    v = _as_1d(values, "values")
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-dimensional, got shape {lab.shape}.")
    _check_same_length(v, lab, "values", "labels")
    if kind not in ("hist", "strip"):
        raise ValueError(f"kind must be 'hist' or 'strip', got {kind!r}.")
    uniq = np.unique(lab)
    if isinstance(label_names, dict):
        names = [str(label_names.get(u, label_names.get(u.item(), u))) for u in uniq]
    elif label_names is not None:
        if len(label_names) != len(uniq):
            raise ValueError(
                f"label_names has {len(label_names)} entries but labels has {len(uniq)} "
                "distinct values; give one name per sorted unique label."
            )
        names = [str(n) for n in label_names]
    else:
        names = [str(u.item() if hasattr(u, "item") else u) for u in uniq]

    ax = _new_axes(ax)
    if kind == "hist":
        edges = np.histogram_bin_edges(v, bins=bins)
        for k, (u, name) in enumerate(zip(uniq, names, strict=True)):
            sel = v[lab == u]
            color = _PALETTE[k % len(_PALETTE)]
            ax.hist(sel, bins=edges, color=color, alpha=0.35, log=log)
            ax.hist(sel, bins=edges, color=color, histtype="step", lw=1.5, log=log,
                    label=f"{name} (n={sel.size})")
        ax.set_xlabel("influence")
        ax.set_ylabel("count (log scale)" if log else "count")
        ax.legend(frameon=False)
    else:
        rng = np.random.default_rng(0)  # fixed jitter: the same data draws the same figure
        groups = [v[lab == u] for u in uniq]
        ax.boxplot(groups, positions=np.arange(len(uniq)), widths=0.6, showfliers=False,
                   medianprops={"color": "black"}, **_HORIZONTAL)
        for k, g in enumerate(groups):
            jitter = rng.uniform(-0.2, 0.2, g.size)
            ax.scatter(g, k + jitter, s=8, alpha=0.6, color=_PALETTE[k % len(_PALETTE)],
                       linewidths=0)
        ax.set_yticks(np.arange(len(uniq)), names)
        ax.set_xlabel("influence")
        ax.set_ylabel("label")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    return ax


def plot_top_influential(
    values,
    X,
    *,
    n: int = 5,
    labels=None,
    image_shape: tuple | None = None,
    reference=None,
    reference_label=None,
    feature_names: Sequence[str] | None = None,
    max_features: int = 6,
    cmap: str = "gray_r",
) -> Figure:
    """The most helpful and the most harmful samples, as images or as table rows.

    "Most helpful" are the ``n`` largest influences (the samples whose removal would
    raise the test loss most), "most harmful" the ``n`` smallest, most negative ones
    (those whose removal would lower it most). The rows are ranks: when fewer than
    ``n`` influences are negative, the harmful row ends with the least helpful ones;
    the sign of each value is printed with it.

    Parameters
    ----------
    values : array-like of shape (n_samples,)
        One influence per sample, e.g. the row of the influence matrix for one test
        point.
    X : array-like of shape (n_samples, n_features) or (n_samples, h, w)
        The samples. Images are drawn when ``image_shape`` is given or ``X`` is 3-d
        (or 4-d with one channel); colour images of shape (n_samples, 3, h, w), as
        torch's ``nn.Conv2d`` takes them, are drawn in colour, each scaled to its own
        range. Otherwise rows are shown as a table.
    n : int, default=5
        How many samples to show at each end.
    labels : array-like of shape (n_samples,), default=None
        Labels shown with each sample.
    image_shape : tuple of int, default=None
        ``(h, w)`` to reshape flat rows of ``X`` into images.
    reference : array-like, default=None
        The test sample the influences are on, drawn first in each row (images only).
    reference_label : object, default=None
        The label of that test sample (e.g. its true class), shown with it and in the
        figure's title, so that helpful and harmful samples can be read against it.
    feature_names : sequence of str, default=None
        Column headers of the table (tabular data only).
    max_features : int, default=6
        Columns of ``X`` shown in the table; the first ones are kept.
    cmap : str, default="gray_r"
        Colormap of the images.

    Returns
    -------
    fig : matplotlib Figure

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.plotting import plot_top_influential
    >>> rng = np.random.default_rng(0)
    >>> X, values = rng.random((20, 64)), rng.normal(size=20)
    >>> fig = plot_top_influential(values, X, n=3, labels=np.arange(20), image_shape=(8, 8),
    ...                            reference=X[0], reference_label=7)
    >>> len(fig.axes)
    8
    >>> fig.axes[0].get_title().splitlines()
    ['test point', 'label 7']
    >>> [fig.axes[c].get_ylabel() for c in (1, 5)]
    ['most helpful', 'most harmful']
    >>> rgb = rng.random((20, 3, 8, 8))  # colour images, channels first
    >>> fig = plot_top_influential(values, rgb, n=2, reference=rgb[0])
    >>> fig.axes[1].get_images()[0].get_array().shape
    (8, 8, 3)
    >>> fig = plot_top_influential(values, X[:, :4], n=2, feature_names=list("abcd"))
    >>> fig.axes[0].get_title()
    'most helpful and most harmful samples'
    """
    v = _as_1d(values, "values")
    X = np.asarray(X)
    _check_same_length(v, X, "values", "X")
    if not 1 <= n <= len(v):
        raise ValueError(f"n must be between 1 and the number of samples ({len(v)}), got {n}.")
    order = np.argsort(-v, kind="stable")
    top, bottom = order[:n], order[::-1][:n]
    lab = None if labels is None else np.asarray(labels)
    if lab is not None:
        _check_same_length(v, lab, "values", "labels")

    colour = image_shape is None and X.ndim == 4 and X.shape[1] == 3
    as_images = image_shape is not None or X.ndim == 3 or (X.ndim == 4 and X.shape[1] == 1)
    if colour:
        X = _rgb(X)
        reference = None if reference is None else _rgb(np.asarray(reference)[None])[0]
        shape = X.shape[1:]
    if as_images or colour:
        if not colour:
            shape = tuple(image_shape) if image_shape is not None else X.shape[-2:]
        if int(np.prod(shape)) != int(np.prod(X.shape[1:])):
            raise ValueError(
                f"image_shape {shape} does not match samples of {int(np.prod(X.shape[1:]))} "
                "values; pass the (height, width) of one image."
            )
        ncols = n + (reference is not None)
        fig, axes = plt.subplots(2, ncols, figsize=(1.5 * ncols + 0.5, 3.6), layout="constrained",
                                 squeeze=False)
        rows = [(top, "most helpful"), (bottom, "most harmful")]
        ref_title = "test point" if reference_label is None else f"test point\nlabel {reference_label}"
        for r, (idx, title) in enumerate(rows):
            col0 = 0
            if reference is not None:
                a = axes[r, 0]
                a.imshow(np.asarray(reference).reshape(shape), cmap=cmap)
                a.set_title(ref_title, fontsize=9)
                col0 = 1
            for c, i in enumerate(idx):
                a = axes[r, col0 + c]
                a.imshow(X[i].reshape(shape), cmap=cmap)
                head = f"#{i}" if lab is None else f"#{i} label {lab[i]}"
                a.set_title(f"{head}\n{v[i]:+.3g}", fontsize=8)
            axes[r, col0].set_ylabel(title, fontsize=9)
        for a in axes.ravel():
            a.set_xticks([])
            a.set_yticks([])
        fig.suptitle("most helpful (top row) and most harmful (bottom row) samples"
                     + _for_label(reference_label), fontsize=10)
        return fig

    X2 = X.reshape(len(X), -1)
    k = min(max_features, X2.shape[1])
    if feature_names is not None and len(feature_names) != X2.shape[1]:
        raise ValueError(
            f"feature_names has {len(feature_names)} names but X has {X2.shape[1]} features."
        )
    heads = list(feature_names[:k]) if feature_names is not None else [f"x{j}" for j in range(k)]
    cols = ["rank", "index", "influence"] + (["label"] if lab is not None else []) + heads
    rows = []
    for name, idx in (("helpful", top), ("harmful", bottom)):
        for r, i in enumerate(idx):
            row = [f"{name} {r + 1}", str(i), f"{v[i]:+.3g}"]
            if lab is not None:
                row.append(str(lab[i]))
            rows.append(row + [f"{x:.3g}" for x in X2[i, :k]])
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 1, 0.3 * len(rows) + 1.0),
                           layout="constrained")
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=cols, loc="center", cellLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for r in range(len(rows)):  # green for helpful, red for harmful rows
        shade = "#e5f5e0" if r < n else "#fde0dd"
        for c in range(len(cols)):
            table[r + 1, c].set_facecolor(shade)
    ax.set_title("most helpful and most harmful samples" + _for_label(reference_label))
    return fig


def _rgb(X: np.ndarray) -> np.ndarray:
    """Channels-first colour images -> channels last, each scaled to [0, 1]."""
    X = np.moveaxis(np.asarray(X, dtype=float), 1, -1)
    low = X.min(axis=(1, 2, 3), keepdims=True)
    span = X.max(axis=(1, 2, 3), keepdims=True) - low
    return (X - low) / np.where(span > 0, span, 1.0)


def _for_label(reference_label) -> str:
    return "" if reference_label is None else f" for a test point of label {reference_label}"


def plot_agreement(
    approx,
    exact,
    *,
    top: int | None = 20,
    name: str = "approximate",
    reference_name: str = "Direct",
    ax: Axes | None = None,
) -> Axes:
    """Scatter of approximate against exact influences, with their correlations.

    Parameters
    ----------
    approx : array-like
        Influences from the approximate method (any shape; flattened).
    exact : array-like
        Reference influences of the same shape.
    top : int, default=20
        Also mark the ``top`` entries largest in absolute value of ``exact`` and
        report the correlations on them alone; None skips this.
    name : str, default="approximate"
        Name of the approximate method (y axis).
    reference_name : str, default="Direct"
        Name of the reference (x axis).
    ax : matplotlib Axes, default=None
        Where to draw; None makes a new figure.

    Returns
    -------
    ax : matplotlib Axes
        The title holds Pearson and Spearman correlations (all entries, and the top
        ones).

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.plotting import plot_agreement
    >>> rng = np.random.default_rng(0)
    >>> exact = rng.normal(size=200)
    >>> ax = plot_agreement(exact + 0.01 * rng.normal(size=200), exact, name="CG")
    >>> ax.get_ylabel()
    'CG'
    >>> "Pearson 1.000" in ax.get_title()
    True
    """
    a = np.asarray(approx, dtype=float).ravel()
    e = np.asarray(exact, dtype=float).ravel()
    stats = agreement(a, e)
    ax = _new_axes(ax, figsize=(4.5, 4.2))
    ax.scatter(e, a, s=10, alpha=0.5, color=_PALETTE[0], linewidths=0, label="all")
    title = f"{name} vs {reference_name}\nall: Pearson {stats['pearson']:.3f}, " \
            f"Spearman {stats['spearman']:.3f}"
    if top is not None and top < e.size:
        idx = np.argsort(-np.abs(e), kind="stable")[:top]
        st = agreement(a, e, top=top)
        ax.scatter(e[idx], a[idx], s=28, facecolors="none", edgecolors=_PALETTE[1],
                   label=f"top {top} by |{reference_name}|")
        title += f"\ntop {top}: Pearson {st['pearson']:.3f}, Spearman {st['spearman']:.3f}"
        ax.legend(frameon=False, loc="upper left", fontsize=8)
    lo, hi = float(min(e.min(), a.min())), float(max(e.max(), a.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(reference_name)
    ax.set_ylabel(name)
    ax.set_title(title, fontsize=9)
    return ax


def plot_feature_influence(
    influences,
    feature_names: Sequence[str] | None = None,
    *,
    absolute: bool = False,
    sort: bool = True,
    title: str | None = "feature influence (perturbation mode)",
    ax: Axes | None = None,
) -> Axes:
    """Bar chart of the influence of each feature, averaged over all other axes.

    A positive bar means that moving training points along that feature (``+e_k``)
    makes them, on average, more helpful to the test points; see the perturbation
    mode in the concepts guide.

    Parameters
    ----------
    influences : array-like of shape (..., n_features)
        Perturbation-mode influences, e.g. ``(n_test, n_train, n_features)`` from a
        scorer with ``mode="perturbation"``; every axis but the last is averaged.
        A bar is the mean, its whisker the standard error of that mean.
    feature_names : sequence of str, default=None
        One name per feature; None numbers them.
    absolute : bool, default=False
        Average absolute values: how strongly the test loss responds to moving a
        feature, whatever the direction. Signed means can cancel between points.
    sort : bool, default=True
        Order the bars by mean influence.
    title : str or None, default="feature influence (perturbation mode)"
        Axes title; None leaves it empty.
    ax : matplotlib Axes, default=None
        Where to draw; None makes a new figure.

    Returns
    -------
    ax : matplotlib Axes
        Its x label says what a bar and a whisker are: the mean over the averaged
        values and the standard error of that mean.

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.plotting import plot_feature_influence
    >>> rng = np.random.default_rng(0)
    >>> pert = rng.normal(size=(4, 30, 3)) + np.array([2.0, -1.0, 0.0])
    >>> ax = plot_feature_influence(pert, ["alcohol", "ash", "hue"])
    >>> [t.get_text() for t in ax.get_yticklabels()]
    ['ash', 'hue', 'alcohol']
    >>> ax.get_title()
    'feature influence (perturbation mode)'
    >>> print(ax.get_xlabel())
    mean influence per feature (over 120 values)
    whiskers: standard error of the mean
    >>> ax = plot_feature_influence(pert, ["alcohol", "ash", "hue"], absolute=True)
    >>> [t.get_text() for t in ax.get_yticklabels()]
    ['hue', 'ash', 'alcohol']
    """
    F = np.asarray(influences, dtype=float)
    if F.ndim < 1 or F.shape[-1] == 0:
        raise ValueError(f"influences must end with a features axis, got shape {F.shape}.")
    if not np.isfinite(F).all():
        raise ValueError("influences contains NaN or infinity.")
    d = F.shape[-1]
    F2 = F.reshape(-1, d)
    if absolute:
        F2 = np.abs(F2)
    mean = F2.mean(0)
    sem = F2.std(0, ddof=1) / np.sqrt(F2.shape[0]) if F2.shape[0] > 1 else None
    names = [f"feature {j}" for j in range(d)] if feature_names is None else list(feature_names)
    if len(names) != d:
        raise ValueError(f"feature_names has {len(names)} names but influences has {d} features.")
    order = np.argsort(mean, kind="stable") if sort else np.arange(d)
    ax = _new_axes(ax, figsize=(6.0, 0.3 * d + 1.2))
    colors = [_PALETTE[2] if m >= 0 else _PALETTE[1] for m in mean[order]]
    ax.barh(np.arange(d), mean[order], xerr=None if sem is None else sem[order],
            color=colors, error_kw={"elinewidth": 0.8, "ecolor": "grey"})
    ax.set_yticks(np.arange(d), [names[j] for j in order])
    ax.axvline(0.0, color="grey", lw=0.8)
    what = "mean |influence| per feature" if absolute else "mean influence per feature"
    what += f" (over {F2.shape[0]} values)"
    if sem is not None:
        what += "\nwhiskers: standard error of the mean"
    ax.set_xlabel(what)
    if title is not None:
        ax.set_title(title)
    return ax


def plot_influence_scatter(
    X,
    values,
    *,
    circled=None,
    circled_label: str = "circled",
    boundary: Callable | object | None = None,
    robust: bool = True,
    cmap: str = "coolwarm_r",
    ax: Axes | None = None,
) -> Axes:
    """2-d training points coloured by their influence, with an optional decision boundary.

    Parameters
    ----------
    X : array-like of shape (n_samples, 2)
        Point coordinates.
    values : array-like of shape (n_samples,)
        Colour of each point, e.g. the mean influence on the test set. The colour
        scale is centred on zero: blue helps, red hurts.
    circled : array-like of bool of shape (n_samples,), default=None
        Points to circle, e.g. the ones whose label was flipped.
    circled_label : str, default="circled"
        Legend entry of the circled points, e.g. "flipped label".
    boundary : callable or estimator, default=None
        A decision boundary drawn as the zero level of ``f(points) -> values``,
        either a callable or a fitted estimator's ``decision_function``.
    robust : bool, default=True
        Set the colour range from the 2nd and 98th percentiles so that a few extreme
        points do not wash out the rest.
    cmap : str, default="coolwarm_r"
        Diverging colormap.
    ax : matplotlib Axes, default=None
        Where to draw; None makes a new figure.

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import numpy as np
    >>> from skinfluence.plotting import plot_influence_scatter
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(50, 2))
    >>> ax = plot_influence_scatter(X, X[:, 0], circled=X[:, 1] > 1.5,
    ...                             boundary=lambda P: P[:, 0] + P[:, 1])
    >>> len(ax.collections) >= 3  # points, circles, boundary
    True
    """
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[1] != 2:
        raise ValueError(
            f"X must have shape (n_samples, 2), got {X.shape}; project it to 2-d first."
        )
    v = _as_1d(values, "values")
    _check_same_length(X, v, "X", "values")
    ax = _new_axes(ax, figsize=(5.5, 4.5))
    lim = np.percentile(np.abs(v), 98) if robust else np.abs(v).max()
    lim = float(lim) if lim > 0 else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    sc = ax.scatter(X[:, 0], X[:, 1], c=np.clip(v, -lim, lim), cmap=cmap, norm=norm, s=14,
                    edgecolors="none")
    ax.figure.colorbar(sc, ax=ax, label="influence", extend="both" if robust else "neither")
    if circled is not None:
        m = np.asarray(circled, dtype=bool)
        _check_same_length(X, m, "X", "circled")
        ax.scatter(X[m, 0], X[m, 1], s=70, facecolors="none", edgecolors="black", lw=1.0,
                   label=f"{circled_label} (n={int(m.sum())})")
        ax.legend(frameon=False, loc="upper left", fontsize=8)
    if boundary is not None:
        f = boundary if callable(boundary) and not hasattr(boundary, "decision_function") \
            else getattr(boundary, "decision_function", None)
        if f is None:
            raise ValueError(
                "boundary must be a callable or a fitted estimator with decision_function."
            )
        pad = 0.05 * (X.max(0) - X.min(0))
        gx = np.linspace(X[:, 0].min() - pad[0], X[:, 0].max() + pad[0], 200)
        gy = np.linspace(X[:, 1].min() - pad[1], X[:, 1].max() + pad[1], 200)
        GX, GY = np.meshgrid(gx, gy)
        Z = np.asarray(f(np.c_[GX.ravel(), GY.ravel()]), dtype=float).reshape(GX.shape)
        ax.contour(GX, GY, Z, levels=[0.0], colors="black", linewidths=1.2, linestyles="--")
    ax.set_xlabel("x0")
    ax.set_ylabel("x1")
    return ax
