"""Per-example losses. Reduction (mean, masked sum, weighting) is always the caller's.

All functions take logits of shape [..., C] (any float dtype; computed in at least float32)
and return per-example values of shape [...].
"""

import jax
import jax.numpy as jnp


def _f32(x: jax.Array) -> jax.Array:
    """At least float32 (bf16/f16 logits are upcast; float64 stays float64 under x64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """CE(y, softmax(s)) per example. logits [..., C], labels int [...] -> [...]."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array, temperature) -> jax.Array:
    """KL(softmax(t / tau) || softmax(s / tau)) per example -> [...].

    Uses the teacher's log-probabilities directly (not log of probabilities) so that a
    teacher probability of exactly zero contributes 0, never NaN.
    """
    t = _f32(teacher_logits) / temperature
    s = _f32(student_logits) / temperature
    logp_t = jax.nn.log_softmax(t, axis=-1)
    logp_s = jax.nn.log_softmax(s, axis=-1)
    return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array | None,
    labels: jax.Array,
    *,
    kd_weight,
    temperature,
) -> jax.Array:
    """METHOD.md §2, per example:

        (1 - w) * CE(y, softmax(s)) + w * tau^2 * KL(softmax(t/tau) || softmax(s/tau)),

    with w = `kd_weight`.

    The teacher logits are wrapped in ``stop_gradient`` here so that no caller can
    accidentally backpropagate into the teacher. ``teacher_logits=None`` requires
    ``kd_weight == 0`` (plain CE; the "no KD" baseline) and skips the KL term entirely.

    Args:
      student_logits: [B, C].
      teacher_logits: [B, C] or None.
      labels: int [B].
      kd_weight: weight w of the KD term in [0, 1] (python float or scalar array): the
        config's ``kd.alpha`` (``ifbeta.kd_weight`` / ``influence.kd_weight`` inside IF-Beta's
        proxy objective and the KD-aligned influence target).
      temperature: tau > 0.
    Returns:
      [B], float32 (float64 for float64 inputs).
    """
    ce = cross_entropy(student_logits, labels)
    if teacher_logits is None:
        if not isinstance(kd_weight, jax.Array) and kd_weight != 0:
            raise ValueError("kd_loss: teacher_logits=None requires kd_weight == 0")
        return ce
    kl = kl_divergence(jax.lax.stop_gradient(teacher_logits), student_logits, temperature)
    return (1.0 - kd_weight) * ce + kd_weight * (temperature**2) * kl
