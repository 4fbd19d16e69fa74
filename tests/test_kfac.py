"""K-FAC / EK-FAC (`kdprune_jax.scoring.kfac`) against brute force.

The references are written independently of the library: a pure-jnp copy of each model
whose weights are the [d_A, d_S] matrices [kernel; bias] (convolutions by explicit
im2col slicing, not `conv_general_dilated_patches`), per-example activations from its
forward pass and per-example pre-activation gradients from per-example autodiff, the
exact Gauss-Newton matrix from per-example Jacobians. The labels of the true Fisher are
drawn by the rule the library documents: row r uses ``jax.random.fold_in(key, r)``.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdprune_jax import autodiff, losses, scoring, sharding
from kdprune_jax.scoring import kfac


# ----------------------------------------------------------------------------- models
class MLP(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.fc1 = nnx.Linear(5, 4, rngs=rngs, param_dtype=dtype)
        self.fc2 = nnx.Linear(4, 3, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


class CNN(nnx.Module):
    """conv (SAME, bias) - BatchNorm (excluded) - tanh - conv (stride 2, VALID, no bias) -
    tanh - flatten - linear."""

    def __init__(self, rngs, dtype=jnp.float32):
        self.c1 = nnx.Conv(2, 3, (3, 3), padding="SAME", rngs=rngs, param_dtype=dtype)
        self.bn = nnx.BatchNorm(3, rngs=rngs, param_dtype=dtype)
        self.c2 = nnx.Conv(3, 4, (3, 3), strides=2, padding="VALID", use_bias=False,
                           rngs=rngs, param_dtype=dtype)
        self.fc = nnx.Linear(4 * 2 * 2, 3, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        h = jnp.tanh(self.bn(self.c1(x), use_running_average=True))
        h = jnp.tanh(self.c2(h))
        return self.fc(h.reshape(h.shape[0], -1))


class OnlyNorm(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(4, rngs=rngs)
        self.w = nnx.Param(jnp.ones((4, 3)))

    def __call__(self, x):
        return self.ln(x) @ self.w[...]


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


# Module-level logits functions (bound by functools.partial: compared by value, so one
# compile per shape).
def _logits(graphdef, rest, params, batch):
    return nnx.merge(graphdef, params, rest)(batch["x"])


def _setup(kind, n=13, dtype=jnp.float64, seed=0):
    import functools

    model = (MLP if kind == "mlp" else CNN)(nnx.Rngs(seed), dtype)
    if kind == "cnn":  # non-trivial running statistics: BatchNorm is not the identity
        model.bn.mean[...] = jnp.asarray([0.1, -0.2, 0.3], model.bn.mean[...].dtype)
        model.bn.var[...] = jnp.asarray([0.5, 1.5, 2.0], model.bn.var[...].dtype)
        model.bn.scale[...] = jnp.asarray([1.2, 0.8, 1.1], dtype)
    graphdef, params, rest = _split(model)
    shape = (n, 5) if kind == "mlp" else (n, 6, 6, 2)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed + 1), 4)
    train = {"x": jax.random.normal(k1, shape, dtype), "label": jax.random.randint(k2, (n,), 0, 3)}
    val = {"x": jax.random.normal(k3, (7,) + shape[1:], dtype),
           "label": jax.random.randint(k4, (7,), 0, 3)}
    return model, functools.partial(_logits, graphdef, rest), params, train, val


# ----------------------------------------------------------------------------- reference
def _wbar(kernel, bias):
    """[kernel; bias] in the [d_A, d_S] layout: conv kernels [kh, kw, cin, cout] in patch
    order (cin, kh, kw)."""
    k = np.asarray(kernel)
    if k.ndim == 4:
        k = k.transpose(2, 0, 1, 3)
    k = k.reshape(-1, k.shape[-1])
    return jnp.asarray(k if bias is None else np.concatenate([k, np.asarray(bias)[None]]))


def _im2col(x, k, stride, pad):
    """x [B, H, W, C] -> patches [B, T, C*k*k] in (C, kh, kw) order, by slicing."""
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (x.shape[1] - k) // stride + 1
    wo = (x.shape[2] - k) // stride + 1
    cols = []
    for i in range(ho):
        for j in range(wo):
            p = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            cols.append(p.transpose(0, 3, 1, 2).reshape(x.shape[0], -1))
    return jnp.stack(cols, axis=1), (ho, wo)


def _homog(a):
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def _reference(kind, model):
    """(weights [W_l], forward(ws, x, eps) -> (logits, [a_bar_l [B, T, d_A]]),
    bias flags). eps_l [B, T, d_S] is added to layer l's pre-activation."""
    if kind == "mlp":
        ws = [_wbar(model.fc1.kernel[...], model.fc1.bias[...]),
              _wbar(model.fc2.kernel[...], model.fc2.bias[...])]

        def fwd(ws, x, eps):
            a1 = _homog(x)[:, None]
            s1 = a1 @ ws[0] + eps[0]
            a2 = _homog(jnp.tanh(s1))
            s2 = a2 @ ws[1] + eps[1]
            return s2[:, 0], [a1, a2]

        return ws, fwd, [(1, 4), (1, 3)]
    bn = model.bn
    ws = [_wbar(model.c1.kernel[...], model.c1.bias[...]), _wbar(model.c2.kernel[...], None),
          _wbar(model.fc.kernel[...], model.fc.bias[...])]

    def fwd(ws, x, eps):
        p1, (h1, w1) = _im2col(x, 3, 1, 1)
        a1 = _homog(p1)
        s1 = (a1 @ ws[0] + eps[0]).reshape(x.shape[0], h1, w1, -1)
        h = bn(s1, use_running_average=True)  # flax's own inference BatchNorm (excluded)
        a2, (h2, w2) = _im2col(jnp.tanh(h), 3, 2, 0)
        s2 = (a2 @ ws[1] + eps[1]).reshape(x.shape[0], h2, w2, -1)
        a3 = _homog(jnp.tanh(s2).reshape(x.shape[0], -1))[:, None]
        s3 = a3 @ ws[2] + eps[2]
        return s3[:, 0], [a1, a2, a3]

    return ws, fwd, [(36, 3), (4, 4), (1, 3)]


