"""The `ifbeta` stage: influence ranks -> a learned Beta policy over them -> a Gumbel
top-k draw of the subset.

Our documented reconstruction of "Distill on a Diet" (paper B; only its abstract is public),
following METHOD.md §5; every "our choice" there is a field of config.ifbeta / config.policy.
It reads the features stage's cached teacher features and logits.

    DIR/ifbeta/policy.json learned (a, b), per-step log, the draw seed, fingerprints
    DIR/ifbeta/diagnostics.{json,png}  Beta density over ranks, kept-score histogram, curves
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdprune_jax import artifacts, bilevel, faults, preemption, scoring, sharding
from kdprune_jax.context import Run
from kdprune_jax.data import stratified_split
from kdprune_jax.errors import ConfigError
from kdprune_jax.inference import FrozenModel
from kdprune_jax.scoring import SolverError
from kdprune_jax.scoring import head as head_lib
from kdprune_jax.selection import Subset, class_keep_counts, policy
from kdprune_jax.stages import cache

POLICY_METHODS = ("implicit", "reinforce", "grid")


def _rows(feats, logits, labels, idx):
    return {"features": jnp.asarray(feats[idx]), "label": jnp.asarray(labels[idx], jnp.int32),
            "teacher_logits": jnp.asarray(logits[idx])}


def validation_halves(config, splits):
    """V1 (outer objective) and V2 (early stopping): a stratified split of the validation
    split. Raises ConfigError when either would be empty (checked before any training)."""
    v2_pos, v1_pos = stratified_split(splits.train_labels[splits.val],
                                      config.ifbeta.val2_fraction, config.data.val_seed + 1)
    if len(v1_pos) == 0 or len(v2_pos) == 0:
        raise ConfigError("data.val_fraction", config.data.val_fraction,
                          f"a fraction leaving examples in both IF-Beta validation halves "
                          f"(V1 for the objective, V2 for early stopping); the validation "
                          f"split has {len(splits.val)} examples")
    return splits.val[v1_pos], splits.val[v2_pos]


def build_problem(config, splits, feats, logits, log):
    """Influence ranks on the KD-aligned proxy head and the bilevel problem.

    Args: splits: the run's `context.Splits`; feats / logits: float32 [N_train, D] /
    [N_train, C] teacher features and logits.
    Returns (bilevel.Problem, influence scores float32 [len(pool)], fitted head theta)."""
    ib = config.ifbeta
    labels = splits.train_labels
    v1, v2 = validation_halves(config, splits)
    train = _rows(feats, logits, labels, splits.pool)
    val1, val2 = _rows(feats, logits, labels, v1), _rows(feats, logits, labels, v2)
    lam, tau, l2 = ib.kd_weight, ib.temperature, ib.l2
    theta0 = init_theta(config, feats.shape[1], splits.num_classes)
    kron = settings(config, splits.num_classes).kronecker
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
    u = policy.within_class_ranks(infl, labels[splits.pool], splits.num_classes,
                                  seed=config.prune.seed)
    counts = class_keep_counts(labels[splits.pool], config.prune.keep_fraction,
                               splits.num_classes)
    log(f"[ifbeta] proxy head: {int(info['iterations'])} L-BFGS iterations; influence ranks "
        f"for {len(splits.pool)} examples; V1 {len(v1)} / V2 {len(v2)} examples")
    prob = bilevel.make_problem(train, u, counts, val1, val2,
                                num_classes=splits.num_classes,
                                multiple=jax.device_count())
    return prob, infl, theta


def init_theta(config, dim, num_classes):
    ib = config.ifbeta
    return head_lib.init_head(dim, num_classes, kind=ib.head, hidden=ib.mlp_hidden,
                              seed=config.seed)


def settings(config, num_classes) -> bilevel.Settings:
    ib, p = config.ifbeta, config.policy
    return bilevel.Settings(
        num_classes=num_classes, kd_weight=ib.kd_weight, temperature=ib.temperature, l2=ib.l2,
        inner_max_iters=p.inner_max_iters, inner_tol=p.inner_tol,
        cg_max_iters=p.cg_max_iters, cg_tol=p.cg_tol, damping=p.damping,
        warm_start=p.warm_start, cg_warm_start=p.cg_warm_start,
        preconditioner=p.preconditioner, head=ib.head,
        mlp_hidden=ib.mlp_hidden, seed=config.seed, outer_loss=p.get("outer_loss", "kd"))


def initial_phi(a, b):
    """The policy parameters phi (softplus^-1 of (a, b) - EPS) of Beta(a, b)."""
    return jnp.log(jnp.expm1(jnp.array([a, b], jnp.float32) - policy.EPS))


# ----------------------------------------------------------------------------- policy
def learn_policy(config, prob, s: bilevel.Settings, mesh, writer, log):
    """Outer loop of the selected estimator. Returns (best phi, history, extras)."""
    p = config.policy
    phi0 = initial_phi(p.init_a, p.init_b)
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


def policy_key(p) -> dict:
    """config.policy as the policy record's key (fields added later only when not default)."""
    d = p.to_dict()
    for k, default in _POLICY_FIELDS_SINCE.items():
        if d.get(k) == default:
            d.pop(k)
    return d


