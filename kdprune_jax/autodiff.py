"""Second-order autodiff: Hessian-vector products, inverse-HVP solvers, per-example grads.

All functions are pure and jittable. Parameter pytrees are handled as flat vectors
(`jax.flatten_util.ravel_pytree`) inside the solvers so the lax loops carry plain arrays.

Conventions: `loss_fn(params) -> scalar`; damping lam >= 0 adds lam * I to the Hessian;
solvers return ``(x, info)`` where x approximates ``(H + lam I)^{-1} b`` with the pytree
structure of `b`, and info = {"iterations", "residual" (relative: ||b - A x|| / ||b||),
"diverged" (bool, LiSSA only)} as scalar arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

SOLVERS = ("exact", "cg", "lissa")


def hvp(loss_fn, params, v):
    """H(params) @ v by forward-over-reverse: the JVP of the gradient (one forward and one
    backward pass' worth of work, no Hessian materialized). Same pytree as `params`."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def damped_matvec(loss_fn, params, damping):
    """x -> (H + damping I) x on flat vectors (x has the size of ravel_pytree(params))."""
    flat, unravel = ravel_pytree(params)

    def mv(x):
        return ravel_pytree(hvp(loss_fn, params, unravel(x)))[0] + damping * x

    return mv, flat.size


def per_example_grads(per_example_loss, params, batch):
    """Gradients of each example's loss: vmap over the batch's leading axis.

    Args:
      per_example_loss: ``(params, example) -> scalar`` where `example` is one row of
        every array in `batch` (no batch axis).
      batch: pytree of arrays with leading axis B.
    Returns:
      pytree like `params` with a leading axis B on every leaf.
    """
    return jax.vmap(jax.grad(per_example_loss), in_axes=(None, 0))(params, batch)


def _rel_residual(r, b):
    return jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(b), 1e-30)


def solve_exact(loss_fn, params, b, *, damping: float):
    """Dense solve with the materialized Hessian (P x P): small parameter counts only."""
    flat, unravel = ravel_pytree(params)
    bf = ravel_pytree(b)[0]

    def flat_loss(f):
        return loss_fn(unravel(f))

    h = jax.hessian(flat_loss)(flat) + damping * jnp.eye(flat.size, dtype=flat.dtype)
    x = jnp.linalg.solve(h, bf)
    info = {"iterations": jnp.array(1), "residual": _rel_residual(bf - h @ x, bf),
            "diverged": jnp.array(False)}
    return unravel(x), info


def solve_cg(loss_fn, params, b, *, damping: float, max_iters: int = 100, tol: float = 1e-6,
             x0=None, preconditioner=None):
    """(Preconditioned) conjugate gradient on (H + damping I) x = b, in a lax.while_loop.

    Requires H + damping I positive definite (true for convex losses; for non-convex
    networks choose damping larger than the most negative eigenvalue). Stops when the
    relative residual ||b - (H + damping I) x|| / ||b|| < tol or after max_iters;
    info["residual"] tells which.
    `x0` (a pytree like b, default zeros) starts the iteration: a nearby solution, e.g. the
    previous outer step's, saves iterations when the system changes slowly.
    `preconditioner` (pytree like b -> pytree like b) applies M^-1 for a symmetric positive
    definite M ~ H + damping I (e.g. `scoring.head.kronecker_preconditioner`). It changes
    how fast CG gets there, not the solution: CG's iteration count grows with the square
    root of the condition number, and a good M brings that near 1.
    """
    mv, _ = damped_matvec(loss_fn, params, damping)
    bf, unravel = ravel_pytree(b)
    bnorm = jnp.maximum(jnp.linalg.norm(bf), 1e-30)
    if preconditioner is None:
        def precond(r):
            return r
    else:
        def precond(r):
            return ravel_pytree(preconditioner(unravel(r)))[0].astype(r.dtype)

    def cond(c):
        _, r, _, _, k = c
        return (k < max_iters) & (jnp.linalg.norm(r) / bnorm > tol)

    def body(c):
        x, r, p, rz, k = c
        ap = mv(p)
        alpha = rz / jnp.vdot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        z = precond(r)
        rz_new = jnp.vdot(r, z)
        p = z + (rz_new / rz) * p
        return x, r, p, rz_new, k + 1

    if x0 is None:
        x0, r0 = jnp.zeros_like(bf), bf
    else:
        x0 = ravel_pytree(x0)[0].astype(bf.dtype)
        r0 = bf - mv(x0)
    z0 = precond(r0)
    x, r, _, _, k = jax.lax.while_loop(cond, body, (x0, r0, z0, jnp.vdot(r0, z0), 0))
    # Report the TRUE residual (the recursive r drifts in float32).
    info = {"iterations": k, "residual": _rel_residual(bf - mv(x), bf),
            "diverged": jnp.array(False)}
    return unravel(x), info


def solve_lissa(loss_fn, params, b, *, damping: float, scale: float, max_iters: int = 1000,
                tol: float = 1e-6):
    """LiSSA / Neumann series for (H + damping I)^{-1} b:

        x_{k+1} = x_k + (b - (H + damping I) x_k) / scale

    converges iff scale > (lambda_max(H) + damping) / 2 and H + damping I is positive
    definite. The residual b - A x_k comes for free from the update; the loop stops when it
    is below tol, and flags divergence when it grows past 1e4 x ||b|| or becomes non-finite
    (info["diverged"]), so the caller can stop with advice to raise `scale` / `damping`.
    """
    mv, _ = damped_matvec(loss_fn, params, damping)
    bf, unravel = ravel_pytree(b)
    bnorm = jnp.maximum(jnp.linalg.norm(bf), 1e-30)

    def cond(c):
        _, rn, k, div = c
        return (k < max_iters) & (rn > tol) & ~div

    def body(c):
        x, _, k, _ = c
        r = bf - mv(x)
        rn = jnp.linalg.norm(r) / bnorm
        div = ~jnp.isfinite(rn) | (rn > 1e4)
        return x + r / scale, rn, k + 1, div

    x, _, k, div = jax.lax.while_loop(cond, body, (jnp.zeros_like(bf), jnp.inf, 0,
                                                   jnp.array(False)))
    info = {"iterations": k, "residual": _rel_residual(bf - mv(x), bf), "diverged": div}
    return unravel(x), info


def inverse_hvp(loss_fn, params, b, *, solver: str = "cg", damping: float = 0.0,
                max_iters: int = 100, tol: float = 1e-6, lissa_scale: float = 10.0,
                preconditioner=None):
    """Dispatch to `solve_exact`, `solve_cg` or `solve_lissa` (see each); `preconditioner`
    is used by CG only."""
    if solver == "exact":
        return solve_exact(loss_fn, params, b, damping=damping)
    if solver == "cg":
        return solve_cg(loss_fn, params, b, damping=damping, max_iters=max_iters, tol=tol,
                        preconditioner=preconditioner)
    if solver == "lissa":
        return solve_lissa(loss_fn, params, b, damping=damping, scale=lissa_scale,
                           max_iters=max_iters, tol=tol)
    raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
