"""Frozen models and the sharded batch pass every stage runs them with.

A `FrozenModel` is a trained network that no stage updates any more (a teacher, a proxy):
its nnx split (graphdef, params, batch_stats) plus the fingerprint of what produced it,
which is what the artifacts downstream of it are keyed on. `batch_pass` runs a jitted
function over fixed-size, padded, "data"-sharded batches and hands every real row back
to the host (padding rows are dropped): every per-example pass of the features, scores,
influence and teacher-views stages is one.

Imports only leaves (sharding, faults, preemption, cpu_flags): stages import this module,
never each other.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdprune_jax import cpu_flags, faults, preemption, sharding


@dataclasses.dataclass
class FrozenModel:
    """A trained network used in inference mode: its nnx split and its fingerprint.

    graphdef: nnx.GraphDef; params / batch_stats: nnx.State pytrees (BatchNorm statistics
    frozen, so examples do not couple); fingerprint: str, the key of what produced it
    (training recipe + data, or the imported file)."""

    graphdef: object
    params: object
    batch_stats: object
    fingerprint: str

    @property
    def parts(self) -> tuple:
        """(graphdef, params, batch_stats): the form `train.train_model` takes a teacher in."""
        return self.graphdef, self.params, self.batch_stats


def batch_pass(fn, args, batches, mesh, num_rows: int, sink=None, name: str = "scores"):
    """Run ``fn(*args, batch) -> [B] or [B, K]`` over `batches`.

    Args:
      fn: a pure function of replicated `args` and one global batch (dict with "index" int
        [B], "mask" {0, 1} [B] and whatever `fn` reads); jitted once here, with the batch
        sharded on "data".
      batches: an iterable of host batches (this process's slice of each global batch),
        e.g. `Run.eval_batches(indices)` or `data.views_dataset`.
      num_rows: the length of the returned array (without a sink): the row keys ("index")
        are positions in [0, num_rows).
      sink: optional ``sink(index [b], values [b, ...])`` receiving the real rows of each
        batch as they arrive (host memory bounded by a few batches, e.g. a memmap).
      name: labels the pass's kill points ``<name>:batch<k>`` (faults.py) and its
        preemption check.

    Returns: without a sink, float32 [num_rows, ...] with each row at its "index" (NaN for
    rows no batch carried); with a sink, None. Rows of padding (mask 0) are never passed on.
    """
    repl, bsh = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def with_rows(*a):
        batch = a[-1]
        return batch["index"], batch["mask"], fn(*a)

    # Outputs replicated: XLA all-gathers each batch's [B, ...] results (small next to
    # the images) so that every process can read every row; with several processes a
    # "data"-sharded output would span devices this process cannot address.
    # compiler_options: the XLA:CPU defaults of the hot programs (cpu_flags); `fn` must not
    # hold dense linear algebra (eigh/Cholesky/LU), which they cannot compile.
    jfn = jax.jit(with_rows, in_shardings=(repl,) * len(args) + (bsh,), out_shardings=repl,
                  compiler_options=cpu_flags.compiler_options())
    args = sharding.replicate(args, mesh)
    out = None
    pending = []

    def to_array(idx, vals):
        nonlocal out
        if out is None:
            out = np.full((num_rows,) + vals.shape[1:], np.nan, np.float32)
        out[idx] = vals

    sink = sink or to_array

    def flush():
        for idx, mask, vals in jax.device_get(pending):
            keep = mask > 0
            sink(idx[keep], vals[keep])
        pending.clear()

    kill_armed = faults.armed(f"{name}:batch") or faults.signal_armed(f"{name}:batch")
    for k, batch in enumerate(batches, 1):
        g = sharding.to_global(batch, mesh)
        pending.append(jfn(*args, g))
        if kill_armed:  # kill point <name>:batch<k>: mid-pass, results so far lost
            faults.maybe_kill(f"{name}:batch{k}", before=lambda: jax.block_until_ready(pending))
            faults.maybe_signal(f"{name}:batch{k}")
        preemption.check(name)  # SIGTERM mid-pass: stop now, the pass is redone on rerun
        if len(pending) >= 16:  # bound host memory; the device stays ahead meanwhile
            flush()
    flush()
    return out


def forward_fn(graphdef):
    """(params, batch_stats, batch) -> float [B, C + D]: inference-mode logits, then the
    penultimate features (the models' ``return_features=True``)."""

    def fn(params, bs, batch):
        logits, feats = nnx.merge(graphdef, params, bs)(batch["image"], train=False,
                                                        return_features=True)
        return jnp.concatenate([logits, feats], axis=-1)

    return fn


def logits_fn(graphdef):
    """(params, batch_stats, batch) -> float [B, C]: inference-mode logits."""

    def fn(params, bs, batch):
        return nnx.merge(graphdef, params, bs)(batch["image"], train=False)

    return fn


def feature_dim(model: FrozenModel, image_shape: tuple) -> int:
    """Penultimate width D of `model` on images of `image_shape` (H, W, C), from an
    abstract evaluation (no compute)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

    def f(p, b, x):
        return nnx.merge(model.graphdef, p, b)(x, train=False, return_features=True)[1]

    return int(jax.eval_shape(f, model.params, model.batch_stats, x).shape[-1])


def logits_and_features(model: FrozenModel, batches, mesh, num_rows: int, num_classes: int):
    """Inference-mode logits float32 [num_rows, C] and penultimate features [num_rows, D] of
    `model` over `batches` (one `batch_pass` of `forward_fn`; NaN rows where no batch
    carried an example)."""
    out = batch_pass(forward_fn(model.graphdef), (model.params, model.batch_stats), batches,
                     mesh, num_rows)
    return out[:, :num_classes], out[:, num_classes:]
