"""Training: state, jitted steps, the resumable loop, checkpoints and metrics."""

from kdprune_jax.train.loop import NonFiniteLossError, TrainResult, evaluate, train_model
from kdprune_jax.train.state import TrainState, make_optimizer
from kdprune_jax.train.steps import make_eval_step, make_kd_train_step

__all__ = [
    "NonFiniteLossError", "TrainResult", "TrainState", "evaluate", "make_eval_step",
    "make_kd_train_step", "make_optimizer", "train_model",
]
