"""Class-balanced selection (METHOD.md §1) and the typed subset artifact."""

from __future__ import annotations

import dataclasses

import numpy as np

from kdprune_jax import artifacts
from kdprune_jax.errors import ConfigError


def class_keep_counts(labels: np.ndarray, keep_fraction: float, num_classes: int) -> np.ndarray:
    """Per-class kept counts: ~round(f * n_c), summing to exactly round(f * N).

    Largest-remainder rounding: every class gets floor(f * n_c), and the remaining
    round(f * N) - sum(floor) slots go to the classes with the largest fractional parts
    (ties broken by class id), so no class is off by more than one from f * n_c.

    Args:
      labels: int [N] labels of the pool being pruned.
      keep_fraction: f in (0, 1].
    Returns:
      int64 [num_classes].
    Raises:
      ConfigError(prune.keep_fraction) if f is outside (0, 1] or a class present in the
      pool would keep zero examples.
    """
    if not (0.0 < keep_fraction <= 1.0):
        raise ConfigError("prune.keep_fraction", keep_fraction, "a number in (0, 1]")
    n_c = np.bincount(labels, minlength=num_classes).astype(np.int64)
    exact = keep_fraction * n_c
    counts = np.floor(exact).astype(np.int64)
    remainder = int(round(keep_fraction * n_c.sum())) - int(counts.sum())
    order = np.lexsort((np.arange(num_classes), -(exact - counts)))
    counts[order[:remainder]] += 1
    empty = np.flatnonzero((n_c > 0) & (counts == 0))
    if len(empty):
        smallest = int(n_c[n_c > 0].min())
        raise ConfigError(
            "prune.keep_fraction", keep_fraction,
            f"a fraction that keeps at least one example of every class; class {int(empty[0])}"
            f" would keep none (smallest class has {smallest} examples, so use"
            f" keep_fraction >= {1.0 / smallest:.4g})",
        )
    return counts


@dataclasses.dataclass
class Subset:
    """The kept examples and what produced them (saved as DIR/subset.json).

    Attributes:
      indices: sorted int64 [k] source-split positions of the kept examples.
      keep_fraction: requested fraction of the pool kept.
      method: selection method name (e.g. "random").
      seed: the seed that drew the subset.
      class_counts: kept count per class, int [C].
      pool_size: number of examples the subset was chosen from.
      direction: which end of the score is kept ("highest", "lowest", "middle", "-").
      params: method parameters.
      fingerprint: hash of everything upstream (data, teacher, scores, selection config);
        a subset whose fingerprint differs from the current run's is stale.
    """

    indices: np.ndarray
    keep_fraction: float
    method: str
    seed: int
    class_counts: np.ndarray
    pool_size: int
    direction: str = "-"
    params: dict = dataclasses.field(default_factory=dict)
    fingerprint: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["indices"] = [int(i) for i in self.indices]
        d["class_counts"] = [int(c) for c in self.class_counts]
        d["num_kept"] = len(self.indices)
        return d


def random_balanced(
    labels: np.ndarray, pool: np.ndarray, keep_fraction: float, num_classes: int, seed: int,
    *, balanced: bool = True,
) -> Subset:
    """Uniform random selection: within each class with exact class-balanced counts, or
    (``balanced=False``, the global mode) round(f * n) examples uniformly from the pool.

    Args:
      labels: int [N_source] labels of the whole source split.
      pool: int [n] source positions eligible for selection (train minus validation).
    """
    pool = np.asarray(pool, np.int64)
    pool_labels = labels[pool]
    rng = np.random.default_rng(seed)
    if balanced:
        counts = class_keep_counts(pool_labels, keep_fraction, num_classes)
        kept = np.concatenate(
            [rng.permutation(pool[pool_labels == c])[: counts[c]] for c in range(num_classes)]
        )
    else:
        if not (0.0 < keep_fraction <= 1.0):
            raise ConfigError("prune.keep_fraction", keep_fraction, "a number in (0, 1]")
        kept = rng.permutation(pool)[: int(round(keep_fraction * len(pool)))]
        counts = np.bincount(labels[kept], minlength=num_classes)
    return Subset(
        indices=np.sort(kept), keep_fraction=float(keep_fraction), method="random",
        seed=int(seed), class_counts=counts, pool_size=len(pool),
        params={"balanced": bool(balanced)},
    )


def save_subset(path: str, subset: Subset) -> None:
    artifacts.write_json(path, subset.to_json())


def load_subset(path: str) -> Subset | None:
    """The saved subset, or None if the file is missing or unreadable."""
    return read_subset(path)[0]


def read_subset(path: str):
    """(Subset, None); (None, None) when the file is missing; (None, what is wrong) when it
    is not a well-formed subset (not JSON, a missing key, indices not sorted distinct
    non-negative integers, class counts not summing to the number kept)."""
    d, problem = artifacts.read_json_checked(path)
    if d is None:
        return None, problem
    N = artifacts.NUMBER
    problem = artifacts.check_fields(d, {"indices": list, "keep_fraction": N, "method": str,
                                         "seed": int, "class_counts": list, "pool_size": int})
    if problem:
        return None, problem
    try:
        idx, counts = np.asarray(d["indices"]), np.asarray(d["class_counts"])
    except (TypeError, ValueError) as e:  # ragged nested lists
        return None, f"'indices' / 'class_counts' are not flat lists ({artifacts.describe(e)})"
    if idx.ndim != 1 or (len(idx) and idx.dtype.kind not in "iu"):
        return None, "'indices' is not a list of integers"
    if counts.ndim != 1 or (len(counts) and counts.dtype.kind not in "iu"):
        return None, "'class_counts' is not a list of integers"
    if len(idx) and (idx.min() < 0 or np.any(np.diff(idx) <= 0)):
        return None, "'indices' are not sorted, distinct and non-negative"
    if int(counts.sum()) != len(idx) or d.get("num_kept", len(idx)) != len(idx):
        return None, (f"{len(idx)} indices but class_counts sum to {int(counts.sum())} and "
                      f"num_kept is {d.get('num_kept')}")
    return Subset(
        indices=idx.astype(np.int64), keep_fraction=d["keep_fraction"], method=d["method"],
        seed=d["seed"], class_counts=counts, pool_size=d["pool_size"],
        direction=d.get("direction", "-"), params=d.get("params", {}),
        fingerprint=d.get("fingerprint", ""),
    ), None
