"""Influence scores of 5,000 real CIFAR-10 training images on a validation loss, full
parameters, conjugate gradient: ours (`scoring.s_test` + `scoring.influence_from_s_test`)
vs dattri's `IFAttributorCG` (PyPI `dattri`, PyTorch). `run_diag_fisher`: on the same
workload, our inverse diagonal Fisher (`solver="diag_fisher"`) against a CONVERGED CG
(time, Spearman, Pearson).

Why dattri: it is maintained (0.3.0, 2026), it implements exactly our estimator (full-
parameter inverse-HVP by CG on the training loss, then gradient inner products), and it is
a library users reach for. kronfluence is EK-FAC, a different approximation, so timing it
would compare two estimators rather than two implementations.

Same computation on both sides:
- the network: an MLP 3072 -> `hidden` (tanh) -> 10 on normalized pixels, trained here once
  (full-batch Adam, fixed seed) in JAX and copied into PyTorch; both sides score the same
  weights;
- H = Hessian of the mean training cross-entropy over all N examples + `damping` I (dattri's
  `regularization`); one CG solve of `cg_iters` iterations (dattri ignores `tol` and always
  runs `max_iter`, so ours is run with tol=0 to do the same number of HVPs);
- the target is the mean cross-entropy over the validation set. dattri attributes per test
  example; the validation set is handed to it as ONE test item holding all its rows, so it
  also solves a single system instead of one per validation example;
- dattri re-solves CG for every training batch it scores, so its training loader is one
  batch of all N examples (its fastest setting here; N x #params per-example gradients fit
  in memory at this size).

Reported: time to scores (median of >= 5 repetitions; our compile time apart) and the
Spearman correlation between the two score vectors. Both return g_i^T (H + damping I)^-1
g_val (dattri's IF attribution without Koh & Liang's minus sign; ours: "+ = helpful",
METHOD.md §4), so the two vectors are compared as they are.
"""

from __future__ import annotations

import importlib.metadata
import os
import time

import numpy as np

from benchmarks.common import Row, timed, xla_flops

CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10",
                     "cifar10-jpeg.tar.gz")


def _cifar(n_train: int, n_val: int):
    """n_train images from the training split (balanced) and n_val from the test split, as
    normalized float32 [N, 3072]. Read in place from the shared archive."""
    import ml_collections

    from kdprune_jax.data import sources

    def load(split, n):
        cfg = ml_collections.ConfigDict(dict(source="image_folder", path=os.path.abspath(CIFAR),
                                             max_per_class=n // 10))
        s = sources.load_split(cfg, split)
        x = np.stack([s.source[i]["image"] for i in range(len(s))]).astype(np.float32)
        x = (x - np.array([125.3, 123.0, 113.9])) / np.array([63.0, 62.1, 66.7])
        return x.reshape(len(s), -1).astype(np.float32), s.labels.astype(np.int32)

    return load("train", n_train), load("test", n_val)


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def torch_mlp(params, d_in: int, hidden: int):
    """The workload's MLP in PyTorch with `params`' weights (the references score it)."""
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, 10))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(np.asarray(params["w1"]).T.copy()))
        net[0].bias.copy_(torch.from_numpy(np.asarray(params["b1"])))
        net[2].weight.copy_(torch.from_numpy(np.asarray(params["w2"]).T.copy()))
        net[2].bias.copy_(torch.from_numpy(np.asarray(params["b2"])))
    return net


def converged_cg(params, train, val, per_example, mean_loss, dampings, cg_iters: int):
    """Our CG influence at the smallest of `dampings` where CG converges (relative residual
    < 1e-3): this MLP's Hessian is indefinite, and an unconverged CG is no reference for a
    ranking. Returns (jitted cg(p, train, val), damping, scores, info, first-call seconds)."""
    import jax

    from kdprune_jax import scoring

    for damping in dampings:
        @jax.jit
        def cg(p, train, val, damping=damping):
            s, info = scoring.s_test(mean_loss, mean_loss, p, train, val, solver="cg",
                                     damping=damping, max_iters=cg_iters, tol=1e-4)
            return scoring.influence_from_s_test(per_example, p, train, s), info

        t0 = time.perf_counter()
        scores, info = jax.block_until_ready(cg(params, train, val))
        if float(info["residual"]) < 1e-3:
            return cg, damping, scores, info, time.perf_counter() - t0
    raise RuntimeError(f"CG did not converge at any damping of {dampings}")


def _workload(n_train: int, n_val: int, hidden: int, train_steps: int):
    """The MLP, trained once (full-batch Adam, fixed seed; not timed), its data and losses."""
    import jax
    import jax.numpy as jnp
    import optax

    from kdprune_jax import losses

    (xtr, ytr), (xva, yva) = _cifar(n_train, n_val)
    d_in = xtr.shape[1]

    def mlp(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
              "b1": jnp.zeros(hidden), "w2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
              "b2": jnp.zeros(10)}
    train = {"x": jnp.asarray(xtr), "y": jnp.asarray(ytr)}
    val = {"x": jnp.asarray(xva), "y": jnp.asarray(yva)}

    def per_example(p, b):
        return losses.cross_entropy(mlp(p, b["x"]), b["y"])

    def mean_loss(p, b):
        return per_example(p, b).mean()

    # Train once (not timed): both sides score the same weights.
    tx = optax.adam(1e-3)

    @jax.jit
    def fit(p):
        def body(carry, _):
            p, s = carry
            g = jax.grad(mean_loss)(p, train)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(body, (p, tx.init(p)), None, length=train_steps)[0][0]

    params = fit(params)
    return params, train, val, per_example, mean_loss, (xtr, ytr, xva, yva)


