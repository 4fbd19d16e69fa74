r"""CIFAR-10: ResNet-56 teacher -> a pruning method keeps a subset -> ResNet-20 student with KD.

    python -m kdprune_jax.main --config=configs/cifar10_kd.py:el2n --workdir=/tmp/c10_el2n

The arg is comma-separated: at most one pruning method (random, el2n, teacher_el2n, grand,
grand_last_layer, forgetting, entropy, margin, moderate, influence, self_influence, ifbeta;
default random), plus `smoke` (tiny models, 20 images per class, a few steps: seconds) and/or
`tfds` (read a prepared tfds `cifar10` instead of the offline archive). The method can also be
set with ``--config.prune.method=`` (which also takes methods registered with
`kdprune_jax.methods.register`).

Data: the offline JPEG archive (../shared/data/cifar10/cifar10-jpeg.tar.gz, or the path in
$KDPRUNE_CIFAR10_ARCHIVE). Recipe: 200 epochs each, SGD momentum 0.9 Nesterov, lr 0.1 cosine,
wd 5e-4, batch 128, pad-4 crop + flip; KD tau 4, alpha 0.9 (METHOD §2); keep_fraction 0.5.
Proxies for el2n/grand/forgetting: 4 ResNet-20s x 10 epochs (cost reported in results.json).
Measured: see configs/cifar10_random_kd.py for the reduced random run on this 2-core CPU;
score-based methods have been run here only at `:smoke` scale (tests/test_pipeline.py).
"""

import os

from kdprune_jax.config_helpers import base_config, parse_config_arg

# The built-in methods of kdprune_jax/methods.py (tests/test_configs.py checks they agree).
METHODS = ("random", "el2n", "teacher_el2n", "grand", "grand_last_layer", "forgetting",
           "entropy", "margin", "moderate", "influence", "self_influence", "ifbeta")
FLAGS = ("smoke", "tfds")

_ARCHIVE = os.environ.get(
    "KDPRUNE_CIFAR10_ARCHIVE",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                 "cifar10", "cifar10-jpeg.tar.gz"),
)


def get_config(arg: str = ""):
    a = parse_config_arg(arg, flags=FLAGS, choices={"method": METHODS})
    c = base_config()
    c.prune.method = a.method or "random"
    if a.tfds:
        c.data.source, c.data.name = "tfds", "cifar10"
    else:
        c.data.source, c.data.path = "image_folder", os.path.normpath(_ARCHIVE)
    c.data.augment = "cifar"
    c.teacher.model, c.student.model = "cifar_resnet56", "cifar_resnet20"
    if a.smoke:
        c.data.max_per_class = 20
        c.teacher.model, c.student.model = "cifar_resnet8", "cifar_resnet8"
        c.teacher.width = c.student.width = 0.25
        c.teacher.optim.num_epochs, c.student.optim.num_epochs = 1, 2
        c.teacher.optim.batch_size = c.student.optim.batch_size = 32
        c.proxy.num_models, c.proxy.num_epochs = 2, 1
        c.eval.batch_size = c.score.batch_size = 64
        c.log_every_steps, c.checkpoint_every_steps = 2, 4
    c.lock()
    return c
