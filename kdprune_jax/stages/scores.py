"""The `scores` stage: per-example pruning scores over the whole training split.

Scores are computed in fixed-size, padded batches sharded on the ("data",) mesh (one
compile per shape; padded rows are never written), from the teacher, from K proxy models
(the proxies stage), or from influence functions (the influence stage), by the method
table's score function (`kdprune_jax.methods`). The result is DIR/scores/<method>.npz
holding ``scores`` float32 [N_train] (indexed by source position) and a JSON ``meta`` with
the method, its parameters, the teacher / data / proxy fingerprints and the pruning cost.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx

from kdprune_jax import artifacts, faults, inference, losses, methods, scoring
from kdprune_jax.context import Run
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.inference import FrozenModel, batch_pass
from kdprune_jax.stages import cache


def logits_and_features(run: Run, model: FrozenModel, indices):
    """`inference.logits_and_features` over train `indices` ([N_train, C], [N_train, D])."""
    return inference.logits_and_features(model, run.eval_batches(indices), run.mesh,
                                         len(run.splits.train), run.splits.num_classes)


def _grand_fn(graphdef, chunk_size, mesh):
    def local(params, bs, image, label):
        def loss(p, batch):
            logits = nnx.merge(graphdef, p, bs)(batch["image"], train=False)
            return losses.cross_entropy(logits, batch["label"])

        return scoring.grand_scores(loss, params, {"image": image, "label": label},
                                    chunk_size=chunk_size)

    # shard_map: each device computes the per-example gradients of the rows it holds.
    # Besides being the natural split, it is needed for correctness: jit's automatic
    # partitioning of a batch-sharded vmap(grad) through convolutions gives wrong
    # gradients on XLA:CPU (JAX 0.10.2; test_scores_on_8_devices_equal_1_device).
    # check_vma=False: with varying-axis typing, the gradient w.r.t. the replicated params
    # would be psum'd over devices (the transpose of their implicit broadcast), mixing
    # different examples' gradients; each device's gradients must stay its own.
    rows = jax.sharding.PartitionSpec("data")
    repl = jax.sharding.PartitionSpec()
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(repl, repl, rows, rows),
                            out_specs=rows, check_vma=False)

    def fn(params, bs, batch):
        return sharded(params, bs, batch["image"], batch["label"])

    return fn


score_params = methods.score_params  # the method table owns the score key


def key(run: Run, teacher: FrozenModel | None) -> dict:
    """The score file's metadata key: method, its key fields (the method table), the data,
    and the teacher when the method reads it (a KD run has a teacher whatever the method;
    el2n, grand and forgetting score with proxies). Its fingerprint is the file's key."""
    c = run.config
    uses_teacher = teacher is not None and methods.get(c.prune.method).needs_teacher(c)
    return {"method": c.prune.method, "params": score_params(c), "data": run.splits.fingerprint,
            "teacher": teacher.fingerprint if uses_teacher else ""}


def compute(run: Run, teacher: FrozenModel | None, *, train_proxies, influence_scores):
    """Scores float32 [N_train] for config.prune.method (indexed by train position), reusing
    DIR/scores/<method>.npz when its metadata matches. Returns (scores, meta).

    The stages it draws on are passed in (stages never import each other):
    train_proxies(track_forgetting) -> ([(FrozenModel, extra)], seconds), the proxies stage,
    called only when the scores must be computed; influence_scores(run, teacher, proxy,
    t_logits, t_feats, report) -> [N_train], the influence stage."""
    config = run.config
    method = config.prune.method
    meta = key(run, teacher)
    fp = artifacts.fingerprint(meta)
    n = len(run.splits.train)
    if config.prune.scores_file:
        return load_external_scores(config.prune.scores_file, meta, n)

    def check(old):
        # For this very data (a stale file may hold another split's length): damaged.
        if len(old[0]) != n:
            return f"{len(old[0])} scores, the training split has {n}"
        return None

    return cache.reuse_or_compute(
        cache.Artifact("scores", run.path("scores", f"{method}.npz")), fp,
        read=read_scores_checked, key_of=lambda old: old[1].get("fingerprint"), check=check,
        log=run.log, compute=lambda: _compute(run, teacher, meta, fp, train_proxies,
                                              influence_scores),
        write=lambda path, got: artifacts.write_npz(path, scores=got[0], meta=got[1]),
        announce=lambda got: run.log(
            f"[scores] {method}: {len(got[0])} scores in {got[1]['scoring_seconds']:.1f} s "
            f"(+ {got[1]['proxy_seconds']:.1f} s proxy training) -> "
            f"{run.path('scores', method + '.npz')}"))


