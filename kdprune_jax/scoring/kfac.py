"""K-FAC and EK-FAC inverse curvature for any flax.nnx model, and the influence it gives.

Which parameters. Every `nnx.Linear` and `nnx.Conv` of the model (found by traversing it
with `nnx.iter_graph`: `find_layers`) is one block of a block-diagonal curvature. For
layer l with per-example input activations a (the input vector of a Linear; the input
PATCH of a Conv at each output position, Grosse & Martens 2016 "KFC") and pre-activation
output gradients g, the per-example gradient of [kernel; bias] is

    G_i = sum_t a_bar_{i,t} g_{i,t}^T            [d_A, d_S],  a_bar = [a, 1]

(t runs over positions: the output pixels of a convolution, the non-feature axes of a
Linear's input, and the calls of a layer used more than once; bias as a homogeneous
coordinate, present only when the layer has one). Parameters outside these layers
(BatchNorm and LayerNorm scale/bias, embeddings, the kernel of a grouped or
circular/reflect/causal-padded or masked convolution, LoRA adapters, ...) are EXCLUDED:
they get no curvature and no influence, and their paths are listed in the fit's info
("excluded", with "unsupported" saying why a Linear/Conv was left out). Influence is then
the influence through the Linear/Conv weights, as in kronfluence.

Factors (`fit_factors`), means over the N examples of the fitting batch:

    A_l = E_i[sum_t a_bar a_bar^T]  [d_A, d_A]        S_l = E_i[(1/T) sum_t g g^T]  [d_S, d_S]

so that, when activations and gradients are independent and spatially uncorrelated,
E[vec G vec G^T] = A_l (x) S_l (vec row-major over [d_A, d_S]). g is the gradient of the
loss of the model's logits z [B, C] (`loss=`):

- "cross_entropy": l = -log softmax(z)_y, y int [B];  dl/dz = softmax(z) - onehot(y);
- "squared_error": l = 1/2 ||z - y||^2, y float [B, C];  dl/dz = z - y;

with the output side taken three ways (`fisher=`):

- "true" (default): y sampled from the model's predictive distribution (categorical on
  softmax(z); N(z, I) for squared error). Row r of the batch draws with
  ``jax.random.fold_in(key, r)``, so the labels do not depend on chunk_size or devices;
- "empirical": the observed targets of the batch;
- "expected": closed form, E_y[g g^T] = J^T H J with H the loss's Hessian in z (I for
  squared error, diag(p) - p p^T for softmax cross-entropy): the Gauss-Newton matrix.
  Computed from C backward passes per example (H = L L^T, one pass per column of L):
  C times the cost of the sampled Fishers.

EK-FAC (George et al. 2018): with A = Q_A diag(lambda_A) Q_A^T, S = Q_S diag(lambda_S)
Q_S^T, K-FAC is (Q_A (x) Q_S) diag(lambda_A (x) lambda_S) (Q_A (x) Q_S)^T; EK-FAC keeps
the eigenbasis and replaces the eigenvalues by the second moments of the per-example
gradients in it, Lambda = E_i[(Q_A^T G_i Q_S)^2] [d_A, d_S] (same Fisher choice; for
"expected" the sum over the C columns). It is computed layer by layer from a_i and g_i,
never materialising a whole network's per-example gradient: for T = 1 it is a single
matmul of squared projections, (Q_A^T a)^2 (Q_S^T g)^2^T; for T > 1 one [d_A, d_S]
projection per example of a chunk. Among all matrices diagonal in that basis it is the
closest to E[vec G vec G^T] in Frobenius norm, so its error is at most K-FAC's.

Damping and inverse. (F + damping)^-1 = (Q_A (x) Q_S) diag(1 / (Lambda + d)) (Q_A (x)
Q_S)^T, Lambda = lambda_A lambda_S^T (method "kfac") or the EK-FAC one ("ekfac"), and

- ``damping_mode="absolute"``: d = damping (as `scoring.s_test`'s damping on H);
- ``damping_mode="relative"``: d = damping * mean(Lambda), per layer; damping=0.1 is
  kronfluence's default heuristic (its ``damping_factor=None``).

Influence (`kfac_influence`), per training example i: g_val^T (F + d)^-1 g_i summed over
layers, g_val the gradient of the MEAN loss over `val_batch` and g_i of example i's loss,
both with the observed targets. Sign as in `scoring.influence`: POSITIVE = HELPFUL.
Computed as sum_l sum_t a_bar_{i,t}^T P_l g_{i,t} with P_l the preconditioned validation
gradient: one forward and one backward pass per chunk, no per-example gradient. For the
existing JVP path, `kfac_s_test` returns the same P as a pytree like params (zeros on
excluded parameters) for `scoring.influence_from_s_test`; `kfac_inverse` applies the
damped inverse to any params-shaped pytree (e.g. as a CG preconditioner).

How activations and gradients are captured. While `logits_fn` is traced, the __call__ of
nnx.Linear and nnx.Conv is wrapped (a context manager, restored afterwards; the wrapper
is active only in the thread that is tracing) so that a layer whose kernel is the very
array passed in `params` records its input and adds a zero "perturbation" eps to its
output; d(sum_i l_i)/d eps is then every example's pre-activation gradient at once (one
backward pass for the batch, examples uncoupled), where per-example autodiff would cost
one pass per example. Why patching rather than editing the graph: `logits_fn` builds the
module itself (``nnx.merge(graphdef, params, rest)``, as the pipeline does), so the
instances exist only inside the user's function; a class-level wrapper reaches them
whatever the function does, and the kernel's identity tells which layer is which.
Consequences: `logits_fn` must use the `params` leaves as they are (a cast or copy of a
kernel hides its layer) and must not be a `jax.jit`-compiled function already traced for
these shapes (its cached program would bypass the wrapper); a fit in which no layer was
reached raises, and layers not reached are reported ("unreached").

Conventions as the rest of `kdprune_jax.scoring`: ``logits_fn(params, batch) -> [B, C]``
(inference mode, examples uncoupled), `params` an nnx.State (``nnx.split(model,
nnx.Param, ...)``; a sub-State such as only the head also works: layers whose kernel is
not in it are left out), `batch` a pytree with leading axis B (a jit argument; sharded on
a ("data",) mesh or not: the factor sums are means over the batch, so jit's automatic
partitioning all-reduces them), callables compared as `scoring._fn.as_tree_fn` does
(define them at module level: one compile per shape), ``damping=`` required, solvers'
info dicts {"iterations", "residual", "diverged"} so `check_solve` accepts them. Dtypes
follow the kernels (float32; float64 under ``jax_enable_x64`` with float64 params).

Memory. `estimate_memory` (printed by `fit_factors` before it allocates anything) counts
the factors (per layer 2 d_A^2 + 2 d_S^2 + d_A + d_S, + d_A d_S for EK-FAC) and the
per-chunk working set (activations, perturbations and gradients of the tapped layers for
chunk_size rows, x C for "expected", and the largest [chunk, d_A, d_S] EK-FAC projection);
the model's own intermediate activations are not counted beyond its tapped layers' inputs
and outputs. `fit_factors` refuses with a ValueError when the total exceeds `max_bytes`
(default 80% of physical memory), naming what to change.

Artifacts. `save_factors(path, factors, fingerprint)` writes one .npz (arrays + a JSON
header with the layer specs and the fingerprint dict); `load_factors(path, fingerprint)`
raises `FactorsMismatchError` when the stored fingerprint differs.

Use, e.g. on the pipeline's models (a `jax.tree_util.Partial` binds the graphdef, static,
and the batch statistics, traced: one compile whatever their values):

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def logits(graphdef, rest, params, batch):          # module level
        return nnx.merge(graphdef, params, rest)(batch["image"], train=False)

    logits_fn = jax.tree_util.Partial(logits, graphdef, rest)
    factors, info = fit_factors(logits_fn, params, train_batch, layers=find_layers(model),
                                key=jax.random.key(0))
    save_factors(path, factors, fingerprint)              # later: load_factors(path, fp)
    scores, info = kfac_influence(factors, logits_fn, params, train_batch, val_batch,
                                  damping=0.1, damping_mode="relative")
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

from kdprune_jax.errors import ArtifactError
from kdprune_jax.scoring._fn import LossSignatureError, as_tree_fn, batch_size

FISHERS = ("true", "empirical", "expected")
LOSSES = ("cross_entropy", "squared_error")
DAMPING_MODES = ("absolute", "relative")
METHODS = ("kfac", "ekfac")
_FORMAT = "kdprune_jax.kfac/1"


class FactorsMismatchError(ArtifactError, ValueError):
    """Saved factors were fitted for another model or data (their fingerprint differs)."""


def _check_name(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


# ----------------------------------------------------------------------------- layers
@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One tracked layer (hashable: it is part of the jitted programs' static key).

    path: the module's path in the model (and of its kernel/bias in params), e.g.
      ("layers", 0). kind: "linear" or "conv". kernel_shape: [d_in, d_out] (Linear) or
      [*window, c_in, c_out] (Conv, channels last). Conv only: strides, padding (as
      `canonicalize_padding` returns it), input_dilation, kernel_dilation (tuples).
    Rows of the [d_A, d_S] gradient layout: a Linear's kernel rows; a Conv's kernel in
    the patch order (c_in, *window) of `jax.lax.conv_general_dilated_patches`; then the
    bias row when has_bias.
    """

    path: tuple
    kind: str
    kernel_shape: tuple
    has_bias: bool
    strides: tuple = ()
    padding: object = None
    input_dilation: tuple = ()
    kernel_dilation: tuple = ()

    @property
    def name(self) -> str:
        return "/".join(str(p) for p in self.path)

    @property
    def d_a(self) -> int:
        return math.prod(self.kernel_shape[:-1]) + int(self.has_bias)

    @property
    def d_s(self) -> int:
        return self.kernel_shape[-1]


