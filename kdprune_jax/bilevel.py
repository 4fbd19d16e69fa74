"""IF-Beta's bilevel step (METHOD.md §5.6; our reconstruction of paper B).

Policy parameters phi = (a~, b~) define keep probabilities pi(phi) over the pool
(`selection.policy`). Inner problem: the KD-aligned linear head on cached teacher features,

    theta*(pi) = argmin_theta  sum_i pi_i l_i(theta) / sum_i pi_i + (mu/2) ||theta||^2

Outer objective: L_out(theta*) = mean KD-aligned loss on the validation split V1. By the
implicit function theorem,

    v = H_pi^{-1} grad L_out(theta*)                            (CG with HVPs)
    dL_out/dphi = - vjp[phi -> grad_theta F(theta*, pi(phi))](v)

`make_outer_step` returns ONE jitted function doing inner solve + CG + hypergradient + optax
update. Alternatives kept for checking it: `finite_difference_grad`, `reinforce_grad`,
`grid_objectives`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax

from kdprune_jax import autodiff, sharding
from kdprune_jax.scoring import head as head_lib
from kdprune_jax.selection import policy


@flax.struct.dataclass
class Problem:
    """Device arrays of one IF-Beta problem; rows are sharded on "data" (`make_problem`
    pads them to a multiple of the device count).

    train: {"features" [N, D], "label" int [N], "teacher_logits" [N, C]} of the pool.
    u: [N] within-class influence ranks in (0, 1).
    segment: int [N]: the class of each row, or C for padding rows (a class of its own that
      keeps 0 examples, so padding always gets pi = 0).
    counts: int [C + 1] kept per class (the last entry, padding's, is 0).
    val / val2: the same dict as train plus a "weight" mask (0 on padding) for V1 (outer
      objective) and V2 (early stopping).
    """

    train: dict
    u: jax.Array
    segment: jax.Array
    counts: jax.Array
    val: dict
    val2: dict


def _pad_rows(batch: dict, n: int) -> dict:
    """Pad every array of `batch` with zero rows up to n rows."""
    return {k: jnp.concatenate([v, jnp.zeros((n - v.shape[0],) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}


def make_problem(train, u, counts, val, val2, *, num_classes: int, multiple: int = 1):
    """Build a `Problem` whose row counts are multiples of `multiple` (the device count), so
    that its rows shard evenly over "data". Padding rows get segment C (count 0 -> pi 0),
    validation padding gets weight 0: neither changes any objective."""

    def up(n):
        return -(-n // multiple) * multiple

    n = train["label"].shape[0]
    segment = jnp.concatenate([train["label"].astype(jnp.int32),
                               jnp.full((up(n) - n,), num_classes, jnp.int32)])
    u = jnp.concatenate([jnp.asarray(u), jnp.full((up(n) - n,), 0.5, jnp.asarray(u).dtype)])

    def val_rows(v):
        m = v["label"].shape[0]
        w = jnp.ones((m,), v["features"].dtype)
        return _pad_rows({**v, "weight": w}, up(m))

    counts = jnp.concatenate([jnp.asarray(counts, jnp.int32), jnp.zeros((1,), jnp.int32)])
    return Problem(_pad_rows(train, up(n)), u, segment, counts, val_rows(val), val_rows(val2))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static hyperparameters (hashable: part of the jit cache key)."""

    num_classes: int
    kd_weight: float = 0.9  # KD weight of the KD-aligned loss (ifbeta.kd_weight)
    temperature: float = 4.0
    l2: float = 1e-4  # mu
    inner_max_iters: int = 200
    inner_tol: float = 1e-5
    cg_max_iters: int = 100
    cg_tol: float = 1e-5
    damping: float = 0.0
    warm_start: bool = True  # start each inner solve from the previous theta*
    cg_warm_start: bool = True  # start each CG solve from the previous step's solution
    # auto | kronecker | none: Kronecker preconditioning of the inner L-BFGS (whitened
    # coordinates) and of the CG (auto = kronecker for the linear head, none for the mlp
    # head; see scoring.head.kronecker_factors).
    preconditioner: str = "auto"
    head: str = "linear"  # linear | mlp (see scoring.head.init_head)
    mlp_hidden: int = 128
    seed: int = 0  # mlp head initialization
    # The outer (validation) objective: "kd" = the KD-aligned loss of the inner problem
    # (weight kd_weight), "ce" = cross-entropy on the validation labels (weight 0): the head fits
    # the teacher from almost any subset, so a KD-aligned target can barely tell subsets
    # apart (METHOD.md §5.8); the labels can.
    outer_loss: str = "kd"

    @property
    def outer_kd_weight(self) -> float:
        return self.kd_weight if self.outer_loss == "kd" else 0.0

    @property
    def kronecker(self) -> bool:
        """Whether the head's solves (L-BFGS, CG) precondition with its Kronecker factors."""
        return uses_kronecker_preconditioner(self.preconditioner, self.head)


@flax.struct.dataclass
class PolicyState:
    phi: jax.Array  # [2] = (a~, b~)
    opt_state: optax.OptState
    theta: dict  # last inner solution (warm start)
    step: jax.Array
    cg_solution: dict  # last (H + damping I)^-1 dL_out/dtheta, like theta (CG warm start)


PRECONDITIONERS = ("auto", "kronecker", "none")


def uses_kronecker_preconditioner(preconditioner: str, head: str) -> bool:
    """Whether the head's solves (L-BFGS, CG) precondition with its Kronecker factors: always
    for `kronecker` (linear heads only: config_checks rejects it with mlp), for `auto` when
    the head is linear."""
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"unknown preconditioner {preconditioner!r}; allowed: "
                         f"{', '.join(PRECONDITIONERS)}")
    return preconditioner == "kronecker" or (preconditioner == "auto"
                                                and head == "linear")


