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


# ----------------------------------------------------------------- score-based rules
from kdprune_jax.selection import select_by_score  # noqa: E402


def _scored(n=600, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    scores = rng.normal(size=n) + labels  # class-dependent offsets: balance matters
    pool = np.setdiff1d(np.arange(n), np.arange(0, n, 25))
    return scores, labels, pool


@pytest.mark.parametrize("rule,direction", [("keep_end", "highest"), ("keep_end", "lowest"),
                                            ("keep_end", "middle"), ("ccs", "highest"),
                                            ("ccs", "lowest")])
@pytest.mark.parametrize("f", [0.1, 0.37, 0.8])
def test_score_rules_exact_class_counts_and_seeded(rule, direction, f):
    scores, labels, pool = _scored()
    kw = dict(method="el2n", direction=direction, rule=rule, seed=3)
    a = select_by_score(scores, labels, pool, f, 4, **kw)
    b = select_by_score(scores, labels, pool, f, 4, **kw)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.class_counts, class_keep_counts(labels[pool], f, 4))
    np.testing.assert_array_equal(np.bincount(labels[a.indices], minlength=4), a.class_counts)
    assert np.all(np.isin(a.indices, pool)) and len(set(a.indices)) == len(a.indices)


def test_rank_directions():
    scores, labels, pool = _scored()
    for c in range(4):
        members = pool[labels[pool] == c]
        s = scores[members]
        hi = select_by_score(scores, labels, pool, 0.25, 4, method="x", direction="highest")
        lo = select_by_score(scores, labels, pool, 0.25, 4, method="x", direction="lowest")
        mid = select_by_score(scores, labels, pool, 0.25, 4, method="x", direction="middle")
        k = hi.class_counts[c]
        kept = lambda sub: np.sort(scores[np.intersect1d(sub.indices, members)])  # noqa: E731
        np.testing.assert_array_equal(kept(hi), np.sort(s)[-k:])
        np.testing.assert_array_equal(kept(lo), np.sort(s)[:k])
        start = (len(s) - k) // 2
        np.testing.assert_array_equal(kept(mid), np.sort(s)[start : start + k])


def test_ccs_drops_the_hardest_and_covers_the_range():
    scores, labels, pool = _scored(n=2000, classes=1)
    sub = select_by_score(scores, labels, pool, 0.3, 1, method="el2n", direction="highest",
                          rule="ccs", ccs_hard_cutoff=0.1, ccs_strata=10)
    cut = np.quantile(scores[pool], 0.9)
    assert scores[sub.indices].max() <= cut + 1e-12  # hardest 10% never kept
    # Coverage: the kept scores span the remaining range, unlike keep-highest.
    assert scores[sub.indices].min() < np.quantile(scores[pool], 0.05)


def test_global_mode_ignores_classes():
    scores, labels, pool = _scored()
    sub = select_by_score(scores, labels, pool, 0.25, 4, method="x", direction="highest",
                          balanced=False)
    want = pool[np.argsort(scores[pool])[-len(sub.indices):]]
    np.testing.assert_array_equal(sub.indices, np.sort(want))
    assert sub.class_counts[3] > sub.class_counts[0]  # highest-offset class dominates


def test_bad_direction_and_nonfinite_scores():
    scores, labels, pool = _scored()
    with pytest.raises(ConfigError, match="prune.direction.*highest, lowest, middle"):
        select_by_score(scores, labels, pool, 0.5, 4, method="x", direction="up")
    with pytest.raises(ConfigError, match="prune.direction.*highest, lowest"):
        select_by_score(scores, labels, pool, 0.5, 4, method="x", direction="middle",
                        rule="ccs")
    bad = scores.copy()
    bad[pool[3]] = np.nan
    with pytest.raises(ConfigError, match="finite"):
        select_by_score(bad, labels, pool, 0.5, 4, method="x", direction="highest")