@dataclasses.dataclass(frozen=True)
class Layers:
    """`find_layers`' result: the tracked layers, and what is left out.

    specs: tuple of `LayerSpec`. unsupported: ((path name, reason), ...) for Linear/Conv
    layers not tracked. excluded: names of every nnx.Param outside the tracked layers.
    """

    specs: tuple
    unsupported: tuple = ()
    excluded: tuple = ()


def _tuplify(x, n):
    if x is None:
        return (1,) * n
    return (x,) * n if isinstance(x, int) else tuple(x)


def _hashable(x):
    if isinstance(x, (list, tuple)):
        return tuple(_hashable(v) for v in x)
    return x


def _conv_spec(path, m):
    ks = tuple(m.kernel_size)
    nd = len(ks)
    if m.feature_group_count != 1:
        return None, f"grouped convolution (feature_group_count={m.feature_group_count})"
    if m.mask is not None:
        return None, "masked convolution"
    pad = canonicalize_padding(m.padding, nd)
    if isinstance(pad, str) and pad not in ("SAME", "VALID"):
        return None, f"padding {pad!r} (only SAME, VALID and explicit zero padding)"
    return LayerSpec(path=path, kind="conv", kernel_shape=tuple(m.kernel_shape),
                     has_bias=m.bias is not None, strides=_tuplify(m.strides, nd),
                     padding=_hashable(pad), input_dilation=_tuplify(m.input_dilation, nd),
                     kernel_dilation=_tuplify(m.kernel_dilation, nd)), None


def find_layers(model: nnx.Module) -> Layers:
    """The nnx.Linear and nnx.Conv layers of `model` (any depth, lists included).

    Raises ValueError when the model has none (there is nothing for K-FAC to factor).
    """
    specs, unsupported, covered, params = [], [], set(), []
    for path, node in nnx.iter_graph(model):
        path = tuple(path)
        if isinstance(node, nnx.Param):
            params.append(path)
        elif isinstance(node, nnx.Conv):
            spec, why = _conv_spec(path, node)
            if spec is None:
                unsupported.append(("/".join(map(str, path)), why))
        elif isinstance(node, nnx.Linear):
            spec = LayerSpec(path=path, kind="linear", kernel_shape=tuple(node.kernel.shape),
                             has_bias=node.bias is not None)
        else:
            continue
        if isinstance(node, (nnx.Conv, nnx.Linear)) and spec is not None:
            specs.append(spec)
            covered.update({path + ("kernel",), path + ("bias",)})
    if not specs:
        raise ValueError(
            f"find_layers: {type(model).__name__} has no nnx.Linear or nnx.Conv layer that "
            f"K-FAC can factor" + (f" (unsupported: {unsupported})" if unsupported else "")
            + "; K-FAC / EK-FAC curvature is defined only for those layers")
    excluded = tuple("/".join(map(str, p)) for p in params if p not in covered)
    return Layers(tuple(specs), tuple(unsupported), excluded)