def run(n_train: int = 5000, n_val: int = 1000, hidden: int = 64, cg_iters: int = 100,
        damping: float = 0.01, reps: int = 5, train_steps: int = 300):
    os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars (read at import)
    import jax
    import torch
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.task import AttributionTask

    from kdprune_jax import scoring

    params, train, val, per_example, mean_loss, (xtr, ytr, xva, yva) = _workload(
        n_train, n_val, hidden, train_steps)
    d_in = xtr.shape[1]

    @jax.jit
    def ours(p, train, val):
        s, info = scoring.s_test(mean_loss, mean_loss, p, train, val, solver="cg",
                                 damping=damping, max_iters=cg_iters, tol=0.0)
        return scoring.influence_from_s_test(per_example, p, train, s), info

    t0 = time.perf_counter()
    ours_scores, info = jax.block_until_ready(ours(params, train, val))
    compile_s = time.perf_counter() - t0
    med, times = timed(lambda: ours(params, train, val), reps=reps, warmup=0,
                       sync=jax.block_until_ready)
    flops = xla_flops(ours, params, train, val)

    # dattri on the same weights.
    net = torch_mlp(params, d_in, hidden)

    def loss_func(p, data):
        x, y = data  # leading dims vary: (1, d) per example, (N, d) batch, (1, V, d) val
        out = torch.func.functional_call(net, p, x.reshape(-1, d_in))
        return torch.nn.functional.cross_entropy(out, y.reshape(-1).long())

    task = AttributionTask(loss_func=loss_func, model=net, checkpoints=net.state_dict())
    tr_ds = torch.utils.data.TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr))
    va_ds = torch.utils.data.TensorDataset(torch.from_numpy(xva)[None],
                                           torch.from_numpy(yva)[None])
    tr_loader = torch.utils.data.DataLoader(tr_ds, batch_size=n_train, shuffle=False)
    va_loader = torch.utils.data.DataLoader(va_ds, batch_size=1, shuffle=False)

    def theirs():
        attributor = IFAttributorCG(task=task, device="cpu", max_iter=cg_iters,
                                    regularization=damping)
        attributor.cache(tr_loader)
        with torch.no_grad():
            return attributor.attribute(tr_loader, va_loader)[:, 0]

    ref_scores = theirs().numpy()
    med_t, times_t = timed(theirs, reps=reps, warmup=0)
    ours_np = np.asarray(ours_scores)
    rho = _spearman(ours_np, ref_scores)
    rel = float(np.linalg.norm(ours_np - ref_scores) / np.linalg.norm(ref_scores))
    info = jax.device_get(info)

    return [Row(
        workload=(f"Influence, MLP 3072-{hidden}-10 ({d_in * hidden + hidden * 11:,} params), "
                  f"{n_train} CIFAR-10 train x {n_val} val, CG {cg_iters} it"),
        unit="s", higher_is_better=False, ours=med, ours_label="s_test CG + one JVP per batch",
        ref=med_t, ref_label=f"dattri {importlib.metadata.version('dattri')} IFAttributorCG",
        reps=reps, ours_spread=(min(times), max(times)), ref_spread=(min(times_t), max(times_t)),
        compile_seconds=compile_s, flops=flops,
        achieved_gflops=flops / med / 1e9 if flops else None,
        notes=(f"Spearman {rho:.4f}, relative L2 difference {rel:.1e}; our CG relative "
               f"residual {float(info['residual']):.1e}"))]


def run_diag_fisher(n_train: int = 5000, n_val: int = 1000, hidden: int = 64, reps: int = 5,
                    train_steps: int = 300, dampings=(0.01, 0.1, 1.0), cg_iters: int = 500):
    """The inverse diagonal empirical Fisher against CG on the same weights, data and
    damping. The damping is the smallest of `dampings` at which CG converges (relative
    residual < 1e-3): this MLP's Hessian is indefinite, and an unconverged CG is no
    reference for a ranking."""
    import jax

    from kdprune_jax import scoring

    params, train, val, per_example, mean_loss, _ = _workload(n_train, n_val, hidden,
                                                              train_steps)

    cg, damping, cg_scores, info, _ = converged_cg(params, train, val, per_example, mean_loss,
                                                   dampings, cg_iters)

    @jax.jit
    def diag(p, train, val):
        s, _ = scoring.s_test(mean_loss, mean_loss, p, train, val, solver="diag_fisher",
                              damping=damping, example_losses=per_example, chunk_size=500)
        return scoring.influence_from_s_test(per_example, p, train, s)

    t0 = time.perf_counter()
    diag_scores = np.asarray(jax.block_until_ready(diag(params, train, val)))
    compile_s = time.perf_counter() - t0
    med_d, times_d = timed(lambda: diag(params, train, val), reps=reps, warmup=0,
                           sync=jax.block_until_ready)
    med_c, times_c = timed(lambda: cg(params, train, val), reps=reps, warmup=0,
                           sync=jax.block_until_ready)
    cg_np = np.asarray(cg_scores)
    return [Row(
        workload=(f"Influence, MLP 3072-{hidden}-10, {n_train} CIFAR-10 train x {n_val} val, "
                  f"damping {damping:g}: inverse diagonal Fisher vs converged CG (both ours)"),
        unit="s", higher_is_better=False, ours=med_d,
        ours_label="s_test diag_fisher + one JVP per batch", ref=med_c,
        ref_label=f"s_test CG ({int(info['iterations'])} it, residual "
                  f"{float(info['residual']):.1e}) + one JVP per batch",
        reps=reps, ours_spread=(min(times_d), max(times_d)),
        ref_spread=(min(times_c), max(times_c)), compile_seconds=compile_s,
        notes=(f"Spearman vs CG {_spearman(diag_scores, cg_np):.4f}, Pearson "
               f"{float(np.corrcoef(diag_scores, cg_np)[0, 1]):.4f}"))]
