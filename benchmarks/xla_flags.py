r"""Measured effect of XLA:CPU knobs on our KD train step.

    python -m benchmarks.xla_flags [--pair cifar_resnet20,cifar_resnet20] [--batch 128]

XLA reads XLA_FLAGS once, when the backend starts, so each setting runs in a fresh process;
the processes alternate (default, A, B, ..., default, A, B, ...) for `--rounds` rounds so
that drift in the machine's load hits every setting alike. Reports img/s (median over rounds)
and the ratio to the default flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CANDIDATES = {
    # The children run with KDPRUNE_CPU_DEFAULTS=0 (no per-program options from
    # kdprune_jax.cpu_flags), so XLA_FLAGS alone sets each candidate for the whole process.
    "default": "",  # XLA's own defaults
    "ynn_eltwise": "--xla_cpu_experimental_ynn_fusion_type=eltwise",  # kdprune_jax's default
    "ynn_eltwise_reduce_dot": "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce,"
                              "individual_dot",
    "ynn_with_convolution": "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce,"
                            "individual_dot,individual_convolution",
    "xnn_fusions": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn_graph_fusion": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "no_thunk_runtime": "--xla_cpu_use_thunk_runtime=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
}

_CHILD = r"""
import json, sys, time
import jax
from benchmarks.common import timed
from benchmarks.kd_step import jax_kd_step
t, s, b, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
step, state, tv, batch = jax_kd_step(t, s, b)
t0 = time.perf_counter()
state, m = step(state, tv, batch); jax.block_until_ready(m)
compile_s = time.perf_counter() - t0
holder = {"s": state}
def run():
    st = holder["s"]
    for _ in range(steps):
        st, m = step(st, tv, batch)
    holder["s"] = st
    return m
med, _ = timed(run, reps=5, warmup=1, sync=jax.block_until_ready)
print(json.dumps({"ips": b * steps / med, "compile_s": compile_s}))
"""


def measure(flags: str, teacher: str, student: str, batch: int, steps: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", KDPRUNE_CPU_DEFAULTS="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _CHILD, teacher, student, str(batch),
                          str(steps)], env=env, cwd=root, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:200] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", default="cifar_resnet20,cifar_resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(CANDIDATES))
    ap.add_argument("--name", default="", help="also write benchmarks/results/xla_flags-NAME.json")
    args = ap.parse_args(argv)
    teacher, student = args.pair.split(",")
    names = [n for n in args.only.split(",") if n]
    results = {n: [] for n in names}
    errors = {}
    for _ in range(args.rounds):
        for n in names:
            r = measure(CANDIDATES[n], teacher, student, args.batch, args.steps)
            if "error" in r:
                errors[n] = r["error"]
            else:
                results[n].append(r["ips"])
    base = statistics.median(results["default"]) if results.get("default") else None
    table = {}
    for n in names:
        if results[n]:
            med = statistics.median(results[n])
            table[n] = {"flags": CANDIDATES[n], "img_per_s": med,
                        "ratio_to_default": med / base if base else None,
                        "runs": results[n]}
        else:
            table[n] = {"flags": CANDIDATES[n], "error": errors.get(n)}
        row = table[n]
        print(f"{n:24s} {row.get('img_per_s', float('nan')):8.1f} img/s  "
              f"x{row.get('ratio_to_default') or float('nan'):.2f}  {row.get('error', '')}")
    out = {"pair": args.pair, "batch": args.batch, "rounds": args.rounds,
           "command": "python -m benchmarks.xla_flags " + " ".join(argv or sys.argv[1:]),
           "table": table}
    print(json.dumps(out))
    if args.name:
        d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        with open(os.path.join(d, f"xla_flags-{args.name}.json"), "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
