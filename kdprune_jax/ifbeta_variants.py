r"""Which IF-Beta choices make the learned policy carry signal on real data.

    python -m kdprune_jax.ifbeta_variants --study=configs/study/cifar10.py \
        --teacher=/work/study/cifar10/teachers/resnet20/teacher --workdir=/tmp/ifbeta_variants \
        [--keep_fraction=0.5] [--out=results/ifbeta_variants] [--name=cifar10_resnet20]

One teacher (a kdprune_jax ``teacher/`` directory; its latest step), the study's base run
config (data, validation split, IF-Beta defaults), one teacher-feature pass shared by every
variant; per variant, the influence ranks and the policy are learned exactly as the pipeline
does (`stages.ifbeta.build_problem`, `learn_policy`), and the table reports the learned
(a, b), whether it left Beta(1, 1), and the V1 / V2 objectives at Beta(1, 1) and at the
learned policy. Everything is measured on the validation split (V1 drives the policy, V2
stops it early); the test split is never read. Each variant's objective is its own (a "ce"
outer loss is not on the scale of a "kd" one), so variants compare by the relative change of
V2 from Beta(1, 1) to the learned policy.

The variants (`VARIANTS`) are the knobs METHOD.md §5.8's risk points at — the outer
objective, the proxy's KD weight and capacity, early stopping of the inner fit, the V1/V2
split — and a variant nearer to the IF-Beta paper's description (METHOD.md §5.9: a
score-function policy gradient and an inverse-diagonal-Fisher influence; its (mean,
concentration) parameterisation with a grid over the mean is not implemented).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
import time

VARIANTS = (
    ("default: KD-aligned outer loss, proxy KD weight 0.9", ()),
    ("outer loss: CE on the validation labels", (("policy.outer_loss", "ce"),)),
    ("proxy KD weight 0.5", (("ifbeta.kd_weight", 0.5),)),
    ("proxy KD weight 0 (CE proxy and outer loss)", (("ifbeta.kd_weight", 0.0),)),
    ("proxy L2 1e-2 (lower capacity)", (("ifbeta.l2", 1e-2),)),
    ("inner fit early-stopped at 10 L-BFGS iterations", (("policy.inner_max_iters", 10),)),
    ("outer CE + proxy KD weight 0.5", (("policy.outer_loss", "ce"),
                                        ("ifbeta.kd_weight", 0.5))),
    ("METHOD.md §5.9-like: diag-Fisher influence, score-function gradient",
     (("ifbeta.influence_solver", "diag_fisher"), ("policy.method", "reinforce"))),
)
FIELDS = ("variant", "a", "b", "moved", "steps", "v1_init", "v1_learned", "v2_init",
          "v2_learned", "v2_change", "seconds", "overrides")


def _moved(a: float, b: float) -> bool:
    """Whether the policy left Beta(1, 1) (by more than 0.05 in a or b)."""
    return abs(a - 1.0) > 0.05 or abs(b - 1.0) > 0.05


def run(study_config: str, teacher_dir: str, workdir: str, keep_fraction: float = 0.5,
        variants=VARIANTS, log=print) -> list[dict]:
    from kdprune_jax import bilevel, context, study
    from kdprune_jax.selection import policy
    from kdprune_jax.stages import features, ifbeta, teacher

    s_cfg = study.load_study(study_config)
    base = study.base_config(s_cfg)
    teacher_fields = dict(next(iter(s_cfg.teachers.values())))
    config = study.apply_overrides(base, {**teacher_fields, "prune.method": "ifbeta",
                                          "prune.keep_fraction": keep_fraction,
                                          "teacher.init": os.path.abspath(teacher_dir)})
    os.makedirs(workdir, exist_ok=True)
    ctx = context.Run.create(config, workdir, log=log)
    sp = ctx.splits
    model = teacher.import_teacher(config, sp.num_classes, ctx.mesh)
    feats = features.compute(ctx, model)
    rows = []
    for name, fields in variants:
        c = study.apply_overrides(config, dict(fields))
        t0 = time.perf_counter()
        prob, _, _ = ifbeta.build_problem(c, sp, feats.features, feats.logits, log)
        s = ifbeta.settings(c, sp.num_classes)
        phi, history, _ = ifbeta.learn_policy(c, prob, s, ctx.mesh, ctx.writer, log)
        a, b = (float(x) for x in policy.beta_params(phi))
        init = ifbeta.initial_phi(c.policy.init_a, c.policy.init_b)
        on_v2 = dataclasses.replace(prob, val=prob.val2)
        v1 = [float(bilevel.objective_at(p, prob, s)) for p in (init, phi)]
        v2 = [float(bilevel.objective_at(p, on_v2, s)) for p in (init, phi)]
        rows.append({"variant": name, "a": round(a, 4), "b": round(b, 4),
                     "moved": _moved(a, b), "steps": len(history),
                     "v1_init": round(v1[0], 6), "v1_learned": round(v1[1], 6),
                     "v2_init": round(v2[0], 6), "v2_learned": round(v2[1], 6),
                     "v2_change": round((v2[1] - v2[0]) / v2[0], 6),
                     "seconds": round(time.perf_counter() - t0, 1),
                     "overrides": " ".join(f"--config.{k}={v}" for k, v in fields)})
        log(f"[variants] {name}: (a, b) = ({a:.3f}, {b:.3f}), V2 {v2[0]:.5f} -> {v2[1]:.5f}")
    return rows


def markdown(rows: list[dict], *, teacher: dict, command: str) -> str:
    out = ["# IF-Beta variants on one teacher\n",
           f"Teacher: `{teacher['dir']}` step {teacher['step']} (test accuracy "
           f"{teacher.get('test_accuracy', 'not measured')}). Generated by `{command}`. "
           "V1 drives the policy, V2 stops it (both validation); v2_change is the relative "
           "change of V2 from Beta(1, 1) to the learned policy (negative = better). "
           "IF-Beta here is our reconstruction (METHOD.md §5).\n",
           "| variant | learned (a, b) | left Beta(1, 1) | outer steps | V2 at Beta(1, 1) | "
           "V2 learned | V2 change | overrides |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | ({r['a']:.3f}, {r['b']:.3f}) | "
                   f"{'yes' if r['moved'] else 'no'} | {r['steps']} | {r['v2_init']:.5f} | "
                   f"{r['v2_learned']:.5f} | {100 * r['v2_change']:+.2f}% | "
                   f"`{r['overrides'] or '-'}` |")
    return "\n".join(out) + "\n"


def _teacher_step(teacher_dir: str) -> int:
    steps = [int(d) for d in os.listdir(teacher_dir) if d.isdigit()]
    return max(steps) if steps else -1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="configs/study/cifar10.py")
    ap.add_argument("--teacher", required=True, help="a kdprune_jax teacher/ directory")
    ap.add_argument("--workdir", required=True, help="scratch: the shared feature pass")
    ap.add_argument("--keep_fraction", type=float, default=0.5)
    ap.add_argument("--out", default="results/ifbeta_variants")
    ap.add_argument("--name", default="cifar10_resnet20")
    ap.add_argument("--teacher_test_accuracy", default="",
                    help="the teacher's measured test accuracy, quoted in the table")
    a = ap.parse_args(argv)
    from kdprune_jax import preemption, study
    from kdprune_jax.errors import UserError

    study._compilation_cache()
    preemption.install()
    try:
        rows = run(a.study, a.teacher, a.workdir, a.keep_fraction)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with open(os.path.join(a.out, f"{a.name}.csv"), "w") as f:
        f.write(buf.getvalue())
    command = "python -m kdprune_jax.ifbeta_variants " + " ".join(argv or sys.argv[1:])
    teacher = {"dir": a.teacher, "step": _teacher_step(a.teacher),
               "test_accuracy": a.teacher_test_accuracy or "not measured"}
    with open(os.path.join(a.out, f"{a.name}.md"), "w") as f:
        f.write(markdown(rows, teacher=teacher, command=command))
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as f:
        json.dump({"teacher": teacher, "command": command, "rows": rows}, f, indent=1)
        f.write("\n")
    print(f"[variants] {len(rows)} variants -> {a.out}/{a.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
