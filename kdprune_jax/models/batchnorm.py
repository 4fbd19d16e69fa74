"""BatchNorm whose training-mode forward and backward are one hand-written VJP.

`BatchNorm` is `flax.nnx.BatchNorm` (same variables: scale, bias, mean, var; same momentum
and biased-variance running statistics; same inference mode) with the training-mode call
replaced by `batch_norm_train`, a `jax.custom_vjp`:

- forward: per-channel E[x] and E[x^2] (float32 even for bfloat16 inputs), then
  y = (x - mean) * rsqrt(var + eps) * scale + bias;
- backward: the closed form dx = scale * rsqrt(var + eps) / n * (n dy - sum(dy) -
  xhat * sum(dy * xhat)): two per-channel reductions and one elementwise pass, where
  autodiff of the forward makes XLA keep more intermediates and reduction passes.

Why: on the 2-core benchmark machine, with kdprune_jax's XLA:CPU defaults
(`kdprune_jax.cpu_flags`), the KD train step ResNet-20 -> ResNet-20 runs 1.02-1.10x
faster than with flax's BatchNorm (two runs) (README "Benchmarks", `python -m benchmarks.run --only
kd_step`, the BatchNorm-formulation row). The reductions are XLA's pairwise
sums: a [1, n] @ [n, C] matmul formulation was no faster in the whole step (with or without
the YNNPACK fusions) and accumulates sequentially, ~1% relative gradient error in float32.

Limits: `jax.custom_vjp` has no forward-mode rule, so jax.jvp / jacfwd / forward-over-
reverse HVPs through a model in TRAINING mode raise; every HVP in kdprune_jax (influence,
IF-Beta) runs models in inference mode, which is the stock path. Calls with `mask`,
`axis_name`, a non-last feature axis or `use_fast_variance=False` use flax's implementation
unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _channel_sums(a2):
    """Per-channel sums of a [n, C] array (XLA's reduction: pairwise, accurate in float32;
    a [1, n] @ [n, C] product was no faster and accumulates sequentially, visibly less
    accurate at n = 128 * 32 * 32 in a scratch float64 comparison)."""
    return jnp.sum(a2, axis=0)


def _stats(x2):
    n = x2.shape[0]
    mean = _channel_sums(x2) / n
    # Fast variance as flax's default (use_fast_variance=True), clipped at 0 for roundoff.
    var = jnp.maximum(0.0, _channel_sums(x2 * x2) / n - mean * mean)
    return mean, var


def _forward(x, scale, bias, epsilon):
    c = x.shape[-1]
    f32 = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 under x64
    x2 = x.reshape(-1, c).astype(f32)
    mean, var = _stats(x2)
    inv = jax.lax.rsqrt(var + epsilon)
    xhat = (x.astype(f32) - mean) * inv
    y = (xhat * scale + bias).astype(x.dtype)
    return y, mean, var, xhat, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x, scale, bias, epsilon):
    y, mean, var, _, _ = _forward(x, scale, bias, epsilon)
    return y, mean, var


def batch_norm_train(x, scale, bias, epsilon: float):
    """Training-mode batch normalization over all axes but the last.

    Args:
      x: [..., C] activations (float32 or bfloat16); statistics over all leading axes.
      scale, bias: [C] float32.
      epsilon: scalar added to the variance.
    Returns:
      (y [..., C] in x's dtype, batch mean [C] float32, biased batch variance [C] float32).
    """
    return _batch_norm_train(x, scale, bias, float(epsilon))


def _fwd(x, scale, bias, epsilon):
    y, mean, var, xhat, inv = _forward(x, scale, bias, epsilon)
    # Residuals: xhat (float32, x's shape) rather than x, so the backward is one pass.
    return (y, mean, var), (xhat, inv, scale)  # scale also carries the params' dtype


def _bwd(epsilon, res, cts):
    xhat, inv, scale = res
    dy, d_mean, d_var = cts
    c = xhat.shape[-1]
    n = xhat.size // c
    dy2 = dy.reshape(-1, c).astype(xhat.dtype)
    d_bias = _channel_sums(dy2)
    d_scale = _channel_sums(dy2 * xhat.reshape(-1, c))
    # dx = a * dy + b + k * xhat with per-channel a, b, k; the mean/var outputs' cotangents
    # (zero when, as in BatchNorm, they only feed stop-gradient running statistics) enter
    # b and k: d mean/dx = 1/n, d var/dx = 2 (x - mean)/n = 2 xhat / (inv n).
    a = scale * inv
    b = (d_mean - a * d_bias) / n
    k = (2.0 * d_var / inv - a * d_scale) / n
    dx = (a * dy.astype(xhat.dtype) + b + k * xhat).astype(dy.dtype)  # dy has x's dtype
    # Cotangents in the parameters' dtype (float32 params, float64 math under x64).
    return dx, d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


_batch_norm_train.defvjp(_fwd, _bwd)


class BatchNorm(nnx.BatchNorm):
    """`flax.nnx.BatchNorm` with the training-mode call through `batch_norm_train`
    (identical variables, running-statistics update and inference mode).
    `closed_form_vjp=False` (set with `models.with_batchnorm_vjp`) runs flax's own call:
    only to measure what the closed-form backward buys."""

    closed_form_vjp = True  # class default; an instance's setting is static (graphdef)

    def __call__(self, x, use_running_average=None, *, mask=None):
        ura = self.use_running_average if use_running_average is None else use_running_average
        # Everything but the plain training call is flax's code, including its error when
        # neither the call nor the constructor says which mode (ura is None).
        if (not self.closed_form_vjp or ura is None or ura or mask is not None
                or self.axis_name is not None or self.axis not in (-1, x.ndim - 1)
                or self.scale is None or self.bias is None or not self.use_fast_variance):
            return super().__call__(x, use_running_average, mask=mask)
        # As flax's promote_dtype: the layer's dtype, else x promoted with the params'.
        dtype = self.dtype if self.dtype is not None else jnp.promote_types(
            x.dtype, self.param_dtype)
        y, mean, var = batch_norm_train(x.astype(dtype), self.scale[...], self.bias[...],
                                        self.epsilon)
        # Running statistics as flax: momentum * old + (1 - momentum) * batch, no gradient.
        self.mean[...] = jax.lax.stop_gradient(
            self.momentum * self.mean[...] + (1 - self.momentum) * mean)
        self.var[...] = jax.lax.stop_gradient(
            self.momentum * self.var[...] + (1 - self.momentum) * var)
        return y
