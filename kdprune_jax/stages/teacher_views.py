"""The cached-teacher mode (config.kd.teacher_views = V > 0): the teacher's logits for V
fixed augmented views of every kept example, computed once, then read by the student's
input pipeline instead of running the teacher in every train step.

    DIR/teacher_views/logits.npy   float16 [n * V, C], row r * V + v = view v of kept[r]
    DIR/teacher_views/meta.json    what produced it (teacher, data, subset, V, seed, transform)

Why: with a live teacher every student step pays a teacher forward (for ResNet-56 -> 20 about
half the step). With V views, the teacher runs V x |subset| times in all instead of
epochs x |subset|, so the mode pays as soon as the student trains for more than V epochs.
The price is augmentation diversity: the student sees only V distinct crops/flips per example
(benchmarks/cached_teacher.py measures both sides).

float16 logits: teacher logits are O(10); float16 keeps ~3 significant digits, far below
what the temperature-softened KD target resolves, at half the bytes (CIFAR-10, V=8: 8 MB
for 50k examples; ImageNet at V=8 would need 20 GB: there, store top-k logits instead).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from kdprune_jax import artifacts, data, io_errors
from kdprune_jax.context import Run
from kdprune_jax.errors import ArtifactError
from kdprune_jax.inference import FrozenModel, batch_pass, logits_fn
from kdprune_jax.stages import cache

DIRNAME = "teacher_views"


def key(run: Run, teacher: FrozenModel, indices: np.ndarray) -> dict:
    """The cache's metadata key: teacher, data, the kept indices, V, the view seed, the
    class count, the train transform and the storage dtype."""
    c = run.config
    return {"teacher": teacher.fingerprint, "data": run.splits.fingerprint,
            "indices_sha256": hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest(),
            "num_examples": int(len(indices)), "num_views": int(c.kd.teacher_views),
            "seed": int(c.seed), "num_classes": int(run.splits.num_classes),
            "train_transform": run.transform_key(), "dtype": "float16"}


def _reader(want: dict):
    def read(path: str):
        """(logits memmap [n, V, C], None) when `path` holds exactly `want`; (STALE, None)
        when it was made for another key; (None, why) when damaged; (None, None) missing."""
        if not os.path.isdir(path):
            return None, None
        meta, problem = artifacts.read_json_checked(os.path.join(path, "meta.json"))
        if meta is None:
            return None, f"meta.json: {problem or 'missing'}"
        if any(meta.get(k) != v for k, v in want.items()):
            return cache.STALE, None
        n, v, c = want["num_examples"], want["num_views"], want["num_classes"]
        try:
            a = np.load(os.path.join(path, "logits.npy"), mmap_mode="r")
        except Exception as e:  # numpy raises several types for a damaged header or size
            return None, f"logits.npy: {artifacts.describe(e)}"
        if a.shape != (n * v, c) or a.dtype != np.float16:
            return None, f"logits.npy: {a.dtype} {a.shape}, expected float16 ({n * v}, {c})"
        if not np.all(np.isfinite(a)):
            return None, "logits.npy: NaN or infinite values"
        return a.reshape(n, v, c), None

    return read


def compute(run: Run, teacher: FrozenModel, indices) -> data.TeacherViews:
    """The `teacher_views` stage: reuse DIR/teacher_views when its metadata matches, else
    one inference pass of the teacher over every (kept example, view) pair, streamed into a
    float16 memmap in a temp dir renamed into place (process 0 writes; all read back).

    Args: indices: int [n] source positions the student trains on.
    Returns: `data.TeacherViews` for `data.train_dataset(teacher_views=...)`.
    """
    indices = np.sort(np.asarray(indices, np.int64))
    want = key(run, teacher, indices)
    read = _reader(want)
    logits = cache.reuse_or_compute(
        cache.Artifact("teacher_views", run.path(DIRNAME),
                       stale="made for another teacher, data, subset or view setting"), want,
        read=read, log=run.log, compute=lambda: _compute(run, teacher, indices, want, read))
    return data.TeacherViews(indices, logits, want["seed"])


def _compute(run: Run, teacher: FrozenModel, indices, want: dict, read):
    t0 = time.perf_counter()
    path = run.path(DIRNAME)
    num_views, c = want["num_views"], want["num_classes"]
    tmp = cache.stage_dir(path)
    writer = run.is_writer
    if writer:
        mm = io_errors.open_memmap(os.path.join(tmp, "logits.npy"), np.float16,
                                   (len(indices) * num_views, c))

    def sink(pos, vals):  # `pos` = pair position row * V + view (views_dataset)
        if writer:
            mm[pos] = vals.astype(np.float16)

    batches = run.views_batches(indices, num_views=num_views, seed=want["seed"])
    batch_pass(logits_fn(teacher.graphdef), (teacher.params, teacher.batch_stats), batches,
               run.mesh, len(indices) * num_views, sink=sink, name="teacher_views")
    if writer:
        with io_errors.writing(os.path.join(tmp, "logits.npy")):
            mm.flush()  # on disk before the directory is renamed into place
        artifacts.write_json(os.path.join(tmp, "meta.json"),
                             {**want, "seconds": time.perf_counter() - t0})
    cache.publish_dir(tmp, path, name="teacher_views")
    logits, problem = read(path)
    if logits is None or logits is cache.STALE:  # only a concurrent writer or a full disk
        raise ArtifactError(f"{path} is unreadable right after writing: {problem}")
    run.log(f"[teacher_views] {len(indices)} examples x {num_views} views in "
            f"{time.perf_counter() - t0:.1f} s -> {path}")
    return logits
