r"""ImageNet: ResNet-50 teacher -> random class-balanced 50% -> ResNet-18 student with KD.

    python -m kdprune_jax.main --config=configs/imagenet_random_kd.py \
      --workdir=/gcs/BUCKET/runs/NAME

(on a Cloud TPU VM: `launch/tpu_vm.sh run ... --workdir=/gcs/BUCKET/...`, README).

Reads a prepared tfds `imagenet2012` (set $TFDS_DATA_DIR or config.data.data_dir); nothing
is downloaded. Recipe (Goyal et al. 2017): global batch 1024, SGD Nesterov momentum 0.9,
lr 0.4 (0.1 x 1024/256) with 5 warmup epochs and x0.1 steps at epochs 30/60/80, wd 1e-4,
90 epochs, inception crop + flip at 224 px; KD tau 1, alpha 0.5 (METHOD §2).
To import an already trained teacher, set ``--config.teacher.init=DIR/teacher``.
Measured: not run at full scale on the project's 2-core CPU. `:smoke` (tiny widths, 32 px,
global random selection since mock data has ~1 example per class) runs end to end on
`tfds.testing.mock_data` in tests/test_pipeline.py.
"""

from kdprune_jax.config_helpers import load_config_module, parse_config_arg


def get_config(arg: str = ""):
    a = parse_config_arg(arg, flags=("smoke",))
    base = load_config_module("base.py")
    c = base.get_config()
    c.data.source, c.data.name = "tfds", "imagenet2012"
    c.data.eval_split = "validation"
    c.data.augment, c.data.image_size = "imagenet", 224
    c.data.mean, c.data.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    c.data.val_fraction = 0.01  # 12.8k images: plenty for influence targets / tuning
    c.data.num_workers = 16
    for role, model in (("teacher", "resnet50"), ("student", "resnet18")):
        c[role].model = model
        c[role].optim = base.optim(num_epochs=90, batch_size=1024, learning_rate=0.4,
                                   weight_decay=1e-4, schedule="step")
        c[role].optim.warmup_epochs = 5.0
        c[role].optim.step_boundaries_epochs = (30, 60, 80)
    c.kd.alpha, c.kd.temperature = 0.5, 1.0
    c.prune.keep_fraction = 0.5
    c.eval.batch_size = 1024
    c.log_every_steps, c.checkpoint_every_steps = 100, 2000
    if a.smoke:
        c.data.image_size = 32
        c.data.val_fraction = 0.1
        c.data.num_workers = 0
        c.prune.balanced = False
        for role in ("teacher", "student"):
            c[role].width = 0.125
            c[role].optim.num_epochs = 1
            c[role].optim.batch_size = 16
            # Linear scaling rule (Goyal et al.): 0.4 at batch 1024 is 0.00625 at 16; the
            # full rate on a 16-image batch of random mock images diverges.
            c[role].optim.learning_rate = 0.4 * 16 / 1024
            c[role].optim.warmup_epochs = 0.2
            c[role].optim.step_boundaries_epochs = (0.5,)
        c.eval.batch_size = 16
        c.log_every_steps, c.checkpoint_every_steps = 2, 4
    c.lock()
    return c
