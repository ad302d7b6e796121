"""Label flipping and the synthetic blobs."""

import numpy as np
import pytest

from skinfluence.datasets import flip_labels, make_blobs_2d


def test_flips_the_requested_share_and_reports_it():
    y = np.repeat(np.arange(4), 50)
    y_before = y.copy()
    y_noisy, flipped = flip_labels(y, 0.15, random_state=0)
    np.testing.assert_array_equal(y, y_before)  # input untouched
    assert flipped.dtype == bool and flipped.sum() == 30
    np.testing.assert_array_equal(flipped, y_noisy != y)  # every flip changes the label
    assert set(np.unique(y_noisy)) <= set(np.unique(y))


def test_uniform_flips_reach_every_other_class_evenly():
    y = np.repeat(np.arange(3), 2000)
    y_noisy, flipped = flip_labels(y, 0.5, random_state=1)
    for a in range(3):
        new = y_noisy[flipped & (y == a)]
        shares = np.bincount(new, minlength=3) / len(new)
        assert shares[a] == 0
        np.testing.assert_allclose(np.delete(shares, a), 0.5, atol=0.05)


def test_class_conditional_noise_follows_the_matrix():
    y = np.array(["cat", "dog", "owl"] * 100)
    # classes in sorted order: cat -> dog only, dog -> owl only, owl -> cat or dog 1:3
    T = [[0, 1, 0], [0, 0, 1], [1, 3, 0]]
    y_noisy, flipped = flip_labels(y, 0.4, noise_matrix=T, random_state=0)
    assert flipped.sum() == 120
    assert set(y_noisy[flipped & (y == "cat")]) == {"dog"}
    assert set(y_noisy[flipped & (y == "dog")]) == {"owl"}
    owl = y_noisy[flipped & (y == "owl")]
    assert set(owl) <= {"cat", "dog"} and (owl == "dog").mean() > 0.5


def test_random_state_reproduces():
    y = np.arange(100) % 5
    a = flip_labels(y, 0.2, random_state=3)
    b = flip_labels(y, 0.2, random_state=3)
    c = flip_labels(y, 0.2, random_state=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fraction": 1.0}, "fraction"),
        ({"fraction": -0.1}, "fraction"),
        ({"noise_matrix": [[0, 1], [1, 0]]}, "noise_matrix"),
        ({"noise_matrix": [[0, 1, 0], [0, 0, 0], [1, 0, 0]]}, "every row"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flip_labels(np.arange(30) % 3, **kwargs)


def test_single_class_and_2d_labels_are_refused():
    with pytest.raises(ValueError, match="two classes"):
        flip_labels(np.zeros(10), 0.1)
    with pytest.raises(ValueError, match="1-dimensional"):
        flip_labels(np.zeros((10, 2)), 0.1)


def test_blobs_centres_and_spread():
    X, y = make_blobs_2d(4000, separation=2.0, scale=0.3, random_state=0)
    assert X.shape == (4000, 2) and set(np.unique(y)) == {0, 1}
    np.testing.assert_allclose(X[y == 0].mean(0), [-1, -1], atol=0.03)
    np.testing.assert_allclose(X[y == 1].mean(0), [1, 1], atol=0.03)
    np.testing.assert_allclose(X[y == 1].std(0), 0.3, atol=0.02)


def test_a_series_keeps_its_index_name_and_dtype():
    pd = pytest.importorskip("pandas")
    y = pd.Series(np.repeat(["cat", "dog", "owl"], 20), index=np.arange(100, 160), name="animal")
    y_noisy, flipped = flip_labels(y, 0.25, random_state=0)
    assert isinstance(y_noisy, pd.Series) and isinstance(flipped, pd.Series)
    pd.testing.assert_index_equal(y_noisy.index, y.index)
    pd.testing.assert_index_equal(flipped.index, y.index)
    assert y_noisy.name == "animal" and y_noisy.dtype == y.dtype
    assert flipped.dtype == bool and int(flipped.sum()) == 15
    pd.testing.assert_series_equal(flipped, (y_noisy != y).rename("flipped"))
    # the same flips as for the plain array
    a_noisy, a_flipped = flip_labels(y.to_numpy(), 0.25, random_state=0)
    np.testing.assert_array_equal(y_noisy.to_numpy(), a_noisy)
    np.testing.assert_array_equal(flipped.to_numpy(), a_flipped)


def test_two_class_images_squares_are_filled_and_rings_hollow():
    from skinfluence.datasets import make_two_class_images

    X, y = make_two_class_images(40, size=16, noise=0.0, random_state=3)
    X2, y2 = make_two_class_images(40, size=16, noise=0.0, random_state=3)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    assert X.shape == (40, 3, 16, 16) and set(y.tolist()) == {0, 1}
    for img, label in zip(X, y, strict=True):
        lit = img[0] > 0
        rows, cols = np.nonzero(lit)
        box = lit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() == (label == 0)  # a square fills its box, a ring leaves a hole
    with pytest.raises(ValueError, match="size must be at least 8"):
        make_two_class_images(4, size=6)