@functools.partial(jax.jit, static_argnames=("s",))
def keep_probabilities(phi, prob: Problem, s: Settings):
    """pi [N_padded] of the policy phi (0 on padding rows)."""
    return policy.keep_probabilities(policy.beta_log_weights(phi, prob.u), prob.segment,
                                     prob.counts, s.num_classes + 1)


_pi = keep_probabilities


def _inner_objective(theta, pi, train, s: Settings):
    return head_lib.head_objective(theta, {**train, "weight": pi}, lam=s.kd_weight,
                                   temperature=s.temperature, l2=s.l2)


def outer_loss(theta, batch, s: Settings):
    """Mean loss of the head on a held-out split (no regularizer): the KD-aligned loss, or
    plain cross-entropy with ``s.outer_loss == "ce"``; rows with batch["weight"] == 0
    (padding) do not count."""
    per = head_lib.head_losses(theta, batch, lam=s.outer_kd_weight, temperature=s.temperature)
    w = batch.get("weight")
    return jnp.mean(per) if w is None else jnp.sum(w * per) / jnp.sum(w)


def inner_solve(phi, theta0, prob: Problem, s: Settings):
    """theta*(pi(phi)) by L-BFGS from theta0. Returns (theta, pi, info)."""
    pi = _pi(phi, prob, s)
    theta, info = _fit_inner({**prob.train, "weight": pi}, theta0, s)
    return theta, pi, info


def _fit_inner(batch, theta0, s: Settings):
    """The weighted head fit by L-BFGS from theta0. With `s.kronecker`, L-BFGS runs in
    coordinates whitened by the Kronecker factors at the starting point (the previous
    step's theta* when warm-started), where the objective's Hessian is close to I."""
    whitening = None
    if s.kronecker:
        whitening = head_lib.kronecker_factors(theta0, batch, lam=s.kd_weight,
                                               temperature=s.temperature, shift=s.l2)
    return head_lib.fit_head(batch, theta0, lam=s.kd_weight, temperature=s.temperature, l2=s.l2,
                             max_iters=s.inner_max_iters, tol=s.inner_tol,
                             whitening=whitening)


