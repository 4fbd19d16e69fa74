"""Subset selection: class-balanced counts, random selection, and the subset artifact."""

from kdprune_jax.selection.balanced import (
    Subset,
    class_keep_counts,
    load_subset,
    random_balanced,
    save_subset,
)

__all__ = ["Subset", "class_keep_counts", "load_subset", "random_balanced", "save_subset"]
