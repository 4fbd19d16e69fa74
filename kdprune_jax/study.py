r"""The study runner: a grid of ordinary pipeline runs, shared artifacts, claims, a report.

    python -m kdprune_jax.study run    --config=configs/study/cifar10.py --root=DIR [--dry_run]
                                       [--cells=ID|ID] [--shard=i/n] [--worker=NAME]
    python -m kdprune_jax.study status --config=... --root=DIR
    python -m kdprune_jax.study report --config=... --root=DIR [--out=results/<name>] [--check]

A study config (ml_collections) names a base run config and its arg, overrides applied to
every cell (`common`), the teachers (`teachers`: name -> overrides of the teacher) and one
or more grids (`grids`: each a tuple of (field, values) axes whose product gives cells). A
field is a dotted config path; the axis ``seed`` sets both ``seed`` and ``prune.seed``, the
axis ``teacher`` picks a teacher by name. Cells from different grids with the same values
are one cell (Table 1's KD column is Table 2's alpha 0.9 column).

Work units, each in its own directory under the root and each claimed by that directory's
workdir lock (`workdir_lock`, the same lock `pipeline.run` takes) while it runs:

    teachers/<t>/            the teacher, trained once on the pool (stages.teacher)
    scores/<t>/<method>-s<k> one score file per (teacher, method, seed): proxies + scoring
    features/<t>/            one teacher-feature pass per teacher, for IF-Beta cells
                             (cells whose data or score fields differ, e.g. label noise or
                             the proxies' recipe, get their own unit: <name>-<key hash>)
    cells/<id>/              the cell: `pipeline.run` with teacher.init / prune.scores_file /
                             ifbeta.features_dir pointing at the shared units

A unit is done when its artifact exists (the teacher's eval file, the score file, the
features' meta, the cell's results.json with its cell.json); a worker skips done units,
units claimed by a live worker, and cells whose shared units are not done yet (it waits for
them when nothing else is left). Everything a unit computes is checkpointed by the stages
themselves, so a killed worker's unit resumes from its last checkpoint in whichever worker
claims it next (a dead worker's lock is taken over). `claims.log` gets one line per unit
start: (unit, worker, pid).

SIGTERM/SIGINT stop the worker: a training loop saves the step it finished, a pass stops at
its next batch, and the worker exits (status 3) with the rerun command; the unit in flight
resumes from its checkpoints on the next start. SIGSTOP/SIGCONT pause it (a paused
worker's claims stay valid: its pid is alive). Every cell records its wall time and the
machine's load average in cell.json; the study's machine-hours are the sum of the cells'
and units' wall times.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import time

from kdprune_jax import kd_alpha, preemption, verdicts, workdir_lock
from kdprune_jax.errors import ConfigError, UserError

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE_METHODS_WITHOUT_FILE = ("random", "ifbeta")
CELLS_CSV_FIELDS = ("test_accuracy", "val_accuracy", "teacher_test_accuracy", "proxy_seconds",
                    "scoring_seconds", "features_seconds", "policy_seconds",
                    "student_seconds", "total_seconds", "student_steps", "num_kept",
                    "policy_a", "policy_b", "wall_seconds")


class StudyStopped(BaseException):
    """SIGTERM/SIGINT: leave the unit in flight to be resumed, release the claims, exit."""


# ----------------------------------------------------------------------------- configs
def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not os.path.isfile(path):
        raise ConfigError("--config", path, "an existing study config file (.py)")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_study(path: str):
    """configs/study/<name>.py[:arg] -> the study ConfigDict."""
    path, _, arg = path.partition(":")
    return load_module(path, "kdprune_study_config").get_config(arg)


def _resolve_path(p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(ROOT_DIR, p)


def base_config(study):
    """The base run config of every cell, with the study's common overrides."""
    path, _, arg = study.base.partition(":")
    c = load_module(_resolve_path(path), "kdprune_study_base").get_config(arg)
    return apply_overrides(c, dict(study.common))


