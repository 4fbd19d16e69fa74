"""EK-FAC influence on a CIFAR ResNet-20 (real CIFAR-10 images): ours (`scoring.fit_factors`
+ `scoring.kfac_influence`, JAX) vs kronfluence 1.0.1 (PyPI, PyTorch): time to factors,
time to scores, the PEAK MEMORY of each side, and the Spearman correlation between the
two score vectors.

Weights. A PyTorch `torch_cifar_resnet(20, 10)` (option-B shortcuts: 21 convolutions and
one Linear) is trained briefly here, not timed: fixed seeds, SGD momentum 0.9, lr 0.01,
weight decay 5e-4, batch 32, `train_epochs` epochs over the n_train images, normalized
with benchmarks/influence.py's CIFAR mean/std, no augmentation (batch 128 / lr 0.05 gave
only 24 steps at 1,000 images: the training loss fell to 1.89 but the eval-mode network,
whose BatchNorm running statistics lagged the moving weights, sat at chance, val acc
0.126; batch 32 / lr 0.01 reaches train 0.34 / val 0.29 in 3 epochs); then put in eval mode and
converted with `torch_state_dict_to_nnx` to our `cifar_resnet20`, and our logits are
checked against torch's (atol 1e-3), so both sides score the same weights. Images are
NCHW for torch, NHWC for ours.

Same computation on both sides (as benchmarks/kfac.py's MLP rows):
- BatchNorm in inference mode (running statistics) and its parameters excluded: the
  tracked layers are every Conv/Linear (kronfluence wraps nn.Conv2d / nn.Linear; ours
  `find_layers`: nnx.Conv / nnx.Linear), the fc bias as a homogeneous coordinate (the
  convolutions have no bias);
- the EMPIRICAL Fisher (observed labels: kronfluence ``use_empirical_fisher=True``, ours
  ``fisher="empirical"``) of the cross-entropy, per-example gradients of the SUMMED loss;
- EK-FAC: eigenbases of the activation (patch) and output-gradient covariances, then the
  eigenvalues replaced by E_i[(Q_A^T G_i Q_S)^2] with G_i example i's gradient summed over
  output positions (identical formula on both sides);
- damping = 0.1 x the mean EK-FAC eigenvalue per layer (kronfluence ``damping_factor=None``,
  ours ``damping_mode="relative", damping=0.1``);
- query = the validation cross-entropy, aggregated: kronfluence sums it
  (``aggregate_query_gradients=True``), ours takes the mean, a constant factor that leaves
  the Spearman correlation unchanged;
- float32 rows of `chunk` examples for the factor passes, the query and the training
  scores on both sides (kronfluence's per_device_batch_size / per_device_query_batch_size
  / per_device_train_batch_size = chunk).

What differs (read from kronfluence 1.0.1's source, module/conv2d.py, module/tracker/
factor.py, factor/eigen.py, factor/config.py):
- eigendecomposition: kronfluence in float64 (``eigendecomposition_dtype`` default),
  adding its Lambda and damping in float64 (LAMBDA_DTYPE); ours in float32;
- conv normalisation: kronfluence divides BOTH covariances by N x T (T = output positions:
  its count is the number of unfolded rows); ours has A = E_i[sum_t a a^T] (sum over
  positions) and S = E_i[(1/T) sum_t g g^T], i.e. our A is T x kronfluence's. This only
  rescales A, so the eigenbases are the same and the EK-FAC eigenvalues (recomputed from
  per-example gradients) are unaffected; it would matter for plain K-FAC only, where our
  A (x) S is the KFC estimate of E[vec G vec G^T] and kronfluence's is 1/T of it;
- patches: both unfold zero-padded input patches in (c_in, kh, kw) order (F.unfold vs
  `conv_general_dilated_patches`); no difference;
- kronfluence writes factors and scores to disk (a temporary directory) and reads them
  back: part of its times. Ours keeps them in memory. Our time to factors includes two
  abstract traces of the model per call (`_resolve`) besides the two compiled passes.

Timings: one warm-up call, then the median of `reps` calls. Ours: the first call compiles
(the "compile s" column is that first call minus the median: the compile estimate);
kronfluence's warm-up is one fit / one scoring, its scores of the warm-up are the vector
compared. torch runs with ``torch.set_num_threads(2)``; JAX with its default (all cores).

Memory. Each side runs in its OWN process (``python -m benchmarks.kfac_resnet --side
ours|kronfluence --data TMP.npz --out OUT.npz``; the parent writes weights and data to a
temporary .npz and runs the children one at a time); the child reports its peak resident
set at its end, so the peak covers data loading, the warm-up, compilation (ours: XLA's
compiler memory is part of it) and every repetition. The peak is VmHWM from
/proc/self/status, NOT ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux exec carries the old
address space's high-water mark into ru_maxrss, so every child of this parent (JAX + torch
+ the data loaded, ~1.5 GB) reported the parent's size, the same 1,472 MiB for baselines
and full runs alike (first quick run); VmHWM is the child's own address space only.
ru_maxrss is still written to the child's output for the record. A baseline child per
framework (imports, weights, the model run forward on one chunk: ours one jitted forward,
torch one no-grad forward) gives the framework's own footprint; peak minus baseline is in
the notes. Caveats: VmHWM counts resident pages only, including shared libraries and
page-cached file pages mapped into the process; each side holds the training images once
(n_train x 3072 float32: 12 MB at 1,000) and ours also copies them into JAX's buffer
(the numpy copy is freed after, but the transient counts in the peak); allocators keep
freed memory, so the peak bounds what the computation needs at once from above; the
torch child never imports jax (the PyTorch twin is loaded from its file, not through
kdprune_jax.models, whose __init__ imports jax and flax).

Size. `run()`'s defaults are 5,000 training images x 500 validation, 3 repetitions. The
recorded run (benchmarks/run.py, suite kfac_resnet20) uses n_train=1,000: on the shared
2-core machine (a training job in the background) the quick run (500 x 100, 1 repetition)
took 9.5 min, i.e. ~0.5 s per training example per factors + scores round on the two
sides together, so 5,000 images x (warm-up + 3 repetitions) would take ~3 h and 2,000 ~70
min; 1,000 was estimated at ~35 min and took 44 (load average ~6 on the 2 cores).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import peak_memory
from benchmarks.common import Row, timed
from benchmarks.influence import _cifar, _spearman

MODEL = "cifar_resnet20"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nnx_logits(graphdef, rest, params, batch):
    """Inference-mode logits (module level: one compile per shape), as the influence stage's."""
    from flax import nnx

    return nnx.merge(graphdef, params, rest)(batch["image"], train=False)


