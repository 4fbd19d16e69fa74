"""The scores stage on real data (the embedded digits): every method end to end through
selection, sharded == single device, padding never scored, reuse / staleness, bad input."""

import hashlib
import os

import jax
import numpy as np
import pytest

from kdprune_jax import (
    config_checks,
    context,
    inference,
    methods,
    pipeline,
    selection,
    sharding,
)
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.stages import select
from kdprune_jax.stages import teacher as teacher_stage
from tests.helpers import quiet_run
from tests.test_pipeline import load_config, override

SMALL = dict(proxy__num_models=2, proxy__num_epochs=1, score__batch_size=128)


@pytest.fixture(scope="module")
def env(tmp_path_factory, quickstart_smoke_run):
    workdir = quickstart_smoke_run(str(tmp_path_factory.mktemp("scores")))
    config = override(load_config("quickstart.py", "smoke"), **SMALL)
    pipeline.run(config, workdir)  # trains and caches the teacher
    ds = context.load_splits(config)
    teacher = teacher_stage.import_teacher(override(config, teacher__init=os.path.join(
        workdir, "teacher")), ds.train.num_classes, sharding.make_mesh())
    return config, workdir, ds, teacher


def _scores(env, mesh=None, **fields):
    config, workdir, ds, teacher = env
    c = override(config, **fields)
    return pipeline.compute_scores(quiet_run(c, workdir, mesh=mesh, splits=ds), teacher), c


@pytest.mark.parametrize("method", methods.scored_names())
def test_every_method_scores_and_selects_exact_counts(env, method):
    config, workdir, ds, _ = env
    extra = {"influence__solver": "exact"} if method == "self_influence" else {}
    (scores, meta), c = _scores(env, prune__method=method, **extra)
    assert scores.shape == (len(ds.train),) and np.all(np.isfinite(scores))
    assert meta["method"] == method and os.path.exists(
        os.path.join(workdir, "scores", f"{method}.npz"))
    assert np.std(scores[ds.pool]) > 0  # not a constant placeholder
    sub = select.compute(quiet_run(c, workdir, splits=ds), scores, meta)
    want = selection.class_keep_counts(ds.train_labels[ds.pool], c.prune.keep_fraction, 10)
    np.testing.assert_array_equal(sub.class_counts, want)
    assert sub.direction == methods.get(method).keep
    if sub.direction == "highest":  # kept examples outrank dropped ones within each class
        for k in range(10):
            members = ds.pool[ds.train_labels[ds.pool] == k]
            kept = np.isin(members, sub.indices)
            assert scores[members[kept]].min() >= scores[members[~kept]].max() - 1e-6


def test_proxy_cost_is_recorded_and_scores_are_reused(env):
    (s1, m1), _ = _scores(env, prune__method="el2n")
    assert m1["proxy_seconds"] > 0 and len(m1["proxies"]) == 2
    path = os.path.join(env[1], "scores", "el2n.npz")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    (s2, m2), _ = _scores(env, prune__method="el2n")
    np.testing.assert_array_equal(s1, s2)
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    # A changed parameter makes the file stale: recomputed, not reused.
    (s3, m3), _ = _scores(env, prune__method="el2n", proxy__num_models=1)
    assert m3["fingerprint"] != m1["fingerprint"] and len(m3["proxies"]) == 1


@pytest.mark.multidevice
def test_scores_on_8_devices_equal_1_device(env):
    assert jax.device_count() == 8
    # The grand proxies, trained once in the shared workdir (this test may run alone, in the
    # 8-device process, without the tests that would have trained them first).
    _scores(env, prune__method="grand")
    for fields in (dict(prune__method="grand"),
                   dict(prune__method="influence", influence__scope="full",
                        influence__model="teacher", influence__loss="ce",
                        influence__damping=10.0, influence__hessian_examples=256,
                        influence__max_iters=100, influence__tol=1e-3),
                   dict(prune__method="teacher_el2n")):
        config, workdir, ds, teacher = env
        c = override(config, **fields)
        outs = []
        for n in (8, 1):
            mesh = sharding.make_mesh(n)
            assert mesh.devices.size == n  # the 8-device mesh spans every device
            wd = os.path.join(workdir, f"dev{n}")
            # Proxies for grand come from the shared workdir (same models for both meshes).
            if fields["prune__method"] == "grand":
                os.makedirs(wd, exist_ok=True)
                if not os.path.exists(os.path.join(wd, "proxies")):
                    os.symlink(os.path.join(workdir, "proxies"), os.path.join(wd, "proxies"))
            s, _ = pipeline.compute_scores(quiet_run(c, wd, mesh=mesh, splits=ds), teacher)
            outs.append(s)
        np.testing.assert_allclose(outs[0], outs[1], rtol=2e-4, atol=1e-5,
                                   err_msg=str(fields))


def test_padding_never_scores_a_fake_example(env):
    config, workdir, ds, teacher = env
    mesh = sharding.make_mesh()
    idx = np.arange(5, 5 + 131)  # not a multiple of the 128-row batch: one padded batch
    c = override(config, score__batch_size=128)
    run = quiet_run(c, workdir, mesh=mesh, splits=ds)
    fn = inference.forward_fn(teacher.graphdef)
    out = inference.batch_pass(fn, (teacher.params, teacher.batch_stats),
                               run.eval_batches(idx), mesh, len(ds.train))
    scored = np.flatnonzero(np.all(np.isfinite(out), axis=1))
    np.testing.assert_array_equal(scored, idx)
    full = inference.batch_pass(fn, (teacher.params, teacher.batch_stats),
                                run.eval_batches(np.arange(len(ds.train))), mesh, len(ds.train))
    np.testing.assert_allclose(out[idx], full[idx], rtol=1e-5, atol=1e-6)


