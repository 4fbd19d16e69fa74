"""NNX ResNets: shapes, exact parameter counts, BatchNorm modes, functional use under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdprune_jax import losses, models
from kdprune_jax.models import MODEL_NAMES, create_model


def _n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_and_features(name):
    cifar = name.startswith("cifar")
    width = 0.25 if cifar else 0.125
    model = create_model(name, num_classes=7, width=width)
    x = jnp.ones((2, 32, 32, 3) if cifar else (2, 64, 64, 3))
    logits, feats = model(x, train=False, return_features=True)
    d = {"resnet50": 2048}.get(name, 512) if not cifar else 64
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert feats.shape == (2, int(round(d * width)))
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("name,count", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_imagenet_parameter_counts_equal_torchvision(name, count):
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=1000))
    assert _n_params(abstract) == count


def test_cifar_resnet20_parameter_count_by_formula():
    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    total = conv(3, 16, 3) + bn(16)
    cin = 16
    for cout in (16, 32, 64):
        for _ in range(3):
            total += conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if cin != cout:
                total += conv(cin, cout, 1) + bn(cout)  # projection shortcut
            cin = cout
    total += 64 * 10 + 10
    assert _n_params(create_model("cifar_resnet20", num_classes=10)) == total == 272_474


def test_batchnorm_train_updates_stats_inference_does_not():
    model = create_model("cifar_resnet8", num_classes=10, width=0.25)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    s0 = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    a, b = model(x, train=False), model(x, train=False)
    np.testing.assert_array_equal(a, b)
    for u, v in zip(jax.tree.leaves(s0), jax.tree.leaves(nnx.state(model, nnx.BatchStat))):
        np.testing.assert_array_equal(u, np.asarray(v))
    model(x, train=True)
    changed = [not np.array_equal(u, np.asarray(v)) for u, v in
               zip(jax.tree.leaves(s0), jax.tree.leaves(nnx.state(model, nnx.BatchStat)))]
    assert all(changed)


def test_functional_use_under_jit_matches_eager():
    model = create_model("cifar_resnet14", num_classes=10, width=0.25)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))

    @jax.jit
    def f(params, stats, x):
        return nnx.merge(graphdef, params, stats)(x, train=False)

    np.testing.assert_allclose(f(params, stats, x), model(x, train=False), atol=1e-5)


def test_grayscale_input_and_bfloat16_compute():
    model = create_model("cifar_resnet8", num_classes=10, width=0.25, dtype=jnp.bfloat16)
    out = model(jnp.ones((2, 8, 8, 1)), train=False)
    assert out.dtype == jnp.float32 and out.shape == (2, 10)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="cifar_resnet20.*resnet50"):
        create_model("resnet7", num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)


# ----------------------------------------------------------------------------- BatchNorm
def _bn_pair(dtype):
    from kdprune_jax.models.batchnorm import BatchNorm

    ours = BatchNorm(16, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(16, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
    for m in (ours, ref):
        m.scale[...] = jnp.linspace(0.5, 1.5, 16)
        m.bias[...] = jnp.linspace(-1.0, 1.0, 16)
    return ours, ref


def _bn_loss_and_grads(bn, x, w):
    def loss(m, x):
        return jnp.sum(jnp.sin(m(x, use_running_average=False).astype(jnp.float32)) * w)

    return nnx.value_and_grad(loss, argnums=(0, 1))(bn, x)


def test_custom_vjp_batchnorm_equals_flax_batchnorm():
    """Training-mode output, all three gradients and the running-statistics update equal
    flax's BatchNorm (the custom VJP is only a faster formulation)."""
    ours, ref = _bn_pair(jnp.float32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, (8, 5, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 5, 5, 16)), jnp.float32)
    lo, (go, gxo) = _bn_loss_and_grads(ours, x, w)
    lr, (gr, gxr) = _bn_loss_and_grads(ref, x, w)
    np.testing.assert_allclose(lo, lr, rtol=1e-5)
    np.testing.assert_allclose(gxo, gxr, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(go.scale[...], gr.scale[...], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(go.bias[...], gr.bias[...], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.mean[...], ref.mean[...], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], ref.var[...], rtol=1e-5)
    # Inference mode is flax's own code path (on running statistics equal up to rounding).
    np.testing.assert_allclose(ours(x, use_running_average=True),
                               ref(x, use_running_average=True), rtol=1e-5, atol=1e-5)


def test_with_batchnorm_vjp_switches_the_formulation_not_the_result():
    """`models.with_batchnorm_vjp(closed_form=False)` (the benchmark's flax reference) runs
    flax's own BatchNorm call: no custom VJP in the program, the same loss and gradients."""
    model = models.create_model("cifar_resnet8", num_classes=10, seed=0)
    graphdef, params, bs = nnx.split(model, nnx.Param, nnx.BatchStat)
    flax_gd = models.with_batchnorm_vjp(graphdef, params, bs, closed_form=False)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
    y = jnp.arange(8) % 10

    def loss(gd):
        def f(p, b):  # the batch statistics are traced too: train mode updates them
            logits = nnx.merge(gd, p, b, copy=True)(x, train=True)
            return jnp.mean(losses.cross_entropy(logits, y))
        return f

    for gd, has_custom_vjp in ((graphdef, True), (flax_gd, False)):
        assert ("custom_vjp" in str(jax.make_jaxpr(loss(gd))(params, bs))) \
            == has_custom_vjp
    lo, go = jax.value_and_grad(loss(graphdef))(params, bs)
    lf, gf = jax.value_and_grad(loss(flax_gd))(params, bs)
    np.testing.assert_allclose(lo, lf, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(go), jax.tree.leaves(gf)):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-4)


