r"""Run every benchmark, print one table and write JSON + Markdown.

    pip install -e '.[bench]'
    python -m benchmarks.run                      # everything (~?? min on 2 cores)
    python -m benchmarks.run --only kd_step,grand --quick

Each row: the workload, our figure, the reference's figure measured in the same process,
the ratio (> 1 = ours faster), the median of >= 5 repetitions after warm-up, compile time
apart, and for XLA programs the FLOPs from cost analysis and the achieved GFLOP/s, to be read
against the machine's measured matmul peak (also reported). Results go to
``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import common

SUITES = ("kd_step", "conv_profile", "grand", "influence", "influence_diag_fisher", "kfac",
          "kfac_memory", "kfac_resnet20", "ifbeta_cost", "cached_teacher", "scaling")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SUITES),
                    help=f"comma-separated subset of: {', '.join(SUITES)}")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions and smaller sizes (a smoke run, not for figures)")
    ap.add_argument("--name", default="latest", help="results file stem")
    ap.add_argument("--ifbeta_max_per_class", type=int, default=1000,
                    help="ifbeta_cost: images per class (0 = all of CIFAR-10)")
    ap.add_argument("--ifbeta_teacher_init", default="",
                    help="ifbeta_cost: import this teacher/ dir instead of training one")
    ap.add_argument("--ifbeta_override", action="append", default=[], metavar="FIELD=VALUE",
                    help="ifbeta_cost: extra --config.FIELD=VALUE for the pipeline run "
                         "(repeatable), e.g. policy.preconditioner=none to measure a knob")
    args = ap.parse_args(argv)
    bad_override = [o for o in args.ifbeta_override if "=" not in o]
    if bad_override:
        print(f"error: --ifbeta_override {bad_override[0]!r} is invalid; allowed: "
              "FIELD=VALUE, e.g. policy.preconditioner=none", file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",") if s]
    bad = [s for s in only if s not in SUITES]
    if bad:
        print(f"error: --only {','.join(bad)} is invalid; allowed: {', '.join(SUITES)}",
              file=sys.stderr)
        return 2

    # Our side runs with the XLA:CPU defaults of the package: per-program compiler options
    # (kdprune_jax.cpu_flags) inside the train steps and scoring passes (kd_step, ifbeta_cost,
    # cached_teacher); grand passes them as the score stage does and conv_profile as the
    # train step does; influence and scaling jit programs that run without them in the
    # package too (CG / dense algebra).
    reps = 5  # the median of >= 5 repetitions, always
    rows: list[common.Row] = []
    t0 = time.perf_counter()
    peak = common.matmul_peak(n=512 if args.quick else 2048)
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(d, exist_ok=True)

    def save():
        """Rewrite the results after every suite: a long run that is stopped keeps what
        it measured."""
        out = {"machine": common.machine(), "matmul_peak": peak, "quick": args.quick,
               "seconds": round(time.perf_counter() - t0, 1),
               "rows": [r.to_dict() for r in rows]}
        with open(os.path.join(d, f"{args.name}.json"), "w") as f:
            json.dump(out, f, indent=2)
        with open(os.path.join(d, f"{args.name}.md"), "w") as f:
            f.write(common.format_markdown(rows) + "\n")
        print(common.format_table(rows), flush=True)

    if "kd_step" in only:
        from benchmarks import kd_step

        pairs = kd_step.PAIRS[1:] if args.quick else kd_step.PAIRS
        rows += kd_step.run(reps=reps, steps_per_rep=1 if args.quick else 5,
                            batch_size=16 if args.quick else 128, pairs=pairs,
                            torch_compile=not args.quick)
        save()
    if "conv_profile" in only:
        from benchmarks import conv_profile

        rows += conv_profile.run(batch=16 if args.quick else 128, reps=reps)
        save()
    if "grand" in only:
        from benchmarks import grand

        rows += grand.run(n=64 if args.quick else 2048, batch_size=32 if args.quick else 256,
                          chunk_size=16 if args.quick else 64,
                          reps=reps, model_name="cifar_resnet8" if args.quick else
                          "cifar_resnet20")
        save()
    if "influence" in only:
        from benchmarks import influence

        rows += influence.run(n_train=500 if args.quick else 5000,
                              n_val=100 if args.quick else 1000,
                              cg_iters=10 if args.quick else 100, reps=reps)
        save()
    if "influence_diag_fisher" in only:
        from benchmarks import influence

        rows += influence.run_diag_fisher(n_train=500 if args.quick else 5000,
                                          n_val=100 if args.quick else 1000, reps=reps)
        save()
    if "kfac" in only:
        from benchmarks import kfac

        rows += kfac.run(n_train=500 if args.quick else 5000, n_val=100 if args.quick else 1000,
                         reps=reps)
        save()
    if "kfac_memory" in only and "kfac" not in only:  # kfac's memory row alone
        from benchmarks import kfac

        rows += kfac.run_memory(n_train=500 if args.quick else 5000,
                                n_val=100 if args.quick else 1000)
        save()
    if "kfac_resnet20" in only:  # each side in its own process (peak memory)
        from benchmarks import kfac_resnet

        # n_train 1,000, not run()'s 5,000: ~35 min on 2 shared cores (kfac_resnet's docstring)
        rows += (kfac_resnet.run(n_train=500, n_val=100, reps=1, train_epochs=1)
                 if args.quick else kfac_resnet.run(n_train=1000))
        save()
    if "ifbeta_cost" in only:
        from benchmarks import ifbeta_cost

        rows += ifbeta_cost.run(max_per_class=20 if args.quick else args.ifbeta_max_per_class,
                                teacher_epochs=1 if args.quick else 2,
                                teacher_init=args.ifbeta_teacher_init,
                                overrides=args.ifbeta_override,
                                workdir="/tmp/kdprune_bench_ifbeta" + (
                                    "_imported" if args.ifbeta_teacher_init else ""))
        save()
    if "cached_teacher" in only:  # imports the teacher ifbeta_cost trained (run that first)
        from benchmarks import cached_teacher

        rows += cached_teacher.run(max_per_class=20 if args.quick else 1000,
                                   student_epochs=2 if args.quick else 15)
        save()
    if "scaling" in only:
        from benchmarks import scaling

        rows += (scaling.run(ns=(500, 1000, 2000), dims=(16, 32), base_n=500, reps=reps)
                 if args.quick else scaling.run(reps=reps))
        save()
    print(f"matmul peak ({peak['n']}^2 f32): XLA {peak['xla_gflops']:.1f} GFLOP/s"
          + (f", PyTorch {peak['torch_gflops']:.1f}" if "torch_gflops" in peak else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
