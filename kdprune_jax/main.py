r"""Command line: ``python -m kdprune_jax.main --config=configs/<x>.py[:arg] --workdir=DIR``.

Flags only; everything else lives in `kdprune_jax.pipeline`. Config fields can be
overridden, e.g. ``--config.kd.alpha=0.5 --config.prune.keep_fraction=0.3``.
A user mistake (bad config value, missing/corrupt data, unusable artifact) prints one line
naming the field and the allowed values and exits with status 2, before expensive work.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for artifacts, checkpoints, logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # orbax/grain log every save at INFO; a user sees the progress bar and our lines.
        logging.set_verbosity(logging.WARNING)
    import jax

    from kdprune_jax import pipeline
    from kdprune_jax.errors import UserError

    # Persistent compilation cache: a rerun (or a resume after preemption) skips recompiling.
    jax.config.update("jax_compilation_cache_dir",
                      jax.config.jax_compilation_cache_dir or "/tmp/kdprune_jax_xla_cache")
    try:
        pipeline.run(_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
