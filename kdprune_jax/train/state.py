"""Train state and optimizer construction (optax SGD + momentum, cosine or step schedule)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from kdprune_jax.errors import ConfigError

SCHEDULES = ("cosine", "step", "constant")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed as is).

    The model's graphdef and the optimizer's update rule are static and live in the jitted
    step's closure, so a checkpoint holds arrays only.
    """

    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of nnx.Param
    batch_stats: Any  # nnx.State of nnx.BatchStat (running BatchNorm statistics)
    opt_state: Any
    # Optional per-run trackers updated inside the step (e.g. the forgetting tracker);
    # part of the state so they are sharded, donated and checkpointed with it.
    extra: Any = None

    @classmethod
    def create(cls, params, batch_stats, tx: optax.GradientTransformation,
               extra=None) -> TrainState:
        return cls(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params), extra)


def learning_rate_schedule(opt_cfg, steps_per_epoch: float, total_steps: int):
    """optax schedule from ``opt_cfg`` (learning_rate, schedule, warmup_epochs,
    step_boundaries_epochs, step_decay). Durations are in epochs, converted with
    `steps_per_epoch`, so the same config works for any subset size."""
    lr = opt_cfg.learning_rate
    warmup = int(round(opt_cfg.get("warmup_epochs", 0.0) * steps_per_epoch))
    warmup = min(warmup, max(total_steps - 1, 0))
    kind = opt_cfg.get("schedule", "cosine")
    if kind == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    elif kind == "step":
        bounds = {
            int(round(b * steps_per_epoch)) - warmup: opt_cfg.get("step_decay", 0.1)
            for b in opt_cfg.get("step_boundaries_epochs", ())
        }
        main = optax.piecewise_constant_schedule(lr, {k: v for k, v in bounds.items() if k > 0})
    elif kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ConfigError("schedule", kind, ", ".join(SCHEDULES))
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(opt_cfg, steps_per_epoch: float, total_steps: int):
    """SGD with (Nesterov) momentum and coupled L2 weight decay on conv/dense kernels only
    (biases and BatchNorm scales are not decayed, as in the reference ResNet recipes).

    Returns (tx, schedule)."""
    schedule = learning_rate_schedule(opt_cfg, steps_per_epoch, total_steps)

    def kernel_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    tx = optax.chain(
        optax.add_decayed_weights(opt_cfg.get("weight_decay", 0.0), mask=kernel_mask),
        optax.sgd(schedule, momentum=opt_cfg.get("momentum", 0.9) or None,
                  nesterov=opt_cfg.get("nesterov", True)),
    )
    return tx, schedule
