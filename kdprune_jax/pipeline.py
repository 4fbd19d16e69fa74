"""The one orchestration of a run: teacher -> scores -> select -> student -> eval.

Each stage (`kdprune_jax.stages`) writes its artifact to the workdir (DESIGN.md "A run")
with a fingerprint of everything upstream of it, and is skipped when a matching artifact
is already there (`stages.cache`):

    DIR/teacher/       orbax checkpoint of the teacher (or imported from teacher.init)
    DIR/proxies/<k>/   proxy models for el2n / grand / forgetting (orbax checkpoints)
    DIR/scores/<m>.npz per-example scores of method m + metadata
    DIR/features/      teacher features + logits (IF-Beta)
    DIR/ifbeta/        the learned policy and its diagnostics (IF-Beta)
    DIR/subset.json    kept indices + keep_fraction, method, seed, class counts
    DIR/teacher_views/ cached teacher logits of augmented views (kd.teacher_views > 0)
    DIR/student/       orbax checkpoint of the student, resumable mid-epoch
    DIR/results.json   final metrics with the config that produced them
    DIR/metrics.jsonl  training curves (JSON lines)

A changed config invalidates exactly the artifacts downstream of the change: a stale
checkpoint directory is moved aside (never deleted), a stale subset/results file rebuilt.
Stages never import each other: this module passes each the values it needs.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from kdprune_jax import (
    config_checks,
    context,
    data,
    kd_alpha,
    selection,
    workdir_lock,
)
from kdprune_jax.context import Run, Splits, load_splits, log_line
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.stages import (
    evaluate,
    features,
    ifbeta,
    influence,
    proxies,
    scores,
    select,
    student,
    teacher,
    teacher_views,
)
from kdprune_jax.stages.evaluate import format_results


def run(config, workdir: str) -> dict:
    """Run every stage the config names; returns the results dict (also DIR/results.json).

    The run holds the workdir's lock (`workdir_lock`) from after the config checks to the
    end: a second run on the same workdir stops at once with one line naming the holder.
    With several processes, process 0 takes the lock and tells the others the outcome."""
    t_start = time.perf_counter()
    config = kd_alpha.resolve(config)  # before any key: "auto" becomes its number
    config_checks.validate(config)
    config_checks.check_workdir(workdir)
    _lock_workdir(workdir)
    try:
        return _run(config, workdir, t_start)
    finally:
        if jax.process_index() == 0:
            workdir_lock.release(workdir)


def _run(config, workdir: str, t_start: float) -> dict:
    timings = {}
    t = time.perf_counter()
    r = Run.create(config, workdir)
    sp = r.splits
    timings["data_seconds"] = time.perf_counter() - t
    r.log(f"[data] {len(sp.train)} train ({len(sp.pool)} pool + {len(sp.val)} val), "
          f"{len(sp.test)} test, {sp.num_classes} classes; {jax.device_count()} devices")
    _check_data(r)  # data-dependent checks, before any training
    method = config.prune.method

    def timed(name, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t
        return out

    # ---- teacher
    teacher_model, teacher_metrics = None, None
    if config_checks.teacher_stage_runs(config):
        teacher_model, teacher_metrics = timed("teacher_seconds", teacher.compute, r)

    # ---- scores -> select (or, for IF-Beta: features -> influence ranks -> policy -> draw)
    score_values, scores_meta, policy_rec = None, None, None
    if method == "ifbeta":
        t = time.perf_counter()
        feats = features.compute(r, teacher_model)
        subset, policy_rec = ifbeta.compute(r, teacher_model, feats)
        timings["policy_seconds"] = time.perf_counter() - t
        select.write(r, subset)
        r.log(f"[select] IF-Beta kept {len(subset.indices)}/{len(sp.pool)} examples "
              f"(a {subset.params['a']:.3f}, b {subset.params['b']:.3f})")
    else:
        if method != "random":
            score_values, scores_meta = timed("scores_seconds", compute_scores, r,
                                              teacher_model)
        subset = timed("select_seconds", select.compute, r, score_values, scores_meta)

    # ---- student (with cached teacher views when kd.teacher_views > 0)
    views = None
    if student.uses_teacher_views(config, teacher_model):
        views = timed("teacher_views_seconds", teacher_views.compute, r, teacher_model,
                      subset.indices)
    res = timed("student_seconds", student.compute, r, subset, teacher_model, views)

    # ---- eval
    results = evaluate.compute(
        r, student=res, student_key=student.key(r, subset, teacher_model), subset=subset,
        teacher_metrics=teacher_metrics, scores_meta=scores_meta, policy_rec=policy_rec,
        timings=timings)
    results["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    r.log(format_results(results))
    return results


def compute_scores(r: Run, teacher_model):
    """The scores stage wired to the stages it draws on: the proxies (trained only when
    the scores must be computed) and the influence stage. Returns (scores, meta)."""
    return scores.compute(
        r, teacher_model,
        train_proxies=lambda track_forgetting: proxies.train(r, track_forgetting),
        influence_scores=influence.influence_scores)


def _check_data(r: Run) -> None:
    """What the splits make impossible, found before any training: a class left empty, a
    batch larger than the subset, a schedule without one full batch, unusable IF-Beta
    validation halves, unreadable given features or score files."""
    config, sp = r.config, r.splits
    p = config.prune
    if p.balanced:
        n_keep = int(_class_keep_counts(config, sp).sum())
    else:
        n_keep = int(round(p.keep_fraction * len(sp.pool)))
    if n_keep < config.student.optim.batch_size and not config.student.equal_steps:
        raise ConfigError("student.optim.batch_size", config.student.optim.batch_size,
                          f"at most the subset size ({n_keep} examples at "
                          f"keep_fraction {p.keep_fraction})")
    # Both schedules must hold at least one full batch; checked here so a too-short
    # student schedule stops the run before the teacher is trained, not after.
    trained = [("student", len(sp.pool) if config.student.equal_steps else n_keep)]
    if config_checks.teacher_stage_runs(config) and not config.teacher.init:
        trained.insert(0, ("teacher", len(sp.pool)))
    for role, n in trained:
        o = config[role].optim
        if data.num_train_steps(n, o.batch_size, o.num_epochs) < 1:
            raise ConfigError(f"{role}.optim.batch_size", o.batch_size,
                              f"at most the number of training examples ({n}) times "
                              f"{role}.optim.num_epochs ({o.num_epochs}): one full batch")
    if p.method == "ifbeta":
        ifbeta.validation_halves(config, sp)
        if config.ifbeta.features_dir:  # unreadable given features stop the run right here
            features.check_features_dir(config, sp)
    if p.scores_file:  # a mismatching score file stops the run before any training
        scores.load_external_scores(p.scores_file, {"method": p.method,
                                                    "data": sp.fingerprint}, len(sp.train))


def _lock_workdir(workdir: str) -> None:
    """Process 0 takes the lock; with several processes it broadcasts the outcome (taken,
    busy, or an OS error), so that no process goes on, or waits, alone."""
    holder, error = None, None
    if jax.process_index() == 0:
        try:
            holder = workdir_lock.try_acquire(workdir, log=log_line)
        except OSError as e:
            error = e
    status = 2 if error is not None else int(holder is not None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        status = int(multihost_utils.broadcast_one_to_all(np.int32(status)))
        if status == 1 and holder is None:
            holder = workdir_lock.read_holder(workdir) or {"unreadable": True}
    if status == 2:
        why = getattr(error, "strerror", None) or error or "process 0 could not"
        raise ConfigError("--workdir", workdir,
                          f"a directory where the run can create its lock file; here: {why}")
    if holder is not None:
        raise workdir_lock.WorkdirBusyError(
            f"workdir {os.path.abspath(workdir)} is in use by "
            f"{workdir_lock.describe(holder)}; wait for it to finish or stop it (a lock "
            f"whose process has died is taken over automatically)")


def _class_keep_counts(config, splits: Splits) -> np.ndarray:
    """`selection.class_keep_counts` of the pool. When a class would keep none only because
    the validation split left it too few examples in the pool (every class has enough
    before it), the error names data.val_fraction, the field to change, not
    prune.keep_fraction."""
    p, d, c = config.prune, config.data, splits.num_classes
    try:
        return selection.class_keep_counts(splits.train_labels[splits.pool], p.keep_fraction, c)
    except ConfigError as e:
        if e.field != "prune.keep_fraction" or d.val_fraction == 0:
            raise
        n_train = np.bincount(splits.train.labels, minlength=c)
        need = context.pool_needed(config, n_train)
        if need == 1:  # too few examples even before the validation split
            raise
        n_pool = np.bincount(splits.train.labels[splits.pool], minlength=c)
        worst = int(np.argmin(n_pool))
        raise ConfigError(
            "data.val_fraction", d.val_fraction,
            f"a fraction leaving every class at least {need} training examples outside the "
            f"validation split, so that prune.keep_fraction={p.keep_fraction} keeps one of "
            f"each (class {worst} has {n_pool[worst]} of its {n_train[worst]} left); "
            + context.use_val_fraction(n_train, need)) from None


__all__ = ["ArtifactError", "Run", "Splits", "compute_scores", "format_results", "load_splits",
           "run"]
