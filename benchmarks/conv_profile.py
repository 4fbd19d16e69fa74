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

import statistics
import time

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
    slices and contracts it with the cotangent in one GEMM; `im2col GEMM only` is that GEMM
    alone on a patch matrix built beforehand (what the GEMM itself costs); `shifted`
    flattens the padded image so each kernel offset is one contiguous slice and takes k*k
    (cin x cout) GEMMs over B*H*(W+k-1) rows (the extra columns meet zero cotangent).

    Returns {name: (thunk, max relative difference from XLA's convolution gradient)}, the
    first entry being XLA's convolution gradient itself (the reference); every form is
    checked against it before anything is timed."""
    import jax
    import jax.numpy as jnp

    from kdprune_jax import cpu_flags

    x, _, g = (jnp.asarray(a) for a in _conv_args(h, cin, cout, 1, k, batch))
    p = k // 2
    contract_rows = (((0,), (0,)), ((), ()))

    def patches(x):
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        cols = jnp.concatenate([xp[:, i:i + h, j:j + h, :] for i in range(k) for j in range(k)],
                               axis=-1)
        return cols.reshape(-1, k * k * cin)

    def gemm(cols, g):
        r = jax.lax.dot_general(cols, g.reshape(-1, cout), contract_rows)
        return r.reshape(k, k, cin, cout)

    def shifted(x, g):
        wp = h + 2 * p  # padded width; one more padded row keeps the last slice in range
        xp = jnp.pad(x, ((0, 0), (p, p + 1), (p, p), (0, 0))).reshape(batch, -1, cin)
        gp = jnp.pad(g, ((0, 0), (0, 0), (0, 2 * p), (0, 0))).reshape(-1, cout)
        n = h * wp
        r = [jax.lax.dot_general(xp[:, i * wp + j:i * wp + j + n, :].reshape(-1, cin), gp,
                                 contract_rows) for i in range(k) for j in range(k)]
        return jnp.stack(r).reshape(k, k, cin, cout)

    opts = cpu_flags.compiler_options()
    jit = lambda f: jax.jit(f, compiler_options=opts)  # noqa: E731
    # The reference is the profile's own dw program on the same inputs (same seed).
    conv_dw = _jax_fns(h, cin, cout, 1, k, batch)[2]
    ref = conv_dw()
    cols = jax.block_until_ready(jit(patches)(x))
    forms = {"im2col": (jit(lambda x, g: gemm(patches(x), g)), (x, g)),
             "im2col GEMM only": (jit(gemm), (cols, g)),
             "shifted": (jit(shifted), (x, g))}
    out = {"XLA convolution gradient": (conv_dw, 0.0)}
    for name, (jf, args) in forms.items():
        err = float(jnp.max(jnp.abs(jf(*args) - ref)) / jnp.max(jnp.abs(ref)))
        if not err < 1e-4:  # equal work or no row
            raise AssertionError(f"{name} kernel gradient differs from XLA's: {err:.1e}")
        out[name] = (lambda jf=jf, args=args: jf(*args)), err
    return out


def _check_equal_work(jax_fns, torch_fns, what):
    """Both sides must compute the same numbers before their times are compared: XLA's and
    PyTorch's fwd / dx / dw outputs (PyTorch's NCHW / OIHW brought to NHWC / HWIO)."""
    for part, jf, tf in zip(("fwd", "dx", "dw"), jax_fns, torch_fns):
        ours = np.asarray(jf())
        theirs = tf().detach().numpy()
        theirs = theirs.transpose(2, 3, 1, 0) if part == "dw" else theirs.transpose(0, 2, 3, 1)
        err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
        if not err < 1e-3:
            raise AssertionError(f"{what} {part}: XLA and PyTorch differ by {err:.1e}")


def _alternating(fns: dict, reps: int, warmup: int = 2) -> dict:
    """{name: (median s, (min, max))} of each thunk, the thunks taking turns in every round
    (so a slow spell of the shared machine hits all of them, not one)."""
    import jax

    for f in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f())
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), (min(ts), max(ts))) for name, ts in times.items()}


def run(batch: int = 128, reps: int = 5):
    import jax

    def median_and_spread(f, sync=lambda r: r):
        med, ts = timed(f, reps=reps, warmup=2, sync=sync)
        return med, (min(ts), max(ts))

    def ms_spread(spreads):
        return tuple(1e3 * sum(v) for v in zip(*spreads))

    parts = ("fwd", "dx", "dw")
    rows = []
    tot = {(side, part): 0.0 for side in ("xla", "torch") for part in parts}
    for i, (h, cin, cout, stride, k, uses) in enumerate(RESNET20_CONVS):
        what = f"conv {k}x{k}/{stride} {h}x{h}x{cin}->{cout}"
        jfns = _jax_fns(h, cin, cout, stride, k, batch)
        tfns = _torch_fns(h, cin, cout, stride, k, batch)
        _check_equal_work(jfns, tfns, what)
        t, spread = {}, {}
        for part, jf, tf in zip(parts, jfns, tfns):
            t["xla", part], spread["xla", part] = median_and_spread(jf, jax.block_until_ready)
            t["torch", part], spread["torch", part] = median_and_spread(tf)
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
            workload=f"{what}, batch {batch} (x{uses})",
            unit="ms", higher_is_better=False, ours=1e3 * ours, ours_label=label("xla"),
            ref=1e3 * ref, ref_label=label("torch"), reps=reps, flops=3 * flops,
            ours_spread=ms_spread([spread["xla", p] for p in parts]),
            ref_spread=ms_spread([spread["torch", p] for p in parts]),
            achieved_gflops=3 * flops / ours / 1e9,
            notes="dx / dw ratios {:.2f}x / {:.2f}x; spreads: sums of the parts' min / max; "
                  "outputs equal to PyTorch's (checked)".format(
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
    # own convolution kernel gradient, timed in turns with the GEMM forms (ratio > 1 would
    # mean the GEMM form pays).
    for h, cin, cout, stride, k, _ in RESNET20_CONVS:
        if stride != 1 or k != 3:
            continue
        forms = _kernel_grad_as_gemm(h, cin, cout, k, batch)
        times = _alternating({name: f for name, (f, _) in forms.items()}, reps)
        (ref_name, _), *alternatives = forms.items()
        ref_s, ref_spread = times[ref_name]
        for name, (_, err) in alternatives:
            s, sp = times[name]
            rows.append(Row(
                workload=f"kernel gradient 3x3 {h}x{h}x{cin}->{cout} as GEMM ({name}), "
                         f"batch {batch}", unit="ms", higher_is_better=False, ours=1e3 * s,
                ours_label=f"XLA {name}", ref=1e3 * ref_s, ref_label=ref_name, reps=reps,
                ours_spread=tuple(1e3 * v for v in sp),
                ref_spread=tuple(1e3 * v for v in ref_spread),
                notes=f"timed in turns with the reference; max relative difference {err:.1e}"))
    return rows
