"""The study runner (kdprune_jax.study) on the smoke grid (configs/study/smoke.py: a tiny
teacher, random and el2n x 2 seeds on the embedded digits), through its command line:
kill inside a cell + restart == uninterrupted, two workers share one root without running a
unit twice, the report is byte-identical on rerun and `report --check` catches an edit."""

import json
import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from kdprune_jax import study
from tests.test_multiprocess import _flat, _student_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/study/smoke.py"


def _cli(*args, env=None, wait=True):
    cmd = [sys.executable, "-m", "kdprune_jax.study", *args]
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=900)


def _claims(root):
    with open(os.path.join(root, "claims.log")) as f:
        return [json.loads(line) for line in f]


def _plan(root):
    s = study.load_study(os.path.join(ROOT, CONFIG))
    with s.unlocked():
        s.source = CONFIG
    return study.Plan(s, root)


def test_grid_expands_dedups_and_selects():
    plan = _plan("/nonexistent")
    ids = [c.id for c in plan.cells]
    assert ids == [f"teacher=tiny,method={m},keep=0.5,alpha=0.9,seed={s}"
                   for m in ("random", "el2n") for s in (0, 1)]
    assert [c.id for c in study.select(plan.cells, shard="1/2")] == ids[1::2]
    assert [c.id for c in study.select(plan.cells, ids=f"{ids[2]}|{ids[0]}")] == [ids[0],
                                                                                  ids[2]]
    units = plan.ordered(plan.cells)
    # One teacher, one score file per (method, seed), then the cells.
    assert [u.name for u in units[:3]] == ["teacher/tiny", "scores/tiny/el2n-s0",
                                           "scores/tiny/el2n-s1"]
    cfg = plan.units[f"cell/{ids[3]}"].config
    assert cfg.seed == cfg.prune.seed == 1 and cfg.kd.alpha == 0.9
    assert cfg.teacher.init == plan.teacher_dir("tiny")
    assert cfg.prune.scores_file.endswith("scores/tiny/el2n-s1/scores/el2n.npz")
    with pytest.raises(study.ConfigError, match="--shard"):
        study.select(plan.cells, shard="2/2")
    with pytest.raises(study.ConfigError, match="--cells"):
        study.select(plan.cells, ids="nope")


def test_shared_units_are_shared_only_where_their_key_agrees():
    """Cells that differ in a field the scores or features depend on (label noise, the
    proxies' recipe) get their own unit; cells that differ only downstream (keep, KD
    weight) share one. Sharing by (teacher, method, seed) alone would hand a noisy cell the
    clean data's scores."""
    s = study.load_study(os.path.join(ROOT, CONFIG))
    with s.unlocked():
        s.source = CONFIG
        s.grids = [ml_collections.ConfigDict(dict(
            name="noise", title="label noise",
            axes=(("prune.method", ("el2n", "ifbeta")), ("data.label_noise", (0.0, 0.2)),
                  ("kd.alpha", (0.5, 0.9)), ("proxy.num_epochs", (1, 2)), ("seed", (0,)))))]
    plan = study.Plan(s, "/nonexistent")
    units = {u.name: u for u in plan.ordered(plan.cells)}
    scores = sorted(n for n, u in units.items() if u.kind == "scores")
    features = sorted(n for n, u in units.items() if u.kind == "features")
    assert len(scores) == 4 and len(features) == 2  # (noise x proxy epochs), (noise)
    assert "scores/tiny/el2n-s0" in scores and "features/tiny" in features
    for c in plan.cells:
        cfg = plan.units[f"cell/{c.id}"].config
        dep = cfg.prune.scores_file or cfg.ifbeta.features_dir
        shared = next(u for u in units.values() if u.kind != "cell" and u.kind != "teacher"
                      and dep.startswith(u.workdir + os.sep))
        assert shared.config.data.label_noise == cfg.data.label_noise
        if shared.kind == "scores":
            assert shared.config.proxy.num_epochs == cfg.proxy.num_epochs
    assert len({u.workdir for u in units.values()}) == len(units)


