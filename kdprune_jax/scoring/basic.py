"""Scores computed from one forward pass: EL2N, entropy, margin (METHOD.md §3).

Each has a logits-level function (`*_from_logits`, for cached teacher logits) and an
apply_fn-level function that works with any JAX model:
``apply_fn(params, images) -> logits [B, C]``. Scores are [B] in float32, or float64 for
float64 logits (lower precisions are computed in float32); larger/smaller ends are kept as
METHOD.md says (see `kdprune_jax.scoring.KEEP`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdprune_jax.scoring._fn import as_tree_fn


def _wide(logits):
    """float32 at least: bf16/f16 logits are widened, float64 ones kept."""
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def el2n_from_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """||softmax(logits) - onehot(y)||_2 per example. logits [B, C], labels int [B] -> [B].
    In [0, sqrt(2)]; large = hard or mislabelled (Paul et al. 2021)."""
    p = jax.nn.softmax(_wide(logits), axis=-1)
    return jnp.linalg.norm(p - jax.nn.one_hot(labels, logits.shape[-1]), axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Predictive entropy -sum p log p (nats) per example -> [B]; large = uncertain."""
    logp = jax.nn.log_softmax(_wide(logits), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def margin_from_logits(logits: jax.Array) -> jax.Array:
    """Top-1 minus top-2 softmax probability per example -> [B], in [0, 1];
    small = near the decision boundary (kept end: lowest)."""
    p = jax.nn.softmax(_wide(logits), axis=-1)
    top2 = jax.lax.top_k(p, 2)[0]
    return top2[..., 0] - top2[..., 1]


@jax.jit
def _el2n_jit(apply_fn, params, images, labels):
    return el2n_from_logits(apply_fn(params, images), labels)


@jax.jit
def _entropy_jit(apply_fn, params, images):
    return entropy_from_logits(apply_fn(params, images))


@jax.jit
def _margin_jit(apply_fn, params, images):
    return margin_from_logits(apply_fn(params, images))


def el2n_scores(apply_fn, params, images, labels):
    """EL2N of a model: ``el2n_from_logits(apply_fn(params, images), labels)`` -> [B]."""
    return _el2n_jit(as_tree_fn(apply_fn, "apply_fn"), params, images, labels)


def entropy_scores(apply_fn, params, images):
    """Predictive entropy of a model on a batch -> [B]."""
    return _entropy_jit(as_tree_fn(apply_fn, "apply_fn"), params, images)


def margin_scores(apply_fn, params, images):
    """Top-2 probability margin of a model on a batch -> [B]."""
    return _margin_jit(as_tree_fn(apply_fn, "apply_fn"), params, images)
