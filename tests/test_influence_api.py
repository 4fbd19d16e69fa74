"""The importable scoring library as a research user meets it: wrong loss signatures are
refused, solvers never fail silently, damping is explicit, equal settings compile once,
dtypes follow the inputs, the diagonal-Fisher approximation equals its brute-force sum, and
the README's worked example runs and finds flipped labels."""

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kdprune_jax import autodiff, scoring
from kdprune_jax.scoring import head as head_lib
from kdprune_jax.scoring import influence as influence_lib

N, D, C, MU = 80, 5, 2, 1e-2
_rng = np.random.default_rng(0)
_X = _rng.normal(size=(N + 40, D))
_Y = (_X[:, 0] + 0.5 * _rng.normal(size=N + 40) > 0).astype(np.int32)


def _batches(dtype=np.float32):
    return ({"x": jnp.asarray(_X[:N], dtype), "y": jnp.asarray(_Y[:N])},
            {"x": jnp.asarray(_X[N:], dtype), "y": jnp.asarray(_Y[N:])})


def _params(dtype=jnp.float32):
    return {"w": jnp.asarray(0.1 * _rng.normal(size=(D, C)), dtype), "b": jnp.zeros(C, dtype)}


def example_losses(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1)[:, 0]


def train_loss(params, batch):
    reg = 0.5 * MU * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))
    return jnp.mean(example_losses(params, batch)) + reg


def val_loss(params, batch):
    return jnp.mean(example_losses(params, batch))


def logits_not_losses(params, batch):  # the [B, C] mistake
    return batch["x"] @ params["w"] + params["b"]


# ----------------------------------------------------------------- trap 6: signatures
def test_wrong_loss_signatures_are_refused_with_the_expected_signature():
    params = _params()
    train, val = _batches()
    with pytest.raises(scoring.LossSignatureError,
                       match=r"example_losses must be \(params, batch\) -> \[B\].*\(80\).*"
                             r"shape \(\).*mean loss"):
        scoring.influence_from_s_test(train_loss, params, train, params)
    with pytest.raises(scoring.LossSignatureError, match=r"shape \(80, 2\).*logits"):
        scoring.influence_from_s_test(logits_not_losses, params, train, params)
    with pytest.raises(scoring.LossSignatureError,
                       match=r"val_loss must be \(params, batch\) -> scalar.*shape \(40,\)"):
        scoring.s_test(train_loss, example_losses, params, train, val, damping=0.0)
    with pytest.raises(scoring.LossSignatureError, match=r"train_loss must be .* -> scalar"):
        scoring.s_test(example_losses, val_loss, params, train, val, damping=0.0)
    with pytest.raises(scoring.LossSignatureError, match=r"example_losses must be"):
        scoring.grand_scores(train_loss, params, train)
    with pytest.raises(scoring.LossSignatureError, match=r"example_losses must be"):
        scoring.self_influence(logits_not_losses, train_loss, params, train, train,
                               damping=0.0)


# ----------------------------------------------------------------- traps 2, 3, 4: solvers
@pytest.mark.parametrize("bad", ["lissa ", "foo", "EXACT", "Cg"])
def test_unknown_solver_names_are_refused_by_every_solving_function(bad):
    params = _params()
    train, val = _batches()
    allowed = r"allowed: exact, cg, lissa, diag_fisher"
    with pytest.raises(ValueError, match=allowed):
        scoring.s_test(train_loss, val_loss, params, train, val, damping=0.0, solver=bad)
    with pytest.raises(ValueError, match=allowed):
        scoring.self_influence(example_losses, train_loss, params, train, train, damping=0.0,
                               solver=bad)


def test_capped_solves_raise_naming_the_functions_own_arguments():
    params = _params()
    train, val = _batches()
    with pytest.raises(scoring.SolverError,
                       match=r"^s_test: cg inverse-HVP did not converge.*raise max_iters= "
                             r"\(now 1\) or damping= \(now 0.0\)"):
        scoring.s_test(train_loss, val_loss, params, train, val, damping=0.0, max_iters=1)
    with pytest.raises(scoring.SolverError, match=r"^self_influence: cg .*max_iters= \(now 1\)"):
        scoring.self_influence(example_losses, train_loss, params, train,
                               jax.tree.map(lambda a: a[:4], train), damping=0.0,
                               solver="cg", max_iters=1)
    # LiSSA stopped short: the advice names its scale as well as its iterations.
    with pytest.raises(scoring.SolverError,
                       match=r"lissa .*raise max_iters= \(now 3\).*lissa_scale= \(now 'auto'\)"):
        scoring.s_test(train_loss, val_loss, params, train, val, damping=0.0, solver="lissa",
                       max_iters=3)
    # check=False: the info is returned and tells the same story.
    _, info = scoring.s_test(train_loss, val_loss, params, train, val, damping=0.0,
                             max_iters=1, check=False)
    assert int(info["iterations"]) == 1 and float(info["residual"]) > 1e-2


