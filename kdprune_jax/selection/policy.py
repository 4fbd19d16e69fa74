"""The IF-Beta sampling policy (METHOD.md §5.3-5.7; our reconstruction of paper B, whose
authors published only the abstract).

- `within_class_ranks`: u_i in (0, 1), the example's normalized rank of a score within its
  class (u -> 1 = highest score = most helpful influence).
- `beta_log_weights`: log Beta(u; a, b) with a = softplus(a~) + eps, b = softplus(b~) + eps.
- `keep_probabilities`: pi_i = min(1, s_c w_i), the scale s_c set so that each class's
  probabilities sum EXACTLY to its kept count m_c (METHOD §5.5's "min(1, m_c w_i / sum w),
  renormalized", solved exactly; differentiable almost everywhere).
- `gumbel_top_k`: the final subset, one Gumbel-top-k draw per class with weights pi
  (exact per-class counts; the seed is recorded in the subset file).

All jittable; arrays are [N] over the pool, `labels` int [N], `counts` int [C].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-3


def within_class_ranks(scores: np.ndarray, labels: np.ndarray, num_classes: int,
                       seed: int = 0) -> np.ndarray:
    """(rank + 0.5) / n_c of each score within its class, ties broken by a seeded random
    order -> float32 [N] in (0, 1); the highest score of a class gets the largest u."""
    rng = np.random.default_rng(seed)
    u = np.zeros(len(scores), np.float32)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        order = np.lexsort((rng.random(len(idx)), scores[idx]))
        ranks = np.empty(len(idx))
        ranks[order] = np.arange(len(idx))
        u[idx] = (ranks + 0.5) / max(len(idx), 1)
    return u


def beta_params(phi):
    """phi = (a~, b~) -> (a, b) = softplus(phi) + eps (always > 0)."""
    ab = jax.nn.softplus(phi) + EPS
    return ab[0], ab[1]


def beta_log_weights(phi, u):
    """log of the Beta(a, b) density at u (up to the normalizer, which cancels per class)."""
    a, b = beta_params(phi)
    return (a - 1.0) * jnp.log(u) + (b - 1.0) * jnp.log1p(-u)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def keep_probabilities(log_w, labels, counts, num_classes: int):
    """pi [N] = min(1, s_c w_i) with the per-class scale s_c chosen so that
    sum_{i in c} pi_i = counts[c] EXACTLY (water-filling: the largest weights are capped at
    1 and the rest share the remaining budget in proportion to w).

    Exact in one pass: sort each class by w descending; with the top j capped, the scale is
    s_j = (m_c - j) / sum_{k >= j} w_(k), and the answer is the smallest j whose first
    uncapped weight fits (s_j w_(j) <= 1). Differentiable in w (through s_c) almost
    everywhere.
    """
    n = log_w.shape[0]
    # Normalize within class in log space; clamp at e^-80 so that extreme (a, b) never
    # underflow a weight to 0 (which would make a class's count unreachable): weights more
    # than e^80 below the class maximum tie, which is their limiting behaviour anyway.
    cmax = jax.ops.segment_max(log_w, labels, num_classes)
    w = jnp.exp(jnp.maximum(log_w - cmax[labels], -80.0))
    order = jnp.lexsort((-w, labels))  # by class, then weight descending
    ws, ls = w[order], labels[order]
    n_c = jax.ops.segment_sum(jnp.ones_like(ws), ls, num_classes)
    offsets = (jnp.cumsum(n_c) - n_c).astype(jnp.int32)
    pos = jnp.arange(n) - offsets[ls]  # rank within class (0 = largest w)
    # Sum of w from each rank to its class's end, as a segmented scan over the reversed
    # order (not total - prefix: that cancels catastrophically for the tiny tail sums of a
    # peaked policy).
    last = pos == (n_c[ls].astype(jnp.int32) - 1)  # the class's last (smallest-w) element
    suffix = _segmented_cumsum(ws[::-1], last[::-1])[::-1]
    m = counts.astype(w.dtype)
    scale_j = (m[ls] - pos) / jnp.maximum(suffix, 1e-30)
    valid = (scale_j * ws <= 1.0 + 1e-6) & (pos <= m[ls])
    j_star = jax.ops.segment_min(jnp.where(valid, pos, n), ls, num_classes)
    j_star = jnp.minimum(j_star, jnp.maximum(n_c.astype(jnp.int32) - 1, 0))
    scale = scale_j[jnp.clip(offsets + j_star, 0, n - 1)]
    return jnp.minimum(scale[labels] * w, 1.0)


def _segmented_cumsum(x, starts):
    """Inclusive cumulative sum restarting wherever `starts` is True."""

    def op(a, b):
        (av, af), (bv, bf) = a, b
        return bv + jnp.where(bf, 0.0, av), af | bf

    return jax.lax.associative_scan(op, (x, starts))[0]


@jax.jit
def _perturbed_log_weights(pi, key):
    # Jitted: eagerly, each of these primitives would be compiled and dispatched apart.
    return jnp.log(jnp.maximum(pi, 1e-30)) + jax.random.gumbel(key, pi.shape)


def gumbel_top_k(pi, labels, counts, num_classes: int, key):
    """One draw of a subset with exactly counts[c] examples of class c, sampling without
    replacement in proportion to pi (Gumbel-top-k). Returns bool [N]."""
    g = _perturbed_log_weights(pi, key)
    keep = np.zeros(pi.shape[0], bool)
    g = np.asarray(g)
    labels = np.asarray(labels)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        k = int(counts[c])
        if k:
            keep[idx[np.argsort(-g[idx], kind="stable")[:k]]] = True
    return keep
