"""Data: random-access sources, index-level splits, per-example transforms, grain loaders."""

from kdprune_jax.data.loaders import (
    TeacherViews,
    eval_dataset,
    num_train_steps,
    train_dataset,
    view_rng,
    views_dataset,
)
from kdprune_jax.data.sources import (
    SOURCE_KINDS,
    Split,
    array_split,
    check_train_labels,
    describe_split,
    load_split,
    with_train_classes,
)
from kdprune_jax.data.splits import (
    largest_fraction_leaving,
    stratified_split,
    symmetric_label_noise,
)
from kdprune_jax.data.transforms import AUGMENTATIONS, make_transforms

__all__ = [
    "AUGMENTATIONS", "SOURCE_KINDS", "Split", "TeacherViews", "array_split",
    "check_train_labels", "describe_split", "eval_dataset", "largest_fraction_leaving",
    "load_split", "make_transforms", "num_train_steps", "stratified_split",
    "symmetric_label_noise", "train_dataset", "view_rng", "views_dataset", "with_train_classes",
]
