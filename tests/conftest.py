"""Test setup, before jax is imported anywhere: the simulated device count, the shared
compilation cache, and the `multidevice` marker.

Device count. XLA fixes the number of (simulated) CPU devices when the backend starts, so
one pytest process has one count. Most tests run on ONE device: with 8 simulated devices
on a 2-core machine everything replicated (parameter updates, head solves,
eigendecompositions) runs 8 times, which tests of numbers, not of sharding, do not need.
Tests that compare sharded with single-device results are marked ``multidevice`` and run
in a second process with ``KDPRUNE_TEST_DEVICES=8``, which tests/test_multidevice.py starts
(so the README's one command, ``python -m pytest -n 3 --dist loadfile``, runs both):

    python -m pytest -n 3 --dist loadfile               # 1 device + the 8-device process
    KDPRUNE_TEST_DEVICES=8 python -m pytest -m multidevice   # only the 8-device tests

Tests that start the CLI in subprocesses (kill/resume, multi-process, CLI errors) give
those processes their own device count (tests/multiprocess.py::cli_env), so they run on 8
devices / 2 processes whatever this process has.

Compilation cache. Every test process (and every CLI subprocess it starts, through the
inherited environment) shares one persistent XLA cache in a temporary directory this run
owns, with no minimum compile time, so a program compiled by one process (a kill/rerun
pair, the processes of a multi-process run, the xdist workers) is compiled once. A cache
hit still emits JAX's backend-compile monitoring event, so the tests that count
compilations (`compiles` fixtures) count the same events with or without the cache.
"""

import atexit
import os
import shutil
import tempfile

DEVICES = int(os.environ.get("KDPRUNE_TEST_DEVICES", "1"))
MULTI_DEVICES = 8  # what a `multidevice` test needs
# Any device count inherited from a parent test process is replaced, not appended to.
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(
    [*_flags, f"--xla_force_host_platform_device_count={DEVICES}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The XLA:CPU defaults (kdprune_jax.cpu_flags) are per-program compiler options inside the
# library, so the tests run what users run without touching $XLA_FLAGS here.

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Created by the first process (the xdist controller or a plain pytest); its workers
    # and subprocesses inherit the variable and so the directory.
    _cache = tempfile.mkdtemp(prefix="kdprune_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Cache every program, however small or quick to compile (the defaults skip programs that
# compile in under a second, i.e. most of a test suite's).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# grain's worker processes read absl flags; under pytest nothing parses them.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"multidevice: needs {MULTI_DEVICES} simulated devices "
        f"(run with KDPRUNE_TEST_DEVICES={MULTI_DEVICES} -m multidevice)")


def pytest_collection_modifyitems(config, items):
    """In a process without 8 devices, multidevice tests are deselected (reported at the
    end, never silently); in an 8-device process every selected test runs."""
    if DEVICES == MULTI_DEVICES:
        return
    multi = [it for it in items if it.get_closest_marker("multidevice")]
    if multi:
        config.hook.pytest_deselected(items=multi)
        items[:] = [it for it in items if not it.get_closest_marker("multidevice")]
        config._kdprune_deselected = len(multi)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_kdprune_deselected", 0)
    if n:
        terminalreporter.write_line(
            f"{n} multidevice tests deselected in this {DEVICES}-device process; "
            "tests/test_multidevice.py runs them in an 8-device one (directly: "
            f"KDPRUNE_TEST_DEVICES={MULTI_DEVICES} python -m pytest -m multidevice)")


@pytest.fixture(scope="session")
def quickstart_smoke_run(tmp_path_factory):
    """seed(workdir, parts=None): fill `workdir` with a copy of one finished
    ``configs/quickstart.py:smoke`` run (every artifact, or only the relative `parts`, e.g.
    the teacher), made once per test process. Module fixtures that need that run, or its
    teacher, copy it instead of training the same teacher and student again; the copy is
    bitwise what they would have trained (same program, same device count)."""
    from kdprune_jax import pipeline
    from tests.test_pipeline import load_config

    src = str(tmp_path_factory.mktemp("quickstart_smoke"))
    pipeline.run(load_config("quickstart.py", "smoke"), src)

    def seed(workdir, parts=None):
        os.makedirs(workdir, exist_ok=True)
        for rel in parts or os.listdir(src):
            a, b = os.path.join(src, rel), os.path.join(workdir, rel)
            if os.path.isdir(a):
                shutil.copytree(a, b, dirs_exist_ok=True)
            else:
                shutil.copy2(a, b)
        return workdir

    return seed


@pytest.fixture(autouse=True)
def _multidevice_has_its_devices(request):
    """A multidevice test runs only where the 8 devices exist (checked, not assumed)."""
    if request.node.get_closest_marker("multidevice"):
        import jax

        assert jax.device_count() == MULTI_DEVICES, (
            f"{request.node.nodeid} needs {MULTI_DEVICES} devices, this process has "
            f"{jax.device_count()} (set KDPRUNE_TEST_DEVICES={MULTI_DEVICES})")
    yield


# --- Optional suite profile: KDPRUNE_TEST_PROFILE=path.jsonl records, per test, its wall time
# and the seconds this process spent in XLA backend compilation (subprocesses a test starts are
# not counted: their time shows only in the wall column).
_PROFILE = os.environ.get("KDPRUNE_TEST_PROFILE")
if _PROFILE:
    import json
    import time

    _compile_secs = [0.0, 0]

    def _on_event(event, duration, **kw):
        from jax._src import dispatch

        if event == dispatch.BACKEND_COMPILE_EVENT:
            _compile_secs[0] += duration
            _compile_secs[1] += 1

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        from jax import monitoring

        if not getattr(pytest_runtest_protocol, "_registered", False):
            monitoring.register_event_duration_secs_listener(_on_event)
            pytest_runtest_protocol._registered = True
        c0, n0, t0 = _compile_secs[0], _compile_secs[1], time.perf_counter()
        yield
        with open(_PROFILE, "a") as f:
            f.write(json.dumps(dict(
                test=item.nodeid, wall_s=round(time.perf_counter() - t0, 3),
                compile_s=round(_compile_secs[0] - c0, 3), compiles=_compile_secs[1] - n0,
                worker=os.environ.get("PYTEST_XDIST_WORKER", "main"))) + "\n")
