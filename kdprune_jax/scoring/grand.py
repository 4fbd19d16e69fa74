"""GraNd: norms of per-example loss gradients (Paul et al. 2021; METHOD.md §3).

`grand_scores` uses ALL parameters: per-example gradients by vmap(grad) over chunks of
`chunk_size` examples, the chunks unrolled in the program (peak memory chunk_size x
(#params) instead of B x (#params)). Not `lax.map`: in a loop body, vmap's per-example
convolution gradients (convolutions grouped over the batch) run ~20x slower on XLA:CPU
(ResNet-20: 11 vs 217 examples/s, benchmarks/grand.py). `grand_last_layer_from_features`
is the closed form for a softmax-CE linear head (W, b) on features h:
grad_W = h (p - y)^T, grad_b = p - y, so ||grad|| = ||p - y|| * sqrt(||h||^2 + 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kdprune_jax.scoring._fn import as_tree_fn, batch_size, example_losses_fn


def _sq_norm(tree):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _grand_jit(example_losses, params, batch, chunk_size):
    per = example_losses_fn(example_losses)

    def one(example):
        row = jax.tree.map(lambda a: a[None], example)
        return jnp.sqrt(_sq_norm(jax.grad(lambda p: per(p, row)[0])(params)))

    b = batch_size(batch)
    step = min(chunk_size or b, b)
    return jnp.concatenate([jax.vmap(one)(jax.tree.map(lambda a, s=s: a[s:s + step], batch))
                            for s in range(0, b, step)])


def grand_scores(example_losses, params, batch, *, chunk_size: int | None = 64):
    """||grad_theta l_i(theta)||_2 for every example i in `batch`.

    Args:
      example_losses: ``(params, batch) -> [B]`` (see `kdprune_jax.scoring`); each example
        is fed as a batch of one. Must not couple examples (use inference-mode BatchNorm).
      params: pytree of the parameters to differentiate (pass frozen parts via closure, or
        bind them with `jax.tree_util.Partial` so new values do not recompile).
      batch: pytree with leading axis B.
      chunk_size: examples per vmap (the last chunk may be smaller); None or 0 = the
        whole batch in one vmap. The chunks are unrolled, so B / chunk_size copies of the
        gradient program are compiled: keep that small (e.g. batches of 256).

    On a batch sharded over several devices, call it inside `jax.shard_map` (each device
    scores its own rows; see stages/scores.py): under jit's automatic partitioning, XLA:CPU
    (JAX 0.10.2) computes wrong per-example convolution gradients for a batch-sharded vmap
    (tests/test_score_stage.py compares 8 devices with 1).
    Returns:
      [B] in the params' dtype (float32, float64 under jax_enable_x64); large = the example
      pulls hard on the parameters.
    """
    return _grand_jit(as_tree_fn(example_losses, "example_losses"), params, batch,
                      chunk_size)


@jax.jit
def grand_last_layer_from_features(features, logits, labels):
    """Closed-form last-layer GraNd for a linear softmax-CE head.

    Args: features [B, D] (head inputs), logits [B, C] (head outputs), labels int [B].
    Returns: float32 [B].
    """
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    err = jnp.linalg.norm(p - jax.nn.one_hot(labels, logits.shape[-1]), axis=-1)
    return err * jnp.sqrt(jnp.sum(jnp.square(features.astype(jnp.float32)), -1) + 1.0)