def _key_name(k):
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _leaf_paths(params):
    """[(path tuple without the Variable's trailing 'value', leaf)] of a params pytree."""
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = tuple(_key_name(k) for k in kp)
        if p and p[-1] == "value":
            p = p[:-1]
        out.append((p, leaf))
    return out


def _params_leaf_map(params):
    return dict(_leaf_paths(params))


# ----------------------------------------------------------------------------- capture
_STATE = threading.local()
_PATCH_LOCK = threading.RLock()
_PATCH_DEPTH = [0]
_ORIG = {}


class _Tap:
    def __init__(self, ids, eps):
        self.ids, self.eps = ids, eps
        self.inputs = [[] for _ in range(len(ids))]
        self.outs = [[] for _ in range(len(ids))]


def _wrapped(cls):
    orig = _ORIG[cls]

    @functools.wraps(orig)
    def __call__(self, inputs, *args, **kwargs):
        tap = getattr(_STATE, "tap", None)
        y = orig(self, inputs, *args, **kwargs)
        if tap is None:
            return y
        kernel = getattr(self, "kernel", None)
        idx = tap.ids.get(id(kernel.get_value())) if kernel is not None else None
        if idx is None:
            return y
        call = len(tap.inputs[idx])
        tap.inputs[idx].append(inputs)
        tap.outs[idx].append(jax.ShapeDtypeStruct(y.shape, y.dtype))
        if tap.eps is not None:
            if call >= len(tap.eps[idx]):
                raise RuntimeError("kfac: a layer was called more often than when its calls "
                                   "were counted (logits_fn is not deterministic?)")
            y = y + tap.eps[idx][call].astype(y.dtype)
        return y

    return __call__


@contextlib.contextmanager
def _tapping(ids, eps):
    """Wrap nnx.Linear/nnx.Conv __call__ for this thread while `logits_fn` is traced."""
    with _PATCH_LOCK:
        if _PATCH_DEPTH[0] == 0:
            for cls in (nnx.Linear, nnx.Conv):
                _ORIG[cls] = cls.__dict__["__call__"]
                cls.__call__ = _wrapped(cls)
        _PATCH_DEPTH[0] += 1
    prev = getattr(_STATE, "tap", None)
    tap = _Tap(ids, eps)
    _STATE.tap = tap
    try:
        yield tap
    finally:
        _STATE.tap = prev
        with _PATCH_LOCK:
            _PATCH_DEPTH[0] -= 1
            if _PATCH_DEPTH[0] == 0:
                for cls in (nnx.Linear, nnx.Conv):
                    cls.__call__ = _ORIG.pop(cls)


def _kernel_ids(params, specs):
    leaves = _params_leaf_map(params)
    return {id(leaves[s.path + ("kernel",)]): i for i, s in enumerate(specs)}


def _checked_logits(logits_fn, params, rows):
    z = logits_fn(params, rows)
    b = batch_size(rows)
    if jnp.ndim(z) != 2 or jnp.shape(z)[0] != b:
        raise LossSignatureError(
            f"logits_fn must be (params, batch) -> logits [B, C] with B = the batch's leading "
            f"axis ({b}); it returned shape {tuple(jnp.shape(z))}")
    return z


def _dims(spec):
    return len(spec.kernel_shape) - 2


def _layer_inputs(spec, x, b, dtype):
    """A layer call's input -> a_bar [B, T, d_A] in `dtype` (patches for a Conv)."""
    if x.shape[0] != b:
        raise ValueError(f"kfac: layer {spec.name} was called on an input of shape "
                         f"{tuple(x.shape)} whose leading axis is not the batch ({b})")
    x = x.astype(dtype)
    if spec.kind == "linear":
        a = x.reshape(b, -1, x.shape[-1])
    else:
        nd = _dims(spec)
        x = x.reshape((-1,) + x.shape[x.ndim - nd - 1:])
        sp = "DHW"[3 - nd:]
        dn = (f"N{sp}C", f"{sp}IO", f"N{sp}C")
        a = jax.lax.conv_general_dilated_patches(
            x, spec.kernel_shape[:nd], spec.strides, spec.padding,
            lhs_dilation=spec.input_dilation, rhs_dilation=spec.kernel_dilation,
            dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)
        a = a.reshape(b, -1, a.shape[-1])
    if spec.has_bias:
        a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), dtype)], axis=-1)
    return a


def _out_grads(g, b, dtype):
    """A call's output gradient [K, B, ..., d_S] -> [B, K, T, d_S]."""
    k = g.shape[0]
    return jnp.swapaxes(g.astype(dtype).reshape(k, b, -1, g.shape[-1]), 0, 1)


def _discover(logits_fn, params, rows, specs):
    """(logits aval, per layer: tuple of output avals, one per call), by abstract tracing."""
    def record(p, r):
        with _tapping(_kernel_ids(p, specs), None) as tap:
            z = _checked_logits(logits_fn, p, r)
        return z, tap.outs

    box = {}

    def shapes(p, r):
        z, outs = record(p, r)
        box["outs"] = [tuple(o) for o in outs]
        return z

    z = jax.eval_shape(shapes, params, rows)
    return z, box["outs"]


def _cotangents(z, targets, rows_idx, key, *, loss, fisher, dtype):
    """dl/dz to back-propagate, [B, K, C]: K = 1 (observed or sampled targets) or C."""
    z = z.astype(dtype)
    if fisher == "expected":
        c = z.shape[-1]
        if loss == "squared_error":
            return jnp.broadcast_to(jnp.eye(c, dtype=dtype), (z.shape[0], c, c))
        p = jax.nn.softmax(z, axis=-1)
        # H = diag(p) - p p^T = L L^T with column c of L = sqrt(p_c) (e_c - p).
        return jnp.sqrt(p)[:, :, None] * (jnp.eye(c, dtype=dtype)[None] - p[:, None, :])
    if fisher == "true":
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows_idx)
        if loss == "cross_entropy":
            y = jax.vmap(jax.random.categorical)(keys, z)
        else:
            y = z + jax.vmap(lambda k, zi: jax.random.normal(k, zi.shape, dtype))(keys, z)
    else:
        y = targets
    if loss == "cross_entropy":
        u = jax.nn.softmax(z, axis=-1) - jax.nn.one_hot(y, z.shape[-1], dtype=dtype)
    else:
        u = z - jnp.asarray(y).astype(dtype)
    return u[:, None, :]


