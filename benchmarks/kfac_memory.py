"""The two sides of benchmarks/kfac.py's peak-memory row, each run in a process of its own
(`benchmarks.peak_memory`): ours imports jax only inside its side, kronfluence's side
imports torch alone (checked: its process never imports jax)."""

from __future__ import annotations

import shutil
import sys

import numpy as np

from benchmarks import peak_memory
from benchmarks.influence import torch_mlp
from benchmarks.kronfluence_ekfac import datasets, ekfac_analysis


def _child_ours(z, baseline: bool) -> dict:
    """Our EK-FAC factors + scores once, in this process (peak memory)."""
    import functools

    import jax
    import jax.numpy as jnp

    from benchmarks.kfac import _nnx_logits, _nnx_mlp
    from kdprune_jax import scoring

    chunk = int(z["chunk"])
    graphdef, params, model = _nnx_mlp(z)
    logits_fn = functools.partial(_nnx_logits, graphdef)
    if baseline:
        jax.block_until_ready(logits_fn(params, {"x": jnp.asarray(z["x_train"][:chunk])}))
        return {}
    train = {"x": jnp.asarray(z["x_train"]), "y": jnp.asarray(z["y_train"])}
    val = {"x": jnp.asarray(z["x_val"]), "y": jnp.asarray(z["y_val"])}
    fac, info = scoring.fit_factors(logits_fn, params, train, layers=scoring.find_layers(model),
                                    fisher="empirical", targets="y", chunk_size=chunk, log=None)
    s = scoring.kfac_influence(fac, logits_fn, params, train, val, damping=0.1,
                               damping_mode="relative", targets="y", chunk_size=chunk)[0]
    return {"scores": np.asarray(jax.block_until_ready(s)),
            "estimate_mib": info["memory"]["total_bytes"] / 2**20}


def _child_kronfluence(z, baseline: bool) -> dict:
    """kronfluence's EK-FAC factors + scores once, in this process (torch only)."""
    import torch

    torch.set_num_threads(2)
    chunk = int(z["chunk"])
    params = {k: z[k] for k in ("w1", "b1", "w2", "b2")}
    net = torch_mlp(params, z["w1"].shape[0], z["w1"].shape[1])
    if baseline:
        with torch.no_grad():
            net(torch.from_numpy(z["x_train"][:chunk]))
        return {}
    tr_ds, va_ds = datasets(z["x_train"], z["y_train"], z["x_val"], z["y_val"])
    their_factors, their_scores, out_dir, _ = ekfac_analysis(
        net, tr_ds, va_ds, name="cifar_mlp_memory", chunk=chunk, query_batch=len(va_ds))
    try:
        their_factors()
        ref = their_scores().numpy().reshape(-1)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"scores": ref}


if __name__ == "__main__":
    sys.exit(peak_memory.child_main({"ours": _child_ours, "kronfluence": _child_kronfluence}))
