"""Where the KD step's time goes: every convolution of a CIFAR ResNet-20 at batch 128, its
forward, input gradient (dx) and kernel gradient (dw) timed apart, XLA vs PyTorch (oneDNN,
channels_last) on the same machine, weighted by how often the model uses each shape.

If the convolutions alone are slower in XLA by about the same factor as the whole step, the
gap is XLA:CPU's convolution kernels, not our step (layout, BatchNorm, fusion, input
pipeline). The last rows ask whether the slowest part, the kernel gradient, would be faster
written as XLA GEMMs (im2col, or one GEMM per kernel offset) than as XLA's convolution.
Each figure: median of >= 5 calls after warm-up.
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


def _conv_args(h, cin, cout, stride, k, batch):
    """One convolution's inputs: NHWC images, HWIO kernel, an output cotangent."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, h, h, cin)).astype(np.float32)
    w = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
    g = rng.standard_normal((batch, -(-h // stride), -(-h // stride), cout)).astype(np.float32)
    return x, w, g


def _jax_fns(h, cin, cout, stride, k, batch):
    """XLA's forward, input gradient and kernel gradient, each its own program (jax.vjp
    with respect to one argument: XLA removes the other gradient's convolution)."""
    import jax
    import jax.numpy as jnp

    from kdprune_jax import cpu_flags

    x, w, g = (jnp.asarray(a) for a in _conv_args(h, cin, cout, stride, k, batch))
    pad = ((k // 2, k // 2),) * 2

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), pad,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # The train step's XLA:CPU options (train/steps.py passes the same), so these programs
    # are compiled as the step's convolutions are.
    opts = cpu_flags.compiler_options()
    fwd = jax.jit(conv, compiler_options=opts)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
                 compiler_options=opts)
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
                 compiler_options=opts)
    return (lambda: fwd(x, w)), (lambda: dx(x, w, g)), (lambda: dw(x, w, g))


def _torch_fns(h, cin, cout, stride, k, batch):
    """PyTorch's (oneDNN, channels_last) forward, input gradient and kernel gradient: the
    `aten.convolution_backward` kernel autograd calls, asked for one gradient at a time."""
    import torch

    x, w, g = (torch.from_numpy(a) for a in _conv_args(h, cin, cout, stride, k, batch))
    cl = torch.channels_last
    x = x.permute(0, 3, 1, 2).contiguous(memory_format=cl)
    w = w.permute(3, 2, 0, 1).contiguous(memory_format=cl)  # HWIO -> OIHW
    g = g.permute(0, 3, 1, 2).contiguous(memory_format=cl)
    conv_args = dict(bias_sizes=None, stride=[stride] * 2, padding=[k // 2] * 2,
                     dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1)
    back = torch.ops.aten.convolution_backward

    def fwd():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x, w, None, stride, k // 2)

    def dx():
        return back(g, x, w, output_mask=[True, False, False], **conv_args)[0]

    def dw():
        return back(g, x, w, output_mask=[False, True, False], **conv_args)[1]

    return fwd, dx, dw


def _kernel_grad_as_gemm(h, cin, cout, k, batch):
    """The kernel gradient of a stride-1 'same' convolution written as matrix products, the
    formulations one would try to route it to XLA's GEMM (which reaches the machine's matmul
    peak on square matrices): `im2col` builds the (B*H*W, k*k*cin) patch matrix from k*k
    slices and contracts it with the cotangent in one GEMM; `shifted` flattens the padded
    image so each kernel offset is one contiguous slice and takes k*k (cin x cout) GEMMs over
    B*H*(W+k-1) rows (the extra columns meet zero cotangent). Both are checked against
    XLA's convolution gradient before they are timed."""
    import jax
    import jax.numpy as jnp

    from kdprune_jax import cpu_flags

    x, w, g = (jnp.asarray(a) for a in _conv_args(h, cin, cout, 1, k, batch))
    p = k // 2
    contract_rows = (((0,), (0,)), ((), ()))

    def im2col(x, g):
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        cols = jnp.concatenate([xp[:, i:i + h, j:j + h, :] for i in range(k) for j in range(k)],
                               axis=-1)
        r = jax.lax.dot_general(cols.reshape(-1, k * k * cin), g.reshape(-1, cout),
                                contract_rows)
        return r.reshape(k, k, cin, cout)

    def shifted(x, g):
        wp = h + 2 * p  # padded width; one more padded row keeps the last slice in range
        xp = jnp.pad(x, ((0, 0), (p, p + 1), (p, p), (0, 0))).reshape(batch, -1, cin)
        gp = jnp.pad(g, ((0, 0), (0, 0), (0, 2 * p), (0, 0))).reshape(-1, cout)
        n = h * wp
        r = [jax.lax.dot_general(xp[:, i * wp + j:i * wp + j + n, :].reshape(-1, cin), gp,
                                 contract_rows) for i in range(k) for j in range(k)]
        return jnp.stack(r).reshape(k, k, cin, cout)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((p, p),) * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    opts = cpu_flags.compiler_options()
    ref = jax.jit(lambda x, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
                  compiler_options=opts)(x, g)
    fns = {}
    for name, f in (("im2col", im2col), ("shifted", shifted)):
        jf = jax.jit(f, compiler_options=opts)
        err = float(jnp.max(jnp.abs(jf(x, g) - ref)) / jnp.max(jnp.abs(ref)))
        if not err < 1e-4:  # equal work or no row
            raise AssertionError(f"{name} kernel gradient differs from XLA's: {err:.1e}")
        fns[name] = (lambda jf=jf: jf(x, g)), err
    return fns


def run(batch: int = 128, reps: int = 5):
    import jax

    def t_jax(f):
        return timed(f, reps=reps, warmup=2, sync=jax.block_until_ready)[0]

    def t_torch(f):
        return timed(f, reps=reps, warmup=2)[0]

    parts = ("fwd", "dx", "dw")
    rows = []
    tot = {(side, part): 0.0 for side in ("xla", "torch") for part in parts}
    for i, (h, cin, cout, stride, k, uses) in enumerate(RESNET20_CONVS):
        t = {}
        for part, jf, tf in zip(parts, _jax_fns(h, cin, cout, stride, k, batch),
                                _torch_fns(h, cin, cout, stride, k, batch)):
            t["xla", part], t["torch", part] = t_jax(jf), t_torch(tf)
        # The step never asks for the stem's input gradient (the images are not trained),
        # so the totals leave it out; the stem's row still shows it.
        for (side, part), v in t.items():
            if not (i == 0 and part == "dx"):
                tot[side, part] += uses * v

        def label(side, t=t):
            name = "XLA" if side == "xla" else "PyTorch"
            return f"{name} fwd {1e3 * t[side, 'fwd']:.2f} + dx {1e3 * t[side, 'dx']:.2f} " \
                   f"+ dw {1e3 * t[side, 'dw']:.2f}"

        ours, ref = (sum(t[side, p] for p in parts) for side in ("xla", "torch"))
        flops = 2 * batch * (h // stride) ** 2 * k * k * cin * cout
        rows.append(Row(
            workload=f"conv {k}x{k}/{stride} {h}x{h}x{cin}->{cout}, batch {batch} (x{uses})",
            unit="ms", higher_is_better=False, ours=1e3 * ours, ours_label=label("xla"),
            ref=1e3 * ref, ref_label=label("torch"), reps=reps, flops=3 * flops,
            achieved_gflops=3 * flops / ours / 1e9,
            notes="dx / dw ratios {:.2f}x / {:.2f}x".format(
                t["torch", "dx"] / t["xla", "dx"], t["torch", "dw"] / t["xla", "dw"])))
    what = {"fwd": "forwards", "dx": "input gradients (stem's left out)",
            "dw": "kernel gradients"}
    for part in parts:
        rows.append(Row(
            workload=f"all ResNet-20 convolutions' {what[part]}, batch {batch}", unit="ms",
            higher_is_better=False, ours=1e3 * tot["xla", part], ours_label="XLA",
            ref=1e3 * tot["torch", part], ref_label="PyTorch", reps=reps,
            notes="sum over the model's convolutions, each weighted by its number of uses"))
    ours, ref = (sum(tot[side, p] for p in parts) for side in ("xla", "torch"))
    rows.append(Row(
        workload=f"all ResNet-20 convolutions, fwd + dx + dw as the step needs them, "
                 f"batch {batch}", unit="ms", higher_is_better=False, ours=1e3 * ours,
        ours_label="XLA " + " + ".join(f"{p} {1e3 * tot['xla', p]:.1f}" for p in parts),
        ref=1e3 * ref,
        ref_label="PyTorch " + " + ".join(f"{p} {1e3 * tot['torch', p]:.1f}" for p in parts),
        reps=reps, notes="sum over the model's convolutions, each weighted by its number of "
                         "uses; the stem's input gradient left out"))
    # Can XLA's GEMM do the kernel gradients better than its convolution? Reference: XLA's
    # own convolution kernel gradient (ratio > 1 would mean the GEMM form pays).
    for h, cin, cout, stride, k, _ in RESNET20_CONVS:
        if stride != 1 or k != 3:
            continue
        conv_dw = t_jax(_jax_fns(h, cin, cout, 1, k, batch)[2])
        for name, (f, err) in _kernel_grad_as_gemm(h, cin, cout, k, batch).items():
            ms = t_jax(f)
            rows.append(Row(
                workload=f"kernel gradient 3x3 {h}x{h}x{cin}->{cout} as GEMM ({name}), "
                         f"batch {batch}", unit="ms", higher_is_better=False, ours=1e3 * ms,
                ours_label=f"XLA {name} GEMM", ref=1e3 * conv_dw,
                ref_label="XLA convolution gradient", reps=reps,
                notes=f"max relative difference {err:.1e}"))
    return rows
