r"""How far 1 x 8 and 2 x 4 CPU runs of the quickstart smoke config drift apart, and why.

    python -m benchmarks.collectives_drift --out benchmarks/results/collectives-drift-NAME.md

Three runs of ``configs/quickstart.py:smoke`` (random subset; teacher and student 21 steps
each): a plain 1-process x 8-device run (in-process all-reduces), the same as a 1-process
job of JAX's distributed runtime (gloo collectives), and 2 processes x 4 devices (gloo).
Reports the largest absolute difference of the final teacher and student parameters
against the 2 x 4 run (tests/test_multiprocess.py uses the distributed 1 x 8 reference).
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

from tests.multiprocess import run_cli  # noqa: E402
from tests.test_multiprocess import _flat, _student_params  # noqa: E402

ARGS = ["--config=configs/quickstart.py:smoke", "--config.prune.method=random"]


def _params(workdir, role):
    step, params = _student_params(workdir) if role == "student" else _teacher(workdir)
    return step, _flat(params)


def _teacher(workdir):
    import jax
    import orbax.checkpoint as ocp

    root = os.path.join(workdir, "teacher")
    step = max(int(d) for d in os.listdir(root) if d.isdigit())
    path = os.path.join(root, str(step), "state")
    ck = ocp.StandardCheckpointer()
    meta = ck.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = ck.restore(path, jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta))
    ck.close()
    return step, state["params"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="kdprune_drift_")
    runs = {"1 x 8 plain": (1, 8, False), "1 x 8 distributed": (1, 8, True),
            "2 x 4": (2, 4, False)}
    dirs = {}
    for name, (n, d, dist) in runs.items():
        wd = os.path.join(root, name.replace(" ", "_"))
        procs = run_cli([*ARGS, f"--workdir={wd}"], num_processes=n, devices_per_process=d,
                        distributed=dist, log_dir=wd + ".logs")
        assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
        dirs[name] = wd
    lines = ["| run vs 2 x 4 | teacher max abs diff | student max abs diff |", "|---|---|---|"]
    ref = {r: _params(dirs["2 x 4"], r)[1] for r in ("teacher", "student")}
    for name in ("1 x 8 plain", "1 x 8 distributed"):
        cells = []
        for role in ("teacher", "student"):
            got = _params(dirs[name], role)[1]
            cells.append(f"{max(float(np.max(np.abs(got[k] - ref[role][k]))) for k in got):.3g}")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    text = "# 1 x 8 vs 2 x 4 drift (quickstart smoke, 21 + 21 steps)\n\n" + "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
