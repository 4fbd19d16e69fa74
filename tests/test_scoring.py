"""Scores against independent references: influence vs leave-one-out retraining, GraNd vs a
Python loop, forgetting vs a hand trace, and models that are not from this package."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kdprune_jax import scoring

# ----------------------------------------------------------------- influence vs leave-one-out
N, D, C, MU = 300, 8, 3, 1e-2


def _logreg_problem():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(D, C))
    x = rng.normal(size=(N + 200, D))
    y = np.argmax(x @ w_true + 1.5 * rng.normal(size=(N + 200, C)), -1)
    return (x[:N], y[:N]), (x[N:], y[N:])


def _per_example(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1)[:, 0]


def _train_loss(params, batch):
    # Mean over a FIXED N with per-example weights (removing i = weight 0, still / N), plus
    # the L2 regularizer: exactly the objective whose Hessian the influence uses.
    w = batch.get("weight", jnp.ones(batch["y"].shape[0]))
    reg = 0.5 * MU * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
    return jnp.sum(w * _per_example(params, batch)) / N + reg


def _val_loss(params, batch):
    return jnp.mean(_per_example(params, batch))


def _newton(params, batch, iters=30):
    flat, unravel = ravel_pytree(params)
    f = lambda v: _train_loss(unravel(v), batch)  # noqa: E731
    for _ in range(iters):
        flat = flat - jnp.linalg.solve(jax.hessian(f)(flat), jax.grad(f)(flat))
    return unravel(flat)


@pytest.fixture(scope="module")
def loo_problem():
    """The logistic-regression problem in float64, its optimum and the exact change of the
    validation loss when each of 60 training examples is removed and the model retrained
    (Newton to convergence): computed once for every solver."""
    with jax.enable_x64(True):
        (xt, yt), (xv, yv) = _logreg_problem()
        train = {"x": jnp.asarray(xt), "y": jnp.asarray(yt)}
        val = {"x": jnp.asarray(xv), "y": jnp.asarray(yv)}
        theta = _newton({"w": jnp.zeros((D, C)), "b": jnp.zeros(C)}, train)
        base = float(_val_loss(theta, val))
        removed = np.random.default_rng(1).choice(N, 60, replace=False)
        retrain = jax.jit(lambda w: _newton(theta, {**train, "weight": w}, iters=8))
        actual = []
        for i in removed:
            wts = np.ones(N)
            wts[i] = 0.0
            actual.append(float(_val_loss(retrain(jnp.asarray(wts)), val)) - base)
        return train, val, theta, removed, np.asarray(actual)


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa"])
def test_influence_predicts_leave_one_out_retraining(loo_problem, solver):
    train, val, theta, removed, actual = loo_problem
    with jax.enable_x64(True):
        # The L2 term is in _train_loss already: damping 0 adds nothing on top. LiSSA runs
        # with its default lissa_scale="auto" (power iteration); s_test raises if any of
        # the three did not converge.
        s, info = scoring.s_test(_train_loss, _val_loss, theta, train, val, solver=solver,
                                 damping=0.0, max_iters=5000 if solver == "lissa" else 200,
                                 tol=1e-10)
        infl = np.asarray(scoring.influence_from_s_test(_per_example, theta, train, s))
    assert infl.dtype == np.float64
    predicted = infl[removed] / N
    r = np.corrcoef(predicted, actual)[0, 1]
    assert r >= 0.99, r
    # Sign convention: positive influence = removal raises the validation loss.
    assert np.mean(np.sign(predicted) == np.sign(actual)) > 0.9


def test_influence_jvp_equals_per_example_gradient_dots():
    (xt, yt), _ = _logreg_problem()
    batch = {"x": jnp.asarray(xt[:16], jnp.float32), "y": jnp.asarray(yt[:16])}
    params = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(D, C)), jnp.float32),
              "b": jnp.ones(C)}
    s = jax.tree.map(lambda p: jnp.full_like(p, 0.3) + 0.01 * p, params)
    got = scoring.influence_from_s_test(_per_example, params, batch, s)
    for i in range(16):
        ex = jax.tree.map(lambda a: a[i : i + 1], batch)
        g = jax.grad(lambda p: _per_example(p, ex)[0])(params)
        want = sum(jnp.vdot(g[k], s[k]) for k in g)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_self_influence_exact_cg_lissa_agree_with_dense():
    (xt, yt), _ = _logreg_problem()
    train = {"x": jnp.asarray(xt, jnp.float32), "y": jnp.asarray(yt)}
    params = {"w": 0.1 * jnp.ones((D, C)), "b": jnp.zeros(C)}
    batch = jax.tree.map(lambda a: a[:10], train)
    got = {solver: scoring.self_influence(_per_example, _train_loss, params, train, batch,
                                          solver=solver, damping=0.01, tol=1e-6,
                                          max_iters=200 if solver == "cg" else 3000)
           for solver in ("exact", "cg", "lissa")}
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda f: _train_loss(unravel(f), train))(flat) + 0.01 * jnp.eye(flat.size)
    for solver, (scores, info) in got.items():
        assert float(info["residual"]) < 1e-3, solver
        for i in range(10):
            ex = jax.tree.map(lambda a: a[i:i + 1], batch)
            g = ravel_pytree(jax.grad(lambda p: _per_example(p, ex)[0])(params))[0]
            want = float(g @ np.linalg.solve(np.asarray(h), np.asarray(g)))
            np.testing.assert_allclose(scores[i], want, rtol=1e-3, err_msg=solver)


# ----------------------------------------------------------------- GraNd
def _tiny_cnn():
    k = jax.random.split(jax.random.key(0), 2)
    params = {"k": 0.3 * jax.random.normal(k[0], (3, 3, 1, 4)),
              "w": 0.3 * jax.random.normal(k[1], (4, 5)), "b": jnp.zeros(5)}

    def apply_fn(p, x):  # a model that is NOT from this package
        y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jax.nn.relu(y), axis=(1, 2)) @ p["w"] + p["b"]

    return params, apply_fn


def test_grand_equals_python_loop_and_chunking_is_invisible():
    params, apply_fn = _tiny_cnn()
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(12, 6, 6, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 5, 12))}

    def loss(p, b):
        logp = jax.nn.log_softmax(apply_fn(p, b["image"]))
        return -jnp.take_along_axis(logp, b["label"][:, None], 1)[:, 0]

    got = scoring.grand_scores(loss, params, batch, chunk_size=4)
    got_one_chunk = scoring.grand_scores(loss, params, batch, chunk_size=12)
    for i in range(12):
        g = jax.grad(lambda p: loss(p, jax.tree.map(lambda a: a[i:i + 1], batch))[0])(params)
        want = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))))
        np.testing.assert_allclose(got[i], want, rtol=1e-5)
    np.testing.assert_allclose(got, got_one_chunk, rtol=1e-6)


def test_grand_last_layer_closed_form_equals_autodiff():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 7))
    head = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.ones(3)}

    def loss(p, b):
        logp = jax.nn.log_softmax(b["h"] @ p["w"] + p["b"])
        return -jnp.take_along_axis(logp, b["y"][:, None], 1)[:, 0]

    want = scoring.grand_scores(loss, head, {"h": h, "y": y})
    got = scoring.grand_last_layer_from_features(h, h @ head["w"] + head["b"], y)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------- forgetting
def test_forgetting_counts_equal_hand_trace():
    # Example 0: C I C I C   -> 2 forgets; example 1: I I C C C -> 0; example 2: never
    # correct -> most forgotten (max + 1 = 3); example 3: C C I C I -> 2; example 4 C C C C C.
    seq = np.array([
        [1, 0, 0, 1, 1],
        [0, 0, 0, 1, 1],
        [1, 1, 0, 0, 1],
        [0, 1, 0, 1, 1],
        [1, 1, 0, 0, 1],
    ], bool)
    t = scoring.init_tracker(5)
    update = jax.jit(scoring.update_tracker)
    order = np.array([3, 1, 4, 0, 2])  # presentation order inside a batch is irrelevant
    for row in seq:
        t = update(t, jnp.asarray(order), jnp.asarray(row[order]))
    np.testing.assert_array_equal(t.forgets, [2, 0, 0, 2, 0])
    np.testing.assert_array_equal(scoring.forgetting_scores(t), [2, 0, 3, 2, 0])
    # Masked (padding) rows change nothing.
    t2 = update(t, jnp.asarray([0, 1]), jnp.asarray([False, False]), jnp.asarray([0.0, 0.0]))
    np.testing.assert_array_equal(t2.forgets, t.forgets)
    np.testing.assert_array_equal(t2.seen, t.seen)


# ----------------------------------------------------------------- teacher-based scores
def test_logit_scores_on_known_values():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    y = jnp.array([0, 2])
    np.testing.assert_allclose(scoring.el2n_from_logits(logits, y),
                               [np.sqrt(0.3**2 + 0.2**2 + 0.1**2),
                                np.sqrt(2 * (1 / 3) ** 2 + (2 / 3) ** 2)], rtol=1e-5)
    np.testing.assert_allclose(scoring.entropy_from_logits(logits),
                               [-(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)),
                                np.log(3)], rtol=1e-5)
    np.testing.assert_allclose(scoring.margin_from_logits(logits), [0.5, 0.0], atol=1e-6)


def test_apply_fn_scores_work_with_a_foreign_model():
    params, apply_fn = _tiny_cnn()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6, 6, 1)), jnp.float32)
    y = jnp.arange(6) % 5
    logits = apply_fn(params, x)
    np.testing.assert_allclose(scoring.el2n_scores(apply_fn, params, x, y),
                               scoring.el2n_from_logits(logits, y), rtol=1e-6)
    np.testing.assert_allclose(scoring.margin_scores(apply_fn, params, x),
                               scoring.margin_from_logits(logits), rtol=1e-6)
    np.testing.assert_allclose(scoring.entropy_scores(apply_fn, params, x),
                               scoring.entropy_from_logits(logits), rtol=1e-6)


def test_moderate_is_distance_to_class_median():
    f = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0]])
    y = np.array([0, 0, 0, 1, 1])
    np.testing.assert_allclose(scoring.moderate_scores(f, y, 2), [1, 0, 1, 1, 1], atol=1e-6)


@pytest.mark.parametrize("method,end", [("el2n", "highest"), ("margin", "lowest"),
                                        ("moderate", "middle"), ("influence", "highest"),
                                        ("forgetting", "highest"), ("entropy", "highest")])
def test_keep_directions_follow_method_md(method, end):
    assert scoring.KEEP[method] == end



def test_grand_on_a_resnet_chunked_equals_whole_batch_equals_loop():
    from flax import nnx

    from kdprune_jax import losses, models

    model = models.create_model("cifar_resnet8", num_classes=10, seed=0, width=0.5)
    g, p, bs = nnx.split(model, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(6, 16, 16, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 6))}

    def loss(params, b):
        logits = nnx.merge(g, params, bs)(b["image"], train=False)
        return losses.cross_entropy(logits, b["label"])

    whole = scoring.grand_scores(loss, p, batch, chunk_size=None)
    chunked = scoring.grand_scores(loss, p, batch, chunk_size=4)  # chunks of 4 and 2
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    for i in (0, 5):
        gi = jax.grad(lambda q: loss(q, jax.tree.map(lambda a: a[i:i + 1], batch))[0])(p)
        want = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(gi))))
        np.testing.assert_allclose(whole[i], want, rtol=1e-4)