def _ce(z, y):
    return -jax.nn.log_softmax(z)[y]


def _per_example(fwd, ws, x, labels, shapes):
    """Per example: a_bar_l [T, d_A] and g_l [T, d_S] = d loss_i / d pre-activation."""
    def one(xi, yi):
        eps = [jnp.zeros(s, xi.dtype) for s in shapes]

        def loss(e):
            z, acts = fwd(ws, xi[None], [ei[None] for ei in e])
            return _ce(z[0], yi), acts

        g, acts = jax.grad(loss, has_aux=True)(eps)
        return [a[0] for a in acts], g

    return jax.vmap(one)(x, labels)


def _sampled_labels(logits, key):
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, logits)


def _flat(ws):
    return jnp.concatenate([w.reshape(-1) for w in ws])


def _unflat(theta, ws):
    out, i = [], 0
    for w in ws:
        out.append(theta[i:i + w.size].reshape(w.shape))
        i += w.size
    return out


def _exact_gn(fwd, ws, x, shapes):
    """mean_i J_i^T (diag p_i - p_i p_i^T) J_i over the flattened [d_A, d_S] weights."""
    def z_of(theta, xi):
        eps = [jnp.zeros((1,) + s, xi.dtype) for s in shapes]
        return fwd(_unflat(theta, ws), xi[None], eps)[0][0]

    theta = _flat(ws)
    jac = jax.vmap(lambda xi: jax.jacobian(z_of)(theta, xi))(x)  # [N, C, P]
    p = jax.nn.softmax(jax.vmap(lambda xi: z_of(theta, xi))(x))
    h = jax.vmap(lambda pi: jnp.diag(pi) - jnp.outer(pi, pi))(p)
    return jnp.einsum("ncp,ncd,ndq->pq", jac, h, jac) / x.shape[0]


def _grads(fwd, ws, batch, shapes):
    """Per-example gradients [N, P] of `batch`'s losses (observed labels)."""
    def li(theta, xi, yi):
        eps = [jnp.zeros((1,) + s, xi.dtype) for s in shapes]
        return _ce(fwd(_unflat(theta, ws), xi[None], eps)[0][0], yi)

    theta = _flat(ws)
    return jax.vmap(jax.grad(li), in_axes=(None, 0, 0))(theta, batch["x"], batch["label"])


