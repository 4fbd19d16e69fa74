"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The XLA:CPU defaults `python -m kdprune_jax.main` runs with: tests check what users run.
from kdprune_jax import cpu_flags  # noqa: E402

cpu_flags.apply_cpu_defaults()

# grain's worker processes read absl flags; under pytest nothing parses them.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
