"""Long-run health: 2,000 training steps of a tiny model, watching host memory and the number
of XLA compilations through `train_model`'s `on_log` hook.

A leak that grows with the step count (device metrics kept alive, a batch or a state copy
retained per step, a jit cache miss per step from a changing static argument or shape)
stays invisible in the short tests and takes a long TPU run down after hours. Here: after
the first checkpoint no new executable may be compiled, and resident memory may grow by at
most `RSS_GROWTH_BOUND` between step 500 and step 2,000 (see there for why that number).
"""

import os
import resource

import ml_collections
import numpy as np
import pytest

from kdprune_jax import data, sharding
from kdprune_jax.models import create_model
from kdprune_jax.train import train_model
from kdprune_jax.train.metrics import MetricsWriter

STEPS, BATCH, SAMPLE_EVERY = 2000, 64, 250
# The 1,500 steps from 500 to 2,000 must not add more than 16 MiB of RSS. Retaining one
# training batch per step (64 x 8 x 8 float32 images + int32 labels = 16.6 KB) would add
# 24 MiB; one copy of the student's params + SGD momentum per step (2 x 20.9 KB) 60 MiB;
# anything per-step and bigger, more. Measured: 4.2 MiB (README, "Known limits"), i.e.
# allocator noise and orbax's bookkeeping of 7 more checkpoints; 16 MiB leaves ~4x room for
# that noise and still fails on the smallest per-step leak that matters.
RSS_GROWTH_BOUND = 16 << 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.slow
def test_2000_steps_memory_and_compiles_stay_flat(tmp_path):
    from jax import monitoring
    from jax._src import dispatch

    compiled = []

    def on_compile(event, duration, **kw):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiled.append(kw.get("fun_name", "?"))

    split = data.load_split(ml_collections.ConfigDict(dict(source="digits", max_per_class=0)),
                            "train")
    tr, _ = data.make_transforms("none", 8, (64.0,), (96.0,))
    opt = ml_collections.ConfigDict(dict(
        learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
        schedule="cosine", warmup_epochs=0.0, step_boundaries_epochs=(), step_decay=0.1,
        num_epochs=1, batch_size=BATCH))
    samples = []

    def on_log(step, metrics):
        if step % SAMPLE_EVERY == 0:
            samples.append((step, _rss_bytes(), len(compiled), metrics["loss"]))

    monitoring.register_event_duration_secs_listener(on_compile)
    try:
        res = train_model(
            name="soak", model=create_model("cifar_resnet8", num_classes=10, seed=0, width=0.25),
            dataset_fn=lambda: data.train_dataset(
                split, np.arange(len(split)), global_batch_size=BATCH, num_steps=STEPS, seed=0,
                transform=tr),
            num_steps=STEPS, steps_per_epoch=len(split) / BATCH, opt_cfg=opt,
            mesh=sharding.make_mesh(1), ckpt_dir=str(tmp_path / "ckpt"), fingerprint="soak",
            writer=MetricsWriter(str(tmp_path)), global_batch_size=BATCH, log_every_steps=50,
            checkpoint_every_steps=250, log=lambda *_: None, on_log=on_log)
    finally:
        monitoring.unregister_event_duration_listener(on_compile)
    assert res.steps == STEPS
    table = "\n".join(f"step {s:5d}  rss {r / 2**20:8.1f} MiB  compiles {c:3d}  loss {loss:.4f}"
                      for s, r, c, loss in samples)
    print(f"\n{table}\ncompiled: {compiled}")
    assert [s for s, *_ in samples] == list(range(SAMPLE_EVERY, STEPS + 1, SAMPLE_EVERY))
    by_step = {s: (r, c) for s, r, c, _ in samples}
    # The train step compiles once, before the first sample; the first checkpoint (step 250,
    # after that step's sample) adds its one-off helpers (the finiteness check). From the
    # sample at step 500 on, nothing new is compiled.
    assert compiled.count("jit(step)") == 1, compiled
    assert all(c == by_step[500][1] for s, (_, c) in by_step.items() if s >= 500), table
    growth = by_step[STEPS][0] - by_step[500][0]
    assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth / 2**20:.1f} MiB\n{table}"
    assert samples[-1][3] < samples[0][3]  # and it did learn something
    assert os.path.exists(tmp_path / "metrics.jsonl")