def _capture(logits_fn, targets_fn, params, rows, rows_idx, key, specs, *, loss, fisher,
             dtype):
    """Per layer (a_bar [B, T, d_A], g [B, K, T, d_S]) for one chunk of rows."""
    _, outs = _discover(logits_fn, params, rows, specs)
    b = batch_size(rows)
    eps = [[jnp.zeros(o.shape, dtype) for o in calls] for calls in outs]

    def fwd(e):
        with _tapping(_kernel_ids(params, specs), e) as tap:
            z = _checked_logits(logits_fn, params, rows)
        return z, tap.inputs

    z, vjp_fn, inputs = jax.vjp(fwd, eps, has_aux=True)
    tg = None if fisher in ("true", "expected") else targets_fn(rows)
    u = _cotangents(z, tg, rows_idx, key, loss=loss, fisher=fisher, dtype=dtype)
    (grads,) = jax.vmap(vjp_fn, in_axes=1)(u.astype(z.dtype))  # [K, ...] per call
    out = []
    for spec, xs, gs in zip(specs, inputs, grads):
        a = jnp.concatenate([_layer_inputs(spec, x, b, dtype) for x in xs], axis=1)
        g = jnp.concatenate([_out_grads(g, b, dtype) for g in gs], axis=2)
        out.append((a, g))
    return out


def _strided_chunks(batch, chunk_size):
    """batch [N, ...] -> ([m, k, ...], global row index [m, k], mask [m, k], N).

    Chunk c holds rows c, c + m, c + 2m, ...: a [k, m] reshape keeps the leading axis's
    device sharding on k, so every chunk is spread over all devices instead of one chunk
    per device in turn. Rows past N (padding) repeat row 0 and are masked."""
    n = batch_size(batch)
    k = max(1, min(chunk_size or n, n))
    m = -(-n // k)
    pad = m * k - n

    def split(a):
        a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) if pad else a
        return jnp.swapaxes(a.reshape((k, m) + a.shape[1:]), 0, 1)

    rows = jnp.arange(k)[None, :] * m + jnp.arange(m)[:, None]
    return jax.tree.map(split, batch), rows, rows < n, n


def _scan_chunks(fn, init, batch, chunk_size):
    chunks, rows, mask, n = _strided_chunks(batch, chunk_size)

    def body(acc, xs):
        r, idx, msk = xs
        return fn(acc, r, idx, msk), None

    acc, _ = jax.lax.scan(body, init, (chunks, rows, mask))
    return acc, n


def _map_chunks(fn, batch, chunk_size):
    """fn(rows, idx, mask) -> [k] per chunk, returned as [N] in row order."""
    chunks, rows, mask, n = _strided_chunks(batch, chunk_size)
    out = jax.lax.map(lambda xs: fn(*xs), (chunks, rows, mask))  # [m, k]
    return out.T.reshape(-1)[:n]


# ----------------------------------------------------------------------------- factors
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerFactors:
    """One layer's factors (dtype of the kernels).

    a [d_A, d_A], s [d_S, d_S]: the covariances A_l, S_l; qa, la / qs, ls: their
    eigenvectors (columns) and eigenvalues (clipped at 0); lam [d_A, d_S]: the EK-FAC
    eigenvalues (None when fitted with ekfac=False); fallback int32 []: 1 when an
    eigendecomposition was not finite and the identity basis with the factor's diagonal
    replaced it (K-FAC then degrades to a diagonal approximation for that factor).
    """

    a: jax.Array
    s: jax.Array
    qa: jax.Array
    la: jax.Array
    qs: jax.Array
    ls: jax.Array
    lam: jax.Array | None
    fallback: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["layers", "num_examples"],
                   meta_fields=["specs", "loss", "fisher"])
@dataclasses.dataclass(frozen=True)
class Factors:
    """K-FAC / EK-FAC factors of a model (a pytree: jit arguments, device_put, save).

    layers: tuple of `LayerFactors`, one per spec; num_examples: int32 [] (N of the fit);
    specs: tuple of `LayerSpec`; loss / fisher: the settings they were fitted with.
    """

    layers: tuple
    num_examples: jax.Array
    specs: tuple
    loss: str
    fisher: str

    @property
    def ekfac(self) -> bool:
        return all(lf.lam is not None for lf in self.layers)


def _safe_eigh(m):
    """Eigen-decomposition of a symmetric PSD factor, as `head.kronecker_factors` does it:
    eigh reads one triangle (the factor is symmetric by construction); a decomposition that
    is not finite (float32 LAPACK on many equal eigenvalues has returned NaN eigenvectors)
    falls back to the identity basis with the factor's diagonal as eigenvalues, and the
    fallback flag records it. Eigenvalues are clipped at 0 (rounding negatives)."""
    q, lam = jax.lax.linalg.eigh(m, symmetrize_input=False)
    ok = jnp.all(jnp.isfinite(q)) & jnp.all(jnp.isfinite(lam))
    q = jnp.where(ok, q, jnp.eye(m.shape[0], dtype=m.dtype))
    lam = jnp.where(ok, lam, jnp.diagonal(m))
    return q, jnp.maximum(lam, 0), (~ok).astype(jnp.int32)


def _dtype_of(params, specs):
    leaves = _params_leaf_map(params)
    return jnp.promote_types(leaves[specs[0].path + ("kernel",)].dtype, jnp.float32)


@functools.partial(jax.jit, static_argnames=("specs", "loss", "fisher", "chunk_size"))
def _covariances_jit(logits_fn, targets_fn, params, batch, key, *, specs, loss, fisher,
                     chunk_size):
    dtype = _dtype_of(params, specs)

    def step(acc, rows, idx, msk):
        w = msk.astype(dtype)
        caps = _capture(logits_fn, targets_fn, params, rows, idx, key, specs, loss=loss,
                        fisher=fisher, dtype=dtype)
        new = []
        for (sa, ss), (a, g) in zip(acc, caps):
            sa = sa + jnp.einsum("bta,btc,b->ac", a, a, w)
            ss = ss + jnp.einsum("bkts,bktr,b->sr", g, g, w) / g.shape[2]
            new.append((sa, ss))
        return new

    init = [(jnp.zeros((s.d_a, s.d_a), dtype), jnp.zeros((s.d_s, s.d_s), dtype))
            for s in specs]
    acc, n = _scan_chunks(step, init, batch, chunk_size)
    out = []
    for sa, ss in acc:
        a, s = sa / n, ss / n
        qa, la, fa = _safe_eigh(a)
        qs, ls, fs = _safe_eigh(s)
        out.append(LayerFactors(a=a, s=s, qa=qa, la=la, qs=qs, ls=ls, lam=None,
                                fallback=jnp.maximum(fa, fs)))
    return out, n