def _blocks(ws):
    i, out = 0, []
    for w in ws:
        out.append(slice(i, i + w.size))
        i += w.size
    return out


# ----------------------------------------------------------------------------- tests
N, CHUNK, KEY = 40, 16, 7  # 40 = 16 + 16 + 8 rows: the last chunk is padded


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def fitted(request):
    """One true-Fisher fit (and its brute-force reference) per model, shared by the tests
    that check it: a fit compiles two lax.scan programs."""
    kind = request.param
    with jax.enable_x64(True):
        model, logits_fn, params, train, val = _setup(kind, n=N)
        factors, info = kfac.fit_factors(logits_fn, params, train, layers=kfac.find_layers(model),
                                         key=jax.random.key(KEY), chunk_size=CHUNK, log=None)
        ws, fwd, shapes = _reference(kind, model)
        z = fwd(ws, train["x"], [jnp.zeros((N,) + s, jnp.float64) for s in shapes])[0]
        labels = _sampled_labels(z, jax.random.key(KEY))
        acts, gs = jax.jit(lambda ws, x, y: _per_example(fwd, ws, x, y, shapes))(
            ws, train["x"], labels)
    return dict(kind=kind, model=model, logits_fn=logits_fn, params=params, train=train,
                val=val, factors=factors, info=info, ws=ws, fwd=fwd, shapes=shapes, z=z,
                acts=acts, gs=gs)


def test_factors_equal_brute_force_expectations(fitted):
    f = fitted
    with jax.enable_x64(True):
        if f["kind"] == "cnn":
            assert f["info"]["excluded"] == ["bn/bias", "bn/scale"]
            assert f["info"]["layers"] == ["c1", "c2", "fc"]
        np.testing.assert_allclose(f["z"], f["logits_fn"](f["params"], f["train"]), rtol=0,
                                   atol=1e-12)
        for lf, a, g in zip(f["factors"].layers, f["acts"], f["gs"]):
            t = a.shape[1]
            a_ref = jnp.einsum("nta,ntb->ab", a, a) / N
            s_ref = jnp.einsum("nts,ntr->sr", g, g) / (N * t)
            np.testing.assert_allclose(lf.a, a_ref, rtol=0, atol=1e-10)
            np.testing.assert_allclose(lf.s, s_ref, rtol=0, atol=1e-10)
            gi = jnp.einsum("nta,nts->nas", a, g)  # per-example [d_A, d_S] gradients
            lam_ref = jnp.mean(jnp.square(lf.qa.T @ gi @ lf.qs), axis=0)
            np.testing.assert_allclose(lf.lam, lam_ref, rtol=0, atol=1e-10)
            assert float(jnp.max(jnp.abs(lf.a))) > 1e-3 and float(jnp.max(lf.lam)) > 1e-6


