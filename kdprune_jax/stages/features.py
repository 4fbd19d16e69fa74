"""The `features` stage: the frozen teacher's penultimate features and logits of the
whole train split, the cached inputs of IF-Beta's bilevel problem.

    DIR/features/   features.npy [N, D] (float32 / float16 / bfloat16 stored as uint16),
                    logits.npy float32 [N, C], meta.json (teacher, data, transform, dtype)
"""

from __future__ import annotations

import dataclasses
import os
import time

import ml_dtypes
import numpy as np

from kdprune_jax import artifacts, inference, io_errors
from kdprune_jax.context import Run
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.inference import FrozenModel, batch_pass, forward_fn
from kdprune_jax.stages import cache

FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16,
                  "bfloat16": ml_dtypes.bfloat16}


def key(run: Run, teacher: FrozenModel) -> dict:
    """The features' metadata key: the teacher, the data, the eval transform, the dtype
    and the number of rows. ``artifacts.fingerprint`` of it is what IF-Beta's policy is
    keyed on."""
    return {"teacher": teacher.fingerprint, "data": run.splits.fingerprint,
            "eval_transform": run.transform_key(), "dtype": run.config.ifbeta.feature_dtype,
            "num_examples": len(run.splits.train)}


def read_features(path, num_classes: int | None = None, dim: int | None = None):
    """((features [N, D], logits [N, C], meta), None) memory-mapped; (None, None) when the
    directory does not exist; (None, "<file>: what is wrong") when a file is missing, not
    an .npy / JSON document (empty, truncated, garbage), or of the wrong shape or dtype
    (N from meta.json; C and D checked when given)."""
    if not os.path.isdir(path):
        return None, None
    meta, problem = artifacts.read_json_checked(os.path.join(path, "meta.json"))
    if meta is not None:
        problem = artifacts.check_fields(meta, {"dtype": str, "num_examples": int})
        if problem is None and meta["dtype"] not in FEATURE_DTYPES:
            problem = f"unknown dtype {meta['dtype']!r}"
    if meta is None or problem:
        return None, f"meta.json: {problem or 'missing'}"
    n, dt = meta["num_examples"], FEATURE_DTYPES[meta["dtype"]]
    out = []
    for name, cols, dtype in (("features.npy", dim, np.uint16 if dt is ml_dtypes.bfloat16
                               else dt), ("logits.npy", num_classes, np.float32)):
        try:
            a = np.load(os.path.join(path, name), mmap_mode="r")
        except Exception as e:  # numpy raises several types for a damaged header or size
            return None, f"{name}: {artifacts.describe(e)}"
        if a.ndim != 2 or a.shape[0] != n or (cols is not None and a.shape[1] != cols):
            return None, (f"{name}: shape {a.shape}, expected ({n}, "
                          f"{cols if cols is not None else 'D'}) from meta.json")
        if a.dtype != dtype:
            return None, f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}"
        out.append(a)
    feats, logits = out
    return (feats.view(dt) if dt is ml_dtypes.bfloat16 else feats, logits, meta), None


def _features_or_problem(path):
    """read_features + a check that every value is finite; returns float32 arrays."""
    got, problem = read_features(path)
    if got is None:
        return None, problem
    feats, logits = np.asarray(got[0], np.float32), np.asarray(got[1], np.float32)
    for name, a in (("features.npy", feats), ("logits.npy", logits)):
        if not np.all(np.isfinite(a)):
            return None, f"{name}: {int(np.sum(~np.isfinite(a)))} NaN or infinite values"
    return (feats, logits, got[2]), None


def refuse_features_dir(given: str, problem: str | None):
    """The error for an unusable user-given ifbeta.features_dir (nothing to rebuild)."""
    return ConfigError("ifbeta.features_dir", given,
                       "'' or a features directory written by kdprune_jax; this one "
                       + (f"is unreadable ({problem})" if problem else "does not exist"))


def check_features_dir(config, splits):
    """Before any training: a user-given ifbeta.features_dir must be readable (its
    teacher and data are compared once the teacher is known)."""
    got, problem = read_features(config.ifbeta.features_dir, splits.num_classes)
    if got is None:
        raise refuse_features_dir(config.ifbeta.features_dir, problem)


@dataclasses.dataclass
class Features:
    """Teacher features float32 [N_train, D], teacher logits float32 [N_train, C], and the
    fingerprint of their key (`key`)."""

    features: np.ndarray
    logits: np.ndarray
    fingerprint: str


