r"""CIFAR-10 with IF-Beta selection (METHOD.md §5, our reconstruction of paper B):
ResNet-56 teacher -> teacher features -> influence ranks on a KD-aligned linear head ->
learned Beta(a, b) policy -> Gumbel-top-k subset -> ResNet-20 student with KD.

    python -m kdprune_jax.main --config=configs/cifar10_ifbeta.py --workdir=/tmp/c10_ifbeta

Args (comma-separated): `smoke` (tiny models, 20 images per class: seconds), `tfds`.
Same data and recipe as configs/cifar10_kd.py; policy defaults in configs/base.py
(Adam lr 0.05 on (a~, b~) from Beta(1, 1), up to 200 outer steps, early stop on V2).
Measured: the policy-learning stage on the real quickstart teacher's features is exercised by
tests/test_ifbeta.py; the full CIFAR-10 recipe has not been run on this 2-core CPU. The cost of
the selection (features + influence ranks + policy) on all 47,500 pool images is 0.62 of one
full-data KD epoch (`python -m benchmarks.run --only ifbeta_cost --ifbeta_max_per_class 0
--ifbeta_teacher_init DIR/teacher`; README "Benchmarks").
"""

from kdprune_jax.config_helpers import load_config_module, parse_config_arg


def get_config(arg: str = ""):
    """``configs/cifar10_kd.py:ifbeta[,arg]``, and 5 policy steps with `smoke`."""
    a = parse_config_arg(arg, flags=("smoke", "tfds"))
    c = load_config_module("cifar10_kd.py").get_config(",".join(["ifbeta", *a.flags]))
    if a.smoke:
        with c.unlocked():
            c.policy.max_steps = 5
    return c
