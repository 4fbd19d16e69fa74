"""Influence functions (Koh & Liang 2017; METHOD.md §4).

For parameters theta trained on L_train (mean per-example loss, plus any regularizer the
caller includes), a target loss L_V, and H = Hessian of L_train + damping * I:

    s_test      = H^{-1} grad L_V(theta)                 (solved ONCE)
    influence_i = grad l_i(theta) . s_test               (a JVP per batch, no per-example grads)
    self_inf_i  = grad l_i(theta)^T H^{-1} grad l_i(theta)

Sign: POSITIVE = HELPFUL. Removing example i changes theta by about H^{-1} grad l_i / N and
the validation loss by about +influence_i / N, so a positive influence means removing the
example would raise the validation loss.

Loss functions take ``(params, batch)``; data is always a jit argument (never a closed-over
constant), so one compile serves every batch of the same shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kdprune_jax import autodiff
from kdprune_jax.errors import UserError


class SolverError(UserError, RuntimeError):
    """An inverse-HVP solve diverged or did not converge; the message names the residual
    and the config knob to change (a UserError: the command line prints it as one line)."""


@functools.partial(
    jax.jit,
    static_argnames=("train_loss", "val_loss", "solver", "max_iters", "tol", "lissa_scale",
                     "preconditioner"),
)
def s_test(train_loss, val_loss, params, train_batch, val_batch, *, solver: str = "cg",
           damping=0.01, max_iters: int = 100, tol: float = 1e-6, lissa_scale: float = 10.0,
           preconditioner=None):
    """Solve (H + damping I) s = grad L_V once, inside one jit.

    Args:
      train_loss: ``(params, batch) -> scalar`` whose Hessian is H (mean loss + regularizer).
      val_loss: ``(params, batch) -> scalar`` target loss L_V.
      params: pytree (e.g. only the head, with the rest closed over by the loss functions).
      train_batch / val_batch: pytrees of arrays (sharded or not) fed to the losses.
      preconditioner: optional ``(params, train_batch) -> (pytree -> pytree)`` building M^-1
        for CG inside this jit (e.g. `scoring.head.kronecker_preconditioner` with its
        keywords bound by functools.partial).
    Returns:
      (s_test like params, info dict from `autodiff.inverse_hvp`).
    """
    g_val = jax.grad(val_loss)(params, val_batch)
    return autodiff.inverse_hvp(
        lambda p: train_loss(p, train_batch), params, g_val, solver=solver, damping=damping,
        max_iters=max_iters, tol=tol, lissa_scale=lissa_scale,
        preconditioner=None if preconditioner is None else preconditioner(params, train_batch),
    )


def check_solve(info, *, solver: str, tol: float, where: str = "influence",
                iters_field: str | None = None) -> None:
    """Raise SolverError with the residual and the config knob to change.

    `where` is the config section of the solver's damping (and, unless `iters_field`
    names another field, of its ``max_iters``)."""
    info = jax.device_get(info)
    res, its = float(info["residual"]), int(info["iterations"])
    if solver == "lissa" and (bool(info["diverged"]) or not jnp.isfinite(res)):
        raise SolverError(
            f"LiSSA diverged after {its} iterations (relative residual {res:.3g}): the series "
            f"needs scale > (largest Hessian eigenvalue + damping) / 2 and a positive-definite "
            f"damped Hessian; raise {where}.lissa_scale and/or {where}.damping, or use "
            f"{where}.solver='cg'")
    if not res <= max(tol * 100, 1e-3):
        if solver == "exact":
            fix = f"raise {where}.damping"
        else:
            fix = f"raise {iters_field or where + '.max_iters'} or {where}.damping"
        raise SolverError(
            f"{solver} inverse-HVP did not converge: relative residual {res:.3g} after {its} "
            f"iterations (tolerance {tol:g}); {fix}")


@functools.partial(jax.jit, static_argnames=("per_example_losses",))
def influence_from_s_test(per_example_losses, params, batch, s):
    """influence_i = grad l_i . s for every example of `batch`, as ONE forward-mode JVP of
    the vector of per-example losses along s (cost ~ one forward pass; no per-example
    gradients are materialized).

    Args:
      per_example_losses: ``(params, batch) -> [B]`` (inference mode, examples uncoupled).
      s: pytree like params (from `s_test`).
    Returns: float32 [B], positive = helpful.
    """
    return jax.jvp(lambda p: per_example_losses(p, batch), (params,), (s,))[1]


@functools.partial(
    jax.jit,
    static_argnames=("per_example_loss", "train_loss", "solver", "max_iters", "tol"),
)
def self_influence(per_example_loss, train_loss, params, train_batch, batch, *,
                   solver: str = "exact", damping=0.01, max_iters: int = 100,
                   tol: float = 1e-6):
    """g_i^T (H + damping I)^{-1} g_i for every example of `batch` -> float32 [B].

    `exact` factors the dense damped Hessian once (small parameter counts, e.g. a linear
    head) and reuses it for all examples; `cg` runs one CG solve per example (lax.map).
    Large = atypical or mislabelled (the model must bend to fit it).

    Args:
      per_example_loss: ``(params, example) -> scalar`` for one example (no batch axis).
      train_loss: ``(params, train_batch) -> scalar`` defining H.
    """
    grads = autodiff.per_example_grads(per_example_loss, params, batch)
    flat_g = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)
    flat, unravel = ravel_pytree(params)
    if solver == "exact":
        h = jax.hessian(lambda f: train_loss(unravel(f), train_batch))(flat)
        chol = jax.scipy.linalg.cho_factor(h + damping * jnp.eye(flat.size, dtype=flat.dtype))
        solved = jax.scipy.linalg.cho_solve(chol, flat_g.T).T
        return jnp.sum(flat_g * solved, axis=-1)

    def one(g):
        x, _ = autodiff.solve_cg(lambda p: train_loss(p, train_batch), params, unravel(g),
                                 damping=damping, max_iters=max_iters, tol=tol)
        return jnp.vdot(ravel_pytree(x)[0], g)

    return jax.lax.map(one, flat_g)