def _compute(run: Run, teacher, meta: dict, fp: str, train_proxies, influence_scores):
    config, mesh = run.config, run.mesh
    method = config.prune.method
    m = methods.get(method)
    t0 = time.perf_counter()
    all_idx = np.arange(len(run.splits.train))
    num_classes = run.splits.num_classes
    proxy_seconds = 0.0
    t_logits = t_feats = None
    # The teacher pass only for the methods that read teacher logits / features.
    if teacher is not None and m.teacher_pass:
        t_logits, t_feats = logits_and_features(run, teacher, all_idx)
    proxies = []
    if m.proxy_mode(config) is not None:
        proxies, proxy_seconds = train_proxies(track_forgetting=m.track_forgetting)
        faults.maybe_kill("proxies:done")  # kill point: proxies trained, nothing scored
    if m.score is None:
        raise ConfigError("prune.method", method, ", ".join(methods.scored_names()))
    influence_report = {}
    inputs = methods.ScoreInputs(
        config=config, labels=run.splits.train_labels, num_classes=num_classes,
        teacher_logits=t_logits, teacher_features=t_feats, proxies=proxies,
        logits_and_features=lambda model: logits_and_features(run, model, all_idx),
        grand=lambda model: batch_pass(
            _grand_fn(model.graphdef, config.score.grand_chunk_size, mesh),
            (model.params, model.batch_stats), run.eval_batches(all_idx), mesh, len(all_idx)),
        influence=lambda: influence_scores(
            run, teacher, proxies[0][0] if proxies else None, t_logits, t_feats,
            report=influence_report))
    scores = np.asarray(m.score(inputs), np.float32)
    scoring_seconds = time.perf_counter() - t0 - proxy_seconds
    meta = {**meta, "fingerprint": fp, "proxy_seconds": round(proxy_seconds, 3),
            "scoring_seconds": round(scoring_seconds, 3),
            "proxies": [p.fingerprint for p, _ in proxies]}
    if influence_report:  # K-FAC / EK-FAC: the factors' share of the scoring cost
        meta["kfac"] = influence_report
    return scores, meta


def read_scores(path):
    """(scores, meta) from a score file, or None when missing or unreadable."""
    return read_scores_checked(path)[0]


def read_scores_checked(path, n: int | None = None):
    """((scores, meta), None); (None, None) when the file is missing; (None, what is wrong)
    when it is not a score file: not an .npz (empty, truncated, garbage), no 'scores' or
    'meta' array, meta not a JSON object, scores not a finite float vector (of length `n`
    when given)."""
    if not os.path.exists(path):
        return None, None
    try:
        with np.load(path) as z:
            missing = [k for k in ("scores", "meta") if k not in z.files]
            if missing:
                return None, f"no array {missing[0]!r} (it has {sorted(z.files)})"
            scores, meta = np.asarray(z["scores"]), json.loads(str(z["meta"]))
    except Exception as e:  # zipfile / zlib / numpy / json raise many types for bad bytes
        return None, artifacts.describe(e)
    if not isinstance(meta, dict):
        return None, f"'meta' is a JSON {type(meta).__name__}, expected an object"
    if scores.ndim != 1 or scores.dtype.kind != "f":
        return None, f"'scores' is {scores.dtype} {scores.shape}, expected a float vector"
    if n is not None and len(scores) != n:
        return None, f"{len(scores)} scores, the training split has {n} examples"
    if not np.all(np.isfinite(scores)):
        return None, f"{int(np.sum(~np.isfinite(scores)))} scores are NaN or infinite"
    return (scores, meta), None


def load_external_scores(path, want: dict, n: int):
    """A user-supplied score file (prune.scores_file): its metadata must match this run's
    method, data and (if `want` names one) teacher; it is only read, never overwritten.
    Called once right after the data loads (method + data, before any training) and again
    in the scores stage (+ teacher)."""
    got, problem = read_scores_checked(path)
    if got is None:
        raise ConfigError("prune.scores_file", path, "a readable .npz written by kdprune_jax "
                          "(arrays 'scores' and 'meta'); this one "
                          + (f"is unreadable ({problem})" if problem else "does not exist"))
    scores, meta = got
    for key, what in (("method", "scoring method"), ("data", "data (source, split, "
                      "validation split, label noise)"), ("teacher", "teacher")):
        if key in want and meta.get(key) != want[key]:
            raise ArtifactError(
                f"score file {path} was computed for a different {what}: "
                f"{meta.get(key)!r} there, {want[key]!r} in this run; recompute the scores "
                "(leave prune.scores_file empty) or pass the matching file")
    if len(scores) != n:
        raise ArtifactError(f"score file {path} has {len(scores)} scores, the training split "
                            f"has {n} examples")
    return scores, meta
