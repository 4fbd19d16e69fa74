"""Second-order autodiff: Hessian-vector products, inverse-HVP solvers, per-example grads.

All functions are pure and jittable. Parameter pytrees are handled as flat vectors
(`jax.flatten_util.ravel_pytree`) inside the solvers so the lax loops carry plain arrays.

Loss signatures (the same two as `kdprune_jax.scoring`; its module docstring is the
reference):

- ``loss(params, batch) -> scalar``: the objective whose Hessian H is used (mean loss plus
  any regularizer). `batch` is any pytree (it may be ``None`` when the loss closes over its
  data, but data passed as `batch` is a jit argument, so one compile serves every batch of
  that shape).
- ``example_losses(params, batch) -> [B]``: one loss per row of `batch` (leading axis B),
  examples uncoupled (inference-mode BatchNorm).

Damping ``lam >= 0`` adds ``lam * I`` to H (equivalently ``(lam/2) ||theta||^2`` to the
objective's curvature); it has no default: an L2 term already in `loss` is already in H.
Solvers return ``(x, info)`` where x approximates ``(H + lam I)^{-1} b`` with the pytree
structure of `b`, and info = {"iterations", "residual" (relative: ||b - A x|| / ||b||),
"diverged" (bool, LiSSA only), "lissa_scale" (LiSSA only)} as scalar arrays; dtypes follow
the parameters (float32, or float64 under ``jax_enable_x64`` with float64 parameters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kdprune_jax.errors import UserError

SOLVERS = ("exact", "cg", "lissa")
# The solvers' own iteration budgets when `max_iters` is None: LiSSA's steps are one HVP each
# like CG's, but its convergence rate is 1 - lambda_min / scale instead of CG's
# 1 - 2 / sqrt(condition number), so it needs many more of them.
DEFAULT_MAX_ITERS = {"exact": 1, "cg": 100, "lissa": 1000}


class SolverError(UserError, RuntimeError):
    """An inverse-HVP solve diverged or did not converge; the message names the residual,
    the keyword arguments (or config fields) to change, and their current values."""


def check_solver(solver: str, allowed=SOLVERS) -> None:
    """Refuse an unknown solver name (exact spelling, lower case) with the allowed names."""
    if solver not in allowed:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(allowed)}")


def is_traced(*trees) -> bool:
    """True when any leaf is a tracer (called inside the caller's jit/vmap/grad): values
    such as a solver's residual are then unknown and cannot be checked here."""
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


def hvp(loss, params, batch, v):
    """H(params) @ v, H the Hessian of ``loss(., batch)``, by forward-over-reverse: the JVP
    of the gradient (one forward and one backward pass' worth of work, no Hessian
    materialized). Same pytree (and dtypes) as `params`."""
    return jax.jvp(lambda p: jax.grad(loss)(p, batch), (params,), (v,))[1]


def damped_matvec(loss, params, batch, damping):
    """The function ``x -> (H + damping I) x`` on FLAT vectors x of size
    ``ravel_pytree(params)[0].size`` (returns a flat vector of the same size and dtype)."""
    _, unravel = ravel_pytree(params)

    def mv(x):
        return ravel_pytree(hvp(loss, params, batch, unravel(x)))[0] + damping * x

    return mv


def per_example_grads(example_losses, params, batch):
    """Gradients of each example's loss: vmap over rows, each row fed as a batch of one.

    Args:
      example_losses: ``(params, batch) -> [B]`` (see module docstring).
      batch: pytree of arrays with leading axis B.
    Returns:
      pytree like `params` with a leading axis B on every leaf (the params' dtypes).
    """
    def one(example):
        row = jax.tree.map(lambda a: a[None], example)
        return jax.grad(lambda p: example_losses(p, row)[0])(params)

    return jax.vmap(one)(batch)


def largest_eigenvalue(loss, params, batch, *, iters: int = 50, seed: int = 0):
    """Power-iteration estimate of the largest-magnitude eigenvalue of H (an HVP per
    iteration, a fixed random start). Underestimates slightly when the top two eigenvalues
    are close; `lissa_scale="auto"` uses it with a safety margin. Returns a scalar."""
    flat, unravel = ravel_pytree(params)
    mv = damped_matvec(loss, params, batch, 0.0)
    v = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
    v = v / jnp.linalg.norm(v)

    def body(_, c):
        v, _ = c
        w = mv(v)
        return w / jnp.maximum(jnp.linalg.norm(w), 1e-30), jnp.vdot(v, w)

    _, lam = jax.lax.fori_loop(0, iters, body, (v, jnp.zeros((), flat.dtype)))
    return jnp.abs(lam)


def _rel_residual(r, b):
    return jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(b), 1e-30)