def compute(run: Run, teacher: FrozenModel) -> Features:
    """The `features` stage: one inference pass of the frozen teacher over the whole train
    split (train pool + validation), no augmentation. Streams rows into memory-mapped
    .npy files (host memory stays at one batch), written to a temp dir and renamed into
    place. Reused when its metadata matches; a user-given ifbeta.features_dir must match
    (it is only read, never recomputed into)."""
    want = key(run, teacher)
    fp = artifacts.fingerprint(want)
    given = run.config.ifbeta.features_dir
    if given:
        got, problem = _features_or_problem(given)
        if got is None:
            raise refuse_features_dir(given, problem)
        for k in ("teacher", "data", "eval_transform", "dtype", "num_examples"):
            if got[2].get(k) != want[k]:
                raise ArtifactError(
                    f"features in {given} were computed with a different {k} "
                    f"({got[2].get(k)!r}) than this run's ({want[k]!r}); they come from "
                    "another teacher/data than config.teacher names. Leave "
                    "ifbeta.features_dir empty to recompute them")
        problem = _columns_problem(got, teacher, run)
        if problem:
            raise refuse_features_dir(given, problem)
        run.log(f"[features] reusing {given}")
        return Features(got[0], got[1], fp)
    got = cache.reuse_or_compute(
        cache.Artifact("features", run.path("features"),
                       stale="different teacher, data or dtype"), want,
        read=_features_or_problem, key_of=lambda g: {k: g[2].get(k) for k in want},
        check=lambda g: _columns_problem(g, teacher, run), log=run.log,
        compute=lambda: _compute(run, teacher, want))
    return Features(got[0], got[1], fp)


def _columns_problem(got, teacher: FrozenModel, run: Run) -> str | None:
    """Made for this teacher and data, so the widths must be this teacher's (a stale
    directory of another teacher may have other ones: stale, not damaged)."""
    dim, c = _feature_dim(teacher, run), run.splits.num_classes
    if got[0].shape[1] != dim or got[1].shape[1] != c:
        return (f"features.npy / logits.npy: {got[0].shape[1]} / {got[1].shape[1]} columns, "
                f"this teacher has {dim} / {c}")
    return None


def _compute(run: Run, teacher: FrozenModel, want: dict):
    t0 = time.perf_counter()
    path = run.path("features")
    c, n = run.splits.num_classes, len(run.splits.train)
    dt = FEATURE_DTYPES[run.config.ifbeta.feature_dtype]
    tmp = cache.stage_dir(path)
    dim = _feature_dim(teacher, run)
    store = np.uint16 if dt is ml_dtypes.bfloat16 else dt  # .npy has no bfloat16
    # Every process takes part in the sharded pass and receives every row, but only
    # process 0 writes the files (one writer per file on a shared workdir); the others
    # read them back after publish_dir's barrier.
    writer = run.is_writer
    if writer:
        # Blocks allocated up front: a full disk is a one-line WriteError here, not a
        # SIGBUS mid-pass (io_errors.open_memmap).
        f_mm = io_errors.open_memmap(os.path.join(tmp, "features.npy"), store, (n, dim))
        l_mm = io_errors.open_memmap(os.path.join(tmp, "logits.npy"), np.float32, (n, c))

    def sink(idx, vals):
        if not writer:
            return
        f = vals[:, c:].astype(dt)
        f_mm[idx] = f.view(np.uint16) if dt is ml_dtypes.bfloat16 else f
        l_mm[idx] = vals[:, :c]

    # Kill points features:batch<k>: a partial features.tmp/ is left behind (removed by
    # stage_dir on rerun); features/ only ever appears complete.
    batch_pass(forward_fn(teacher.graphdef), (teacher.params, teacher.batch_stats),
               run.eval_batches(np.arange(n)), run.mesh, n, sink=sink, name="features")
    if writer:
        with io_errors.writing(tmp):
            f_mm.flush()  # the data is on disk before the directory is renamed into place
            l_mm.flush()
        artifacts.write_json(os.path.join(tmp, "meta.json"),
                             {**want, "seconds": time.perf_counter() - t0})
    cache.publish_dir(tmp, path, name="features")
    run.log(f"[features] {n} x {dim} features ({run.config.ifbeta.feature_dtype}) in "
            f"{time.perf_counter() - t0:.1f} s -> {path}")
    got, problem = read_features(path)  # the structure only: the values are the pass's own
    if got is None:  # only a concurrent writer or a full disk gets here
        raise ArtifactError(f"{path} is unreadable right after writing: {problem}")
    return np.asarray(got[0], np.float32), np.asarray(got[1], np.float32), got[2]


def _feature_dim(teacher: FrozenModel, run: Run) -> int:
    return inference.feature_dim(teacher, run.splits.train.source[0]["image"].shape)
