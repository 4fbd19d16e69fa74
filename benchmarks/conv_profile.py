"""Where the KD step's time goes: every convolution of a CIFAR ResNet-20 at batch 128,
forward and backward (input and kernel gradients), XLA vs PyTorch (channels_last) on the
same machine, weighted by how often the model uses each shape.

If the convolutions alone are slower in XLA by about the same factor as the whole step, the
gap is XLA:CPU's convolution kernels, not our step (layout, BatchNorm, fusion, input
pipeline). Each figure: median of >= 5 calls after warm-up.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import Row, timed

# (spatial size of the input, in channels, out channels, stride, kernel, uses in ResNet-20)
RESNET20_CONVS = (
    (32, 3, 16, 1, 3, 1),  # stem
    (32, 16, 16, 1, 3, 6),  # stage 1
    (32, 16, 32, 2, 3, 1), (32, 16, 32, 2, 1, 1), (16, 32, 32, 1, 3, 5),  # stage 2
    (16, 32, 64, 2, 3, 1), (16, 32, 64, 2, 1, 1), (8, 64, 64, 1, 3, 5),  # stage 3
)


def _jax_fns(h, cin, cout, stride, k, batch):
    import jax
    import jax.numpy as jnp

    from kdprune_jax import cpu_flags

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    pad = ((k // 2, k // 2),) * 2

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), pad,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = jnp.ones_like(conv(x, w))
    # The train step's XLA:CPU options (train/steps.py passes the same), so these programs
    # are compiled as the step's convolutions are.
    opts = cpu_flags.compiler_options()
    fwd = jax.jit(conv, compiler_options=opts)
    bwd = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g), compiler_options=opts)
    return (lambda: fwd(x, w)), (lambda: bwd(x, w, g))


def _torch_fns(h, cin, cout, stride, k, batch):
    import torch

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, cin, h, h)).astype(np.float32))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False).to(
        memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
    g = torch.ones_like(y)

    def fwd():
        with torch.no_grad():
            return conv(x)

    def bwd():
        y = conv(x)
        return torch.autograd.grad(y, (x, conv.weight), g)

    return fwd, bwd


def run(batch: int = 128, reps: int = 5):
    import jax

    rows = []
    tot = {"jf": 0.0, "jb": 0.0, "tf": 0.0, "tb": 0.0}
    for h, cin, cout, stride, k, uses in RESNET20_CONVS:
        jf, jb = _jax_fns(h, cin, cout, stride, k, batch)
        tf, tb = _torch_fns(h, cin, cout, stride, k, batch)
        t = {"jf": timed(jf, reps=reps, warmup=2, sync=jax.block_until_ready)[0],
             "jb": timed(jb, reps=reps, warmup=2, sync=jax.block_until_ready)[0],
             "tf": timed(tf, reps=reps, warmup=2)[0], "tb": timed(tb, reps=reps, warmup=2)[0]}
        for key in tot:
            tot[key] += uses * t[key]
        flops = 2 * batch * (h // stride) ** 2 * k * k * cin * cout
        rows.append(Row(
            workload=f"conv {k}x{k}/{stride} {h}x{h}x{cin}->{cout}, batch {batch} (x{uses})",
            unit="ms", higher_is_better=False, ours=1e3 * (t["jf"] + t["jb"]),
            ours_label=f"XLA fwd {1e3 * t['jf']:.2f} + bwd {1e3 * t['jb']:.2f}",
            ref=1e3 * (t["tf"] + t["tb"]),
            ref_label=f"PyTorch fwd {1e3 * t['tf']:.2f} + bwd {1e3 * t['tb']:.2f}", reps=reps,
            flops=3 * flops, achieved_gflops=3 * flops / (t["jf"] + t["jb"]) / 1e9))
    rows.append(Row(
        workload=f"all ResNet-20 convolutions, fwd + bwd, batch {batch}", unit="ms",
        higher_is_better=False, ours=1e3 * (tot["jf"] + tot["jb"]),
        ours_label=f"XLA fwd {1e3 * tot['jf']:.1f} + bwd {1e3 * tot['jb']:.1f}",
        ref=1e3 * (tot["tf"] + tot["tb"]),
        ref_label=f"PyTorch fwd {1e3 * tot['tf']:.1f} + bwd {1e3 * tot['tb']:.1f}", reps=reps,
        notes="sum over the model's convolutions, each weighted by its number of uses"))
    return rows
