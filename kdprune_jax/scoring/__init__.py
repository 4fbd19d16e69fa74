"""Per-example pruning scores: pure, jitted, usable with any JAX model.

Conventions (the one place they are written down; `kdprune_jax.autodiff` follows them):

Callables — two signatures, checked when traced (a wrong output shape raises
`LossSignatureError` naming the expected signature and the shape that came back):

- ``apply_fn(params, x) -> logits [B, C]`` for the logit scores (el2n, entropy, margin);
- ``loss(params, batch) -> scalar``: an objective over a batch (mean loss plus any
  regularizer); its Hessian is H (``train_loss``) or its gradient is the target
  (``val_loss``);
- ``example_losses(params, batch) -> [B]``: one loss per row of `batch` (leading axis B,
  inference mode, examples uncoupled). Per-example gradients feed each row as a batch of
  one, so the same function serves influence, self-influence, GraNd and the Fisher.

`batch` is any pytree of arrays with a leading axis B; it is a jit argument, so one
compilation serves every batch of that shape. Loss callables are compared by identity,
except ``functools.partial`` (compared by its function and hashable bound values) and
``jax.tree_util.Partial`` (bound arrays are traced: new values do not recompile): define
loss functions once, at module level — a fresh ``lambda`` per call recompiles every time.

Shapes and dtypes: scores are [B] in the dtype of the loss (float32; float64 under
``jax_enable_x64`` with float64 params and data). Sign conventions: influence POSITIVE =
HELPFUL (removing the example would raise the target loss); which end of each score a
method KEEPS follows METHOD.md §3 and is recorded in `KEEP`.

Solvers (`INFLUENCE_SOLVERS`: exact, cg, lissa, diag_fisher) take a required ``damping``
(added to H on top of any L2 term already in the loss), return their info, and when
called eagerly raise `SolverError` on non-convergence (``check=False`` to opt out); inside
your own jit the info is returned for you to check with `check_solve`.

Cost, for P parameters and N training examples: exact O(P^2 N + P^3) memory P^2; cg and
lissa one HVP (~2 forward+backward passes over the training batch) per iteration;
diag_fisher one per-example-gradient pass over the training batch; influence of B examples
given s_test, one JVP (~1 forward pass) per batch.
"""

from kdprune_jax.scoring._fn import LossSignatureError
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
from kdprune_jax.scoring.head import KroneckerPreconditioner
from kdprune_jax.scoring.influence import (
    INFLUENCE_SOLVERS,
    SolverError,
    check_solve,
    diag_fisher,
    influence_from_s_test,
    s_test,
    self_influence,
)
from kdprune_jax.scoring.kfac import (
    Factors,
    FactorsMismatchError,
    estimate_memory,
    find_layers,
    fit_factors,
    kfac_influence,
    kfac_inverse,
    kfac_s_test,
    kfac_self_influence,
    load_factors,
    save_factors,
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
    "INFLUENCE_SOLVERS", "KEEP", "METHODS", "Factors", "FactorsMismatchError",
    "ForgettingTracker", "KroneckerPreconditioner", "LossSignatureError", "SolverError",
    "check_solve", "diag_fisher", "el2n_from_logits", "el2n_scores", "entropy_from_logits",
    "entropy_scores", "estimate_memory", "find_layers", "fit_factors", "forgetting_scores",
    "grand_last_layer_from_features", "grand_scores", "influence_from_s_test", "init_tracker",
    "kfac_influence", "kfac_inverse", "kfac_s_test", "kfac_self_influence", "load_factors",
    "margin_from_logits", "margin_scores", "moderate_scores", "s_test", "save_factors",
    "self_influence", "update_tracker",
]
