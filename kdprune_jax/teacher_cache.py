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
import shutil
import time

import jax
import numpy as np

from kdprune_jax import artifacts, data, distributed, faults, io_errors
from kdprune_jax.errors import ArtifactError
from kdprune_jax.score_stage import Model, batch_pass

DIRNAME = "teacher_views"


def _meta(config, ds, teacher: Model, indices: np.ndarray) -> dict:
    d = config.data
    return {"teacher": teacher.fingerprint, "data": ds.fingerprint,
            "indices_sha256": hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest(),
            "num_examples": int(len(indices)), "num_views": int(config.kd.teacher_views),
            "seed": int(config.seed), "num_classes": int(ds.train.num_classes),
            "train_transform": [d.augment, d.image_size, list(d.mean), list(d.std)],
            "dtype": "float16"}


def _read(path: str, want: dict):
    """(logits memmap [n, V, C], None) when `path` holds exactly `want`; else (None, why)."""
    meta, problem = artifacts.read_json_checked(os.path.join(path, "meta.json"))
    if meta is None:
        return None, f"meta.json: {problem or 'missing'}"
    if any(meta.get(k) != v for k, v in want.items()):
        return None, "made for another teacher, data, subset or view setting"
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


def teacher_views(config, ds, mesh, workdir: str, teacher: Model, indices, log
                  ) -> data.TeacherViews:
    """The `teacher_views` stage: reuse DIR/teacher_views when its metadata matches, else
    one inference pass of the teacher over every (kept example, view) pair, streamed into a
    float16 memmap in a temp dir renamed into place (process 0 writes; all read back).

    Args: indices: int [n] source positions the student trains on.
    Returns: `data.TeacherViews` for `data.train_dataset(teacher_views=...)`.
    """
    indices = np.sort(np.asarray(indices, np.int64))
    want = _meta(config, ds, teacher, indices)
    path = os.path.join(workdir, DIRNAME)
    num_views, c = want["num_views"], want["num_classes"]
    logits, problem = _read(path, want) if os.path.isdir(path) else (None, None)
    if logits is not None:
        log(f"[teacher_views] reusing {path}")
        return data.TeacherViews(indices, logits, want["seed"])
    if problem:
        log(f"[teacher_views] {path}: {problem}; recomputing")
    t0 = time.perf_counter()
    tmp = path + ".tmp"
    writer = jax.process_index() == 0
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        mm = io_errors.open_memmap(os.path.join(tmp, "logits.npy"), np.float16,
                                   (len(indices) * num_views, c))

    def sink(pos, vals):  # `pos` = pair position row * V + view (views_dataset)
        if writer:
            mm[pos] = vals.astype(np.float16)

    train_fn, _ = data.make_transforms(config.data.augment, config.data.image_size,
                                       config.data.mean, config.data.std)
    batches, _ = data.views_dataset(
        ds.train, indices, num_views=num_views, seed=want["seed"],
        global_batch_size=config.score.batch_size, transform=train_fn,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=config.data.num_workers, prefetch=config.data.prefetch)

    def logits_fn(params, bs, batch):
        from flax import nnx

        return nnx.merge(teacher.graphdef, params, bs)(batch["image"], train=False)

    batch_pass(logits_fn, (teacher.params, teacher.batch_stats), ds, config, None, mesh,
               sink=sink, name="teacher_views", batches=batches)
    if writer:
        with io_errors.writing(os.path.join(tmp, "logits.npy")):
            mm.flush()  # on disk before the directory is renamed into place
        artifacts.write_json(os.path.join(tmp, "meta.json"),
                             {**want, "seconds": time.perf_counter() - t0})
        faults.maybe_kill("teacher_views:write")  # complete temp dir, not yet in place
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    distributed.barrier("kdprune_teacher_views_written")
    logits, problem = _read(path, want)
    if logits is None:  # only a concurrent writer or a full disk gets here
        raise ArtifactError(f"{path} is unreadable right after writing: {problem}")
    log(f"[teacher_views] {len(indices)} examples x {num_views} views in "
        f"{time.perf_counter() - t0:.1f} s -> {path}")
    return data.TeacherViews(indices, logits, want["seed"])
