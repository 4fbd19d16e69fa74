"""The `evaluate` stage: the student's test and validation metrics and everything the run
cost, DIR/results.json (the run's one result file; `format_results` is its table)."""

from __future__ import annotations

import json
import time

import jax

from kdprune_jax import artifacts, faults
from kdprune_jax.context import Run
from kdprune_jax.stages import cache, training


def key(run: Run, student_key: str) -> str:
    """Key of the results: the student, the test split and the eval transform."""
    return training.eval_key(run, student_key)


def compute(run: Run, *, student, student_key: str, subset, teacher_metrics: dict | None,
            scores_meta: dict | None, policy_rec: dict | None, timings: dict) -> dict:
    """results.json for the trained `student` (a TrainResult), reused when its key matches
    and it is well formed. `timings` (seconds per stage) receives eval_seconds."""
    c = run.config
    has_teacher = teacher_metrics is not None
    fp = key(run, student_key)

    def evaluate():
        t = time.perf_counter()
        model = (student.graphdef, student.params, student.batch_stats)
        student_test = training.evaluate_test(run, model)
        faults.maybe_kill("eval:test")  # kill point: between the test and val evaluations
        student_val = training.evaluate_val(run, model)
        timings["eval_seconds"] = time.perf_counter() - t
        results = {
            "fingerprint": fp,
            "student": {"model": c.student.model, "test": student_test, "val": student_val,
                        "steps": student.steps, "train_seconds": student.seconds},
            "teacher": {"model": c.teacher.model, **teacher_metrics} if has_teacher else None,
            "subset": {"method": subset.method, "keep_fraction": subset.keep_fraction,
                       "num_kept": len(subset.indices), "pool_size": subset.pool_size,
                       "seed": subset.seed, "direction": subset.direction,
                       "params": subset.params},
            # What choosing the subset cost beyond the teacher: proxy training + scoring
            # (Paul et al.'s proxies count toward the method's pruning cost).
            "pruning_cost": {
                "proxy_seconds": (scores_meta or {}).get("proxy_seconds", 0.0),
                "scoring_seconds": (scores_meta or {}).get("scoring_seconds", 0.0),
                "policy_seconds": (policy_rec or {}).get("seconds", 0.0),
            },
            "policy": {k: policy_rec[k] for k in ("a", "b", "method", "outer_at_init",
                                                  "outer_at_learned")} if policy_rec else None,
            "kd": c.kd.to_dict() if has_teacher else {"alpha": 0.0},
            "devices": jax.device_count(),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "config": json.loads(c.to_json_best_effort()),
        }
        faults.maybe_kill("eval:write")  # kill point: every metric computed, none written
        return results

    def read(path):
        old, problem = artifacts.read_json_checked(path)
        if old is not None:
            problem = _results_problem(old, None, has_teacher)
        return (None, problem) if problem else (old, None)

    def check(old):
        return _results_problem(old, subset, has_teacher)

    return cache.reuse_or_compute(
        cache.Artifact("eval", run.path("results.json"), redo="re-evaluating",
                       stale="another student, test split or eval transform"), fp,
        read=read, key_of=lambda r: r["fingerprint"], check=check, compute=evaluate,
        write=artifacts.write_json, log=run.log)


def _results_problem(r, subset, has_teacher: bool) -> str | None:
    """What makes a parsed results.json unusable (None if nothing): a missing key or a
    wrong type anywhere `format_results` or a reader looks, or (given the run's `subset`,
    i.e. when the fingerprint matches) another subset size."""
    n = artifacts.NUMBER
    problem = artifacts.check_fields(r, {
        "fingerprint": str, "student.model": str, "student.train_seconds": n,
        "student.val": dict, "subset.num_kept": int, "subset.pool_size": int,
        "subset.keep_fraction": n, "subset.method": str, "kd.alpha": n, "devices": int,
        **{f"student.test.{k}": t for k, t in training.METRICS.items()},
        **({"teacher.model": str, "teacher.accuracy": n, "teacher.loss": n}
           if has_teacher else {})})
    if problem is None and subset is not None and r["subset"]["num_kept"] != len(subset.indices):
        problem = (f"subset.num_kept is {r['subset']['num_kept']}, the subset has "
                   f"{len(subset.indices)} examples")
    return problem


def format_results(r: dict) -> str:
    """The final results table (also what a person reads at the end of a run)."""
    rows = [("stage", "model", "examples", "test acc", "test loss", "train s")]
    if r.get("teacher"):
        t = r["teacher"]
        rows.append(("teacher", t["model"], "-", f"{t['accuracy']:.4f}", f"{t['loss']:.4f}",
                     f"{t.get('train_seconds', 0):.1f}"))
    s, sub = r["student"], r["subset"]
    rows.append(("student", s["model"], f"{sub['num_kept']}/{sub['pool_size']}",
                 f"{s['test']['accuracy']:.4f}", f"{s['test']['loss']:.4f}",
                 f"{s['train_seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (f"results: keep_fraction {sub['keep_fraction']} ({sub['method']}), "
            f"kd alpha {r['kd'].get('alpha')}, {r['devices']} devices")
    return "\n".join([head, *lines])
