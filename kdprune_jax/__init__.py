"""kdprune_jax: data pruning with knowledge distillation in JAX/Flax.

Stages (see README): teacher -> select -> student -> eval, each writing an artifact to the
workdir and skipped when that artifact already exists and matches the config.
"""

__version__ = "0.1.0"