def _info(k, residual, diverged=False, **extra):
    return {"iterations": jnp.asarray(k), "residual": residual,
            "diverged": jnp.asarray(diverged), **extra}


def solve_exact(loss, params, batch, b, *, damping):
    """Dense solve with the materialized Hessian (P x P): small parameter counts only."""
    flat, unravel = ravel_pytree(params)
    bf = ravel_pytree(b)[0]

    def flat_loss(f):
        return loss(unravel(f), batch)

    h = jax.hessian(flat_loss)(flat) + damping * jnp.eye(flat.size, dtype=flat.dtype)
    x = jnp.linalg.solve(h, bf)
    return unravel(x), _info(1, _rel_residual(bf - h @ x, bf))


def solve_cg(loss, params, batch, b, *, damping, max_iters: int = 100, tol: float = 1e-6,
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
    mv = damped_matvec(loss, params, batch, damping)
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
    return unravel(x), _info(k, _rel_residual(bf - mv(x), bf))


def lissa_auto_scale(loss, params, batch, *, damping, iters: int = 50):
    """A LiSSA scale from the power-iteration estimate of lambda_max(H): the series needs
    scale > (lambda_max + damping) / 2 and converges fastest at the top of the spectrum
    for scale = lambda_max + damping; the estimate is taken x 1.1 so an underestimate
    still converges."""
    return 1.1 * (largest_eigenvalue(loss, params, batch, iters=iters) + damping)


def solve_lissa(loss, params, batch, b, *, damping, scale="auto", max_iters: int = 1000,
                tol: float = 1e-6):
    """LiSSA / Neumann series for (H + damping I)^{-1} b:

        x_{k+1} = x_k + (b - (H + damping I) x_k) / scale

    converges iff scale > (lambda_max(H) + damping) / 2 and H + damping I is positive
    definite; ``scale="auto"`` (default) sets it by `lissa_auto_scale` (50 more HVPs).
    The residual b - A x_k comes for free from the update; the loop stops when it is below
    tol, and flags divergence when it grows past 1e4 x ||b|| or becomes non-finite
    (info["diverged"]). info["lissa_scale"] is the scale used.
    """
    mv = damped_matvec(loss, params, batch, damping)
    bf, unravel = ravel_pytree(b)
    bnorm = jnp.maximum(jnp.linalg.norm(bf), 1e-30)
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f"lissa_scale={scale!r}: allowed a number > 0 or 'auto'")
        scale = lissa_auto_scale(loss, params, batch, damping=damping)
    scale = jnp.asarray(scale, bf.dtype)

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
    return unravel(x), _info(k, _rel_residual(bf - mv(x), bf), div, lissa_scale=scale)


def _solve(loss, params, batch, b, *, solver, damping, max_iters, tol, lissa_scale,
           preconditioner):
    if solver == "exact":
        return solve_exact(loss, params, batch, b, damping=damping)
    if solver == "cg":
        return solve_cg(loss, params, batch, b, damping=damping, max_iters=max_iters,
                        tol=tol, preconditioner=preconditioner)
    return solve_lissa(loss, params, batch, b, damping=damping, scale=lissa_scale,
                       max_iters=max_iters, tol=tol)


