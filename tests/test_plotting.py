"""skinfluence.plotting: every figure renders to a file without a display and shows
what its data say (the right samples, bar heights, counts, correlations)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy.stats import rankdata

from skinfluence.plotting import (
    agreement,
    plot_agreement,
    plot_feature_influence,
    plot_influence_by_label,
    plot_influence_scatter,
    plot_top_influential,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _render(fig, path):
    fig.savefig(path, dpi=60)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    return data


def test_agreement_matches_textbook_formulas():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(7, 9))
    a = e + 0.5 * rng.normal(size=(7, 9))
    s = agreement(a, e)
    x, y = a.ravel(), e.ravel()
    pearson = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(
        ((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum()
    )
    rx, ry = rankdata(x), rankdata(y)
    spearman = np.corrcoef(rx, ry)[0, 1]
    assert s["n"] == 63
    assert s["pearson"] == pytest.approx(pearson, rel=1e-12)
    assert s["spearman"] == pytest.approx(spearman, rel=1e-12)

    # top-k keeps the entries largest in |exact|, whatever their sign
    e1 = np.array([0.1, -5.0, 0.2, 4.0, -0.3, 3.0])
    a1 = np.array([9.0, -5.0, -9.0, 4.0, 9.0, 3.5])  # noise only off the top 3
    assert agreement(a1, e1, top=3)["pearson"] == pytest.approx(
        np.corrcoef([-5.0, 4.0, 3.5], [-5.0, 4.0, 3.0])[0, 1]
    )
    assert agreement(a1, e1)["pearson"] < 0.6


def test_agreement_rejects_bad_input():
    with pytest.raises(ValueError, match="approx has 3 entries but exact has 2"):
        agreement([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        agreement([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="top must be at least 2"):
        agreement([1, 2, 3], [1, 2, 3], top=1)


def test_influence_by_label_hist_counts_each_group(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], [50, 30, 20])
    values = rng.normal(size=100) + (labels == "c") * 4
    ax = plot_influence_by_label(values, labels, log=True, bins=15)
    # one filled histogram per label (the outlines are separate patches)
    filled = ax.containers
    assert [int(sum(p.get_height() for p in c)) for c in filled] == [50, 30, 20]
    assert ax.get_yscale() == "log"
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["a (n=50)", "b (n=30)", "c (n=20)"]
    _render(ax.figure, tmp_path / "hist.png")


def test_influence_by_label_strip_and_names(tmp_path):
    values = np.arange(12.0)
    labels = np.array([2, 0, 1] * 4)
    ax = plot_influence_by_label(values, labels, kind="strip", label_names=["zero", "one", "two"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["zero", "one", "two"]
    # the dots of label 2 sit in row 2 and hold exactly that label's values
    dots = ax.collections[2].get_offsets()
    assert np.allclose(np.sort(dots[:, 0]), values[labels == 2])
    assert np.all(np.abs(dots[:, 1] - 2) <= 0.2)
    _render(ax.figure, tmp_path / "strip.png")
    with pytest.raises(ValueError, match="kind must be"):
        plot_influence_by_label(values, labels, kind="violin")
    with pytest.raises(ValueError, match="values has 12 entries but labels has 3"):
        plot_influence_by_label(values, labels[:3])
    with pytest.raises(ValueError, match="1-dimensional"):
        plot_influence_by_label(np.ones((2, 6)), labels)


def test_top_influential_images_pick_the_extremes(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.normal(size=40)
    X = rng.random((40, 64))
    fig = plot_top_influential(values, X, n=4, labels=np.arange(40) % 10, image_shape=(8, 8),
                               reference=X[0])
    axes = np.array(fig.axes).reshape(2, 5)
    shown_top = [int(a.get_title().split()[0][1:]) for a in axes[0, 1:]]
    shown_bottom = [int(a.get_title().split()[0][1:]) for a in axes[1, 1:]]
    assert shown_top == list(np.argsort(values)[::-1][:4])
    assert shown_bottom == list(np.argsort(values)[:4])
    # each panel shows the sample itself, reshaped
    i = shown_top[0]
    assert np.array_equal(axes[0, 1].images[0].get_array(), X[i].reshape(8, 8))
    _render(fig, tmp_path / "grid.png")
    # the rows say what they show: the largest influences help, the smallest harm
    assert [axes[r, 1].get_ylabel() for r in (0, 1)] == ["most helpful", "most harmful"]
    assert (values[shown_bottom] < 0).all()
    assert "least" not in fig.get_suptitle()
    assert "most harmful" in fig.get_suptitle()

    fig = plot_top_influential(values, X, n=4, image_shape=(8, 8), reference=X[0],
                               reference_label="seven")
    axes = np.array(fig.axes).reshape(2, 5)
    assert axes[0, 0].get_title() == axes[1, 0].get_title() == "test point\nlabel seven"
    assert fig.get_suptitle().endswith("for a test point of label seven")

    fig = plot_top_influential(values, X.reshape(40, 8, 8), n=2)  # 3-d input: images too
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="image_shape"):
        plot_top_influential(values, X, image_shape=(7, 7))
    with pytest.raises(ValueError, match="n must be between 1 and"):
        plot_top_influential(values, X, n=0)


def test_top_influential_table_rows(tmp_path):
    values = np.array([0.5, -2.0, 3.0, 0.0, -1.0])
    X = np.arange(15.0).reshape(5, 3)
    fig = plot_top_influential(values, X, n=2, labels=list("abcde"),
                               feature_names=["f0", "f1", "f2"])
    table = fig.axes[0].tables[0]
    cells = table.get_celld()
    header = [cells[0, c].get_text().get_text() for c in range(7)]
    assert header == ["rank", "index", "influence", "label", "f0", "f1", "f2"]
    index_col = [cells[r, 1].get_text().get_text() for r in range(1, 5)]
    assert index_col == ["2", "0", "1", "4"]  # top 2 then bottom 2
    assert cells[1, 4].get_text().get_text() == "6"  # row 2, first feature
    ranks = [cells[r, 0].get_text().get_text() for r in range(1, 5)]
    assert ranks == ["helpful 1", "helpful 2", "harmful 1", "harmful 2"]
    assert fig.axes[0].get_title() == "most helpful and most harmful samples"
    _render(fig, tmp_path / "table.png")
    fig = plot_top_influential(values, X, n=1, reference_label=3)
    assert fig.axes[0].get_title() == "most helpful and most harmful samples for a test point of label 3"
    with pytest.raises(ValueError, match="feature_names has 2 names"):
        plot_top_influential(values, X, feature_names=["a", "b"])


def test_agreement_scatter_reports_correlations(tmp_path):
    rng = np.random.default_rng(0)
    exact = rng.standard_t(3, size=300)
    approx = exact + 0.3 * rng.normal(size=300)
    ax = plot_agreement(approx, exact, top=20, name="LiSSA")
    full, top = agreement(approx, exact), agreement(approx, exact, top=20)
    title = ax.get_title()
    assert f"Pearson {full['pearson']:.3f}" in title
    assert f"top 20: Pearson {top['pearson']:.3f}, Spearman {top['spearman']:.3f}" in title
    # the highlighted points are the 20 largest |exact|
    hi = ax.collections[1].get_offsets()
    assert np.allclose(np.sort(np.abs(hi[:, 0])), np.sort(np.abs(exact))[-20:])
    _render(ax.figure, tmp_path / "agree.png")
    ax = plot_agreement(approx, exact, top=None)
    assert len(ax.collections) == 1


def test_feature_influence_bars_are_means(tmp_path):
    rng = np.random.default_rng(0)
    pert = rng.normal(size=(3, 25, 4))
    ax = plot_feature_influence(pert, ["a", "b", "c", "d"], sort=False)
    heights = [p.get_width() for p in ax.patches]
    assert np.allclose(heights, pert.mean(axis=(0, 1)))
    ax2 = plot_feature_influence(pert, ["a", "b", "c", "d"])
    names = [t.get_text() for t in ax2.get_yticklabels()]
    assert names == [list("abcd")[j] for j in np.argsort(pert.mean(axis=(0, 1)))]
    _render(ax2.figure, tmp_path / "bars.png")
    # whiskers are standard errors of the mean
    err = ax.containers[0].lines[2][0].get_segments()
    sem = pert.reshape(-1, 4).std(0, ddof=1) / np.sqrt(75)
    assert np.allclose([seg[1, 0] - seg[0, 0] for seg in err], 2 * sem)
    # the figure says what it shows and what the whiskers are
    assert ax.get_title() == "feature influence (perturbation mode)"
    assert "whiskers: standard error of the mean" in ax.get_xlabel()
    assert "over 75 values" in ax.get_xlabel()
    assert plot_feature_influence(pert, title=None).get_title() == ""
    ax3 = plot_feature_influence(-np.abs(pert), absolute=True, sort=False)
    assert np.allclose([p.get_width() for p in ax3.patches], np.abs(pert).mean(axis=(0, 1)))
    with pytest.raises(ValueError, match="feature_names has 2 names"):
        plot_feature_influence(pert, ["a", "b"])


def test_influence_scatter_boundary_and_circles(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 2))
    values = X[:, 0] - X[:, 1]
    circled = np.zeros(80, bool)
    circled[[3, 7, 11]] = True
    ax = plot_influence_scatter(X, values, circled=circled, boundary=lambda P: P[:, 0] + P[:, 1])
    circles = ax.collections[1].get_offsets()
    assert np.allclose(circles, X[[3, 7, 11]])
    # the drawn zero level of x0 + x1 lies on the anti-diagonal
    cs = [c for c in ax.collections[2:] if hasattr(c, "get_paths") and c.get_paths()]
    verts = np.concatenate([p.vertices for p in cs[-1].get_paths()])
    assert np.allclose(verts[:, 0] + verts[:, 1], 0.0, atol=0.05)
    # colours are centred on zero
    pts = ax.collections[0]
    assert pts.norm.vcenter == 0.0 and pts.norm.vmin == -pts.norm.vmax
    _render(ax.figure, tmp_path / "scatter.png")


def test_influence_scatter_accepts_estimator_boundary(tmp_path):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 2))
    y = (X[:, 0] > 0).astype(int)
    model = LogisticRegression().fit(X, y)
    ax = plot_influence_scatter(X, rng.normal(size=100), boundary=model, robust=False)
    _render(ax.figure, tmp_path / "est.png")
    with pytest.raises(ValueError, match="shape \\(n_samples, 2\\)"):
        plot_influence_scatter(rng.normal(size=(10, 3)), np.ones(10))
    with pytest.raises(ValueError, match="boundary must be"):
        plot_influence_scatter(X, np.ones(100), boundary=object())
