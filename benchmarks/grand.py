"""GraNd (full-parameter per-example gradient norms) on a CIFAR ResNet-20 for 2,048
examples: ours (`kdprune_jax.scoring.grand_scores`: vmap of grad in lax.map chunks, one jit)
vs `torch.func` (vmap of grad over `functional_call`), inference-mode BatchNorm on both
sides so examples do not couple. The two score vectors are also compared (same weights,
converted with `torch_import`), so the figure is for the same computation."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import Row, timed, xla_flops


def run(n: int = 2048, chunk_size: int = 128, reps: int = 5, model_name="cifar_resnet20"):
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from torch.func import functional_call, grad, vmap

    from kdprune_jax import losses, models, scoring
    from kdprune_jax.models.torch_cifar import torch_cifar_resnet

    depth = int(model_name.removeprefix("cifar_resnet"))
    torch.manual_seed(0)
    net = torch_cifar_resnet(depth, 10).eval()
    params, batch_stats = models.torch_state_dict_to_nnx(net.state_dict(), model_name, 10)
    graphdef = nnx.split(nnx.eval_shape(lambda: models.create_model(model_name, num_classes=10)),
                         nnx.Param, nnx.BatchStat)[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)

    def per_example_loss(p, ex):
        logits = nnx.merge(graphdef, p, batch_stats)(ex["image"][None], train=False)
        return losses.cross_entropy(logits, ex["label"][None])[0]

    batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
    fn = jax.jit(lambda p, b: scoring.grand_scores(per_example_loss, p, b,
                                                   chunk_size=chunk_size))
    t0 = time.perf_counter()  # the first call compiles (and runs once)
    ours_scores = np.asarray(jax.block_until_ready(fn(params, batch)))
    compile_s = time.perf_counter() - t0
    flops = xla_flops(fn, params, batch)
    med, times = timed(lambda: fn(params, batch), reps=reps, warmup=0,
                       sync=jax.block_until_ready)

    tparams = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous()
    yt = torch.from_numpy(y.astype(np.int64))

    def loss_one(p, xi, yi):
        out = functional_call(net, (p, buffers), (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    per_ex_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def torch_scores():
        out = []
        for s in range(0, n, chunk_size):  # same chunking as ours: bounded memory
            g = per_ex_grad(tparams, xt[s:s + chunk_size], yt[s:s + chunk_size])
            out.append(torch.sqrt(sum((v.reshape(v.shape[0], -1) ** 2).sum(1)
                                      for v in g.values())))
        return torch.cat(out)

    ref_scores = torch_scores().numpy()
    med_t, times_t = timed(torch_scores, reps=reps, warmup=0)
    rel = float(np.max(np.abs(ours_scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-6)))
    return [Row(
        workload=f"GraNd {model_name}, {n} examples, all params", unit="ex/s",
        ours=n / med, ours_label=f"vmap(grad), chunks of {chunk_size}", ref=n / med_t,
        ref_label="torch.func vmap(grad)", reps=reps, ours_spread=(n / max(times), n / min(times)),
        ref_spread=(n / max(times_t), n / min(times_t)), compile_seconds=compile_s, flops=flops,
        achieved_gflops=flops / med / 1e9 if flops else None,
        notes=f"max relative difference of the scores {rel:.1e}")]