def test_linear_squared_error_expected_fisher_is_exact():
    # A linear layer with squared error: H = E[a a^T] (x) I exactly, and the expected
    # Fisher's S is I, so K-FAC and EK-FAC must give exact-Hessian influence.
    import functools

    with jax.enable_x64(True):
        layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        graphdef, params, rest = _split(layer)
        logits_fn = functools.partial(_logits, graphdef, rest)
        ks = jax.random.split(jax.random.key(3), 4)
        scale = jnp.asarray([3.0, 1.0, 0.3, 0.1])
        train = {"x": jax.random.normal(ks[0], (11, 4), jnp.float64) * scale + 0.5,
                 "label": jax.random.normal(ks[1], (11, 3), jnp.float64)}
        val = {"x": jax.random.normal(ks[2], (5, 4), jnp.float64),
               "label": jax.random.normal(ks[3], (5, 3), jnp.float64)}
        factors, _ = kfac.fit_factors(logits_fn, params, train, layers=kfac.find_layers(layer),
                                      loss="squared_error", fisher="expected", chunk_size=4,
                                      log=None)
        w0 = _wbar(layer.kernel[...], layer.bias[...])

        def li(theta, x, y):
            return 0.5 * jnp.sum(jnp.square(_homog(x) @ theta.reshape(w0.shape) - y))

        theta = w0.reshape(-1)
        h = jax.hessian(lambda t: jnp.mean(jax.vmap(li, (None, 0, 0))(t, train["x"],
                                                                     train["label"])))(theta)
        gi = jax.vmap(jax.grad(li), (None, 0, 0))(theta, train["x"], train["label"])
        gv = jax.vmap(jax.grad(li), (None, 0, 0))(theta, val["x"], val["label"]).mean(0)
        damping = 0.05
        hd = h + damping * jnp.eye(h.shape[0])
        exact = gi @ jnp.linalg.solve(hd, gv)
        exact_self = jnp.einsum("np,np->n", gi, jnp.linalg.solve(hd, gi.T).T)
        for method in ("kfac", "ekfac"):
            got, info = kfac.kfac_influence(factors, logits_fn, params, train, val,
                                            damping=damping, method=method, chunk_size=4)
            np.testing.assert_allclose(got, exact, rtol=1e-8, atol=1e-12)
            scoring.check_solve(info, solver=method, tol=1e-6)
            got_self, _ = kfac.kfac_self_influence(factors, logits_fn, params, train,
                                                   damping=damping, method=method)
            np.testing.assert_allclose(got_self, exact_self, rtol=1e-8, atol=1e-12)
        # The param-space route: s like params, then the library's one-JVP influence.
        s, _ = kfac.kfac_s_test(factors, logits_fn, params, val, damping=damping)
        np.testing.assert_allclose(_wbar(s["kernel"][...], s["bias"][...]).reshape(-1),
                                   jnp.linalg.solve(hd, gv), rtol=1e-8, atol=1e-12)

        def per_ex(p, b):
            return 0.5 * jnp.sum(jnp.square(logits_fn(p, b) - b["label"]), axis=-1)

        np.testing.assert_allclose(scoring.influence_from_s_test(per_ex, params, train, s),
                                   exact, rtol=1e-8, atol=1e-12)
        inv, _ = kfac.kfac_inverse(factors, s, damping=damping)  # any params-shaped pytree
        np.testing.assert_allclose(_wbar(inv["kernel"][...], inv["bias"][...]).reshape(-1),
                                   jnp.linalg.solve(hd, jnp.linalg.solve(hd, gv)), rtol=1e-8)


def _frobenius(kind, fisher, factors, dirs, gn, blocks):
    """Per layer: assert EK-FAC's Frobenius error against M = E[vec G vec G^T] of the
    directions `dirs` (a [N, T, d_A], g [N, K, T, d_S]) is at most K-FAC's; print both
    and both against the exact GN block."""
    for lf, (a, g), blk in zip(factors.layers, dirs, blocks):
        gvec = jnp.einsum("nta,nkts->nkas", a, g).reshape(N, g.shape[1], -1)
        m = jnp.einsum("nkp,nkq->pq", gvec, gvec) / N
        k_mat = jnp.kron(lf.a, lf.s)
        q = jnp.kron(lf.qa, lf.qs)
        e_mat = q @ jnp.diag(lf.lam.reshape(-1)) @ q.T
        err_k = float(jnp.linalg.norm(k_mat - m))
        err_e = float(jnp.linalg.norm(e_mat - m))
        gn_blk = gn[blk, blk]
        print(f"{kind} fisher={fisher} layer [{lf.a.shape[0]}x{lf.s.shape[0]}]: "
              f"||F - E[vec G vec G^T]||_F K-FAC {err_k:.3e} EK-FAC {err_e:.3e}; "
              f"vs exact GN block K-FAC {float(jnp.linalg.norm(k_mat - gn_blk)):.3e} "
              f"EK-FAC {float(jnp.linalg.norm(e_mat - gn_blk)):.3e}")
        assert err_e <= err_k * (1 + 1e-12) + 1e-14
        if fisher == "expected":  # M is then the exact GN block itself
            np.testing.assert_allclose(m, gn_blk, rtol=0, atol=1e-10)