def apply_overrides(config, fields: dict):
    """Copy of a (locked) run config with dotted fields replaced, as --config.a.b=v does:
    a field the config does not have is a ConfigError naming it."""
    # deepcopy, not copy_and_resolve_references: that would fix kd.alpha's type to
    # float, and "auto" could no longer be set (its field is object-typed).
    c = copy.deepcopy(config)
    with c.unlocked():
        for key, v in fields.items():
            *path, last = key.split(".")
            node = c
            for p in path:
                if p not in node:
                    raise ConfigError(key, v, "a field of the base run config")
                node = node[p]
            if last not in node:
                raise ConfigError(key, v, "a field of the base run config")
            try:
                node[last] = v
            except TypeError:
                raise ConfigError(key, v, f"a value of the field's type "
                                  f"({type(node[last]).__name__})") from None
    c.lock()
    return c


# ----------------------------------------------------------------------------- grid
def _short(field: str) -> str:
    return {"prune.method": "method", "prune.keep_fraction": "keep", "kd.alpha": "alpha",
            "data.label_noise": "noise"}.get(field, field.replace(".", "_"))


def _fmt(v) -> str:
    return repr(v) if isinstance(v, str) and v == "" else str(v)


@dataclasses.dataclass(frozen=True)
class Cell:
    id: str
    values: tuple  # ((field, value), ...) in axis order; includes "teacher" and "seed"
    grids: tuple

    @property
    def fields(self) -> dict:
        return dict(self.values)


def expand(study) -> list[Cell]:
    """The grid's cells, deduplicated, in a stable order (grid order, then axis product)."""
    default_teacher = next(iter(study.teachers.keys()))
    order = ["teacher", "prune.method", "prune.keep_fraction", "kd.alpha", "seed"]
    cells: dict[str, Cell] = {}
    for grid in study.grids:
        axes = [(f, tuple(vs)) for f, vs in grid.axes]
        fields = [f for f, _ in axes]
        for combo in itertools.product(*[vs for _, vs in axes]):
            values = dict(zip(fields, combo))
            values.setdefault("teacher", default_teacher)
            values.setdefault("seed", 0)
            if values["teacher"] not in study.teachers:
                raise ConfigError(f"grids.{grid.name}.teacher", values["teacher"],
                                  ", ".join(study.teachers.keys()))
            keys = sorted(values, key=lambda f: (order.index(f) if f in order else len(order),
                                                 f))
            ordered = tuple((k, values[k]) for k in keys)
            cid = ",".join(f"{_short(k)}={_fmt(v)}" for k, v in ordered)
            if cid in cells:
                cells[cid] = dataclasses.replace(cells[cid],
                                                 grids=cells[cid].grids + (grid.name,))
            else:
                cells[cid] = Cell(cid, ordered, (grid.name,))
    return list(cells.values())


def select(cells: list[Cell], ids: str = "", shard: str = "") -> list[Cell]:
    """--cells=ID,ID (exact ids) and/or --shard=i/n (every n-th cell from the i-th)."""
    out = cells
    if ids:
        want = [x for x in ids.split("|") if x]
        known = {c.id for c in cells}
        bad = [x for x in want if x not in known]
        if bad:
            raise ConfigError("--cells", bad[0], "cell ids listed by `status` (separated by |)")
        out = [c for c in out if c.id in want]
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            raise ConfigError("--shard", shard, "i/n with 0 <= i < n") from None
        out = [c for k, c in enumerate(out) if k % n == i]
    return out


# ----------------------------------------------------------------------------- units
@dataclasses.dataclass
class Unit:
    kind: str  # teacher | scores | features | cell
    name: str
    workdir: str
    config: object
    done_file: str
    deps: tuple = ()
    cell: Cell | None = None
    key: dict | None = None  # shared units: what their artifact depends on (see _shared)

    def done(self) -> bool:
        return os.path.exists(self.done_file)


