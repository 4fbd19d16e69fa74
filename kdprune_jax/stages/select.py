"""The `select` stage: the kept subset of the pool, DIR/subset.json.

Every method but random and IF-Beta keeps by its scores (the method table's kept end,
METHOD.md §3, unless prune.direction says otherwise), class-balanced by default; random
keeps a seeded class-balanced draw. IF-Beta's subset comes from its own stage and is
written here (`write`).
"""

from __future__ import annotations

import numpy as np

from kdprune_jax import artifacts, faults, methods, selection
from kdprune_jax.context import Run
from kdprune_jax.stages import cache


def direction(config) -> str:
    """The kept end: the method table's, unless prune.direction overrides it."""
    p = config.prune
    return methods.get(p.method).keep if p.direction == "auto" else p.direction


def key(run: Run, scores_meta: dict | None) -> str:
    """Key of the subset: data, method, keep_fraction, seed, the selection rule and the
    scores' fingerprint."""
    p = run.config.prune
    return artifacts.fingerprint({
        "data": run.splits.fingerprint, "method": p.method, "keep_fraction": p.keep_fraction,
        "seed": p.seed, "balanced": p.balanced, "direction": direction(run.config),
        "rule": p.rule, "ccs": [p.ccs_hard_cutoff, p.ccs_strata] if p.rule == "ccs" else None,
        "scores": (scores_meta or {}).get("fingerprint"),
    })


def compute(run: Run, scores=None, scores_meta=None) -> selection.Subset:
    """The subset, reusing DIR/subset.json when its key matches.

    scores: float [N_train] from the scores stage, required for every method but random."""
    p, sp = run.config.prune, run.splits
    fp = key(run, scores_meta)

    def choose():
        if p.method == "random":
            subset = selection.random_balanced(sp.train_labels, sp.pool, p.keep_fraction,
                                               sp.num_classes, p.seed, balanced=p.balanced)
        else:
            subset = selection.select_by_score(
                scores, sp.train_labels, sp.pool, p.keep_fraction, sp.num_classes,
                method=p.method, direction=direction(run.config), rule=p.rule,
                balanced=p.balanced, seed=p.seed, ccs_hard_cutoff=p.ccs_hard_cutoff,
                ccs_strata=p.ccs_strata)
        subset.fingerprint = fp
        write(run, subset)
        run.log(f"[select] kept {len(subset.indices)}/{len(sp.pool)} examples "
                f"(keep_fraction {p.keep_fraction}, {p.method}, {direction(run.config)}) -> "
                f"{run.path('subset.json')}")
        return subset

    return cache.reuse_or_compute(
        cache.Artifact("select", run.path("subset.json"), redo="rebuilding",
                       stale="different data, scores or prune config"), fp,
        read=selection.read_subset, key_of=lambda s: s.fingerprint,
        check=lambda s: _subset_problem(s, run), compute=choose, log=run.log,
        describe=lambda s: f" ({len(s.indices)} examples)")


def _subset_problem(subset, run: Run) -> str | None:
    """What makes a saved subset unusable for this data (None if nothing)."""
    sp = run.splits
    if subset.pool_size != len(sp.pool) or not np.all(np.isin(subset.indices, sp.pool)):
        return "indices outside this run's training pool"
    counts = np.bincount(sp.train_labels[subset.indices], minlength=sp.num_classes)
    if len(subset.class_counts) != len(counts) or np.any(counts != subset.class_counts):
        return "class_counts do not match the labels of the kept indices"
    return None


def write(run: Run, subset: selection.Subset) -> None:
    """Write DIR/subset.json (process 0 only), between the select stage's kill points."""
    faults.maybe_kill("select:write")  # kill point: subset chosen, subset.json not written
    if run.is_writer:
        selection.save_subset(run.path("subset.json"), subset)
    faults.maybe_kill("select:written")  # kill point: subset.json written, no student yet
