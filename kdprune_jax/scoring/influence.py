"""Influence functions (Koh & Liang 2017; METHOD.md §4).

For parameters theta trained on L_train (mean per-example loss, plus any regularizer the
caller includes), a target loss L_V, and H = Hessian of L_train + damping * I:

    s_test      = H^{-1} grad L_V(theta)                 (solved ONCE)
    influence_i = grad l_i(theta) . s_test               (a JVP per batch, no per-example grads)
    self_inf_i  = grad l_i(theta)^T H^{-1} grad l_i(theta)

Sign: POSITIVE = HELPFUL. Removing example i changes theta by about H^{-1} grad l_i / N and
the validation loss by about +influence_i / N, so a positive influence means removing the
example would raise the validation loss.

Solvers (`INFLUENCE_SOLVERS`): "exact" (dense Hessian, Cholesky/LU: a few thousand
parameters at most), "cg" (HVPs, tens to hundreds), "lissa" (HVPs, hundreds to thousands;
``lissa_scale="auto"`` by power iteration) and "diag_fisher": H replaced by the diagonal
of the empirical Fisher of the training batch, F_jj = mean_i (d l_i / d theta_j)^2, so
``s = grad L_V / (diag F + damping)`` (one pass of per-example gradients over the training
batch, no solve; a cheap and crude approximation: it ignores every correlation between
parameters, and its scores correlate with exact influence only as well as the problem
allows; tests/test_influence_api.py reports the figure on its problem).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kdprune_jax import autodiff
from kdprune_jax.autodiff import SolverError, check_solve  # noqa: F401 (re-exported)
from kdprune_jax.scoring._fn import as_tree_fn, example_losses_fn, scalar_loss

INFLUENCE_SOLVERS = ("exact", "cg", "lissa", "diag_fisher")


def _chunks(batch, chunk_size: int):
    """batch [N, ...] -> ([m, k, ...] padded by repeating row 0, mask [m, k])."""
    n = jax.tree.leaves(batch)[0].shape[0]
    k = max(1, min(chunk_size or n, n))
    m = -(-n // k)
    pad = m * k - n

    def split(a):
        a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) if pad else a
        return a.reshape((m, k) + a.shape[1:])

    mask = (jnp.arange(m * k) < n).reshape(m, k)
    return jax.tree.map(split, batch), mask, n


def _diag_fisher(example_losses, params, batch, chunk_size):
    chunks, mask, n = _chunks(batch, chunk_size)

    def body(acc, xs):
        rows, msk = xs
        g = autodiff.per_example_grads(example_losses, params, rows)
        w = msk.astype(jax.tree.leaves(acc)[0].dtype)
        return jax.tree.map(lambda a, gi: a + jnp.tensordot(w, jnp.square(gi), axes=1),
                            acc, g), None

    acc, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (chunks, mask))
    return jax.tree.map(lambda a: a / n, acc)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _diag_fisher_jit(example_losses, params, batch, chunk_size):
    return _diag_fisher(example_losses_fn(example_losses), params, batch, chunk_size)


def diag_fisher(example_losses, params, batch, *, chunk_size: int = 256):
    """The diagonal of the empirical Fisher, F_jj = mean_i (d l_i / d theta_j)^2.

    Args:
      example_losses: ``(params, batch) -> [B]``.
      batch: pytree with leading axis N (the examples F is averaged over).
      chunk_size: examples per vmap inside a lax.scan (peak memory chunk_size x #params).
    Returns:
      pytree like `params` (its dtypes).
    """
    return _diag_fisher_jit(as_tree_fn(example_losses, "example_losses"), params, batch,
                            chunk_size)


def _solver_args(solver, max_iters, example_losses, where):
    autodiff.check_solver(solver, INFLUENCE_SOLVERS)
    if solver == "diag_fisher" and example_losses is None:
        raise ValueError(f"{where}(solver='diag_fisher') needs example_losses= (the training "
                         f"per-example losses whose squared gradients make the Fisher)")
    return autodiff.DEFAULT_MAX_ITERS.get(solver, 1) if max_iters is None else max_iters


def _settings(damping, max_iters, lissa_scale):
    return dict(damping=damping, max_iters=max_iters, lissa_scale=lissa_scale)


@functools.partial(jax.jit, static_argnames=("solver", "max_iters", "tol", "lissa_scale",
                                             "chunk_size"))
def _s_test_jit(train_loss, val_loss, example_losses, preconditioner, params, train_batch,
                val_batch, damping, *, solver, max_iters, tol, lissa_scale, chunk_size):
    g_val = jax.grad(scalar_loss(val_loss, "val_loss"))(params, val_batch)
    if solver == "diag_fisher":
        f = _diag_fisher(example_losses_fn(example_losses), params, train_batch, chunk_size)
        s = jax.tree.map(lambda g, fj: g / (fj + damping), g_val, f)
        zero = jnp.zeros((), ravel_pytree(params)[0].dtype)
        return s, {"iterations": jnp.asarray(1), "residual": zero,
                   "diverged": jnp.asarray(False)}
    loss = scalar_loss(train_loss, "train_loss")
    precond = None if preconditioner is None else preconditioner(params, train_batch)
    return autodiff._solve(loss, params, train_batch, g_val, solver=solver, damping=damping,
                           max_iters=max_iters, tol=tol, lissa_scale=lissa_scale,
                           preconditioner=precond)


def s_test(train_loss, val_loss, params, train_batch, val_batch, *, damping,
           solver: str = "cg", max_iters: int | None = None, tol: float = 1e-6,
           lissa_scale="auto", preconditioner=None, example_losses=None,
           chunk_size: int = 256, check: bool = True):
    """Solve (H + damping I) s = grad L_V once, inside one jit.

    Args:
      train_loss: ``(params, batch) -> scalar`` whose Hessian is H (mean loss + regularizer).
      val_loss: ``(params, batch) -> scalar`` target loss L_V.
      params: pytree (e.g. only the head, with the rest closed over by the loss functions).
      train_batch / val_batch: pytrees of arrays (sharded or not) fed to the losses.
      damping: >= 0, required: it is added to H on top of any L2 term in `train_loss` (a
        loss with (mu/2)||theta||^2 already has mu I in H; damping=0 then adds nothing).
      solver: one of `INFLUENCE_SOLVERS`.
      max_iters: None = the solver's default (cg 100, lissa 1000).
      lissa_scale: a number > (lambda_max + damping) / 2, or "auto" (power iteration).
      preconditioner: CG only; ``(params, train_batch) -> (pytree -> pytree)`` building M^-1
        inside this jit, e.g. `scoring.head.KroneckerPreconditioner` (a frozen dataclass:
        equal settings hit the compilation cache).
      example_losses: ``(params, batch) -> [B]`` on the training batch; required by
        "diag_fisher" (its Fisher), unused otherwise.
      chunk_size: diag_fisher's examples per vmap.
      check: eagerly, raise `SolverError` on divergence or a residual above
        max(100 tol, 1e-3), naming these keyword arguments. Inside the caller's jit the
        residual is a tracer: no check; the caller inspects the returned info.
    Returns:
      (s like params, info {"iterations", "residual", "diverged"[, "lissa_scale"]}); dtypes
      follow params (float64 under jax_enable_x64 with float64 params).
    """
    max_iters = _solver_args(solver, max_iters, example_losses, "s_test")
    s, info = _s_test_jit(
        as_tree_fn(train_loss, "train_loss"), as_tree_fn(val_loss, "val_loss"),
        as_tree_fn(example_losses, "example_losses"),
        as_tree_fn(preconditioner, "preconditioner"), params, train_batch, val_batch,
        damping, solver=solver, max_iters=max_iters, tol=tol, lissa_scale=lissa_scale,
        chunk_size=chunk_size)
    if check and not autodiff.is_traced(params, train_batch, val_batch, info):
        check_solve(info, solver=solver, tol=tol, where="s_test",
                    settings=_settings(damping, max_iters, lissa_scale))
    return s, info


@jax.jit
def _influence_jit(example_losses, params, batch, s):
    fn = example_losses_fn(example_losses)
    return jax.jvp(lambda p: fn(p, batch), (params,), (s,))[1]


def influence_from_s_test(example_losses, params, batch, s):
    """influence_i = grad l_i . s for every example of `batch`, as ONE forward-mode JVP of
    the vector of per-example losses along s (cost ~ one forward pass; no per-example
    gradients are materialized).

    Args:
      example_losses: ``(params, batch) -> [B]`` (inference mode, examples uncoupled).
      s: pytree like params (from `s_test`).
    Returns: [B] in the losses' dtype; positive = helpful.
    """
    return _influence_jit(as_tree_fn(example_losses, "example_losses"), params, batch, s)


@functools.partial(jax.jit, static_argnames=("solver", "max_iters", "tol", "lissa_scale",
                                             "chunk_size"))
def _self_influence_jit(example_losses, train_loss, params, train_batch, batch, damping, *,
                        solver, max_iters, tol, lissa_scale, chunk_size):
    per = example_losses_fn(example_losses)
    grads = autodiff.per_example_grads(per, params, batch)
    flat_g = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)
    flat, unravel = ravel_pytree(params)
    if solver == "diag_fisher":
        f = ravel_pytree(_diag_fisher(per, params, train_batch, chunk_size))[0]
        zero = jnp.zeros((), flat.dtype)
        return jnp.sum(flat_g * flat_g / (f + damping), axis=-1), {
            "iterations": jnp.asarray(1), "residual": zero, "diverged": jnp.asarray(False)}
    loss = scalar_loss(train_loss, "train_loss")
    if solver == "exact":
        h = jax.hessian(lambda f: loss(unravel(f), train_batch))(flat)
        h = h + damping * jnp.eye(flat.size, dtype=flat.dtype)
        chol = jax.scipy.linalg.cho_factor(h)
        solved = jax.scipy.linalg.cho_solve(chol, flat_g.T).T
        # The worst example's residual: NaN when H + damping I is not positive definite.
        res = jnp.max(jnp.linalg.norm(solved @ h - flat_g, axis=-1)
                      / jnp.maximum(jnp.linalg.norm(flat_g, axis=-1), 1e-30))
        return jnp.sum(flat_g * solved, axis=-1), {
            "iterations": jnp.asarray(1), "residual": res, "diverged": jnp.asarray(False)}

    def one(g):
        x, info = autodiff._solve(loss, params, train_batch, unravel(g), solver=solver,
                                  damping=damping, max_iters=max_iters, tol=tol,
                                  lissa_scale=lissa_scale, preconditioner=None)
        return jnp.vdot(ravel_pytree(x)[0], g), info

    scores, infos = jax.lax.map(one, flat_g)
    worst = {"iterations": jnp.max(infos["iterations"]), "residual": jnp.max(infos["residual"]),
             "diverged": jnp.any(infos["diverged"])}
    if "lissa_scale" in infos:
        worst["lissa_scale"] = jnp.min(infos["lissa_scale"])
    return scores, worst


def self_influence(example_losses, train_loss, params, train_batch, batch, *, damping,
                   solver: str = "exact", max_iters: int | None = None, tol: float = 1e-6,
                   lissa_scale="auto", chunk_size: int = 256, check: bool = True):
    """g_i^T (H + damping I)^{-1} g_i for every example of `batch`.

    Large = atypical or mislabelled (the model must bend to fit it). "exact" factors the
    dense damped Hessian once (Cholesky: it must be positive definite) and reuses it for
    every example; "cg" / "lissa" run one solve per example (lax.map: B solves);
    "diag_fisher" divides by the diagonal empirical Fisher of `train_batch`.

    Args:
      example_losses: ``(params, batch) -> [B]``; its gradients g_i (per example of `batch`,
        and, for diag_fisher, of `train_batch`).
      train_loss: ``(params, batch) -> scalar`` defining H on `train_batch` (unused by
        diag_fisher).
      train_batch: the examples defining H (or F); batch: the examples to score (leading
        axis B).
      damping: >= 0, required (added on top of any L2 term in `train_loss`).
      solver: one of `INFLUENCE_SOLVERS`; max_iters: None = the solver's default (cg 100,
        lissa 1000); tol: relative residual; lissa_scale: number or "auto".
      check: eagerly, raise `SolverError` when the worst example's solve failed; inside the
        caller's jit, inspect the info instead.
    Returns:
      (scores [B] in the params' dtype, info: the worst example's iterations and residual).
    """
    max_iters = _solver_args(solver, max_iters, example_losses, "self_influence")
    scores, info = _self_influence_jit(
        as_tree_fn(example_losses, "example_losses"), as_tree_fn(train_loss, "train_loss"),
        params, train_batch, batch, damping, solver=solver, max_iters=max_iters, tol=tol,
        lissa_scale=lissa_scale, chunk_size=chunk_size)
    if check and not autodiff.is_traced(params, train_batch, batch, info):
        check_solve(info, solver=solver, tol=tol, where="self_influence",
                    settings=_settings(damping, max_iters, lissa_scale))
    return scores, info
