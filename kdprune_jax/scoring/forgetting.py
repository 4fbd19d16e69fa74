"""Forgetting events (Toneva et al. 2019; METHOD.md §3), tracked on device.

The tracker is a small pytree of [N] arrays indexed by the example's stable `index`. The
train step updates it from the minibatch's predictions with scatters, so there is no
per-step host work; it lives in the train state and is checkpointed with it.

A forgetting event is a correct -> incorrect transition between two consecutive
presentations of the same example. Never-learned examples (never predicted correctly)
count as the most forgotten: their score is (max count over learned examples) + 1.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ForgettingTracker:
    prev_correct: jax.Array  # bool [N]: correct at the example's last presentation
    forgets: jax.Array  # int32 [N]: correct -> incorrect transitions so far
    learned: jax.Array  # bool [N]: ever predicted correctly
    seen: jax.Array  # int32 [N]: presentations so far


def init_tracker(num_examples: int) -> ForgettingTracker:
    # Four distinct buffers: the tracker is donated with the train state, and one buffer
    # aliased by two fields would be donated twice.
    n = (num_examples,)
    return ForgettingTracker(jnp.zeros(n, bool), jnp.zeros(n, jnp.int32), jnp.zeros(n, bool),
                             jnp.zeros(n, jnp.int32))


def update_tracker(t: ForgettingTracker, indices, correct, mask=None) -> ForgettingTracker:
    """Record one minibatch: indices int [B] (distinct), correct bool [B], optional mask."""
    correct = correct.astype(bool)
    valid = jnp.ones_like(correct) if mask is None else mask.astype(bool)
    prev = t.prev_correct[indices]
    forgot = (prev & ~correct & valid).astype(jnp.int32)
    # Padded rows (mask 0) scatter their example's current values back: a no-op.
    new_prev = jnp.where(valid, correct, prev)
    return ForgettingTracker(
        prev_correct=t.prev_correct.at[indices].set(new_prev),
        forgets=t.forgets.at[indices].add(forgot),
        learned=t.learned.at[indices].set(t.learned[indices] | (correct & valid)),
        seen=t.seen.at[indices].add(valid.astype(jnp.int32)),
    )


def forgetting_scores(t: ForgettingTracker) -> jax.Array:
    """float32 [N]: forgetting counts; never-learned examples get max(count) + 1."""
    f = t.forgets.astype(jnp.float32)
    top = jnp.max(jnp.where(t.learned, f, 0.0))
    return jnp.where(t.learned, f, top + 1.0)
