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
