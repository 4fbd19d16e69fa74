"""Feedback: JSON-lines metrics in the workdir and a terminal progress bar (rate, ETA).

Only process 0 writes; other processes get no-op writers so every call site stays simple.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

from kdprune_jax import io_errors


class MetricsWriter:
    """Appends one JSON object per line to DIR/metrics.jsonl (process 0 only)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0

    def write(self, stage: str, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"stage": stage, "step": int(step), "time": round(time.time(), 3)}
        for k, v in values.items():
            v = float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v
            rec[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
        line = json.dumps(rec) + "\n"
        with io_errors.writing(self.path, needed=len(line)), open(self.path, "a") as f:
            f.write(line)


class ProgressBar:
    """A one-line progress bar with steps/s, images/s and ETA, drawn only on a terminal
    (stderr is a TTY) and only on process 0; otherwise silent."""

    def __init__(self, desc: str, total: int, start: int = 0, images_per_step: int = 0,
                 stream=None):
        self.stream = stream or sys.stderr
        self.enabled = jax.process_index() == 0 and self.stream.isatty()
        self.desc, self.total, self.start, self.n = desc, total, start, start
        self.images_per_step = images_per_step
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.postfix = ""

    def update(self, n: int, postfix: str | None = None) -> None:
        self.n = n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw > 0.2 or n >= self.total):
            self.last_draw = now
            self._draw(now)

    def _draw(self, now):
        done = self.n - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        frac = self.n / max(self.total, 1)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        ips = f" {rate * self.images_per_step:,.0f} img/s" if self.images_per_step else ""
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        self.stream.write(
            f"\r{self.desc} [{bar}] {self.n}/{self.total} {rate:.2f} it/s{ips} "
            f"ETA {eta_s} {self.postfix}\x1b[K"
        )
        self.stream.flush()

    def close(self):
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