@pytest.mark.slow
def test_killed_cell_resumes_finished_cells_are_not_rerun_and_report_matches(tmp_path):
    root = str(tmp_path / "root")
    plan = _plan(root)
    first, second = plan.cells[0].id, plan.cells[1].id
    # 1. Two cells finish.
    p = _cli("run", f"--config={CONFIG}", f"--root={root}", f"--cells={first}|{second}",
             "--poll_seconds=0.2")
    assert p.returncode == 0, p.stderr[-3000:]
    done_mtimes = {c: os.path.getmtime(os.path.join(root, "cells", c, "results.json"))
                   for c in (first, second)}
    # 2. The whole grid, SIGKILLed at step 13 of the first student it trains: the third cell.
    killed = _cli("run", f"--config={CONFIG}", f"--root={root}", "--poll_seconds=0.2",
                  env={"KDPRUNE_KILL_AT": "student:13"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    third = plan.cells[2].id
    assert f"[study] cell/{third}: start" in killed.stdout
    assert not os.path.exists(os.path.join(root, "cells", third, "results.json"))
    # 3. Restart: the killed cell resumes from its checkpoint, the finished ones are skipped.
    again = _cli("run", f"--config={CONFIG}", f"--root={root}", "--poll_seconds=0.2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[student] resumed from step 10/21" in again.stdout, again.stdout[-3000:]
    starts = [c["unit"] for c in _claims(root)]
    for c in (first, second):
        assert starts.count(f"cell/{c}") == 1
        assert os.path.getmtime(os.path.join(root, "cells", c, "results.json")) == \
            done_mtimes[c]
    assert starts.count(f"cell/{third}") == 2  # killed once, resumed once
    assert starts.count("teacher/tiny") == 1
    st = _cli("status", f"--config={CONFIG}", f"--root={root}")
    assert "7 done, 0 running, 0 left of 7 units" in st.stdout, st.stdout

    # The resumed cell equals the same cell run uninterrupted (bitwise on CPU).
    from kdprune_jax import pipeline

    ref_dir = str(tmp_path / "ref")
    ref = pipeline.run(plan.cell_units(plan.cells[2]).config, ref_dir)
    with open(os.path.join(root, "cells", third, "results.json")) as f:
        got = json.load(f)
    assert got["student"]["test"] == ref["student"]["test"]
    assert got["student"]["val"] == ref["student"]["val"]
    step_a, pa = _student_params(os.path.join(root, "cells", third))
    step_b, pb = _student_params(ref_dir)
    assert step_a == step_b == 21
    fa, fb = _flat(pa), _flat(pb)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)

    # The report's numbers are the cells' results.json; twice gives the same bytes.
    out = str(tmp_path / "report")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:smoke -->\nold\n<!-- /results:smoke -->\ntail\n")
    r1 = _cli("report", f"--config={CONFIG}", f"--root={root}", f"--out={out}",
              f"--readme={readme}")
    assert r1.returncode == 0, r1.stderr[-3000:]
    d1, t1 = study.digest(out), readme.read_text()
    r2 = _cli("report", f"--config={CONFIG}", f"--root={root}", f"--out={out}",
              f"--readme={readme}")
    assert r2.returncode == 0 and study.digest(out) == d1 and readme.read_text() == t1
    # The README block is the generated verdicts, between its markers, the rest untouched.
    assert "old" not in t1 and t1.startswith("# x\n") and t1.endswith("tail\n")
    verdicts_md = open(os.path.join(out, "verdicts.md")).read()
    assert "| A1 |" in verdicts_md and "| A1 |" in t1 and "| A3 | not tested |" in t1
    import csv

    with open(os.path.join(out, "cells.csv")) as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert len(rows) == 4
    for c in plan.cells:
        with open(os.path.join(root, "cells", c.id, "results.json")) as f:
            res = json.load(f)
        assert float(rows[c.id]["test_accuracy"]) == pytest.approx(
            res["student"]["test"]["accuracy"], rel=1e-5)
        assert int(rows[c.id]["student_steps"]) == res["student"]["steps"]
    with open(os.path.join(out, "provenance.json")) as f:
        prov = json.load(f)
    assert prov["machine_hours"] > 0 and prov["commits"]
    ok = _cli("report", f"--config={CONFIG}", f"--root={root}", f"--out={out}", "--check")
    assert ok.returncode == 0, ok.stderr
    # A cell edited on disk after the report is named by --check.
    path = os.path.join(root, "cells", second, "results.json")
    with open(path) as f:
        res = json.load(f)
    res["student"]["test"]["accuracy"] = 0.123
    with open(path, "w") as f:
        json.dump(res, f)
    bad = _cli("report", f"--config={CONFIG}", f"--root={root}", f"--out={out}", "--check")
    assert bad.returncode == 1 and second in bad.stderr, bad.stderr


@pytest.mark.slow
def test_two_workers_share_one_root_and_run_every_unit_once(tmp_path):
    root = str(tmp_path / "root")
    procs = [_cli("run", f"--config={CONFIG}", f"--root={root}", f"--worker=w{i}",
                  "--poll_seconds=0.2", wait=False) for i in range(2)]
    outs = []
    t0 = time.time()
    for p in procs:
        out, err = p.communicate(timeout=900)
        outs.append((p.returncode, out, err))
    assert all(rc == 0 for rc, _, _ in outs), [e[-2000:] for _, _, e in outs]
    claims = _claims(root)
    starts = [c["unit"] for c in claims]
    plan = _plan(root)
    units = [u.name for u in plan.ordered(plan.cells)]
    assert sorted(starts) == sorted(units), starts  # every unit started exactly once
    cells_by = {w: [c["unit"] for c in claims if c["worker"] == w and
                    c["unit"].startswith("cell/")] for w in ("w0", "w1")}
    assert all(cells_by.values()), cells_by  # both workers ran at least one cell
    assert len({c["pid"] for c in claims}) == 2
    assert time.time() - t0 < 900
