"""Influence scores as a pruning score (METHOD.md §4): the wiring from config.influence
to the `kdprune_jax.scoring` library.

Scopes: ``head`` (a convex linear head refit on the teacher's frozen features),
``last_layer`` (the model's own trained head on its features) and ``full`` (every
parameter of the teacher or proxy network, inference-mode BatchNorm). Solvers: the
library's inverse-HVP solvers (exact, cg, lissa, diag_fisher) or K-FAC / EK-FAC, whose
factors are fitted once and saved in DIR/influence/factors.npz with their fingerprint.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdprune_jax import inference, losses, methods, scoring, sharding
from kdprune_jax.context import Run
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.inference import FrozenModel, batch_pass
from kdprune_jax.scoring import head as head_lib
from kdprune_jax.stages import cache


def logits_and_features(run: Run, model: FrozenModel, indices):
    """`inference.logits_and_features` over train `indices` ([N_train, C], [N_train, D])."""
    return inference.logits_and_features(model, run.eval_batches(indices), run.mesh,
                                         len(run.splits.train), run.splits.num_classes)


def _model_losses(graphdef, loss: str, lam: float, tau: float, params_of):
    """Per-example losses of an nnx model in inference mode -> fn(p, frozen, batch) [B].

    params_of(p, frozen) -> (params, batch_stats) lets the caller differentiate a part
    (the head) while the rest stays frozen. KD targets come from batch["teacher_logits"].
    """
    def fn(p, frozen, batch):
        params, bs = params_of(p, frozen)
        logits = nnx.merge(graphdef, params, bs)(batch["image"], train=False)
        t = batch.get("teacher_logits") if loss == "kd" else None
        return losses.kd_loss(logits, t, batch["label"],
                              kd_weight=lam if loss == "kd" else 0.0, temperature=tau)

    return fn


def _check_influence_solve(info, i):
    """The library's convergence check, its advice naming the config fields."""
    scoring.check_solve(info, solver=i.solver, tol=i.tol, where="influence scores",
                        settings=dict(damping=i.damping, max_iters=i.max_iters,
                                      lissa_scale=i.lissa_scale),
                        names={k: f"influence.{k}" for k in ("damping", "max_iters",
                                                             "lissa_scale")})


# ------------------------------------------------------------------- K-FAC / EK-FAC factors
KFAC_SOLVERS = methods.KFAC_SOLVERS
FACTORS_FILE = os.path.join("influence", "factors.npz")


def _nnx_logits(graphdef, rest, params, batch):
    """Inference-mode logits of a network (module level: one compile per shape)."""
    return nnx.merge(graphdef, params, rest)(batch["image"], train=False)


def _linear_logits(graphdef, params, batch):
    """Logits of a frozen-feature head (an nnx.Linear) on batch["features"]."""
    return nnx.merge(graphdef, params)(batch["features"])


def kfac_factors(run: Run, *, logits_fn, params, layers, fit_batch, upstream: dict,
                 report: dict):
    """K-FAC / EK-FAC factors of the influence model: fitted on `fit_batch`, or reused
    from DIR/influence/factors.npz when its fingerprint matches.

    The factors are the Fisher of the model's softmax output (cross-entropy; "true" with
    labels drawn from jax.random.key(config.seed), "empirical" with the observed labels,
    "expected" in closed form), whatever influence.loss is: they do not depend on the
    validation objective, so a run that only changes the target (influence.loss,
    kd_weight, temperature) reuses them. `upstream` names what they do depend on (model,
    data, fitting rows). `report` receives fit_seconds / reused / memory for the score
    metadata (the pruning cost).
    """
    config, log = run.config, run.log
    i = config.influence
    ekfac = i.solver == "ekfac"
    fp = {**upstream, "fisher": i.kfac_fisher, "ekfac": ekfac, "loss": "cross_entropy"}

    def read(path):
        if not os.path.exists(path):
            return None, None
        try:
            return scoring.load_factors(path, fp), None
        except scoring.FactorsMismatchError:
            return cache.STALE, None
        except ArtifactError as e:
            return None, str(e)

    def write(path, factors):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        scoring.save_factors(path, factors, fp)  # atomic: temporary file + rename

    report.update(reused=True, fit_seconds=0.0)  # replaced by `fit` when it runs
    return cache.reuse_or_compute(
        cache.Artifact("scores", run.path(FACTORS_FILE), redo="refitting", verb="are",
                       what="K-FAC factors ", stale="another model, data or influence.kfac_fisher"),
        fp,
        read=read, write=write, log=log, describe=lambda _: " (no refit)",
        compute=lambda: _fit_factors(run, logits_fn=logits_fn, params=params, layers=layers,
                                     fit_batch=fit_batch, report=report))


