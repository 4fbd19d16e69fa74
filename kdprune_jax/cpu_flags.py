"""XLA:CPU settings kdprune_jax turns on by default, per compiled program.

The default: YNNPACK fusions for elementwise loops (XLA's
``xla_cpu_experimental_ynn_fusion_type=eltwise``), passed as `jax.jit(...,
compiler_options=compiler_options())` to the programs where it was measured to pay: the
train and eval steps (`train.steps`) and the scoring / feature / teacher-view passes
(`inference.batch_pass`). Measured on the 2-core benchmark machine, KD train step batch
128: see README "Benchmarks" (`python -m benchmarks.xla_flags`; ResNet-56 -> ResNet-20 and
ResNet-20 -> ResNet-20, each setting in a fresh process). GPU and TPU programs get no
option (`compiler_options()` is empty unless the default backend is the CPU).

Why per program and not in $XLA_FLAGS for the whole process: XLA:CPU (jaxlib 0.10.2) cannot
run a YNN elementwise fusion whose output is laid out column-major, which is what a LAPACK
call (eigh, Cholesky, LU) asks of its operand. With the flag set globally every
`jnp.linalg.eigh(a + a.T)`, `cho_factor(h + damping I)` or `jnp.linalg.solve(h + damping I,
b)` on a matrix 64 or more wide stops with "Instruction with unsupported layout in YNN
fusion" (`influence.solver=exact` and the Kronecker CG preconditioner hit it;
`tests/test_models.py::test_ynn_option_is_scoped_to_the_hot_programs`). The dense-algebra
programs (influence solves, the IF-Beta outer step) therefore keep XLA's own kernels; they
are not convolution-bound, so they lose nothing measured.

Not defaults, measured by `benchmarks.xla_flags`:
- ``eltwise,reduce,individual_dot`` is faster still (1.03x / 1.04x over eltwise), but YNNPACK's
  reductions split the work by thread and accumulate in that order: results then depend on
  the process layout (2 processes x 4 devices no longer equal 1 x 8,
  tests/test_multiprocess.py) and float32 CG inverse-HVPs stall at a higher residual;
- ``individual_convolution`` (YNNPACK convolutions) was slower than XLA's own in scratch
  runs (``--only default,ynn_with_convolution`` measures it).
Precision: YNNPACK evaluates a*b + c as two rounded float32 operations, as PyTorch eager
does, where XLA's own loops contract it into one fused multiply-add. Where terms cancel (the
BatchNorm backward) this shows: a ResNet-8 train-step gradient is ~1e-3 (median relative)
from float64 with the fusions and ~1e-6 without
(`tests/test_models.py::test_cpu_default_option_keeps_gradients_within_float32_noise`);
bfloat16 compute is ~1e-2.

``KDPRUNE_CPU_DEFAULTS=0`` restores XLA's own kernels everywhere. The option is experimental
in XLA (an unknown option fails the compile), so it is only passed for the jaxlib versions
it was measured with (`TESTED_JAXLIB`), and never when $XLA_FLAGS already chooses a YNN
fusion type (the user's choice wins).
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# The compiler_options spelling (the enum value's name); on the command line, $XLA_FLAGS,
# the same setting is `YNN_FLAG`.
YNN_ELTWISE = {YNN_OPTION: "LIBRARY_FUSION_TYPE_ELTWISE"}
YNN_FLAG = f"--{YNN_OPTION}=eltwise"
TESTED_JAXLIB = ("0.10.",)  # version prefixes whose XLA knows YNN_OPTION


def _jaxlib_version() -> str:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""


def defaults_enabled(environ=None) -> bool:
    """False when ``KDPRUNE_CPU_DEFAULTS=0``. Raises ValueError (naming the variable and its
    allowed values) for any value but 0, 1 or empty: a typo such as "off" must not silently
    leave the defaults on."""
    environ = os.environ if environ is None else environ
    choice = environ.get("KDPRUNE_CPU_DEFAULTS", "").strip()
    if choice not in ("", "0", "1"):
        raise ValueError(f"KDPRUNE_CPU_DEFAULTS={choice!r} is invalid; allowed: 0 (XLA's own "
                         "CPU kernels), 1 or unset (kdprune_jax's CPU defaults)")
    return choice != "0"


def compiler_options(backend: str | None = None, environ=None,
                     jaxlib_version: str | None = None) -> dict:
    """`compiler_options` for `jax.jit` of a hot (convolution / elementwise-bound) program:
    `YNN_ELTWISE` on a tested jaxlib's CPU backend, else {} (also when
    ``KDPRUNE_CPU_DEFAULTS=0`` or $XLA_FLAGS sets a YNN fusion type itself).
    `backend` defaults to `jax.default_backend()` (so call it after the backends start,
    e.g. when building a step, not at import)."""
    environ = os.environ if environ is None else environ
    if not defaults_enabled(environ) or YNN_OPTION in environ.get("XLA_FLAGS", ""):
        return {}
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if not version.startswith(TESTED_JAXLIB):
        return {}
    if backend is None:
        import jax

        backend = jax.default_backend()
    return dict(YNN_ELTWISE) if backend == "cpu" else {}