def _projected_sq(a, g, qa, qs, w):
    """sum_b w_b sum_k (Q_A^T G_bk Q_S)^2 -> [d_A, d_S]; G_bk = sum_t a_bt g_bkt^T."""
    at = a @ qa  # [B, T, d_A]
    gt = g @ qs  # [B, K, T, d_S]
    if a.shape[1] == 1:  # (x y^T)^2 = x^2 (y^2)^T: no per-example [d_A, d_S] matrix
        return jnp.einsum("ba,bks,b->as", jnp.square(at[:, 0]), jnp.square(gt[:, :, 0]), w)
    proj = jnp.einsum("bta,bkts->bkas", at, gt)
    return jnp.einsum("bkas,b->as", jnp.square(proj), w)


@functools.partial(jax.jit, static_argnames=("specs", "loss", "fisher", "chunk_size"))
def _lambda_jit(logits_fn, targets_fn, params, batch, key, bases, *, specs, loss, fisher,
                chunk_size):
    dtype = _dtype_of(params, specs)

    def step(acc, rows, idx, msk):
        w = msk.astype(dtype)
        caps = _capture(logits_fn, targets_fn, params, rows, idx, key, specs, loss=loss,
                        fisher=fisher, dtype=dtype)
        return [lam + _projected_sq(a, g, qa, qs, w)
                for lam, (a, g), (qa, qs) in zip(acc, caps, bases)]

    init = [jnp.zeros((s.d_a, s.d_s), dtype) for s in specs]
    acc, n = _scan_chunks(step, init, batch, chunk_size)
    return [lam / n for lam in acc]


# ----------------------------------------------------------------------------- memory
def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _resolve(logits_fn, params, batch, layers, chunk_size):
    """Specs present in params and reached by logits_fn, with per-call shapes, + report."""
    if isinstance(layers, nnx.Module):
        layers = find_layers(layers)
    if not isinstance(layers, Layers):
        raise TypeError(f"layers= must be find_layers(model) (or the nnx model), got "
                        f"{type(layers).__name__}")
    leaves = _params_leaf_map(params)
    in_params, missing = [], []
    for s in layers.specs:
        k = leaves.get(s.path + ("kernel",))
        if k is None or (s.has_bias and s.path + ("bias",) not in leaves):
            missing.append(s.name)
        elif tuple(k.shape) != tuple(s.kernel_shape):
            raise ValueError(f"kfac: layer {s.name}'s kernel in params has shape "
                             f"{tuple(k.shape)}, the model's has {s.kernel_shape}")
        else:
            in_params.append(s)
    if not in_params:
        raise ValueError("kfac: none of the model's Linear/Conv kernels is in params "
                         f"(layers: {[s.name for s in layers.specs]})")
    n = batch_size(batch)
    k = max(1, min(chunk_size or n, n))
    rows = jax.tree.map(lambda a: jax.ShapeDtypeStruct((k,) + a.shape[1:], a.dtype), batch)
    z, outs = _discover(as_tree_fn(logits_fn, "logits_fn"), params, rows, tuple(in_params))
    reached = [(s, o) for s, o in zip(in_params, outs) if o]
    unreached = [s.name for s, o in zip(in_params, outs) if not o]
    if not reached:
        raise ValueError(
            "kfac: logits_fn called none of the model's Linear/Conv layers with the kernels "
            "in params. It must build the module from the params leaves as given (e.g. "
            "nnx.merge(graphdef, params, rest)), without casting or copying them, and must "
            "not be a jax.jit function already compiled for these shapes")
    specs = tuple(s for s, _ in reached)
    covered = {s.path + (w,) for s in specs for w in ("kernel", "bias")}
    excluded = tuple("/".join(map(str, p)) for p in leaves if p not in covered)
    return specs, [o for _, o in reached], z, dict(
        layers=[s.name for s in specs], excluded=list(excluded),
        unsupported=[list(u) for u in layers.unsupported], unreached=unreached,
        not_in_params=missing)


def _positions(out_avals):
    return sum(math.prod(o.shape[1:-1]) for o in out_avals)


def _memory(specs, outs, z, *, chunk_size, n, fisher, ekfac, itemsize):
    k = max(1, min(chunk_size or n, n))
    kk = z.shape[-1] if fisher == "expected" else 1
    per_layer, factor_b, work_b, proj_b = [], 0, 0, 0
    for s, o in zip(specs, outs):
        t = _positions(o)
        fb = (2 * s.d_a ** 2 + 2 * s.d_s ** 2 + s.d_a + s.d_s
              + (s.d_a * s.d_s if ekfac else 0)) * itemsize
        # a_bar, the perturbation, and g for each of the K back-propagated directions.
        wb = k * t * (s.d_a + s.d_s + 2 * kk * s.d_s) * itemsize
        if ekfac and t > 1:
            proj_b = max(proj_b, k * kk * s.d_a * s.d_s * itemsize)
        per_layer.append(dict(layer=s.name, d_a=s.d_a, d_s=s.d_s, positions=t,
                              factor_bytes=fb, working_bytes=wb))
        factor_b += fb
        work_b += wb
    work_b += proj_b
    return dict(factor_bytes=factor_b, working_bytes=work_b, total_bytes=factor_b + work_b,
                chunk_size=k, directions=kk, layers=per_layer)


def _fmt_bytes(b) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024


def format_memory(est: dict) -> str:
    """A one-paragraph summary of `estimate_memory`'s dict (what `fit_factors` prints)."""
    big = sorted(est["layers"], key=lambda r: -r["factor_bytes"])[:3]
    top = ", ".join(f"{r['layer']} [{r['d_a']}x{r['d_s']}] {_fmt_bytes(r['factor_bytes'])}"
                    for r in big)
    return (f"[kfac] memory estimate: factors {_fmt_bytes(est['factor_bytes'])} over "
            f"{len(est['layers'])} layers (largest: {top}); per-chunk working set "
            f"{_fmt_bytes(est['working_bytes'])} (chunk_size {est['chunk_size']}, "
            f"{est['directions']} direction(s) per example); total "
            f"{_fmt_bytes(est['total_bytes'])}")