def test_influence_vs_exact_gauss_newton_and_frobenius_errors(fitted):
    f = fitted
    kind, ws, fwd, shapes = f["kind"], f["ws"], f["fwd"], f["shapes"]
    logits_fn, params, train, val = f["logits_fn"], f["params"], f["train"], f["val"]
    with jax.enable_x64(True):
        @jax.jit
        def reference(ws, train, val):
            gn = _exact_gn(fwd, ws, train["x"], shapes)
            return gn, _grads(fwd, ws, train, shapes), _grads(fwd, ws, val, shapes).mean(0)

        gn, gi, gv = reference(ws, train, val)
        blocks = _blocks(ws)
        gn_bd = jnp.zeros_like(gn)
        for blk in blocks:
            gn_bd = gn_bd.at[blk, blk].set(gn[blk, blk])
        damping = 1e-2
        eye = damping * jnp.eye(gn.shape[0])
        exact = gi @ jnp.linalg.solve(gn + eye, gv)
        exact_bd = gi @ jnp.linalg.solve(gn_bd + eye, gv)
        print(f"{kind}: Pearson of exact block-diagonal GN influence with exact GN "
              f"{float(np.corrcoef(exact_bd, exact)[0, 1]):.4f} (damping {damping})")
        # True Fisher (the shared fit): against the second moment of its sampled gradients.
        _frobenius(kind, "true", f["factors"],
                   [(a, g[:, None]) for a, g in zip(f["acts"], f["gs"])], gn, blocks)
        # Expected Fisher = Gauss-Newton: influence against the exact GN influence.
        factors, _ = kfac.fit_factors(logits_fn, params, train, layers=f["model"],
                                      fisher="expected", chunk_size=CHUNK, log=None)
        for method in ("kfac", "ekfac"):
            got, _ = kfac.kfac_influence(factors, logits_fn, params, train, val,
                                         damping=damping, method=method)
            print(f"{kind} fisher=expected {method}: Pearson with exact GN influence "
                  f"{float(np.corrcoef(got, exact)[0, 1]):.4f}, with exact block-diagonal "
                  f"GN {float(np.corrcoef(got, exact_bd)[0, 1]):.4f}")
        # Its M: the C columns of L (H = L L^T) back-propagated.
        z = f["z"]
        p = jax.nn.softmax(z)
        cols = jnp.sqrt(p)[:, :, None] * (jnp.eye(3)[None] - p[:, None, :])  # [N, C, C]
        eps = [jnp.zeros((N,) + s, jnp.float64) for s in shapes]
        _, vjp, acts = jax.vjp(lambda e: fwd(ws, train["x"], e), eps, has_aux=True)
        g_cols = jax.vmap(vjp, in_axes=1)(cols)[0]  # per layer [C, N, T, d_S]
        _frobenius(kind, "expected", factors,
                   [(a, jnp.swapaxes(g, 0, 1)) for a, g in zip(acts, g_cols)], gn, blocks)


class General(nnx.Module):
    """What kronfluence's nn.Linear/nn.Conv2d tracking does not cover: a Linear called
    twice (shared weights) on [B, H, W, C] inputs, a strided, dilated, input-dilated,
    asymmetrically padded convolution, a Linear on a sequence [B, L, D]; and a grouped
    convolution, which is reported as unsupported and excluded."""

    def __init__(self, rngs, dtype):
        kw = dict(rngs=rngs, param_dtype=dtype)
        self.fc = nnx.Linear(4, 4, **kw)
        self.conv = nnx.Conv(4, 3, (2, 3), strides=(1, 2), padding=((1, 0), (2, 1)),
                             kernel_dilation=(2, 1), input_dilation=(1, 2), **kw)
        self.depthwise = nnx.Conv(3, 3, (1, 1), feature_group_count=3, **kw)
        self.seq = nnx.Linear(3, 3, **kw)

    def __call__(self, x):
        h = self.fc(jnp.tanh(self.fc(x)))
        h = self.depthwise(jnp.tanh(self.conv(h)))
        return self.seq(h.reshape(h.shape[0], -1, 3)).mean(1)


