"""HVPs against jax.hessian, inverse-HVP solvers against a dense solve, LiSSA divergence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kdprune_jax import autodiff
from kdprune_jax.autodiff import SolverError, check_solve

rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
Y = jnp.asarray(rng.integers(0, 3, 32))
IMG = jnp.asarray(rng.normal(size=(8, 6, 6, 2)), jnp.float32)


def mlp_params(key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"w1": 0.5 * jax.random.normal(k1, (6, 5)), "b1": jnp.zeros(5),
            "w2": 0.5 * jax.random.normal(k2, (5, 3)), "b2": jnp.full(3, 0.1)}


def mlp_loss(p, batch=None):
    h = jnp.tanh(X @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), Y])


def conv_params(key=1):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"k": 0.3 * jax.random.normal(k1, (3, 3, 2, 4)), "w": 0.3 * jax.random.normal(
        k2, (4, 3))}


def conv_loss(p, batch=None):
    y = jax.lax.conv_general_dilated(IMG, p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    logits = jnp.mean(jax.nn.softplus(y), axis=(1, 2)) @ p["w"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), Y[:8]])


@pytest.mark.parametrize("loss,params", [(mlp_loss, mlp_params()), (conv_loss, conv_params())],
                         ids=["mlp", "conv"])
def test_hvp_equals_dense_hessian(loss, params):
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda f: loss(unravel(f)))(flat)
    v = jnp.asarray(np.random.default_rng(2).normal(size=flat.size), jnp.float32)
    got = ravel_pytree(jax.jit(autodiff.hvp, static_argnums=0)(loss, params, None,
                                                               unravel(v)))[0]
    np.testing.assert_allclose(got, h @ v, rtol=1e-4, atol=1e-6)


def _damped_problem():
    params = mlp_params()
    flat, unravel = ravel_pytree(params)
    damping = 0.5  # makes H + damping I positive definite for this non-convex MLP
    h = jax.hessian(lambda f: mlp_loss(unravel(f)))(flat)
    b = jnp.asarray(np.random.default_rng(3).normal(size=flat.size), jnp.float32)
    want = np.linalg.solve(np.asarray(h, np.float64) + damping * np.eye(flat.size),
                           np.asarray(b, np.float64))
    eig = np.linalg.eigvalsh(np.asarray(h, np.float64))
    return params, unravel, b, damping, want, eig


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa"])
def test_inverse_hvp_solvers_equal_dense_solve(solver):
    params, unravel, b, damping, want, eig = _damped_problem()
    assert eig.min() + damping > 0
    # LiSSA converges for scale > (lambda_max + damping) / 2.
    kw = dict(max_iters=5000, tol=1e-7, lissa_scale=float(eig.max() + damping))
    solve = jax.jit(lambda p, b: autodiff.inverse_hvp(mlp_loss, p, None, b, solver=solver,
                                                      damping=damping, **kw))
    x, info = solve(params, unravel(b))
    np.testing.assert_allclose(ravel_pytree(x)[0], want, rtol=1e-3, atol=1e-4)
    assert float(info["residual"]) < 1e-3 and not bool(info["diverged"])
    check_solve(info, solver=solver, tol=1e-5)


def test_lissa_divergence_is_reported_with_the_fix():
    params, unravel, b, damping, _, eig = _damped_problem()
    too_small = float(eig.max() + damping) / 4  # violates the convergence condition
    x, info = autodiff.inverse_hvp(mlp_loss, params, None, unravel(b), solver="lissa",
                                   damping=damping, lissa_scale=too_small, max_iters=2000,
                                   check=False)
    assert bool(info["diverged"])
    with pytest.raises(SolverError, match="LiSSA diverged.*lissa_scale=.*'auto'.*damping="):
        check_solve(info, solver="lissa", tol=1e-6)
    # Eagerly, inverse_hvp itself raises (check=True is the default).
    with pytest.raises(SolverError, match="inverse_hvp: LiSSA diverged"):
        autodiff.inverse_hvp(mlp_loss, params, None, unravel(b), solver="lissa",
                             damping=damping, lissa_scale=too_small, max_iters=2000)


def test_lissa_auto_scale_converges_where_a_fixed_small_scale_diverges():
    params, unravel, b, damping, want, eig = _damped_problem()
    lam = float(autodiff.largest_eigenvalue(mlp_loss, params, None, iters=100))
    np.testing.assert_allclose(lam, np.abs(eig).max(), rtol=2e-2)
    x, info = autodiff.inverse_hvp(mlp_loss, params, None, unravel(b), solver="lissa",
                                   damping=damping, max_iters=5000, tol=1e-6)
    assert float(info["lissa_scale"]) > (eig.max() + damping) / 2
    np.testing.assert_allclose(ravel_pytree(x)[0], want, rtol=1e-3, atol=1e-4)


def test_damped_matvec_is_the_damped_hessian_on_flat_vectors():
    params, unravel, _, damping, _, _ = _damped_problem()
    flat = ravel_pytree(params)[0]
    h = jax.hessian(lambda f: mlp_loss(unravel(f)))(flat)
    v = jnp.asarray(np.random.default_rng(6).normal(size=flat.size), jnp.float32)
    mv = autodiff.damped_matvec(mlp_loss, params, None, damping)
    assert callable(mv)  # the function itself, not a (function, size) tuple
    np.testing.assert_allclose(mv(v), h @ v + damping * v, rtol=1e-4, atol=1e-5)


def test_unknown_solver_names_are_refused():
    params, unravel, b, damping, _, _ = _damped_problem()
    for bad in ("EXACT", "foo", "Cg"):
        with pytest.raises(ValueError, match=r"unknown solver .*allowed: exact, cg, lissa"):
            autodiff.inverse_hvp(mlp_loss, params, None, unravel(b), solver=bad,
                                 damping=damping)


def test_cg_warm_start_reaches_the_same_solution_in_fewer_iterations():
    params, unravel, b, damping, want, _ = _damped_problem()
    solve = jax.jit(lambda x0: autodiff.solve_cg(mlp_loss, params, None, unravel(b),
                                                 damping=damping, max_iters=500, tol=1e-6,
                                                 x0=x0))
    cold, cold_info = solve(None)
    # A start near the answer, as the previous outer step's solution is.
    near = unravel(jnp.asarray(want * (1 + 0.01 * np.random.default_rng(4).normal(
        size=want.size)), jnp.float32))
    warm, warm_info = solve(near)
    np.testing.assert_allclose(ravel_pytree(warm)[0], want, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ravel_pytree(warm)[0], ravel_pytree(cold)[0], rtol=1e-3,
                               atol=1e-4)
    assert float(warm_info["residual"]) < 1e-5
    assert 0 < int(warm_info["iterations"]) < int(cold_info["iterations"])
    # Started at the exact solution: nothing to do.
    _, exact_info = solve(unravel(jnp.asarray(want, jnp.float32)))
    assert int(exact_info["iterations"]) <= 1


def test_preconditioned_cg_with_the_exact_inverse_converges_in_one_iteration():
    params, unravel, b, damping, want, _ = _damped_problem()
    flat = ravel_pytree(params)[0]
    h = jax.hessian(lambda f: mlp_loss(unravel(f)))(flat)
    inv = jnp.linalg.inv(h + damping * jnp.eye(flat.size))
    exact = lambda t: unravel(inv @ ravel_pytree(t)[0])  # noqa: E731
    x, info = autodiff.solve_cg(mlp_loss, params, None, unravel(b), damping=damping, max_iters=50,
                                tol=1e-5, preconditioner=exact)
    np.testing.assert_allclose(ravel_pytree(x)[0], want, rtol=1e-3, atol=1e-4)
    assert int(info["iterations"]) <= 2 and float(info["residual"]) < 1e-5
    # A poor but valid preconditioner (SPD diagonal) changes the path, not the answer.
    diag = unravel(jnp.asarray(np.random.default_rng(5).uniform(0.5, 2.0, flat.size),
                               jnp.float32))
    x, info = autodiff.solve_cg(mlp_loss, params, None, unravel(b), damping=damping, max_iters=500,
                                tol=1e-6, preconditioner=lambda t: jax.tree.map(
                                    jnp.multiply, diag, t))
    np.testing.assert_allclose(ravel_pytree(x)[0], want, rtol=1e-3, atol=1e-4)
    assert float(info["residual"]) < 1e-5


def test_cg_not_converging_names_max_iters():
    params, unravel, b, damping, _, _ = _damped_problem()
    _, info = autodiff.inverse_hvp(mlp_loss, params, None, unravel(b), solver="cg",
                                   damping=damping, max_iters=2, tol=1e-8, check=False)
    with pytest.raises(SolverError, match=r"did not converge.*influence\.max_iters \(now 2\)"):
        check_solve(info, solver="cg", tol=1e-8, settings={"max_iters": 2},
                    names={"max_iters": "influence.max_iters"})
    with pytest.raises(SolverError, match=r"inverse_hvp: cg .*raise max_iters= \(now 2\)"):
        autodiff.inverse_hvp(mlp_loss, params, None, unravel(b), solver="cg",
                             damping=damping, max_iters=2, tol=1e-8)


def test_per_example_grads_equal_loop():
    params = mlp_params()

    def example_losses(p, batch):
        h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])
        logp = jax.nn.log_softmax(h @ p["w2"] + p["b2"])
        return -jnp.take_along_axis(logp, batch["y"][:, None], 1)[:, 0]

    g = autodiff.per_example_grads(example_losses, params, {"x": X[:5], "y": Y[:5]})
    for i in range(5):
        gi = jax.grad(lambda p: example_losses(p, {"x": X[i:i + 1], "y": Y[i:i + 1]})[0])(
            params)
        for k in params:
            np.testing.assert_allclose(g[k][i], gi[k], rtol=1e-5, atol=1e-7)
