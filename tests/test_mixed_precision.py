"""config.compute_dtype=bfloat16: the train step computes in bf16 while params, batch stats,
loss and optimizer stay float32, and it tracks the float32 step closely."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdprune_jax import models, sharding
from kdprune_jax.train import TrainState, make_kd_train_step, make_optimizer
from tests.test_train import OPT, _batch, _models


def test_with_compute_dtype_casts_compute_not_params():
    model = models.create_model("cifar_resnet8", num_classes=10, seed=0, width=0.5)
    g, p, b = nnx.split(model, nnx.Param, nnx.BatchStat)
    g16 = models.with_compute_dtype(g, p, b, jnp.bfloat16)
    assert models.with_compute_dtype(g, p, b, None) is g
    x = jnp.asarray(_batch(8)["image"])

    def fwd(graphdef, p, b, x):
        return nnx.merge(graphdef, p, b)(x, train=False)

    hlo = jax.jit(fwd, static_argnums=0).lower(g16, p, b, x).as_text()
    # The convolutions themselves run in bf16 (not an f32 conv followed by a cast).
    convs = [ln for ln in hlo.splitlines() if "convolution" in ln]
    assert convs and all("bf16" in ln for ln in convs), convs[:2]
    y32, y16 = fwd(g, p, b, x), fwd(g16, p, b, x)
    assert y16.dtype == y32.dtype == jnp.float32  # the models hand out float32 logits
    err = float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)) / jnp.max(jnp.abs(y32)))
    assert 0 < err < 3e-2, err  # bf16 has 8 bits of mantissa: close, not equal
    # The original model (and its params) are untouched.
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(p))
    assert fwd(g, p, b, x).dtype == jnp.float32


def test_bf16_kd_step_tracks_float32_step_with_float32_state():
    mesh = sharding.make_mesh()
    student, (tg, tp, tb) = _models()
    g, p, b = nnx.split(student, nnx.Param, nnx.BatchStat)
    p0, b0 = jax.tree.map(np.asarray, (p, b))  # host copies: each run's state is donated
    tx, _ = make_optimizer(OPT, 10.0, 10)
    teacher_vars = sharding.replicate((tp, tb), mesh)
    runs = {}
    for name, dtype in (("f32", None), ("bf16", jnp.bfloat16)):
        p_run, b_run = jax.tree.map(jnp.array, (p0, b0))
        state = sharding.replicate(TrainState.create(p_run, b_run, tx), mesh)
        step = make_kd_train_step(
            models.with_compute_dtype(g, p, b, dtype), tx, mesh,
            teacher_graphdef=models.with_compute_dtype(tg, tp, tb, dtype), kd_weight=0.7,
            temperature=3.0)
        losses = []
        for i in range(4):
            state, m = step(state, teacher_vars, sharding.to_global(_batch(seed=i), mesh))
            losses.append(float(m["loss"]))
        runs[name] = (state, np.array(losses))
    s32, l32 = runs["f32"]
    s16, l16 = runs["bf16"]
    # State stays float32 under bf16 compute: params, BN statistics, optimizer buffers.
    for leaf in jax.tree.leaves((s16.params, s16.batch_stats, s16.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, leaf.dtype
    assert np.all(np.isfinite(l16))
    np.testing.assert_allclose(l16, l32, rtol=3e-2)
    # After 4 steps the weights differ (bf16 rounding) but by a small fraction of the update.
    d = jax.tree.map(lambda a, c: float(jnp.linalg.norm(a - c)), s16.params, s32.params)
    u = jax.tree.map(lambda a, c: float(jnp.linalg.norm(a - c)), s32.params, p0)
    assert 0 < sum(jax.tree.leaves(d)) < 0.2 * sum(jax.tree.leaves(u))