class Plan:
    """Every unit of a study under one root, built from the study config alone."""

    def __init__(self, study, root: str):
        self.study, self.root = study, os.path.abspath(root)
        self.base = base_config(study)
        self.cells = expand(study)
        self.units: dict[str, Unit] = {}
        for t in study.teachers.keys():
            wd = os.path.join(self.root, "teachers", t)
            self._add(Unit("teacher", f"teacher/{t}", wd, self.teacher_config(t),
                           os.path.join(wd, "teacher_eval.json")))

    def _add(self, u: Unit) -> Unit:
        self.units.setdefault(u.name, u)
        return self.units[u.name]

    def _shared(self, kind: str, name: str, config, key: dict, done_rel: str, deps) -> Unit:
        """The shared unit `name` for cells whose `key` (the config fields its artifact
        depends on) agrees. A cell whose key differs from the unit already under that name
        (e.g. another label noise or proxy recipe) gets its own unit, named with its key's
        hash: sharing by name alone would hand it an artifact made for other data. Grids
        expand in a fixed order, so the first cell's unit keeps the plain name."""
        u = self.units.get(name)
        if u is not None and u.key != key:
            blob = json.dumps(key, sort_keys=True, default=str).encode()
            name = f"{name}-{hashlib.sha256(blob).hexdigest()[:8]}"
        wd = os.path.join(self.root, *name.split("/"))
        return self._add(Unit(kind, name, wd, config, os.path.join(wd, done_rel), deps=deps,
                              key=key))

    def teacher_config(self, t: str):
        over = {k: v for k, v in dict(self.study.teachers[t]).items()}
        return apply_overrides(self.base, {**over, "teacher.init": ""})

    def teacher_dir(self, t: str) -> str:
        return os.path.join(self.root, "teachers", t, "teacher")

    def cell_config(self, cell: Cell):
        f = cell.fields
        t, seed = f["teacher"], f["seed"]
        over = {k: v for k, v in dict(self.study.teachers[t]).items()
                if not k.startswith("teacher.optim.")}
        over.update({k: v for k, v in f.items() if k not in ("teacher", "seed")})
        over.update({"seed": seed, "prune.seed": seed, "teacher.init": self.teacher_dir(t)})
        return apply_overrides(self.base, over)

    def cell_units(self, cell: Cell) -> Unit:
        """The cell's unit and the shared units it needs (created on first use)."""
        name = f"cell/{cell.id}"
        if name in self.units:
            return self.units[name]
        f = cell.fields
        t, seed = f["teacher"], f["seed"]
        config = self.cell_config(cell)
        deps = [f"teacher/{t}"]
        method = config.prune.method
        extra = {}
        # The teacher is needed by every cell that distills or whose method reads it; the
        # pipeline decides, the runner only makes sure the shared teacher exists first.
        from kdprune_jax import methods  # the score key (imports jax: not at module load)

        data_key = {"teacher": t, "data": config.data.to_dict()}
        if method not in SCORE_METHODS_WITHOUT_FILE:
            score_cfg = apply_overrides(config, {"prune.keep_fraction": 1.0})
            u = self._shared("scores", f"scores/{t}/{method}-s{seed}", score_cfg,
                             {**data_key, "score": methods.score_params(score_cfg)},
                             os.path.join("scores", f"{method}.npz"), (f"teacher/{t}",))
            deps.append(u.name)
            extra["prune.scores_file"] = u.done_file
        elif method == "ifbeta":
            u = self._shared("features", f"features/{t}",
                             apply_overrides(config, {"ifbeta.features_dir": ""}),
                             {**data_key, "feature_dtype": config.ifbeta.feature_dtype},
                             os.path.join("features", "meta.json"), (f"teacher/{t}",))
            deps.append(u.name)
            extra["ifbeta.features_dir"] = os.path.dirname(u.done_file)
        if extra:
            config = apply_overrides(config, extra)
        wd = os.path.join(self.root, "cells", cell.id)
        return self._add(Unit("cell", name, wd, config, os.path.join(wd, "cell.json"),
                              deps=tuple(deps), cell=cell))

    def ordered(self, cells: list[Cell]) -> list[Unit]:
        """Units needed by `cells`: teachers first, then shared units, then the cells."""
        cu = [self.cell_units(c) for c in cells]
        need = {d for u in cu for d in u.deps}
        rank = {"teacher": 0, "scores": 1, "features": 1}
        shared = sorted((self.units[n] for n in need), key=lambda u: (rank[u.kind], u.name))
        return shared + cu


# ----------------------------------------------------------------------------- running
def _log(msg: str) -> None:
    print(msg, flush=True)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT_DIR, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT_DIR, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _run_unit(u: Unit) -> None:
    """Compute one unit with the pipeline's own stages (same code path as main)."""
    from kdprune_jax import config_checks, context, pipeline
    from kdprune_jax.stages import features, teacher

    if u.kind == "cell":
        pipeline.run(u.config, u.workdir)
        return
    config_checks.validate(u.config)
    run = context.Run.create(u.config, u.workdir)  # logs from process 0
    model, _ = teacher.compute(run)
    if u.kind == "scores":
        pipeline.compute_scores(run, model)
    elif u.kind == "features":
        features.compute(run, model)


