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

import importlib.util
import os


def get_config(arg: str = ""):
    """``configs/cifar10_kd.py:ifbeta[,arg]``."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_kd.py")
    spec = importlib.util.spec_from_file_location("kdprune_configs_cifar10_kd", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = [a for a in arg.split(",") if a]
    unknown = set(args) - {"smoke", "tfds"}
    if unknown:
        raise ValueError(f"unknown config args {sorted(unknown)}; allowed: smoke, tfds")
    c = mod.get_config(",".join(["ifbeta", *args]))
    if "smoke" in args:
        with c.unlocked():
            c.policy.max_steps = 5
    return c