def test_under_the_callers_jit_the_info_comes_back_unchecked():
    params = _params()
    train, val = _batches()

    @jax.jit
    def capped(p):
        return scoring.s_test(train_loss, val_loss, p, train, val, damping=0.0, max_iters=1)

    _, info = capped(params)  # no raise inside a trace: the residual is a tracer there
    with pytest.raises(scoring.SolverError, match="did not converge"):
        scoring.check_solve(info, solver="cg", tol=1e-6)


def test_lissa_defaults_converge_or_raise_never_stop_short():
    params = _params()
    train, val = _batches()
    exact, _ = scoring.s_test(train_loss, val_loss, params, train, val, damping=0.0,
                              solver="exact")
    # Defaults: lissa_scale="auto" (power iteration) and LiSSA's own 1000 iterations.
    lissa, info = scoring.s_test(train_loss, val_loss, params, train, val, damping=0.0,
                                 solver="lissa")
    assert int(info["iterations"]) < 1000
    np.testing.assert_allclose(ravel_pytree(lissa)[0], ravel_pytree(exact)[0], rtol=1e-3,
                               atol=1e-5)


def test_self_influence_returns_its_solver_info():
    params = _params()
    train, _ = _batches()
    scores, info = scoring.self_influence(example_losses, train_loss, params, train, train,
                                          damping=0.0, solver="cg")
    assert scores.shape == (N,)
    assert set(info) >= {"iterations", "residual", "diverged"}
    assert float(info["residual"]) < 1e-3


# ----------------------------------------------------------------- trap 5: damping
def test_damping_has_no_silent_default():
    params = _params()
    train, val = _batches()
    with pytest.raises(TypeError, match="damping"):
        scoring.s_test(train_loss, val_loss, params, train, val)
    with pytest.raises(TypeError, match="damping"):
        scoring.self_influence(example_losses, train_loss, params, train, train)
    with pytest.raises(TypeError, match="damping"):
        autodiff.inverse_hvp(train_loss, params, train, params)


def test_damping_is_an_l2_term_on_top_of_the_loss():
    """damping=lam on a loss with L2 mu equals damping 0 on the loss with L2 mu + lam."""
    params = _params()
    train, val = _batches()

    def loss_with(mu):
        def f(p, b):
            return (jnp.mean(example_losses(p, b))
                    + 0.5 * mu * sum(jnp.sum(q ** 2) for q in jax.tree.leaves(p)))
        return f

    a, _ = scoring.s_test(loss_with(MU), val_loss, params, train, val, damping=0.05,
                          solver="exact")
    b, _ = scoring.s_test(loss_with(MU + 0.05), val_loss, params, train, val, damping=0.0,
                          solver="exact")
    np.testing.assert_allclose(ravel_pytree(a)[0], ravel_pytree(b)[0], rtol=1e-5)


# ----------------------------------------------------------------- trap 7: dtypes
def test_dtypes_follow_the_inputs_in_float32_and_float64():
    def run(dtype):
        params = _params(dtype)
        train, val = _batches(dtype)
        s, info = scoring.s_test(train_loss, val_loss, params, train, val, damping=0.0)
        out = {
            "s_test": s["w"],
            "residual": info["residual"],
            "influence": scoring.influence_from_s_test(example_losses, params, train, s),
            "self_influence": scoring.self_influence(example_losses, train_loss, params,
                                                     train, train, damping=0.0)[0],
            "grand": scoring.grand_scores(example_losses, params, train),
            "diag_fisher": scoring.diag_fisher(example_losses, params, train)["w"],
            "el2n": scoring.el2n_scores(logits_fn, params, train["x"], train["y"]),
        }
        return {k: v.dtype for k, v in out.items()}

    assert set(run(jnp.float32).values()) == {jnp.dtype("float32")}
    with jax.enable_x64(True):
        assert set(run(jnp.float64).values()) == {jnp.dtype("float64")}


def logits_fn(params, x):
    return x @ params["w"] + params["b"]


