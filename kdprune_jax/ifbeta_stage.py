"""IF-Beta as pipeline stages: features -> influence ranks -> policy -> Gumbel draw.

Our documented reconstruction of "Distill on a Diet" (paper B; only its abstract is public),
following METHOD.md §5; every "our choice" there is a field of config.ifbeta / config.policy.

    DIR/features/          teacher penultimate features + logits of the whole train split,
                           streamed to .npy (memory-mapped, float32/float16/bfloat16) + meta
    DIR/ifbeta/policy.json learned (a, b), per-step log, the draw seed, fingerprints
    DIR/ifbeta/diagnostics.{json,png}  Beta density over ranks, kept-score histogram, curves
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from kdprune_jax import (
    artifacts,
    bilevel,
    distributed,
    faults,
    io_errors,
    preemption,
    scoring,
    sharding,
)
from kdprune_jax.data import stratified_split
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.score_stage import Model, batch_pass, forward_fn
from kdprune_jax.scoring import SolverError
from kdprune_jax.scoring import head as head_lib
from kdprune_jax.selection import Subset, class_keep_counts, policy

FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16,
                  "bfloat16": ml_dtypes.bfloat16}
POLICY_METHODS = ("implicit", "reinforce", "grid")


# ----------------------------------------------------------------------------- features
def _features_meta(config, ds, teacher: Model) -> dict:
    d = config.data
    return {"teacher": teacher.fingerprint, "data": ds.fingerprint,
            "eval_transform": [d.augment, d.image_size, list(d.mean), list(d.std)],
            "dtype": config.ifbeta.feature_dtype, "num_examples": len(ds.train)}


def _read_features(path):
    return read_features(path)[0]


def read_features(path, num_classes: int | None = None, dim: int | None = None):
    """((features [N, D], logits [N, C], meta), None) memory-mapped; (None, None) when the
    directory does not exist; (None, "<file>: what is wrong") when a file is missing, not
    an .npy / JSON document (empty, truncated, garbage), or of the wrong shape or dtype
    (N from meta.json; C and D checked when given)."""
    if not os.path.isdir(path):
        return None, None
    meta, problem = artifacts.read_json_checked(os.path.join(path, "meta.json"))
    if meta is not None:
        problem = artifacts.check_fields(meta, {"dtype": str, "num_examples": int})
        if problem is None and meta["dtype"] not in FEATURE_DTYPES:
            problem = f"unknown dtype {meta['dtype']!r}"
    if meta is None or problem:
        return None, f"meta.json: {problem or 'missing'}"
    n, dt = meta["num_examples"], FEATURE_DTYPES[meta["dtype"]]
    out = []
    for name, cols, dtype in (("features.npy", dim, np.uint16 if dt is ml_dtypes.bfloat16
                               else dt), ("logits.npy", num_classes, np.float32)):
        try:
            a = np.load(os.path.join(path, name), mmap_mode="r")
        except Exception as e:  # numpy raises several types for a damaged header or size
            return None, f"{name}: {artifacts.describe(e)}"
        if a.ndim != 2 or a.shape[0] != n or (cols is not None and a.shape[1] != cols):
            return None, (f"{name}: shape {a.shape}, expected ({n}, "
                          f"{cols if cols is not None else 'D'}) from meta.json")
        if a.dtype != dtype:
            return None, f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}"
        out.append(a)
    feats, logits = out
    return (feats.view(dt) if dt is ml_dtypes.bfloat16 else feats, logits, meta), None


def _features_or_problem(path):
    """read_features + a check that every value is finite; returns float32 arrays."""
    got, problem = read_features(path)
    if got is None:
        return None, problem
    feats, logits = np.asarray(got[0], np.float32), np.asarray(got[1], np.float32)
    for name, a in (("features.npy", feats), ("logits.npy", logits)):
        if not np.all(np.isfinite(a)):
            return None, f"{name}: {int(np.sum(~np.isfinite(a)))} NaN or infinite values"
    return (feats, logits, got[2]), None


def refuse_features_dir(given: str, problem: str | None):
    """The error for an unusable user-given ifbeta.features_dir (nothing to rebuild)."""
    return ConfigError("ifbeta.features_dir", given,
                       "'' or a features directory written by kdprune_jax; this one "
                       + (f"is unreadable ({problem})" if problem else "does not exist"))


def check_features_dir(config, ds):
    """Before any training: a user-given ifbeta.features_dir must be readable (its
    teacher and data are compared once the teacher is known)."""
    got, problem = read_features(config.ifbeta.features_dir, ds.train.num_classes)
    if got is None:
        raise refuse_features_dir(config.ifbeta.features_dir, problem)


def teacher_features(config, ds, mesh, workdir, teacher: Model, log):
    """The `features` stage: one inference pass of the frozen teacher over the whole train
    split (train pool + validation), no augmentation. Streams rows into memory-mapped
    .npy files (host memory stays at one batch), written to a temp dir and renamed into
    place. Reused when its metadata matches; a user-given ifbeta.features_dir must match.

    Returns (features [N, D], teacher logits [N, C]) as float32 numpy arrays.
    """
    want = _features_meta(config, ds, teacher)
    given = config.ifbeta.features_dir
    path = given or os.path.join(workdir, "features")
    got, problem = _features_or_problem(path)
    if got is not None and all(got[2].get(k) == v for k, v in want.items()):
        # Made for this teacher and data, so the widths must be this teacher's (a stale
        # directory of another teacher may have other ones: stale, not damaged).
        dim, c = _feature_dim(teacher, ds), ds.train.num_classes
        if got[0].shape[1] != dim or got[1].shape[1] != c:
            got, problem = None, (f"features.npy / logits.npy: {got[0].shape[1]} / "
                                  f"{got[1].shape[1]} columns, this teacher has {dim} / {c}")
    if given:
        if got is None:
            raise refuse_features_dir(given, problem)
        for key in ("teacher", "data", "eval_transform", "dtype", "num_examples"):
            if got[2].get(key) != want[key]:  # only read, never recomputed into
                raise ArtifactError(
                    f"features in {given} were computed with a different {key} "
                    f"({got[2].get(key)!r}) than this run's ({want[key]!r}); they come from "
                    "another teacher/data than config.teacher names. Leave "
                    "ifbeta.features_dir empty to recompute them")
    if got is not None and all(got[2].get(k) == v for k, v in want.items()):
        log(f"[features] reusing {path}")
        return got[0], got[1]
    if problem:
        log(f"[features] {path} is unreadable ({problem}); recomputing")
    elif got is not None:
        log(f"[features] {path} is stale (different teacher, data or dtype); recomputing")
    t0 = time.perf_counter()
    c = ds.train.num_classes
    n = len(ds.train)
    dt = FEATURE_DTYPES[config.ifbeta.feature_dtype]
    tmp = path + ".tmp"
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dim = _feature_dim(teacher, ds)
    store = np.uint16 if dt is ml_dtypes.bfloat16 else dt  # .npy has no bfloat16
    # Every process takes part in the sharded pass and receives every row, but only
    # process 0 writes the files (one writer per file on a shared workdir); the others
    # read them back after the barrier below.
    writer = jax.process_index() == 0
    if writer:
        # Blocks allocated up front: a full disk is a one-line WriteError here, not a
        # SIGBUS mid-pass (io_errors.open_memmap).
        f_mm = io_errors.open_memmap(os.path.join(tmp, "features.npy"), store, (n, dim))
        l_mm = io_errors.open_memmap(os.path.join(tmp, "logits.npy"), np.float32, (n, c))

    def sink(idx, vals):
        if not writer:
            return
        f = vals[:, c:].astype(dt)
        f_mm[idx] = f.view(np.uint16) if dt is ml_dtypes.bfloat16 else f
        l_mm[idx] = vals[:, :c]

    # Kill points features:batch<k>: a partial features.tmp/ is left behind (removed above
    # on rerun); features/ only ever appears complete.
    batch_pass(forward_fn(teacher.graphdef), (teacher.params, teacher.batch_stats), ds, config,
               np.arange(n), mesh, sink=sink, name="features")
    if writer:
        with io_errors.writing(tmp):
            f_mm.flush()  # the data is on disk before the directory is renamed into place
            l_mm.flush()
        artifacts.write_json(os.path.join(tmp, "meta.json"),
                             {**want, "seconds": time.perf_counter() - t0})
        old = path + ".old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier("kdprune_features_written")
    log(f"[features] {n} x {dim} features ({config.ifbeta.feature_dtype}) in "
        f"{time.perf_counter() - t0:.1f} s -> {path}")
    feats, logits, _ = _read_features(path)
    return np.asarray(feats, np.float32), np.asarray(logits, np.float32)


def _feature_dim(teacher: Model, ds) -> int:
    """Penultimate width, from an abstract evaluation (no compute)."""
    from flax import nnx

    x = jax.ShapeDtypeStruct((1,) + ds.train.source[0]["image"].shape, jnp.float32)

    def f(p, b, x):
        return nnx.merge(teacher.graphdef, p, b)(x, train=False, return_features=True)[1]

    return int(jax.eval_shape(f, teacher.params, teacher.batch_stats, x).shape[-1])


# ----------------------------------------------------------------------------- problem
def _rows(feats, logits, labels, idx):
    return {"features": jnp.asarray(feats[idx]), "label": jnp.asarray(labels[idx], jnp.int32),
            "teacher_logits": jnp.asarray(logits[idx])}


def validation_halves(config, ds):
    """V1 (outer objective) and V2 (early stopping): a stratified split of the validation
    split. Raises ConfigError when either would be empty (checked before any training)."""
    v2_pos, v1_pos = stratified_split(ds.train_labels[ds.val], config.ifbeta.val2_fraction,
                                      config.data.val_seed + 1)
    if len(v1_pos) == 0 or len(v2_pos) == 0:
        raise ConfigError("data.val_fraction", config.data.val_fraction,
                          f"a fraction leaving examples in both IF-Beta validation halves "
                          f"(V1 for the objective, V2 for early stopping); the validation "
                          f"split has {len(ds.val)} examples")
    return ds.val[v1_pos], ds.val[v2_pos]


def build_problem(config, ds, feats, logits, log):
    """Influence ranks on the KD-aligned proxy head and the bilevel problem.

    Returns (Problem, influence scores [len(pool)], V1/V2 indices)."""
    ib = config.ifbeta
    labels = ds.train_labels
    v1, v2 = validation_halves(config, ds)
    train = _rows(feats, logits, labels, ds.pool)
    val1, val2 = _rows(feats, logits, labels, v1), _rows(feats, logits, labels, v2)
    lam, tau, l2 = ib.kd_weight, ib.temperature, ib.l2
    theta0 = init_theta(config, feats.shape[1], ds.train.num_classes)
    kron = settings(config, ds.train.num_classes).kronecker
    whitening = (head_lib.kronecker_factors(theta0, train, lam=lam, temperature=tau, shift=l2)
                 if kron else None)
    theta, info = head_lib.fit_head(train, theta0, lam=lam, temperature=tau, l2=l2,
                                    max_iters=config.policy.inner_max_iters * 5, tol=1e-6,
                                    whitening=whitening)
    obj = lambda p, b: head_lib.head_objective(p, b, lam=lam, temperature=tau, l2=l2)  # noqa: E731
    val_obj = lambda p, b: jnp.mean(head_lib.head_losses(p, b, lam=lam, temperature=tau))  # noqa: E731
    precond = None
    if kron:
        precond = head_lib.KroneckerPreconditioner(lam=lam, temperature=tau,
                                                   shift=l2 + ib.damping)
    per_ex = lambda p, b: head_lib.head_losses(p, b, lam=lam, temperature=tau)  # noqa: E731
    s, sinfo = scoring.s_test(obj, val_obj, theta, train, val1, solver=ib.influence_solver,
                              damping=ib.damping, max_iters=config.policy.cg_max_iters,
                              tol=config.policy.cg_tol, preconditioner=precond,
                              example_losses=per_ex, check=False)
    scoring.check_solve(sinfo, solver=ib.influence_solver, tol=config.policy.cg_tol,
                        where="ifbeta influence ranks",
                        settings=dict(damping=ib.damping, max_iters=config.policy.cg_max_iters),
                        names={"damping": "ifbeta.damping", "max_iters": "policy.cg_max_iters"})
    infl = np.asarray(scoring.influence_from_s_test(per_ex, theta, train, s))
    u = policy.within_class_ranks(infl, labels[ds.pool], ds.train.num_classes,
                                  seed=config.prune.seed)
    counts = class_keep_counts(labels[ds.pool], config.prune.keep_fraction,
                               ds.train.num_classes)
    log(f"[ifbeta] proxy head: {int(info['iterations'])} L-BFGS iterations; influence ranks "
        f"for {len(ds.pool)} examples; V1 {len(v1)} / V2 {len(v2)} examples")
    prob = bilevel.make_problem(train, u, counts, val1, val2,
                                num_classes=ds.train.num_classes,
                                multiple=jax.device_count())
    return prob, infl, theta


def init_theta(config, dim, num_classes):
    ib = config.ifbeta
    return head_lib.init_head(dim, num_classes, kind=ib.head, hidden=ib.mlp_hidden,
                              seed=config.seed)


def settings(config, num_classes) -> bilevel.Settings:
    ib, p = config.ifbeta, config.policy
    return bilevel.Settings(
        num_classes=num_classes, lam=ib.kd_weight, temperature=ib.temperature, l2=ib.l2,
        inner_max_iters=p.inner_max_iters, inner_tol=p.inner_tol,
        cg_max_iters=p.cg_max_iters, cg_tol=p.cg_tol, damping=p.damping,
        warm_start=p.warm_start, cg_warm_start=p.cg_warm_start,
        preconditioner=p.preconditioner, head=ib.head,
        mlp_hidden=ib.mlp_hidden, seed=config.seed, outer_loss=p.get("outer_loss", "kd"))


def _phi(a, b):
    return jnp.log(jnp.expm1(jnp.array([a, b], jnp.float32) - policy.EPS))


# ----------------------------------------------------------------------------- policy
def learn_policy(config, prob, s: bilevel.Settings, mesh, writer, log):
    """Outer loop of the selected estimator. Returns (best phi, history, extras)."""
    p = config.policy
    phi0 = _phi(p.init_a, p.init_b)
    extras = {}
    if p.check_grad:
        # Both sides with tight inner/CG tolerances, so the comparison measures the
        # hypergradient formula rather than solver slack.
        # In float64: central differences of an objective that is itself an inner solve
        # are only meaningful when both sides are far more precise than float32 allows.
        tight = dataclasses.replace(s, inner_tol=1e-10, inner_max_iters=5 * s.inner_max_iters,
                                    cg_tol=1e-12, cg_max_iters=5 * s.cg_max_iters)
        with jax.enable_x64(True):
            p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64)
                               if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x),
                               prob)
            phi64 = jnp.asarray(np.asarray(phi0), jnp.float64)
            g, _ = bilevel.implicit_grad_at(phi64, p64, tight)
            fd = bilevel.finite_difference_grad(phi64, p64, tight, eps=1e-4)
            rel = float(jnp.linalg.norm(g - fd) / jnp.maximum(jnp.linalg.norm(fd), 1e-30))
        extras["check_grad"] = {"implicit": np.asarray(g).tolist(),
                                "finite_difference": np.asarray(fd).tolist(),
                                "relative_error": rel}
        log(f"[policy] check_grad at (a, b) = ({p.init_a}, {p.init_b}): implicit "
            f"{np.asarray(g)}, finite differences {np.asarray(fd)}, relative error {rel:.3g}")
    history = []
    if p.method == "grid":
        phis, objs = bilevel.grid_objectives(prob, s, p.grid_values)
        objs = np.asarray(objs)
        for ph, o in zip(np.asarray(phis), objs):
            a, b = (float(x) for x in policy.beta_params(jnp.asarray(ph)))
            history.append({"a": a, "b": b, "outer": float(o)})
        best = int(np.argmin(objs))
        return jnp.asarray(phis[best]), history, extras

    tx = optax.adam(p.learning_rate)
    theta0 = init_theta(config, prob.train["features"].shape[1], s.num_classes)
    state = sharding.replicate(bilevel.init_state(phi0, theta0, tx), mesh)
    prob = jax.device_put(prob, bilevel.problem_shardings(mesh))
    step = bilevel.make_outer_step(s, tx, mesh) if p.method == "implicit" else None
    key = jax.random.key(config.prune.seed)
    best_phi, best_val, since_best = phi0, np.inf, 0
    kill_armed = faults.armed("policy:step")
    for k in range(p.max_steps):
        # The metrics of step k describe the policy BEFORE its update; keep a host copy
        # (the step donates its input state).
        phi_before = np.asarray(jax.device_get(state.phi))
        if p.method == "implicit":
            state, m = step(state, prob)
            m = {kk: float(v) for kk, v in jax.device_get(m).items()}
            # not finite: with the CG warm start a NaN would also seed every later step.
            if not np.isfinite(m["cg_residual"]) or m["cg_residual"] > max(p.cg_tol * 100,
                                                                            1e-3):
                raise SolverError(
                    f"policy CG did not converge at outer step {k}: relative residual "
                    f"{m['cg_residual']:.3g} after {int(m['cg_iters'])} iterations; raise "
                    "policy.cg_max_iters or policy.damping")
        else:  # reinforce
            key, sub = jax.random.split(key)
            g = bilevel.reinforce_grad(state.phi, prob, s, sub, p.reinforce_samples)
            updates, opt = tx.update(g, state.opt_state, state.phi)
            a, b = policy.beta_params(state.phi)
            obj = float(bilevel.objective_at(state.phi, prob, s))
            state = bilevel.PolicyState(optax.apply_updates(state.phi, updates), opt,
                                        state.theta, state.step + 1, state.cg_solution)
            m = {"a": float(a), "b": float(b), "outer": obj, "grad_norm":
                 float(jnp.linalg.norm(g))}
            m["heldout"] = obj  # REINFORCE: no separate inner solution to evaluate on V2
        history.append(m)
        writer.write("policy", k + 1, **m)
        if kill_armed:  # kill point policy:step<k>: not resumable mid-run, rerun relearns
            faults.maybe_kill(f"policy:step{k + 1}")
        preemption.check("policy")  # SIGTERM: stop now, the policy is relearned on rerun
        # Early stopping on V2 (the second held-out split): keep the best policy seen.
        if m["heldout"] < best_val - 1e-6:
            best_val, best_phi, since_best = m["heldout"], phi_before, 0
        else:
            since_best += 1
            if since_best >= p.patience:
                log(f"[policy] early stop at step {k + 1} (no V2 improvement for "
                    f"{p.patience} steps)")
                break
        if (k + 1) % max(1, config.log_every_steps) == 0:
            log(f"[policy] step {k + 1}: a {m['a']:.3f} b {m['b']:.3f} outer "
                f"{m['outer']:.5f} V2 {m['heldout']:.5f}")
    return jnp.asarray(best_phi), history, extras


# ----------------------------------------------------------------------------- stage
# Fields added to config.policy after policy records were first written, with their
# defaults: they enter the key only when they differ, so existing records stay valid.
_POLICY_FIELDS_SINCE = {"outer_loss": "kd"}


def _policy_key(p) -> dict:
    d = p.to_dict()
    for k, default in _POLICY_FIELDS_SINCE.items():
        if d.get(k) == default:
            d.pop(k)
    return d


def select_ifbeta(config, ds, mesh, workdir, writer, log, teacher: Model):
    """features -> ranks -> policy -> draw. Returns (Subset, policy record)."""
    p = config.policy
    if p.method not in POLICY_METHODS:
        raise ConfigError("policy.method", p.method, ", ".join(POLICY_METHODS))
    feats, logits = teacher_features(config, ds, mesh, workdir, teacher, log)
    fp = artifacts.fingerprint({
        "teacher": teacher.fingerprint, "data": ds.fingerprint,
        # the features themselves (eval transform, dtype) and init_theta's seed
        "features": artifacts.fingerprint(_features_meta(config, ds, teacher)),
        "init_seed": config.seed,
        "ifbeta": config.ifbeta.to_dict(), "policy": _policy_key(p),
        "keep_fraction": config.prune.keep_fraction, "seed": config.prune.seed})
    rec_path = os.path.join(workdir, "ifbeta", "policy.json")
    rec, problem = artifacts.read_json_checked(rec_path)
    if rec is not None:
        problem = _policy_problem(rec)
    if problem:
        log(f"[policy] {rec_path} is unreadable ({problem}); relearning")
        rec = None
    t0 = time.perf_counter()
    prob, infl, _ = build_problem(config, ds, feats, logits, log)
    s = settings(config, ds.train.num_classes)
    if rec is not None and rec["fingerprint"] == fp:
        log(f"[policy] reusing {rec_path}")
        phi = jnp.asarray(rec["phi"], jnp.float32)
    else:
        phi, history, extras = learn_policy(config, prob, s, mesh, writer, log)
        a, b = (float(x) for x in policy.beta_params(phi))
        rec = {"fingerprint": fp, "phi": np.asarray(phi).tolist(), "a": a, "b": b,
               "method": p.method, "history": history, **extras,
               "seconds": time.perf_counter() - t0,
               "outer_at_init": float(bilevel.objective_at(_phi(p.init_a, p.init_b), prob, s)),
               "outer_at_learned": float(bilevel.objective_at(phi, prob, s))}
        if jax.process_index() == 0:
            artifacts.write_json(rec_path, rec)
        log(f"[policy] learned (a, b) = ({a:.3f}, {b:.3f}); V1 objective "
            f"{rec['outer_at_init']:.5f} at init -> {rec['outer_at_learned']:.5f}")
    pool_labels = ds.train_labels[ds.pool]
    n = len(ds.pool)
    # Jitted: op by op, its associative scan compiled ~350 tiny programs (~17 s on a CPU).
    pi = jax.jit(bilevel.keep_probabilities, static_argnames="s")(phi, prob, s)
    pi = pi[:n]  # drop padding rows
    counts = np.asarray(prob.counts)[:-1]
    keep = policy.gumbel_top_k(pi, pool_labels, counts, ds.train.num_classes,
                               jax.random.key(config.prune.seed))
    subset = Subset(
        indices=np.sort(ds.pool[keep]), keep_fraction=float(config.prune.keep_fraction),
        method="ifbeta", seed=int(config.prune.seed), class_counts=counts,
        pool_size=len(ds.pool), direction="learned",
        params={"a": rec["a"], "b": rec["b"], "policy": p.method, "draw": "gumbel_top_k"})
    if jax.process_index() == 0:
        write_diagnostics(os.path.join(workdir, "ifbeta"), rec, np.asarray(prob.u)[:n], infl,
                          keep, log)
    return subset, rec


def _policy_problem(rec) -> str | None:
    """What makes a parsed policy.json unusable (None if nothing)."""
    n = artifacts.NUMBER
    problem = artifacts.check_fields(rec, {
        "fingerprint": str, "phi": list, "a": n, "b": n, "method": str, "history": list,
        "seconds": n, "outer_at_init": n, "outer_at_learned": n})
    if problem:
        return problem
    phi = np.asarray(rec["phi"])
    if phi.shape != (2,) or phi.dtype.kind not in "fiu" or not np.all(np.isfinite(phi)):
        return f"'phi' is {rec['phi']!r}, expected 2 finite numbers"
    a, b = (float(x) for x in policy.beta_params(jnp.asarray(phi, jnp.float32)))
    if not np.allclose([a, b], [rec["a"], rec["b"]], rtol=1e-5, atol=0):
        return f"'a', 'b' = {rec['a']}, {rec['b']} do not match 'phi' ({a:.6g}, {b:.6g})"
    return None


def write_diagnostics(out_dir, rec, u, infl, keep, log):
    """diagnostics.json (+ .png with matplotlib): what the learned policy chose."""
    grid = np.linspace(0.005, 0.995, 199)
    from scipy.stats import beta as beta_dist

    density = beta_dist.pdf(grid, rec["a"], rec["b"])
    hist_all, edges = np.histogram(infl, bins=30)
    hist_kept, _ = np.histogram(infl[keep], bins=edges)
    diag = {"a": rec["a"], "b": rec["b"], "rank_grid": grid.tolist(),
            "beta_density": density.tolist(), "influence_bin_edges": edges.tolist(),
            "influence_hist_all": hist_all.tolist(), "influence_hist_kept": hist_kept.tolist(),
            "mean_rank_kept": float(u[keep].mean()), "mean_rank_all": float(u.mean()),
            "outer_curve": [h.get("outer") for h in rec.get("history", [])]}
    artifacts.write_json(os.path.join(out_dir, "diagnostics.json"), diag)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[ifbeta] matplotlib not installed: diagnostics.json only (pip install "
            "'kdprune_jax[plots]' for the PNG)")
        return
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(grid, density)
    ax[0].set_ylim(bottom=0)
    ax[0].set(title=f"Beta(a={rec['a']:.2f}, b={rec['b']:.2f}) over influence rank u",
              xlabel="within-class rank u (1 = most helpful)", ylabel="density")
    centers = (edges[:-1] + edges[1:]) / 2
    ax[1].bar(centers, hist_all, width=np.diff(edges), alpha=0.4, label="pool")
    ax[1].bar(centers, hist_kept, width=np.diff(edges), alpha=0.8, label="kept")
    ax[1].set(title="influence scores", xlabel="influence (positive = helpful)")
    ax[1].legend()
    curve = diag["outer_curve"]
    ax[2].plot(range(1, len(curve) + 1), curve)
    ax[2].set(title="outer objective (V1)", xlabel="outer step")
    fig.tight_layout()
    tmp = os.path.join(out_dir, ".diagnostics.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, os.path.join(out_dir, "diagnostics.png"))