def estimate_memory(logits_fn, params, batch, *, layers, fisher: str = "true",
                    ekfac: bool = True, chunk_size: int = 256) -> dict:
    """What `fit_factors` would allocate, from shapes alone (abstract tracing, no compute).

    Returns {"factor_bytes", "working_bytes", "total_bytes", "chunk_size", "directions"
    (C for fisher="expected", else 1), "layers": [{"layer", "d_a", "d_s", "positions",
    "factor_bytes", "working_bytes"}]} (see the module docstring for what is counted).
    """
    _check_name("fisher", fisher, FISHERS)
    specs, outs, z, _ = _resolve(logits_fn, params, batch, layers, chunk_size)
    itemsize = jnp.dtype(_dtype_of(params, specs)).itemsize
    return _memory(specs, outs, z, chunk_size=chunk_size, n=batch_size(batch), fisher=fisher,
                   ekfac=ekfac, itemsize=itemsize)


# ----------------------------------------------------------------------------- fitting
def _get_item(batch, *, name):
    return batch[name]


def _targets_fn(targets):
    if isinstance(targets, str):
        return as_tree_fn(functools.partial(_get_item, name=targets), "targets")
    return as_tree_fn(targets, "targets")


def _key_arg(key, fisher):
    if fisher == "true":
        if key is None:
            raise ValueError("fit_factors(fisher='true') samples labels from the model: pass "
                             "key= (e.g. jax.random.key(0)), or use fisher='empirical' "
                             "(observed labels) or 'expected' (closed form)")
        return key
    return jax.random.key(0)  # unused: a fixed placeholder keeps one compiled program


def fit_factors(logits_fn, params, batch, *, layers, loss: str = "cross_entropy",
                fisher: str = "true", key=None, ekfac: bool = True, targets="label",
                chunk_size: int = 256, max_bytes: int | None = None, log=print):
    """Fit K-FAC factors (and the EK-FAC eigenvalue correction) on `batch`.

    Args:
      logits_fn: ``(params, batch) -> logits [B, C]`` (inference mode, examples uncoupled;
        see the module docstring for how its layers are captured).
      params: nnx.State of the parameters (or a sub-State: layers not in it are skipped).
      batch: pytree with leading axis N (the examples the expectations are over).
      layers: `find_layers(model)` (or the nnx model itself).
      loss: "cross_entropy" (targets int [N]) or "squared_error" (targets float [N, C]).
      fisher: "true" (labels sampled with `key`), "empirical" or "expected".
      key: a jax.random key, required for fisher="true".
      ekfac: also fit the EK-FAC eigenvalues (a second pass over `batch`).
      targets: the batch key of the observed targets, or ``batch -> targets``.
      chunk_size: rows per forward/backward pass (a lax.scan over chunks).
      max_bytes: refuse (ValueError) when the memory estimate exceeds it; None = 80% of
        physical memory.
      log: called with the memory estimate line before fitting (None: silent).
    Returns:
      (Factors, info) with info = {"layers", "excluded" (nnx.Param paths outside the
      tracked layers), "unsupported", "unreached", "not_in_params", "memory"
      (`estimate_memory`'s dict), "fallback" {layer: bool}, "num_examples",
      "seconds" {"covariance", "lambda"}}.
    """
    _check_name("loss", loss, LOSSES)
    _check_name("fisher", fisher, FISHERS)
    key = _key_arg(key, fisher)
    specs, outs, z, report = _resolve(logits_fn, params, batch, layers, chunk_size)
    n = batch_size(batch)
    itemsize = jnp.dtype(_dtype_of(params, specs)).itemsize
    est = _memory(specs, outs, z, chunk_size=chunk_size, n=n, fisher=fisher, ekfac=ekfac,
                  itemsize=itemsize)
    if log is not None:
        log(format_memory(est))
    limit = max_bytes
    if limit is None:
        phys = _physical_memory()
        limit = int(0.8 * phys) if phys else None
    if limit is not None and est["total_bytes"] > limit:
        big = max(est["layers"], key=lambda r: r["factor_bytes"])
        raise ValueError(
            f"fit_factors: the memory estimate {_fmt_bytes(est['total_bytes'])} (factors "
            f"{_fmt_bytes(est['factor_bytes'])}, per-chunk working set "
            f"{_fmt_bytes(est['working_bytes'])}) exceeds max_bytes={limit} "
            f"({_fmt_bytes(limit)}); lower chunk_size= (now {est['chunk_size']}), use "
            f"fisher='true' or 'empirical' instead of 'expected' (x{est['directions']} "
            f"gradients), ekfac=False, or pass params without the largest layers "
            f"(largest: {big['layer']}, [{big['d_a']}x{big['d_s']}], "
            f"{_fmt_bytes(big['factor_bytes'])})")
    fn, tf = as_tree_fn(logits_fn, "logits_fn"), _targets_fn(targets)
    t0 = time.perf_counter()
    layer_f, num = jax.block_until_ready(_covariances_jit(
        fn, tf, params, batch, key, specs=specs, loss=loss, fisher=fisher,
        chunk_size=chunk_size))
    t1 = time.perf_counter()
    if ekfac:
        lams = jax.block_until_ready(_lambda_jit(
            fn, tf, params, batch, key, [(lf.qa, lf.qs) for lf in layer_f], specs=specs,
            loss=loss, fisher=fisher, chunk_size=chunk_size))
        layer_f = [dataclasses.replace(lf, lam=lam) for lf, lam in zip(layer_f, lams)]
    t2 = time.perf_counter()
    factors = Factors(layers=tuple(layer_f), num_examples=jnp.asarray(num, jnp.int32),
                      specs=specs, loss=loss, fisher=fisher)
    fallback = {s.name: bool(lf.fallback) for s, lf in zip(specs, jax.device_get(layer_f))}
    return factors, {**report, "memory": est, "fallback": fallback, "num_examples": n,
                     "seconds": {"covariance": t1 - t0, "lambda": t2 - t1}}


# ----------------------------------------------------------------------------- inverse
def _eigenvalues(lf, method):
    if method == "ekfac":
        return lf.lam
    return lf.la[:, None] * lf.ls[None, :]


def _denominators(factors, damping, method, damping_mode):
    out = []
    for lf in factors.layers:
        lam = _eigenvalues(lf, method)
        d = damping * jnp.mean(lam) if damping_mode == "relative" else damping
        den = lam + jnp.asarray(d, lam.dtype)
        # damping = 0 with a zero eigenvalue would divide by 0: keep den >= eps * max.
        den = jnp.maximum(den, jnp.finfo(lam.dtype).eps * jnp.max(den))
        out.append((den, jnp.asarray(d, lam.dtype)))
    return out


