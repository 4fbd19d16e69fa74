"""influence.solver=kfac|ekfac through the scores stage and the pipeline (real digits data):
the stage's scores equal the library's on the same model and rows, factors are an artifact
reused when only the validation target changes (and equal a fresh run's), the cost is
recorded, and bad K-FAC settings are refused before any work."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from kdprune_jax import config_checks, pipeline, scoring, sharding
from kdprune_jax.errors import ConfigError
from kdprune_jax.stages import influence
from kdprune_jax.stages import scores as scores_stage
from tests import test_score_stage
from tests.helpers import quiet_run
from tests.test_pipeline import override

env = test_score_stage.env  # its module fixture: the digits teacher, trained once here

FULL = dict(prune__method="influence", influence__scope="full", influence__model="teacher",
            influence__loss="ce", influence__solver="ekfac", influence__damping=1e-2,
            influence__hessian_examples=256)


def _stage(env, workdir, **fields):
    config, _, ds, teacher = env
    c = override(config, **fields)
    lines = []
    scores, meta = pipeline.compute_scores(quiet_run(c, workdir, splits=ds, log=lines.append),
                                           teacher)
    return scores, meta, lines, c


def _library(env, c, method):
    """The same scores from kdprune_jax.scoring directly: factors on the stage's Hessian rows,
    then kfac_influence / kfac_self_influence over every training example."""
    _, _, ds, t = env
    mesh = sharding.make_mesh()
    i = c.influence
    hess_idx = np.random.default_rng(c.seed).permutation(ds.pool)[:i.hessian_examples]
    rows = quiet_run(c, "", mesh=mesh, splits=ds).rows
    logits_fn = jax.tree_util.Partial(influence._nnx_logits, t.graphdef, t.batch_stats)
    factors, _ = scoring.fit_factors(
        logits_fn, t.params, rows(hess_idx), layers=scoring.find_layers(
            nnx.merge(t.graphdef, t.params, t.batch_stats)),
        fisher=i.kfac_fisher, key=jax.random.key(c.seed), ekfac=i.solver == "ekfac", log=None)
    train = rows(np.arange(len(ds.train)))
    kw = dict(damping=i.damping, method=i.solver, damping_mode=i.kfac_damping_mode)
    if method == "self_influence":
        return np.asarray(scoring.kfac_self_influence(factors, logits_fn, t.params, train,
                                                      **kw)[0])
    return np.asarray(scoring.kfac_influence(factors, logits_fn, t.params, train,
                                             rows(ds.val), **kw)[0])


@pytest.mark.parametrize("method,solver", [("influence", "ekfac"), ("self_influence", "kfac")])
def test_full_scope_scores_equal_the_library(env, tmp_path, method, solver):
    scores, meta, lines, c = _stage(env, str(tmp_path), **{
        **FULL, "prune__method": method, "influence__solver": solver})
    want = _library(env, c, method)
    np.testing.assert_allclose(scores, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
    assert np.std(scores) > 0 and (method == "influence" or np.all(scores > 0))
    assert meta["kfac"]["reused"] is False and meta["kfac"]["fit_seconds"] > 0
    assert meta["kfac"]["excluded"] > 0  # BatchNorm scale/bias: no curvature
    assert any("memory estimate" in s for s in lines)  # printed before fitting
    assert os.path.exists(tmp_path / "influence" / "factors.npz")


def test_last_layer_kfac_scores_track_the_exact_head_solve(env, tmp_path):
    """scope last_layer: the trained head as one Linear block. With the expected Fisher
    (for a linear head under softmax cross-entropy the Gauss-Newton matrix IS the Hessian,
    up to its Kronecker factorization) the ranks agree with the exact solve; the number is
    printed, not asserted."""
    fields = dict(prune__method="influence", influence__scope="last_layer",
                  influence__model="teacher", influence__loss="ce", influence__damping=1e-2)
    exact, _, _, _ = _stage(env, str(tmp_path / "exact"), **fields, influence__solver="exact")
    got, meta, _, _ = _stage(env, str(tmp_path / "k"), **fields, influence__solver="ekfac",
                             influence__kfac_fisher="expected")
    pool = env[2].pool
    assert np.all(np.isfinite(got[pool])) and meta["kfac"]["layers"] == 1
    rho = np.corrcoef(np.argsort(np.argsort(got[pool])), np.argsort(np.argsort(exact[pool])))
    print(f"last_layer EK-FAC (expected Fisher) vs exact influence, Spearman {rho[0, 1]:.3f}")
    assert not np.allclose(got[pool], exact[pool])  # a different curvature, not a copy


def test_factors_are_reused_for_another_validation_target(env, tmp_path):
    """A proxy's KD-aligned influence: changing influence.kd_weight changes the validation
    objective, not the factors: they are reused (logged, no refit), and the scores equal a
    fresh run's; changing the Fisher makes them stale."""
    base = dict(FULL, influence__model="proxy", influence__loss="kd", proxy__num_epochs=1)
    a = str(tmp_path / "a")
    first, m1, _, _ = _stage(env, a, **base)
    again, m2, lines, _ = _stage(env, a, **base, influence__kd_weight=0.5)
    assert m2["kfac"]["reused"] is True and any("reusing K-FAC factors" in s for s in lines)
    assert m2["fingerprint"] != m1["fingerprint"] and not np.allclose(first, again)
    fresh, m3, _, _ = _stage(env, str(tmp_path / "b"), **base, influence__kd_weight=0.5)
    assert m3["kfac"]["reused"] is False
    np.testing.assert_allclose(again, fresh, rtol=1e-5, atol=1e-7 * np.abs(fresh).max())
    _, m4, lines, _ = _stage(env, a, **base, influence__kfac_fisher="empirical")
    assert m4["kfac"]["reused"] is False and any("stale" in s for s in lines)


def test_pipeline_run_with_ekfac_end_to_end(env, tmp_path):
    config, workdir, ds, _ = env
    c = override(config, **FULL, teacher__init=os.path.join(workdir, "teacher"))
    r = pipeline.run(c, str(tmp_path / "run"))
    assert r["subset"]["method"] == "influence"
    assert r["pruning_cost"]["scoring_seconds"] > 0
    meta = scores_stage.read_scores(str(tmp_path / "run" / "scores" / "influence.npz"))[1]
    assert meta["kfac"]["fit_seconds"] > 0
    # Default K-FAC fields stay out of the score key: existing score files stay valid.
    assert "kfac_fisher" not in meta["params"]["influence"]
    assert "kfac_chunk_size" not in meta["params"]["influence"]


def test_bad_kfac_settings_are_refused_naming_the_field(env):
    c = override(env[0], **FULL)
    config_checks.validate(c)
    for fields, match in (
            (dict(influence__scope="head"), "influence.solver='ekfac'.*scope last_layer or full"),
            (dict(prune__method="self_influence", influence__model="proxy",
                  influence__loss="kd"), "influence.loss='kd'.*ce with prune.method=self_inf"),
            (dict(influence__kfac_fisher="sampled"), "influence.kfac_fisher.*true, empirical"),
            (dict(influence__kfac_damping_mode="mean"), "influence.kfac_damping_mode.*relative"),
            (dict(influence__kfac_chunk_size=0), "influence.kfac_chunk_size"),
            (dict(influence__solver="kfca"), "influence.solver.*kfac, ekfac")):
        with pytest.raises(ConfigError, match=match):
            config_checks.validate(override(c, **fields))
