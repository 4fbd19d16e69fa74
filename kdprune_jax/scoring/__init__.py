"""Per-example pruning scores: pure, jitted, usable with any JAX model.

Every function takes ``apply_fn(params, x) -> logits`` or a per-example loss function plus
pytrees and a batch, and returns float32 scores [B]. Which end of each score is KEPT
follows METHOD.md §3 and is recorded in `KEEP`.
"""

from kdprune_jax.scoring.basic import (
    el2n_from_logits,
    el2n_scores,
    entropy_from_logits,
    entropy_scores,
    margin_from_logits,
    margin_scores,
)
from kdprune_jax.scoring.forgetting import (
    ForgettingTracker,
    forgetting_scores,
    init_tracker,
    update_tracker,
)
from kdprune_jax.scoring.grand import grand_last_layer_from_features, grand_scores
from kdprune_jax.scoring.influence import (
    SolverError,
    check_solve,
    influence_from_s_test,
    s_test,
    self_influence,
)
from kdprune_jax.scoring.moderate import moderate_scores

# Which end of each score a method keeps (METHOD.md §3).
KEEP = {
    "random": "-",
    "el2n": "highest",
    "teacher_el2n": "highest",
    "grand": "highest",
    "grand_last_layer": "highest",
    "forgetting": "highest",
    "entropy": "highest",
    "margin": "lowest",
    "moderate": "middle",
    "influence": "highest",
    "self_influence": "highest",
}
METHODS = tuple(KEEP)

__all__ = [
    "KEEP", "METHODS", "ForgettingTracker", "SolverError", "check_solve", "el2n_from_logits",
    "el2n_scores", "entropy_from_logits", "entropy_scores", "forgetting_scores",
    "grand_last_layer_from_features", "grand_scores", "influence_from_s_test", "init_tracker",
    "margin_from_logits", "margin_scores", "moderate_scores", "s_test", "self_influence",
    "update_tracker",
]
