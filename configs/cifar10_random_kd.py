r"""CIFAR-10: ResNet-56 teacher -> random class-balanced subset -> ResNet-20 student with KD.

(`configs/cifar10_kd.py` with the method fixed to `random`.)

    python -m kdprune_jax.main --config=configs/cifar10_random_kd.py --workdir=/tmp/c10_random

Data: the offline JPEG archive (../shared/data/cifar10/cifar10-jpeg.tar.gz, or the path in
$KDPRUNE_CIFAR10_ARCHIVE); with the arg `tfds` it reads a prepared tfds `cifar10` instead.
Args (comma-separated): `smoke` (tiny models, 20 images per class, a few steps: seconds),
`tfds`. Example: ``--config=configs/cifar10_random_kd.py:smoke,tfds``.

Recipe: 200 epochs each, SGD momentum 0.9 Nesterov, lr 0.1 cosine, wd 5e-4, batch 128,
pad-4 crop + flip; KD tau 4, alpha 0.9 (METHOD §2); keep_fraction 0.5.
Measured on the 2-core CPU this project is built on (JAX 0.10.2, 1 CPU device): the full
recipe is GPU/TPU-scale and has NOT been run here. A reduced run on the real 50,000-image
archive,

    python -m kdprune_jax.main --config=configs/cifar10_random_kd.py --workdir=/tmp/c10_r8 \
      --config.teacher.model=cifar_resnet8 --config.teacher.optim.num_epochs=3 \
      --config.student.model=cifar_resnet8 --config.student.optim.num_epochs=3

took 7.3 min (teacher 281 s at ~590 img/s, student 136 s): teacher test accuracy 0.6686,
student (23,750 of 47,500 images, KD) 0.6201, on the 10,000 test images; seed 0, one run.
`:smoke` runs end to end in ~10 s (tests/test_pipeline.py).
"""

from kdprune_jax.config_helpers import load_config_module, parse_config_arg


def get_config(arg: str = ""):
    """Same as ``configs/cifar10_kd.py:random[,arg]``."""
    a = parse_config_arg(arg, flags=("smoke", "tfds"))
    return load_config_module("cifar10_kd.py").get_config(",".join(["random", *a.flags]))
