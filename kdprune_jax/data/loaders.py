"""grain pipelines: fixed-shape batches for training (shuffled, augmented, resumable) and for
evaluation/scoring (ordered, padded, with a mask).

Every element is ``{"image": float32[h, w, C], "label": int32, "index": int32}`` where `index`
is the example's stable position in its source split. Batches are this process's block of
each global batch: the stream is cut into chunks of ``global_batch // process_count`` rows and
process p takes chunks p, p + P, p + 2P, ... so P processes together read every global batch
exactly once, disjointly, without coordination.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from kdprune_jax.data.sources import Split


def _fetch(split: Split, labels: np.ndarray):
    def fetch(idx):
        ex = split.source[int(idx)]
        return {"image": ex["image"], "label": np.int32(labels[idx]), "index": np.int32(idx)}

    return fetch


def _to_iter(ds: grain.MapDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
    # A few reader threads hide per-example latency (PIL decode releases the GIL); with a
    # small prefetch buffer the host stays at most `prefetch` batches ahead of the device.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
    if num_workers > 0:
        # Decoding + augmentation in separate processes (GIL-free); the iterator state stays
        # checkpointable because elements are addressed by position.
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def view_rng(seed: int, index, view) -> np.random.Generator:
    """The generator of augmented view `view` of example `index`: the same pixels every
    time it is asked for (the cached-teacher mode stores the teacher's logits per view)."""
    return np.random.default_rng((int(seed), int(index), int(view)))


@dataclasses.dataclass
class TeacherViews:
    """Teacher logits cached for `V` fixed augmented views of each example.

    Attributes:
      indices: int [n] sorted source positions that have views.
      logits: [n, V, C] (float16 on disk; a memmap is fine), row r = `indices[r]`.
      seed: the views' seed (`view_rng`).
    """

    indices: np.ndarray
    logits: np.ndarray
    seed: int

    @property
    def num_views(self) -> int:
        return int(self.logits.shape[1])

    def lookup(self, index: int, view: int) -> np.ndarray:
        row = int(np.searchsorted(self.indices, index))
        return np.asarray(self.logits[row, view], np.float32)


def views_dataset(split: Split, indices: np.ndarray, *, num_views: int, seed: int,
                  global_batch_size: int, transform, process_index: int = 0,
                  process_count: int = 1, num_workers: int = 0, prefetch: int = 2):
    """Ordered, padded batches over every (example, view) pair of `indices`: pair position
    ``p = row * num_views + view`` carries view `view` of example `indices[row]` (augmented
    with `view_rng(seed, index, view)`), ``"index": p`` and a mask like `eval_dataset`.

    Returns (IterDataset, num_batches)."""
    indices = np.asarray(indices, np.int64)
    total_pairs = len(indices) * num_views
    num_batches = max(1, -(-total_pairs // global_batch_size))
    total = num_batches * global_batch_size
    fetch = _fetch(split, split.labels)
    local = global_batch_size // process_count

    def load(pos):
        real = pos < total_pairs
        p = pos if real else 0
        ex = fetch(indices[p // num_views])
        image = transform(ex["image"], view_rng(seed, ex["index"], p % num_views))
        return {**ex, "image": image, "index": np.int32(p), "mask": np.float32(real)}

    ds = (grain.MapDataset.range(total).map(load).batch(local, drop_remainder=True)
          .slice(slice(process_index, None, process_count)))
    return _to_iter(ds, num_workers, prefetch), num_batches


def num_train_steps(num_examples: int, global_batch_size: int, num_epochs: float) -> int:
    """Optimizer steps for `num_epochs` passes over `num_examples` (partial last batch dropped)."""
    return int(num_examples * num_epochs) // global_batch_size


def train_dataset(
    split: Split,
    indices: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    global_batch_size: int,
    num_steps: int,
    seed: int,
    transform,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    prefetch: int = 2,
    teacher_views: TeacherViews | None = None,
) -> grain.IterDataset:
    """Training batches over `indices` (source positions), reshuffled every epoch.

    The stream is an endless sequence of epochs, each a fresh seeded permutation of
    `indices`; batches may straddle epoch boundaries (as in big_vision), so exactly
    `num_steps` batches of this process's ``global_batch_size // process_count`` rows are
    produced. Deterministic given `seed`, independent of `num_workers`.

    Args:
      split: the source split.
      indices: int [n] source positions to train on (a subset or the whole train pool).
      labels: optional int [len(split)] labels overriding the source's (label noise).
      transform: ``(uint8 image, np.random.Generator) -> float32 image``.
      teacher_views: cached-teacher mode. Each element is one of the example's V fixed
        views, drawn uniformly per (epoch, position), augmented exactly as when its
        logits were cached, and carries them as ``"teacher_logits": float32 [C]``.
    Returns:
      A grain IterDataset whose iterator supports get_state/set_state (checkpointing).
    """
    labels = split.labels if labels is None else labels
    local = global_batch_size // process_count
    n = len(indices)
    epochs = -(-(num_steps * global_batch_size) // n) + 1

    def augment(ex, rng):
        if teacher_views is None:
            return {**ex, "image": transform(ex["image"], rng)}
        view = int(rng.integers(teacher_views.num_views))
        image = transform(ex["image"], view_rng(teacher_views.seed, ex["index"], view))
        return {**ex, "image": image,
                "teacher_logits": teacher_views.lookup(ex["index"], view)}

    ds = (
        grain.MapDataset.source(np.asarray(indices, np.int64))
        .shuffle(seed=seed)
        .repeat(epochs)
        .map(_fetch(split, labels))
        # Seeded per element position: augmentation is reproducible and worker-independent.
        .random_map(augment, seed=seed + 1)
        .batch(local, drop_remainder=True)
        .slice(slice(process_index, None, process_count))
    )
    ds = ds.slice(slice(0, num_steps))
    return _to_iter(ds, num_workers, prefetch)


def eval_dataset(
    split: Split,
    indices: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    global_batch_size: int,
    transform,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    prefetch: int = 2,
):
    """Ordered batches over `indices`, padded to whole global batches.

    Padding rows repeat the first index and carry ``mask == 0``; every real example appears
    exactly once with ``mask == 1``, so masked sums count each example once.

    Returns:
      (IterDataset, num_batches). Elements also carry ``"mask": float32``.
    """
    labels = split.labels if labels is None else labels
    indices = np.asarray(indices, np.int64)
    n = len(indices)
    num_batches = max(1, -(-n // global_batch_size))
    total = num_batches * global_batch_size
    padded = np.concatenate([indices, np.full(total - n, indices[0] if n else 0)])
    mask = (np.arange(total) < n).astype(np.float32)
    fetch = _fetch(split, labels)
    local = global_batch_size // process_count

    def load(pos):
        ex = fetch(padded[pos])
        return {**ex, "image": transform(ex["image"]), "mask": mask[pos]}

    ds = (
        grain.MapDataset.range(total)
        .map(load)
        .batch(local, drop_remainder=True)
        .slice(slice(process_index, None, process_count))
    )
    return _to_iter(ds, num_workers, prefetch), num_batches
