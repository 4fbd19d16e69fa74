"""Peak resident memory of one side of a benchmark, each side in a process of its own.

A benchmark module defines one function per side, ``side(z, baseline) -> dict`` (z: the
inputs as an opened .npz; with `baseline`, only import, load the weights and run the model
once, so that peak minus baseline is what the measured work adds), and ends with::

    if __name__ == "__main__":
        sys.exit(peak_memory.child_main({"ours": _child_ours, "kronfluence": _child_kf}))

The parent calls ``spawn("benchmarks.<module>", side, data, out)``: a fresh interpreter runs
that one side and reports its VmHWM (`peak_kib`), its wall time and what the side returned.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_kib() -> int:
    """This process's peak resident set, KiB: VmHWM of /proc/self/status (the high-water
    mark of its own address space). Not ru_maxrss: Linux carries the pre-exec address
    space's high-water mark into it at exec, so a child of a big parent reports at least
    the parent's resident set at fork."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def child_main(sides: dict, argv=None) -> int:
    """Run one side (``--side``) on ``--data``, write its results to ``--out`` (.npz)."""
    ap = argparse.ArgumentParser(description="one side of a peak-memory benchmark")
    ap.add_argument("--side", choices=tuple(sides), required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", action="store_true",
                    help="only import, load the weights and run the model once")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with np.load(args.data) as z:
        res = sides[args.side](z, args.baseline)
    res["peak_kib"] = peak_kib()
    res["ru_maxrss_kib"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    res["wall"] = time.perf_counter() - t0
    res["jax_imported"] = "jax" in sys.modules
    arrays = {k: np.asarray(v) for k, v in res.items() if isinstance(v, (np.ndarray, list))}
    meta = {k: v for k, v in res.items() if k not in arrays}
    np.savez(args.out, meta=json.dumps(meta), **arrays)
    return 0


def spawn(module: str, side: str, data: str, out: str, baseline: bool = False) -> dict:
    """``python -m <module> --side <side> ...`` in a fresh process; returns what the side
    returned plus peak_kib, wall and process_seconds (with the interpreter's start-up)."""
    cmd = [sys.executable, "-m", module, "--side", side, "--data", data, "--out", out] + (
        ["--baseline"] if baseline else [])
    env = dict(os.environ, TQDM_DISABLE="1")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=_REPO, env=env, check=True)
    with np.load(out) as r:
        res = {k: r[k] for k in r.files if k != "meta"}
        res.update(json.loads(str(r["meta"])))
    res["process_seconds"] = time.perf_counter() - t0
    print(f"[{module.rsplit('.', 1)[-1]}] {side}{' baseline' if baseline else ''}: peak "
          f"{res['peak_kib'] / 1024:.0f} MiB, {res['process_seconds']:.0f} s", flush=True)
    return res


def measure(module: str, data: str, out: str, sides=("ours", "kronfluence")) -> dict:
    """Baseline and measured run of every side, one process each:
    {side: (baseline result, result)}."""
    return {s: (spawn(module, s, data, out, baseline=True), spawn(module, s, data, out))
            for s in sides}