def _fit_factors(run: Run, *, logits_fn, params, layers, fit_batch, report: dict):
    config, log = run.config, run.log
    i = config.influence
    ekfac = i.solver == "ekfac"
    t0 = time.perf_counter()
    factors, info = scoring.fit_factors(
        logits_fn, params, fit_batch, layers=layers, fisher=i.kfac_fisher,
        key=jax.random.key(config.seed), ekfac=ekfac, chunk_size=i.kfac_chunk_size, log=log)
    factors = jax.block_until_ready(factors)
    seconds = time.perf_counter() - t0
    log(f"[scores] {'EK-FAC' if ekfac else 'K-FAC'} factors: {len(info['layers'])} layers "
        f"fitted on {info['num_examples']} examples in {seconds:.1f} s; excluded (no "
        f"curvature, no influence): {len(info['excluded'])} parameters"
        + (f" ({', '.join(info['excluded'][:4])}{', ...' if len(info['excluded']) > 4 else ''})"
           if info["excluded"] else ""))
    report.update(reused=False, fit_seconds=round(seconds, 3),
                  memory_bytes=int(info["memory"]["total_bytes"]),
                  layers=len(info["layers"]), excluded=len(info["excluded"]))
    return factors


def _kfac_precondition(factors, grad, i):
    """(F + damping)^-1 grad for the configured K-FAC flavour; zeros outside the tracked
    layers (BatchNorm scale/bias get no curvature and no influence)."""
    return scoring.kfac_inverse(factors, grad, damping=i.damping, method=i.solver,
                                damping_mode=i.kfac_damping_mode)


