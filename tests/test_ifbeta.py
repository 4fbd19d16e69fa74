"""IF-Beta end to end: the planted label-noise problem on real teacher features, the
pipeline (features -> policy -> draw -> student) with reuse and diagnostics, ImageNet smoke
on tfds mock data, and bad input."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from kdprune_jax import bilevel, context, pipeline, sharding
from kdprune_jax.errors import ArtifactError
from kdprune_jax.scoring import SolverError
from kdprune_jax.selection import policy
from kdprune_jax.stages import features, ifbeta, teacher
from kdprune_jax.train.metrics import MetricsWriter
from tests.helpers import quiet_run
from tests.test_pipeline import load_config, override


@pytest.mark.slow
def test_planted_label_noise_policy_beats_random(tmp_path):
    """Teacher trained on the clean digits; 30% of the pool's labels flipped; clean
    validation split. The learned policy must lower the outer objective versus Beta(1, 1)
    and keep a smaller fraction of flipped examples than random selection (30%)."""
    wd = str(tmp_path)
    base = override(load_config("quickstart.py"), kd__alpha=0.0, prune__method="ifbeta",
                    ifbeta__kd_weight=0.5, policy__max_steps=40)
    mesh = sharding.make_mesh()
    clean_run = quiet_run(base, wd, mesh=mesh, log=print)
    clean = clean_run.splits
    teacher_model, _ = teacher.compute(clean_run)  # trained on the clean pool

    noisy_cfg = override(base, data__label_noise=0.3)
    noisy_run = quiet_run(noisy_cfg, wd, mesh=mesh, log=print)
    ds = noisy_run.splits
    np.testing.assert_array_equal(ds.train_labels[ds.val], clean.train_labels[clean.val])
    feats = features.compute(noisy_run, teacher_model)
    prob, _, _ = ifbeta.build_problem(noisy_cfg, ds, feats.features, feats.logits, print)
    s = ifbeta.settings(noisy_cfg, 10)
    phi, hist, _ = ifbeta.learn_policy(noisy_cfg, prob, s, mesh, MetricsWriter(wd), print)
    at_init = float(bilevel.objective_at(ifbeta.initial_phi(1.0, 1.0), prob, s))
    learned = float(bilevel.objective_at(phi, prob, s))
    a, b = (float(x) for x in policy.beta_params(phi))
    print(f"planted: (a, b) = ({a:.3f}, {b:.3f}); outer {at_init:.5f} -> {learned:.5f}")
    assert learned < 0.9 * at_init
    assert a > b  # keeps the helpful end of the influence ranks

    flipped = np.isin(ds.pool, ds.flipped)
    assert abs(flipped.mean() - 0.3) < 0.01
    pi = bilevel.keep_probabilities(phi, prob, s)[:len(ds.pool)]
    kept_flipped = [flipped[policy.gumbel_top_k(pi, ds.train_labels[ds.pool],
                                                np.asarray(prob.counts)[:10], 10,
                                                jax.random.key(k))].mean() for k in range(5)]
    print(f"planted: flipped fraction kept {np.mean(kept_flipped):.3f} (random: 0.300)")
    assert np.mean(kept_flipped) < 0.25


@pytest.fixture(scope="module")
def ifbeta_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ifbeta"))
    config = load_config("cifar10_ifbeta.py", "smoke")
    config = override(config, data__source="digits", data__augment="none", data__mean=(64.0,),
                      data__std=(96.0,), data__max_per_class=0, policy__check_grad=True)
    return config, workdir, pipeline.run(config, workdir)


def test_pipeline_ifbeta_artifacts_and_reuse(ifbeta_run):
    config, workdir, r = ifbeta_run
    assert r["subset"]["method"] == "ifbeta" and r["policy"]["method"] == "implicit"
    sub = json.load(open(os.path.join(workdir, "subset.json")))
    assert sub["params"]["draw"] == "gumbel_top_k" and sub["seed"] == config.prune.seed
    rec = json.load(open(os.path.join(workdir, "ifbeta", "policy.json")))
    assert rec["check_grad"]["relative_error"] < 0.02  # implicit == finite differences
    assert all(k in rec["history"][0] for k in ("a", "b", "outer", "heldout", "cg_residual",
                                                "inner_grad_norm"))
    diag = json.load(open(os.path.join(workdir, "ifbeta", "diagnostics.json")))
    assert len(diag["beta_density"]) == len(diag["rank_grid"])
    assert sum(diag["influence_hist_kept"]) == sub["num_kept"]
    assert os.path.getsize(os.path.join(workdir, "ifbeta", "diagnostics.png")) > 10_000
    meta = json.load(open(os.path.join(workdir, "features", "meta.json")))
    assert meta["num_examples"] == 1438
    again = pipeline.run(config, workdir)
    assert again["fingerprint"] == r["fingerprint"]


def test_features_from_another_teacher_are_refused(ifbeta_run, tmp_path):
    config, workdir, _ = ifbeta_run
    other = override(config, ifbeta__features_dir=os.path.join(workdir, "features"),
                     teacher__width=0.5)
    with pytest.raises(ArtifactError, match="different teacher"):
        pipeline.run(other, str(tmp_path / "w"))


def test_policy_cg_budget_exhausted_is_reported(ifbeta_run, tmp_path):
    config, workdir, _ = ifbeta_run
    import shutil

    wd = str(tmp_path / "w")
    shutil.copytree(workdir, wd)
    bad = override(config, policy__cg_max_iters=2, policy__cg_tol=1e-8)
    with pytest.raises(SolverError, match=r"did not converge.*(cg_max_iters|max_iters)"):
        pipeline.run(bad, wd)


def test_bfloat16_features_round_trip(ifbeta_run, tmp_path):
    config, workdir, _ = ifbeta_run
    ds = context.load_splits(config)
    mesh = sharding.make_mesh()
    model = teacher.import_teacher(
        override(config, teacher__init=os.path.join(workdir, "teacher")), 10, mesh)
    f32, l32 = dataclasses.astuple(features.compute(
        quiet_run(config, str(tmp_path / "a"), mesh=mesh, splits=ds), model))[:2]
    bf = override(config, ifbeta__feature_dtype="bfloat16")
    f16, l16 = dataclasses.astuple(features.compute(
        quiet_run(bf, str(tmp_path / "b"), mesh=mesh, splits=ds), model))[:2]
    np.testing.assert_allclose(f16, f32, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(l16, l32)  # logits are always stored in float32
    size = os.path.getsize(str(tmp_path / "b" / "features" / "features.npy"))
    assert size < 0.6 * os.path.getsize(str(tmp_path / "a" / "features" / "features.npy"))


def test_imagenet_ifbeta_smoke_on_tfds_mock(tmp_path):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)

    def source(*_, **__):  # 4 classes present, so every class keeps examples
        return [{"image": rng.integers(0, 255, (40 + i % 9, 48, 3), dtype=np.uint8),
                 "label": i % 4, "file_name": f"{i}.JPEG"} for i in range(96)]

    config = load_config("imagenet_ifbeta.py", "smoke")
    assert config.prune.method == "ifbeta" and config.student.optim.batch_size == 16
    with tfds.testing.mock_data(as_data_source_fn=source):
        r = pipeline.run(config, str(tmp_path))
    assert r["subset"]["method"] == "ifbeta"
    assert r["student"]["test"]["count"] == 96
    # A fresh inner solve at init and at the learned policy (1000 classes, 4 present: the
    # softmax-curvature factor has 999 equal eigenvalues; float32 eigh gave NaN there once).
    assert np.isfinite(r["policy"]["outer_at_init"]), r["policy"]
    assert np.isfinite(r["policy"]["outer_at_learned"]), r["policy"]


def test_mlp_head_option(ifbeta_run, tmp_path):
    config, workdir, _ = ifbeta_run
    import shutil

    wd = str(tmp_path / "mlp")
    shutil.copytree(workdir, wd)
    from kdprune_jax import config_checks
    from kdprune_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="ifbeta.damping.*mlp"):
        config_checks.validate(override(config, ifbeta__head="mlp", ifbeta__damping=0.0))
    mlp = override(config, ifbeta__head="mlp", ifbeta__mlp_hidden=32, ifbeta__damping=0.1,
                   policy__damping=0.1, policy__check_grad=False)
    r = pipeline.run(mlp, wd)
    rec = json.load(open(os.path.join(wd, "ifbeta", "policy.json")))
    assert r["subset"]["method"] == "ifbeta" and np.isfinite(rec["outer_at_learned"])
    assert all(h["cg_residual"] < 1e-3 for h in rec["history"])
