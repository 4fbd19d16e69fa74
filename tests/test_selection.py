"""Class-balanced random selection: exact counts, determinism, bad keep fractions."""

import numpy as np
import pytest

from kdprune_jax.errors import ConfigError
from kdprune_jax.selection import class_keep_counts, load_subset, random_balanced, save_subset


def test_counts_are_exact_and_sum_to_rounded_total():
    labels = np.repeat(np.arange(3), [10, 7, 3])
    for f in [0.05, 0.1, 0.33, 0.5, 0.77, 1.0]:
        counts = class_keep_counts(labels, f, 3) if f * 3 >= 1 - 1e-9 else None
        if counts is None:
            continue
        assert counts.sum() == round(f * 20)
        assert np.all(np.abs(counts - f * np.array([10, 7, 3])) < 1.0)
    np.testing.assert_array_equal(class_keep_counts(labels, 0.5, 3), [5, 4, 1])
    np.testing.assert_array_equal(class_keep_counts(labels, 1.0, 3), [10, 7, 3])


@pytest.mark.parametrize("f", [0.0, -0.1, 1.5])
def test_keep_fraction_outside_range(f):
    with pytest.raises(ConfigError, match=r"prune\.keep_fraction.*\(0, 1\]"):
        class_keep_counts(np.array([0, 1]), f, 2)


def test_empty_class_is_refused_with_the_minimum_fraction():
    labels = np.repeat(np.arange(2), [100, 4])
    with pytest.raises(ConfigError, match="class 1 would keep none.*>= 0.25"):
        class_keep_counts(labels, 0.1, 2)


def test_random_balanced_exact_per_class_and_seeded(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 1000).astype(np.int32)
    pool = np.setdiff1d(np.arange(1000), np.arange(0, 1000, 20))  # a val split removed
    a = random_balanced(labels, pool, 0.3, 5, seed=7)
    b = random_balanced(labels, pool, 0.3, 5, seed=7)
    c = random_balanced(labels, pool, 0.3, 5, seed=8)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert np.all(np.isin(a.indices, pool)) and len(np.unique(a.indices)) == len(a.indices)
    np.testing.assert_array_equal(np.bincount(labels[a.indices], minlength=5), a.class_counts)
    np.testing.assert_array_equal(a.class_counts, class_keep_counts(labels[pool], 0.3, 5))
    save_subset(tmp_path / "subset.json", a)
    back = load_subset(tmp_path / "subset.json")
    np.testing.assert_array_equal(back.indices, a.indices)
    assert back.keep_fraction == 0.3 and back.seed == 7 and back.method == "random"


def test_global_mode_keeps_rounded_total():
    labels = np.repeat(np.arange(2), [90, 10]).astype(np.int32)
    s = random_balanced(labels, np.arange(100), 0.25, 2, seed=0, balanced=False)
    assert len(s.indices) == 25 and s.class_counts.sum() == 25


def test_random_selection_is_uniform_within_class():
    # Each pool example of a class is kept with probability counts_c / n_c.
    labels = np.repeat(np.arange(2), [40, 20]).astype(np.int32)
    hits = np.zeros(60)
    for seed in range(400):
        hits[random_balanced(labels, np.arange(60), 0.5, 2, seed=seed).indices] += 1
    freq = hits / 400
    assert np.all(np.abs(freq - 0.5) < 0.12), freq
