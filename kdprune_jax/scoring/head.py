"""A linear head on frozen features, trained with the KD-aligned loss (METHOD.md §5.2):

    l_i(theta) = (1 - lam) CE(y_i, softmax(z_i))
                 + lam tau^2 KL(softmax(t_i / tau) || softmax(z_i / tau)),    z_i = h_i W + b
    objective = sum_i w_i l_i / sum_i w_i + (mu/2) ||theta||^2

With lam = 0 it is plain softmax regression. The objective is convex in theta = (W, b), so
influence functions on it are well-posed (scope "head" in METHOD.md §4) and an exact or CG
inverse Hessian is accurate. Batches are dicts {"features" [B, D], "label" int [B],
"teacher_logits" [B, C] (unused when lam = 0), optional "weight" [B]}.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from kdprune_jax import losses

HEADS = ("linear", "mlp")


def init_head(dim: int, num_classes: int, dtype=jnp.float32, *, kind: str = "linear",
              hidden: int = 128, seed: int = 0):
    """Head parameters. `linear`: zeros (the convex objective has one minimizer and a fixed
    start makes inner solves reproducible). `mlp`: one hidden ReLU layer of width `hidden`,
    He-initialized from `seed` (zeros would be a saddle); its objective is NOT convex, so
    influence / CG on it need damping > 0."""
    if kind == "linear":
        return {"w": jnp.zeros((dim, num_classes), dtype),
                "b": jnp.zeros((num_classes,), dtype)}
    if kind == "mlp":
        k1, k2 = jax.random.split(jax.random.key(seed))
        return {"w1": jax.random.normal(k1, (dim, hidden), dtype) * jnp.sqrt(2.0 / dim),
                "b1": jnp.zeros((hidden,), dtype),
                "w2": jax.random.normal(k2, (hidden, num_classes), dtype) / jnp.sqrt(hidden),
                "b2": jnp.zeros((num_classes,), dtype)}
    raise ValueError(f"unknown head {kind!r}; allowed: {', '.join(HEADS)}")


def head_logits(params, features):
    """Logits [B, C] of the head on features [B, D] (computed in the params' dtype)."""
    if "w1" in params:  # mlp
        h = jax.nn.relu(features.astype(params["w1"].dtype) @ params["w1"] + params["b1"])
        return h @ params["w2"] + params["b2"]
    return features.astype(params["w"].dtype) @ params["w"] + params["b"]


def head_losses(params, batch, *, lam: float, temperature: float):
    """Per-example KD-aligned loss l_i -> float32 [B] (no regularizer)."""
    z = head_logits(params, batch["features"])
    t = batch.get("teacher_logits") if lam > 0 else None
    return losses.kd_loss(z, t, batch["label"], kd_weight=lam, temperature=temperature)


def head_objective(params, batch, *, lam: float, temperature: float, l2: float):
    """Weighted mean of `head_losses` + (l2/2)||theta||^2 (the training objective)."""
    per = head_losses(params, batch, lam=lam, temperature=temperature)
    w = batch.get("weight")
    mean = jnp.mean(per) if w is None else jnp.sum(w * per) / jnp.sum(w)
    reg = 0.5 * l2 * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
    return mean + reg


@functools.partial(jax.jit, static_argnames=("lam", "temperature", "l2", "max_iters", "tol"))
def fit_head(batch, init, *, lam: float, temperature: float, l2: float,
             max_iters: int = 500, tol: float = 1e-5, whitening=None):
    """Minimize `head_objective` from `init` with L-BFGS inside a lax.while_loop.

    `whitening` (`kronecker_factors` of a linear head with shift=l2) runs L-BFGS on
    phi = M^(1/2) theta instead of theta: the same objective and minimizer, but in
    coordinates where its Hessian is close to I, so far fewer iterations on correlated
    features. The stopping rule is the same either way: the norm of the gradient with
    respect to theta (= ||grad_phi * sqrt(denom)||, U and Q being orthogonal).
    Returns (params, info) with info = {"iterations", "grad_norm"}; stops when the gradient
    norm < tol or after max_iters.
    """
    fun = functools.partial(head_objective, batch=batch, lam=lam, temperature=temperature,
                            l2=l2)
    if whitening is None:
        inner_fun, start = fun, init

        def finish(x):
            return x

        def theta_grad_norm(g):
            return optax.tree.norm(g)
    else:
        def finish(phi):
            return kronecker_unwhiten(whitening, phi, init)

        def inner_fun(phi):
            return fun(finish(phi))

        start = kronecker_whiten(whitening, init)

        def theta_grad_norm(g):
            return jnp.linalg.norm(g * jnp.sqrt(whitening["denom"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(inner_fun)

    def cond(c):
        _, _, k, gnorm = c
        return (k < max_iters) & (gnorm > tol)

    def body(c):
        x, state, k, _ = c
        value, grad = value_and_grad(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad,
                                    value_fn=inner_fun)
        x = optax.apply_updates(x, updates)
        return x, state, k + 1, theta_grad_norm(grad)

    x, _, k, _ = jax.lax.while_loop(cond, body, (start, opt.init(start), 0, jnp.inf))
    params = finish(x)
    gnorm = optax.tree.norm(jax.grad(fun)(params))
    return params, {"iterations": k, "grad_norm": gnorm}


def kronecker_factors(params, batch, *, lam: float, temperature: float, shift: float):
    """Eigen-factors of M = Sx (x) A + shift I, a Kronecker (K-FAC-style) approximation of
    the LINEAR head's Hessian H = sum_i w_i x_i x_i^T (x) A_i / sum_i w_i + l2 I.

    x_i = [h_i, 1] (features and the bias input); A_i = d^2 l_i / dz^2 =
    (1 - lam) (diag p_i - p_i p_i^T) + lam (diag q_i - q_i q_i^T), p_i = softmax(z_i),
    q_i = softmax(z_i / tau) (the tau^2 of the KD term cancels the 1/tau^2 of its Hessian).
    Sx [D+1, D+1] and A [C, C] are the w-weighted means of x_i x_i^T and A_i; with
    Sx = U diag(s) U^T and A = Q diag(g) Q^T, M = (U (x) Q) diag(s g^T + shift) (U (x) Q)^T,
    so M^-1 and M^(+-1/2) cost two small matmuls each (`kronecker_inverse`,
    `kronecker_whiten`). H's ill-conditioning comes from correlated features (Sx's
    eigenvalues span ~1e6 on ResNet-56 CIFAR-10 features; l2 = 1e-4); M captures that.

    Args:
      params: the linear head {"w" [D, C], "b" [C]} at which A_i is evaluated.
      batch: {"features" [N, D], "teacher_logits" [N, C] (when lam > 0), optional
        "weight" [N]} (rows may be sharded; only [D+1, D+1] and [C, C] sums leave them).
      shift: the multiple of I in the matrix to approximate (l2, or l2 + damping).
    Returns:
      {"u" [D+1, D+1], "q" [C, C], "denom" [D+1, C] = s g^T + shift, "fallback" int []: 1
      when a factor's eigendecomposition was not finite and the identity replaced it}.
    """
    if "w" not in params:
        raise ValueError("kronecker_factors: linear heads only (params 'w', 'b')")
    dtype = params["w"].dtype
    h = batch["features"].astype(dtype)
    x = jnp.concatenate([h, jnp.ones((h.shape[0], 1), dtype)], axis=1)
    w = batch.get("weight")
    w = jnp.ones((h.shape[0],), dtype) if w is None else w.astype(dtype)
    w = w / jnp.sum(w)
    z = head_logits(params, batch["features"])
    p = jax.nn.softmax(z, axis=-1)
    sx = x.T @ (w[:, None] * x)
    # sum_i w_i (diag(p_i) - p_i p_i^T) = diag(w^T P) - P^T diag(w) P
    a = (1.0 - lam) * (jnp.diag(w @ p) - p.T @ (w[:, None] * p))
    if lam > 0:
        q = jax.nn.softmax(z / temperature, axis=-1)
        a = a + lam * (jnp.diag(w @ q) - q.T @ (w[:, None] * q))
    # Both are symmetric by construction: eigh reads one triangle (no symmetrizing pass).
    u, s = jax.lax.linalg.eigh(sx, symmetrize_input=False)  # (eigenvectors, eigenvalues)
    qv, g = jax.lax.linalg.eigh(a, symmetrize_input=False)
    # float32 LAPACK eigh returned NaN eigenvectors for A in one compiled program and not in
    # another (ImageNet-mock smoke: 1000 classes, 4 present, so 999 equal eigenvalues). A
    # preconditioner only has to be SPD, so a factor whose decomposition is not finite is
    # replaced by the identity (the other one still preconditions; the solves stay exact,
    # only slower) and "fallback" records it (the policy reports it per outer step).
    ok_x = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(s))
    ok_a = jnp.all(jnp.isfinite(qv)) & jnp.all(jnp.isfinite(g))
    u = jnp.where(ok_x, u, jnp.eye(u.shape[0], dtype=dtype))
    s = jnp.where(ok_x, s, jnp.ones_like(s))
    qv = jnp.where(ok_a, qv, jnp.eye(qv.shape[0], dtype=dtype))
    g = jnp.where(ok_a, g, jnp.ones_like(g))
    # Both factors are PSD; clip rounding negatives. A always has a zero eigenvalue (adding a
    # constant to every logit changes nothing), so with shift = 0 (l2 = damping = 0) denom
    # would be 0 there: keep it >= eps * max so M stays invertible.
    denom = jnp.maximum(s, 0)[:, None] * jnp.maximum(g, 0)[None, :] + shift
    denom = jnp.maximum(denom, jnp.finfo(dtype).eps * jnp.max(denom))
    return {"u": u, "q": qv, "denom": denom,
            "fallback": (~(ok_x & ok_a)).astype(jnp.int32)}


def _stack(tree):
    return jnp.concatenate([tree["w"], tree["b"][None, :]], axis=0)


def _unstack(m, like):
    return {"w": m[:-1].astype(like["w"].dtype), "b": m[-1].astype(like["b"].dtype)}


def kronecker_inverse(factors, tree):
    """M^-1 applied to a linear-head-shaped pytree (see `kronecker_factors`)."""
    u, q = factors["u"], factors["q"]
    r = _stack(tree).astype(u.dtype)
    return _unstack(u @ ((u.T @ r @ q) / factors["denom"]) @ q.T, tree)


def kronecker_whiten(factors, tree):
    """M^(1/2) theta as a [D+1, C] array phi: coordinates in which M is the identity, so
    L-BFGS on the head's objective in phi is well-conditioned (`fit_head(whitening=)`)."""
    u, q = factors["u"], factors["q"]
    return (u.T @ _stack(tree).astype(u.dtype) @ q) * jnp.sqrt(factors["denom"])


def kronecker_unwhiten(factors, phi, like):
    """The inverse of `kronecker_whiten`: theta = M^(-1/2) phi, shaped like `like`."""
    u, q = factors["u"], factors["q"]
    return _unstack(u @ (phi / jnp.sqrt(factors["denom"])) @ q.T, like)


def kronecker_preconditioner(params, batch, *, lam: float, temperature: float, shift: float):
    """M^-1 for CG on the linear head's Hessian (`kronecker_factors` at params, batch):
    a function pytree-like-params -> pytree-like-params. Preconditioned CG needs tens of
    iterations where plain CG needed hundreds (benchmarks/ifbeta_cost.py reports them)."""
    factors = kronecker_factors(params, batch, lam=lam, temperature=temperature, shift=shift)
    return functools.partial(kronecker_inverse, factors)


@dataclasses.dataclass(frozen=True)
class KroneckerPreconditioner:
    """`kronecker_preconditioner` with its settings bound, for ``s_test(preconditioner=)``:
    a frozen dataclass, so two equal settings objects compare equal and the jitted solve is
    compiled once (a ``functools.partial`` with the same values would be too; a lambda
    made per call would not).

    shift: the multiple of I in the matrix approximated (l2 + damping for a head objective
    with L2 `l2` solved with `damping`)."""

    lam: float
    temperature: float
    shift: float

    def __call__(self, params, batch):
        return kronecker_preconditioner(params, batch, lam=self.lam,
                                        temperature=self.temperature, shift=self.shift)