def _record_claim(root: str, unit: Unit, worker: str) -> None:
    line = json.dumps({"unit": unit.name, "worker": worker, "pid": os.getpid(),
                       "host": socket.gethostname(), "time": round(time.time(), 3)})
    with open(os.path.join(root, "claims.log"), "a") as f:
        f.write(line + "\n")


def _attempts_file(u: Unit) -> str:
    return os.path.join(u.workdir, "attempts.jsonl")


def run_study(plan: Plan, cells: list[Cell], worker: str, poll_seconds: float = 10.0,
              max_wait_seconds: float = 7 * 24 * 3600) -> int:
    """Run every unit the selected cells need, skipping done and claimed ones. Returns the
    number of units this worker ran."""
    units = plan.ordered(cells)
    os.makedirs(plan.root, exist_ok=True)
    ran, t_wait = 0, None
    while True:
        left = [u for u in units if not u.done()]
        if not left:
            break
        progressed = False
        for u in left:
            if preemption.requested():
                raise StudyStopped(f"{preemption.signal_name()} between units")
            if not all(plan.units[d].done() for d in u.deps):
                continue
            holder = workdir_lock.try_acquire(u.workdir, log=_log)
            if holder is not None:
                continue
            try:
                if u.done():  # finished by another worker between our two looks
                    continue
                _record_claim(plan.root, u, worker)
                i = units.index(u) + 1
                _log(f"[study] {u.name}: start ({i}/{len(units)}, worker {worker})")
                load0, t0 = os.getloadavg(), time.perf_counter()
                try:
                    _run_unit(u)
                finally:
                    wall = time.perf_counter() - t0
                    with open(_attempts_file(u), "a") as f:
                        f.write(json.dumps({"worker": worker, "pid": os.getpid(),
                                            "wall_seconds": round(wall, 3),
                                            "loadavg": [round(x, 2) for x in os.getloadavg()],
                                            "loadavg_at_start": [round(x, 2) for x in load0],
                                            "finished": u.done(),
                                            "commit": _git_commit()}) + "\n")
                if u.kind == "cell":
                    _write_cell_record(u)
                _log(f"[study] {u.name}: done in {wall:.1f} s")
                ran += 1
                progressed = True
            finally:
                workdir_lock.release(u.workdir)
            break  # rescan from the top: a unit's dependants may be runnable now
        if not progressed:
            t_wait = t_wait or time.perf_counter()
            if time.perf_counter() - t_wait > max_wait_seconds:
                raise UserError(f"study: waited {max_wait_seconds:.0f} s for units claimed "
                                f"by other workers: {[u.name for u in left][:5]}")
            time.sleep(poll_seconds)
        else:
            t_wait = None
    return ran


def _write_cell_record(u: Unit) -> None:
    from kdprune_jax import artifacts

    attempts = _read_attempts(u)
    artifacts.write_json(u.done_file, {
        "id": u.cell.id, "fields": {k: v for k, v in u.cell.values}, "grids": list(u.cell.grids),
        "wall_seconds": round(sum(a["wall_seconds"] for a in attempts), 3),
        "attempts": len(attempts),
        "loadavg": [a["loadavg"] for a in attempts],
        "commits": sorted({a["commit"] for a in attempts}),
    })