def key(run: Run, teacher: FrozenModel, features_fp: str) -> str:
    """Key of the learned policy: teacher, data, the features, init_theta's seed, every
    ifbeta / policy field, keep_fraction and the draw seed."""
    c = run.config
    return artifacts.fingerprint({
        "teacher": teacher.fingerprint, "data": run.splits.fingerprint,
        # the features themselves (eval transform, dtype) and init_theta's seed
        "features": features_fp, "init_seed": c.seed,
        "ifbeta": c.ifbeta.to_dict(), "policy": policy_key(c.policy),
        "keep_fraction": c.prune.keep_fraction, "seed": c.prune.seed})


def compute(run: Run, teacher: FrozenModel, features) -> tuple[Subset, dict]:
    """ranks -> policy -> draw, on the features stage's `features` (`Features`).

    Reuses DIR/ifbeta/policy.json when its key matches. Returns (Subset, policy record)."""
    config, sp, log = run.config, run.splits, run.log
    p = config.policy
    if p.method not in POLICY_METHODS:
        raise ConfigError("policy.method", p.method, ", ".join(POLICY_METHODS))
    fp = key(run, teacher, features.fingerprint)
    t0 = time.perf_counter()
    prob, infl, _ = build_problem(config, sp, features.features, features.logits, log)
    s = settings(config, sp.num_classes)

    def learn():
        phi, history, extras = learn_policy(config, prob, s, run.mesh, run.writer, log)
        a, b = (float(x) for x in policy.beta_params(phi))
        rec = {"fingerprint": fp, "phi": np.asarray(phi).tolist(), "a": a, "b": b,
               "method": p.method, "history": history, **extras,
               "seconds": time.perf_counter() - t0,
               "outer_at_init": float(bilevel.objective_at(initial_phi(p.init_a, p.init_b),
                                                           prob, s)),
               "outer_at_learned": float(bilevel.objective_at(phi, prob, s))}
        return rec

    def read(path):
        rec, problem = artifacts.read_json_checked(path)
        if rec is not None:
            problem = _policy_problem(rec)
        return (None, problem) if problem else (rec, None)

    rec = cache.reuse_or_compute(
        cache.Artifact("policy", run.path("ifbeta", "policy.json"), redo="relearning",
                       stale="another teacher, features or ifbeta / policy setting"), fp,
        read=read, key_of=lambda r: r["fingerprint"], compute=learn,
        write=artifacts.write_json, log=log,
        announce=lambda rec: log(f"[policy] learned (a, b) = ({rec['a']:.3f}, {rec['b']:.3f}); "
                                 f"V1 objective {rec['outer_at_init']:.5f} at init -> "
                                 f"{rec['outer_at_learned']:.5f}"))
    phi = jnp.asarray(rec["phi"], jnp.float32)
    pool_labels = sp.train_labels[sp.pool]
    n = len(sp.pool)
    # Jitted: op by op, its associative scan compiled ~350 tiny programs (~17 s on a CPU).
    pi = jax.jit(bilevel.keep_probabilities, static_argnames="s")(phi, prob, s)
    pi = pi[:n]  # drop padding rows
    counts = np.asarray(prob.counts)[:-1]
    keep = policy.gumbel_top_k(pi, pool_labels, counts, sp.num_classes,
                               jax.random.key(config.prune.seed))
    subset = Subset(
        indices=np.sort(sp.pool[keep]), keep_fraction=float(config.prune.keep_fraction),
        method="ifbeta", seed=int(config.prune.seed), class_counts=counts,
        pool_size=len(sp.pool), direction="learned",
        params={"a": rec["a"], "b": rec["b"], "policy": p.method, "draw": "gumbel_top_k"})
    subset.fingerprint = artifacts.fingerprint({"policy": rec["fingerprint"],
                                                "data": sp.fingerprint})
    if run.is_writer:
        write_diagnostics(run.path("ifbeta"), rec, np.asarray(prob.u)[:n], infl, keep, log)
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
