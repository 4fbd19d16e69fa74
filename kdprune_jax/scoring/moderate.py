"""Moderate coreset score (Xia et al. 2023; METHOD.md §3): the distance of each example's
(teacher) feature vector to its class's elementwise median feature. The kept end is the
MIDDLE band of these distances within each class."""

from __future__ import annotations

import numpy as np


def moderate_scores(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """||h_i - median_{j: y_j = y_i} h_j||_2 per example.

    A set-level statistic (the class median needs the whole split), computed on the host
    one class at a time so memory stays at one class's features even for ImageNet.

    Args: features float [N, D], labels int [N]. Returns float32 [N].
    """
    features = np.asarray(features, np.float32)
    out = np.zeros(len(labels), np.float32)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            med = np.median(features[idx], axis=0)
            out[idx] = np.linalg.norm(features[idx] - med, axis=1)
    return out
