"""Loss callables as jit arguments that hit the compilation cache, and their shape checks.

Every jitted scoring function takes its loss functions through `as_tree_fn`, which turns
them into `jax.tree_util.Partial` pytrees: the function itself goes into the treedef (a
static part, compared by `FnKey` below), bound `Partial` arguments become traced leaves.
So, across calls with equal settings and same-shaped data:

- a module-level function compiles once;
- ``functools.partial(f, lam=0.9)`` compiles once per distinct set of hashable bound
  values (compared by value, not by object identity);
- ``jax.tree_util.Partial(f, array)`` compiles once whatever the array's values;
- a fresh ``lambda`` (or a closure made per call) is a new function each time and
  recompiles every time: define loss functions once, at module level.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kdprune_jax.errors import UserError


class LossSignatureError(UserError, TypeError):
    """A loss callable returned the wrong shape for the role it was passed in."""


def _key(fn):
    if type(fn) is functools.partial:
        k = ("partial", _key(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
        try:
            hash(k)
            return k
        except TypeError:  # an array (or other unhashable) bound: identity, as jit does
            pass
    return fn


class FnKey:
    """A callable compared by `_key`: plain functions by identity, functools.partial by
    (function, bound values) when those are hashable, frozen dataclasses by value."""

    __slots__ = ("fn", "key")

    def __init__(self, fn):
        self.fn, self.key = fn, _key(fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other):
        return isinstance(other, FnKey) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


def as_tree_fn(fn, role: str):
    """`fn` as a `jax.tree_util.Partial` to pass as an ordinary (traced) jit argument."""
    if fn is None:
        return None
    if not callable(fn):
        raise LossSignatureError(f"{role} must be a callable, got {type(fn).__name__}")
    if isinstance(fn, jax.tree_util.Partial):
        return jax.tree_util.Partial(FnKey(fn.func), *fn.args, **fn.keywords)
    return jax.tree_util.Partial(FnKey(fn))


def batch_size(batch) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise LossSignatureError("the batch holds no arrays (expected a pytree of arrays "
                                 "with a leading batch axis)")
    return int(jnp.shape(leaves[0])[0])


def scalar_loss(fn, role: str):
    """``(params, batch) -> scalar``, its output shape checked when traced."""
    def call(params, batch):
        out = fn(params, batch)
        if jnp.shape(out) != ():
            raise LossSignatureError(
                f"{role} must be (params, batch) -> scalar (the mean loss over the batch, plus "
                f"any regularizer); it returned shape {tuple(jnp.shape(out))}. Per-example "
                f"losses [B] go where the signature says example_losses")
        return out

    return call


def example_losses_fn(fn, role: str = "example_losses"):
    """``(params, batch) -> [B]``, its output shape checked against the batch when traced."""
    def call(params, batch):
        out = fn(params, batch)
        b = batch_size(batch)
        if jnp.shape(out) != (b,):
            hint = (" (a scalar: the mean loss? pass one loss per example)"
                    if jnp.ndim(out) == 0 else
                    " (a 2-D array: logits, or per-class losses? reduce to one loss per "
                    "example)" if jnp.ndim(out) == 2 else "")
            raise LossSignatureError(
                f"{role} must be (params, batch) -> [B] with B = the batch's leading axis "
                f"({b}); it returned shape {tuple(jnp.shape(out))}{hint}")
        return out

    return call
