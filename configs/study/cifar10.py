r"""The CIFAR-10 study (issue: evidence): Tables 1-3 of METHOD.md's claims on the offline archive.

    python -m kdprune_jax.study run    --config=configs/study/cifar10.py --root=/work/study/cifar10
    python -m kdprune_jax.study status --config=configs/study/cifar10.py --root=/work/study/cifar10
    python -m kdprune_jax.study report --config=configs/study/cifar10.py --root=/work/study/cifar10

Protocol, sized to the 2-core CPU (README "Results"): the archive's 50,000 training images
minus the stratified 5% validation split (the 47,500-image pool), the 10,000 test images for
reporting only. One ResNet-20 teacher trained once on the pool; one ResNet-8 student recipe
for every cell, a fixed number of epochs over the subset (compute grows with the kept
fraction), the same for every method.

- table1 (A1, A2, B2): methods x kept fraction {0.1, 0.3, 0.5} x KD weight {0, 0.9}, 2 seeds
  (3 for random and ifbeta); full-data rows (keep 1.0) without and with KD.
- table2 (A4): random, KD weight {0, 0.25, 0.5, 0.75, 0.9, 1.0} x keep {0.1, 0.3, 0.5, 1.0},
  seed 0.
- table3 (B3, cost): compute-matched full-data KD, as many steps as each kept fraction gets
  (student.optim.num_epochs = keep x the cells' epochs over the full pool).

Takes no arg (configs/study/smoke.py is the seconds-long grid on the embedded digits, for tests).
"""

import ml_collections

from kdprune_jax.config_helpers import parse_config_arg

STUDENT_EPOCHS = 10
SEEDS = (0, 1)
SEEDS3 = (0, 1, 2)
KEEPS = (0.1, 0.3, 0.5)


def get_config(arg: str = ""):
    parse_config_arg(arg)  # takes no arg
    c = ml_collections.ConfigDict()
    c.name = "cifar10"
    c.base = "configs/cifar10_kd.py"
    # Applied to every cell (dotted field, value).
    c.common = (
        ("student.model", "cifar_resnet8"),
        ("student.optim.num_epochs", STUDENT_EPOCHS),
        ("student.optim.batch_size", 128),
        ("proxy.num_models", 2),
        ("proxy.num_epochs", 2),
        ("eval.batch_size", 500),
        ("score.batch_size", 500),
        ("checkpoint_every_steps", 400),
        ("log_every_steps", 200),
    )
    c.teachers = ml_collections.ConfigDict()
    c.teachers.resnet20 = (
        ("teacher.model", "cifar_resnet20"),
        ("teacher.optim.num_epochs", 40),
        ("teacher.optim.batch_size", 128),
    )
    t1 = []
    for methods, seeds in ((("random", "ifbeta"), SEEDS3),
                           (("el2n", "forgetting", "moderate", "influence"), SEEDS)):
        t1.append(ml_collections.ConfigDict(dict(
            name="table1", title="student test accuracy by method, kept fraction and KD",
            axes=(("prune.method", methods), ("prune.keep_fraction", KEEPS),
                  ("kd.alpha", (0.0, 0.9)), ("seed", seeds))))
        )
    full = ml_collections.ConfigDict(dict(
        name="table1", title="full data",
        axes=(("prune.method", ("random",)), ("prune.keep_fraction", (1.0,)),
              ("kd.alpha", (0.0, 0.9)), ("seed", SEEDS3))))
    t2 = ml_collections.ConfigDict(dict(
        name="table2", title="KD weight x kept fraction (random)",
        axes=(("prune.method", ("random",)), ("prune.keep_fraction", (*KEEPS, 1.0)),
              ("kd.alpha", (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)), ("seed", (0,)))))
    t3 = ml_collections.ConfigDict(dict(
        name="table3", title="compute-matched full-data KD",
        axes=(("prune.method", ("random",)), ("prune.keep_fraction", (1.0,)),
              ("kd.alpha", (0.9,)),
              ("student.optim.num_epochs", tuple(round(k * STUDENT_EPOCHS) for k in KEEPS)),
              ("seed", SEEDS))))
    c.grids = [*t1, full, t2, t3]
    # `report` fits kd.alpha="auto" on table2's validation accuracies (kd_alpha_rule.json).
    c.alpha_rule_grid = "table2"
    # Training throughput on the 2-core CPU, batch 128, 1 device (images/s), for --dry_run:
    # measured with benchmarks/kd_step.py (README "Benchmarks").
    c.throughput = ml_collections.ConfigDict({
        "kd:cifar_resnet20>cifar_resnet8": 506.0, "train:cifar_resnet8": 590.0,
        "train:cifar_resnet20": 330.0})
    c.pool_size = 47500
    c.lock()
    return c
