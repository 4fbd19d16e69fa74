"""Told to stop, a run saves: SIGTERM mid-teacher and mid-student (a real signal, sent by the
process to itself at a named step with KDPRUNE_SIGNAL_AT, so the step is known), one line,
exit status 3, the checkpoint of exactly that step, and a rerun equal to an uninterrupted
run. One owner per workdir: a second run on a held workdir stops at once naming the holder;
a stale lock (its process died) is taken over. Command-line mistakes: one line, exit 2."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from kdprune_jax import preemption, workdir_lock
from tests.multiprocess import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config=configs/quickstart.py:smoke"]


def _cli(workdir, env=None, extra=()):
    # One device: these test stopping and resuming, not sharding (the SIGKILL resume tests
    # of tests/test_faults.py run on 8).
    (p,) = run_cli(BASE + [f"--workdir={workdir}", *extra], num_processes=1,
                   devices_per_process=1, timeout=600, env_per_process=[env or {}],
                   log_dir=f"{workdir}.logs")
    return p


def _answer(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        r = json.load(f)
    with open(os.path.join(workdir, "subset.json")) as f:
        sub = json.load(f)
    return {"student": {k: r["student"][k] for k in ("test", "val", "steps")},
            "teacher": {k: r["teacher"][k] for k in ("accuracy", "loss")},
            "subset": sub["indices"], "fingerprint": r["fingerprint"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ref") / "run"
    p = _cli(wd)
    assert p.returncode == 0, p.stderr[-3000:]
    return _answer(wd)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_sigterm_saves_the_step_and_the_rerun_equals_uninterrupted(reference, tmp_path,
                                                                   stage):
    wd = tmp_path / "run"
    stopped = _cli(wd, env={"KDPRUNE_SIGNAL_AT": f"{stage}:13"})
    assert stopped.returncode == preemption.EXIT_STATUS, stopped.stderr[-3000:]
    last = stopped.stderr.rstrip("\n").splitlines()[-1]
    assert re.fullmatch(
        rf"\[{stage}\] stopped by SIGTERM after step 13/21; checkpoint of step 13 saved in "
        rf".*/{stage}; rerun the same command to resume from it: python -m kdprune_jax\.main "
        r".*", last), last
    assert "Traceback" not in stopped.stderr
    steps = sorted(int(d) for d in os.listdir(wd / stage) if d.isdigit())
    assert steps[-1] == 13, steps  # exactly the step it finished
    assert not os.path.exists(wd / "results.json")
    assert not os.path.exists(wd / workdir_lock.LOCK_NAME)  # released on the way out
    resumed = _cli(wd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "classes; 1 devices" in resumed.stdout
    assert f"[{stage}] resumed from step 13/21" in resumed.stdout
    assert _answer(wd) == reference  # bitwise: same program, same device count


@pytest.mark.slow
def test_sigterm_mid_scoring_pass_stops_at_once_and_the_rerun_finishes(tmp_path):
    wd = tmp_path / "run"
    el2n = ["--config.prune.method=el2n", "--config.proxy.num_models=1",
            "--config.proxy.num_epochs=1"]
    stopped = _cli(wd, env={"KDPRUNE_SIGNAL_AT": "scores:batch1"}, extra=el2n)
    assert stopped.returncode == preemption.EXIT_STATUS, stopped.stderr[-3000:]
    last = stopped.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("[scores] stopped by SIGTERM; nothing of this pass was kept, it is "
                           "redone when you rerun the same command: python -m "), last
    assert not os.path.exists(wd / "scores" / "el2n.npz")
    resumed = _cli(wd, extra=el2n)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[proxy0] already trained" in resumed.stdout
    assert os.path.exists(wd / "results.json")


def test_a_held_workdir_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    wd = str(tmp_path / "w")
    # A live holder (this test process): a second run stops at once, naming it.
    workdir_lock.acquire(wd, heartbeat_seconds=0)
    try:
        p = subprocess.run([sys.executable, "-m", "kdprune_jax.main", *BASE,
                            f"--workdir={wd}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    finally:
        workdir_lock.release(wd)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert sorted(os.listdir(wd)) == []  # nothing written by the refused run
    # A holder that died (a pid that is not running, on this host): taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    with open(os.path.join(wd, workdir_lock.LOCK_NAME), "w") as f:
        json.dump({"host": __import__("socket").gethostname(), "pid": int(dead),
                   "start": 0, "command": "killed run", "token": "x"}, f)
    lines = []
    assert workdir_lock.try_acquire(wd, log=lines.append, heartbeat_seconds=0) is None
    workdir_lock.release(wd)
    assert len(lines) == 1 and f"pid {dead} on this host is not running" in lines[0], lines
    assert not os.path.exists(os.path.join(wd, workdir_lock.LOCK_NAME))


def test_a_takeover_never_removes_a_lock_another_taker_just_made(tmp_path, monkeypatch):
    """Two takers judge the same dead lock stale; the slower one must not move aside the
    fresh lock the faster one has written meanwhile."""
    import socket

    wd = str(tmp_path)
    path = os.path.join(wd, workdir_lock.LOCK_NAME)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead, "token": "dead"}, f)
    real = workdir_lock.read_holder

    def racing(workdir):
        holder = real(workdir)
        if holder and holder.get("token") == "dead":  # the faster taker wins right now
            os.unlink(path)
            with open(path, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getppid(),
                           "token": "faster"}, f)
        return holder

    monkeypatch.setattr(workdir_lock, "read_holder", racing)
    got = workdir_lock.try_acquire(wd, log=lambda *_: None, heartbeat_seconds=0)
    assert got is not None and got.get("token") == "faster", got
    with open(path) as f:
        assert json.load(f)["token"] == "faster"  # still there, still the faster one's
    assert [n for n in os.listdir(wd) if n != workdir_lock.LOCK_NAME] == []


def test_two_runs_started_together_one_proceeds(tmp_path):
    wd = str(tmp_path / "w")
    cmd = [sys.executable, "-m", "kdprune_jax.main", *BASE, f"--workdir={wd}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, e[-1500:]) for p, (_, e) in zip(procs, outs)]
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert re.search(r"^error: workdir .* is in use by pid \d+ on ", loser, re.M), loser
    assert os.path.exists(os.path.join(wd, "results.json"))


CLI = [
    ("misspelt_field", ["--config.kd.alhpa=0.5"],
     r'^error: --config\.kd\.alhpa: the config has no field \'alhpa\'; did you mean "alpha" '
     r'instead of "alhpa"\?$'),
    ("missing_config_file", ["--config=configs/nope.py"],
     r"^error: --config=configs/nope\.py: cannot load the config file: .*No such file"),
    ("wrong_type", ["--config.kd.temperature=abc"],
     r"^error: --config\.kd\.temperature=abc: could not convert string to float: 'abc'$"),
    # kd.alpha takes a number or "auto" (an object-typed field): the config check names it.
    ("alpha_not_a_number", ["--config.kd.alpha=abc"],
     r"^error: config\.kd\.alpha='abc' is invalid; allowed: a number in \[0, 1\] or 'auto'$"),
    ("alpha_auto_without_rule", ["--config.kd.alpha=auto"],
     r"^error: config\.kd\.alpha_rule='' is invalid; allowed: the path of a KD-weight rule "
     r"file when kd\.alpha='auto'"),
    ("bad_config_arg", ["--config=configs/quickstart.py:bogus"],
     r"^error: --config=configs/quickstart\.py:bogus: cannot load the config file: "
     r"unknown config arg 'bogus' for configs/quickstart\.py; allowed: smoke$"),
    ("bad_config_arg_with_choices", ["--config=configs/cifar10_kd.py:el2n,smok"],
     r"^error: --config=configs/cifar10_kd\.py:el2n,smok: cannot load the config file: "
     r"unknown config arg 'smok' in 'el2n,smok' for configs/cifar10_kd\.py; allowed: smoke, "
     r"tfds, and at most one method of: random, el2n, .*, ifbeta \(comma-separated\)$"),
]


@pytest.mark.parametrize("name,flags,line", CLI, ids=[c[0] for c in CLI])
def test_command_line_mistakes_are_one_line_exit_2(tmp_path, name, flags, line):
    wd = tmp_path / "w"
    args = [a for a in BASE if not any(f.startswith("--config=") for f in flags)]
    p = subprocess.run([sys.executable, "-m", "kdprune_jax.main", *args, *flags,
                        f"--workdir={wd}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and re.search(line, lines[0]), lines
    assert not wd.exists()  # nothing created, nothing compiled: it stopped at the flags


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    """Two processes (1 device each); only process 1 is signalled, at teacher step 13. The
    processes agree on the stop on their next logging step (the smoke config logs every 5),
    so both commit the checkpoint of step 15 and exit 3; the rerun resumes there and its
    student equals an uninterrupted 2-process run's, bitwise (two 2-process runs reduce in
    the same order)."""
    from tests.test_multiprocess import _flat, _student_params

    args = lambda wd: BASE + [f"--workdir={wd}"]  # noqa: E731
    ref, wd = tmp_path / "ref", tmp_path / "run"
    for p in run_cli(args(ref), num_processes=2, devices_per_process=1,
                     log_dir=str(tmp_path / "ref.logs")):
        assert p.returncode == 0, p.stderr[-3000:]
    stopped = run_cli(args(wd), num_processes=2, devices_per_process=1,
                      env_per_process=[{}, {"KDPRUNE_SIGNAL_AT": "teacher:13"}],
                      log_dir=str(tmp_path / "stop.logs"))
    for i, p in enumerate(stopped):
        assert p.returncode == preemption.EXIT_STATUS, (i, p.stderr[-3000:])
        assert "Traceback" not in p.stderr
        last = p.stderr.rstrip("\n").splitlines()[-1]
        assert re.match(rf"\[process {i}\] \[teacher\] stopped by .* after step 15/21; "
                        r"checkpoint of step 15 saved in .*/teacher; rerun the same command",
                        last), last
    steps = sorted(int(d) for d in os.listdir(wd / "teacher") if d.isdigit())
    assert steps[-1] == 15, steps
    resumed = run_cli(args(wd), num_processes=2, devices_per_process=1,
                      log_dir=str(tmp_path / "rerun.logs"))
    for p in resumed:
        assert p.returncode == 0, p.stderr[-3000:]
    assert "[teacher] resumed from step 15/21" in resumed[0].stdout
    (s1, p1), (s2, p2) = _student_params(str(ref)), _student_params(str(wd))
    assert s1 == s2
    f1, f2 = _flat(p1), _flat(p2)
    for k in f1:
        np.testing.assert_array_equal(f2[k], f1[k], err_msg=k)
