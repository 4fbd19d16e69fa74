"""Score-based selection rules (METHOD.md §1, §3): keep the highest / lowest / middle band of
a score, or CCS (coverage-centric coreset selection, Zheng et al. 2023); class-balanced with
exact per-class counts by default, or global.

Ties are broken by a seeded random order, so the same (scores, seed) always gives the same
subset and equal scores are never resolved by index order.
"""

from __future__ import annotations

import numpy as np

from kdprune_jax.errors import ConfigError
from kdprune_jax.selection.balanced import Subset, class_keep_counts

DIRECTIONS = ("highest", "lowest", "middle")
RULES = ("keep_end", "ccs")


def _ascending(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions sorted by score ascending, ties in seeded random order."""
    return np.lexsort((rng.random(len(scores)), scores))


def _keep_end(scores, k, direction, rng):
    """Positions (into `scores`) of the k kept examples for one group."""
    order = _ascending(scores, rng)
    if direction == "highest":
        return order[len(order) - k:]
    if direction == "lowest":
        return order[:k]
    if direction == "middle":
        start = (len(order) - k) // 2
        return order[start : start + k]
    raise ConfigError("prune.direction", direction, ", ".join(DIRECTIONS))


def _ccs(scores, k, hardest, hard_cutoff, num_strata, rng):
    """CCS for one group: drop the hardest `hard_cutoff` fraction (capped so that k remain),
    split the rest into `num_strata` equal-width score strata, then fill the budget from
    the smallest stratum up, each taking min(its size, remaining budget / strata left)."""
    n = len(scores)
    order = _ascending(scores, rng)
    n_drop = min(int(round(hard_cutoff * n)), n - k)
    keep_pool = order[: n - n_drop] if hardest == "highest" else order[n_drop:]
    s = scores[keep_pool]
    lo, hi = float(s.min()), float(s.max())
    edges = np.linspace(lo, hi, num_strata + 1)
    strata = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, num_strata - 1)
    groups = [keep_pool[strata == j] for j in range(num_strata)]
    groups = sorted((g for g in groups if len(g)), key=len)
    budget, chosen = k, []
    for i, g in enumerate(groups):
        take = min(len(g), budget // (len(groups) - i))
        chosen.append(rng.permutation(g)[:take])
        budget -= take
    out = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    assert len(out) == k, (len(out), k)
    return out


def select_by_score(
    scores: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    keep_fraction: float,
    num_classes: int,
    *,
    method: str,
    direction: str,
    rule: str = "keep_end",
    balanced: bool = True,
    seed: int = 0,
    ccs_hard_cutoff: float = 0.1,
    ccs_strata: int = 50,
) -> Subset:
    """Keep `keep_fraction` of `pool` by `scores`.

    Args:
      scores: float [N_source] indexed by source position (only pool entries are read).
      labels: int [N_source].
      pool: int [n] source positions eligible for selection.
      direction: "highest" | "lowest" | "middle" (rule keep_end), or for CCS the end that
        is HARDEST ("highest" or "lowest"), whose top `ccs_hard_cutoff` fraction is dropped.
      rule: "keep_end" | "ccs".
      balanced: exact per-class counts (class_keep_counts) vs one global ranking.
    Returns:
      Subset with sorted indices, exact counts, and the parameters recorded.
    """
    if rule not in RULES:
        raise ConfigError("prune.rule", rule, ", ".join(RULES))
    if direction not in DIRECTIONS or (rule == "ccs" and direction == "middle"):
        allowed = DIRECTIONS if rule == "keep_end" else ("highest", "lowest")
        raise ConfigError("prune.direction", direction, ", ".join(allowed))
    if not (0.0 < keep_fraction <= 1.0):
        raise ConfigError("prune.keep_fraction", keep_fraction, "a number in (0, 1]")
    pool = np.asarray(pool, np.int64)
    pool_scores = np.asarray(scores, np.float64)[pool]
    if not np.all(np.isfinite(pool_scores)):
        bad = pool[~np.isfinite(pool_scores)][:5].tolist()
        raise ConfigError("prune.method", method,
                          f"a score that is finite for every pool example (non-finite at "
                          f"indices {bad})")
    rng = np.random.default_rng(seed)
    pool_labels = labels[pool]
    if balanced:
        counts = class_keep_counts(pool_labels, keep_fraction, num_classes)
        groups = [(np.flatnonzero(pool_labels == c), int(counts[c])) for c in range(num_classes)]
    else:
        groups = [(np.arange(len(pool)), int(round(keep_fraction * len(pool))))]
    kept = []
    for members, k in groups:
        if k == 0:
            continue
        if rule == "ccs":
            pos = _ccs(pool_scores[members], k, direction, ccs_hard_cutoff, ccs_strata, rng)
        else:
            pos = _keep_end(pool_scores[members], k, direction, rng)
        kept.append(pool[members[pos]])
    indices = np.sort(np.concatenate(kept))
    params = {"rule": rule, "balanced": bool(balanced)}
    if rule == "ccs":
        params.update(ccs_hard_cutoff=ccs_hard_cutoff, ccs_strata=ccs_strata)
    return Subset(
        indices=indices, keep_fraction=float(keep_fraction), method=method, seed=int(seed),
        class_counts=np.bincount(labels[indices], minlength=num_classes),
        pool_size=len(pool), direction=direction, params=params,
    )