def hypergradient(phi, theta, prob: Problem, s: Settings, v0=None):
    """dL_out/dphi at theta = theta*(pi(phi)) by the implicit function theorem; `v0` (like
    theta) starts the CG solve of v = (H + damping I)^-1 dL_out/dtheta.
    Returns (grad [2], cg_info, v)."""
    g_out = jax.grad(outer_loss)(theta, prob.val, s)
    pi = _pi(phi, prob, s)
    precond, fallback = None, jnp.zeros((), jnp.int32)
    if s.kronecker:
        # Factors at this step's (theta*, pi): [D+1, D+1] and [C, C] sums over the sharded
        # pool rows (cheaper than one HVP), then two small eigendecompositions.
        factors = head_lib.kronecker_factors(
            theta, {**prob.train, "weight": pi}, lam=s.kd_weight, temperature=s.temperature,
            shift=s.l2 + s.damping)
        precond = functools.partial(head_lib.kronecker_inverse, factors)
        fallback = factors["fallback"]
    v, cg_info = autodiff.solve_cg(lambda th, train: _inner_objective(th, pi, train, s), theta,
                                   prob.train, g_out, damping=s.damping, max_iters=s.cg_max_iters,
                                   tol=s.cg_tol, x0=v0, preconditioner=precond)
    cg_info = {**cg_info, "preconditioner_fallback": fallback}

    def grad_theta_of_phi(ph):
        return jax.grad(_inner_objective)(theta, _pi(ph, prob, s), prob.train, s)

    _, vjp = jax.vjp(grad_theta_of_phi, phi)
    (d_phi,) = vjp(v)
    return -d_phi, cg_info, v


def init_state(phi0, theta0, tx) -> PolicyState:
    phi0 = jnp.asarray(phi0, jnp.float32)
    return PolicyState(phi0, tx.init(phi0), theta0, jnp.zeros((), jnp.int32),
                       jax.tree.map(jnp.zeros_like, theta0))


def make_outer_step(s: Settings, tx: optax.GradientTransformation, mesh):
    """ONE jitted outer step: inner solve -> CG -> implicit hypergradient -> optax update.

    ``step(state, problem) -> (state, metrics)``; metrics: a, b, outer (V1 objective at the
    step's theta*), heldout (V2), inner_grad_norm, inner_iters, cg_residual, cg_iters,
    preconditioner_fallback, grad_norm. The problem's pool rows are sharded on "data"; the
    policy state is replicated and donated.
    """

    def step(state: PolicyState, prob: Problem):
        theta0 = state.theta if s.warm_start else jax.tree.map(jnp.zeros_like, state.theta)
        theta, _, info = inner_solve(state.phi, theta0, prob, s)
        # Warm start: phi moves little per step, so last step's v is close to this one's.
        v0 = state.cg_solution if s.cg_warm_start else None
        d_phi, cg_info, v = hypergradient(state.phi, theta, prob, s, v0)
        updates, opt_state = tx.update(d_phi, state.opt_state, state.phi)
        phi = optax.apply_updates(state.phi, updates)
        a, b = policy.beta_params(state.phi)
        metrics = {
            "a": a, "b": b, "outer": outer_loss(theta, prob.val, s),
            "heldout": outer_loss(theta, prob.val2, s),
            "inner_grad_norm": info["grad_norm"], "inner_iters": info["iterations"],
            "cg_residual": cg_info["residual"], "cg_iters": cg_info["iterations"],
            # 1 = a Kronecker factor was not finite and the identity stood in (head.py)
            "preconditioner_fallback": cg_info["preconditioner_fallback"],
            "grad_norm": jnp.linalg.norm(d_phi),
        }
        return PolicyState(phi, opt_state, theta, state.step + 1, v), metrics

    repl = sharding.replicated(mesh)
    return jax.jit(step, in_shardings=(repl, problem_shardings(mesh)),
                   out_shardings=(repl, repl), donate_argnums=(0,))


