"""What the teacher, proxies and student stages share: training one network on train
indices (resumable, `train.train_model`), the key of a trained role, and the evaluation of
a frozen model on the test split (with its key and its cached form)."""

from __future__ import annotations

import numpy as np

from kdprune_jax import artifacts, config_checks, data, models, sharding
from kdprune_jax.context import Run
from kdprune_jax.errors import ConfigError
from kdprune_jax.inference import FrozenModel
from kdprune_jax.stages import cache
from kdprune_jax.train import TrainResult, evaluate, train_model

METRICS = {"accuracy": artifacts.NUMBER, "loss": artifacts.NUMBER, "count": int}


def create_model(role_cfg, num_classes: int, seed: int):
    """The nnx model a role config (teacher / student) names, initialised from `seed`."""
    return models.create_model(role_cfg.model, num_classes=num_classes, seed=seed,
                               width=role_cfg.width)


def role_key(config, role: str, **upstream) -> str:
    """Key of a trained teacher or student: its model and recipe, the seed, the train
    transform, the compute dtype, plus `upstream` (data, subset, teacher, KD)."""
    rc = config[role]
    return artifacts.fingerprint({
        "role": role, "model": rc.model, "width": rc.width, "optim": rc.optim.to_dict(),
        "seed": config.seed, "augment": config.data.augment, "image_size": config.data.image_size,
        "mean": list(config.data.mean), "std": list(config.data.std),
        "equal_steps": rc.get("equal_steps", False),
        **config_checks.compute_dtype_fingerprint(config), **upstream,
    })


def train(run: Run, name: str, make_model, indices, key: str, *, optim, seed: int,
          num_steps: int | None = None, teacher: FrozenModel | None = None,
          kd_weight: float = 0.0, teacher_views=None, role: str | None = None,
          ckpt_dir: str | None = None, track_forgetting: bool = False) -> TrainResult:
    """Train ``make_model()`` (an initialised nnx module, built only once the schedule is
    checked) on train `indices` with the `optim` recipe, resuming from ``DIR/<name>/`` (or
    `ckpt_dir`) when its checkpoint carries `key`.

    num_steps: default ``num_train_steps(len(indices), optim.batch_size, optim.num_epochs)``.
    teacher / kd_weight: the KD term (a live teacher); with `teacher_views` the teacher's
      logits come from the cache through the input pipeline and the teacher is not run.
    role: the config section whose optim the errors name (default `name`; the proxies
      train with the student's).
    """
    c, role = run.config, role or name
    sharding.local_batch_size(optim.batch_size, f"{role}.optim.batch_size")  # uneven: raises
    if num_steps is None:
        num_steps = data.num_train_steps(len(indices), optim.batch_size, optim.num_epochs)
    if num_steps < 1:
        raise ConfigError(f"{role}.optim.batch_size", optim.batch_size,
                          f"at most the number of training examples ({len(indices)}) times "
                          f"{role}.optim.num_epochs")
    cached = teacher_views is not None
    return train_model(
        name=name, model=make_model(),
        dataset_fn=lambda: run.train_batches(indices, batch_size=optim.batch_size,
                                             num_steps=num_steps, seed=seed,
                                             teacher_views=teacher_views),
        num_steps=num_steps, steps_per_epoch=len(indices) / optim.batch_size, opt_cfg=optim,
        mesh=run.mesh, ckpt_dir=ckpt_dir or run.path(name), fingerprint=key,
        writer=run.writer, teacher=None if (cached or teacher is None) else teacher.parts,
        cached_teacher=cached, kd_weight=kd_weight, temperature=c.kd.temperature,
        global_batch_size=optim.batch_size, log_every_steps=c.log_every_steps,
        checkpoint_every_steps=c.checkpoint_every_steps, log=run.log,
        track_forgetting_examples=len(run.splits.train) if track_forgetting else 0,
        compute_dtype=config_checks.compute_dtype(c))


def eval_key(run: Run, model_key: str) -> str:
    """Key of a final evaluation: the model, the test split and the eval transform."""
    return artifacts.fingerprint({"model": model_key, "test": run.splits.test_fingerprint,
                                  "eval": run.transform_key()})


def evaluate_test(run: Run, model) -> dict:
    """{"accuracy", "loss", "count"} of a model ((graphdef, params, batch_stats) parts) on
    the whole test split."""
    batches = run.eval_batches(np.arange(len(run.splits.test)), split="test")
    return evaluate(*model, batches, run.mesh)


def evaluate_val(run: Run, model) -> dict:
    """The same metrics on the validation split ({} when there is none)."""
    if not len(run.splits.val):
        return {}
    batches = run.eval_batches(run.splits.val, batch_size=run.config.eval.batch_size)
    return evaluate(*model, batches, run.mesh)


def cached_eval(run: Run, role: str, key: str, compute) -> dict:
    """``compute()`` (metrics of a frozen model), cached in DIR/<role>_eval.json by `key`
    (`eval_key`)."""
    def read(path):
        old, problem = artifacts.read_json_checked(path)
        if old is not None:
            problem = artifacts.check_fields(old, {"fingerprint": str, **{
                f"metrics.{k}": t for k, t in METRICS.items()}})
        return (None, problem) if problem else (old, None)

    got = cache.reuse_or_compute(
        cache.Artifact(role, run.path(f"{role}_eval.json"), redo="re-evaluating",
                       stale="another model or test split"), key,
        read=read, key_of=lambda d: d["fingerprint"], log=run.log,
        compute=lambda: {"fingerprint": key, "metrics": compute()},
        write=artifacts.write_json)
    return got["metrics"]


__all__ = ["METRICS", "cached_eval", "create_model", "eval_key", "evaluate_test",
           "evaluate_val", "role_key", "train"]