def _precondition(lf, den, g):
    return lf.qa @ ((lf.qa.T @ g.astype(lf.qa.dtype) @ lf.qs) / den) @ lf.qs.T


def _check_method(factors, method, damping_mode, where):
    _check_name("method", method, METHODS)
    _check_name("damping_mode", damping_mode, DAMPING_MODES)
    if not isinstance(factors, Factors):
        raise TypeError(f"{where}: factors must be fit_factors' (or load_factors') Factors, "
                        f"got {type(factors).__name__}")
    if method == "ekfac" and not factors.ekfac:
        raise ValueError(f"{where}(method='ekfac') needs factors fitted with ekfac=True "
                         f"(these have K-FAC eigenvalues only): refit, or use method='kfac'")


def _info(dens, factors):
    zero = jnp.zeros((), factors.layers[0].qa.dtype)
    return {"iterations": jnp.asarray(1), "residual": zero, "diverged": jnp.asarray(False),
            "damping": jnp.stack([d for _, d in dens]),
            "fallback": jnp.stack([lf.fallback for lf in factors.layers])}


def _to_matrix(spec, kernel, bias, dtype):
    """kernel (+ bias) in params layout -> [d_A, d_S] (see `LayerSpec`)."""
    k = kernel.astype(dtype)
    if spec.kind == "conv":
        nd = _dims(spec)
        k = jnp.moveaxis(k, nd, 0)  # [c_in, *window, c_out]: the patch order
    m = k.reshape(-1, spec.d_s)
    if spec.has_bias:
        m = jnp.concatenate([m, bias.astype(dtype)[None]], axis=0)
    return m


def _from_matrix(spec, m):
    """[d_A, d_S] -> (kernel, bias or None) in params layout."""
    k, b = (m[:-1], m[-1]) if spec.has_bias else (m, None)
    if spec.kind == "conv":
        nd = _dims(spec)
        shape = spec.kernel_shape
        k = jnp.moveaxis(k.reshape((shape[nd],) + shape[:nd] + (shape[-1],)), 0, nd)
    return k.reshape(spec.kernel_shape), b


def _like_params(params, factors, mats):
    """A pytree like params: the [d_A, d_S] matrices put back, zeros elsewhere."""
    vals = {}
    for spec, m in zip(factors.specs, mats):
        k, b = _from_matrix(spec, m)
        vals[spec.path + ("kernel",)] = k
        if b is not None:
            vals[spec.path + ("bias",)] = b

    def put(kp, leaf):
        p = tuple(_key_name(k) for k in kp)
        p = p[:-1] if p and p[-1] == "value" else p
        v = vals.get(p)
        return jnp.zeros_like(leaf) if v is None else v.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(put, params)


@functools.partial(jax.jit, static_argnames=("method", "damping_mode"))
def _inverse_jit(factors, tree, damping, *, method, damping_mode):
    dens = _denominators(factors, damping, method, damping_mode)
    leaves = _params_leaf_map(tree)
    dtype = factors.layers[0].qa.dtype
    mats = []
    for spec, lf, (den, _) in zip(factors.specs, factors.layers, dens):
        g = _to_matrix(spec, leaves[spec.path + ("kernel",)],
                       leaves.get(spec.path + ("bias",)), dtype)
        mats.append(_precondition(lf, den, g))
    return _like_params(tree, factors, mats), _info(dens, factors)


def kfac_inverse(factors, tree, *, damping, method: str = "ekfac",
                 damping_mode: str = "absolute"):
    """(F + damping)^-1 applied to a params-shaped pytree (e.g. a gradient).

    Returns (pytree like `tree`: the tracked layers' kernels/biases preconditioned, every
    excluded parameter ZERO; info {"iterations", "residual", "diverged", "damping" [L]
    (the effective damping per layer), "fallback" [L]}).
    """
    _check_method(factors, method, damping_mode, "kfac_inverse")
    return _inverse_jit(factors, tree, damping, method=method, damping_mode=damping_mode)


def _val_matrices(logits_fn, targets_fn, params, val_batch, specs, loss, chunk_size, dtype):
    """Per layer G_val = grad of the mean val loss, [d_A, d_S], with observed targets."""
    def step(acc, rows, idx, msk):
        w = msk.astype(dtype)
        caps = _capture(logits_fn, targets_fn, params, rows, idx, None, specs, loss=loss,
                        fisher="empirical", dtype=dtype)
        return [s + jnp.einsum("bta,bts,b->as", a, g[:, 0], w) for s, (a, g) in zip(acc, caps)]

    init = [jnp.zeros((s.d_a, s.d_s), dtype) for s in specs]
    acc, n = _scan_chunks(step, init, val_batch, chunk_size)
    return [s / n for s in acc]


@functools.partial(jax.jit, static_argnames=("method", "damping_mode", "chunk_size"))
def _s_test_jit(logits_fn, targets_fn, factors, params, val_batch, damping, *, method,
                damping_mode, chunk_size):
    dtype = factors.layers[0].qa.dtype
    dens = _denominators(factors, damping, method, damping_mode)
    gv = _val_matrices(logits_fn, targets_fn, params, val_batch, factors.specs, factors.loss,
                       chunk_size, dtype)
    return [_precondition(lf, den, g) for lf, (den, _), g in zip(factors.layers, dens, gv)], \
        _info(dens, factors)


def kfac_s_test(factors, logits_fn, params, val_batch, *, damping, method: str = "ekfac",
                damping_mode: str = "absolute", targets="label", chunk_size: int = 256):
    """s = (F + damping)^-1 grad L_V with F the K-FAC/EK-FAC curvature, L_V the mean loss
    (`factors.loss`, observed targets) over `val_batch`: the drop-in for `scoring.s_test`.

    Returns (s like params: zeros on excluded parameters, info as `kfac_inverse`); then
    ``scoring.influence_from_s_test(example_losses, params, batch, s)`` gives the same
    scores as `kfac_influence` when `example_losses` is the same loss.
    """
    _check_method(factors, method, damping_mode, "kfac_s_test")
    mats, info = _s_test_jit(as_tree_fn(logits_fn, "logits_fn"), _targets_fn(targets),
                             factors, params, val_batch, damping, method=method,
                             damping_mode=damping_mode, chunk_size=chunk_size)
    return _like_params(params, factors, mats), info


