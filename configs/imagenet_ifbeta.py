r"""ImageNet with IF-Beta selection: ResNet-50 teacher -> teacher features -> learned Beta
policy over influence ranks -> 50% subset -> ResNet-18 student with KD, global batch 1024.

    python -m kdprune_jax.main --config=configs/imagenet_ifbeta.py \
      --workdir=/gcs/BUCKET/runs/NAME

(on a Cloud TPU VM: `launch/tpu_vm.sh run ... --workdir=/gcs/BUCKET/...`, README).

Everything of configs/imagenet_random_kd.py (tfds `imagenet2012` via $TFDS_DATA_DIR, the
90-epoch step recipe, KD tau 1 / alpha 0.5), with prune.method=ifbeta. The 1.28M x 2048
teacher features are streamed to disk in bfloat16 (2.6 GB); IF-Beta is our reconstruction of
paper B (METHOD.md §5). `:smoke` runs end to end on tfds mock data in tests/test_ifbeta.py.
Measured: not run at full scale on the project's 2-core CPU.
"""

from kdprune_jax.config_helpers import load_config_module, parse_config_arg


def get_config(arg: str = ""):
    """``configs/imagenet_random_kd.py[:smoke]`` with prune.method=ifbeta."""
    a = parse_config_arg(arg, flags=("smoke",))
    c = load_config_module("imagenet_random_kd.py").get_config(",".join(a.flags))
    with c.unlocked():
        c.prune.method = "ifbeta"
        c.prune.balanced = True  # the policy keeps exact per-class counts
        c.ifbeta.feature_dtype = "bfloat16"
        c.ifbeta.kd_weight, c.ifbeta.temperature = 0.5, 1.0  # match the ImageNet KD recipe
        if a.smoke:
            c.policy.max_steps = 3
            c.score.batch_size = 16
            # The smoke head is (256 features + bias) x 1000 classes, 4 of them present, on
            # 88 random mock pool images: nearly singular at mu = 1e-4 (CG ran out of its
            # 300 iterations at residual 0.27); damping 1e-2 (influence and policy CG)
            # bounds its condition number so the smoke run converges.
            c.ifbeta.damping = c.policy.damping = 1e-2
            # Every L-BFGS iteration there costs the Kronecker whitening's [257, 1000] x
            # [1000, 1000] rotations (more than the objective), on each of the 8 simulated
            # test devices, and the inner fits ran into the 200-iteration cap at every outer
            # step anyway (policy.json history), so the smoke run caps them low (proxy fit:
            # 5x this): it checks the wiring, not convergence.
            c.policy.inner_max_iters = 40
    c.lock()
    return c
