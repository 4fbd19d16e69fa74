"""IF-Beta selection cost in units of ONE epoch of full-data KD student training, on real
CIFAR-10, through the real pipeline (`python -m kdprune_jax.main`, grain input pipeline,
jit steps, the features memmap, the policy's jit outer steps).

One run of configs/cifar10_ifbeta.py (ResNet-56 teacher -> ResNet-20 student, keep 0.5)
with `student.equal_steps=True` and `student.optim.num_epochs=1`: the student then takes as
many steps as one full-data epoch, so its `train_seconds` IS one full-data KD epoch, timed in
the same process as the selection. Cost = features (teacher forward over the train split,
from features/meta.json) + influence ranks and policy learning (`pruning_cost.policy_seconds`).
Every figure includes its compile time, as a user pays it (the KD epoch includes the train
step's compile too).

The teacher is trained briefly first (its quality only changes how many outer steps the
policy takes before early stopping); its time is not part of the cost. The workdir is kept,
so a rerun reuses the teacher and only redoes what is timed (features/ and ifbeta/ are
removed first).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from benchmarks.common import Row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(max_per_class: int = 1000, teacher_epochs: int = 2,
        workdir: str = "/tmp/kdprune_bench_ifbeta", reps: int = 1, teacher_init: str = "",
        overrides=()):
    """`teacher_init`: import this teacher/ directory (e.g. the one a smaller run of this
    benchmark trained) instead of training one: the full 50,000-image pool then costs only
    the timed stages. `overrides`: "FIELD=VALUE" config overrides of the run (e.g.
    "policy.preconditioner=none"), to measure one knob against the defaults."""
    rows = []
    costs = []
    for _ in range(reps):
        for stale in ("features", "ifbeta", "student", "subset.json", "results.json",
                      "student_eval.json"):
            p = os.path.join(workdir, stale)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        cmd = [sys.executable, "-m", "kdprune_jax.main",
               "--config=configs/cifar10_ifbeta.py", f"--workdir={workdir}",
               f"--config.data.max_per_class={max_per_class}",
               f"--config.teacher.optim.num_epochs={teacher_epochs}",
               "--config.student.optim.num_epochs=1", "--config.student.equal_steps=True",
               "--config.log_every_steps=100", "--config.checkpoint_every_steps=100000"]
        if teacher_init:
            cmd.append(f"--config.teacher.init={teacher_init}")
        cmd += [f"--config.{o}" for o in overrides]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        with open(os.path.join(workdir, "results.json")) as f:
            res = json.load(f)
        with open(os.path.join(workdir, "features", "meta.json")) as f:
            feat_s = json.load(f)["seconds"]
        policy_s = res["pruning_cost"]["policy_seconds"]
        with open(os.path.join(workdir, "ifbeta", "policy.json")) as f:
            res["policy_history"] = json.load(f)["history"]
        epoch_s = res["student"]["train_seconds"]
        costs.append((feat_s, policy_s, epoch_s, res))
    feat_s, policy_s, epoch_s, res = sorted(costs, key=lambda c: (c[0] + c[1]) / c[2])[
        len(costs) // 2]
    n_pool = res["subset"]["pool_size"]
    cg = [int(m["cg_iters"]) for m in res["policy_history"] if "cg_iters" in m]
    inner = [int(m["inner_iters"]) for m in res["policy_history"] if "inner_iters" in m]
    solver = (f"; {len(res['policy_history'])} outer steps, CG iterations per step median "
              f"{int(np.median(cg))} (range {min(cg)}-{max(cg)}), inner L-BFGS median "
              f"{int(np.median(inner))}, preconditioner fallbacks "
              f"{sum(int(m.get('preconditioner_fallback', 0)) for m in res['policy_history'])}"
              if cg else "")
    rows.append(Row(
        workload=(f"IF-Beta selection cost, CIFAR-10 {n_pool} pool images, ResNet-56 "
                  f"features -> policy (a {res['policy']['a']:.2f}, b {res['policy']['b']:.2f})"),
        unit="KD epochs", higher_is_better=False, ours=(feat_s + policy_s) / epoch_s,
        ours_label=f"features {feat_s:.0f} s + ranks/policy {policy_s:.0f} s",
        ref=None, ref_label=f"1 full-data KD epoch (56->20) = {epoch_s:.0f} s; target <= 0.5",
        reps=len(costs),
        notes=("pipeline run: " + " ".join(cmd[2:]) + "; features "
               f"{feat_s / epoch_s:.2f} + policy {policy_s / epoch_s:.2f} KD epochs" + solver)))
    return rows