@functools.partial(jax.jit, static_argnames=("method", "damping_mode", "chunk_size"))
def _influence_jit(logits_fn, targets_fn, factors, params, train_batch, val_batch, damping,
                   *, method, damping_mode, chunk_size):
    mats, info = _s_test_jit(logits_fn, targets_fn, factors, params, val_batch, damping,
                             method=method, damping_mode=damping_mode, chunk_size=chunk_size)
    dtype = factors.layers[0].qa.dtype

    def score(rows, idx, msk):
        caps = _capture(logits_fn, targets_fn, params, rows, idx, None, factors.specs,
                        loss=factors.loss, fisher="empirical", dtype=dtype)
        return sum(jnp.einsum("bta,as,bts->b", a, p, g[:, 0]) for (a, g), p in zip(caps, mats))

    return _map_chunks(score, train_batch, chunk_size), info


def kfac_influence(factors, logits_fn, params, train_batch, val_batch, *, damping,
                   method: str = "ekfac", damping_mode: str = "absolute", targets="label",
                   chunk_size: int = 256):
    """influence_i = g_val^T (F + damping)^-1 g_i for every example of `train_batch`.

    g_val: gradient of the mean loss (`factors.loss`) over `val_batch`; g_i: of example
    i's loss; both with the observed targets, through the tracked layers only. Positive =
    helpful (removing i would raise the validation loss), as `scoring.influence`.

    Args:
      factors: from `fit_factors` / `load_factors` for this model (same specs).
      damping: >= 0, required; absolute, or x mean eigenvalue per layer with
        damping_mode="relative" (0.1: kronfluence's heuristic).
      method: "ekfac" (needs factors fitted with ekfac=True) or "kfac".
    Returns:
      (scores [N] in the kernels' dtype, info {"iterations": 1, "residual": 0, "diverged":
      False, "damping" [L], "fallback" [L]}).
    """
    _check_method(factors, method, damping_mode, "kfac_influence")
    return _influence_jit(as_tree_fn(logits_fn, "logits_fn"), _targets_fn(targets), factors,
                          params, train_batch, val_batch, damping, method=method,
                          damping_mode=damping_mode, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("method", "damping_mode", "chunk_size"))
def _self_influence_jit(logits_fn, targets_fn, factors, params, batch, damping, *, method,
                        damping_mode, chunk_size):
    dtype = factors.layers[0].qa.dtype
    dens = _denominators(factors, damping, method, damping_mode)

    def score(rows, idx, msk):
        caps = _capture(logits_fn, targets_fn, params, rows, idx, None, factors.specs,
                        loss=factors.loss, fisher="empirical", dtype=dtype)
        total = 0.0
        for (a, g), lf, (den, _) in zip(caps, factors.layers, dens):
            at, gt = a @ lf.qa, g[:, 0] @ lf.qs
            if a.shape[1] == 1:
                total = total + jnp.einsum("ba,as,bs->b", jnp.square(at[:, 0]), 1.0 / den,
                                           jnp.square(gt[:, 0]))
            else:
                proj = jnp.einsum("bta,bts->bas", at, gt)
                total = total + jnp.einsum("bas,as->b", jnp.square(proj), 1.0 / den)
        return total

    return _map_chunks(score, batch, chunk_size), _info(dens, factors)


def kfac_self_influence(factors, logits_fn, params, batch, *, damping, method: str = "ekfac",
                        damping_mode: str = "absolute", targets="label",
                        chunk_size: int = 256):
    """g_i^T (F + damping)^-1 g_i for every example of `batch` (observed targets), from
    each layer's per-example gradient projected into the Kronecker eigenbasis.
    Returns (scores [B], info as `kfac_influence`)."""
    _check_method(factors, method, damping_mode, "kfac_self_influence")
    return _self_influence_jit(as_tree_fn(logits_fn, "logits_fn"), _targets_fn(targets),
                               factors, params, batch, damping, method=method,
                               damping_mode=damping_mode, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- artifacts
def _spec_json(s: LayerSpec) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(s).items()}


def _spec_from_json(d: dict) -> LayerSpec:
    return LayerSpec(**{k: _hashable(v) if isinstance(v, list) else v for k, v in d.items()})


def _canon(fp):
    return json.loads(json.dumps(fp, sort_keys=True, default=str))


def save_factors(path: str, factors: Factors, fingerprint: dict) -> None:
    """Write `factors` to `path` (.npz, atomically: a temporary file then a rename), with
    `fingerprint` (a JSON-serialisable dict naming the model weights, data and settings
    they were fitted on) stored beside them for `load_factors` to check."""
    host = jax.device_get(factors)
    arrays = {"num_examples": np.asarray(host.num_examples)}
    for i, lf in enumerate(host.layers):
        for f in dataclasses.fields(LayerFactors):
            v = getattr(lf, f.name)
            if v is not None:
                arrays[f"{i}/{f.name}"] = np.asarray(v)
    header = {"format": _FORMAT, "loss": factors.loss, "fisher": factors.fisher,
              "specs": [_spec_json(s) for s in factors.specs],
              "fingerprint": _canon(fingerprint)}
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_factors(path: str, fingerprint: dict | None) -> Factors:
    """Read factors written by `save_factors`.

    Raises `FactorsMismatchError` (naming the differing keys) when `fingerprint` differs
    from the stored one; ``fingerprint=None`` skips the check. Arrays come back as jax
    arrays in their saved dtypes.
    """
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read K-FAC factors {path}: {e}") from e
    header = json.loads(bytes(data.pop("__header__")).decode())
    if header.get("format") != _FORMAT:
        raise ArtifactError(f"{path}: not a K-FAC factors file ({header.get('format')!r})")
    if fingerprint is not None:
        want, got = _canon(fingerprint), header["fingerprint"]
        if want != got:
            keys = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise FactorsMismatchError(
                f"K-FAC factors {path} were fitted for another model or data: fingerprint "
                f"keys {keys} differ (stored {[got.get(k) for k in keys]}, now "
                f"{[want.get(k) for k in keys]}); refit them")
    specs = tuple(_spec_from_json(d) for d in header["specs"])
    fields = [f.name for f in dataclasses.fields(LayerFactors)]
    layers = tuple(
        LayerFactors(**{f: jnp.asarray(data[f"{i}/{f}"]) if f"{i}/{f}" in data else None
                        for f in fields})
        for i in range(len(specs)))
    return Factors(layers=layers, num_examples=jnp.asarray(data["num_examples"]),
                   specs=specs, loss=header["loss"], fisher=header["fisher"])