def inverse_hvp(loss, params, batch, b, *, damping, solver: str = "cg",
                max_iters: int | None = None, tol: float = 1e-6, lissa_scale="auto",
                preconditioner=None, check: bool = True):
    """(H + damping I)^{-1} b by `solve_exact`, `solve_cg` or `solve_lissa` (see each).

    Args:
      loss: ``(params, batch) -> scalar`` defining H.
      b: pytree like params.
      damping: >= 0, required (see module docstring).
      max_iters: None = the solver's default (`DEFAULT_MAX_ITERS`: cg 100, lissa 1000).
      preconditioner: CG only (``pytree -> pytree`` applying M^-1).
      check: when called eagerly, raise `SolverError` (naming these keyword arguments) on
        divergence or a residual above ``max(100 tol, 1e-3)``. Under the caller's jit the
        residual is a tracer and no check is possible: inspect the returned info (e.g. with
        `check_solve` outside the jit).
    Returns:
      (x like b, info).
    """
    check_solver(solver)
    if max_iters is None:
        max_iters = DEFAULT_MAX_ITERS[solver]
    x, info = _solve(loss, params, batch, b, solver=solver, damping=damping,
                     max_iters=max_iters, tol=tol, lissa_scale=lissa_scale,
                     preconditioner=preconditioner)
    if check and not is_traced(params, batch, b, info):
        check_solve(info, solver=solver, tol=tol, where="inverse_hvp",
                    settings=dict(damping=damping, max_iters=max_iters,
                                  lissa_scale=lissa_scale))
    return x, info


def check_solve(info, *, solver: str, tol: float, where: str = "", settings=None,
                names=None) -> None:
    """Raise `SolverError` if a solve diverged or its relative residual exceeds
    ``max(100 tol, 1e-3)`` (float32 CG stalls near 1e-6; a looser solve ranks examples
    the same way, a residual of 1e-2 and above does not).

    Args:
      info: a solver's info dict (host or device arrays; not tracers).
      where: the function (or config section) named at the start of the message.
      settings: the current values, e.g. {"damping": 0.01, "max_iters": 100,
        "lissa_scale": "auto"}, quoted in the advice.
      names: how to call each setting in the advice: {"damping": "influence.damping", ...}
        for config fields; default the keyword arguments (``damping=``, ...).
    """
    info = jax.device_get(info)
    settings, names = dict(settings or {}), dict(names or {})

    def knob(key):
        name = names.get(key, f"{key}=")
        return f"{name} (now {settings[key]!r})" if key in settings else name

    res, its = float(info["residual"]), int(info["iterations"])
    head = f"{where}: " if where else ""
    # The keyword argument takes "auto"; a config field named in `names` may not.
    auto = "" if "lissa_scale" in names else " (or set it to 'auto')"
    if solver == "lissa" and (bool(info["diverged"]) or not jnp.isfinite(res)):
        used = info.get("lissa_scale")
        used = f", scale {float(used):.4g}" if used is not None else ""
        raise SolverError(
            f"{head}LiSSA diverged after {its} iterations (relative residual {res:.3g}"
            f"{used}): the series needs scale > (largest Hessian eigenvalue + damping) / 2 "
            f"and a positive-definite damped Hessian; raise {knob('lissa_scale')}{auto} "
            f"and/or {knob('damping')}, or use solver 'cg'")
    if not res <= max(tol * 100, 1e-3):
        if solver == "exact":
            fix = f"raise {knob('damping')} (the damped Hessian is singular or indefinite)"
        elif solver == "lissa":
            fix = (f"raise {knob('max_iters')}, or lower {knob('lissa_scale')} towards "
                   f"(largest eigenvalue + damping) / 2{auto and ' (auto estimates it)'}, "
                   f"or raise {knob('damping')}")
        else:
            fix = f"raise {knob('max_iters')} or {knob('damping')}"
        raise SolverError(
            f"{head}{solver} inverse-HVP did not converge: relative residual {res:.3g} after "
            f"{its} iterations (tolerance {tol:g}); {fix}")
