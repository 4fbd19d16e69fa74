"""Index-level splits: the stratified validation split carved from train (METHOD.md §1) and
symmetric label noise. Everything here works on integer indices into a source split."""

from __future__ import annotations

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
        k = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) > 1:
            k = max(k, 1)
        carved.append(rng.permutation(idx)[:k])
    carved = np.sort(np.concatenate(carved)) if carved else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[carved] = False
    return np.flatnonzero(mask), carved


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