def _torch_twin():
    """kdprune_jax/models/torch_cifar.py loaded from its file: importing it through the
    package would import jax and flax (kdprune_jax.models' __init__) into the torch child."""
    import importlib.util

    path = os.path.join(_REPO, "kdprune_jax", "models", "torch_cifar.py")
    spec = importlib.util.spec_from_file_location("_kdprune_torch_cifar", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.torch_cifar_resnet


def _state_dict(z):
    return {k[3:]: z[k] for k in z.files if k.startswith("sd/")}


# ----------------------------------------------------------------------------- children
def _child_ours(z, baseline: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kdprune_jax import models, scoring

    chunk, reps = int(z["chunk"]), int(z["reps"])
    params, bs = models.torch_state_dict_to_nnx(_state_dict(z), MODEL, 10)
    graphdef = nnx.split(nnx.eval_shape(lambda: models.create_model(MODEL, num_classes=10)),
                         nnx.Param, nnx.BatchStat)[0]
    logits_fn = jax.tree_util.Partial(_nnx_logits, graphdef, bs)
    if baseline:
        probe = {"image": jnp.asarray(z["probe_nhwc"])}
        jax.block_until_ready(jax.jit(logits_fn)(params, probe))
        return {}
    train = {"image": jnp.asarray(z["x_train_nhwc"]), "label": jnp.asarray(z["y_train"])}
    val = {"image": jnp.asarray(z["x_val_nhwc"]), "label": jnp.asarray(z["y_val"])}
    layers = scoring.find_layers(nnx.merge(graphdef, params, bs))
    info = {}

    def factors():
        fac, info["fit"] = scoring.fit_factors(logits_fn, params, train, layers=layers,
                                               fisher="empirical", chunk_size=chunk, log=None)
        return fac

    t0 = time.perf_counter()
    fac = jax.block_until_ready(factors())
    first_f = time.perf_counter() - t0
    _, times_f = timed(factors, reps=reps, warmup=0, sync=jax.block_until_ready)

    def scores():
        return scoring.kfac_influence(fac, logits_fn, params, train, val, damping=0.1,
                                      damping_mode="relative", chunk_size=chunk)[0]

    t0 = time.perf_counter()
    s = np.asarray(jax.block_until_ready(scores()))
    first_s = time.perf_counter() - t0
    _, times_s = timed(scores, reps=reps, warmup=0, sync=jax.block_until_ready)
    fit = info["fit"]
    return {"scores": s, "times_f": times_f, "times_s": times_s, "first_f": first_f,
            "first_s": first_s, "layers": len(fit["layers"]),
            "excluded": len(fit["excluded"]), "fallback": sum(fit["fallback"].values()),
            "estimate_mib": fit["memory"]["total_bytes"] / 2**20}


def _child_kronfluence(z, baseline: bool) -> dict:
    import torch

    torch.set_num_threads(2)
    from kronfluence.module.utils import get_tracked_module_names

    from benchmarks.kronfluence_ekfac import datasets, ekfac_analysis

    chunk, reps = int(z["chunk"]), int(z["reps"])
    net = _torch_twin()(20, 10)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in _state_dict(z).items()})
    net.eval()
    if baseline:
        with torch.no_grad():
            net(torch.from_numpy(z["probe_nchw"]))
        return {}

    tr_ds, va_ds = datasets(z["x_train_nchw"], z["y_train"], z["x_val_nchw"], z["y_val"])
    their_factors, their_scores, out_dir, net = ekfac_analysis(
        net, tr_ds, va_ds, name="cifar_resnet20", chunk=chunk, query_batch=chunk)

    try:
        t0 = time.perf_counter()
        their_factors()
        first_f = time.perf_counter() - t0
        _, times_f = timed(their_factors, reps=reps, warmup=0)
        t0 = time.perf_counter()
        ref = their_scores().numpy().reshape(-1)
        first_s = time.perf_counter() - t0
        _, times_s = timed(their_scores, reps=reps, warmup=0)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"scores": ref, "times_f": times_f, "times_s": times_s, "first_f": first_f,
            "first_s": first_s, "layers": len(get_tracked_module_names(net))}