# ----------------------------------------------------------------- trap 8: compile once
def test_equal_settings_compile_once():
    train, val = _batches()
    head_batch = {"features": train["x"], "label": train["y"],
                  "teacher_logits": jnp.zeros((N, C))}
    head_val = {"features": val["x"], "label": val["y"], "teacher_logits": jnp.zeros((40, C))}
    jit_fn = influence_lib._s_test_jit
    jit_fn.clear_cache()
    theta = head_lib.init_head(D, C)
    for seed in range(3):  # new data, re-created (equal) settings objects each time
        rng = np.random.default_rng(seed)
        hb = {**head_batch, "features": jnp.asarray(rng.normal(size=(N, D)), jnp.float32)}
        obj = functools.partial(head_lib.head_objective, lam=0.0, temperature=1.0, l2=MU)
        vobj = functools.partial(head_lib.head_objective, lam=0.0, temperature=1.0, l2=0.0)
        pre = head_lib.KroneckerPreconditioner(lam=0.0, temperature=1.0, shift=MU)
        scoring.s_test(obj, vobj, theta, hb, head_val, damping=0.0, preconditioner=pre)
    assert jit_fn._cache_size() == 1
    # jax.tree_util.Partial binds arrays as traced leaves: new values, same compilation.
    jit_fn.clear_cache()
    params = _params()
    for scale in (1.0, 2.0, 3.0):
        weighted = jax.tree_util.Partial(_weighted_loss, jnp.full((N,), scale))
        scoring.s_test(weighted, val_loss, params, train, val, damping=0.0)
    assert jit_fn._cache_size() == 1
    # A fresh lambda per call is a new function: a new compilation each time (documented).
    jit_fn.clear_cache()
    for _ in range(2):
        scoring.s_test(lambda p, b: train_loss(p, b), val_loss, params, train, val,
                       damping=0.0)
    assert jit_fn._cache_size() == 2


def _weighted_loss(w, params, batch):
    return jnp.sum(w * example_losses(params, batch)) / jnp.sum(w) + 0.5 * MU * jnp.sum(
        params["w"] ** 2)


# ----------------------------------------------------------------- diagonal Fisher
def test_diag_fisher_influence_equals_the_brute_force_sum_over_parameters():
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        train, val = _batches(np.float64)
        damping = 1e-3
        s, info = scoring.s_test(train_loss, val_loss, params, train, val, damping=damping,
                                 solver="diag_fisher", example_losses=example_losses,
                                 chunk_size=7)  # chunks that do not divide N
        got = np.asarray(scoring.influence_from_s_test(example_losses, params, train, s))
        self_got = np.asarray(scoring.self_influence(
            example_losses, None, params, train, train, damping=damping,
            solver="diag_fisher")[0])
        # Brute force: per-example gradients one by one, F_jj as a Python mean.
        flat_p, unravel = ravel_pytree(params)
        g = np.stack([np.asarray(jax.grad(lambda f: example_losses(
            unravel(f), jax.tree.map(lambda a: a[i:i + 1], train))[0])(flat_p))
            for i in range(N)])
        fisher = np.mean(g ** 2, axis=0)
        g_val = np.asarray(jax.grad(lambda f: val_loss(unravel(f), val))(flat_p))
        want = np.array([sum(g[i, j] * g_val[j] / (fisher[j] + damping)
                             for j in range(flat_p.size)) for i in range(N)])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(self_got, np.sum(g * g / (fisher + damping), 1),
                                   rtol=1e-10)
        np.testing.assert_allclose(ravel_pytree(scoring.diag_fisher(
            example_losses, params, train))[0], fisher, rtol=1e-10)
        # How close the approximation is to exact influence on this problem: reported, not
        # asserted (no threshold tuned to pass).
        exact_s, _ = scoring.s_test(train_loss, val_loss, params, train, val, damping=damping,
                                    solver="exact")
        exact = np.asarray(scoring.influence_from_s_test(example_losses, params, train,
                                                         exact_s))
        r = float(np.corrcoef(got, exact)[0, 1])
        print(f"diag_fisher vs exact influence, Pearson: {r:.3f}")
        assert np.isfinite(r)


def test_diag_fisher_needs_the_per_example_losses():
    params = _params()
    train, val = _batches()
    with pytest.raises(ValueError, match=r"solver='diag_fisher'\) needs example_losses="):
        scoring.s_test(train_loss, val_loss, params, train, val, damping=0.0,
                       solver="diag_fisher")


# ----------------------------------------------------------------- the README example
def _readme_example() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- scoring-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "README: the worked scoring example (marked <!-- scoring-example -->) is gone"
    return m.group(1)


def test_readme_worked_example_runs_and_finds_flipped_labels():
    code = _readme_example()
    assert len(code.strip().splitlines()) < 40
    ns = {}
    exec(compile(code, "README.md example", "exec"), ns)  # noqa: S102
    infl = {k: np.asarray(v) for k, v in ns["influence"].items()}
    for solver in ("cg", "lissa"):
        assert np.corrcoef(infl[solver], infl["exact"])[0, 1] > 0.999, solver
    print("diag_fisher vs exact (README example), Pearson: "
          f"{np.corrcoef(infl['diag_fisher'], infl['exact'])[0, 1]:.3f}")
    # 20 of 200 labels flipped: a random top-20 holds 2 of them on average.
    assert ns["found"] >= 6, ns["found"]
    assert ns["grand"].shape == ns["el2n"].shape == (200,)