def test_custom_vjp_batchnorm_float64_exact_and_bfloat16_close():
    from kdprune_jax.models.batchnorm import batch_norm_train

    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, (6, 4, 4, 8))
    scale, bias = rng.normal(size=8) + 1.0, rng.normal(size=8)

    def ref(x, s, b):  # the textbook formula; autodiff gives the reference gradient
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.var(x, axis=(0, 1, 2))
        return (x - mean) / jnp.sqrt(var + 1e-5) * s + b

    w = jnp.asarray(rng.normal(size=x.shape))
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
        g_ours = jax.grad(lambda *a: jnp.sum(batch_norm_train(*a, 1e-5)[0] * w),
                          argnums=(0, 1, 2))(*args)
        g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(*args)
        for a, b in zip(g_ours, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # bfloat16 activations: statistics and normalization in float32, output bfloat16.
    y16, mean, var = batch_norm_train(jnp.asarray(x, jnp.bfloat16),
                                      jnp.asarray(scale, jnp.float32),
                                      jnp.asarray(bias, jnp.float32), 1e-5)
    assert y16.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    want = ref(jnp.asarray(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)),
               jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
    np.testing.assert_allclose(np.asarray(y16, np.float32), want, rtol=2e-2, atol=2e-2)


def test_cpu_default_option_applied_unless_user_chose():
    from kdprune_jax import cpu_flags

    on = dict(backend="cpu", jaxlib_version="0.10.2")
    assert cpu_flags.compiler_options(environ={}, **on) == cpu_flags.YNN_ELTWISE
    assert cpu_flags.compiler_options(environ={"KDPRUNE_CPU_DEFAULTS": "1"}, **on) \
        == cpu_flags.YNN_ELTWISE
    assert cpu_flags.compiler_options(environ={"KDPRUNE_CPU_DEFAULTS": "0"}, **on) == {}
    # The user's own $XLA_FLAGS choice wins; other flags do not matter.
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce"}
    assert cpu_flags.compiler_options(environ=mine, **on) == {}
    assert cpu_flags.compiler_options(environ={"XLA_FLAGS": "--a=1"}, **on) \
        == cpu_flags.YNN_ELTWISE
    # An untested jaxlib (an unknown option fails the compile) and GPU/TPU get nothing.
    assert cpu_flags.compiler_options(environ={}, backend="cpu", jaxlib_version="0.9.0") == {}
    assert cpu_flags.compiler_options(environ={}, backend="tpu", jaxlib_version="0.10.2") == {}
    with pytest.raises(ValueError, match=r"KDPRUNE_CPU_DEFAULTS='off' is invalid; allowed: 0"):
        cpu_flags.compiler_options(environ={"KDPRUNE_CPU_DEFAULTS": "off"}, **on)


def _resnet8_grads(dtype, compiler_options):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 32, 32, 3)), rng.integers(0, 10, 32)
    g, p, b = nnx.split(create_model("cifar_resnet8", num_classes=10, dtype=dtype), nnx.Param,
                        nnx.BatchStat)

    def loss(p):
        lg = nnx.merge(g, p, b, copy=True)(jnp.asarray(x, dtype), train=True)
        true = jnp.take_along_axis(lg, jnp.asarray(y)[:, None], 1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(lg, -1) - true)

    grads = jax.jit(jax.grad(loss), compiler_options=compiler_options)(p)
    return [np.asarray(v, np.float64) for v in jax.tree.leaves(grads)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")
def test_cpu_default_option_keeps_gradients_within_float32_noise():
    """The YNNPACK elementwise fusions change float32 rounding, not the math. They compute
    a*b + c as two rounded operations (as PyTorch eager does) where XLA's own kernels
    contract it into one fused multiply-add; in the cancellations of the BatchNorm backward
    that shows: a ResNet-8 train-step gradient is ~1e-3 (median relative) from float64 with
    them, ~1e-6 without. Far from bfloat16's ~1e-2."""
    from kdprune_jax import cpu_flags

    with jax.enable_x64(True):
        ref = _resnet8_grads(jnp.float64, None)
    plain = _resnet8_grads(jnp.float32, None)
    ynn = _resnet8_grads(jnp.float32, cpu_flags.YNN_ELTWISE)

    def rel_errors(grads):
        return np.array([np.abs(a - r).max() / np.abs(r).max() for a, r in zip(grads, ref)])

    plain32, ynn32 = rel_errors(plain), rel_errors(ynn)
    assert np.median(plain32) < 1e-5
    assert np.median(ynn32) < 5e-3 and np.max(ynn32) < 2e-2
    assert np.median(ynn32) > 10 * np.median(plain32)  # the option really was applied


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")
def test_ynn_option_is_scoped_to_the_hot_programs():
    """XLA:CPU (jaxlib 0.10.2) cannot run a YNN elementwise fusion that feeds a LAPACK call
    (eigh / Cholesky / LU want a column-major operand): with the option, eigh(a + a^T) of a
    64-wide matrix fails. So the option is per program, never in $XLA_FLAGS: dense-algebra
    programs (exact influence, the Kronecker preconditioner) run with XLA's kernels."""
    import os

    from kdprune_jax import autodiff, cpu_flags
    from kdprune_jax.scoring import head as head_lib

    assert cpu_flags.YNN_OPTION not in os.environ.get("XLA_FLAGS", "")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(256, 65)), jnp.float32)
    fn = lambda x: jnp.linalg.eigh(x.T @ x + (x.T @ x).T)[0]  # noqa: E731
    if cpu_flags.compiler_options():  # the jaxlib it was measured with: the bug is real
        with pytest.raises(Exception, match="unsupported layout in YNN fusion"):
            jax.block_until_ready(jax.jit(fn, compiler_options=cpu_flags.YNN_ELTWISE)(x))
    assert np.all(np.isfinite(jax.jit(fn)(x)))
    # The package's dense solves on >= 64 parameters run (they failed with the global flag).
    w = {"w": jnp.ones((65,), jnp.float32)}
    loss = lambda p, x: jnp.mean(jnp.logaddexp(0.0, -(x @ p["w"]))) + 0.01 * jnp.sum(p["w"] ** 2)  # noqa: E731
    _, info = jax.jit(lambda p: autodiff.solve_exact(loss, p, x, p, damping=0.1))(w)
    assert float(info["residual"]) < 1e-4
    batch = {"features": x, "label": jnp.zeros((256,), jnp.int32),
             "teacher_logits": jnp.zeros((256, 10), jnp.float32)}
    theta = {"w": jnp.asarray(rng.normal(size=(65, 10)) * 0.1, jnp.float32),
             "b": jnp.zeros((10,), jnp.float32)}
    r = {"w": jnp.asarray(rng.normal(size=(65, 10)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(10,)), jnp.float32)}
    f, y = jax.jit(lambda t, b, r: (lambda f: (f, head_lib.kronecker_inverse(f, r)))(
        head_lib.kronecker_factors(t, b, lam=0.9, temperature=4.0, shift=1e-2)))(
        theta, batch, r)
    assert int(f["fallback"]) == 0
    # M y == r with M = Sx (x) A + shift I built densely from the same batch.
    xa = np.c_[np.asarray(x, np.float64), np.ones(256)]
    z = xa @ np.r_[np.asarray(theta["w"]), np.asarray(theta["b"])[None]]
    a = np.zeros((10, 10))
    for t in (1.0, 4.0):
        p = np.exp(z / t - (z / t).max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        wt = 0.1 if t == 1.0 else 0.9
        a += wt * (np.diag(p.mean(0)) - p.T @ p / 256)
    ym = np.r_[np.asarray(y["w"], np.float64), np.asarray(y["b"], np.float64)[None]]
    rm = np.r_[np.asarray(r["w"]), np.asarray(r["b"])[None]]
    np.testing.assert_allclose((xa.T @ xa / 256) @ ym @ a + 1e-2 * ym, rm, rtol=2e-3,
                               atol=2e-3 * np.abs(rm).max())
