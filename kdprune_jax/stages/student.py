"""The `student` stage: the student trained on the kept subset, with the KD term when the
run has a teacher (DIR/student/, resumable mid-epoch).

The KD weight is ``kd.alpha`` in the config (METHOD.md §2: loss = (1 - w) CE + w tau^2 KL;
``ifbeta.kd_weight`` is the same weight inside IF-Beta's proxy objective); in code it is
`kd_weight`. With ``kd.teacher_views`` V > 0 the teacher's logits come from the
teacher-views cache instead of a live teacher.
"""

from __future__ import annotations

from kdprune_jax import data
from kdprune_jax.context import Run
from kdprune_jax.inference import FrozenModel
from kdprune_jax.stages import training
from kdprune_jax.train import TrainResult


def kd_key(config) -> dict:
    """config.kd as the student depends on it; `teacher_views` only when the mode is on,
    so live-teacher runs keep the fingerprints they had before the field existed."""
    kd = config.kd.to_dict()
    if not kd.get("teacher_views") or not kd.get("alpha"):  # off, or no KD term to feed
        kd.pop("teacher_views", None)
    # kd.alpha="auto" is resolved before this (kd_alpha.resolve): the key holds the weight
    # and the rule file's sha256 (only then), never the rule's path.
    kd.pop("alpha_rule", None)
    if not kd.get("alpha_rule_sha256"):
        kd.pop("alpha_rule_sha256", None)
    return kd


def key(run: Run, subset, teacher: FrozenModel | None) -> str:
    """Key of the student: its recipe, the data, the subset, the teacher and KD."""
    return training.role_key(
        run.config, "student", data=run.splits.fingerprint, subset=subset.fingerprint,
        teacher=teacher.fingerprint if teacher is not None else "",
        kd=kd_key(run.config) if teacher is not None else None)


def uses_teacher_views(config, teacher) -> bool:
    """The cached-teacher mode: a teacher, a KD term and kd.teacher_views > 0."""
    return teacher is not None and config.kd.alpha > 0 and config.kd.teacher_views > 0


def compute(run: Run, subset, teacher: FrozenModel | None, teacher_views=None) -> TrainResult:
    """Train (or resume) the student on ``subset.indices``.

    num steps: the subset's epochs, or with student.equal_steps the full pool's (the same
    compute whatever the kept fraction)."""
    c = run.config
    o = c.student.optim
    num_steps = None
    if c.student.equal_steps:
        num_steps = data.num_train_steps(len(run.splits.pool), o.batch_size, o.num_epochs)
    kd = teacher is not None or teacher_views is not None
    return training.train(
        run, "student",
        lambda: training.create_model(c.student, run.splits.num_classes, c.seed),
        subset.indices, key(run, subset, teacher), optim=o, seed=c.seed, num_steps=num_steps,
        teacher=teacher, kd_weight=c.kd.alpha if kd else 0.0, teacher_views=teacher_views)
