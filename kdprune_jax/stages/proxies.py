"""The `proxies` stage: K proxy networks trained briefly on the whole pool with
cross-entropy (Paul et al. 2021), the models EL2N, GraNd and forgetting score with.

    DIR/proxies/<k>/   orbax checkpoint of proxy k (resumable), seed config.seed + 100 + k

A proxy is the student architecture (or ``proxy.model``) with the student's optimizer for
``proxy.num_epochs``; its training cost counts toward the method's pruning cost.
"""

from __future__ import annotations

from kdprune_jax import artifacts, config_checks, data, methods, models
from kdprune_jax.context import Run
from kdprune_jax.errors import ConfigError
from kdprune_jax.inference import FrozenModel
from kdprune_jax.stages import training

SEED_OFFSET = 100


def optim(config):
    """The proxies' optimizer: the student's, for proxy.num_epochs."""
    o = config.student.optim.copy_and_resolve_references()
    with o.unlocked():
        o.num_epochs = config.proxy.num_epochs
    return o


def num_models(config) -> int:
    """proxy.num_models for methods averaging proxies, else one."""
    return config.proxy.num_models if methods.get(config.prune.method).proxy_mode(
        config) == "multi" else 1


def key(run: Run, k: int, track_forgetting: bool) -> str:
    """Key of proxy k: its model, recipe, seed, the data and the train transform."""
    c = run.config
    return artifacts.fingerprint({
        "proxy": k, "model": c.proxy.model or c.student.model, "width": c.student.width,
        "optim": optim(c).to_dict(), "seed": c.seed + SEED_OFFSET + k,
        "data": run.splits.fingerprint, "forgetting": track_forgetting,
        "transform": run.transform_key(), **config_checks.compute_dtype_fingerprint(c)})


def train(run: Run, track_forgetting: bool = False):
    """Train (or resume) the proxies. Returns ([(FrozenModel, extra)], seconds), `extra`
    being the run's side outputs (forgetting events when tracked)."""
    c = run.config
    o = optim(c)
    num_steps = data.num_train_steps(len(run.splits.pool), o.batch_size, o.num_epochs)
    if num_steps < 1:
        raise ConfigError("proxy.num_epochs", c.proxy.num_epochs,
                          "enough epochs for at least one optimizer step")
    out, seconds = [], 0.0
    for k in range(num_models(c)):
        seed = c.seed + SEED_OFFSET + k
        fp = key(run, k, track_forgetting)
        def make_model(seed=seed):
            return models.create_model(c.proxy.model or c.student.model,
                                       num_classes=run.splits.num_classes, seed=seed,
                                       width=c.student.width)

        res = training.train(run, f"proxy{k}", make_model, run.splits.pool, fp, optim=o,
                             seed=seed,
                             num_steps=num_steps, role="student",
                             ckpt_dir=run.path("proxies", str(k)),
                             track_forgetting=track_forgetting)
        seconds += res.seconds
        out.append((FrozenModel(res.graphdef, res.params, res.batch_stats, fp), res.extra))
    return out, seconds