# ----------------------------------------------------------------------------- parent
def _train_torch(xtr, ytr, epochs: int, batch_size: int = 32):
    """The PyTorch ResNet-20, trained briefly on NCHW images (fixed seeds), in eval mode."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = _torch_twin()(20, 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr).long()
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = perm[s:s + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def _accuracy(net, x, y, batch_size=500) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat([net(torch.from_numpy(x[s:s + batch_size])).argmax(-1)
                          for s in range(0, len(x), batch_size)])
    return float((pred.numpy() == y).mean())


def _check_conversion(net, sd, x_nhwc, x_nchw):
    """Our model with the converted weights gives torch's logits (atol 1e-3)."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from kdprune_jax import models

    params, bs = models.torch_state_dict_to_nnx(sd, MODEL, 10)
    graphdef = nnx.split(nnx.eval_shape(lambda: models.create_model(MODEL, num_classes=10)),
                         nnx.Param, nnx.BatchStat)[0]
    ours = np.asarray(_nnx_logits(graphdef, bs, params, {"image": jnp.asarray(x_nhwc)}))
    with torch.no_grad():
        ref = net(torch.from_numpy(x_nchw)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return float(np.abs(ours - ref).max()), n_params


def run(n_train: int = 5000, n_val: int = 500, reps: int = 3, train_epochs: int = 3,
        chunk: int = 100):
    import importlib.metadata

    import torch

    t_start = time.perf_counter()
    (xtr, ytr), (xva, yva) = _cifar(n_train, n_val)
    xtr = xtr.reshape(-1, 32, 32, 3)
    xva = xva.reshape(-1, 32, 32, 3)
    xtr_c = np.ascontiguousarray(xtr.transpose(0, 3, 1, 2))
    xva_c = np.ascontiguousarray(xva.transpose(0, 3, 1, 2))
    net = _train_torch(xtr_c, ytr, train_epochs)
    acc_tr, acc_va = _accuracy(net, xtr_c, ytr), _accuracy(net, xva_c, yva)
    sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    max_diff, n_params = _check_conversion(net, sd, xva[:8], xva_c[:8])
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    lins = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    tracked = sum(p.numel() for m in convs + lins for p in m.parameters())
    print(f"[kfac_resnet] trained {train_epochs} epochs (train acc {acc_tr:.3f}, val acc "
          f"{acc_va:.3f}); logits ours vs torch max |diff| {max_diff:.1e}; "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)

    tmp = tempfile.mkdtemp(prefix="kdprune_bench_kfac_resnet_")
    try:
        data = os.path.join(tmp, "data.npz")
        np.savez(data, chunk=chunk, reps=reps, y_train=ytr, y_val=yva,
                 x_train_nhwc=xtr, x_val_nhwc=xva, x_train_nchw=xtr_c, x_val_nchw=xva_c,
                 probe_nhwc=xtr[:chunk], probe_nchw=xtr_c[:chunk],
                 **{f"sd/{k}": v for k, v in sd.items()})
        del xtr, xva, xtr_c, xva_c
        m = peak_memory.measure("benchmarks.kfac_resnet", data, os.path.join(tmp, "out.npz"))
        (base_o, o), (base_k, k) = m["ours"], m["kronfluence"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert o["layers"] == k["layers"] == len(convs) + len(lins), (o["layers"], k["layers"])
    assert not k["jax_imported"]

    rho = _spearman(o["scores"], k["scores"])
    r = float(np.corrcoef(o["scores"], k["scores"])[0, 1])
    med = {s: {f: float(np.median(res[f"times_{f}"])) for f in "fs"} for s, res in
           (("o", o), ("k", k))}
    mib = {name: res["peak_kib"] / 1024 for name, res in
           (("o", o), ("k", k), ("bo", base_o), ("bk", base_k))}
    kv = importlib.metadata.version("kronfluence")
    work = (f"CIFAR ResNet-20 ({n_params:,} params: {len(convs)} conv + {len(lins)} linear "
            f"tracked = {tracked:,}, BatchNorm excluded), {n_train} CIFAR-10 train x {n_val} "
            f"val, rows of {chunk}")
    spread = {s: {f: (min(res[f"times_{f}"]), max(res[f"times_{f}"])) for f in "fs"}
              for s, res in (("o", o), ("k", k))}
    print(f"[kfac_resnet] total {time.perf_counter() - t_start:.0f} s", flush=True)
    return [
        Row(workload=f"EK-FAC factors (empirical Fisher), {work}", unit="s",
            higher_is_better=False, ours=med["o"]["f"],
            ours_label="fit_factors (2 passes + eigh f32)", ref=med["k"]["f"],
            ref_label=f"kronfluence {kv} fit_all_factors (eigh f64, torch 2 threads)",
            reps=reps, ours_spread=spread["o"]["f"], ref_spread=spread["k"]["f"],
            compile_seconds=max(0.0, o["first_f"] - med["o"]["f"]),
            notes=(f"weights: torch-trained {train_epochs} epochs (train acc {acc_tr:.3f}, "
                   f"val acc {acc_va:.3f}), logits ours vs torch max |diff| {max_diff:.1e}; "
                   f"our eigh fallbacks {o['fallback']}")),
        Row(workload=f"EK-FAC influence scores, {work}, damping 0.1 x mean eigenvalue",
            unit="s", higher_is_better=False, ours=med["o"]["s"], ours_label="kfac_influence",
            ref=med["k"]["s"],
            ref_label=f"kronfluence {kv} compute_pairwise_scores (aggregated query)",
            reps=reps, ours_spread=spread["o"]["s"], ref_spread=spread["k"]["s"],
            compile_seconds=max(0.0, o["first_s"] - med["o"]["s"]),
            notes=f"Spearman ours vs kronfluence {rho:.4f}, Pearson {r:.4f}"),
        Row(workload=f"EK-FAC peak resident memory (factors + scores, one process each), "
                     f"{work}", unit="MiB", higher_is_better=False, ours=mib["o"],
            ours_label="VmHWM, JAX process", ref=mib["k"],
            ref_label=f"VmHWM, kronfluence {kv} process",
            notes=(f"baselines (import + weights + one forward of {chunk}): ours "
                   f"{mib['bo']:.0f} MiB, torch {mib['bk']:.0f} MiB; peak minus baseline: "
                   f"ours {mib['o'] - mib['bo']:.0f} MiB, kronfluence "
                   f"{mib['k'] - mib['bk']:.0f} MiB; fit_factors' own estimate (factors + "
                   f"per-chunk working set, every tracked layer's patches of a chunk at once) "
                   f"{o['estimate_mib']:.0f} MiB; process wall ours "
                   f"{o['process_seconds']:.0f} s, kronfluence {k['process_seconds']:.0f} s")),
    ]


if __name__ == "__main__":
    sys.exit(peak_memory.child_main({"ours": _child_ours, "kronfluence": _child_kronfluence}))
