"""How IF-Beta's two jitted kernels grow with the pool size N and the feature dimension D:

- scoring: fit the KD-aligned proxy head (L-BFGS), solve s_test (CG), influence of every
  pool example (one JVP) -- what `stages.ifbeta.build_problem` runs;
- one bilevel outer step (`bilevel.make_outer_step`: inner L-BFGS solve, CG, implicit
  hypergradient, Adam update).

Iteration counts are FIXED (tolerances 0, no warm start) so the time measures the cost of
the work, not how fast the solvers happen to converge at each size; the features are
synthetic (class means + noise, teacher logits from a noisy linear map), which only matters
for convergence. Each time is the median of >= 5 calls after a compiling call; the growth
exponent k of time ~ N^k (and ~ D^k) is the least-squares slope in log-log.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from benchmarks.common import Row, timed


def _data(n, dim, num_classes, seed):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)).astype(np.float32)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    x = means[y] + 2.0 * rng.normal(size=(n, dim)).astype(np.float32)
    w = rng.normal(size=(dim, num_classes)).astype(np.float32) / np.sqrt(dim)
    t = x @ w + 0.5 * rng.normal(size=(n, num_classes)).astype(np.float32)
    return {"features": x, "label": y, "teacher_logits": t.astype(np.float32)}


def _exponent(xs, ts) -> float:
    return float(np.polyfit(np.log(xs), np.log(ts), 1)[0])


def measure(n, dim, *, num_classes=10, n_val=1000, reps=5, fit_iters=50, cg_iters=50,
            keep_fraction=0.5):
    """(scoring seconds, outer-step seconds, compile seconds of both) at pool size n."""
    import jax
    import jax.numpy as jnp
    import optax

    from kdprune_jax import bilevel, scoring, selection, sharding
    from kdprune_jax.scoring import head as head_lib
    from kdprune_jax.selection import policy as policy_lib

    lam, tau, l2 = 0.9, 4.0, 1e-4
    train = jax.tree.map(jnp.asarray, _data(n, dim, num_classes, 0))
    val = jax.tree.map(jnp.asarray, _data(n_val, dim, num_classes, 1))
    val2 = jax.tree.map(jnp.asarray, _data(n_val, dim, num_classes, 2))
    theta0 = head_lib.init_head(dim, num_classes)

    damping = 1e-3
    # Preconditioned as stages.ifbeta.build_problem runs it (policy.preconditioner="auto"
    # with the linear head): L-BFGS whitened by the Kronecker factors at theta0, CG
    # preconditioned by the factors at the fitted theta. Their eigendecompositions add
    # O(D^3) work per solve, independent of N.
    precond = functools.partial(head_lib.kronecker_preconditioner, lam=lam, temperature=tau,
                                shift=l2 + damping)

    @jax.jit
    def score(train, val):
        whitening = head_lib.kronecker_factors(theta0, train, lam=lam, temperature=tau,
                                               shift=l2)
        theta, _ = head_lib.fit_head(train, theta0, lam=lam, temperature=tau, l2=l2,
                                     max_iters=fit_iters, tol=0.0, whitening=whitening)
        obj = lambda p, b: head_lib.head_objective(p, b, lam=lam, temperature=tau, l2=l2)  # noqa: E731
        vobj = lambda p, b: jnp.mean(head_lib.head_losses(p, b, lam=lam, temperature=tau))  # noqa: E731
        s, _ = scoring.s_test(obj, vobj, theta, train, val, solver="cg", damping=damping,
                              max_iters=cg_iters, tol=0.0, preconditioner=precond)
        per = lambda p, b: head_lib.head_losses(p, b, lam=lam, temperature=tau)  # noqa: E731
        return scoring.influence_from_s_test(per, theta, train, s)

    t0 = time.perf_counter()
    infl = jax.block_until_ready(score(train, val))
    compile_s = time.perf_counter() - t0
    score_s, _ = timed(lambda: score(train, val), reps=reps, warmup=0,
                       sync=jax.block_until_ready)

    labels = np.asarray(train["label"])
    u = policy_lib.within_class_ranks(np.asarray(infl), labels, num_classes, seed=0)
    counts = selection.class_keep_counts(labels, keep_fraction, num_classes)
    mesh = sharding.make_mesh()
    prob = bilevel.make_problem(train, u, counts, val, val2, num_classes=num_classes,
                                multiple=jax.device_count())
    prob = jax.device_put(prob, bilevel.problem_shardings(mesh))
    s = bilevel.Settings(num_classes=num_classes, kd_weight=lam, temperature=tau, l2=l2,
                         inner_max_iters=fit_iters, inner_tol=0.0, cg_max_iters=cg_iters,
                         cg_tol=0.0, warm_start=False)  # preconditioner="auto": Kronecker
    tx = optax.adam(0.05)
    step = bilevel.make_outer_step(s, tx, mesh)

    def fresh():
        return bilevel.init_state(jnp.zeros(2), theta0, tx)

    t0 = time.perf_counter()
    jax.block_until_ready(step(fresh(), prob))
    compile_s += time.perf_counter() - t0
    holder = {}

    def one_step():  # the state is donated: a fresh one per call (negligible: 2 floats)
        holder["out"] = step(fresh(), prob)
        return holder["out"]

    outer_s, _ = timed(one_step, reps=reps, warmup=0, sync=jax.block_until_ready)
    return score_s, outer_s, compile_s


def run(ns=(5000, 10000, 20000, 40000), dims=(64, 256, 1024, 2048), base_n=10000,
        base_dim=64, reps=5):
    rows = []
    by_n = [measure(n, base_dim, reps=reps) for n in ns]
    by_d = [measure(base_n, d, reps=reps) for d in dims]
    for what, i in (("scoring (head fit + s_test + influence)", 0),
                    ("one bilevel outer step", 1)):
        for axis, xs, results, fixed, ref_label, note in (
                ("N", ns, by_n, f"D {base_dim}", "target k <= 1",
                 f"; compile {by_n[-1][2]:.1f} s at N={ns[-1]}"),
                ("D", dims, by_d, f"N {base_n // 1000}k",
                 "linear head: ~N*D*C work per iteration, + D^3 per Kronecker "
                 "factorization", "")):
            ts = [r[i] for r in results]
            sizes = ", ".join(f"{x // 1000}k" if axis == "N" else str(x) for x in xs)
            rows.append(Row(
                workload=f"IF-Beta {what}: growth in {axis} = {sizes} ({fixed})",
                unit="exponent", higher_is_better=False, ours=_exponent(xs, ts),
                ours_label=f"time ~ {axis}^k; " + ", ".join(f"{t * 1e3:.0f} ms" for t in ts),
                ref=None, ref_label=ref_label, reps=reps,
                notes="50 L-BFGS + 50 CG iterations, Kronecker-preconditioned" + note))
    return rows
