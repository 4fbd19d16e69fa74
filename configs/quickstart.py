r"""Quickstart: the whole pipeline on scikit-learn's embedded 8x8 digits, no download.

    python -m kdprune_jax.main --config=configs/quickstart.py --workdir=/tmp/kdprune_quickstart

Teacher cifar_resnet20 (width 0.5) on all 1,366 training images -> random class-balanced 50%
subset -> student cifar_resnet8 (width 0.5) distilled on it (alpha 0.9, tau 4).
Measured with the command above on a 2-core CPU (JAX 0.10.2, 1 CPU device, seed 0): 20 s
wall; teacher test accuracy 0.9805, student 0.9916 (359 test images); a second run in the
same workdir reuses every artifact and takes 7.5 s.
`tests/test_pipeline.py::test_full_quickstart_command` re-checks the accuracies and the reuse.
`:smoke` shrinks everything to a few steps for tests.
"""

from kdprune_jax.config_helpers import load_config_module, parse_config_arg


def get_config(arg: str = ""):
    a = parse_config_arg(arg, flags=("smoke",))
    base = load_config_module("base.py")
    c = base.get_config()
    c.data.source = "digits"
    c.data.augment = "none"
    c.data.mean, c.data.std = (64.0,), (96.0,)
    c.teacher.model, c.teacher.width = "cifar_resnet20", 0.5
    c.teacher.optim = base.optim(num_epochs=15, batch_size=64, learning_rate=0.05)
    c.student.model, c.student.width = "cifar_resnet8", 0.5
    c.student.optim = base.optim(num_epochs=30, batch_size=64, learning_rate=0.05)
    c.prune.keep_fraction = 0.5
    c.eval.batch_size = 128
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    if a.smoke:
        c.teacher.optim.num_epochs = 1
        c.student.optim.num_epochs = 2
        c.teacher.width = c.student.width = 0.25
        c.teacher.model = "cifar_resnet8"
        c.log_every_steps = 5
        c.checkpoint_every_steps = 10
    c.lock()
    return c
