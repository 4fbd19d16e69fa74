"""Index-level splits: the stratified validation split carved from train (METHOD.md §1) and
symmetric label noise. Everything here works on integer indices into a source split."""

from __future__ import annotations

import math

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """Carve a stratified `fraction` of examples out of a split.

    Class c contributes round(fraction * n_c) examples (at least 1 when fraction > 0 and
    n_c > 1), chosen by a seeded permutation.

    Args:
      labels: int [N].
      fraction: in [0, 1).
      seed: fixes the choice.
    Returns:
      (rest, carved): two sorted int64 index arrays partitioning range(N).
    """
    rng = np.random.default_rng(seed)
    carved = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        carved.append(rng.permutation(idx)[:_carved_count(len(idx), fraction)])
    carved = np.sort(np.concatenate(carved)) if carved else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[carved] = False
    return np.flatnonzero(mask), carved


def _carved_count(n: int, fraction: float) -> int:
    """How many of a class's n examples `stratified_split` carves out."""
    k = int(round(fraction * n))
    return max(k, 1) if fraction > 0 and n > 1 else k


def largest_fraction_leaving(class_sizes, m: int) -> float:
    """The largest `stratified_split` fraction, to 4 decimals, that leaves every class at
    least m examples (0.0 when only carving nothing does; callers check m <= min size).

    Error messages suggest it, so it is checked with the split's own rounding rather than
    estimated: the suggestion must work when the user takes it.
    """
    sizes = [int(n) for n in class_sizes]
    if any(1 < n <= m for n in sizes):  # any fraction > 0 carves at least one of these
        return 0.0

    def leaves(f):
        return all(n - _carved_count(n, f) >= m for n in sizes)

    # round() carves n - m while f * n < n - m + 1/2; at most a rounding tie away from it.
    f = min(0.9999, max(0.0, math.floor(min((n - m + 0.5) / n for n in sizes) * 1e4) / 1e4))
    while f > 0 and not leaves(f):
        f = round(f - 1e-4, 4)
    return f


def symmetric_label_noise(labels: np.ndarray, fraction: float, num_classes: int, seed: int):
    """Flip `fraction` of labels (chosen by `seed`) to a different class, uniformly.

    Returns:
      (noisy_labels int32 [N], flipped_indices sorted int64 [round(fraction * N)]).
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    flipped = np.sort(rng.permutation(n)[: int(round(fraction * n))])
    noisy = np.asarray(labels, np.int32).copy()
    # Adding a shift in [1, C-1] mod C guarantees a *different* class, uniformly.
    noisy[flipped] = (noisy[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
    return noisy, flipped