def _read_attempts(u: Unit) -> list[dict]:
    try:
        with open(_attempts_file(u)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


# ----------------------------------------------------------------------------- status
def unit_state(u: Unit) -> str:
    if u.done():
        return "done"
    holder = workdir_lock.read_holder(u.workdir) if os.path.isdir(u.workdir) else None
    if holder is not None and workdir_lock.stale_reason(holder) is None:
        return "running"
    return "left"


def status(plan: Plan, cells: list[Cell]) -> str:
    units = plan.ordered(cells)
    states = {u.name: unit_state(u) for u in units}
    walls = [sum(a["wall_seconds"] for a in _read_attempts(u)) for u in units
             if states[u.name] == "done"]
    n = {s: sum(1 for v in states.values() if v == s) for s in ("done", "running", "left")}
    lines = [f"{states[u.name]:8s} {u.name}" for u in units]
    spent = sum(walls)
    eta = ""
    if walls and (n["left"] or n["running"]):
        eta = (f"; ETA ~{(n['left'] + n['running']) * spent / len(walls) / 3600:.1f} h of one "
               "worker at the mean unit time so far")
    lines.append(f"{n['done']} done, {n['running']} running, {n['left']} left of {len(units)}"
                 f" units; {spent / 3600:.2f} machine-hours spent{eta}")
    return "\n".join(lines)


def dry_run(plan: Plan, cells: list[Cell]) -> str:
    """The units with an estimated cost: training images x epochs at the study's measured
    throughput (`study.throughput`, images/s per model pair, from benchmarks/kd_step.py)."""
    from kdprune_jax import config_checks

    lines, total = [], 0.0
    for u in plan.ordered(cells):
        c = u.config
        # Every cell's config is checked now, before any work (the shared teacher it will
        # import does not exist yet: checked as if it were trained here).
        config_checks.validate(apply_overrides(c, {"teacher.init": "", "prune.scores_file": "",
                                                   "ifbeta.features_dir": ""}))
        tp = dict(plan.study.throughput)
        pool = plan.study.pool_size
        if u.kind == "teacher":
            imgs = pool * c.teacher.optim.num_epochs
            rate = tp.get(f"train:{c.teacher.model}", 0)
        elif u.kind == "scores":
            imgs = pool * c.proxy.num_models * c.proxy.num_epochs if c.prune.method in (
                "el2n", "grand", "forgetting") else 0
            rate = tp.get(f"train:{c.proxy.model}", 0) if "model" in c.proxy else 0
            rate = rate or tp.get(f"train:{c.student.model}", 0)
        elif u.kind == "features":
            imgs, rate = 0, 1
        else:
            kept = pool if c.student.equal_steps else pool * c.prune.keep_fraction
            imgs = kept * c.student.optim.num_epochs
            key = (f"kd:{c.teacher.model}>{c.student.model}" if c.kd.alpha > 0
                   else f"train:{c.student.model}")
            rate = tp.get(key, 0)
        est = imgs / rate if rate else float("nan")
        total += 0 if est != est else est
        lines.append(f"{u.name:60s} ~{est / 60:7.1f} min" if rate else
                     f"{u.name:60s}    (no throughput for it)")
    lines.append(f"{len(lines)} units, ~{total / 3600:.1f} machine-hours at the listed "
                 "throughputs (pass/compile overheads not included)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report
def _get(d, path, default=None):
    for p in path.split("."):
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def cell_row(plan: Plan, u: Unit) -> dict:
    with open(os.path.join(u.workdir, "results.json")) as f:
        r = json.load(f)
    with open(u.done_file) as f:
        rec = json.load(f)
    shared = 0.0
    for d in u.deps:
        if plan.units[d].kind == "features":
            shared += sum(a["wall_seconds"] for a in _read_attempts(plan.units[d]))
    pc = r.get("pruning_cost") or {}
    timings = r.get("timings") or {}
    row = {"cell": u.cell.id, **{k: v for k, v in u.cell.values}}
    student_s = float(r["student"]["train_seconds"])
    row.update({
        "test_accuracy": r["student"]["test"]["accuracy"],
        "val_accuracy": _get(r, "student.val.accuracy", ""),
        "teacher_test_accuracy": _get(r, "teacher.accuracy", ""),
        "proxy_seconds": pc.get("proxy_seconds", 0.0),
        "scoring_seconds": pc.get("scoring_seconds", 0.0),
        "features_seconds": round(shared, 3),
        "policy_seconds": pc.get("policy_seconds", 0.0),
        "student_seconds": student_s,
        "total_seconds": round(student_s + pc.get("proxy_seconds", 0.0)
                               + pc.get("scoring_seconds", 0.0) + shared
                               + pc.get("policy_seconds", 0.0)
                               + timings.get("teacher_views_seconds", 0.0), 3),
        "student_steps": r["student"]["steps"],
        "num_kept": r["subset"]["num_kept"],
        "policy_a": _get(r, "policy.a", ""), "policy_b": _get(r, "policy.b", ""),
        "wall_seconds": rec["wall_seconds"],
    })
    return row


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _mean_std(xs):
    import numpy as np

    xs = np.asarray(xs, float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def _tables(plan: Plan, rows: list[dict]) -> str:
    """Markdown: per grid, mean +- std test accuracy over seeds (rows: every varied field
    but keep fraction and seed; columns: keep fraction), then paired differences against
    random with the same (keep fraction, alpha, teacher, seed)."""
    out = []
    by_id = {r["cell"]: r for r in rows}
    seen = set()
    for grid in plan.study.grids:
        if grid.name in seen:  # several grid entries may share a table (one name)
            continue
        seen.add(grid.name)
        grows = [r for r in rows if grid.name in plan.units[f"cell/{r['cell']}"].cell.grids]
        if not grows:
            continue
        axes = []
        for g in plan.study.grids:
            if g.name == grid.name:
                axes += [f for f, _ in g.axes if f not in ("seed", "prune.keep_fraction")
                         and f not in axes]
        keeps = sorted({r["prune.keep_fraction"] for r in grows
                        if "prune.keep_fraction" in r})
        out.append(f"### {grid.name}: {grid.get('title', '')}\n")
        out.append("test accuracy, mean ± std over seeds (n); "
                   "Δ = paired difference to random at the same kept fraction, KD weight "
                   "and seed, mean ± std\n")
        head = " | ".join([*axes, *[f"keep {k}" for k in keeps]])
        out.append(f"| {head} |")
        out.append("|" + "---|" * (len(axes) + len(keeps)))
        groups = {}
        for r in grows:
            groups.setdefault(tuple(r.get(a) for a in axes), []).append(r)
        for key in sorted(groups, key=lambda k: [str(x) for x in k]):
            cells = []
            for k in keeps:
                rs = [r for r in groups[key] if r.get("prune.keep_fraction") == k]
                if not rs:
                    cells.append("")
                    continue
                m, s = _mean_std([r["test_accuracy"] for r in rs])
                txt = f"{m:.4f} ± {s:.4f} ({len(rs)})"
                diffs = []
                for r in rs:
                    if r.get("prune.method") in (None, "random"):
                        continue
                    ref = plan.units[f"cell/{r['cell']}"].cell.fields
                    match = [o for o in by_id.values() if o.get("prune.method") == "random"
                             and all(o.get(f) == v for f, v in ref.items()
                                     if f != "prune.method")]
                    if match:
                        diffs.append(r["test_accuracy"] - match[0]["test_accuracy"])
                if diffs:
                    dm, ds = _mean_std(diffs)
                    txt += f"; Δ {dm:+.4f} ± {ds:.4f}"
                cells.append(txt)
            out.append("| " + " | ".join([*(_fmt(x) for x in key), *cells]) + " |")
        out.append("")
    return "\n".join(out)


def _plots(plan: Plan, rows: list[dict], out_dir: str) -> list[str]:
    """PNG: test accuracy vs kept fraction per method, one panel per KD weight; accuracy vs
    total compute. Written with fixed metadata so reruns are byte-identical."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    alphas = sorted({r.get("kd.alpha") for r in rows if "kd.alpha" in r})
    methods = sorted({r.get("prune.method") for r in rows if "prune.method" in r})
    if alphas and methods:
        fig, axs = plt.subplots(1, len(alphas), figsize=(4.5 * len(alphas), 3.6),
                                squeeze=False, sharey=True)
        for ax, alpha in zip(axs[0], alphas):
            for m in methods:
                pts = {}
                for r in rows:
                    if r.get("kd.alpha") == alpha and r.get("prune.method") == m:
                        pts.setdefault(r["prune.keep_fraction"], []).append(r["test_accuracy"])
                if not pts:
                    continue
                ks = sorted(pts)
                ms = [_mean_std(pts[k]) for k in ks]
                ax.errorbar(ks, [x for x, _ in ms], yerr=[s for _, s in ms], marker="o",
                            capsize=3, label=m)
            ax.set_title(f"KD weight {alpha}")
            ax.set_xlabel("kept fraction")
            ax.grid(alpha=0.3)
        axs[0][0].set_ylabel("student test accuracy")
        axs[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "accuracy_vs_keep.png")
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m in methods or [None]:
        rs = [r for r in rows if r.get("prune.method") == m]
        ax.scatter([r["total_seconds"] / 3600 for r in rs], [r["test_accuracy"] for r in rs],
                   label=m, s=14)
    ax.set_xlabel("pruning + student compute (h)")
    ax.set_ylabel("student test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy_vs_compute.png")
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    written.append(path)
    return written


def _provenance(plan: Plan, units: list[Unit]) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    commits = sorted({a["commit"] for u in units for a in _read_attempts(u)})
    hours = sum(a["wall_seconds"] for u in plan.units.values() for a in _read_attempts(u)
                if u.done()) / 3600
    return {"study": plan.study.name, "study_config": plan.study.get("source", ""),
            "base": plan.study.base, "commits": commits, "versions": versions,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "machine_hours": round(hours, 3),
            "commands": [f"python -m kdprune_jax.study run --config={plan.study.get('source')} "
                         "--root=ROOT", f"python -m kdprune_jax.study report "
                         f"--config={plan.study.get('source')} --root=ROOT"]}


def report(plan: Plan, out_dir: str, check: bool = False, readme: str = "") -> int:
    """Write (or with check=True, verify) results/<study>/ from the finished cells only."""
    cells = [plan.cell_units(c) for c in plan.cells]
    done = [u for u in cells if u.done()]
    rows = [cell_row(plan, u) for u in done]
    axis_fields = []
    for u in cells:
        for f, _ in u.cell.values:
            if f not in axis_fields:
                axis_fields.append(f)
    fields = ["cell", *axis_fields, *CELLS_CSV_FIELDS]
    text = _csv_text(rows, fields)
    path = os.path.join(out_dir, "cells.csv")
    if check:
        try:
            with open(path) as f:
                old = list(csv.DictReader(f))
        except FileNotFoundError:
            print(f"report --check: {path} does not exist; run report first", file=sys.stderr)
            return 1
        new = {r["cell"]: r for r in csv.DictReader(io.StringIO(text))}
        bad = [r["cell"] for r in old if new.get(r["cell"]) != r]
        bad += [c for c in new if c not in {r["cell"] for r in old}]
        if bad:
            print(f"report --check: cells whose results.json no longer match {path}: "
                  f"{', '.join(bad)}", file=sys.stderr)
            return 1
        print(f"report --check: {len(old)} cells match {path}")
        return 0
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    md = [f"# Study {plan.study.name}\n",
          f"{len(done)} of {len(cells)} cells finished; generated by "
          f"`python -m kdprune_jax.study report --config={plan.study.get('source')} "
          "--root=ROOT`; no number here is typed by hand.\n",
          _tables(plan, rows)]
    with open(os.path.join(out_dir, "tables.md"), "w") as f:
        f.write("\n".join(md))
    if rows:
        _plots(plan, rows, out_dir)
    with open(os.path.join(out_dir, "provenance.json"), "w") as f:
        json.dump(_provenance(plan, done), f, indent=1, sort_keys=True)
        f.write("\n")
    rule = alpha_rule(plan, done, rows)
    if rule is not None:
        with open(os.path.join(out_dir, "kd_alpha_rule.json"), "w") as f:
            json.dump(rule, f, indent=1, sort_keys=True)
            f.write("\n")
    command = (f"python -m kdprune_jax.study report --config={plan.study.get('source')} "
               "--root=ROOT")
    vrows = [{**r, "grids": u.cell.grids} for u, r in zip(done, rows)]
    verdict_md = verdicts.markdown(verdicts.all_verdicts(vrows, rule), n_done=len(done),
                                   n_cells=len(cells), command=command)
    verdict_md += "\n## Cost (Table 3)\n\n" + verdicts.cost_table(vrows)
    with open(os.path.join(out_dir, "verdicts.md"), "w") as f:
        f.write(verdict_md)
    if readme:
        _update_readme(readme, plan.study.name, out_dir, verdict_md)
    print(f"report: {len(done)}/{len(cells)} cells -> {out_dir}")
    return 0


def _update_readme(readme: str, study: str, out_dir: str, verdict_md: str) -> None:
    """Replace the README's block between ``<!-- results:<study> -->`` and
    ``<!-- /results:<study> -->`` with the verdicts and the link to the tables (the README's
    Results numbers come from here, never typed by hand). A README without the markers is
    left alone."""
    start, end = f"<!-- results:{study} -->", f"<!-- /results:{study} -->"
    with open(readme) as f:
        text = f.read()
    if start not in text or end not in text:
        return
    rel = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(readme)))
    body = verdict_md.replace("# Verdicts\n", "", 1).replace("## Cost (Table 3)", "Cost (Table 3):")
    block = (f"{start}\n<!-- generated by study report: do not edit by hand -->\n"
             f"Tables and plots: `{rel}/tables.md`, `{rel}/*.png`; per cell: "
             f"`{rel}/cells.csv`.\n\n{body.strip()}\n{end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(head + block + tail)


def alpha_rule(plan: Plan, done: list[Unit], rows: list[dict]) -> dict | None:
    """The `kd.alpha="auto"` rule (`kd_alpha.fit_rule`) from the finished cells of the grid
    the study names in `alpha_rule_grid` (a KD-weight x kept-fraction sweep), fitted on the
    cells' VALIDATION accuracy; None when the study names none or no kept fraction has two
    finished weights yet. Deterministic: the same cells give the same bytes."""
    grid = plan.study.get("alpha_rule_grid", "")
    if not grid:
        return None
    sweep, cells, commits = [], [], set()
    for u, r in zip(done, rows):
        if grid not in u.cell.grids or r.get("val_accuracy") in ("", None):
            continue
        f = u.cell.fields
        sweep.append({"keep_fraction": f["prune.keep_fraction"], "alpha": f["kd.alpha"],
                      "val_accuracy": r["val_accuracy"]})
        cells.append(u.cell.id)
        with open(u.done_file) as fh:
            commits.update(json.load(fh).get("commits", []))
    per_keep: dict[float, set] = {}
    for r in sweep:
        per_keep.setdefault(r["keep_fraction"], set()).add(r["alpha"])
    if not any(len(a) >= 2 for a in per_keep.values()):
        return None
    # Only kept fractions with a real choice enter the rule.
    sweep = [r for r in sweep if len(per_keep[r["keep_fraction"]]) >= 2]
    return kd_alpha.fit_rule(sweep, source={
        "study": plan.study.name, "grid": grid, "cells": sorted(cells),
        "commits": sorted(c for c in commits if c),
        "command": f"python -m kdprune_jax.study report --config={plan.study.get('source')} "
                   "--root=ROOT"})


def digest(out_dir: str) -> str:
    """sha256 over every file the report wrote (tests compare two reports with it)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------- CLI
def _compilation_cache() -> None:
    """The persistent XLA cache main.py uses: cells of one study compile the same train
    and eval programs, so every cell after the first (and every restarted worker) loads
    them instead of compiling."""
    import jax

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or "/tmp/kdprune_jax_xla_cache"
    if cache != "none":
        jax.config.update("jax_compilation_cache_dir", cache)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kdprune_jax.study")
    ap.add_argument("command", choices=["run", "status", "report"])
    ap.add_argument("--config", required=True, help="configs/study/<name>.py[:arg]")
    ap.add_argument("--root", required=True, help="directory holding the study's units")
    ap.add_argument("--cells", default="", help="cell ids to run, separated by |")
    ap.add_argument("--shard", default="", help="i/n: every n-th selected cell from the i-th")
    ap.add_argument("--worker", default="", help="name in claims.log (default host:pid)")
    ap.add_argument("--dry_run", action="store_true", help="list units with estimated cost")
    ap.add_argument("--out", default="", help="report directory (default results/<name>)")
    ap.add_argument("--check", action="store_true", help="report: verify cells.csv only")
    ap.add_argument("--readme", default="README.md",
                    help="report: update this README's <!-- results:<name> --> block ('' = no)")
    ap.add_argument("--poll_seconds", type=float, default=10.0)
    a = ap.parse_args(argv)
    try:
        study = load_study(a.config)
        with study.unlocked():
            study.source = a.config
        plan = Plan(study, a.root)
        cells = select(plan.cells, a.cells, a.shard)
        if a.command == "status":
            print(status(plan, cells))
            return 0
        if a.command == "report":
            out = a.out or os.path.join(ROOT_DIR, "results", study.name)
            return report(plan, out, check=a.check,
                          readme=a.readme if os.path.exists(a.readme or "") else "")
        if a.dry_run:
            print(dry_run(plan, cells))
            return 0
        worker = a.worker or f"{socket.gethostname()}:{os.getpid()}"
        _compilation_cache()
        # The run's own graceful stop: a training loop saves its step and raises Preempted,
        # a pass stops at its next batch, and between units the worker stops here.
        preemption.install()
        n = run_study(plan, cells, worker, poll_seconds=a.poll_seconds)
        print(f"[study] worker {worker}: ran {n} units; nothing left for it")
        return 0
    except (StudyStopped, preemption.Preempted) as e:
        print(f"[study] stopped: {e}; rerun to continue (finished units are kept, the one in "
              f"flight resumes from its checkpoints): python -m kdprune_jax.study run "
              f"--config={a.config} --root={a.root}", file=sys.stderr, flush=True)
        return preemption.EXIT_STATUS
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
