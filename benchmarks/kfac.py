"""EK-FAC influence of 5,000 real CIFAR-10 training images on a validation loss: ours
(`scoring.fit_factors` + `scoring.kfac_influence`) vs kronfluence 1.0.1 (PyPI, PyTorch),
and, on the same weights, our EK-FAC against our CG (`scoring.s_test(solver="cg")`).

The workload is benchmarks/influence.py's (`_workload`): an MLP 3072 -> `hidden` (tanh)
-> 10 on normalized pixels, trained once (full-batch Adam, fixed seed) in JAX and copied
into an nnx model and a torch model, so all sides score the same weights; the target is
the cross-entropy over the validation set.

Same computation on both EK-FAC sides:
- both Linear layers tracked, bias as a homogeneous coordinate (kronfluence's default
  for nn.Linear; ours for nnx.Linear);
- the EMPIRICAL Fisher (observed labels) on both sides, so no sampled labels differ
  (kronfluence ``use_empirical_fisher=True``; ours ``fisher="empirical"``);
- damping = 0.1 x the mean EK-FAC eigenvalue per layer: kronfluence's heuristic
  (``damping_factor=None``), ours ``damping_mode="relative", damping=0.1``;
- the query gradient is the summed validation gradient (kronfluence
  ``aggregate_query_gradients=True``), ours the mean: a constant factor, so the Spearman
  correlation between the score vectors is unaffected;
- both fit factors and score in float32 rows of `chunk` examples; kronfluence
  eigendecomposes in float64 (its default), ours in float32.

Reported: time to factors and time to scores (median of >= 5 repetitions; our compile
time apart; kronfluence writes its factors and scores to a temporary directory, which is
part of its time), the Spearman correlation between the two score vectors; and EK-FAC
(factors + scores) against a converged CG on the full Hessian (the smallest damping of
`cg_dampings` at which CG reaches a relative residual below 1e-3, as
benchmarks/influence.py's diag-Fisher row), both ours: time and Spearman (EK-FAC with the
same absolute damping as CG, and with the relative one). Peak resident memory: each EK-FAC
side (factors + scores once) in a process of its own, against its own baseline (import,
weights, one forward) (`benchmarks/peak_memory.py`). The CIFAR ResNet-20 counterpart is
benchmarks/kfac_resnet.py.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import peak_memory
from benchmarks.common import Row, timed
from benchmarks.influence import _spearman, _workload, converged_cg, torch_mlp
from benchmarks.kronfluence_ekfac import datasets, ekfac_analysis


class MLP(nnx.Module):
    """benchmarks/influence.py's MLP as an nnx model: Linear - tanh - Linear."""

    def __init__(self, d_in: int, hidden: int):
        rngs = nnx.Rngs(0)
        self.fc1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def _nnx_logits(graphdef, params, batch):
    return nnx.merge(graphdef, params)(batch["x"])


def _nnx_mlp(z):
    """The workload's weights (z["w1"], ...) in the nnx MLP: (graphdef, params, model)."""
    model = MLP(z["w1"].shape[0], z["w1"].shape[1])
    model.fc1.kernel[...] = jnp.asarray(z["w1"])
    model.fc1.bias[...] = jnp.asarray(z["b1"])
    model.fc2.kernel[...] = jnp.asarray(z["w2"])
    model.fc2.bias[...] = jnp.asarray(z["b2"])
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, model


