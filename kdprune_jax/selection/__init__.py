"""Subset selection: class-balanced counts, random and score-based rules (keep an end,
middle band, CCS), and the subset artifact."""

from kdprune_jax.selection.balanced import (
    Subset,
    class_keep_counts,
    load_subset,
    random_balanced,
    read_subset,
    save_subset,
)
from kdprune_jax.selection.rules import DIRECTIONS, RULES, select_by_score

__all__ = [
    "DIRECTIONS", "RULES", "Subset", "class_keep_counts", "load_subset", "random_balanced",
    "read_subset", "save_subset", "select_by_score",
]
