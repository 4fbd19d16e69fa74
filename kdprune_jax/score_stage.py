"""The `scores` stage: per-example pruning scores over the whole training split.

Scores are computed in fixed-size, padded batches sharded on the ("data",) mesh (one
compile per shape; padded rows are never written), from the teacher, from K proxy models
trained briefly on the full pool (EL2N, GraNd, forgetting; Paul et al. 2021), or from
influence functions (METHOD.md §4). The result is DIR/scores/<method>.npz holding
``scores`` float32 [N_train] (indexed by source position) and a JSON ``meta`` with the
method, its parameters, the teacher / data / proxy fingerprints and the pruning cost.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdprune_jax import (
    artifacts,
    config_checks,
    cpu_flags,
    data,
    faults,
    losses,
    methods,
    models,
    preemption,
    scoring,
    sharding,
)
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.scoring import head as head_lib
from kdprune_jax.train import train_model
from kdprune_jax.train.metrics import MetricsWriter

SCOPES = methods.INFLUENCE_SCOPES


@dataclasses.dataclass
class Model:
    """A frozen model: (graphdef, params, batch_stats) plus its fingerprint."""

    graphdef: object
    params: object
    batch_stats: object
    fingerprint: str


# ----------------------------------------------------------------------------- batch passes
def _eval_batches(ds, config, indices):
    _, eval_fn = data.make_transforms(config.data.augment, config.data.image_size,
                                      config.data.mean, config.data.std)
    dataset, _ = data.eval_dataset(
        ds.train, indices, labels=ds.train_labels, global_batch_size=config.score.batch_size,
        transform=eval_fn, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.data.num_workers,
        prefetch=config.data.prefetch)
    return dataset


def batch_pass(fn, args, ds, config, indices, mesh, sink=None, name="scores", batches=None):
    """Run ``fn(*args, batch) -> [B] or [B, K]`` over `indices` of the train split.

    `fn` is jitted once with replicated args and a "data"-sharded batch. Rows of padding
    (mask 0) are dropped, so a fake example is never scored. Results go to
    ``sink(index [b], values [b, ...])`` as they arrive (host memory bounded by a few
    batches: e.g. a memory-mapped file); without a sink they are returned as a float32
    array [len(train), ...] with each example's row at its source index (NaN elsewhere).
    `name` labels the pass's kill points (``<name>:batch<k>``, see faults.py).
    `batches` replaces the eval batches over `indices` (e.g. `data.views_dataset`); its
    "index" is then whatever row key that dataset defines, and a sink is required.
    """
    repl, bsh = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def with_rows(*a):
        batch = a[-1]
        return batch["index"], batch["mask"], fn(*a)

    # Outputs replicated: XLA all-gathers each batch's [B, ...] results (small next to
    # the images) so that every process can read every row; with several processes a
    # "data"-sharded output would span devices this process cannot address.
    # compiler_options: the XLA:CPU defaults of the hot programs (cpu_flags); `fn` must not
    # hold dense linear algebra (eigh/Cholesky/LU), which they cannot compile.
    jfn = jax.jit(with_rows, in_shardings=(repl,) * len(args) + (bsh,), out_shardings=repl,
                  compiler_options=cpu_flags.compiler_options())
    args = sharding.replicate(args, mesh)
    out = None
    pending = []

    def to_array(idx, vals):
        nonlocal out
        if out is None:
            out = np.full((len(ds.train),) + vals.shape[1:], np.nan, np.float32)
        out[idx] = vals

    sink = sink or to_array

    def flush():
        for idx, mask, vals in jax.device_get(pending):
            keep = mask > 0
            sink(idx[keep], vals[keep])
        pending.clear()

    kill_armed = faults.armed(f"{name}:batch") or faults.signal_armed(f"{name}:batch")
    if batches is None:
        batches = _eval_batches(ds, config, indices)
    for k, batch in enumerate(batches, 1):
        g = sharding.to_global(batch, mesh)
        pending.append(jfn(*args, g))
        if kill_armed:  # kill point <name>:batch<k>: mid-pass, results so far lost
            faults.maybe_kill(f"{name}:batch{k}", before=lambda: jax.block_until_ready(pending))
            faults.maybe_signal(f"{name}:batch{k}")
        preemption.check(name)  # SIGTERM mid-pass: stop now, the pass is redone on rerun
        if len(pending) >= 16:  # bound host memory; the device stays ahead meanwhile
            flush()
    flush()
    return out


def forward_fn(graphdef):
    """(params, batch_stats, batch) -> [B, C + D]: logits then penultimate features."""

    def fn(params, bs, batch):
        logits, feats = nnx.merge(graphdef, params, bs)(batch["image"], train=False,
                                                        return_features=True)
        return jnp.concatenate([logits, feats], axis=-1)

    return fn


def logits_and_features(model: Model, ds, config, indices, mesh, num_classes):
    """Inference-mode logits [N, C] and penultimate features [N, D] (NaN outside indices)."""
    out = batch_pass(forward_fn(model.graphdef), (model.params, model.batch_stats), ds, config,
                     indices, mesh)
    return out[:, :num_classes], out[:, num_classes:]


# ----------------------------------------------------------------------------- proxies
def train_proxies(config, ds, mesh, workdir, writer, log, track_forgetting=False):
    """K proxy models (the student architecture, CE on the full pool, proxy.num_epochs)
    from seeds seed+100+k; each resumable in DIR/proxies/<k>. Returns (models, seconds)."""
    p = config.proxy
    o = config.student.optim.copy_and_resolve_references()
    with o.unlocked():
        o.num_epochs = p.num_epochs
    n_models = p.num_models if methods.get(config.prune.method).proxy_mode(config) == \
        "multi" else 1
    out, seconds = [], 0.0
    train_fn, _ = data.make_transforms(config.data.augment, config.data.image_size,
                                       config.data.mean, config.data.std)
    for k in range(n_models):
        seed = config.seed + 100 + k
        model_name = p.model or config.student.model
        d = config.data  # the train transform the proxy sees is part of what it is
        fp = artifacts.fingerprint({"proxy": k, "model": model_name, "width": config.student.width,
                                    "optim": o.to_dict(), "seed": seed, "data": ds.fingerprint,
                                    "forgetting": track_forgetting,
                                    "transform": [d.augment, d.image_size, list(d.mean),
                                                  list(d.std)],
                                    **config_checks.compute_dtype_fingerprint(config)})
        num_steps = data.num_train_steps(len(ds.pool), o.batch_size, o.num_epochs)
        if num_steps < 1:
            raise ConfigError("proxy.num_epochs", p.num_epochs,
                              "enough epochs for at least one optimizer step")

        def dataset_fn(seed=seed, num_steps=num_steps):
            return data.train_dataset(
                ds.train, ds.pool, labels=ds.train_labels, global_batch_size=o.batch_size,
                num_steps=num_steps, seed=seed, transform=train_fn,
                process_index=jax.process_index(), process_count=jax.process_count(),
                num_workers=config.data.num_workers, prefetch=config.data.prefetch)

        model = models.create_model(model_name, num_classes=ds.train.num_classes, seed=seed,
                                    width=config.student.width)
        res = train_model(
            name=f"proxy{k}", model=model, dataset_fn=dataset_fn, num_steps=num_steps,
            steps_per_epoch=len(ds.pool) / o.batch_size, opt_cfg=o, mesh=mesh,
            ckpt_dir=os.path.join(workdir, "proxies", str(k)), fingerprint=fp, writer=writer,
            global_batch_size=o.batch_size, log_every_steps=config.log_every_steps,
            checkpoint_every_steps=config.checkpoint_every_steps, log=log,
            track_forgetting_examples=len(ds.train) if track_forgetting else 0,
            compute_dtype=config_checks.compute_dtype(config))
        seconds += res.seconds
        out.append((Model(res.graphdef, res.params, res.batch_stats, fp), res.extra))
    return out, seconds


# ----------------------------------------------------------------------------- influence
def _model_losses(graphdef, loss: str, lam: float, tau: float, params_of):
    """Per-example losses of an nnx model in inference mode -> fn(p, frozen, batch) [B].

    params_of(p, frozen) -> (params, batch_stats) lets the caller differentiate a part
    (the head) while the rest stays frozen. KD targets come from batch["teacher_logits"].
    """
    def fn(p, frozen, batch):
        params, bs = params_of(p, frozen)
        logits = nnx.merge(graphdef, params, bs)(batch["image"], train=False)
        t = batch.get("teacher_logits") if loss == "kd" else None
        return losses.kd_loss(logits, t, batch["label"], alpha=lam if loss == "kd" else 0.0,
                              temperature=tau)

    return fn


def _load_rows(ds, config, indices, mesh, teacher_logits=None):
    """A set of train examples as ONE sharded batch (images, labels, teacher logits)."""
    n_dev = jax.device_count()
    indices = np.asarray(indices)
    n = len(indices) // n_dev * n_dev  # a whole number of rows per device
    indices = indices[:max(n, n_dev)]
    _, eval_fn = data.make_transforms(config.data.augment, config.data.image_size,
                                      config.data.mean, config.data.std)
    batch = {"image": np.stack([eval_fn(ds.train.source[int(i)]["image"]) for i in indices]),
             "label": ds.train_labels[indices].astype(np.int32)}
    if teacher_logits is not None:
        batch["teacher_logits"] = teacher_logits[indices].astype(np.float32)
    return jax.device_put(batch, sharding.batch_sharded(mesh))


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


def kfac_factors(config, workdir, log, *, logits_fn, params, layers, fit_batch,
                 upstream: dict, report: dict):
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
    i = config.influence
    ekfac = i.solver == "ekfac"
    fp = {**upstream, "fisher": i.kfac_fisher, "ekfac": ekfac, "loss": "cross_entropy"}
    path = os.path.join(workdir, FACTORS_FILE)
    if os.path.exists(path):
        try:
            factors = scoring.load_factors(path, fp)
        except scoring.FactorsMismatchError:
            log(f"[scores] K-FAC factors {path} are stale (another model, data or "
                f"influence.kfac_fisher); refitting")
        except ArtifactError as e:
            log(f"[scores] K-FAC factors {path} are unreadable ({e}); refitting")
        else:
            log(f"[scores] reusing K-FAC factors {path} (no refit)")
            report.update(reused=True, fit_seconds=0.0)
            return factors
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
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        scoring.save_factors(path, factors, fp)  # atomic: temporary file + rename
    return factors


def _kfac_precondition(factors, grad, i):
    """(F + damping)^-1 grad for the configured K-FAC flavour; zeros outside the tracked
    layers (BatchNorm scale/bias get no curvature and no influence)."""
    return scoring.kfac_inverse(factors, grad, damping=i.damping, method=i.solver,
                                damping_mode=i.kfac_damping_mode)


def influence_scores_for(config, ds, mesh, log, teacher: Model | None, proxy: Model | None,
                         t_logits=None, t_feats=None, workdir: str = "", report=None):
    """influence / self_influence over the train split, per config.influence (see module).

    With influence.solver kfac / ekfac the inverse curvature comes from factors saved in
    `workdir` (see `kfac_factors`); `report` (a dict) receives their cost."""
    i = config.influence
    method = config.prune.method
    lam, tau = i.kd_weight, i.temperature
    all_idx = np.arange(len(ds.train))
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
            logits_src, feats = logits_and_features(src, ds, config, all_idx, mesh,
                                                    ds.train.num_classes)
        def rows(idx):
            b = {"features": jnp.asarray(feats[idx]), "label": jnp.asarray(ds.train_labels[idx])}
            if t_logits is not None:
                b["teacher_logits"] = jnp.asarray(t_logits[idx])
            return b

        loss_lam = lam if i.loss == "kd" else 0.0
        l2 = i.l2 if i.scope == "head" else 0.0
        train_b, val_b = rows(ds.pool), rows(ds.val)
        if i.scope == "head":
            theta, info = head_lib.fit_head(
                train_b, head_lib.init_head(feats.shape[1], ds.train.num_classes),
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
                config, workdir, log, logits_fn=logits_fn, params=hparams,
                layers=scoring.find_layers(head), fit_batch=train_b, report=report,
                upstream={"scope": i.scope, "model": src.fingerprint, "data": ds.fingerprint,
                          "data_eval": data_eval, "rows": "pool"})

            def theta_of(hp):
                return {"w": hp["kernel"].get_value(), "b": hp["bias"].get_value()}

        if method == "self_influence":
            out = np.full(len(ds.train), np.nan, np.float32)
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
        out = np.full(len(ds.train), np.nan, np.float32)
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
    hess_idx = rng.permutation(ds.pool)[: i.hessian_examples or len(ds.pool)]
    hess_b = _load_rows(ds, config, hess_idx, mesh, kd_targets)
    bs = sharding.replicate(src.batch_stats, mesh)
    params = sharding.replicate(src.params, mesh)
    train_obj = lambda p, b: jnp.mean(loss_fn(p, bs, b))  # noqa: E731
    if kfac:
        # The Hessian's examples become the factors' fitting rows; Linear and Conv layers
        # are tracked, BatchNorm scale/bias excluded (no curvature, zero influence).
        factors = kfac_factors(
            config, workdir, log, logits_fn=jax.tree_util.Partial(_nnx_logits, src.graphdef, bs),
            params=params, layers=scoring.find_layers(
                nnx.merge(src.graphdef, src.params, src.batch_stats)),
            fit_batch=hess_b, report=report,
            upstream={"scope": "full", "model": src.fingerprint, "data": ds.fingerprint,
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

            return batch_pass(self_fn, (params, bs, factors), ds, config, all_idx, mesh)
    val_b = _load_rows(ds, config, ds.val, mesh, kd_targets)
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

        return batch_pass(batch_fn_kd, (params, s, bs, t.params, t.batch_stats), ds, config,
                          all_idx, mesh)
    return batch_pass(batch_fn, (params, s, bs), ds, config, all_idx, mesh)


# ----------------------------------------------------------------------------- dispatch
def _grand_fn(graphdef, chunk_size, mesh):
    def local(params, bs, image, label):
        def loss(p, batch):
            logits = nnx.merge(graphdef, p, bs)(batch["image"], train=False)
            return losses.cross_entropy(logits, batch["label"])

        return scoring.grand_scores(loss, params, {"image": image, "label": label},
                                    chunk_size=chunk_size)

    # shard_map: each device computes the per-example gradients of the rows it holds.
    # Besides being the natural split, it is needed for correctness: jit's automatic
    # partitioning of a batch-sharded vmap(grad) through convolutions gives wrong
    # gradients on XLA:CPU (JAX 0.10.2; test_scores_on_8_devices_equal_1_device).
    # check_vma=False: with varying-axis typing, the gradient w.r.t. the replicated params
    # would be psum'd over devices (the transpose of their implicit broadcast), mixing
    # different examples' gradients; each device's gradients must stay its own.
    rows = jax.sharding.PartitionSpec("data")
    repl = jax.sharding.PartitionSpec()
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(repl, repl, rows, rows),
                            out_specs=rows, check_vma=False)

    def fn(params, bs, batch):
        return sharded(params, bs, batch["image"], batch["label"])

    return fn


score_params = methods.score_params  # the method table owns the score key


def compute_scores(config, ds, mesh, workdir, writer: MetricsWriter, log,
                   teacher: Model | None):
    """Scores [N_train] for config.prune.method, reusing DIR/scores/<method>.npz when its
    metadata matches. Returns (scores, meta)."""
    method = config.prune.method
    # The teacher is upstream of the scores only when the method reads it (a KD run has a
    # teacher whatever the method; el2n, grand and forgetting score with proxies).
    m = methods.get(method)
    uses_teacher = teacher is not None and m.needs_teacher(config)
    meta = {"method": method, "params": score_params(config), "data": ds.fingerprint,
            "teacher": teacher.fingerprint if uses_teacher else ""}
    fp = artifacts.fingerprint(meta)
    if config.prune.scores_file:
        return load_external_scores(config.prune.scores_file, meta, len(ds.train))
    path = os.path.join(workdir, "scores", f"{method}.npz")
    old, problem = read_scores_checked(path)
    if old is not None and old[1].get("fingerprint") == fp and len(old[0]) != len(ds.train):
        # For this very data (a stale file may hold another split's length): damaged.
        old, problem = None, f"{len(old[0])} scores, the training split has {len(ds.train)}"
    if problem:
        log(f"[scores] {path} is unreadable ({problem}); recomputing")
    elif old is not None and old[1].get("fingerprint") == fp:
        log(f"[scores] reusing {path}")
        return old
    elif old is not None:
        log(f"[scores] {path} is stale (different data, teacher or parameters); recomputing")

    t0 = time.perf_counter()
    all_idx = np.arange(len(ds.train))
    num_classes = ds.train.num_classes
    proxy_seconds = 0.0
    t_logits = t_feats = None
    # The teacher pass only for the methods that read teacher logits / features (a KD run
    # has a teacher whatever the method; el2n, grand and forgetting score with proxies).
    if teacher is not None and m.teacher_pass:
        t_logits, t_feats = logits_and_features(teacher, ds, config, all_idx, mesh,
                                                num_classes)
    proxies = []
    if m.proxy_mode(config) is not None:
        proxies, proxy_seconds = train_proxies(config, ds, mesh, workdir, writer, log,
                                               track_forgetting=m.track_forgetting)
        faults.maybe_kill("proxies:done")  # kill point: proxies trained, nothing scored
    if m.score is None:
        raise ConfigError("prune.method", method, ", ".join(methods.scored_names()))
    influence_report = {}
    inputs = methods.ScoreInputs(
        config=config, labels=ds.train_labels, num_classes=num_classes,
        teacher_logits=t_logits, teacher_features=t_feats, proxies=proxies,
        logits_and_features=lambda model: logits_and_features(model, ds, config, all_idx,
                                                              mesh, num_classes),
        grand=lambda model: batch_pass(
            _grand_fn(model.graphdef, config.score.grand_chunk_size, mesh),
            (model.params, model.batch_stats), ds, config, all_idx, mesh),
        influence=lambda: influence_scores_for(
            config, ds, mesh, log, teacher, proxies[0][0] if proxies else None, t_logits,
            t_feats, workdir=workdir, report=influence_report))
    scores = m.score(inputs)
    scores = np.asarray(scores, np.float32)
    scoring_seconds = time.perf_counter() - t0 - proxy_seconds
    meta.update(fingerprint=fp, proxy_seconds=round(proxy_seconds, 3),
                scoring_seconds=round(scoring_seconds, 3),
                proxies=[m.fingerprint for m, _ in proxies])
    if influence_report:  # K-FAC / EK-FAC: the factors' share of the scoring cost
        meta["kfac"] = influence_report
    if jax.process_index() == 0:
        artifacts.write_npz(path, scores=scores, meta=meta)
    log(f"[scores] {method}: {len(scores)} scores in {scoring_seconds:.1f} s "
        f"(+ {proxy_seconds:.1f} s proxy training) -> {path}")
    return scores, meta


def read_scores(path):
    """(scores, meta) from a score file, or None when missing or unreadable."""
    return read_scores_checked(path)[0]


def read_scores_checked(path, n: int | None = None):
    """((scores, meta), None); (None, None) when the file is missing; (None, what is wrong)
    when it is not a score file: not an .npz (empty, truncated, garbage), no 'scores' or
    'meta' array, meta not a JSON object, scores not a finite float vector (of length `n`
    when given)."""
    if not os.path.exists(path):
        return None, None
    try:
        with np.load(path) as z:
            missing = [k for k in ("scores", "meta") if k not in z.files]
            if missing:
                return None, f"no array {missing[0]!r} (it has {sorted(z.files)})"
            scores, meta = np.asarray(z["scores"]), json.loads(str(z["meta"]))
    except Exception as e:  # zipfile / zlib / numpy / json raise many types for bad bytes
        return None, artifacts.describe(e)
    if not isinstance(meta, dict):
        return None, f"'meta' is a JSON {type(meta).__name__}, expected an object"
    if scores.ndim != 1 or scores.dtype.kind != "f":
        return None, f"'scores' is {scores.dtype} {scores.shape}, expected a float vector"
    if n is not None and len(scores) != n:
        return None, f"{len(scores)} scores, the training split has {n} examples"
    if not np.all(np.isfinite(scores)):
        return None, f"{int(np.sum(~np.isfinite(scores)))} scores are NaN or infinite"
    return (scores, meta), None


def load_external_scores(path, want: dict, n: int):
    """A user-supplied score file (prune.scores_file): its metadata must match this run's
    method, data and (if `want` names one) teacher; it is only read, never overwritten.
    Called once right after the data loads (method + data, before any training) and again
    in the scores stage (+ teacher)."""
    got, problem = read_scores_checked(path)
    if got is None:
        raise ConfigError("prune.scores_file", path, "a readable .npz written by kdprune_jax "
                          "(arrays 'scores' and 'meta'); this one "
                          + (f"is unreadable ({problem})" if problem else "does not exist"))
    scores, meta = got
    for key, what in (("method", "scoring method"), ("data", "data (source, split, "
                      "validation split, label noise)"), ("teacher", "teacher")):
        if key in want and meta.get(key) != want[key]:
            raise ArtifactError(
                f"score file {path} was computed for a different {what}: "
                f"{meta.get(key)!r} there, {want[key]!r} in this run; recompute the scores "
                "(leave prune.scores_file empty) or pass the matching file")
    if len(scores) != n:
        raise ArtifactError(f"score file {path} has {len(scores)} scores, the training split "
                            f"has {n} examples")
    return scores, meta
