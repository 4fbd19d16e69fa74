"""IF-Beta policy and bilevel step: implicit hypergradient vs finite differences, exact
per-class counts, Beta(1, 1) == random selection, one compile, 8 devices == 1."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdprune_jax import bilevel, sharding
from kdprune_jax.scoring import head as head_lib
from kdprune_jax.selection import class_keep_counts, policy


def _problem(n=240, d=5, c=3, seed=0, dtype=jnp.float32, keep=0.4, feature_scales=None):
    """`feature_scales` [d]: correlated features with these singular values (a ResNet's
    features are correlated and spread over decades), else iid standard normal ones."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, c))
    mix = np.eye(d)
    if feature_scales is not None:
        q1, _ = np.linalg.qr(rng.normal(size=(d, d)))
        q2, _ = np.linalg.qr(rng.normal(size=(d, d)))
        mix = q1 @ np.diag(feature_scales) @ q2 + 0.5  # + 0.5: a common offset, as after ReLU

    def split(m):
        x = rng.normal(size=(m, d)) @ mix
        t = x @ w + 0.5 * rng.normal(size=(m, c))
        y = np.argmax(t + rng.normal(size=(m, c)), -1)
        return {"features": jnp.asarray(x, dtype), "label": jnp.asarray(y, jnp.int32),
                "teacher_logits": jnp.asarray(t, dtype)}

    train = split(n)
    labels = np.asarray(train["label"])
    score = rng.normal(size=n)
    u = policy.within_class_ranks(score, labels, c)
    counts = class_keep_counts(labels, keep, c)
    return bilevel.make_problem(train, jnp.asarray(u, dtype), counts, split(80), split(80),
                                num_classes=c, multiple=8)


def test_implicit_hypergradient_matches_finite_differences():
    with jax.enable_x64(True):
        prob = _problem(dtype=jnp.float64)
        s = bilevel.Settings(num_classes=3, kd_weight=0.5, temperature=2.0, l2=1e-2,
                             inner_max_iters=1000, inner_tol=1e-10, cg_max_iters=200,
                             cg_tol=1e-12)
        for phi in (jnp.array([0.3, -0.2]), jnp.array([1.5, 0.4])):
            g, info = bilevel.implicit_grad_at(phi, prob, s)
            fd = bilevel.finite_difference_grad(phi, prob, s, eps=1e-4)
            assert float(info["residual"]) < 1e-8
            rel = float(jnp.linalg.norm(g - fd) / jnp.linalg.norm(fd))
            assert rel < 0.02, (np.asarray(g), np.asarray(fd), rel)


def test_keep_probabilities_sum_exactly_to_counts_for_every_ab():
    prob = _problem(n=237)  # 237 rows: padded to 240, the padding must get pi = 0
    labels = prob.train["label"][:237]
    counts = np.asarray(prob.counts)[:3]
    s = bilevel.Settings(num_classes=3)
    for a, b in [(1, 1), (5, 1), (1, 5), (0.3, 0.3), (8, 8), (50, 0.5)]:
        phi = jnp.log(jnp.expm1(jnp.array([a, b], jnp.float32) - policy.EPS))
        pi_all = bilevel.keep_probabilities(phi, prob, s)
        np.testing.assert_array_equal(pi_all[237:], 0.0)
        pi = pi_all[:237]
        assert float(pi.max()) <= 1.0 + 1e-6 and float(pi.min()) >= 0.0
        sums = jax.ops.segment_sum(pi, labels, 3)
        np.testing.assert_allclose(sums, counts, rtol=1e-4)
        keep = policy.gumbel_top_k(pi, labels, counts, 3, jax.random.key(0))
        np.testing.assert_array_equal(np.bincount(np.asarray(labels)[keep], minlength=3),
                                      counts)


def test_beta_1_1_draw_is_random_class_balanced_selection():
    prob = _problem(n=60, c=2, keep=0.5)
    labels = np.asarray(prob.train["label"])[:60]
    phi = jnp.log(jnp.expm1(jnp.array([1.0, 1.0]) - policy.EPS))
    pi = bilevel.keep_probabilities(phi, prob, bilevel.Settings(num_classes=2))[:60]
    prob = prob.replace(counts=prob.counts[:2])
    np.testing.assert_allclose(pi, np.asarray(prob.counts)[labels] / np.bincount(labels)[labels],
                               rtol=1e-4)
    hits = np.zeros(60)
    draws = 600
    for s in range(draws):
        hits += policy.gumbel_top_k(pi, labels, prob.counts, 2, jax.random.key(s))
    # Every example is kept with probability m_c / n_c, as under uniform random selection:
    # binomial std at 600 draws is ~0.02, so 0.07 is > 3 sigma.
    want = np.asarray(prob.counts)[labels] / np.bincount(labels)[labels]
    assert np.max(np.abs(hits / draws - want)) < 0.07


