"""The one orchestration of a run: teacher -> scores -> select -> student -> eval.

Each stage writes its artifact to the workdir (DESIGN.md "A run") with a fingerprint of
everything upstream of it, and is skipped when a matching artifact is already there:

    DIR/teacher/       orbax checkpoint of the teacher (or imported from teacher.init)
    DIR/proxies/<k>/   proxy models for el2n / grand / forgetting (orbax checkpoints)
    DIR/scores/<m>.npz per-example scores of method m + metadata
    DIR/subset.json    kept indices + keep_fraction, method, seed, class counts
    DIR/student/       orbax checkpoint of the student, resumable mid-epoch
    DIR/results.json   final metrics with the config that produced them
    DIR/metrics.jsonl  training curves (JSON lines)

A changed config invalidates exactly the artifacts downstream of the change: a stale
checkpoint directory is moved aside (never deleted), a stale subset/results file rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from kdprune_jax import (
    artifacts,
    config_checks,
    data,
    distributed,
    faults,
    ifbeta_stage,
    kd_alpha,
    methods,
    models,
    score_stage,
    selection,
    sharding,
    teacher_cache,
    workdir_lock,
)
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.train import TrainResult, evaluate, train_model
from kdprune_jax.train.checkpoint import Checkpointer, CorruptCheckpointError, state_checksums
from kdprune_jax.train.metrics import MetricsWriter
from kdprune_jax.train.state import TrainState


def _log(msg: str) -> None:
    """A line for the person running the job (process 0 only)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


@dataclasses.dataclass
class Data:
    """The run's data at the index level (images stay in the random-access sources)."""

    train: data.Split
    test: data.Split
    train_labels: np.ndarray  # labels used for training (after optional label noise)
    pool: np.ndarray  # train indices eligible for training/selection (train minus val)
    val: np.ndarray  # stratified validation indices (METHOD §1)
    flipped: np.ndarray  # indices whose label was flipped by label noise
    # Everything trained or selected depends on the train side only (train split, validation
    # split, label noise); the test split is read by the final evaluations alone, which key
    # their caches on `test_fingerprint` too (so changing data.eval_split retrains nothing).
    fingerprint: str
    test_fingerprint: str = ""


def load_data(config) -> Data:
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
        c, need = int(np.flatnonzero(emptied)[0]), _pool_needed(config, n_train)
        raise ConfigError("data.val_fraction", d.val_fraction,
                          f"a fraction leaving every class at least {need} training "
                          f"example{'s' if need > 1 else ''} outside the validation split "
                          f"(it takes all {n_train[c]} of class {c}); "
                          + _use_val_fraction(n_train, need))
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
    return Data(train, test, labels, pool, val, flipped, fp, test.fingerprint)


def _model(role_cfg, num_classes: int, seed: int):
    return models.create_model(role_cfg.model, num_classes=num_classes, seed=seed,
                               width=role_cfg.width)


def _train_role(role: str, config, ds: Data, indices, mesh, workdir, writer, fingerprint,
                teacher=None, num_steps=None, teacher_views=None) -> TrainResult:
    """Train the teacher or the student on `indices` (resumable, see train_model).

    With `teacher_views` (cached-teacher mode) the teacher's logits come from the cache
    through the input pipeline and the teacher itself is not run."""
    rc = config[role]
    o = rc.optim
    sharding.local_batch_size(o.batch_size, f"{role}.optim.batch_size")  # raises if uneven
    steps_per_epoch = len(indices) / o.batch_size
    if num_steps is None:
        num_steps = data.num_train_steps(len(indices), o.batch_size, o.num_epochs)
    if num_steps < 1:
        raise ConfigError(f"{role}.optim.batch_size", o.batch_size,
                          f"at most the number of training examples ({len(indices)}) times "
                          f"{role}.optim.num_epochs")
    train_fn, _ = data.make_transforms(config.data.augment, config.data.image_size,
                                       config.data.mean, config.data.std)
    seed = config.seed + (1000 if role == "teacher" else 0)

    def dataset_fn():
        return data.train_dataset(
            ds.train, indices, labels=ds.train_labels, global_batch_size=o.batch_size,
            num_steps=num_steps, seed=seed, transform=train_fn,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_workers=config.data.num_workers, prefetch=config.data.prefetch,
            teacher_views=teacher_views,
        )

    cached = teacher_views is not None
    return train_model(
        name=role, model=_model(rc, ds.train.num_classes, seed), dataset_fn=dataset_fn,
        num_steps=num_steps, steps_per_epoch=steps_per_epoch, opt_cfg=o, mesh=mesh,
        ckpt_dir=os.path.join(workdir, role), fingerprint=fingerprint, writer=writer,
        teacher=None if cached else teacher, cached_teacher=cached,
        alpha=config.kd.alpha if (teacher is not None or cached) else 0.0,
        temperature=config.kd.temperature, global_batch_size=o.batch_size,
        log_every_steps=config.log_every_steps,
        checkpoint_every_steps=config.checkpoint_every_steps, log=_log,
        compute_dtype=config_checks.compute_dtype(config),
    )


