"""Disk full and I/O errors (issue 18, item 3): a failed write of an artifact or checkpoint
stops the run with ONE line (the file, the errno text, the free space left, the size to
write), as a `UserError` (exit 2 through main), leaving what is complete byte-identical; a
checkpoint step whose save never committed is recognised as incomplete (not "a different
config"), removed with a line, and the rerun resumes from the last complete step and
equals an uninterrupted run.

ENOSPC is raised at the two write boundaries (`ocp.CheckpointManager.save` and the fsync of
a file artifact's temp file): patching Python's `open` would not reach orbax, whose arrays
tensorstore writes. Where the test can mount a small tmpfs (root), the real thing is checked
too: tensorstore's ENOSPC, a `ValueError` that only quotes the OS error code.
"""

import errno
import glob
import os
import re
import subprocess

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdprune_jax import artifacts, io_errors, pipeline
from kdprune_jax.errors import UserError
from kdprune_jax.train import checkpoint
from kdprune_jax.train.state import TrainState
from tests.test_pipeline import load_config, snapshot
from tests.test_preemption import _answer

NOSPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
LINE = (r"^cannot write {what}{path}: No space left on device \(errno 28 ENOSPC\); "
        r"[0-9.]+ [KMG]?i?B free on its filesystem, {need} [0-9.]+ [KMG]?i?B; free some space "
        r"and rerun the same command \(what is complete is kept\)$")


def _line(err: UserError, what: str, path: str, need: str) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    assert re.match(LINE.format(what=what, path=re.escape(path), need=need), text), text
    return text


# ------------------------------------------------------------------------------ unit


def test_the_os_error_behind_orbax_and_python_writes_is_found():
    ts = ValueError("RESOURCE_EXHAUSTED: Error writing \"w/0\" in OCDBT database at local file "
                    "\"/w/student/20.orbax-checkpoint-tmp/state\": Failed to write 474 bytes "
                    "to file 4: No space left on device [os_error_code='28']")
    assert io_errors.os_error(ts) == (errno.ENOSPC, NOSPACE, None)
    py = OSError(errno.EIO, os.strerror(errno.EIO), "/w/subset.json")
    assert io_errors.os_error(py) == (errno.EIO, os.strerror(errno.EIO), "/w/subset.json")
    try:
        try:
            raise py
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert io_errors.os_error(e)[0] == errno.EIO  # found through the cause
    assert io_errors.os_error(ValueError("a real bug")) is None
    with pytest.raises(ValueError, match="a real bug"):  # anything else keeps its traceback
        with io_errors.writing("/w/x.json"):
            raise ValueError("a real bug")
    acc = io_errors.write_error(OSError(errno.EACCES, "Permission denied"), "/w/x.json")
    assert "Permission denied (errno 13 EACCES)" in str(acc) and "make it writable" in str(acc)


def test_orbax_and_asyncio_noise_of_a_failed_save_is_dropped(monkeypatch):
    import logging
    import sys

    # main installs these for the whole process; here they are undone after the test.
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters",
                            list(logging.getLogger(name).filters))
    io_errors.quiet_orbax_storage_errors()
    io_errors.quiet_orbax_storage_errors()  # idempotent
    assert sum(isinstance(f, io_errors._QuietStorageErrors)
               for f in logging.getLogger("absl").filters) == 1
    exc = ValueError("Failed writing: No space left on device [os_error_code='28']")

    def record(name, path, e):
        return logging.LogRecord(name, logging.ERROR, path, 1, "save failed", None,
                                 (type(e), e, None))

    f = io_errors._QuietStorageErrors()
    assert not f.filter(record("absl", "/x/orbax/checkpoint/async.py", exc))
    assert not f.filter(record("asyncio", "/x/asyncio/base_events.py", exc))
    assert f.filter(record("absl", "/x/orbax/checkpoint/async.py", ValueError("bug")))
    assert f.filter(record("absl", "/x/kdprune_jax/pipeline.py", exc))  # not orbax's
    assert getattr(sys.unraisablehook, "_kdprune_quiet", False)