def _memory_row(params, xtr, ytr, xva, yva, chunk: int, work: str, kv: str) -> Row:
    """Peak resident memory of each EK-FAC side, one process each (peak_memory)."""
    tmp = tempfile.mkdtemp(prefix="kdprune_bench_kfac_mlp_")
    try:
        data = os.path.join(tmp, "data.npz")
        np.savez(data, chunk=chunk, x_train=xtr, y_train=ytr, x_val=xva, y_val=yva,
                 **{k: np.asarray(v) for k, v in params.items()})
        m = peak_memory.measure("benchmarks.kfac_memory", data, os.path.join(tmp, "out.npz"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (base_o, o), (base_k, k) = m["ours"], m["kronfluence"]
    assert not k["jax_imported"]
    mib = {n: r["peak_kib"] / 1024 for n, r in (("o", o), ("k", k), ("bo", base_o),
                                                  ("bk", base_k))}
    return Row(
        workload=f"EK-FAC peak resident memory (factors + scores, one process each), {work}",
        unit="MiB", higher_is_better=False, ours=mib["o"], ours_label="VmHWM, JAX process",
        ref=mib["k"], ref_label=f"VmHWM, kronfluence {kv} process",
        notes=(f"baselines (import + weights + one forward of {chunk}): ours {mib['bo']:.0f} "
               f"MiB, torch {mib['bk']:.0f} MiB; peak minus baseline: ours "
               f"{mib['o'] - mib['bo']:.0f} MiB, kronfluence {mib['k'] - mib['bk']:.0f} MiB; "
               f"fit_factors' own estimate {o['estimate_mib']:.0f} MiB; Spearman of the two "
               f"processes' scores {_spearman(o['scores'], k['scores']):.4f}; process wall ours "
               f"{o['process_seconds']:.0f} s, kronfluence {k['process_seconds']:.0f} s"))


def run_memory(n_train: int = 5000, n_val: int = 1000, hidden: int = 64,
               train_steps: int = 300, chunk: int = 500):
    """The peak-memory row alone (the same workload and weights as `run`)."""
    import jax

    params, _, _, _, _, (xtr, ytr, xva, yva) = _workload(n_train, n_val, hidden, train_steps)
    work = (f"MLP 3072-{hidden}-10 ({xtr.shape[1] * hidden + hidden * 11:,} params), "
            f"{n_train} CIFAR-10 train x {n_val} val")
    return [_memory_row(jax.device_get(params), xtr, ytr, xva, yva, chunk, work,
                        importlib.metadata.version("kronfluence"))]


def run(n_train: int = 5000, n_val: int = 1000, hidden: int = 64, reps: int = 5,
        train_steps: int = 300, chunk: int = 500, cg_iters: int = 500,
        cg_dampings=(0.01, 0.1, 1.0), memory: bool = True):
    import functools

    import jax

    from kdprune_jax import scoring

    params, train, val, per_example, mean_loss, (xtr, ytr, xva, yva) = _workload(
        n_train, n_val, hidden, train_steps)
    params = jax.device_get(params)
    d_in = xtr.shape[1]

    # Ours: the same weights in an nnx model.
    graphdef, nparams, model = _nnx_mlp(params)
    logits_fn = functools.partial(_nnx_logits, graphdef)
    layers = scoring.find_layers(model)
    z_ref = jnp.tanh(val["x"] @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    np.testing.assert_allclose(np.asarray(logits_fn(nparams, val)), np.asarray(z_ref),
                               rtol=1e-4, atol=1e-4)

    def factors():
        return scoring.fit_factors(logits_fn, nparams, train, layers=layers,
                                   fisher="empirical", targets="y", chunk_size=chunk,
                                   log=None)[0]

    t0 = time.perf_counter()
    fac = jax.block_until_ready(factors())
    fac_compile = time.perf_counter() - t0
    med_f, times_f = timed(factors, reps=reps, warmup=0, sync=jax.block_until_ready)

    def scores(damping=0.1, mode="relative"):
        return scoring.kfac_influence(fac, logits_fn, nparams, train, val, damping=damping,
                                      damping_mode=mode, targets="y", chunk_size=chunk)[0]

    t0 = time.perf_counter()
    ours = np.asarray(jax.block_until_ready(scores()))
    sc_compile = time.perf_counter() - t0
    med_s, times_s = timed(scores, reps=reps, warmup=0, sync=jax.block_until_ready)

    # kronfluence on the same weights and data.
    net = torch_mlp(params, d_in, hidden)

    tr_ds, va_ds = datasets(xtr, ytr, xva, yva)
    their_factors, their_scores, out_dir, _ = ekfac_analysis(
        net, tr_ds, va_ds, name="cifar_mlp", chunk=chunk, query_batch=n_val)

    try:
        med_tf, times_tf = timed(their_factors, reps=reps, warmup=1)
        ref = their_scores().numpy().reshape(-1)
        med_ts, times_ts = timed(their_scores, reps=reps, warmup=0)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    rho = _spearman(ours, ref)
    r = float(np.corrcoef(ours, ref)[0, 1])

    # Our CG on the full Hessian, converged (as benchmarks/influence.py's run_diag_fisher:
    # this MLP's Hessian is indefinite, so the smallest damping at which CG converges).
    jparams = jax.tree.map(jnp.asarray, params)
    cg, cg_damping, cg_scores, info, cg_compile = converged_cg(
        jparams, train, val, per_example, mean_loss, cg_dampings, cg_iters)
    med_cg, times_cg = timed(lambda: cg(jparams, train, val), reps=reps, warmup=0,
                             sync=jax.block_until_ready)
    cg_scores = np.asarray(cg_scores)
    ours_abs = np.asarray(scores(cg_damping, "absolute"))
    rho_cg_abs = _spearman(ours_abs, cg_scores)
    rho_cg_rel = _spearman(ours, cg_scores)
    rho_ref_cg = _spearman(ref, cg_scores)

    work = (f"MLP 3072-{hidden}-10 ({d_in * hidden + hidden * 11:,} params), {n_train} CIFAR-10 "
            f"train x {n_val} val")
    kv = importlib.metadata.version("kronfluence")
    memory_rows = [_memory_row(params, xtr, ytr, xva, yva, chunk, work, kv)] if memory else []
    return [
        Row(workload=f"EK-FAC factors (empirical Fisher), {work}", unit="s",
            higher_is_better=False, ours=med_f, ours_label="fit_factors (2 passes + eigh f32)",
            ref=med_tf, ref_label=f"kronfluence {kv} fit_all_factors (eigh f64)", reps=reps,
            ours_spread=(min(times_f), max(times_f)), ref_spread=(min(times_tf), max(times_tf)),
            compile_seconds=fac_compile),
        Row(workload=f"EK-FAC influence scores, {work}, damping 0.1 x mean eigenvalue",
            unit="s", higher_is_better=False, ours=med_s, ours_label="kfac_influence",
            ref=med_ts, ref_label=f"kronfluence {kv} compute_pairwise_scores (aggregated query)",
            reps=reps, ours_spread=(min(times_s), max(times_s)),
            ref_spread=(min(times_ts), max(times_ts)), compile_seconds=sc_compile,
            notes=f"Spearman ours vs kronfluence {rho:.4f}, Pearson {r:.4f}"),
        Row(workload=f"Influence, {work}: EK-FAC (factors + scores) vs converged CG "
                     f"(both ours)", unit="s", higher_is_better=False, ours=med_f + med_s,
            ours_label="fit_factors + kfac_influence", ref=med_cg,
            ref_label=(f"s_test CG ({int(info['iterations'])} it, damping {cg_damping:g}, "
                       f"residual {float(info['residual']):.1e}) + one JVP"), reps=reps,
            ref_spread=(min(times_cg), max(times_cg)), compile_seconds=cg_compile,
            notes=(f"Spearman EK-FAC vs CG: damping {cg_damping:g} absolute {rho_cg_abs:.4f}, "
                   f"0.1 x mean eigenvalue {rho_cg_rel:.4f}; kronfluence vs CG "
                   f"{rho_ref_cg:.4f}")),
    ] + memory_rows