def import_teacher(config, num_classes: int, mesh):
    """Load the teacher named by ``teacher.init``: a teacher trained by kdprune_jax (another
    workdir's ``teacher/`` directory), or a PyTorch ``.pt``/``.pth`` state dict in
    torchvision's ResNet layout (``models.torch_import``; needs the ``torch`` extra). Only
    params and BatchNorm statistics are read, so the optimizer the teacher was trained with
    does not matter; every array must match the configured model's shape.

    A PyTorch teacher is fingerprinted by the sha256 of the file's bytes (plus model and
    width), so downstream artifacts survive moving the file and go stale when it changes.

    Returns (graphdef, params, batch_stats, fingerprint).
    """
    from flax import nnx

    # Abstract (shapes/dtypes only): every value is overwritten, and eagerly initializing a
    # ResNet-50 just to discard it takes tens of seconds on a CPU.
    model = nnx.eval_shape(lambda: _model(config.teacher, num_classes, config.seed))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    init = config.teacher.init
    if init.endswith((".pt", ".pth")) and not os.path.isdir(init):
        if not os.path.isfile(init):
            raise ConfigError("teacher.init", init, "an existing .pt/.pth file or a "
                              "kdprune_jax teacher checkpoint directory")
        params, batch_stats = models.torch_state_dict_to_nnx(
            models.load_torch_checkpoint(init), config.teacher.model, num_classes,
            width=config.teacher.width, where=f"PyTorch checkpoint {init}")
        params, batch_stats = sharding.replicate((params, batch_stats), mesh)
        fp = artifacts.fingerprint({"torch_sha256": models.torch_import.file_sha256(init),
                                    "model": config.teacher.model,
                                    "width": config.teacher.width})
        return graphdef, params, batch_stats, fp
    ck = Checkpointer(config.teacher.init)
    step = ck.latest_step()
    if step is None:
        ck.close()
        raise ConfigError("teacher.init", config.teacher.init,
                          "a directory holding a kdprune_jax teacher checkpoint")
    problem = None
    try:
        raw, meta = ck.restore_raw(step)
    except CorruptCheckpointError as e:
        problem = e.problem
    finally:
        ck.close()
    # Every process stops on the same branch: one that raised alone would leave the others
    # waiting at the next collective until the heartbeat timeout.
    if not distributed.all_agree(problem is None):  # a user's teacher: refused, never modified
        raise ConfigError("teacher.init", init, f"a readable kdprune_jax teacher checkpoint "
                          f"directory; its latest step {step} is unreadable "
                          f"({problem or 'on another process'})")
    if not (isinstance(raw, dict) and isinstance(raw.get("params"), dict)
            and isinstance(raw.get("batch_stats"), dict)):
        raise ConfigError("teacher.init", init, f"a kdprune_jax teacher checkpoint directory; "
                          f"step {step} holds no 'params' and 'batch_stats' (corrupt or not "
                          "a train state)")
    saved_classes = _saved_num_classes(config, num_classes, params, raw["params"])
    if saved_classes is not None and saved_classes != num_classes:
        raise ConfigError(
            "teacher.init", init,
            f"a teacher checkpoint with one output per class of the data ({num_classes} "
            f"classes); this {config.teacher.model} teacher was trained on data with "
            f"{saved_classes} classes. Point teacher.init at a teacher trained on this data, "
            "or set teacher.init='' to train one")
    where = f"teacher checkpoint {config.teacher.init} (step {step})"
    params = _fill_like(params, raw["params"], where, config.teacher.model)
    batch_stats = _fill_like(batch_stats, raw["batch_stats"], where, config.teacher.model)
    params, batch_stats = sharding.replicate((params, batch_stats), mesh)
    want = meta.get("checksum") or {}
    if want:  # silently altered bytes restore fine; the checksum saved with them does not
        got = state_checksums(TrainState(np.zeros((), np.int32), params, batch_stats, None))
        bad = [k for k in ("params", "batch_stats") if want.get(k) != got[k]]
        if bad:
            raise ConfigError("teacher.init", init, f"an intact kdprune_jax teacher checkpoint;"
                              f" the {bad[0]} of its step {step} do not match the checksum "
                              "recorded when it was saved (corrupt)")
    fp = artifacts.fingerprint({"init": os.path.abspath(config.teacher.init), "step": step,
                                "meta": meta})
    return graphdef, params, batch_stats, fp


