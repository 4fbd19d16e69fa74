"""Cached-teacher mode (config.kd.teacher_views = V) against the live teacher, on real
CIFAR-10 through the real pipeline: student time (including building the cache) and the
student's test accuracy, same teacher, same subset, same seed.

Two runs of configs/cifar10_kd.py (ResNet-56 teacher imported from `teacher_dir`, random
keep 0.5, ResNet-20 student for `student_epochs` epochs), one with kd.teacher_views=0 and
one with V. The speed-up is (live student seconds) / (cache seconds + cached student
seconds); the accuracy effect is the difference of the two test accuracies (one seed each:
differences below ~1 point are within seed noise at this scale).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from benchmarks.common import Row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, teacher_dir, views, max_per_class, student_epochs):
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "kdprune_jax.main", "--config=configs/cifar10_kd.py",
           f"--workdir={workdir}", f"--config.teacher.init={teacher_dir}",
           f"--config.data.max_per_class={max_per_class}",
           f"--config.student.optim.num_epochs={student_epochs}",
           f"--config.kd.teacher_views={views}", "--config.log_every_steps=100",
           "--config.checkpoint_every_steps=100000"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f), cmd


def run(teacher_dir="/tmp/kdprune_bench_ifbeta/teacher", views: int = 4,
        max_per_class: int = 1000, student_epochs: int = 15,
        workdir: str = "/tmp/kdprune_bench_cached"):
    live, _ = _run(os.path.join(workdir, "live"), teacher_dir, 0, max_per_class,
                   student_epochs)
    cached, cmd = _run(os.path.join(workdir, f"views{views}"), teacher_dir, views,
                       max_per_class, student_epochs)
    t_live = live["student"]["train_seconds"]
    t_cache = cached["timings"]["teacher_views_seconds"]
    t_cached = cached["student"]["train_seconds"]
    acc_live = live["student"]["test"]["accuracy"]
    acc_cached = cached["student"]["test"]["accuracy"]
    return [Row(
        workload=(f"Student KD, ResNet-56 -> ResNet-20, {cached['subset']['num_kept']} CIFAR-10 "
                  f"images x {student_epochs} epochs, cached teacher (V={views})"),
        unit="s", higher_is_better=False, ours=t_cache + t_cached,
        ours_label=f"cache {t_cache:.0f} s + student {t_cached:.0f} s",
        ref=t_live, ref_label="live teacher", reps=1,
        notes=(f"test accuracy {acc_cached:.4f} cached vs {acc_live:.4f} live "
               f"({100 * (acc_cached - acc_live):+.2f} points; teacher "
               f"{live['teacher']['accuracy']:.4f}); command: {' '.join(cmd[2:])}"))]