def _run_steps(mesh, n=4, problem=None, l2=1e-2, lam=0.5, temperature=2.0, **settings):
    prob = _problem(n=237) if problem is None else problem  # padded rows, sharded 8 ways
    s = bilevel.Settings(num_classes=3, kd_weight=lam, temperature=temperature, l2=l2, **settings)
    tx = optax.adam(0.05)
    theta0 = head_lib.init_head(prob.train["features"].shape[1], 3,
                                prob.train["features"].dtype)
    state = sharding.replicate(bilevel.init_state(jnp.zeros(2), theta0, tx), mesh)
    prob = jax.device_put(prob, bilevel.problem_shardings(mesh))
    step = bilevel.make_outer_step(s, tx, mesh)
    hist = []
    for _ in range(n):
        state, m = step(state, prob)
        hist.append(jax.device_get(m))
    return state, hist, step


@pytest.mark.multidevice
def test_outer_step_compiles_once_and_8_devices_equal_1():
    assert jax.device_count() == 8
    s8, h8, step8 = _run_steps(sharding.make_mesh(8))
    s1, h1, _ = _run_steps(sharding.make_mesh(1))
    assert step8._cache_size() == 1
    np.testing.assert_allclose(s8.phi, s1.phi, rtol=1e-4, atol=1e-6)
    for a, b in zip(h8, h1):
        np.testing.assert_allclose(a["outer"], b["outer"], rtol=1e-5)
    assert all(np.isfinite(m["cg_residual"]) for m in h8)
    # The pool rows really are split over the 8 devices.
    prob8 = jax.device_put(_problem(n=237), bilevel.problem_shardings(sharding.make_mesh(8)))
    assert len(prob8.train["features"].sharding.device_set) == 8
    assert prob8.train["features"].addressable_shards[0].data.shape[0] == 240 // 8


def test_cg_warm_start_changes_iterations_not_the_policy():
    mesh = sharding.make_mesh(1)
    kw = dict(n=6, cg_tol=1e-6, cg_max_iters=500, preconditioner="none")
    sw, hw, _ = _run_steps(mesh, **kw)
    sc, hc, _ = _run_steps(mesh, **kw, cg_warm_start=False)
    np.testing.assert_allclose(sw.phi, sc.phi, rtol=1e-4, atol=1e-6)
    for w, c in zip(hw, hc):
        np.testing.assert_allclose(w["grad_norm"], c["grad_norm"], rtol=1e-3)
        assert w["cg_residual"] < 1e-5 and c["cg_residual"] < 1e-5
    # Step 1 starts from zeros either way; later steps start from the previous solution.
    assert hw[0]["cg_iters"] == hc[0]["cg_iters"]
    assert sum(m["cg_iters"] for m in hw[1:]) < sum(m["cg_iters"] for m in hc[1:])


def test_kronecker_preconditioner_inverts_the_head_hessian_when_its_factors_are_exact():
    # At theta = 0 every example's softmax is uniform, so every A_i is the same A and
    # H = Sx (x) A + l2 I holds exactly: M^-1 must then invert jax.hessian's H.
    with jax.enable_x64(True):
        prob = _problem(dtype=jnp.float64, feature_scales=np.logspace(-2, 1, 5))
        rng = np.random.default_rng(1)
        w = jnp.asarray(rng.uniform(0, 1, prob.u.shape[0]) * (prob.segment < 3))
        batch = {**prob.train, "weight": w}
        theta = head_lib.init_head(5, 3, jnp.float64)
        flat, unravel = jax.flatten_util.ravel_pytree(theta)
        h = jax.hessian(lambda f: head_lib.head_objective(
            unravel(f), batch, lam=0.5, temperature=2.0, l2=1e-2))(flat)
        apply = head_lib.kronecker_preconditioner(theta, batch, lam=0.5, temperature=2.0,
                                                  shift=1e-2)
        v = jnp.asarray(rng.normal(size=flat.size))
        got = jax.flatten_util.ravel_pytree(apply(unravel(h @ v)))[0]
        np.testing.assert_allclose(got, v, rtol=1e-9, atol=1e-9)
        assert np.linalg.cond(np.asarray(h)) > 1e3  # a system where it matters


