"""The training loop: resumable, sharded, guarded against implicit transfers and NaNs."""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdprune_jax import faults, models, preemption, sharding
from kdprune_jax.errors import UserError
from kdprune_jax.scoring.forgetting import init_tracker
from kdprune_jax.train.checkpoint import open_for_training
from kdprune_jax.train.metrics import MetricsWriter, ProgressBar
from kdprune_jax.train.state import TrainState, make_optimizer
from kdprune_jax.train.steps import make_eval_step, make_kd_train_step


class NonFiniteLossError(UserError):
    """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    graphdef: object
    params: object
    batch_stats: object
    steps: int
    # Total wall time spent training this model, summed over interrupted runs and kept in
    # the checkpoint metadata, so a reused model still reports what it cost.
    seconds: float
    resumed_from: int | None
    extra: object = None  # trackers carried in the state (e.g. forgetting)
    reused: bool = False  # True when the checkpoint was already complete


def train_model(
    *,
    name: str,
    model: nnx.Module,
    dataset_fn,
    num_steps: int,
    steps_per_epoch: float,
    opt_cfg,
    mesh,
    ckpt_dir: str,
    fingerprint: str,
    writer: MetricsWriter,
    teacher=None,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
    global_batch_size: int = 0,
    log_every_steps: int = 50,
    checkpoint_every_steps: int = 500,
    log=print,
    track_forgetting_examples: int = 0,
    on_log=None,
    compute_dtype=None,
    cached_teacher: bool = False,
) -> TrainResult:
    """Train `model` for `num_steps` steps, resuming from `ckpt_dir` if possible.

    Args:
      model: initialized nnx module (its weights are the step-0 state).
      dataset_fn: () -> grain IterDataset of this process's batches (exactly num_steps).
      teacher: None or (graphdef, params, batch_stats) of a frozen teacher.
      fingerprint: identifies this run; a checkpoint with another fingerprint is moved aside.
      track_forgetting_examples: if > 0, track forgetting events for example indices in
        [0, this) on device (returned in TrainResult.extra).
      on_log: optional ``(step, metrics) -> None`` called on every logging step with the
        host-side averaged metrics (e.g. to watch memory in a soak test). It runs inside
        the loop's transfer guard, so it must not move data between host and device.
      cached_teacher: the teacher's logits come with each batch (dataset_fn built with
        `teacher_views`); `teacher` must be None, `kd_weight` still weighs the KD term.
      compute_dtype: None (float32) or e.g. jnp.bfloat16: the train step's student and
        teacher compute in it (`models.with_compute_dtype`); params, batch statistics,
        loss and optimizer state stay float32. The returned graphdef is the float32 one,
        so scoring, HVPs and evaluation downstream run in float32.
    Returns:
      TrainResult with the final (replicated) params and batch stats.
    """
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx, schedule = make_optimizer(opt_cfg, steps_per_epoch, num_steps)
    extra = init_tracker(track_forgetting_examples) if track_forgetting_examples else None
    state = sharding.replicate(TrainState.create(params, batch_stats, tx, extra), mesh)

    # A stale checkpoint directory is moved aside; a corrupt step too, with one log line,
    # and the latest intact step (or step 0) is where training continues.
    ckpt, latest, state, saved_meta, data_iter = open_for_training(
        ckpt_dir, fingerprint, state, lambda: iter(dataset_fn()), log=log, name=name,
        final_step=num_steps)
    start, resumed_from = 0, None
    meta = {"fingerprint": fingerprint, "num_steps": num_steps, "name": name}
    prior_seconds = 0.0  # training time already spent by earlier (interrupted) runs
    if latest is not None:
        prior_seconds = float(saved_meta.get("train_seconds", 0.0))
        start = resumed_from = int(latest)
        if start >= num_steps:
            log(f"[{name}] already trained ({num_steps} steps); reusing {ckpt_dir}")
        else:
            log(f"[{name}] resumed from step {start}/{num_steps}")
    if start >= num_steps:
        ckpt.close()
        return TrainResult(graphdef, state.params, state.batch_stats, num_steps, prior_seconds,
                           start, state.extra, reused=True)

    teacher_graphdef, teacher_vars = None, None
    if teacher is not None:
        teacher_graphdef = models.with_compute_dtype(*teacher, compute_dtype)
        teacher_vars = sharding.replicate((teacher[1], teacher[2]), mesh)
    step_fn = make_kd_train_step(
        models.with_compute_dtype(graphdef, params, batch_stats, compute_dtype), tx, mesh,
        teacher_graphdef=teacher_graphdef, kd_weight=kd_weight,
        temperature=temperature, learning_rate_fn=schedule,
        track_forgetting=bool(track_forgetting_examples), cached_teacher=cached_teacher,
    )
    # Fault injection (faults.py): KDPRUNE_KILL_AT=<name>:<step> SIGKILLs the process right
    # after that step; checked per step only when a kill point of this loop is set.
    kill_armed = faults.armed(f"{name}:") or faults.signal_armed(f"{name}:")
    # XLA:CPU with several processes (gloo collectives) can deadlock when consecutive
    # steps overlap (observed with JAX 0.10.2: both processes stuck in their all-reduces
    # after ~150 steps). Waiting for each step costs nothing on a real multi-host pod
    # (TPU/GPU runs never take this path) and keeps multi-process CPU runs deterministic.
    sync_every_step = jax.process_count() > 1 and jax.default_backend() == "cpu"
    # A stop request (SIGTERM/SIGINT, preemption.py) is read after every step; with several
    # processes it is agreed on by an all-gather, on logging steps only (a per-step host
    # collective would serialize an accelerator's dispatch), so all stop after one step.
    stop_every = 1 if jax.process_count() == 1 else log_every_steps
    bar = ProgressBar(name, num_steps, start, images_per_step=global_batch_size)
    pending, last_good = [], None
    t0 = time.perf_counter()
    t_log, last_log_step = t0, start
    # Inside the loop every host<->device move is explicit (batch placement, metric
    # fetches on log steps); an accidental implicit transfer (a Python scalar into the
    # step, a stray float() on a device array) raises instead of silently syncing.
    with jax.transfer_guard("disallow"):
        for step in range(start + 1, num_steps + 1):
            batch = next(data_iter)
            batch = sharding.to_global(batch, mesh)
            state, metrics = step_fn(state, teacher_vars, batch)
            if sync_every_step:
                metrics = jax.block_until_ready(metrics)
            pending.append(metrics)
            is_last = step == num_steps
            if step % log_every_steps == 0 or is_last:
                host = jax.device_get(pending)
                pending = []
                avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                if not all(math.isfinite(v) for v in avg.values()):
                    raise _non_finite(f"non-finite loss at step {step} (metrics {avg})",
                                      name, last_good, ckpt, ckpt_dir)
                last_good = {"step": step, **avg}
                now = time.perf_counter()
                rate = global_batch_size * (step - last_log_step) / max(now - t_log, 1e-9)
                t_log, last_log_step = now, step
                writer.write(name, step, epoch=step / steps_per_epoch,
                             images_per_sec=rate, **avg)
                if on_log is not None:
                    on_log(step, avg)
                bar.update(step, f"loss {avg['loss']:.4f} acc {avg['accuracy']:.3f}")
            else:
                bar.update(step)
            if step % checkpoint_every_steps == 0 or is_last:
                # The loss of step k is computed BEFORE update k, and checkpoint steps need
                # not be logging steps: only finite weights are saved, so the last
                # checkpoint is always a good one to resume from.
                if not bool(jax.device_get(_all_finite((state.params, state.batch_stats)))):
                    raise _non_finite(f"non-finite parameters after step {step}", name,
                                      last_good, ckpt, ckpt_dir)
                meta["train_seconds"] = prior_seconds + time.perf_counter() - t0
                ckpt.save(step, state, meta, data_iter, force=is_last)
            if kill_armed:  # kill point <name>:<step>; waits for the saves started so far to
                # commit, so the resume point is deterministic
                faults.maybe_kill(f"{name}:{step}", before=ckpt.wait)
                faults.maybe_signal(f"{name}:{step}")  # KDPRUNE_SIGNAL_AT: a real SIGTERM
            if not is_last and step % stop_every == 0 and preemption.stop_requested():
                _save_and_stop(name, step, num_steps, state, meta, data_iter, ckpt, ckpt_dir,
                               saved=step % checkpoint_every_steps == 0,
                               train_seconds=prior_seconds + time.perf_counter() - t0)
    bar.close()
    ckpt.close()
    seconds = prior_seconds + time.perf_counter() - t0
    return TrainResult(graphdef, state.params, state.batch_stats, num_steps, seconds,
                       resumed_from, state.extra)


def _save_and_stop(name, step, num_steps, state, meta, data_iter, ckpt, ckpt_dir, *, saved,
                   train_seconds):
    """Commit a checkpoint of exactly `step` (unless the loop just saved it) and raise
    Preempted with the line main prints. Errors of the (asynchronous) save surface in
    `wait`, so they are reported here, not lost."""
    if not saved:
        if not bool(jax.device_get(_all_finite((state.params, state.batch_stats)))):
            raise _non_finite(f"non-finite parameters after step {step}", name, None, ckpt,
                              ckpt_dir)
        meta["train_seconds"] = train_seconds
        ckpt.save(step, state, meta, data_iter, force=True)
    ckpt.close()  # waits for every save in flight to commit
    raise preemption.Preempted(
        f"[{name}] stopped by {preemption.signal_name()} after step {step}/{num_steps}; "
        f"checkpoint of step {step} saved in {ckpt_dir}; rerun the same command to resume "
        "from it")


@jax.jit
def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _non_finite(what: str, name: str, last_good, ckpt, ckpt_dir) -> NonFiniteLossError:
    """The error for a NaN/Inf: the step, the last finite metrics, the kept checkpoint."""
    ckpt.wait()
    good = ckpt.latest_step()
    ckpt.close()
    knob = (f"config.{name}.optim.learning_rate" if name in ("teacher", "student")
            else "config.*.optim.learning_rate")
    return NonFiniteLossError(
        f"[{name}] {what}; last finite metrics: "
        f"{last_good or 'none logged in this run'}; last good checkpoint: "
        f"{f'step {good} in {ckpt_dir} (kept)' if good is not None else 'none written yet'}"
        f"; non-finite weights are never saved. Lower the learning rate ({knob}).")


def evaluate(graphdef, params, batch_stats, dataset, mesh) -> dict:
    """Accuracy and mean CE over a padded+masked eval dataset (each example counted once).

    Returns {"accuracy", "loss", "count"} as Python floats.
    """
    eval_step = make_eval_step(graphdef, mesh)
    params, batch_stats = sharding.replicate((params, batch_stats), mesh)
    sums = []
    for batch in dataset:
        sums.append(eval_step(params, batch_stats, sharding.to_global(batch, mesh)))
    host = jax.device_get(sums)
    tot = {k: float(sum(s[k] for s in host)) for k in host[0]}
    n = max(tot["count"], 1.0)
    return {"accuracy": tot["correct"] / n, "loss": tot["loss"] / n, "count": int(tot["count"])}