def _small_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    # Fails, never skips: without a real full filesystem tensorstore's own ENOSPC path
    # goes unchecked (the tests below only raise ENOSPC at the boundaries).
    assert p.returncode == 0, (f"cannot mount a {size} tmpfs at {path} "
                               f"({p.stderr.strip() or p.returncode}): this test needs root "
                               "(or CAP_SYS_ADMIN), as the CI machine has")


def test_a_really_full_filesystem_is_one_line_and_leaves_no_partial_file(tmp_path):
    mnt = tmp_path / "full"
    _small_tmpfs(mnt, "1m")
    try:
        ckdir = str(mnt / "student")
        w = np.random.default_rng(0).random(600_000, np.float32)  # zstd cannot shrink it
        state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.asarray(w)}, {}, {})
        ck = checkpoint.Checkpointer(ckdir)
        with pytest.raises(io_errors.WriteError) as e:  # tensorstore's error, async
            ck.save(10, state, {"fingerprint": "x"})
            ck.close()
        _line(e.value, "checkpoint ", os.path.join(ckdir, "10"), "the train state to save is")
        assert e.value.needed == 600_000 * 4 + 4
        assert checkpoint.incomplete_steps(ckdir, set()) == ["10.orbax-checkpoint-tmp"]
        # A file artifact: the temp file is removed, an older file keeps its bytes.
        path = str(mnt / "scores.npz")
        with open(path, "wb") as f:
            f.write(b"old")
        with pytest.raises(io_errors.WriteError) as e:
            artifacts.write_npz(path, scores=np.ones(300_000, np.float32))
        _line(e.value, "", path, "this write needs about")
        assert open(path, "rb").read() == b"old"
        assert not glob.glob(str(mnt / ".tmp-*"))
        # A memmap: allocated up front, so a full disk is this error, not a SIGBUS mid-pass.
        mm_path = str(mnt / "logits.npy")
        with pytest.raises(io_errors.WriteError, match="logits.npy: No space left"):
            io_errors.open_memmap(mm_path, np.float32, (1 << 20,))
        assert not os.path.exists(mm_path)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_leftover_tmp_step_is_incomplete_not_another_config(quickstart_smoke_run, tmp_path):
    wd = quickstart_smoke_run(str(tmp_path / "w"), parts=["teacher"])
    ckdir = os.path.join(wd, "teacher")
    steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
    fp = checkpoint.Checkpointer(ckdir).read_meta()["fingerprint"]
    committed = {s: snapshot(os.path.join(ckdir, str(s))) for s in steps}
    os.makedirs(os.path.join(ckdir, "30.orbax-checkpoint-tmp", "state"))
    lines = []
    checkpoint.set_aside_if_stale(ckdir, fp, lines.append, "teacher")
    assert lines == [
        f"[teacher] checkpoint {ckdir}/30.orbax-checkpoint-tmp is incomplete (its save never "
        f"committed: interrupted or out of space); removed (the last complete step is "
        f"{steps[-1]})"], lines
    assert sorted(os.listdir(ckdir)) == sorted(str(s) for s in steps)
    assert {s: snapshot(os.path.join(ckdir, str(s))) for s in steps} == committed
    # Only an uncommitted step (the case): not moved aside as "a different config".
    only = str(tmp_path / "student")
    os.makedirs(os.path.join(only, "10.orbax-checkpoint-tmp", "state"))
    lines = []
    checkpoint.set_aside_if_stale(only, fp, lines.append, "student")
    assert len(lines) == 1 and "is incomplete" in lines[0] and "no step is complete" in lines[0]
    assert "different config" not in lines[0]
    assert os.listdir(only) == [] and not glob.glob(str(tmp_path / "student.stale-*"))


