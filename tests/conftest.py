"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The XLA:CPU defaults (kdprune_jax.cpu_flags) are per-program compiler options inside the
# library, so the tests run what users run without touching $XLA_FLAGS here.

# grain's worker processes read absl flags; under pytest nothing parses them.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
