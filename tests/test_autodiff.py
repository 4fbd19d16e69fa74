"""HVPs against jax.hessian, inverse-HVP solvers against a dense solve, LiSSA divergence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kdprune_jax import autodiff
from kdprune_jax.scoring.influence import SolverError, check_solve

rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
Y = jnp.asarray(rng.integers(0, 3, 32))
IMG = jnp.asarray(rng.normal(size=(8, 6, 6, 2)), jnp.float32)


def mlp_params(key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"w1": 0.5 * jax.random.normal(k1, (6, 5)), "b1": jnp.zeros(5),
            "w2": 0.5 * jax.random.normal(k2, (5, 3)), "b2": jnp.full(3, 0.1)}


def mlp_loss(p):
    h = jnp.tanh(X @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), Y])


def conv_params(key=1):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"k": 0.3 * jax.random.normal(k1, (3, 3, 2, 4)), "w": 0.3 * jax.random.normal(
        k2, (4, 3))}


def conv_loss(p):
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
    got = ravel_pytree(jax.jit(autodiff.hvp, static_argnums=0)(loss, params, unravel(v)))[0]
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
    solve = jax.jit(lambda p, b: autodiff.inverse_hvp(mlp_loss, p, b, solver=solver,
                                                      damping=damping, **kw))
    x, info = solve(params, unravel(b))
    np.testing.assert_allclose(ravel_pytree(x)[0], want, rtol=1e-3, atol=1e-4)
    assert float(info["residual"]) < 1e-3 and not bool(info["diverged"])
    check_solve(info, solver=solver, tol=1e-5)


def test_lissa_divergence_is_reported_with_the_fix():
    params, unravel, b, damping, _, eig = _damped_problem()
    too_small = float(eig.max() + damping) / 4  # violates the convergence condition
    x, info = autodiff.inverse_hvp(mlp_loss, params, unravel(b), solver="lissa",
                                   damping=damping, lissa_scale=too_small, max_iters=2000)
    assert bool(info["diverged"])
    with pytest.raises(SolverError, match="LiSSA diverged.*lissa_scale.*damping"):
        check_solve(info, solver="lissa", tol=1e-6)


def test_cg_not_converging_names_max_iters():
    params, unravel, b, damping, _, _ = _damped_problem()
    _, info = autodiff.inverse_hvp(mlp_loss, params, unravel(b), solver="cg",
                                   damping=damping, max_iters=2, tol=1e-8)
    with pytest.raises(SolverError, match=r"did not converge.*influence\.max_iters"):
        check_solve(info, solver="cg", tol=1e-8)


def test_per_example_grads_equal_loop():
    params = mlp_params()

    def one(p, ex):
        h = jnp.tanh(ex["x"] @ p["w1"] + p["b1"])
        return -jax.nn.log_softmax(h @ p["w2"] + p["b2"])[ex["y"]]

    g = autodiff.per_example_grads(one, params, {"x": X[:5], "y": Y[:5]})
    for i in range(5):
        gi = jax.grad(one)(params, {"x": X[i], "y": Y[i]})
        for k in params:
            np.testing.assert_allclose(g[k][i], gi[k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------ per-example-friendly convolution
@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (1, 1), "SAME"), ((3, 3), (2, 2), ((1, 1), (1, 1))), ((1, 1), (2, 2), "VALID"),
    ((3, 3), (1, 1), "VALID"), ((7, 7), (2, 2), ((3, 3), (3, 3))), ((3, 3), (2, 2), "SAME"),
])
def test_per_example_conv_matches_lax_conv_values_and_gradients(kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 9, 10, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, 4, 5)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")

    def f(conv):
        def loss(x, w):
            y = conv(x, w, strides, padding, dimension_numbers=dn)
            return jnp.sum(jnp.sin(y))  # a non-linear loss: cotangents vary per position
        return loss

    ours, ref = f(autodiff.conv_general_dilated_per_example), f(jax.lax.conv_general_dilated)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-6)
    for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Per-example kernel gradients (the case it exists for) equal a loop over examples.
    per_ex = jax.vmap(jax.grad(lambda xi, w: ours(xi[None], w), 1), (0, None))(x, w)
    for i in range(x.shape[0]):
        np.testing.assert_allclose(per_ex[i], jax.grad(ref, 1)(x[i:i + 1], w), rtol=1e-4,
                                   atol=1e-4)


def test_per_example_conv_falls_back_for_grouped_convolutions():
    x = jnp.ones((2, 5, 5, 4))
    w = jnp.ones((3, 3, 2, 4))
    dn = ("NHWC", "HWIO", "NHWC")
    got = autodiff.conv_general_dilated_per_example(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                                    feature_group_count=2)
    want = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                        feature_group_count=2)
    np.testing.assert_array_equal(got, want)
