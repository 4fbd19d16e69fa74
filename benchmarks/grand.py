"""GraNd (full-parameter per-example gradient norms) on a CIFAR ResNet-20 for 2,048
examples: ours (`kdprune_jax.scoring.grand_scores`: vmap of grad, one jit per batch) vs
`torch.func` (vmap of grad over `functional_call`), inference-mode BatchNorm on both sides
so examples do not couple. Both sides loop on the host over batches of `batch_size`
examples (as the score stage's `batch_pass` does). Ours is reported with the batch in one
vmap (the pipeline's default, score.grand_chunk_size=0) and in unrolled chunks of
`chunk_size` (grand_scores' default); the lax.map formulation this replaced is measured on
one batch for the record. The two score vectors are also compared (same
weights, converted with `torch_import`), so the figure is for the same computation.

Two last rows bound what a GraNd method can reach here, each ONE gradient of the batch's
mean loss per batch (no per-example work), ours vs PyTorch on the same batches:
- the batched weight gradient (forward + backward). A method built on one batched
  backward (per-layer norms from captured activations and cotangents) does this work plus
  the per-example weight-gradient FLOPs, so our side of this row bounds it;
- the backward to the input images only (forward + every activation cotangent, no weight
  gradient): a floor for any per-example-norm method, "ghost" norms included, since each
  needs every layer's output cotangent."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import Row, timed, xla_flops


def run(n: int = 2048, batch_size: int = 256, chunk_size: int = 64, reps: int = 5,
        model_name="cifar_resnet20", lax_map_too: bool = True, bound_too: bool = True):
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from torch.func import functional_call, grad, vmap

    from kdprune_jax import cpu_flags, losses, models, scoring
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

    batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}

    def per_example_loss(p, ex):
        logits = nnx.merge(graphdef, p, batch_stats)(ex["image"][None], train=False)
        return losses.cross_entropy(logits, ex["label"][None])[0]

    def lax_map_scores(p, b):  # the formulation grand_scores used before (for the record)
        one = lambda ex: jnp.sqrt(sum(  # noqa: E731
            jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(per_example_loss)(p, ex))))
        return jax.lax.map(one, b, batch_size=chunk_size)

    def measure(scores_fn, batch):
        # The score stage's XLA:CPU options (inference.batch_pass passes the same).
        fn = jax.jit(scores_fn, compiler_options=cpu_flags.compiler_options())
        m = jax.tree.leaves(batch)[0].shape[0]
        step = min(batch_size, m)
        chunks = [jax.tree.map(lambda a, s=s: a[s:s + step], batch) for s in range(0, m, step)]

        def all_scores():
            return [fn(params, c) for c in chunks]

        t0 = time.perf_counter()  # compiles once, then runs every chunk once
        scores = np.concatenate(jax.block_until_ready(all_scores()))
        compile_s = time.perf_counter() - t0
        med, times = timed(all_scores, reps=reps, warmup=0, sync=jax.block_until_ready)
        flops = xla_flops(fn, params, chunks[0])
        return scores, compile_s, flops * len(chunks) if flops else None, med, times

    variants = {
        "batch in one vmap": (n, measure(lambda p, b: scoring.grand_scores(
            per_example_loss, p, b, chunk_size=None), batch)),
        f"unrolled chunks of {chunk_size}": (n, measure(lambda p, b: scoring.grand_scores(
            per_example_loss, p, b, chunk_size=chunk_size), batch)),
    }
    if lax_map_too:  # ~10 ex/s: measured on the first batch to keep the suite short
        m = min(n, batch_size)
        variants[f"lax.map chunks of {chunk_size} (before)"] = (
            m, measure(lax_map_scores, jax.tree.map(lambda a: a[:m], batch)))

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
        for s in range(0, n, batch_size):  # the same host batches as ours
            g = per_ex_grad(tparams, xt[s:s + batch_size], yt[s:s + batch_size])
            out.append(torch.sqrt(sum((v.reshape(v.shape[0], -1) ** 2).sum(1)
                                      for v in g.values())))
        return torch.cat(out)

    ref_scores = torch_scores().numpy()
    med_t, times_t = timed(torch_scores, reps=reps, warmup=0)
    rows = []
    bounds = []
    if bound_too:
        def batch_loss(p, images, labels):  # the whole batch through the model at once
            logits = nnx.merge(graphdef, p, batch_stats)(images, train=False)
            return jnp.mean(losses.cross_entropy(logits, labels))

        bounds = [_batched_gradient_bound(
            measure, batch, batch_loss, net, tparams, buffers, xt, yt, wrt=wrt, n=n,
            batch_size=batch_size, reps=reps, model_name=model_name, torch_func_rate=n / med_t)
            for wrt in ("params", "inputs")]
    for label, (m, (scores, compile_s, flops, med, times)) in variants.items():
        ref = ref_scores[:m]
        rel = float(np.max(np.abs(scores - ref) / np.maximum(np.abs(ref), 1e-6)))
        rows.append(Row(
            workload=f"GraNd {model_name}, {n} examples, all params", unit="ex/s",
            ours=m / med, ours_label=(f"vmap(grad), {label}, batches of {min(batch_size, m)}"
                                      + (f", first {m} examples" if m < n else "")),
            ref=n / med_t, ref_label="torch.func vmap(grad)", reps=reps,
            ours_spread=(m / max(times), m / min(times)),
            ref_spread=(n / max(times_t), n / min(times_t)), compile_seconds=compile_s,
            flops=flops, achieved_gflops=flops / med / 1e9 if flops else None,
            notes=f"max relative difference of the scores {rel:.1e}"))
    return rows + bounds


def _batched_gradient_bound(measure, batch, batch_loss, net, tparams, buffers, xt, yt, *,
                            wrt, n, batch_size, reps, model_name, torch_func_rate):
    """One gradient of the batch's mean loss per batch, ours vs PyTorch (eval-mode
    BatchNorm, NCHW on PyTorch's side as in its torch.func row), as a Row.

    wrt="params": the usual batched gradient (forward, activation cotangents, summed weight
    gradients). wrt="inputs": the gradient with respect to the input images only (forward
    and every activation cotangent, no weight gradient): the work that any per-example
    norm method needs at the least (per-layer "ghost" norms too need each layer's output
    cotangents). Each side returns the gradient's norm per batch, so nothing else is
    computed, and the two are compared."""
    import jax
    import optax
    import torch
    from torch.func import functional_call

    def grad_norm(p, b):
        if wrt == "params":
            g = jax.grad(batch_loss)(p, b["image"], b["label"])
        else:
            g = jax.grad(batch_loss, argnums=1)(p, b["image"], b["label"])
        return optax.tree.norm(g)[None]

    norms, compile_s, flops, med, times = measure(grad_norm, batch)

    def torch_batched():
        out = []
        for s in range(0, n, batch_size):
            if wrt == "params":
                p = {k: v.detach().requires_grad_(True) for k, v in tparams.items()}
                x, targets = xt[s:s + batch_size], list(p.values())
            else:  # parameters without requires_grad: autograd builds no weight gradient
                p = tparams
                x = xt[s:s + batch_size].clone().requires_grad_(True)
                targets = [x]
            logits = functional_call(net, (p, buffers), (x,))
            loss = torch.nn.functional.cross_entropy(logits, yt[s:s + batch_size])
            g = torch.autograd.grad(loss, targets)
            out.append(torch.sqrt(sum((v ** 2).sum() for v in g)).item())
        return np.array(out)

    ref_norms = torch_batched()
    rel = float(np.max(np.abs(norms - ref_norms) / np.abs(ref_norms)))
    med_t, times_t = timed(torch_batched, reps=reps, warmup=0)
    what = ("batched gradient (weights)" if wrt == "params"
            else "batched backward to the inputs only (no weight gradients)")
    return Row(
        workload=f"GraNd bound: {model_name} {what}, {n} examples", unit="ex/s",
        ours=n / med, ours_label=f"one mean-loss jax.grad per batch of {batch_size}",
        ref=n / med_t, ref_label="PyTorch autograd, the same batches", reps=reps,
        ours_spread=(n / max(times), n / min(times)),
        ref_spread=(n / max(times_t), n / min(times_t)), compile_seconds=compile_s,
        flops=flops, achieved_gflops=flops / med / 1e9 if flops else None,
        notes=(f"max relative difference of the gradient norms {rel:.1e}; not per-example; "
               f"ours = {n / med / torch_func_rate:.2f}x torch.func's per-example rate "
               f"({torch_func_rate:.0f} ex/s), whose 2x target is {2 * torch_func_rate:.0f}"))