def test_bad_inputs(env, tmp_path):
    config, workdir, ds, teacher = env
    from kdprune_jax import config_checks

    with pytest.raises(ConfigError, match="prune.method.*el2n.*influence"):
        config_checks.validate(override(config, prune__method="el2m"))
    with pytest.raises(ConfigError, match="influence.loss.*ce when influence.model=teacher"):
        config_checks.validate(override(config, prune__method="influence",
                                        influence__scope="full"))
    with pytest.raises(ConfigError, match="influence.solver"):
        config_checks.validate(override(config, influence__solver="newton"))
    # A score file computed for other data / another teacher is refused, and left as is.
    (scores, meta), _ = _scores(env, prune__method="margin")
    src = os.path.join(workdir, "scores", "margin.npz")
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
    other = override(config, prune__method="margin", prune__scores_file=src,
                     data__val_seed=1)
    with pytest.raises(ArtifactError, match="different data"):
        pipeline.run(other, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "teacher")  # refused before any training
    other_teacher = override(config, prune__method="margin", prune__scores_file=src)
    with pytest.raises(ArtifactError, match="different teacher"):
        pipeline.run(other_teacher, str(tmp_path / "w1"))
    wrong_method = override(config, prune__method="entropy", prune__scores_file=src)
    with pytest.raises(ArtifactError, match="different scoring method"):
        pipeline.run(wrong_method, str(tmp_path / "w2"))
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() == digest
    # The matching file is used as is.
    ok = override(config, prune__method="margin", prune__scores_file=src,
                  teacher__init=os.path.join(workdir, "teacher"))
    r = pipeline.run(ok, str(tmp_path / "w3"))
    assert r["subset"]["method"] == "margin"
    assert not os.path.exists(tmp_path / "w3" / "scores")


def test_lissa_divergence_stops_the_stage_with_the_knob(env):
    from kdprune_jax.scoring import SolverError

    with pytest.raises(SolverError, match="lissa_scale"):
        _scores(env, prune__method="influence", influence__solver="lissa",
                influence__lissa_scale=1e-3, influence__max_iters=500)


def test_diag_fisher_influence_through_the_stage(env):
    """influence.solver=diag_fisher on the teacher-feature head: scores from the diagonal
    Fisher (no solve), not CG's; their rank agreement with CG is printed, not asserted."""
    (cg, _), _ = _scores(env, prune__method="influence")
    (diag, meta), c = _scores(env, prune__method="influence", influence__solver="diag_fisher")
    (self_diag, _), _ = _scores(env, prune__method="self_influence",
                                influence__solver="diag_fisher")
    pool = env[2].pool
    assert np.all(np.isfinite(diag)) and np.all(np.isfinite(self_diag[pool]))
    assert not np.allclose(diag[pool], cg[pool])
    assert np.all(self_diag[pool] > 0)  # g^T diag(F + damping)^-1 g
    rho = np.corrcoef(np.argsort(np.argsort(diag[pool])), np.argsort(np.argsort(cg[pool])))
    print(f"diag_fisher vs cg influence on the digits head, Spearman {rho[0, 1]:.3f}")
    with pytest.raises(ConfigError, match="influence.solver='diag_fisher'.*scope=full"):
        config_checks.validate(override(c, influence__scope="full", influence__loss="ce"))


def test_a_toy_method_is_one_table_entry_plus_its_score_function(env, tmp_path):
    """Registered in the method table only: config checks accept it, the score stage runs
    its function, selection keeps its per-class top-k, and the pipeline runs it end to end."""
    config, workdir, ds, _ = env

    def toy_scores(inputs):  # the teacher's logit of the true class, as a score
        return inputs.teacher_logits[np.arange(len(inputs.labels)), inputs.labels]

    methods.register(methods.Method("toy_true_logit", "highest", teacher_pass=True,
                                    teacher=True, score=toy_scores))
    try:
        c = override(config, prune__method="toy_true_logit")
        config_checks.validate(c)
        wd = str(tmp_path / "toy")
        import shutil

        shutil.copytree(os.path.join(workdir, "teacher"), os.path.join(wd, "teacher"))
        r = pipeline.run(c, wd)
        assert r["subset"]["method"] == "toy_true_logit"
        scores = np.load(os.path.join(wd, "scores", "toy_true_logit.npz"))["scores"]
        sub = select.compute(quiet_run(c, wd, splits=ds), scores, None)
        want = selection.class_keep_counts(ds.train_labels[ds.pool], c.prune.keep_fraction, 10)
        for k in range(10):  # the subset is each class's top-k by the toy score
            members = ds.pool[ds.train_labels[ds.pool] == k]
            top = members[np.argsort(-scores[members], kind="stable")[:want[k]]]
            np.testing.assert_array_equal(np.sort(sub.indices[np.isin(sub.indices, members)]),
                                          np.sort(top))
    finally:
        methods.METHODS.pop("toy_true_logit", None)
    with pytest.raises(ConfigError, match="prune.method='toy_true_logit'"):
        config_checks.validate(c)


def test_a_model_registered_at_run_time_passes_the_config_checks(env):
    from kdprune_jax import models

    config = env[0]
    with pytest.raises(ConfigError, match="student.model='my_resnet8'"):
        config_checks.validate(override(config, student__model="my_resnet8"))
    models.register_model("my_resnet8", models._REGISTRY["cifar_resnet8"])
    try:
        config_checks.validate(override(config, student__model="my_resnet8"))
    finally:
        models._REGISTRY.pop("my_resnet8")
        models.MODEL_NAMES = tuple(sorted(models._REGISTRY))
