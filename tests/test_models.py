"""NNX ResNets: shapes, exact parameter counts, BatchNorm modes, functional use under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def test_cpu_default_flags_applied_unless_user_chose():
    from kdprune_jax import cpu_flags

    flag = cpu_flags.YNN_FLAG
    assert cpu_flags.with_cpu_defaults("", "0.10.2") == flag
    assert cpu_flags.with_cpu_defaults("--a=1", "0.10.2") == f"--a=1 {flag}"
    mine = "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce"
    assert cpu_flags.with_cpu_defaults(mine, "0.10.2") == mine  # the user's choice wins
    # An untested jaxlib gets nothing: an unknown flag would abort XLA at startup.
    assert cpu_flags.with_cpu_defaults("--a=1", "0.9.0") == "--a=1"
    env = {"XLA_FLAGS": "--a=1", "KDPRUNE_CPU_DEFAULTS": "0"}
    assert cpu_flags.apply_cpu_defaults(env) == "--a=1" and env["XLA_FLAGS"] == "--a=1"


_GRADS_CHILD = r"""
import sys, numpy as np, jax, jax.numpy as jnp
from flax import nnx
from kdprune_jax.models import create_model
if sys.argv[1] == "float64":
    jax.config.update("jax_enable_x64", True)
dt = jnp.float64 if sys.argv[1] == "float64" else jnp.float32
rng = np.random.default_rng(0)
x, y = rng.standard_normal((32, 32, 32, 3)), rng.integers(0, 10, 32)
g, p, b = nnx.split(create_model("cifar_resnet8", num_classes=10, dtype=dt), nnx.Param,
                    nnx.BatchStat)
def loss(p):
    lg = nnx.merge(g, p, b, copy=True)(jnp.asarray(x, dt), train=True)
    true = jnp.take_along_axis(lg, jnp.asarray(y)[:, None], 1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(lg, -1) - true)
leaves = jax.tree.leaves(jax.jit(jax.grad(loss))(p))
np.savez(sys.argv[2], *[np.asarray(v, np.float64) for v in leaves])
"""


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU flags")
def test_cpu_default_flags_keep_gradients_within_float32_noise(tmp_path):
    """The YNNPACK elementwise fusions change float32 rounding, not the math. They compute
    a*b + c as two rounded operations (as PyTorch eager does) where XLA's own kernels
    contract it into one fused multiply-add; in the cancellations of the BatchNorm backward
    that shows: a ResNet-8 train-step gradient is ~1e-3 (median relative) from float64 with
    them, ~1e-6 without. Far from bfloat16's ~1e-2; each setting in its own process (XLA
    reads its flags once)."""
    import os
    import subprocess
    import sys

    from kdprune_jax import cpu_flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plain = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    runs = {"float64": dict(plain, KDPRUNE_CPU_DEFAULTS="0"),
            "float32": dict(plain, KDPRUNE_CPU_DEFAULTS="0"),
            "float32_ynn": dict(plain, XLA_FLAGS=cpu_flags.YNN_FLAG)}
    grads = {}
    for name, env in runs.items():
        out = tmp_path / f"{name}.npz"
        subprocess.run([sys.executable, "-c", _GRADS_CHILD, name.split("_")[0], str(out)],
                       env=dict(env, PYTHONPATH=root, JAX_PLATFORMS="cpu"), check=True,
                       capture_output=True, timeout=600)
        z = np.load(out)
        grads[name] = [z[k] for k in z.files]

    def rel_errors(name):
        return np.array([np.abs(a - r).max() / np.abs(r).max()
                         for a, r in zip(grads[name], grads["float64"])])

    plain32, ynn32 = rel_errors("float32"), rel_errors("float32_ynn")
    assert np.median(plain32) < 1e-5
    assert np.median(ynn32) < 5e-3 and np.max(ynn32) < 2e-2
