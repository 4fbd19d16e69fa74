"""The jitted KD train step: sharded == single device, one compile, resume == uninterrupted."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kdprune_jax import data, sharding
from kdprune_jax.models import create_model
from kdprune_jax.train import TrainState, evaluate, make_kd_train_step, make_optimizer
from kdprune_jax.train.loop import NonFiniteLossError, train_model
from kdprune_jax.train.metrics import MetricsWriter

OPT = ml_collections.ConfigDict(dict(
    learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
    warmup_epochs=0.0, step_boundaries_epochs=(), step_decay=0.1, num_epochs=1, batch_size=16))


def _models():
    student = create_model("cifar_resnet8", num_classes=10, seed=0, width=0.25)
    teacher = create_model("cifar_resnet8", num_classes=10, seed=1, width=0.5)
    t = nnx.split(teacher, nnx.Param, nnx.BatchStat)
    return student, t


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32)}


def _run_steps(mesh, n_steps=3):
    student, (tg, tp, tb) = _models()
    g, p, b = nnx.split(student, nnx.Param, nnx.BatchStat)
    tx, _ = make_optimizer(OPT, 10.0, 10)
    state = sharding.replicate(TrainState.create(p, b, tx), mesh)
    teacher_vars = sharding.replicate((tp, tb), mesh)
    step = make_kd_train_step(g, tx, mesh, teacher_graphdef=tg, alpha=0.7, temperature=3.0)
    losses = []
    for i in range(n_steps):
        state, m = step(state, teacher_vars, sharding.to_global(_batch(seed=i), mesh))
        losses.append(float(m["loss"]))
    return state, losses, step


def test_sharded_step_equals_single_device_and_compiles_once():
    assert jax.device_count() == 8
    s8, l8, step8 = _run_steps(sharding.make_mesh(8))
    s1, l1, _ = _run_steps(sharding.make_mesh(1))
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s8.batch_stats), jax.tree.leaves(s1.batch_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    # The batch really is split over 8 devices and the state is replicated.
    leaf = jax.tree.leaves(s8.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    assert step8._cache_size() == 1  # 3 steps, one compilation
    assert int(s8.step) == 3


def test_teacher_is_not_updated_and_loss_decreases():
    student, (tg, tp, tb) = _models()
    mesh = sharding.make_mesh()
    g, p, b = nnx.split(student, nnx.Param, nnx.BatchStat)
    tx, _ = make_optimizer(OPT.copy_and_resolve_references(), 10.0, 30)
    state = sharding.replicate(TrainState.create(p, b, tx), mesh)
    tv = sharding.replicate((tp, tb), mesh)
    before = jax.tree.map(np.asarray, tv)
    step = make_kd_train_step(g, tx, mesh, teacher_graphdef=tg, alpha=1.0, temperature=4.0)
    batch = sharding.to_global(_batch(seed=3), mesh)
    first = None
    for _ in range(30):
        state, m = step(state, tv, batch)
        first = first if first is not None else {k: float(v) for k, v in m.items()}
    # alpha = 1: the loss is tau^2 * KL(teacher || student) alone, so halving it means the
    # student moved toward the teacher's distribution.
    assert float(m["loss"]) < 0.5 * first["loss"]
    assert 0.0 <= float(m["kd_agreement"]) <= 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(tv)):
        np.testing.assert_array_equal(a, np.asarray(b))


def _train(tmp_path, num_steps, name="student", ckpt_every=4, opt=OPT):
    split = data.load_split(ml_collections.ConfigDict(dict(source="digits", max_per_class=0)),
                            "train")
    tr, _ = data.make_transforms("cifar", 8, (64.0,), (96.0,))
    student = create_model("cifar_resnet8", num_classes=10, seed=0, width=0.25)
    return train_model(
        name=name, model=student,
        dataset_fn=lambda: data.train_dataset(split, np.arange(400), global_batch_size=32,
                                              num_steps=12, seed=0, transform=tr),
        num_steps=num_steps, steps_per_epoch=12.5, opt_cfg=opt, mesh=sharding.make_mesh(),
        ckpt_dir=str(tmp_path / "ckpt"), fingerprint="fp", writer=MetricsWriter(str(tmp_path)),
        global_batch_size=32, log_every_steps=2, checkpoint_every_steps=ckpt_every,
        log=lambda *_: None,
    ), split


class _Preempted(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from kdprune_jax.train import loop

    full, _ = _train(tmp_path / "a", 12)
    # Die right after step 7 (last checkpoint: step 4), as a preempted host would; the
    # same call then resumes from step 4 and replays steps 5-12 from the restored data
    # iterator position.
    def die():
        raise _Preempted

    monkeypatch.setattr(loop, "_kill_self", die)
    monkeypatch.setenv("KDPRUNE_KILL_AT", "student:7")
    with pytest.raises(_Preempted):
        _train(tmp_path / "b", 12)
    monkeypatch.delenv("KDPRUNE_KILL_AT")
    resumed, _ = _train(tmp_path / "b", 12)
    assert resumed.resumed_from == 4
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(full.batch_stats), jax.tree.leaves(resumed.batch_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    # A finished run is reused, not retrained.
    again, _ = _train(tmp_path / "b", 12)
    assert again.reused and again.resumed_from == 12
    assert 0 < again.seconds <= resumed.seconds  # the recorded cost, not 0


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    bad = OPT.copy_and_resolve_references()
    bad.learning_rate = 1e12
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+.*checkpoint"):
        _train(tmp_path, 12, opt=bad, ckpt_every=2)


def test_eval_counts_each_example_once():
    split = data.load_split(ml_collections.ConfigDict(dict(source="digits", max_per_class=0)),
                            "test")
    _, ev = data.make_transforms("none", 8, (64.0,), (96.0,))
    model = create_model("cifar_resnet8", num_classes=10, seed=0, width=0.25)
    g, p, b = nnx.split(model, nnx.Param, nnx.BatchStat)
    mesh = sharding.make_mesh()
    idx = np.arange(len(split))
    ds, _ = data.eval_dataset(split, idx, global_batch_size=64, transform=ev)
    got = evaluate(g, p, b, ds, mesh)
    # Reference: one unpadded forward pass over all examples.
    x = np.stack([ev(split.source[i]["image"]) for i in idx])
    logits = model(jnp.asarray(x), train=False)
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == split.labels))
    assert got["count"] == len(split)
    assert abs(got["accuracy"] - acc) < 1e-6