def test_kronecker_whitening_round_trip_fallback_and_zero_shift(monkeypatch):
    prob = _problem(feature_scales=np.logspace(-2, 1, 5))
    batch = {**prob.train, "weight": (prob.segment < 3).astype(jnp.float32)}
    rng = np.random.default_rng(2)
    theta = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    f = head_lib.kronecker_factors(theta, batch, lam=0.5, temperature=2.0, shift=1e-2)
    back = head_lib.kronecker_unwhiten(f, head_lib.kronecker_whiten(f, theta), theta)
    for k in theta:
        np.testing.assert_allclose(back[k], theta[k], rtol=1e-4, atol=1e-5)
    assert int(f["fallback"]) == 0
    # l2 = damping = 0: A's zero eigenvalue must not make M singular.
    f0 = head_lib.kronecker_factors(theta, batch, lam=0.5, temperature=2.0, shift=0.0)
    assert float(jnp.min(f0["denom"])) > 0
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(
        head_lib.kronecker_inverse(f0, theta)))
    # A non-finite eigendecomposition: identity factors stand in, and it is reported.
    real_eigh = jax.lax.linalg.eigh

    def nan_eigh(a, **kw):
        v, w = real_eigh(a, **kw)
        return (v * jnp.nan, w) if a.shape[0] == 3 else (v, w)  # the [C, C] factor

    monkeypatch.setattr(jax.lax.linalg, "eigh", nan_eigh)
    fb = head_lib.kronecker_factors(theta, batch, lam=0.5, temperature=2.0, shift=1e-2)
    assert int(fb["fallback"]) == 1
    np.testing.assert_array_equal(fb["q"], np.eye(3))
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(fb))


def test_kronecker_preconditioning_changes_iterations_not_the_policy():
    # Correlated features spread over 2 decades and a small l2. In float64 and tight
    # tolerances, so both runs are converged and may only differ by rounding. (At 4 decades
    # and l2 = 1e-4, as on ResNet features, the unpreconditioned L-BFGS no longer reaches
    # 1e-9 within 3,000 iterations; the whitened one does in ~1,100.)
    with jax.enable_x64(True):
        prob = _problem(n=237, d=32, feature_scales=np.logspace(-1, 1, 32),
                        dtype=jnp.float64)
        mesh = sharding.make_mesh()
        kw = dict(n=4, problem=prob, l2=1e-3, lam=0.9, temperature=4.0, cg_tol=1e-9,
                  cg_max_iters=5000, inner_tol=1e-9, inner_max_iters=5000)
        sp, hp, _ = _run_steps(mesh, **kw)  # auto: Kronecker for the linear head
        sn, hn, _ = _run_steps(mesh, **kw, preconditioner="none")
    print("kronecker cg / inner iterations", [(int(m["cg_iters"]), int(m["inner_iters"]))
                                              for m in hp],
          "none", [(int(m["cg_iters"]), int(m["inner_iters"])) for m in hn])
    for p, n in zip(hp, hn):
        assert p["inner_grad_norm"] < 1e-8 and n["inner_grad_norm"] < 1e-8
        assert p["cg_residual"] < 1e-9 and n["cg_residual"] < 1e-9
        np.testing.assert_allclose(p["grad_norm"], n["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(sp.phi, sn.phi, rtol=1e-5)  # phi is float32
    assert 2 * sum(m["cg_iters"] for m in hp) < sum(m["cg_iters"] for m in hn)
    assert 2 * sum(m["inner_iters"] for m in hp) < sum(m["inner_iters"] for m in hn)


@pytest.mark.slow
def test_reinforce_and_grid_agree_with_implicit_direction():
    prob = _problem()
    s = bilevel.Settings(num_classes=3, kd_weight=0.5, temperature=2.0, l2=1e-2)
    phis, objs = bilevel.grid_objectives(prob, s, [0.5, 1.0, 3.0])
    assert phis.shape == (9, 2) and np.all(np.isfinite(objs))
    g = bilevel.reinforce_grad(jnp.zeros(2), prob, s, jax.random.key(0), num_samples=8)
    assert g.shape == (2,) and np.all(np.isfinite(g))