def problem_shardings(mesh):
    """Rows of the pool and validation arrays split over "data" (ImageNet's 1.28M x 2048
    features do not fit one device), the per-class counts replicated. A `Problem` of
    shardings: a pytree prefix for jit / device_put."""
    rows = sharding.batch_sharded(mesh)
    return Problem(train=rows, u=rows, segment=rows, counts=sharding.replicated(mesh),
                   val=rows, val2=rows)


# ----------------------------------------------------------------------------- checks
def _theta0(prob: Problem, s: Settings):
    return head_lib.init_head(prob.train["features"].shape[1], s.num_classes,
                              prob.train["features"].dtype, kind=s.head, hidden=s.mlp_hidden,
                              seed=s.seed)


@functools.partial(jax.jit, static_argnames=("s",))
def objective_at(phi, prob: Problem, s: Settings):
    """L_out(theta*(pi(phi))) with a fresh inner solve from the fixed initial head."""
    theta, _, _ = inner_solve(phi, _theta0(prob, s), prob, s)
    return outer_loss(theta, prob.val, s)


# The check paths below are jitted like the outer step: run eagerly, every primitive of
# their inner solve and VJP would be compiled and dispatched on its own.
@functools.partial(jax.jit, static_argnames=("s",))
def implicit_grad_at(phi, prob: Problem, s: Settings):
    """The implicit hypergradient at phi (fresh inner solve from the fixed initial head)."""
    theta, _, _ = inner_solve(phi, _theta0(prob, s), prob, s)
    return hypergradient(phi, theta, prob, s)[:2]


def finite_difference_grad(phi, prob: Problem, s: Settings, eps: float = 1e-2):
    """Central differences of `objective_at` on (a~, b~): the check for the implicit
    gradient (config policy.check_grad). Returns [2]."""
    g = []
    for k in range(2):
        e = jnp.zeros(2, phi.dtype).at[k].set(eps)
        g.append((objective_at(phi + e, prob, s) - objective_at(phi - e, prob, s)) / (2 * eps))
    return jnp.stack(g)


@functools.partial(jax.jit, static_argnames=("s", "num_samples"))
def reinforce_grad(phi, prob: Problem, s: Settings, key, num_samples: int = 8):
    """Score-function (REINFORCE) estimate of d E[L_out] / d phi with independent
    Bernoulli(pi_i) subsets, leave-one-out baseline. Unbiased but noisy: kept as a check
    on the implicit gradient's direction."""
    pi = _pi(phi, prob, s)
    keys = jax.random.split(key, num_samples)
    theta0 = _theta0(prob, s)

    def sample(k):
        m = jax.random.bernoulli(k, pi).astype(pi.dtype)
        theta, _ = _fit_inner({**prob.train, "weight": m + 1e-6}, theta0, s)
        return m, outer_loss(theta, prob.val, s)

    masks, rewards = jax.lax.map(sample, keys)
    baseline = (jnp.sum(rewards) - rewards) / (num_samples - 1)

    def logp(ph, m):
        p = jnp.clip(_pi(ph, prob, s), 1e-6, 1 - 1e-6)
        return jnp.sum(m * jnp.log(p) + (1 - m) * jnp.log1p(-p))

    grads = jax.vmap(lambda m: jax.grad(logp)(phi, m))(masks)
    return jnp.mean((rewards - baseline)[:, None] * grads, axis=0)


def grid_objectives(prob: Problem, s: Settings, values):
    """L_out over a grid of (a, b) values (phi = softplus^-1(value - eps)).
    Returns (phis [G, 2], objectives [G])."""
    vals = jnp.asarray(values, jnp.float32)
    a, b = jnp.meshgrid(vals, vals, indexing="ij")
    ab = jnp.stack([a.ravel(), b.ravel()], -1)
    phis = jnp.log(jnp.expm1(ab - policy.EPS))  # inverse softplus
    objs = jax.lax.map(lambda ph: objective_at(ph, prob, s), phis)
    return phis, objs
