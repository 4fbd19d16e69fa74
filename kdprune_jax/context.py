"""The run context: what every stage of one run reads, in one value.

`Splits` is the run's data at the index level (images stay in the random-access sources):
the train and test splits, the training labels after label noise, the pool / validation
indices and the data fingerprint. `Run` bundles it with the config, the workdir, the mesh,
the metrics writer and the log, and builds the grain pipelines and the transform key that
the stages would otherwise rebuild each with its own list of arguments::

    run = context.Run.create(config, workdir)
    batches = run.eval_batches(run.splits.pool)        # padded, ordered, this process's rows
    key = run.transform_key()                           # [augment, image_size, mean, std]

Imports only leaves (data, artifacts, sharding, train.metrics); stages receive a Run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import jax
import numpy as np

from kdprune_jax import artifacts, data, sharding
from kdprune_jax.errors import ConfigError
from kdprune_jax.train.metrics import MetricsWriter


def log_line(msg: str) -> None:
    """A line for the person running the job (process 0 only)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


@dataclasses.dataclass
class Splits:
    """The run's data at the index level.

    train / test: `data.Split` (random-access source + clean labels + fingerprint).
    train_labels: int [N_train], the labels training and selection see (after label noise).
    pool: int [n_pool], train positions eligible for training and selection (train minus val).
    val: int [n_val], the stratified validation positions (METHOD §1; clean labels).
    flipped: int [k], positions whose label the label noise flipped.
    fingerprint: key of the train side (split, validation split, label noise): everything
      trained or selected depends on it. test_fingerprint: key of the test split, read by
      the final evaluations alone (so changing data.eval_split retrains nothing).
    """

    train: data.Split
    test: data.Split
    train_labels: np.ndarray
    pool: np.ndarray
    val: np.ndarray
    flipped: np.ndarray
    fingerprint: str
    test_fingerprint: str = ""

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def load_splits(config) -> Splits:
    """Read the configured train and eval splits, carve the validation split and apply
    label noise. Raises ConfigError naming the field for data that cannot serve the run."""
    d = config.data
    train = data.load_split(d, d.train_split)
    data.check_train_labels(train, data.describe_split(d, d.train_split),
                            inferred=d.source == "arrays", allow_missing=d.source == "tfds")
    test = data.load_split(d, d.eval_split)
    if d.source == "arrays":
        test = data.with_train_classes(test, train, data.describe_split(d, d.eval_split))
    if test.num_classes != train.num_classes:
        raise ConfigError("data.eval_split", d.eval_split,
                          f"a split with the train split's {train.num_classes} classes "
                          f"(it has {test.num_classes})")
    if train.num_channels != len(d.mean):
        raise ConfigError("data.mean", tuple(d.mean),
                          f"{train.num_channels} value(s), one per image channel")
    # The validation split is carved on the clean labels and stays clean: label noise
    # (a robustness experiment) corrupts only the pool that training and selection see.
    pool, val = data.stratified_split(train.labels, d.val_fraction, d.val_seed)
    n_train = np.bincount(train.labels, minlength=train.num_classes)
    n_pool = np.bincount(train.labels[pool], minlength=train.num_classes)
    emptied = (n_pool == 0) & (n_train > 0)  # a class absent from train is TFDS's slice
    if np.any(emptied):
        c, need = int(np.flatnonzero(emptied)[0]), pool_needed(config, n_train)
        raise ConfigError("data.val_fraction", d.val_fraction,
                          f"a fraction leaving every class at least {need} training "
                          f"example{'s' if need > 1 else ''} outside the validation split "
                          f"(it takes all {n_train[c]} of class {c}); "
                          + use_val_fraction(n_train, need))
    labels, flipped = train.labels, np.zeros(0, np.int64)
    if d.label_noise > 0:
        noisy, flipped_pos = data.symmetric_label_noise(
            train.labels[pool], d.label_noise, train.num_classes, d.label_noise_seed)
        labels = train.labels.copy()
        labels[pool] = noisy
        flipped = pool[flipped_pos]
    fp = artifacts.fingerprint({
        "train": train.fingerprint, "val_fraction": d.val_fraction,
        "val_seed": d.val_seed, "label_noise": d.label_noise,
        "label_noise_seed": d.label_noise_seed,
    })
    return Splits(train, test, labels, pool, val, flipped, fp, test.fingerprint)


def pool_needed(config, n_train: np.ndarray) -> int:
    """Pool examples every class needs after the validation split: one, and with balanced
    selection enough for prune.keep_fraction to keep one of each (floor(f * n) >= 1), when
    every class has that many before the split (else keep_fraction is what to change)."""
    p = config.prune
    if p.balanced and 0 < p.keep_fraction <= 1:
        need = math.ceil(1 / p.keep_fraction)
        if n_train.min() >= need:
            return need
    return 1


