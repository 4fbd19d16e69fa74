r"""A seconds-long study on the embedded digits (tests/test_study.py): 2 methods x 2 seeds.

    python -m kdprune_jax.study run --config=configs/study/smoke.py --root=/tmp/study_smoke
"""

import ml_collections

from kdprune_jax.config_helpers import parse_config_arg


def get_config(arg: str = ""):
    parse_config_arg(arg)  # takes no arg
    c = ml_collections.ConfigDict()
    c.name = "smoke"
    c.base = "configs/quickstart.py:smoke"
    c.common = (("proxy.num_models", 1), ("proxy.num_epochs", 1))
    c.teachers = ml_collections.ConfigDict()
    c.teachers.tiny = (("teacher.model", "cifar_resnet8"),)
    c.grids = [ml_collections.ConfigDict(dict(
        name="table1", title="smoke",
        axes=(("prune.method", ("random", "el2n")), ("prune.keep_fraction", (0.5,)),
              ("kd.alpha", (0.9,)), ("seed", (0, 1)))))]
    c.throughput = ml_collections.ConfigDict({"kd:cifar_resnet8>cifar_resnet8": 2000.0,
                                              "train:cifar_resnet8": 2500.0})
    c.pool_size = 1368
    c.lock()
    return c