def influence_scores(run: Run, teacher: FrozenModel | None, proxy: FrozenModel | None,
                     t_logits=None, t_feats=None, report=None):
    """influence / self_influence scores float32 [N_train] per config.influence (see the
    module docstring; sign: positive = removing the example raises the validation loss).

    teacher / proxy: the model the influence is taken in (influence.model); t_logits /
    t_feats: the teacher's [N_train, C] / [N_train, D] (None when not computed). With
    influence.solver kfac / ekfac the inverse curvature comes from factors saved in the
    workdir (`kfac_factors`); `report` (a dict) receives their cost."""
    config, sp, mesh, log = run.config, run.splits, run.mesh, run.log
    i = config.influence
    method = config.prune.method
    lam, tau = i.kd_weight, i.temperature
    all_idx = np.arange(len(sp.train))
    rng = np.random.default_rng(config.seed)
    report = {} if report is None else report
    kfac = i.solver in KFAC_SOLVERS
    data_eval = methods.score_params(config)["data_eval"]

    if i.scope in ("head", "last_layer"):
        # Linear problem on frozen features: a convex head (scope head, refit on teacher
        # features) or the model's own trained head (scope last_layer).
        src = teacher if (i.scope == "head" or i.model == "teacher") else proxy
        if i.scope == "head" or src is teacher:
            feats, logits_src = t_feats, t_logits
        else:
            logits_src, feats = logits_and_features(run, src, all_idx)
        def rows(idx):
            b = {"features": jnp.asarray(feats[idx]), "label": jnp.asarray(sp.train_labels[idx])}
            if t_logits is not None:
                b["teacher_logits"] = jnp.asarray(t_logits[idx])
            return b

        loss_lam = lam if i.loss == "kd" else 0.0
        l2 = i.l2 if i.scope == "head" else 0.0
        train_b, val_b = rows(sp.pool), rows(sp.val)
        if i.scope == "head":
            theta, info = head_lib.fit_head(
                train_b, head_lib.init_head(feats.shape[1], sp.num_classes),
                lam=loss_lam, temperature=tau, l2=l2, max_iters=i.head_max_iters, tol=1e-6)
            log(f"[scores] head fit: {int(info['iterations'])} L-BFGS iterations, "
                f"grad norm {float(info['grad_norm']):.2e}")
        else:
            # The model's own trained head (an nnx.Linear named `head`, see models/).
            hp = src.params["head"]
            theta = {"w": jnp.asarray(hp["kernel"].get_value()),
                     "b": jnp.asarray(hp["bias"].get_value())}
            del logits_src
        per_ex = functools.partial(head_lib.head_losses, lam=loss_lam, temperature=tau)
        train_obj = functools.partial(head_lib.head_objective, lam=loss_lam, temperature=tau,
                                      l2=l2)
        val_obj = lambda p, b: jnp.mean(per_ex(p, b))  # noqa: E731
        if kfac:  # scope last_layer (config checks): the trained head as an nnx.Linear
            head = nnx.Linear(*theta["w"].shape, rngs=nnx.Rngs(0))
            head.kernel[...], head.bias[...] = theta["w"], theta["b"]
            graphdef, hparams = nnx.split(head, nnx.Param)
            logits_fn = jax.tree_util.Partial(_linear_logits, graphdef)
            factors = kfac_factors(
                run, logits_fn=logits_fn, params=hparams,
                layers=scoring.find_layers(head), fit_batch=train_b, report=report,
                upstream={"scope": i.scope, "model": src.fingerprint, "data": sp.fingerprint,
                          "data_eval": data_eval, "rows": "pool"})

            def theta_of(hp):
                return {"w": hp["kernel"].get_value(), "b": hp["bias"].get_value()}

        if method == "self_influence":
            out = np.full(len(sp.train), np.nan, np.float32)
            for start in range(0, len(all_idx), 4096):
                idx = all_idx[start:start + 4096]
                if kfac:  # cross-entropy with the observed labels (config checks)
                    got, _ = scoring.kfac_self_influence(
                        factors, logits_fn, hparams, rows(idx), damping=i.damping,
                        method=i.solver, damping_mode=i.kfac_damping_mode,
                        chunk_size=i.kfac_chunk_size)
                else:
                    got, info = scoring.self_influence(
                        per_ex, train_obj, theta, train_b, rows(idx), solver=i.solver,
                        damping=i.damping, max_iters=i.max_iters, tol=i.tol,
                        lissa_scale=i.lissa_scale, check=False)
                    _check_influence_solve(info, i)
                out[idx] = np.asarray(got)
            return out
        if kfac:
            grad = jax.grad(lambda hp: val_obj(theta_of(hp), val_b))(hparams)
            s = theta_of(_kfac_precondition(factors, grad, i)[0])
        else:
            s, info = scoring.s_test(train_obj, val_obj, theta, train_b, val_b,
                                     solver=i.solver, damping=i.damping,
                                     max_iters=i.max_iters, tol=i.tol,
                                     lissa_scale=i.lissa_scale, example_losses=per_ex,
                                     check=False)
            _check_influence_solve(info, i)
        out = np.full(len(sp.train), np.nan, np.float32)
        for start in range(0, len(all_idx), 8192):
            idx = all_idx[start:start + 8192]
            out[idx] = np.asarray(scoring.influence_from_s_test(per_ex, theta, rows(idx), s))
        return out

    # scope full: every parameter of the teacher or proxy network (inference-mode BN).
    if method == "self_influence" and not kfac:
        raise ConfigError("influence.scope", i.scope,
                          "head or last_layer for self_influence (one inverse-HVP solve per "
                          "example is unaffordable over all parameters), or "
                          "influence.solver=kfac/ekfac")
    src = teacher if i.model == "teacher" else proxy
    kd_targets = t_logits if i.loss == "kd" else None
    loss_fn = _model_losses(src.graphdef, i.loss, lam, tau, lambda p, bs: (p, bs))
    hess_idx = rng.permutation(sp.pool)[: i.hessian_examples or len(sp.pool)]
    hess_b = run.rows(hess_idx, kd_targets)
    bs = sharding.replicate(src.batch_stats, mesh)
    params = sharding.replicate(src.params, mesh)
    train_obj = lambda p, b: jnp.mean(loss_fn(p, bs, b))  # noqa: E731
    if kfac:
        # The Hessian's examples become the factors' fitting rows; Linear and Conv layers
        # are tracked, BatchNorm scale/bias excluded (no curvature, zero influence).
        factors = kfac_factors(
            run, logits_fn=jax.tree_util.Partial(_nnx_logits, src.graphdef, bs),
            params=params, layers=scoring.find_layers(
                nnx.merge(src.graphdef, src.params, src.batch_stats)),
            fit_batch=hess_b, report=report,
            upstream={"scope": "full", "model": src.fingerprint, "data": sp.fingerprint,
                      "data_eval": data_eval, "rows": {"seed": config.seed,
                                                       "hessian_examples": i.hessian_examples}})
        if method == "self_influence":  # cross-entropy, observed labels (config checks)
            graphdef = src.graphdef

            def self_fn(p, bs, f, batch):
                return scoring.kfac_self_influence(
                    f, jax.tree_util.Partial(_nnx_logits, graphdef, bs), p,
                    {"image": batch["image"], "label": batch["label"]}, damping=i.damping,
                    method=i.solver, damping_mode=i.kfac_damping_mode,
                    chunk_size=i.kfac_chunk_size)[0]

            return batch_pass(self_fn, (params, bs, factors), run.eval_batches(all_idx), mesh,
                              len(sp.train))
    val_b = run.rows(sp.val, kd_targets)
    if kfac:
        s, _ = _kfac_precondition(factors, jax.grad(train_obj)(params, val_b), i)
    else:
        s, info = scoring.s_test(train_obj, train_obj, params, hess_b, val_b,
                                 solver=i.solver, damping=i.damping, max_iters=i.max_iters,
                                 tol=i.tol, lissa_scale=i.lissa_scale, check=False)
        _check_influence_solve(info, i)
        log(f"[scores] s_test: {int(info['iterations'])} {i.solver} iterations, relative "
            f"residual {float(info['residual']):.2e}")

    def batch_fn(p, s, bs, batch):
        b = {"image": batch["image"], "label": batch["label"]}
        if kd_targets is not None:
            b["teacher_logits"] = batch["teacher_logits"]
        return jax.jvp(lambda q: loss_fn(q, bs, b), (p,), (s,))[1]

    if kd_targets is not None:
        # Teacher logits ride along with each batch: computed inside the pass.
        t = teacher

        def batch_fn_kd(p, s, bs, tp, tbs, batch):
            tl = nnx.merge(t.graphdef, tp, tbs)(batch["image"], train=False)
            return batch_fn(p, s, bs, {**batch, "teacher_logits": tl})

        return batch_pass(batch_fn_kd, (params, s, bs, t.params, t.batch_stats),
                          run.eval_batches(all_idx), mesh, len(sp.train))
    return batch_pass(batch_fn, (params, s, bs), run.eval_batches(all_idx), mesh,
                      len(sp.train))
