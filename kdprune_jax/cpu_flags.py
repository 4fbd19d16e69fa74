"""XLA:CPU settings kdprune_jax turns on by default, applied to $XLA_FLAGS before JAX starts.

XLA reads $XLA_FLAGS once, when its first backend is created, so `apply_cpu_defaults()` must
run before any JAX computation (`kdprune_jax.main`, `benchmarks.run` and the tests call it
first). It only touches XLA:CPU compilation: GPU and TPU programs are unaffected.

The default: YNNPACK fusions for elementwise loops
(``--xla_cpu_experimental_ynn_fusion_type=eltwise``). Measured on the 2-core benchmark
machine, KD train step batch 128: see README "Benchmarks" (`python -m benchmarks.xla_flags`;
ResNet-56 -> ResNet-20 and ResNet-20 -> ResNet-20, each setting in a fresh process).
Not defaults, measured by the same command:
- ``eltwise,reduce,individual_dot`` is faster still (1.03x / 1.04x over eltwise), but YNNPACK's
  reductions split the work by thread and accumulate in that order: results then depend on
  the process layout (2 processes x 4 devices no longer equal 1 x 8,
  tests/test_multiprocess.py) and float32 CG inverse-HVPs stall at a higher residual (the
  ImageNet-mock IF-Beta smoke test's influence CG stopped at 9e-3 instead of 1e-5);
- ``individual_convolution`` (YNNPACK convolutions) was slower than XLA's own in scratch
  runs (``--only default,ynn_with_convolution`` measures it).
Precision: YNNPACK evaluates a*b + c as two rounded float32 operations, as PyTorch eager
does, where XLA's own loops contract it into one fused multiply-add. Where terms cancel (the
BatchNorm backward) this shows: a ResNet-8 train-step gradient is ~1e-3 (median relative)
from float64 with the fusions and ~1e-6 without
(`tests/test_models.py::test_cpu_default_flags_keep_gradients_within_float32_noise`);
bfloat16 compute is ~1e-2. Every numeric test of the suite passes with it (influence
against leave-one-out, HVPs against jax.hessian, sharded against single-device).
``KDPRUNE_CPU_DEFAULTS=0`` restores XLA's own kernels.

The flag is experimental in XLA and an unknown flag aborts XLA at startup, so it is only added
for the jaxlib versions it was measured with (`TESTED_JAXLIB`), never when the user already
set it, and never when ``KDPRUNE_CPU_DEFAULTS=0``.
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=eltwise"
TESTED_JAXLIB = ("0.10.",)  # version prefixes whose XLA knows YNN_FLAG


def _jaxlib_version() -> str:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""


def with_cpu_defaults(xla_flags: str, jaxlib_version: str | None = None) -> str:
    """`xla_flags` plus our XLA:CPU defaults: unchanged if it already sets a YNN fusion
    type (the user's choice wins) or jaxlib is not a tested version."""
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if "xla_cpu_experimental_ynn_fusion_type" in xla_flags or not version.startswith(
            TESTED_JAXLIB):
        return xla_flags
    return f"{xla_flags} {YNN_FLAG}".strip()


def apply_cpu_defaults(environ=None) -> str:
    """Set $XLA_FLAGS to `with_cpu_defaults($XLA_FLAGS)` unless ``KDPRUNE_CPU_DEFAULTS=0``.
    Returns the resulting flags. Call before the first JAX computation."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if environ.get("KDPRUNE_CPU_DEFAULTS", "1") != "0":
        flags = with_cpu_defaults(flags)
        environ["XLA_FLAGS"] = flags
    return flags
