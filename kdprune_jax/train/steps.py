"""Jitted steps: the KD train step and the masked eval step.

Both are pure functions over pytrees, compiled ONCE with explicit shardings on the
("data",) mesh: state/teacher replicated, batch sharded on its leading axis. The train step
donates its state (the old params/optimizer buffers are reused for the new ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdprune_jax import cpu_flags, losses, sharding
from kdprune_jax.scoring.forgetting import update_tracker
from kdprune_jax.train.state import TrainState


def make_kd_train_step(
    student_graphdef,
    tx: optax.GradientTransformation,
    mesh,
    *,
    teacher_graphdef=None,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
    learning_rate_fn=None,
    track_forgetting: bool = False,
    cached_teacher: bool = False,
):
    """Build ``step(state, teacher_vars, batch) -> (state, metrics)``.

    - The student runs in train mode (batch statistics; running stats updated).
    - The teacher (if given) runs in inference mode on the SAME augmented batch, its logits
      under stop_gradient (inside `losses.kd_loss`); it is an argument, not part of the
      state, so it is never updated or checkpointed with the student.
    - Per-example loss = METHOD.md §2; the step minimizes its batch mean.

    Args:
      teacher_vars: ``(params, batch_stats)`` of the teacher, or None without a teacher
        (then kd_weight must be 0: plain CE).
      batch: {"image": float32 [B, H, W, C], "label": int32 [B], ...} sharded on "data".
    Returns:
      metrics: {"loss", "accuracy", "kd_agreement", "learning_rate"} float32 scalars
      (batch means; kd_agreement = fraction of the batch where student and teacher argmax
      agree; learning_rate = the schedule at this step, if `learning_rate_fn` is given).

    With ``cached_teacher=True`` there is no teacher forward: the teacher's logits come with
    the batch (``batch["teacher_logits"]``: float32 [B, C], cached for the same augmented
    view, see `data.TeacherViews`) and `teacher_vars` is ignored (pass None).

    With ``track_forgetting=True`` the state's `extra` must be a
    `scoring.ForgettingTracker`; the step records each example's correctness (by its
    ``batch["index"]``) on device, with no host work.
    """
    if teacher_graphdef is None and kd_weight != 0 and not cached_teacher:
        raise ValueError("kd_weight > 0 needs a teacher (a graphdef or cached logits)")
    if cached_teacher and teacher_graphdef is not None:
        raise ValueError("a cached teacher replaces the live one: pass teacher_graphdef=None")

    def step(state: TrainState, teacher_vars, batch):
        x, y = batch["image"], batch["label"]
        t_logits = None
        if cached_teacher:
            t_logits = batch["teacher_logits"]
        elif teacher_graphdef is not None:
            teacher = nnx.merge(teacher_graphdef, *teacher_vars)
            t_logits = teacher(x, train=False)

        def loss_fn(params):
            # copy=True: the merged module must not alias the donated input buffers that
            # BatchNorm's running-stat update writes over.
            model = nnx.merge(student_graphdef, params, state.batch_stats, copy=True)
            logits = model(x, train=True)
            per_ex = losses.kd_loss(logits, t_logits, y, kd_weight=kd_weight,
                                    temperature=temperature)
            return per_ex.mean(), (logits, nnx.state(model, nnx.BatchStat))

        (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        pred = jnp.argmax(logits, -1)
        metrics = {"loss": loss, "accuracy": jnp.mean(pred == y)}
        if learning_rate_fn is not None:
            # Computed on device: evaluating the schedule on the host would be an implicit
            # transfer inside the guarded loop.
            metrics["learning_rate"] = learning_rate_fn(state.step)
        if t_logits is not None:
            metrics["kd_agreement"] = jnp.mean(pred == jnp.argmax(t_logits, -1))
        extra = state.extra
        if track_forgetting:
            extra = update_tracker(extra, batch["index"], pred == y)
        new_state = TrainState(state.step + 1, params, new_bs, opt_state, extra)
        return new_state, metrics

    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(repl, repl, batch_sh),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
        # XLA:CPU: YNNPACK elementwise fusions for this program (1.36x, cpu_flags); {} on
        # GPU/TPU.
        compiler_options=cpu_flags.compiler_options(),
    )


def make_eval_step(graphdef, mesh):
    """Build ``eval_step(params, batch_stats, batch) -> sums``.

    Inference-mode forward; returns masked SUMS (not means) so that padded rows
    (mask == 0) contribute nothing and sums over batches count each real example once:
    {"loss": sum CE, "correct": sum 1[argmax == y], "count": sum mask}.
    """

    def eval_step(params, batch_stats, batch):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(batch["image"], train=False)
        m = batch["mask"]
        ce = losses.cross_entropy(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss": jnp.sum(ce * m), "correct": jnp.sum(correct * m), "count": jnp.sum(m)}

    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(eval_step, in_shardings=(repl, repl, batch_sh), out_shardings=repl,
                   compiler_options=cpu_flags.compiler_options())