# ------------------------------------------------------------------------------ pipeline


def _enospc(path):
    return OSError(errno.ENOSPC, NOSPACE, path)


def test_disk_full_stops_with_one_line_keeps_what_is_complete_and_resumes(
        quickstart_smoke_run, tmp_path, monkeypatch, capsys):
    config = load_config("quickstart.py", "smoke")
    reference = _answer(quickstart_smoke_run(str(tmp_path / "ref"),
                                             parts=["results.json", "subset.json"]))
    wd = quickstart_smoke_run(str(tmp_path / "w"), parts=["teacher", "teacher_eval.json"])
    before = snapshot(wd)

    # 1. The first file artifact of the run (subset.json) hits a full disk: its data are in
    #    the temp file, the fsync reports ENOSPC (as delayed allocation does).
    real_fsync = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        folder, name = os.path.split(target)
        if folder == os.path.realpath(wd) and name.startswith(".tmp-"):
            raise _enospc(None)
        return real_fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        with pytest.raises(UserError) as e:
            pipeline.run(config, wd)
    assert isinstance(e.value, io_errors.WriteError)
    _line(e.value, "", os.path.join(wd, "subset.json"), "this write needs about")
    after = snapshot(wd)
    assert not [f for f in after if os.path.basename(f).startswith(".tmp-")]
    assert {k: after[k] for k in before} == before  # teacher + its eval: byte-identical
    assert not os.path.exists(os.path.join(wd, "subset.json"))

    # 2. The student's checkpoint of step 20 hits a full disk mid-save: step 10 is
    #    committed, step 20 stays a temp directory (as orbax leaves it).
    before = snapshot(wd)
    log = os.path.join(wd, "metrics.jsonl")
    log_before = open(log, "rb").read() if os.path.exists(log) else b""
    real_save = ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
        d = str(self.directory)
        if os.path.basename(d) == "student" and step == 20:
            self.wait_until_finished()  # orbax commits the previous save first
            part = os.path.join(d, "20.orbax-checkpoint-tmp", "state")
            os.makedirs(part)
            with open(os.path.join(part, "partial"), "wb") as f:
                f.write(b"\0" * 100)
            raise _enospc(os.path.join(part, "partial"))
        return real_save(self, step, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(ocp.CheckpointManager, "save", save)
        with pytest.raises(UserError) as e:
            pipeline.run(config, wd)
    student = os.path.join(wd, "student")
    _line(e.value, "checkpoint ", os.path.join(student, "20"), "the train state to save is")
    after = snapshot(wd)
    kept = {k: v for k, v in before.items() if k != "metrics.jsonl"}
    assert {k: after[k] for k in kept} == kept  # teacher, its eval: byte-identical
    with open(log, "rb") as f:
        assert f.read().startswith(log_before)  # the log is only appended to
    assert os.path.exists(os.path.join(wd, "subset.json"))
    assert sorted(os.listdir(student)) == ["10", "20.orbax-checkpoint-tmp"]
    assert not os.path.exists(os.path.join(wd, "results.json"))

    # 3. With space again: the incomplete step is named and removed, training resumes from
    #    step 10 (so it was intact), and the answer is the uninterrupted run's (bitwise:
    #    same program, same device count).
    before = snapshot(wd)
    capsys.readouterr()
    pipeline.run(config, wd)
    out = capsys.readouterr().out
    assert (f"[student] checkpoint {student}/20.orbax-checkpoint-tmp is incomplete (its save "
            "never committed: interrupted or out of space); removed (the last complete step "
            "is 10)") in out, out
    assert "[student] resumed from step 10/21" in out, out
    assert "different config" not in out and not glob.glob(os.path.join(wd, "*.stale-*"))
    assert _answer(wd) == reference
    after = snapshot(wd)
    unchanged = [k for k in before if k.startswith(("teacher", "subset.json"))]
    assert unchanged and all(after[k] == before[k] for k in unchanged)
