"""KD train step, ours vs plain PyTorch: teacher forward (inference mode) + student forward
and backward + SGD (Nesterov momentum, weight decay on kernels) on one batch of 128 CIFAR
images, for the same architectures and the same per-example loss (METHOD.md §2).

Ours: `kdprune_jax.train.steps.make_kd_train_step`, the exact jitted step the pipeline uses
(one device mesh, state donated). References: PyTorch eager with channels_last, and
`torch.compile` (inductor, CPU) where it compiles.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks.common import Row, timed, xla_flops

PAIRS = (("cifar_resnet56", "cifar_resnet20"), ("cifar_resnet20", "cifar_resnet20"))
ALPHA, TAU, LR, MOMENTUM, WD = 0.9, 4.0, 0.1, 0.9, 5e-4


def _batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    return x, y


def jax_kd_step(teacher_name, student_name, batch_size=128, dtype="float32",
                batchnorm="ours"):
    """(step_fn, args) for our jitted KD step on one device; `step_fn(*args)` runs a step
    and returns (state, metrics) whose state must be fed back (it is donated).
    `batchnorm="flax"` builds the models with flax.nnx.BatchNorm instead of ours (only to
    measure what our BatchNorm formulation buys)."""
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from kdprune_jax import models, sharding
    from kdprune_jax.train.state import TrainState, make_optimizer
    from kdprune_jax.train.steps import make_kd_train_step

    mesh = sharding.make_mesh(1)
    # config.compute_dtype=bfloat16 the way train_model applies it: bf16 compute, f32 state.
    cdt = jnp.bfloat16 if dtype == "bfloat16" else None
    student = models.create_model(student_name, num_classes=10, seed=0)
    teacher = models.create_model(teacher_name, num_classes=10, seed=1)
    t_graphdef, t_params, t_bs = nnx.split(teacher, nnx.Param, nnx.BatchStat)
    graphdef, params, bs = nnx.split(student, nnx.Param, nnx.BatchStat)
    if batchnorm == "flax":
        t_graphdef = models.with_batchnorm_vjp(t_graphdef, t_params, t_bs, closed_form=False)
        graphdef = models.with_batchnorm_vjp(graphdef, params, bs, closed_form=False)
    t_graphdef = models.with_compute_dtype(t_graphdef, t_params, t_bs, cdt)
    graphdef = models.with_compute_dtype(graphdef, params, bs, cdt)
    opt = ml_collections.ConfigDict(dict(learning_rate=LR, schedule="constant", momentum=MOMENTUM,
                                         nesterov=True, weight_decay=WD, warmup_epochs=0.0))
    tx, schedule = make_optimizer(opt, 100.0, 10_000)
    state = sharding.replicate(TrainState.create(params, bs, tx), mesh)
    teacher_vars = sharding.replicate((t_params, t_bs), mesh)
    step = make_kd_train_step(graphdef, tx, mesh, teacher_graphdef=t_graphdef, kd_weight=ALPHA,
                              temperature=TAU, learning_rate_fn=schedule)
    x, y = _batch(batch_size)
    batch = sharding.to_global({"image": x, "label": y}, mesh)
    return step, state, teacher_vars, batch


def torch_kd_step(teacher_name, student_name, batch_size=128, compiled=False):
    """A closure running one PyTorch KD step (channels_last), the same loss and update."""
    import torch
    import torch.nn.functional as F

    from kdprune_jax.models.torch_cifar import torch_cifar_resnet

    depth = lambda name: int(name.removeprefix("cifar_resnet"))  # noqa: E731
    torch.manual_seed(0)
    student = torch_cifar_resnet(depth(student_name), 10).to(memory_format=torch.channels_last)
    teacher = torch_cifar_resnet(depth(teacher_name), 10).to(memory_format=torch.channels_last)
    teacher.eval()
    student.train()
    decay = [p for p in student.parameters() if p.ndim > 1]
    no_decay = [p for p in student.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": WD},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=LR, momentum=MOMENTUM, nesterov=True)
    x, y = _batch(batch_size)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(y.astype(np.int64))

    def loss_fn(s_logits, t_logits):
        ce = F.cross_entropy(s_logits, y)
        kl = F.kl_div(F.log_softmax(s_logits / TAU, -1), F.log_softmax(t_logits / TAU, -1),
                      log_target=True, reduction="batchmean")
        return (1 - ALPHA) * ce + ALPHA * TAU**2 * kl

    def fwd_bwd():
        with torch.no_grad():
            t_logits = teacher(x)
        loss = loss_fn(student(x), t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    if compiled:
        fwd_bwd = torch.compile(fwd_bwd)

    def step():
        loss = fwd_bwd()
        opt.step()
        return loss.detach()

    return step


def _steps(fn, n):
    """A callable running `fn` n times, returning the last result."""
    def many():
        out = None
        for _ in range(n):
            out = fn()
        return out
    return many


def _pair(teacher_name, student_name, reps, steps_per_rep, batch_size, torch_compile):
    import jax

    workload = f"KD step {teacher_name}->{student_name}, batch {batch_size}, f32"
    step, state, teacher_vars, batch = jax_kd_step(teacher_name, student_name, batch_size)
    t0 = time.perf_counter()  # the first call compiles (and runs one step)
    state, m = step(state, teacher_vars, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    flops = xla_flops(step, state, teacher_vars, batch)
    holder = {"state": state}

    def ours():  # the state is donated: feed each step's output state to the next
        s = holder["state"]
        for _ in range(steps_per_rep):
            s, m = step(s, teacher_vars, batch)
        holder["state"] = s
        return m

    images = batch_size * steps_per_rep
    spread = lambda ts: (images / max(ts), images / min(ts))  # noqa: E731
    med, times = timed(ours, reps=reps, warmup=1, sync=jax.block_until_ready)
    ours_ips = images / med
    common = dict(workload=workload, unit="img/s", ours=ours_ips, ours_label="JAX jit",
                  reps=reps, ours_spread=spread(times), compile_seconds=compile_s)

    t_step = torch_kd_step(teacher_name, student_name, batch_size)
    med_t, times_t = timed(_steps(t_step, steps_per_rep), reps=reps, warmup=1)
    rows = [Row(**common, ref=images / med_t, ref_label="PyTorch eager channels_last",
                ref_spread=spread(times_t), flops=flops,
                achieved_gflops=flops * steps_per_rep / med / 1e9 if flops else None)]
    if torch_compile:
        try:
            c_step = torch_kd_step(teacher_name, student_name, batch_size, compiled=True)
            t0 = time.perf_counter()
            c_step()
            c_compile = time.perf_counter() - t0
            med_c, times_c = timed(_steps(c_step, steps_per_rep), reps=reps, warmup=1)
            rows.append(Row(**common, ref=images / med_c, ref_label="torch.compile",
                            ref_spread=spread(times_c), ref_compile_seconds=c_compile))
        except Exception as e:  # inductor needs a working C++ toolchain on CPU
            rows.append(Row(**common, ref=None, ref_label="torch.compile",
                            notes=f"torch.compile failed: {type(e).__name__}: {str(e)[:120]}"))
    return rows


def _ours_vs_ours(teacher_name, student_name, reps, steps_per_rep, batch_size, *, workload,
                  ours_label, ref_label, ours_kw, ref_kw):
    """One of our steps against another build of our own step (a knob's measured effect):
    `ours_kw` / `ref_kw` go to `jax_kd_step`. The two alternate rep by rep, so drift in the
    machine's load hits both alike."""
    import jax

    built, compile_s = {}, {}
    for side, kw in (("ours", ours_kw), ("ref", ref_kw)):
        step, state, teacher_vars, batch = jax_kd_step(teacher_name, student_name, batch_size,
                                                       **kw)
        t0 = time.perf_counter()
        state, m = step(state, teacher_vars, batch)
        jax.block_until_ready(m)
        compile_s[side] = time.perf_counter() - t0
        built[side] = (step, {"state": state}, teacher_vars, batch)

    def run_side(side):
        step, holder, teacher_vars, batch = built[side]
        s = holder["state"]
        for _ in range(steps_per_rep):
            s, m = step(s, teacher_vars, batch)
        holder["state"] = s
        return m

    times = {"ours": [], "ref": []}
    for side in ("ours", "ref"):  # warm-up
        jax.block_until_ready(run_side(side))
    for i in range(reps):  # alternate which side goes first, too
        for side in ("ours", "ref") if i % 2 == 0 else ("ref", "ours"):
            t0 = time.perf_counter()
            jax.block_until_ready(run_side(side))
            times[side].append(time.perf_counter() - t0)
    images = batch_size * steps_per_rep
    ips = {k: images / statistics.median(v) for k, v in times.items()}
    spread = {k: (images / max(v), images / min(v)) for k, v in times.items()}
    return Row(workload=workload, unit="img/s", ours=ips["ours"], ours_label=ours_label,
               ref=ips["ref"], ref_label=ref_label, reps=reps, ours_spread=spread["ours"],
               ref_spread=spread["ref"],
               compile_seconds=compile_s["ours"], ref_compile_seconds=compile_s["ref"])


def _bf16_row(teacher_name, student_name, reps, steps_per_rep, batch_size):
    """config.compute_dtype=bfloat16 against our own float32 step (accelerator readiness:
    on a CPU without bf16 matrix units this measures the cost of the casts, not a gain)."""
    return _ours_vs_ours(
        teacher_name, student_name, reps, steps_per_rep, batch_size,
        workload=f"KD step {teacher_name}->{student_name}, batch {batch_size}, "
                 "compute_dtype=bfloat16",
        ours_label="JAX jit, bf16 compute, f32 params/loss", ref_label="ours, float32",
        ours_kw={"dtype": "bfloat16"}, ref_kw={})


def _batchnorm_row(teacher_name, student_name, reps, steps_per_rep, batch_size):
    """Our BatchNorm (hand-written training VJP, models/batchnorm.py) against flax's."""
    return _ours_vs_ours(
        teacher_name, student_name, reps, steps_per_rep, batch_size,
        workload=f"KD step {teacher_name}->{student_name}, batch {batch_size}, BatchNorm "
                 "formulation",
        ours_label="ours, models.batchnorm (custom VJP)",
        ref_label="ours with flax.nnx.BatchNorm", ours_kw={}, ref_kw={"batchnorm": "flax"})


def run(reps: int = 5, steps_per_rep: int = 5, batch_size: int = 128, pairs=PAIRS,
        torch_compile: bool = True, bf16: bool = True) -> list[Row]:
    rows = []
    for teacher_name, student_name in pairs:
        rows += _pair(teacher_name, student_name, reps, steps_per_rep, batch_size,
                      torch_compile)
    # Knob rows compare two builds of our own step, whose difference is smaller than the
    # machine's drift over a few reps: more alternating reps.
    knob_reps = max(reps, 11)
    if bf16:
        rows.append(_bf16_row(*pairs[-1], knob_reps, steps_per_rep, batch_size))
    rows.append(_batchnorm_row(*pairs[-1], knob_reps, steps_per_rep, batch_size))
    return rows