def use_val_fraction(n_train: np.ndarray, need: int) -> str:
    """The advice closing a data.val_fraction message: a fraction that leaves `need`."""
    bound = data.largest_fraction_leaving(n_train, need)
    return f"use data.val_fraction <= {bound:g}" if bound > 0 else "use data.val_fraction=0"


@dataclasses.dataclass
class Run:
    """One run: config, workdir, mesh, splits, metrics writer and log.

    Stages take a Run and the values the stages before them produced (`pipeline.run`
    passes them); they build their input pipelines here so that every pass over the data
    uses the same transforms, process slicing and loader settings."""

    config: object
    workdir: str
    mesh: jax.sharding.Mesh
    splits: Splits
    writer: MetricsWriter
    log: Callable[[str], None] = log_line

    @classmethod
    def create(cls, config, workdir: str, *, mesh=None, splits=None, log=log_line) -> Run:
        """A Run for `config` in `workdir`: the default ("data",) mesh and the configured
        splits unless given."""
        return cls(config, workdir, mesh if mesh is not None else sharding.make_mesh(),
                   splits if splits is not None else load_splits(config),
                   MetricsWriter(workdir), log)

    @property
    def is_writer(self) -> bool:
        """Process 0 writes every artifact (one writer per file on a shared workdir)."""
        return jax.process_index() == 0

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    # ------------------------------------------------------------------ transforms
    def transform_key(self) -> list:
        """[augment, image_size, mean, std]: what the per-example transforms depend on,
        the part of every image-reading stage's key that the data fingerprint lacks."""
        d = self.config.data
        return [d.augment, d.image_size, list(d.mean), list(d.std)]

    def transforms(self):
        """(train_fn(image, rng) -> float32, eval_fn(image) -> float32)."""
        d = self.config.data
        return data.make_transforms(d.augment, d.image_size, d.mean, d.std)

    # ------------------------------------------------------------------ pipelines
    def _loader(self) -> dict:
        d = self.config.data
        return dict(process_index=jax.process_index(), process_count=jax.process_count(),
                    num_workers=d.num_workers, prefetch=d.prefetch)

    def train_batches(self, indices, *, batch_size: int, num_steps: int, seed: int,
                      teacher_views: data.TeacherViews | None = None):
        """Augmented training batches over train `indices` (training labels), exactly
        `num_steps` of them (`data.train_dataset`)."""
        return data.train_dataset(
            self.splits.train, indices, labels=self.splits.train_labels,
            global_batch_size=batch_size, num_steps=num_steps, seed=seed,
            transform=self.transforms()[0], teacher_views=teacher_views, **self._loader())

    def eval_batches(self, indices, *, split: str = "train", batch_size: int | None = None):
        """Ordered, padded, unaugmented batches over `indices` of the train split (with the
        training labels; `config.score.batch_size`) or of the test split (its own labels;
        `config.eval.batch_size`)."""
        c = self.config
        if split == "train":
            src, labels, bs = self.splits.train, self.splits.train_labels, c.score.batch_size
        else:
            src, labels, bs = self.splits.test, None, c.eval.batch_size
        dataset, _ = data.eval_dataset(src, indices, labels=labels,
                                       global_batch_size=batch_size or bs,
                                       transform=self.transforms()[1], **self._loader())
        return dataset

    def views_batches(self, indices, *, num_views: int, seed: int):
        """Ordered batches over every (example, augmented view) pair of train `indices`
        (`data.views_dataset`; row key = pair position)."""
        dataset, _ = data.views_dataset(
            self.splits.train, indices, num_views=num_views, seed=seed,
            global_batch_size=self.config.score.batch_size, transform=self.transforms()[0],
            **self._loader())
        return dataset

    def rows(self, indices, teacher_logits=None):
        """Train examples `indices` as ONE "data"-sharded batch (unaugmented images, labels,
        optionally teacher logits), truncated to a whole number of rows per device."""
        n_dev = jax.device_count()
        indices = np.asarray(indices)
        n = len(indices) // n_dev * n_dev
        indices = indices[:max(n, n_dev)]
        eval_fn = self.transforms()[1]
        src = self.splits.train.source
        batch = {"image": np.stack([eval_fn(src[int(i)]["image"]) for i in indices]),
                 "label": self.splits.train_labels[indices].astype(np.int32)}
        if teacher_logits is not None:
            batch["teacher_logits"] = teacher_logits[indices].astype(np.float32)
        return jax.device_put(batch, sharding.batch_sharded(self.mesh))
