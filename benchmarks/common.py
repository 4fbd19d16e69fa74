"""Shared benchmark machinery: timing (warm-up, then the median of >= 5 repetitions, compile
time apart), machine and version facts, the machine's measured matmul peak, and the row
format every benchmark reports.

Every figure is a ratio against a reference run in the same process on the same machine:
absolute times on a shared 2-core CPU mean little, ratios measured side by side do.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import statistics
import time


@dataclasses.dataclass
class Row:
    """One benchmark line: our figure against the reference's, same unit, same run.

    `higher_is_better` says how `ratio` is formed: ours / ref for throughputs, ref / ours for
    times, so ratio > 1 always means we are faster.
    """

    workload: str
    unit: str
    ours: float
    ours_label: str
    ref: float | None
    ref_label: str
    higher_is_better: bool = True
    reps: int = 0
    ours_spread: tuple[float, float] | None = None  # (min, max) over repetitions
    ref_spread: tuple[float, float] | None = None
    compile_seconds: float | None = None  # ours, measured apart from the repetitions
    ref_compile_seconds: float | None = None
    flops: float | None = None  # per call, from XLA's cost analysis
    achieved_gflops: float | None = None
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.ref or not self.ours:
            return None
        return self.ours / self.ref if self.higher_is_better else self.ref / self.ours

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratio"] = self.ratio
        return d


def timed(fn, *, reps: int = 5, warmup: int = 1, sync=lambda r: r) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `reps` calls after `warmup` calls.

    `sync(result)` must block until the work is done (e.g. jax.block_until_ready): JAX
    dispatches asynchronously, so timing the call alone would time the dispatch.
    Returns (median, all times)."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def machine() -> dict:
    """What the figures were measured on."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:  # the per-program XLA:CPU options of our hot programs (kdprune_jax.cpu_flags)
        from kdprune_jax import cpu_flags

        info["cpu_compiler_options"] = cpu_flags.compiler_options()
    except Exception as e:  # noqa: BLE001 -- a record, never a reason to fail the run
        info["cpu_compiler_options"] = f"unavailable: {e}"
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        affinity = len(os.sched_getaffinity(0))
        info["usable_cores"] = affinity
    except AttributeError:
        pass
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision", "dattri"):
        try:
            versions[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:  # not installed here
            versions[mod] = None
    info["versions"] = versions
    return info


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
    """Measured float32 GFLOP/s of an n x n matmul in XLA and in PyTorch on this machine:
    the ceiling against which a step's achieved FLOP/s can be read."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    mm = jax.jit(lambda x: x @ x)
    med, _ = timed(lambda: mm(a), reps=reps, warmup=2, sync=jax.block_until_ready)
    out = {"n": n, "xla_gflops": 2 * n**3 / med / 1e9}
    try:
        import torch

        t = torch.from_numpy(np.array(a))  # a writable host copy
        med_t, _ = timed(lambda: t @ t, reps=reps, warmup=2)
        out["torch_gflops"] = 2 * n**3 / med_t / 1e9
    except ImportError:
        pass
    return out


def xla_flops(jitted, *args) -> float | None:
    """FLOPs of one call of a jitted function, from XLA's cost analysis of the compiled
    executable (None where the backend does not report them)."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def format_table(rows: list[Row]) -> str:
    head = ("workload", "ours", "reference", "ratio", "compile s", "GFLOP/s")
    lines = [head]
    for r in rows:
        ours = f"{r.ours:,.1f} {r.unit} ({r.ours_label})"
        ref = f"{r.ref:,.1f} {r.unit} ({r.ref_label})" if r.ref else f"- ({r.ref_label})"
        lines.append((r.workload, ours, ref, f"{r.ratio:.2f}x" if r.ratio else "-",
                      f"{r.compile_seconds:.1f}" if r.compile_seconds is not None else "-",
                      f"{r.achieved_gflops:.1f}" if r.achieved_gflops else "-"))
    widths = [max(len(str(x[i])) for x in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(x, widths)) for x in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows: list[Row]) -> str:
    out = ["| workload | ours | reference | ratio (>1 = ours faster) | our compile s | "
           "achieved GFLOP/s | notes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{r.ref:,.2f} {r.unit} ({r.ref_label})" if r.ref else f"- ({r.ref_label})"
        out.append(
            f"| {r.workload} | {r.ours:,.2f} {r.unit} ({r.ours_label}) | {ref} | "
            f"{f'{r.ratio:.2f}x' if r.ratio else '-'} | "
            f"{f'{r.compile_seconds:.1f}' if r.compile_seconds is not None else '-'} | "
            f"{f'{r.achieved_gflops:.1f}' if r.achieved_gflops else '-'} | {r.notes} |")
    return "\n".join(out)
