"""Validate a config before any expensive work: one `ConfigError` naming the field and the
allowed values. Only checks that need no data; data-dependent checks (a class left empty,
a subset smaller than a batch) run right after the (cheap) label loading."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp

from kdprune_jax import kd_alpha, methods, models, sharding
from kdprune_jax.data import AUGMENTATIONS, SOURCE_KINDS
from kdprune_jax.errors import ConfigError
from kdprune_jax.scoring.kfac import DAMPING_MODES, FISHERS
from kdprune_jax.selection import DIRECTIONS, RULES
from kdprune_jax.train.state import SCHEDULES

COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(config):
    """config.compute_dtype as the dtype the train steps compute in (None = float32)."""
    name = config.get("compute_dtype", "float32")
    return None if name == "float32" else jnp.dtype(name)


def compute_dtype_fingerprint(config) -> dict:
    """{"compute_dtype": name} for fingerprints of trained models, {} for float32: float32
    runs keep the fingerprints (and so the artifacts) they had before the field existed."""
    name = config.get("compute_dtype", "float32")
    return {} if name == "float32" else {"compute_dtype": name}


def _positive(field, v, integer=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
    if integer:
        ok = ok and float(v).is_integer()
    if not ok:
        raise ConfigError(field, v, "a positive integer" if integer else "a positive number")


def _check_optim(prefix, o, n_dev):
    _positive(f"{prefix}.num_epochs", o.num_epochs)
    _positive(f"{prefix}.learning_rate", o.learning_rate)
    _positive(f"{prefix}.batch_size", o.batch_size, integer=True)
    if o.batch_size % n_dev:
        raise ConfigError(f"{prefix}.batch_size", o.batch_size,
                          sharding.batch_multiple_phrase())
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"{prefix}.momentum", o.momentum, "a number in [0, 1)")
    if o.weight_decay < 0:
        raise ConfigError(f"{prefix}.weight_decay", o.weight_decay, "a number >= 0")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"{prefix}.schedule", o.schedule, ", ".join(SCHEDULES))
    if o.warmup_epochs < 0:
        raise ConfigError(f"{prefix}.warmup_epochs", o.warmup_epochs, "a number >= 0")


def teacher_stage_runs(config) -> bool:
    """The teacher stage runs only when something consumes the teacher: KD (alpha > 0) or
    a method that reads it (`methods.needs_teacher`)."""
    return config.kd.alpha > 0 or methods.needs_teacher(config)


def _check_scoring(config, n_dev) -> None:
    pr = config.proxy
    _positive("proxy.num_models", pr.num_models, integer=True)
    _positive("proxy.num_epochs", pr.num_epochs)
    if pr.model and pr.model not in models.MODEL_NAMES:
        raise ConfigError("proxy.model", pr.model, "'' (the student's) or " + ", ".join(
            models.MODEL_NAMES))
    i = config.influence
    if i.scope not in methods.INFLUENCE_SCOPES:
        raise ConfigError("influence.scope", i.scope, ", ".join(methods.INFLUENCE_SCOPES))
    if i.model not in ("teacher", "proxy"):
        raise ConfigError("influence.model", i.model, "teacher, proxy")
    if i.loss not in ("kd", "ce"):
        raise ConfigError("influence.loss", i.loss, "kd, ce")
    if (methods.get(config.prune.method).influence and i.loss == "kd"
            and i.model == "teacher" and i.scope != "head"):
        raise ConfigError(
            "influence.loss", i.loss,
            "ce when influence.model=teacher with scope last_layer/full (the teacher's KD loss "
            "against itself has zero gradient for every example); or use model=proxy, or "
            "scope=head")
    if i.solver not in methods.INFLUENCE_STAGE_SOLVERS:
        raise ConfigError("influence.solver", i.solver,
                          ", ".join(methods.INFLUENCE_STAGE_SOLVERS))
    if i.solver in methods.KFAC_SOLVERS:
        if i.scope == "head":
            raise ConfigError("influence.solver", i.solver,
                              "exact, cg, lissa, diag_fisher with influence.scope=head (K-FAC "
                              "needs a trained network's layers: scope last_layer or full)")
        if config.prune.method == "self_influence" and i.loss != "ce":
            raise ConfigError("influence.loss", i.loss,
                              f"ce with prune.method=self_influence and influence.solver="
                              f"{i.solver} (its per-example gradients are of the "
                              f"cross-entropy the factors are fitted for)")
    if i.kfac_fisher not in FISHERS:
        raise ConfigError("influence.kfac_fisher", i.kfac_fisher, ", ".join(FISHERS))
    if i.kfac_damping_mode not in DAMPING_MODES:
        raise ConfigError("influence.kfac_damping_mode", i.kfac_damping_mode,
                          ", ".join(DAMPING_MODES))
    _positive("influence.kfac_chunk_size", i.kfac_chunk_size, integer=True)
    if i.solver == "diag_fisher" and i.scope == "full":
        raise ConfigError("influence.solver", i.solver,
                          "exact, cg, lissa with influence.scope=full (diag_fisher needs "
                          "per-example gradients of every parameter, which this stage "
                          "computes for scopes head and last_layer only)")
    if not 0 <= i.kd_weight <= 1:
        raise ConfigError("influence.kd_weight", i.kd_weight, "a number in [0, 1]")
    _positive("influence.temperature", i.temperature)
    if i.damping < 0:
        raise ConfigError("influence.damping", i.damping, "a number >= 0")
    if i.l2 < 0:
        raise ConfigError("influence.l2", i.l2, "a number >= 0")
    _positive("influence.max_iters", i.max_iters, integer=True)
    _positive("influence.tol", i.tol)
    _positive("influence.lissa_scale", i.lissa_scale)
    if i.hessian_examples < 0:
        raise ConfigError("influence.hessian_examples", i.hessian_examples, "an integer >= 0")
    ib, po = config.ifbeta, config.policy
    if not 0 <= ib.kd_weight <= 1:
        raise ConfigError("ifbeta.kd_weight", ib.kd_weight, "a number in [0, 1]")
    _positive("ifbeta.temperature", ib.temperature)
    if ib.l2 < 0 or ib.damping < 0:
        raise ConfigError("ifbeta.l2" if ib.l2 < 0 else "ifbeta.damping",
                          min(ib.l2, ib.damping), "a number >= 0")
    if ib.head not in ("linear", "mlp"):
        raise ConfigError("ifbeta.head", ib.head, "linear, mlp")
    _positive("ifbeta.mlp_hidden", ib.mlp_hidden, integer=True)
    if ib.head == "mlp" and (ib.damping <= 0 or po.damping <= 0):
        raise ConfigError("ifbeta.damping" if ib.damping <= 0 else "policy.damping",
                          min(ib.damping, po.damping),
                          "a number > 0 with ifbeta.head=mlp (its Hessian is indefinite; "
                          "CG needs damping above its most negative eigenvalue)")
    if ib.influence_solver not in ("exact", "cg", "diag_fisher"):
        raise ConfigError("ifbeta.influence_solver", ib.influence_solver,
                          "exact, cg, diag_fisher")
    if not 0 < ib.val2_fraction < 1:
        raise ConfigError("ifbeta.val2_fraction", ib.val2_fraction, "a number in (0, 1)")
    if ib.feature_dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError("ifbeta.feature_dtype", ib.feature_dtype,
                          "float32, float16, bfloat16")
    if po.preconditioner not in ("auto", "kronecker", "none"):
        raise ConfigError("policy.preconditioner", po.preconditioner,
                          "auto, kronecker, none")
    if po.preconditioner == "kronecker" and ib.head != "linear":
        raise ConfigError("policy.preconditioner", po.preconditioner,
                          f"auto or none with ifbeta.head={ib.head} (the Kronecker "
                          "preconditioner is for the linear head)")
    if not isinstance(po.cg_warm_start, bool):
        raise ConfigError("policy.cg_warm_start", po.cg_warm_start, "True, False")
    if po.method not in ("implicit", "reinforce", "grid"):
        raise ConfigError("policy.method", po.method, "implicit, reinforce, grid")
    if po.get("outer_loss", "kd") not in ("kd", "ce"):
        raise ConfigError("policy.outer_loss", po.outer_loss, "kd, ce")
    for f in ("learning_rate", "init_a", "init_b", "inner_tol", "cg_tol"):
        _positive(f"policy.{f}", po[f])
    for f in ("max_steps", "patience", "inner_max_iters", "cg_max_iters"):
        _positive(f"policy.{f}", po[f], integer=True)
    if po.reinforce_samples < 2:
        raise ConfigError("policy.reinforce_samples", po.reinforce_samples, "an integer >= 2")
    if po.damping < 0:
        raise ConfigError("policy.damping", po.damping, "a number >= 0")
    _positive("score.batch_size", config.score.batch_size, integer=True)
    if config.score.batch_size % n_dev:
        raise ConfigError("score.batch_size", config.score.batch_size,
                          sharding.batch_multiple_phrase())
    gc = config.score.grand_chunk_size
    if not isinstance(gc, int) or isinstance(gc, bool) or gc < 0:
        raise ConfigError("score.grand_chunk_size", gc,
                          "an integer >= 0 (0 = the whole scoring batch in one vmap)")


def validate(config) -> None:
    """Raise ConfigError for the first invalid field (see module docstring)."""
    config = kd_alpha.resolve(config)  # kd.alpha="auto": its rule file read and checked
    n_dev = jax.device_count()
    d = config.data
    if d.source not in SOURCE_KINDS:
        raise ConfigError("data.source", d.source, ", ".join(SOURCE_KINDS))
    if d.source in ("image_folder", "arrays"):
        if not d.path or not os.path.exists(d.path):
            raise ConfigError("data.path", d.path,
                              "an existing image folder, .tar/.tar.gz or .npz path")
        if d.source == "arrays" and not os.path.isfile(d.path):
            raise ConfigError("data.path", d.path, "an existing .npz file with data.source="
                              "'arrays' (this path is a directory: use data.source="
                              "'image_folder' for a folder of images)")
    if d.source == "tfds" and not d.name:
        raise ConfigError("data.name", d.name, "a TFDS dataset name, e.g. 'cifar10'")
    if d.augment not in AUGMENTATIONS:
        raise ConfigError("data.augment", d.augment, ", ".join(AUGMENTATIONS))
    if not 0 <= d.val_fraction < 1:
        raise ConfigError("data.val_fraction", d.val_fraction, "a number in [0, 1)")
    if not 0 <= d.label_noise < 1:
        raise ConfigError("data.label_noise", d.label_noise, "a number in [0, 1)")
    if len(d.mean) != len(d.std) or any(s <= 0 for s in d.std):
        raise ConfigError("data.std", d.std, "positive numbers, one per entry of data.mean")
    if d.num_workers < 0:
        raise ConfigError("data.num_workers", d.num_workers, "an integer >= 0")
    # The sources slice with it (labels[:max_per_class]): a negative value would silently
    # drop the last examples of each class, or (image folders) every image.
    mpc = d.get("max_per_class", 0)
    if isinstance(mpc, bool) or not isinstance(mpc, int) or mpc < 0:
        raise ConfigError("data.max_per_class", mpc,
                          "an integer >= 0 (0 = every example; N > 0 = the first N of each "
                          "class)")
    if config.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
        raise ConfigError("compute_dtype", config.compute_dtype, ", ".join(COMPUTE_DTYPES))

    for role in ("teacher", "student"):
        m = config[role]
        if m.model not in models.MODEL_NAMES:
            raise ConfigError(f"{role}.model", m.model, ", ".join(models.MODEL_NAMES))
        _positive(f"{role}.width", m.width)
        _check_optim(f"{role}.optim", m.optim, n_dev)
    init = config.teacher.init
    is_torch_file = init.endswith((".pt", ".pth")) and not os.path.isdir(init)
    if init and not (os.path.isfile(init) if is_torch_file else os.path.isdir(init)):
        raise ConfigError("teacher.init", init,
                          "'' (train the teacher), an existing .pt/.pth file (PyTorch state "
                          "dict) or a kdprune_jax teacher checkpoint directory")
    # Checked here, without importing torch, so a missing optional extra stops the run
    # before the data is loaded rather than when the teacher stage reads the file.
    if init and is_torch_file and importlib.util.find_spec("torch") is None:
        raise ConfigError("teacher.init", init,
                          "a kdprune_jax teacher checkpoint directory; reading a PyTorch "
                          ".pt/.pth file needs torch: pip install 'kdprune_jax[torch]'")

    if not 0 <= config.kd.alpha <= 1:
        raise ConfigError("kd.alpha", config.kd.alpha, "a number in [0, 1]")
    _positive("kd.temperature", config.kd.temperature)
    tv = config.kd.get("teacher_views", 0)
    if not isinstance(tv, int) or isinstance(tv, bool) or tv < 0:
        raise ConfigError("kd.teacher_views", tv,
                          "an integer >= 0 (0 = live teacher; V > 0 = V cached views)")

    p = config.prune
    if p.method not in methods.METHODS:  # read now: methods registered later count
        raise ConfigError("prune.method", p.method, ", ".join(methods.names()))
    if p.direction not in ("auto",) + DIRECTIONS:
        raise ConfigError("prune.direction", p.direction, ", ".join(("auto",) + DIRECTIONS))
    if p.rule not in RULES:
        raise ConfigError("prune.rule", p.rule, ", ".join(RULES))
    if not 0 <= p.ccs_hard_cutoff < 1:
        raise ConfigError("prune.ccs_hard_cutoff", p.ccs_hard_cutoff, "a number in [0, 1)")
    _positive("prune.ccs_strata", p.ccs_strata, integer=True)
    if p.scores_file and not os.path.isfile(p.scores_file):
        raise ConfigError("prune.scores_file", p.scores_file, "'' or an existing .npz file")
    _check_scoring(config, n_dev)
    kf = p.keep_fraction
    if isinstance(kf, bool) or not isinstance(kf, (int, float)) or not 0 < kf <= 1:
        raise ConfigError("prune.keep_fraction", kf, "a number in (0, 1]")
    _positive("eval.batch_size", config.eval.batch_size, integer=True)
    if config.eval.batch_size % n_dev:
        raise ConfigError("eval.batch_size", config.eval.batch_size,
                          sharding.batch_multiple_phrase())
    _positive("log_every_steps", config.log_every_steps, integer=True)
    _positive("checkpoint_every_steps", config.checkpoint_every_steps, integer=True)


# Below this much free space a run would fail on its first checkpoint save (a ResNet-20
# checkpoint is a few MB, a ResNet-50 one with its optimizer state ~200 MB): a full disk
# stops the run here, before any training, rather than after the first hour of it.
MIN_FREE_BYTES = 100 << 20


def check_workdir(workdir: str) -> None:
    """Create `workdir` if needed and check that it takes a new file and has free space.

    The write probe (a temporary file, removed at once) catches what ``os.access`` cannot:
    a path under a regular file, a read-only mount, a full quota. Existing files in the
    workdir are never touched.
    """
    allowed = "a writable directory (created when missing)"
    if not workdir:
        raise ConfigError("--workdir", workdir, allowed)
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kdprune_write_probe.", dir=workdir)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ConfigError("--workdir", workdir,
                          f"{allowed}; here: {e.strerror or e}") from None
    try:
        free = shutil.disk_usage(workdir).free
    except OSError:  # a filesystem without statvfs: the write probe is all we can check
        return
    if free < MIN_FREE_BYTES:
        raise ConfigError("--workdir", workdir,
                          f"a directory on a filesystem with at least {MIN_FREE_BYTES >> 20} "
                          f"MiB free for checkpoints and artifacts (it has "
                          f"{free / 2**20:.1f} MiB free)")
