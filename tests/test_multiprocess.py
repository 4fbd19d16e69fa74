"""JAX's multi-process runtime for real, on one machine: 2 processes x 4 CPU devices (gloo
collectives, coordinator on 127.0.0.1) against 1 process x 8 devices.

These start fresh interpreters through the CLI, exactly as `launch/tpu_vm.sh run` does on
each worker of a pod slice."""

import json
import os
import shutil
import time

import numpy as np
import pytest

from tests.multiprocess import run_cli

SMOKE = ["--config=configs/quickstart.py:smoke",
         # Two short proxies: the proxy-training + scoring path, kept to seconds.
         "--config.proxy.num_models=2", "--config.proxy.num_epochs=1"]


def _student_params(workdir):
    """The final student params, restored onto one local device whatever topology (1 x 8
    or 2 x 4 devices) saved them."""
    import jax
    import orbax.checkpoint as ocp

    root = os.path.join(workdir, "student")
    step = max(int(d) for d in os.listdir(root) if d.isdigit())
    ckptr = ocp.StandardCheckpointer()
    path = os.path.join(root, str(step), "state")
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    state = ckptr.restore(path, target)
    ckptr.close()
    return step, state["params"]


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _ok(procs):
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{p.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["el2n", "ifbeta"])
def test_two_processes_equal_one_process_with_8_devices(tmp_path, method):
    """Teacher training, proxies / features, scoring or policy learning, selection, student
    training and eval: 2 x 4 devices give the subset, scores and student params of 1 x 8.
    The ifbeta case starts from a copy of the 1 x 8 run's finished teacher (teacher
    training across processes is the el2n case's): a checkpoint written by one process,
    whose data-iterator state is per process, is reused in place, not retrained.

    The 1 x 8 reference joins JAX's distributed runtime as a single process, so both sides
    reduce across devices with the same collectives (gloo) and what is compared is the
    split of the mesh over processes. A plain process all-reduces in-process, summing in
    another order, and training amplifies that rounding difference: on an Intel Xeon the
    plain 1 x 8 run's student left these tolerances after the smoke runs' 42 steps."""
    extra = [f"--config.prune.method={method}"]
    if method == "ifbeta":
        extra += ["--config.policy.max_steps=3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _ok(run_cli([*SMOKE, *extra, f"--workdir={one}"], num_processes=1, devices_per_process=8,
                distributed=True))
    if method == "ifbeta":
        shutil.copytree(os.path.join(one, "teacher"), os.path.join(two, "teacher"))
    procs = run_cli([*SMOKE, *extra, f"--workdir={two}"], num_processes=2,
                    devices_per_process=4, log_dir=str(tmp_path / "logs"))
    _ok(procs)
    if method == "ifbeta":
        assert "[teacher] already trained" in procs[0].stdout
        assert "moved to" not in procs[0].stdout + procs[0].stderr
    assert "8 devices" in procs[0].stdout and "results:" in procs[0].stdout
    # Gloo's own connection message ("[Gloo] Rank 1 is connected to 1 peer ranks. ...") is
    # not ours; it is sometimes split over two lines (or leaves an empty one), so both
    # halves and blank lines are recognized.
    ours = [ln for ln in procs[1].stdout.splitlines() if ln.strip()
            and not ln.startswith("[Gloo]") and "peer ranks" not in ln]
    assert ours == [], "only process 0 prints (and writes) results"

    sub1, sub2 = (json.load(open(os.path.join(w, "subset.json"))) for w in (one, two))
    assert sub1["indices"] == sub2["indices"] and len(sub1["indices"]) > 0
    if method == "el2n":
        s1, s2 = (np.load(os.path.join(w, "scores", "el2n.npz"))["scores"] for w in (one, two))
        assert np.isfinite(s1).sum() > 1000
        np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-6)
    else:
        p1, p2 = (json.load(open(os.path.join(w, "ifbeta", "policy.json"))) for w in (one, two))
        np.testing.assert_allclose(p2["phi"], p1["phi"], rtol=1e-4, atol=1e-6)
        f1, f2 = (np.load(os.path.join(w, "features", "features.npy")) for w in (one, two))
        np.testing.assert_allclose(f2, f1, rtol=1e-5, atol=1e-5)

    step1, params1 = _student_params(one)
    step2, params2 = _student_params(two)
    assert step1 == step2
    flat1, flat2 = _flat(params1), _flat(params2)
    assert flat1.keys() == flat2.keys()
    for k in flat1:  # gradient all-reduces sum in a different order across processes
        np.testing.assert_allclose(flat2[k], flat1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    r1, r2 = (json.load(open(os.path.join(w, "results.json"))) for w in (one, two))
    assert r1["student"]["test"]["count"] == r2["student"]["test"]["count"] == 359
    assert abs(r1["student"]["test"]["loss"] - r2["student"]["test"]["loss"]) < 1e-4


def test_a_dead_process_stops_the_others_within_the_heartbeat_timeout(tmp_path):
    """Process 1 is SIGKILLed mid-training (as a preempted worker); process 0 must not hang
    in its next all-reduce but stop with JAX's error naming the cause."""
    heartbeat = 10
    t0 = time.perf_counter()
    procs = run_cli([*SMOKE, f"--workdir={tmp_path / 'w'}"], num_processes=2,
                    devices_per_process=4, heartbeat_timeout_seconds=heartbeat,
                    env_per_process=[{}, {"KDPRUNE_KILL_AT": "teacher:3"}], timeout=300,
                    log_dir=str(tmp_path / "logs"))
    elapsed = time.perf_counter() - t0
    assert procs[1].returncode == -9
    assert procs[0].returncode != 0
    assert elapsed < 200, f"survivor took {elapsed:.0f} s to stop"
    assert "another task died" in procs[0].stderr or "detected fatal errors" in procs[0].stderr


def test_batch_not_divisible_by_global_device_count_is_one_message_on_every_process(tmp_path):
    workdir = tmp_path / "w"
    procs = run_cli([*SMOKE, f"--workdir={workdir}", "--config.student.optim.batch_size=36"],
                    num_processes=2, devices_per_process=4, timeout=300)
    msgs = []
    for i, p in enumerate(procs):
        assert p.returncode == 2, p.stderr[-2000:]
        lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
        assert len(lines) == 1, p.stderr[-2000:]
        assert lines[0].startswith(f"[process {i}] error: config.student.optim.batch_size=36")
        msgs.append(lines[0].split("] ", 1)[1])
    assert msgs[0] == msgs[1]
    assert "a positive multiple of the global device count (8 = 2 processes x 4 devices)" in msgs[0]
    # Stopped before any training: nothing was trained or checkpointed.
    assert not (workdir / "teacher").exists()


@pytest.mark.slow
def test_a_one_process_teacher_is_imported_by_two_processes(tmp_path, quickstart_smoke_run):
    """teacher.init names a teacher trained by a plain 1-process run: its arrays were saved
    on process 0's device, which process 1 cannot address, so each process restores them
    onto its own. The teacher is evaluated to the same accuracy as where it was trained and
    is not copied into the workdir. (Its reuse in place: the ifbeta case above.)"""
    one = quickstart_smoke_run(str(tmp_path / "one"), parts=["teacher", "results.json"])
    want = json.load(open(os.path.join(one, "results.json")))["teacher"]
    wd = tmp_path / "imported"
    procs = run_cli(["--config=configs/quickstart.py:smoke", f"--config.teacher.init={one}/teacher",
                     f"--workdir={wd}"], num_processes=2, devices_per_process=1,
                    log_dir=str(tmp_path / "logs"))
    _ok(procs)
    assert "unreadable" not in procs[0].stdout + procs[0].stderr + procs[1].stderr
    got = json.load(open(os.path.join(wd, "results.json")))["teacher"]
    assert got["count"] == want["count"] and got["accuracy"] == want["accuracy"]
    assert abs(got["loss"] - want["loss"]) < 1e-5
    assert not os.path.exists(wd / "teacher")