def test_shared_layers_dilated_convs_and_sequences_give_the_per_example_gradients():
    # With a damping far above every eigenvalue, (F + d)^-1 -> I / d whatever the factors,
    # so d * self-influence -> ||g_i||^2 and d * influence -> g_i . g_val over the tracked
    # parameters: a check of how each layer's per-example gradient is assembled (calls
    # and positions summed, patches in kernel order).
    import functools

    with jax.enable_x64(True):
        model = General(nnx.Rngs(0), jnp.float64)
        graphdef, params, rest = _split(model)
        logits_fn = functools.partial(_logits, graphdef, rest)
        ks = jax.random.split(jax.random.key(1), 2)
        batch = {"x": jax.random.normal(ks[0], (9, 5, 5, 4), jnp.float64),
                 "label": jax.random.randint(ks[1], (9,), 0, 3)}
        factors, info = kfac.fit_factors(logits_fn, params, batch, layers=model,
                                         fisher="empirical", chunk_size=4, log=None)
        assert info["layers"] == ["conv", "fc", "seq"]
        assert info["unsupported"] == [["depthwise", "grouped convolution "
                                                     "(feature_group_count=3)"]]
        assert info["excluded"] == ["depthwise/bias", "depthwise/kernel"]
        assert [r["positions"] for r in info["memory"]["layers"]] == [20, 50, 20]

        def per_ex(p, b):
            return losses.cross_entropy(logits_fn(p, b), b["label"])

        grads = jax.jit(functools.partial(autodiff.per_example_grads, per_ex))(params, batch)
        grads["depthwise"] = jax.tree.map(jnp.zeros_like, grads["depthwise"])
        flat = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(grads)
        d = 1e7
        got_self, _ = kfac.kfac_self_influence(factors, logits_fn, params, batch, damping=d)
        np.testing.assert_allclose(got_self * d, jnp.sum(flat ** 2, axis=1), rtol=1e-6)
        got, _ = kfac.kfac_influence(factors, logits_fn, params, batch, batch, damping=d)
        want = flat @ flat.mean(0)
        np.testing.assert_allclose(got * d, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


def test_save_load_roundtrip_fingerprint_and_compile_once(tmp_path):
    model, logits_fn, params, train, val = _setup("mlp", n=16, dtype=jnp.float32)
    factors, _ = kfac.fit_factors(logits_fn, params, train, layers=model, fisher="empirical",
                                  chunk_size=8, log=None)
    fp = {"model": "mlp", "weights": "abc123", "n": 16}
    path = str(tmp_path / "factors.npz")
    kfac.save_factors(path, factors, fp)
    loaded = kfac.load_factors(path, dict(fp))
    assert loaded.specs == factors.specs and loaded.fisher == "empirical"
    a, _ = kfac.kfac_influence(factors, logits_fn, params, train, val, damping=0.1,
                               damping_mode="relative")
    n0 = kfac._influence_jit._cache_size()
    b, _ = kfac.kfac_influence(loaded, logits_fn, params, train, val, damping=0.2,
                               damping_mode="relative")
    c, _ = kfac.kfac_influence(loaded, logits_fn, params, train, val, damping=0.1,
                               damping_mode="relative")
    assert kfac._influence_jit._cache_size() == n0  # new damping / loaded arrays: no compile
    np.testing.assert_array_equal(a, c)
    assert not np.allclose(a, b)
    with pytest.raises(kfac.FactorsMismatchError, match="weights"):
        kfac.load_factors(path, {**fp, "weights": "def456"})
    assert kfac.load_factors(path, None).num_examples == 16


@pytest.mark.multidevice
def test_factors_on_8_devices_equal_1_device():
    model, logits_fn, params, train, val = _setup("cnn", n=64, dtype=jnp.float32)
    layers = kfac.find_layers(model)
    kw = dict(layers=layers, key=jax.random.key(0), chunk_size=16, log=None)
    f1, _ = kfac.fit_factors(logits_fn, params, train, **kw)
    s1, _ = kfac.kfac_influence(f1, logits_fn, params, train, val, damping=0.01)
    mesh = sharding.make_mesh(8)
    train8 = jax.device_put(train, sharding.batch_sharded(mesh))
    assert len(train8["x"].sharding.device_set) == 8
    params8 = sharding.replicate(params, mesh)
    f8, _ = kfac.fit_factors(logits_fn, params8, train8, **kw)
    s8, _ = kfac.kfac_influence(f8, logits_fn, params8, train8, val, damping=0.01)
    for l1, l8 in zip(f1.layers, f8.layers):
        for name in ("a", "s", "lam"):
            x1, x8 = np.asarray(getattr(l1, name)), np.asarray(getattr(l8, name))
            assert np.linalg.norm(x8 - x1) <= 1e-5 * np.linalg.norm(x1), name
    np.testing.assert_allclose(s8, s1, rtol=1e-4, atol=1e-5 * float(np.abs(s1).max()))


def test_bad_inputs():
    model, logits_fn, params, train, val = _setup("mlp", n=8, dtype=jnp.float32)
    layers = kfac.find_layers(model)
    with pytest.raises(ValueError, match="unknown fisher 'fischer'; allowed: true, empirical"):
        kfac.fit_factors(logits_fn, params, train, layers=layers, fisher="fischer")
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        kfac.fit_factors(logits_fn, params, train, layers=layers, loss="mse")
    with pytest.raises(ValueError, match="pass key="):
        kfac.fit_factors(logits_fn, params, train, layers=layers)
    with pytest.raises(ValueError, match="exceeds max_bytes=1000"):
        kfac.fit_factors(logits_fn, params, train, layers=layers, fisher="empirical",
                         max_bytes=1000, log=None)
    est = kfac.estimate_memory(logits_fn, params, train, layers=layers, fisher="expected")
    assert est["directions"] == 3 and est["total_bytes"] > est["factor_bytes"] > 0
    with pytest.raises(ValueError, match="no nnx.Linear or nnx.Conv"):
        kfac.find_layers(OnlyNorm(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="none of the model's Linear/Conv layers"):
        kfac.fit_factors(_cast_logits, params, train, layers=layers, fisher="empirical",
                         log=None)
    factors, _ = kfac.fit_factors(logits_fn, params, train, layers=layers, ekfac=False,
                                  fisher="empirical", log=None)
    with pytest.raises(ValueError, match="unknown damping_mode 'rel'; allowed: absolute"):
        kfac.kfac_influence(factors, logits_fn, params, train, val, damping=0.1,
                            method="kfac", damping_mode="rel")
    with pytest.raises(ValueError, match="unknown method 'kfc'"):
        kfac.kfac_influence(factors, logits_fn, params, train, val, damping=0.1, method="kfc")
    with pytest.raises(ValueError, match="ekfac=True"):
        kfac.kfac_influence(factors, logits_fn, params, train, val, damping=0.1)
    with pytest.raises(TypeError, match="damping"):
        kfac.kfac_influence(factors, logits_fn, params, train, val)  # damping is required
    with pytest.raises(scoring.LossSignatureError, match=r"logits \[B, C\]"):
        kfac.fit_factors(_scalar_logits, params, train, layers=layers, fisher="empirical",
                         log=None)


_CAST = {}


def _cast_logits(params, batch):
    # Copies every parameter: the layers' kernels are no longer the arrays in params.
    graphdef, rest = _CAST["g"]
    return nnx.merge(graphdef, jax.tree.map(lambda a: a * 1.0, params), rest)(batch["x"])


def _scalar_logits(params, batch):
    graphdef, rest = _CAST["g"]
    return jnp.mean(nnx.merge(graphdef, params, rest)(batch["x"]))


@pytest.fixture(autouse=True)
def _cast_model():
    graphdef, _, rest = _split(MLP(nnx.Rngs(0), jnp.float32))
    _CAST["g"] = (graphdef, rest)
    yield


def test_kfac_scores_from_the_pipeline_style_loss_agree_with_the_jvp_route():
    # The library's cross-entropy (kdprune_jax.losses) with observed labels: kfac_s_test
    # + influence_from_s_test must give kfac_influence's scores on a conv net.
    model, logits_fn, params, train, val = _setup("cnn", n=12, dtype=jnp.float32)
    factors, _ = kfac.fit_factors(logits_fn, params, train, layers=model, fisher="empirical",
                                  ekfac=False, chunk_size=6, log=None)
    direct, _ = kfac.kfac_influence(factors, logits_fn, params, train, val, damping=0.1,
                                    method="kfac", damping_mode="relative")
    s, _ = kfac.kfac_s_test(factors, logits_fn, params, val, damping=0.1, method="kfac",
                            damping_mode="relative")
    assert float(jnp.abs(s["bn"]["scale"][...]).max()) == 0.0  # excluded: no curvature

    def per_ex(p, b):
        return losses.cross_entropy(logits_fn(p, b), b["label"])

    jvp = scoring.influence_from_s_test(per_ex, params, train, s)
    np.testing.assert_allclose(jvp, direct, rtol=1e-4, atol=1e-5 * float(jnp.abs(direct).max()))
