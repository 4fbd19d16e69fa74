"""The `teacher` stage: train the teacher on the pool (resumable, DIR/teacher/) or import
it from ``teacher.init`` (a kdprune_jax teacher checkpoint directory, or a PyTorch state
dict in torchvision's ResNet layout), then evaluate it on the test split (cached in
DIR/teacher_eval.json)."""

from __future__ import annotations

import os

import jax
import numpy as np

from kdprune_jax import artifacts, distributed, models, sharding
from kdprune_jax.context import Run
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.inference import FrozenModel
from kdprune_jax.stages import training
from kdprune_jax.train.checkpoint import Checkpointer, CorruptCheckpointError, state_checksums
from kdprune_jax.train.state import TrainState

SEED_OFFSET = 1000  # the teacher's init / data-order seed is config.seed + 1000


def key(run: Run) -> str:
    """Key of a teacher trained here: its recipe and the data (an imported teacher's key
    is its file's, see `import_teacher`)."""
    return training.role_key(run.config, "teacher", data=run.splits.fingerprint)


def compute(run: Run) -> tuple[FrozenModel, dict]:
    """The teacher and its metrics ({"accuracy", "loss", "count"} on the test split, plus
    "steps" and "train_seconds" when trained here or "source" when imported)."""
    c, metrics = run.config, {}
    if c.teacher.init:
        teacher = import_teacher(c, run.splits.num_classes, run.mesh)
        metrics["source"] = c.teacher.init
    else:
        seed = c.seed + SEED_OFFSET
        res = training.train(
            run, "teacher",
            lambda: training.create_model(c.teacher, run.splits.num_classes, seed),
            run.splits.pool, key(run), optim=c.teacher.optim, seed=seed)
        teacher = FrozenModel(res.graphdef, res.params, res.batch_stats, key(run))
        metrics.update(steps=res.steps, train_seconds=res.seconds)
    metrics.update(training.cached_eval(
        run, "teacher", training.eval_key(run, teacher.fingerprint),
        lambda: training.evaluate_test(run, teacher.parts)))
    run.log(f"[teacher] test accuracy {metrics['accuracy']:.4f}")
    return teacher, metrics


def import_teacher(config, num_classes: int, mesh):
    """Load the teacher named by ``teacher.init``: a teacher trained by kdprune_jax (another
    workdir's ``teacher/`` directory), or a PyTorch ``.pt``/``.pth`` state dict in
    torchvision's ResNet layout (``models.torch_import``; needs the ``torch`` extra). Only
    params and BatchNorm statistics are read, so the optimizer the teacher was trained with
    does not matter; every array must match the configured model's shape.

    A PyTorch teacher is fingerprinted by the sha256 of the file's bytes (plus model and
    width), so downstream artifacts survive moving the file and go stale when it changes.

    Returns a `FrozenModel` replicated on `mesh`.
    """
    from flax import nnx

    # Abstract (shapes/dtypes only): every value is overwritten, and eagerly initializing a
    # ResNet-50 just to discard it takes tens of seconds on a CPU.
    model = nnx.eval_shape(
        lambda: training.create_model(config.teacher, num_classes, config.seed))
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
        return FrozenModel(graphdef, params, batch_stats, fp)
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
    return FrozenModel(graphdef, params, batch_stats, fp)


def _saved_num_classes(config, num_classes: int, params, raw_params) -> int | None:
    """The class count a saved teacher was trained for, read off the parameters whose shape
    depends on num_classes (the head), or None if they do not tell (then `_fill_like`
    reports the first mismatching parameter)."""
    from flax import nnx

    other = nnx.eval_shape(
        lambda: training.create_model(config.teacher, num_classes + 1, config.seed))
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
