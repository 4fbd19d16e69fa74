"""Launch the CLI as N local JAX processes (coordinator on 127.0.0.1), as a pod slice would.

Each process is a fresh interpreter with its own ``--xla_force_host_platform_device_count``
CPU devices; together they form one global ("data",) mesh over N x devices devices, with
gloo carrying the cross-process collectives.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def cli_env(devices: int, extra_env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **(extra_env or {}))
    return env


def run_cli(args: list[str], *, num_processes: int, devices_per_process: int,
            timeout: float = 600, env_per_process: list[dict] | None = None,
            heartbeat_timeout_seconds: int = 60, log_dir: str | None = None,
            distributed: bool = False) -> list[Proc]:
    """Run ``python -m kdprune_jax.main ARGS`` as `num_processes` cooperating processes
    (or one plain process when num_processes == 1, unless `distributed`: then one process
    that joins JAX's distributed runtime, with its gloo collectives); returns each one's
    outcome.

    Output goes to files (``log_dir/p<i>.{out,err}``) rather than pipes, so a process that
    prints a lot never blocks on a full pipe, and a timed-out run still leaves its logs."""
    base = [sys.executable, "-m", "kdprune_jax.main", *args]
    if num_processes > 1 or distributed:
        port = free_port()
        base += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                 f"--heartbeat_timeout_seconds={heartbeat_timeout_seconds}"]
    log_dir = log_dir or tempfile.mkdtemp(prefix="kdprune_mp_")
    os.makedirs(log_dir, exist_ok=True)
    procs, files, t0 = [], [], time.perf_counter()
    for i in range(num_processes):
        cmd = base + ([f"--process_id={i}"] if num_processes > 1 or distributed else [])
        env = cli_env(devices_per_process, (env_per_process or [{}] * num_processes)[i])
        fo = open(os.path.join(log_dir, f"p{i}.out"), "w+")
        fe = open(os.path.join(log_dir, f"p{i}.err"), "w+")
        files.append((fo, fe))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fo, stderr=fe, text=True))
    out = []
    try:
        for p, (fo, fe) in zip(procs, files):
            remaining = max(1.0, timeout - (time.perf_counter() - t0))
            try:
                p.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            fo.seek(0)
            fe.seek(0)
            out.append(Proc(p.returncode, fo.read(), fe.read(), time.perf_counter() - t0))
    finally:
        for p in procs:  # never leave a stray process behind a failed test
            if p.poll() is None:
                p.kill()
                p.wait()
        for fo, fe in files:
            fo.close()
            fe.close()
    return out
