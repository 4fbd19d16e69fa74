"""Cached-teacher mode (config.kd.teacher_views): fixed views are reproducible, the cached
logits are the teacher's logits on exactly the view the student sees, the cached step equals
the live step on the same view, and the pipeline reuses / rebuilds the cache like any
artifact."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdprune_jax import context, data, pipeline, sharding
from kdprune_jax.stages import teacher as teacher_stage
from kdprune_jax.train import TrainState, make_kd_train_step, make_optimizer
from tests.test_pipeline import load_config, override, snapshot
from tests.test_train import OPT, _batch, _models


def _split(n=12):
    rng = np.random.default_rng(0)
    return data.array_split(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                            rng.integers(0, 3, n), num_classes=3)


def _augment(image, rng):  # a crop offset and a flip, like the cifar augmentation
    out = np.roll(image.astype(np.float32), int(rng.integers(0, 3)), axis=0)
    return out[:, ::-1] if rng.random() < 0.5 else out


def test_views_dataset_and_train_stream_agree_on_every_view():
    split, v, seed = _split(), 3, 7
    idx = np.array([1, 4, 5, 9])
    batches, nb = data.views_dataset(split, idx, num_views=v, seed=seed, global_batch_size=5,
                                     transform=_augment)
    rows = [b for b in batches]
    assert nb == len(rows) == 3  # 12 pairs padded to 15
    pos = np.concatenate([b["index"] for b in rows])
    mask = np.concatenate([b["mask"] for b in rows])
    images = np.concatenate([b["image"] for b in rows])
    assert mask.sum() == 12 and list(pos[mask > 0]) == list(range(12))
    for p in range(12):  # pair p = view p % V of example idx[p // V], always the same pixels
        i, view = idx[p // v], p % v
        want = _augment(split.source[i]["image"], data.view_rng(seed, i, view))
        np.testing.assert_array_equal(images[p], want)
    # Fake logits = 10 * example + view: the train stream must hand out the matching pair.
    logits = np.array([[[10 * i + view] * 3 for view in range(v)] for i in idx], np.float16)
    tv = data.TeacherViews(idx, logits, seed)
    stream = data.train_dataset(split, idx, global_batch_size=4, num_steps=6, seed=0,
                                transform=_augment, teacher_views=tv)
    seen = set()
    for b in stream:
        for img, i, t in zip(b["image"], b["index"], b["teacher_logits"]):
            view = int(t[0]) - 10 * int(i)
            assert 0 <= view < v and t.dtype == np.float32
            want = _augment(split.source[int(i)]["image"], data.view_rng(seed, i, view))
            np.testing.assert_array_equal(img, want)
            seen.add((int(i), view))
    assert len(seen) > len(idx)  # several views of the same example are drawn


def test_cached_step_equals_live_step_on_the_same_view():
    mesh = sharding.make_mesh()
    student, (tg, tp, tb) = _models()
    g, p, b = nnx.split(student, nnx.Param, nnx.BatchStat)
    p0, b0 = jax.tree.map(np.asarray, (p, b))
    tx, _ = make_optimizer(OPT, 10.0, 10)
    batch = _batch()
    t_logits = np.asarray(nnx.merge(tg, tp, tb)(jnp.asarray(batch["image"]), train=False))
    out = {}
    for name in ("live", "cached"):
        cached = name == "cached"
        state = sharding.replicate(TrainState.create(*jax.tree.map(jnp.array, (p0, b0)), tx),
                                   mesh)
        step = make_kd_train_step(g, tx, mesh, teacher_graphdef=None if cached else tg,
                                  kd_weight=0.7, temperature=3.0, cached_teacher=cached)
        tv = None if cached else sharding.replicate((tp, tb), mesh)
        bt = {**batch, "teacher_logits": t_logits} if cached else batch
        state, m = step(state, tv, sharding.to_global(bt, mesh))
        out[name] = (jax.tree.map(np.asarray, state.params), float(m["loss"]),
                     float(m["kd_agreement"]))
    # Equal up to float rounding (the live step fuses the teacher forward differently).
    np.testing.assert_allclose(out["live"][1], out["cached"][1], rtol=1e-6)
    assert out["live"][2] == out["cached"][2]
    for a, c in zip(jax.tree.leaves(out["live"][0]), jax.tree.leaves(out["cached"][0])):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_pipeline_caches_teacher_views_reuses_and_rebuilds(tmp_path):
    config = override(load_config("quickstart.py", "smoke"), kd__teacher_views=2)
    wd = str(tmp_path / "w")
    r = pipeline.run(config, wd)
    cache = os.path.join(wd, "teacher_views")
    meta = json.load(open(os.path.join(cache, "meta.json")))
    logits = np.load(os.path.join(cache, "logits.npy"))
    n = r["subset"]["num_kept"]
    assert meta["num_views"] == 2 and logits.shape == (2 * n, 10) and logits.dtype == np.float16
    assert "teacher_views_seconds" in r["timings"]
    # The cached rows are the teacher's logits on exactly those views.
    model = teacher_stage.import_teacher(
        override(config, teacher__init=os.path.join(wd, "teacher")), 10, sharding.make_mesh())
    ds = context.load_splits(config)
    kept = np.sort(json.load(open(os.path.join(wd, "subset.json")))["indices"])
    train_fn, _ = data.make_transforms(config.data.augment, config.data.image_size,
                                       config.data.mean, config.data.std)
    for row, view in ((0, 0), (0, 1), (n - 1, 1)):
        i = kept[row]
        img = train_fn(ds.train.source[int(i)]["image"], data.view_rng(meta["seed"], i, view))
        want = nnx.merge(*model.parts)(jnp.asarray(img)[None], train=False)[0]
        np.testing.assert_allclose(logits[row * 2 + view], want, rtol=2e-3, atol=2e-2)
    # A second run reuses the cache and everything else.
    before = snapshot(wd)
    pipeline.run(config, wd)
    assert snapshot(wd) == before
    # A damaged cache is rebuilt, identically; the student (made from it) is reused.
    np.save(os.path.join(cache, "logits.npy"), np.zeros(3, np.float16))
    pipeline.run(config, wd)
    np.testing.assert_array_equal(np.load(os.path.join(cache, "logits.npy")), logits)
    # Turning the mode off retrains the student with the live teacher (another fingerprint).
    wd2 = str(tmp_path / "w2")
    shutil.copytree(wd, wd2)
    r_live = pipeline.run(override(config, kd__teacher_views=0), wd2)
    assert r_live["fingerprint"] != r["fingerprint"]
    assert any(d.startswith("student.stale-") for d in os.listdir(wd2))
