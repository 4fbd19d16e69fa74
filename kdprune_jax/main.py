r"""Command line: ``python -m kdprune_jax.main --config=configs/<x>.py[:arg] --workdir=DIR``.

Flags only, then (for a multi-process run) joining JAX's distributed runtime; everything else
lives in `kdprune_jax.pipeline`. Config fields can be overridden, e.g.
``--config.kd.alpha=0.5 --config.prune.keep_fraction=0.3``.
A user mistake (bad config value, missing/corrupt data, unusable artifact) prints one line
naming the field and the allowed values and exits with status 2, before expensive work. In
a multi-process run every process checks the same things and prints the same line.

Multi-process: start the same command on every host. On a Cloud TPU VM pod slice JAX finds
the other workers itself (``--distributed=auto`` sees $TPU_WORKER_HOSTNAMES; ``on`` forces
it); elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``
(or $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID).
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for artifacts, checkpoints, logs.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Join JAX's multi-process runtime: auto = when a coordinator address or process count is "
    "given or a multi-host TPU VM is detected; on = always (JAX detects the cluster); off.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordination service "
    "(default $JAX_COORDINATOR_ADDRESS, or detected on TPU VMs / SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, N).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 60,
    "A process silent this long is declared dead and the others stop with an error.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Persistent XLA compilation cache (default $JAX_COMPILATION_CACHE_DIR or "
    "/tmp/kdprune_jax_xla_cache; 'none' disables it). A rerun or a resume after preemption "
    "then skips recompiling.")
flags.mark_flags_as_required(["config", "workdir"])


def _innermost(e: BaseException) -> BaseException:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def flag_error_line(e: BaseException, argv: list[str]) -> str:
    """One line for a command-line mistake found while parsing flags: a misspelt or unknown
    --config.* field (with ml_collections' suggestion), a config file that is missing or
    fails to import (the file and its first error), a value of the wrong type."""
    if isinstance(e, (AttributeError, KeyError)):
        text = str(e)
        name = (re.search(r"[A-Za-z_]\w*", text) or re.search(r".+", text or "?")).group(0)
        hint = re.search(r'Did you mean "(\w+)"', text)
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                     and a.split("=")[0].split(".")[-1] == name), f"--config.*.{name}")
        return (f"{flag}: the config has no field {name!r}; " + (
            f'did you mean "{hint.group(1)}" instead of "{name}"?' if hint
            else "configs/base.py lists every field"))
    inner = _innermost(e)
    if isinstance(e, OSError) or "Error whilst parsing config file" in str(e) or \
            "earlier failure to load" in str(e):
        cfg = next((a for a in argv if a.startswith("--config=")), "--config")
        lines = [x.strip() for x in str(inner).splitlines() if x.strip()]
        why = lines[-1] if lines else type(inner).__name__
        return f"{cfg}: cannot load the config file: {why}"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "Traceback" in str(e):
        first = f"{first.split(':')[0]}: {inner}"
    return first.removeprefix("flag ")


def _parse_flags(argv):
    """absl's flag parsing, with every mistake as one line and exit status 2."""
    try:
        rest = flags.FLAGS(argv)
        # A config file that failed to load is reported lazily by ml_collections, at the
        # first field access: touch it here so the mistake is caught with the others.
        _CONFIG.value.keys()
        return rest
    except (flags.Error, AttributeError, KeyError, OSError, ValueError) as e:
        print(f"error: {flag_error_line(e, argv)}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # orbax/grain log every save at INFO; a user sees the progress bar and our lines.
        logging.set_verbosity(logging.WARNING)
    # $KDPRUNE_CPU_DEFAULTS (the per-program XLA:CPU options, cpu_flags) is checked before
    # any work, so a typo is one line and not a traceback mid-run.
    from kdprune_jax import cpu_flags

    try:
        cpu_flags.defaults_enabled()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    import jax

    from kdprune_jax import distributed, pipeline
    from kdprune_jax.errors import UserError

    # Before any other JAX call: the distributed runtime must exist before the backends are
    # created, or jax.devices() would list this process's devices only.
    if distributed.wants_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                     _NUM_PROCESSES.value):
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               heartbeat_timeout_seconds=_HEARTBEAT.value)
    cache = _CACHE_DIR.value or os.environ.get("JAX_COMPILATION_CACHE_DIR") or \
        "/tmp/kdprune_jax_xla_cache"
    if cache != "none":
        jax.config.update("jax_compilation_cache_dir", cache)
    from kdprune_jax import io_errors, preemption

    preemption.install()
    # A failed checkpoint write is reported as one line by the save boundary; orbax's own
    # ERROR logs of it (a traceback per background thread) would bury that line.
    io_errors.quiet_orbax_storage_errors()
    try:
        pipeline.run(_CONFIG.value, _WORKDIR.value)
    except preemption.Preempted as e:
        prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
        print(f"{prefix}{e}: python -m kdprune_jax.main {' '.join(sys.argv[1:])}",
              file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_STATUS)
    except (UserError, OSError) as e:
        # A full or failing disk hit by a write outside the artifact/checkpoint boundaries
        # (io_errors) is still the user's to fix: one line too. Other OS errors are bugs.
        err = io_errors.storage_error(e) if isinstance(e, OSError) else e
        if err is None:
            raise
        prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