def _saved_num_classes(config, num_classes: int, params, raw_params) -> int | None:
    """The class count a saved teacher was trained for, read off the parameters whose shape
    depends on num_classes (the head), or None if they do not tell (then `_fill_like`
    reports the first mismatching parameter)."""
    from flax import nnx

    other = nnx.eval_shape(lambda: _model(config.teacher, num_classes + 1, config.seed))
    saved = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(raw_params)[0]}
    other_flat = jax.tree_util.tree_leaves(nnx.split(other, nnx.Param, nnx.BatchStat)[1])
    found = set()
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], other_flat):
        if a.shape == b.shape:
            continue
        axis = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y][0]
        got = saved.get(_path_key(path))
        if got is None or len(got.shape) != len(a.shape) or any(
                g != w for i, (g, w) in enumerate(zip(got.shape, a.shape)) if i != axis):
            return None
        found.add(int(got.shape[axis]))
    return found.pop() if len(found) == 1 else None


def _path_key(path) -> tuple[str, ...]:
    """Key path -> tuple of names, without nnx's trailing 'value' level of saved Variables."""
    names = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def _fill_like(target, raw, where: str, model_name: str):
    """Put the arrays of a raw restored tree into `target`'s structure, checking shapes."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    saved = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(raw)[0]}
    leaves = []
    for path, leaf in flat:
        key = _path_key(path)
        got = saved.get(key)
        if got is None or tuple(got.shape) != tuple(leaf.shape):
            raise ArtifactError(
                f"{where} does not fit teacher.model={model_name!r}: parameter "
                f"{'/'.join(key)} is {'missing' if got is None else tuple(got.shape)} there, "
                f"{tuple(leaf.shape)} here; set teacher.model/width to the checkpoint's model")
        leaves.append(np.asarray(got, leaf.dtype))
    if len(saved) != len(flat):
        raise ArtifactError(f"{where} has {len(saved)} arrays, teacher.model={model_name!r} "
                            f"has {len(flat)}; set teacher.model/width to the checkpoint's model")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _kd_fingerprint(config) -> dict:
    """config.kd as the student depends on it; `teacher_views` only when the mode is on,
    so live-teacher runs keep the fingerprints they had before the field existed."""
    kd = config.kd.to_dict()
    if not kd.get("teacher_views") or not kd.get("alpha"):  # off, or no KD term to feed
        kd.pop("teacher_views", None)
    # kd.alpha="auto" is resolved before this (kd_alpha.resolve): the key holds the weight
    # and the rule file's sha256 (only then), never the rule's path.
    kd.pop("alpha_rule", None)
    if not kd.get("alpha_rule_sha256"):
        kd.pop("alpha_rule_sha256", None)
    return kd


def _role_fingerprint(config, role: str, **upstream) -> str:
    rc = config[role]
    return artifacts.fingerprint({
        "role": role, "model": rc.model, "width": rc.width, "optim": rc.optim.to_dict(),
        "seed": config.seed, "augment": config.data.augment, "image_size": config.data.image_size,
        "mean": list(config.data.mean), "std": list(config.data.std),
        "equal_steps": rc.get("equal_steps", False),
        **config_checks.compute_dtype_fingerprint(config), **upstream,
    })


def select_subset(config, ds: Data, workdir: str, scores=None, scores_meta=None):
    """The `select` stage: reuse DIR/subset.json when its fingerprint matches.

    `scores` (float [N_train], from the scores stage) is required for every method but
    random; the kept end is the method table's (`methods`, METHOD.md §3) unless
    prune.direction says otherwise."""
    p = config.prune
    direction = methods.get(p.method).keep if p.direction == "auto" else p.direction
    fp = artifacts.fingerprint({
        "data": ds.fingerprint, "method": p.method, "keep_fraction": p.keep_fraction,
        "seed": p.seed, "balanced": p.balanced, "direction": direction, "rule": p.rule,
        "ccs": [p.ccs_hard_cutoff, p.ccs_strata] if p.rule == "ccs" else None,
        "scores": (scores_meta or {}).get("fingerprint"),
    })
    path = os.path.join(workdir, "subset.json")
    old, problem = selection.read_subset(path)
    if old is not None and old.fingerprint == fp:
        problem = _subset_problem(old, ds)
        if problem is None:
            _log(f"[select] reusing {path} ({len(old.indices)} examples)")
            return old
    if problem:
        _log(f"[select] {path} is unreadable ({problem}); rebuilding")
    elif old is not None:
        _log(f"[select] {path} is stale (different data, scores or prune config); rebuilding")
    if p.method == "random":
        subset = selection.random_balanced(ds.train_labels, ds.pool, p.keep_fraction,
                                           ds.train.num_classes, p.seed, balanced=p.balanced)
    else:
        subset = selection.select_by_score(
            scores, ds.train_labels, ds.pool, p.keep_fraction, ds.train.num_classes,
            method=p.method, direction=direction, rule=p.rule, balanced=p.balanced,
            seed=p.seed, ccs_hard_cutoff=p.ccs_hard_cutoff, ccs_strata=p.ccs_strata)
    subset.fingerprint = fp
    _write_subset(path, subset)
    _log(f"[select] kept {len(subset.indices)}/{len(ds.pool)} examples "
         f"(keep_fraction {p.keep_fraction}, {p.method}, {direction}) -> {path}")
    return subset


def _subset_problem(subset, ds: Data) -> str | None:
    """What makes a saved subset unusable for this data (None if nothing)."""
    if subset.pool_size != len(ds.pool) or not np.all(np.isin(subset.indices, ds.pool)):
        return "indices outside this run's training pool"
    counts = np.bincount(ds.train_labels[subset.indices], minlength=ds.train.num_classes)
    if len(subset.class_counts) != len(counts) or np.any(counts != subset.class_counts):
        return "class_counts do not match the labels of the kept indices"
    return None


def _write_subset(path: str, subset) -> None:
    """Write subset.json (process 0 only), between the kill points of the select stage."""
    faults.maybe_kill("select:write")  # kill point: subset chosen, subset.json not written
    if jax.process_index() == 0:
        selection.save_subset(path, subset)
    faults.maybe_kill("select:written")  # kill point: subset.json written, no student yet


def _eval_split(graphdef, params, batch_stats, config, split, indices, mesh):
    _, eval_fn = data.make_transforms(config.data.augment, config.data.image_size,
                                      config.data.mean, config.data.std)
    dataset, _ = data.eval_dataset(
        split, indices, global_batch_size=config.eval.batch_size, transform=eval_fn,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=config.data.num_workers, prefetch=config.data.prefetch,
    )
    return evaluate(graphdef, params, batch_stats, dataset, mesh)


def teacher_stage(config, ds: Data, mesh, workdir: str, writer):
    """Train the teacher on the pool (resumable) or import it from ``teacher.init``, and
    evaluate it on the test split (cached). Returns ([graphdef, params, batch_stats],
    fingerprint, metrics)."""
    metrics = {}
    if config.teacher.init:
        *teacher, fp = import_teacher(config, ds.train.num_classes, mesh)
        metrics["source"] = config.teacher.init
    else:
        fp = _role_fingerprint(config, "teacher", data=ds.fingerprint)
        res = _train_role("teacher", config, ds, ds.pool, mesh, workdir, writer, fp)
        teacher = [res.graphdef, res.params, res.batch_stats]
        metrics.update(steps=res.steps, train_seconds=res.seconds)
    metrics.update(_cached_eval(
        workdir, "teacher", _eval_fingerprint(config, ds, fp), lambda: _eval_split(
            *teacher, config, ds.test, np.arange(len(ds.test)), mesh)))
    _log(f"[teacher] test accuracy {metrics['accuracy']:.4f}")
    return teacher, fp, metrics


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


def _lock_workdir(workdir: str) -> None:
    """Process 0 takes the lock; with several processes it broadcasts the outcome (taken,
    busy, or an OS error), so that no process goes on, or waits, alone."""
    holder, error = None, None
    if jax.process_index() == 0:
        try:
            holder = workdir_lock.try_acquire(workdir, log=_log)
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


def _class_keep_counts(config, ds: Data) -> np.ndarray:
    """`selection.class_keep_counts` of the pool. When a class would keep none only because
    the validation split left it too few examples in the pool (every class has enough
    before it), the error names data.val_fraction, the field to change, not
    prune.keep_fraction."""
    p, d, c = config.prune, config.data, ds.train.num_classes
    try:
        return selection.class_keep_counts(ds.train_labels[ds.pool], p.keep_fraction, c)
    except ConfigError as e:
        if e.field != "prune.keep_fraction" or d.val_fraction == 0:
            raise
        n_train = np.bincount(ds.train.labels, minlength=c)
        need = _pool_needed(config, n_train)
        if need == 1:  # too few examples even before the validation split
            raise
        n_pool = np.bincount(ds.train.labels[ds.pool], minlength=c)
        worst = int(np.argmin(n_pool))
        raise ConfigError(
            "data.val_fraction", d.val_fraction,
            f"a fraction leaving every class at least {need} training examples outside the "
            f"validation split, so that prune.keep_fraction={p.keep_fraction} keeps one of "
            f"each (class {worst} has {n_pool[worst]} of its {n_train[worst]} left); "
            + _use_val_fraction(n_train, need)) from None


def _pool_needed(config, n_train: np.ndarray) -> int:
    """Pool examples every class needs after the validation split: one, and with balanced
    selection enough for prune.keep_fraction to keep one of each (floor(f * n) >= 1), when
    every class has that many before the split (else keep_fraction is what to change)."""
    p = config.prune
    if p.balanced and 0 < p.keep_fraction <= 1:
        need = math.ceil(1 / p.keep_fraction)
        if n_train.min() >= need:
            return need
    return 1


def _use_val_fraction(n_train: np.ndarray, need: int) -> str:
    """The advice closing a data.val_fraction message: a fraction that leaves `need`."""
    bound = data.largest_fraction_leaving(n_train, need)
    return f"use data.val_fraction <= {bound:g}" if bound > 0 else "use data.val_fraction=0"


def _run(config, workdir: str, t_start: float) -> dict:
    mesh = sharding.make_mesh()
    writer = MetricsWriter(workdir)
    timings = {}

    t = time.perf_counter()
    ds = load_data(config)
    timings["data_seconds"] = time.perf_counter() - t
    _log(f"[data] {len(ds.train)} train ({len(ds.pool)} pool + {len(ds.val)} val), "
         f"{len(ds.test)} test, {ds.train.num_classes} classes; {jax.device_count()} devices")

    # Data-dependent checks before any training: a class left empty, batch vs subset size.
    p = config.prune
    if p.balanced:
        n_keep = int(_class_keep_counts(config, ds).sum())
    else:
        n_keep = int(round(p.keep_fraction * len(ds.pool)))
    if n_keep < config.student.optim.batch_size and not config.student.equal_steps:
        raise ConfigError("student.optim.batch_size", config.student.optim.batch_size,
                          f"at most the subset size ({n_keep} examples at "
                          f"keep_fraction {p.keep_fraction})")
    # Both schedules must hold at least one full batch; checked here so a too-short
    # student schedule stops the run before the teacher is trained, not after.
    trained = [("student", len(ds.pool) if config.student.equal_steps else n_keep)]
    if config_checks.teacher_stage_runs(config) and not config.teacher.init:
        trained.insert(0, ("teacher", len(ds.pool)))
    for role, n in trained:
        o = config[role].optim
        if data.num_train_steps(n, o.batch_size, o.num_epochs) < 1:
            raise ConfigError(f"{role}.optim.batch_size", o.batch_size,
                              f"at most the number of training examples ({n}) times "
                              f"{role}.optim.num_epochs ({o.num_epochs}): one full batch")

    if p.method == "ifbeta":
        ifbeta_stage.validation_halves(config, ds)
        if config.ifbeta.features_dir:  # unreadable given features stop the run right here
            ifbeta_stage.check_features_dir(config, ds)
    if p.scores_file:  # a mismatching score file stops the run before any training
        score_stage.load_external_scores(p.scores_file, {"method": p.method,
                                                         "data": ds.fingerprint},
                                         len(ds.train))

    # ---- teacher
    teacher, teacher_fp, teacher_metrics = None, "", {}
    if config_checks.teacher_stage_runs(config):
        t = time.perf_counter()
        teacher, teacher_fp, teacher_metrics = teacher_stage(config, ds, mesh, workdir, writer)
        timings["teacher_seconds"] = time.perf_counter() - t

    # ---- scores (or, for IF-Beta: features -> influence ranks -> policy)
    scores, scores_meta, policy_rec = None, None, None
    teacher_model = score_stage.Model(*teacher, teacher_fp) if teacher is not None else None
    if config.prune.method == "ifbeta":
        t = time.perf_counter()
        subset, policy_rec = ifbeta_stage.select_ifbeta(config, ds, mesh, workdir, writer,
                                                        _log, teacher_model)
        timings["policy_seconds"] = time.perf_counter() - t
        subset.fingerprint = artifacts.fingerprint({"policy": policy_rec["fingerprint"],
                                                    "data": ds.fingerprint})
        _write_subset(os.path.join(workdir, "subset.json"), subset)
        _log(f"[select] IF-Beta kept {len(subset.indices)}/{len(ds.pool)} examples "
             f"(a {subset.params['a']:.3f}, b {subset.params['b']:.3f})")
    elif config.prune.method != "random":
        t = time.perf_counter()
        scores, scores_meta = score_stage.compute_scores(config, ds, mesh, workdir, writer,
                                                         _log, teacher_model)
        timings["scores_seconds"] = time.perf_counter() - t

    # ---- select
    if config.prune.method != "ifbeta":
        t = time.perf_counter()
        subset = select_subset(config, ds, workdir, scores, scores_meta)
        timings["select_seconds"] = time.perf_counter() - t

    # ---- student
    t = time.perf_counter()
    student_fp = _role_fingerprint(
        config, "student", data=ds.fingerprint, subset=subset.fingerprint,
        teacher=teacher_fp, kd=_kd_fingerprint(config) if teacher is not None else None,
    )
    o = config.student.optim
    num_steps = None
    if config.student.equal_steps:
        num_steps = data.num_train_steps(len(ds.pool), o.batch_size, o.num_epochs)
    views = None
    if teacher is not None and config.kd.alpha > 0 and config.kd.teacher_views > 0:
        views = teacher_cache.teacher_views(config, ds, mesh, workdir, teacher_model,
                                            subset.indices, _log)
        timings["teacher_views_seconds"] = time.perf_counter() - t
        t = time.perf_counter()  # student_seconds: the training alone
    res = _train_role("student", config, ds, subset.indices, mesh, workdir, writer,
                      student_fp, teacher=teacher, num_steps=num_steps, teacher_views=views)
    timings["student_seconds"] = time.perf_counter() - t

    # ---- eval
    results_path = os.path.join(workdir, "results.json")
    results_fp = _eval_fingerprint(config, ds, student_fp)
    old, problem = artifacts.read_json_checked(results_path)
    if old is not None:
        problem = _results_problem(old, subset if old.get("fingerprint") == results_fp else None,
                                   teacher is not None)
    if problem:
        _log(f"[eval] {results_path} is unreadable ({problem}); re-evaluating")
    if old is not None and not problem and old["fingerprint"] == results_fp:
        _log(f"[eval] reusing {results_path}")
        results = old
    else:
        t = time.perf_counter()
        student_test = _eval_split(res.graphdef, res.params, res.batch_stats, config,
                                   ds.test, np.arange(len(ds.test)), mesh)
        faults.maybe_kill("eval:test")  # kill point: between the test and val evaluations
        student_val = _eval_split(res.graphdef, res.params, res.batch_stats, config,
                                  ds.train, ds.val, mesh) if len(ds.val) else {}
        timings["eval_seconds"] = time.perf_counter() - t
        results = {
            "fingerprint": results_fp,
            "student": {"model": config.student.model, "test": student_test, "val": student_val,
                        "steps": res.steps, "train_seconds": res.seconds},
            "teacher": {"model": config.teacher.model, **teacher_metrics} if teacher else None,
            "subset": {"method": subset.method, "keep_fraction": subset.keep_fraction,
                       "num_kept": len(subset.indices), "pool_size": subset.pool_size,
                       "seed": subset.seed, "direction": subset.direction,
                       "params": subset.params},
            # What choosing the subset cost beyond the teacher: proxy training + scoring
            # (Paul et al.'s proxies count toward the method's pruning cost).
            "pruning_cost": {
                "proxy_seconds": (scores_meta or {}).get("proxy_seconds", 0.0),
                "scoring_seconds": (scores_meta or {}).get("scoring_seconds", 0.0),
                "policy_seconds": (policy_rec or {}).get("seconds", 0.0),
            },
            "policy": {k: policy_rec[k] for k in ("a", "b", "method", "outer_at_init",
                                                  "outer_at_learned")} if policy_rec else None,
            "kd": config.kd.to_dict() if teacher is not None else {"alpha": 0.0},
            "devices": jax.device_count(),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "config": json.loads(config.to_json_best_effort()),
        }
        faults.maybe_kill("eval:write")  # kill point: every metric computed, none written
        if jax.process_index() == 0:
            artifacts.write_json(results_path, results)
    results["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    _log(format_results(results))
    return results


def _eval_fingerprint(config, ds: Data, model_fp: str) -> str:
    """Key of a final evaluation: the model, the test split and the eval transform."""
    d = config.data
    return artifacts.fingerprint({"model": model_fp, "test": ds.test_fingerprint,
                                  "eval": [d.augment, d.image_size, list(d.mean), list(d.std)]})


_METRICS = {"accuracy": artifacts.NUMBER, "loss": artifacts.NUMBER, "count": int}


def _results_problem(r, subset, has_teacher: bool) -> str | None:
    """What makes a parsed results.json unusable (None if nothing): a missing key or a
    wrong type anywhere `format_results` or a reader looks, or (given the run's `subset`,
    i.e. when the fingerprint matches) another subset size."""
    n = artifacts.NUMBER
    problem = artifacts.check_fields(r, {
        "fingerprint": str, "student.model": str, "student.train_seconds": n,
        "student.val": dict, "subset.num_kept": int, "subset.pool_size": int,
        "subset.keep_fraction": n, "subset.method": str, "kd.alpha": n, "devices": int,
        **{f"student.test.{k}": t for k, t in _METRICS.items()},
        **({"teacher.model": str, "teacher.accuracy": n, "teacher.loss": n}
           if has_teacher else {})})
    if problem is None and subset is not None and r["subset"]["num_kept"] != len(subset.indices):
        problem = (f"subset.num_kept is {r['subset']['num_kept']}, the subset has "
                   f"{len(subset.indices)} examples")
    return problem


def _cached_eval(workdir, role, fp, compute) -> dict:
    """Eval of a frozen model, cached in DIR/<role>_eval.json by `fp` (the model's
    fingerprint with the test split's, `_eval_fingerprint`)."""
    path = os.path.join(workdir, f"{role}_eval.json")
    old, problem = artifacts.read_json_checked(path)
    if old is not None:
        problem = artifacts.check_fields(old, {"fingerprint": str, **{
            f"metrics.{k}": t for k, t in _METRICS.items()}})
    if problem:
        _log(f"[{role}] {path} is unreadable ({problem}); re-evaluating")
    elif old is not None and old["fingerprint"] == fp:
        return old["metrics"]
    metrics = compute()
    if jax.process_index() == 0:
        artifacts.write_json(path, {"fingerprint": fp, "metrics": metrics})
    return metrics


def format_results(r: dict) -> str:
    """The final results table (also what a person reads at the end of a run)."""
    rows = [("stage", "model", "examples", "test acc", "test loss", "train s")]
    if r.get("teacher"):
        t = r["teacher"]
        rows.append(("teacher", t["model"], "-", f"{t['accuracy']:.4f}", f"{t['loss']:.4f}",
                     f"{t.get('train_seconds', 0):.1f}"))
    s, sub = r["student"], r["subset"]
    rows.append(("student", s["model"], f"{sub['num_kept']}/{sub['pool_size']}",
                 f"{s['test']['accuracy']:.4f}", f"{s['test']['loss']:.4f}",
                 f"{s['train_seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (f"results: keep_fraction {sub['keep_fraction']} ({sub['method']}), "
            f"kd alpha {r['kd'].get('alpha')}, {r['devices']} devices")
    return "\n".join([head, *lines])


__all__ = ["ArtifactError", "Data", "format_results", "load_data", "run", "select_subset"]
