"""End to end: the quickstart, CIFAR-10 (real archive) and ImageNet (tfds mock) smoke configs,
artifact reuse, kill -9 + rerun == uninterrupted (bad input: tests/test_bad_inputs.py)."""

import copy
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdprune_jax import pipeline
from tests.helpers import cifar_archive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=""):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def override(config, **fields):
    """Copy of a locked config with dotted fields replaced (like --config.a.b=v)."""
    # deepcopy, not copy_and_resolve_references: that would fix kd.alpha's type to
    # float, and "auto" could no longer be set (its field is object-typed).
    c = copy.deepcopy(config)
    with c.unlocked():
        for key, v in fields.items():
            *path, last = key.split("__")
            node = c
            for p in path:
                node = node[p]
            node[last] = v
    return c


def snapshot(workdir):
    """{relative path: sha256} of every file under workdir (to prove nothing changed)."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, workdir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, quickstart_smoke_run):
    workdir = quickstart_smoke_run(str(tmp_path_factory.mktemp("quick")))
    config = load_config("quickstart.py", "smoke")
    results = pipeline.run(config, workdir)
    return config, workdir, results


def test_quickstart_smoke_end_to_end(quick_run):
    config, workdir, r = quick_run
    for name in ("teacher", "student", "subset.json", "results.json", "metrics.jsonl",
                 "teacher_eval.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    subset = json.load(open(os.path.join(workdir, "subset.json")))
    assert subset["num_kept"] == len(subset["indices"]) == r["subset"]["num_kept"]
    assert abs(subset["num_kept"] - 0.5 * subset["pool_size"]) <= 0.5
    assert r["student"]["test"]["count"] == 359  # every digits test image, exactly once
    assert r["teacher"]["accuracy"] > 0.15  # better than chance (0.1) after 1 epoch
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {x["stage"] for x in lines} == {"teacher", "student"}
    assert all(np.isfinite(x["loss"]) for x in lines)


def test_second_run_reuses_every_artifact(quick_run):
    config, workdir, first = quick_run
    before = snapshot(workdir)
    again = pipeline.run(config, workdir)
    assert again["fingerprint"] == first["fingerprint"]
    assert again["student"]["test"] == first["student"]["test"]
    after = snapshot(workdir)
    for name in ("subset.json", "results.json", "teacher_eval.json"):
        assert before[name] == after[name], f"{name} was rewritten"
    ckpts = {k for k in before if k.startswith(("teacher/", "student/"))}
    assert ckpts and all(before[k] == after.get(k) for k in ckpts)


def test_changed_keep_fraction_rebuilds_downstream_only(quick_run, tmp_path):
    config, workdir, first = quick_run
    import shutil

    wd = str(tmp_path / "w")
    shutil.copytree(workdir, wd)
    before = snapshot(wd)
    r = pipeline.run(override(config, prune__keep_fraction=0.3), wd)
    after = snapshot(wd)
    assert r["subset"]["num_kept"] == round(0.3 * first["subset"]["pool_size"])
    assert before["teacher_eval.json"] == after["teacher_eval.json"]  # teacher reused
    assert before["subset.json"] != after["subset.json"]
    assert any(d.startswith("student.stale-") for d in os.listdir(wd))  # old student kept


# Bad input (config, files, environment) and numerical faults: the table in
# tests/test_bad_inputs.py, in-process and through the command line.


def _student_params(workdir):
    """(step, param leaves) of the final student, restored onto one local device whatever
    device count saved it (the CLI runs here use 8, this process may have 1)."""
    import jax

    from tests.test_multiprocess import _student_params as restore

    step, params = restore(workdir)
    return step, jax.tree.leaves(params)


def _cli(workdir, *extra, env=None):
    cmd = [sys.executable, "-m", "kdprune_jax.main", "--config=configs/quickstart.py:smoke",
           f"--workdir={workdir}", "--config.student.optim.num_epochs=4", *extra]
    # The kill/resume pair runs on 8 devices, whatever this process has.
    from tests.multiprocess import cli_env

    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=cli_env(8, env))


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "uninterrupted", tmp_path / "killed"
    assert _cli(a).returncode == 0
    # Student: 684 kept, batch 64, 4 epochs -> 42 steps; the smoke config checkpoints every
    # 10 steps, so dying after step 13 loses 3 steps that the rerun must redo.
    killed = _cli(b, env={"KDPRUNE_KILL_AT": "student:13"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not os.path.exists(b / "results.json")
    resumed = _cli(b)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "classes; 8 devices" in resumed.stdout  # the kill/resume pair ran on 8 devices
    assert "resumed from step 10" in resumed.stdout
    step_a, pa = _student_params(a)
    step_b, pb = _student_params(b)
    assert step_a == step_b == 42
    for x, y in zip(pa, pb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    ra = json.load(open(a / "results.json"))
    rb = json.load(open(b / "results.json"))
    assert ra["student"]["test"] == rb["student"]["test"]


@pytest.mark.parametrize("cfg", ["cifar10_random_kd.py:smoke", "cifar10_kd.py:el2n,smoke",
                                 "cifar10_kd.py:influence,smoke"])
def test_cifar10_smoke_on_real_archive(tmp_path, cfg):
    name, arg = cfg.split(":")
    config = load_config(name, arg)
    with config.unlocked():
        config.data.path = cifar_archive()
    r = pipeline.run(config, str(tmp_path))
    assert r["student"]["test"]["count"] == 200  # 20 per class of the real test split
    assert r["subset"]["num_kept"] == round(0.5 * r["subset"]["pool_size"])
    assert r["subset"]["method"] == config.prune.method
    assert np.isfinite(r["student"]["test"]["loss"])
    if config.prune.method == "el2n":
        assert r["pruning_cost"]["proxy_seconds"] > 0  # K proxies trained, cost reported


def test_imagenet_smoke_on_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    config = load_config("imagenet_random_kd.py", "smoke")
    assert config.teacher.model == "resnet50" and config.student.model == "resnet18"
    with tfds.testing.mock_data(num_examples=96):
        r = pipeline.run(config, str(tmp_path))
    assert r["student"]["test"]["count"] == 96
    assert r["teacher"]["model"] == "resnet50"
    assert np.isfinite(r["student"]["test"]["loss"])


def test_teacher_init_imports_a_trained_teacher(quick_run, tmp_path):
    config, workdir, first = quick_run
    imported = override(config, teacher__init=os.path.join(workdir, "teacher"))
    r = pipeline.run(imported, str(tmp_path / "imp"))
    assert not os.path.exists(tmp_path / "imp" / "teacher")  # nothing retrained
    assert r["teacher"]["accuracy"] == first["teacher"]["accuracy"]
    assert r["teacher"]["loss"] == pytest.approx(first["teacher"]["loss"], rel=1e-6)
    # A checkpoint of another architecture is refused with the parameter that differs.
    wrong = override(imported, teacher__width=0.5)
    from kdprune_jax.errors import ArtifactError

    with pytest.raises(ArtifactError, match=r"does not fit teacher.model.*set teacher.model"):
        pipeline.run(wrong, str(tmp_path / "imp2"))


@pytest.mark.slow
def test_full_quickstart_command(tmp_path):
    """The README's quickstart command: real accuracies, then a rerun that reuses everything.
    (Wall time is reported in the README with the command; tests never assert on time.)"""
    cmd = [sys.executable, "-m", "kdprune_jax.main", "--config=configs/quickstart.py",
           f"--workdir={tmp_path}"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    r = json.load(open(tmp_path / "results.json"))
    assert r["teacher"]["accuracy"] > 0.95 and r["student"]["test"]["accuracy"] > 0.95
    assert "student" in first.stdout and "test acc" in first.stdout  # the results table
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0
    for stage in ("[teacher] already trained", "[select] reusing", "[student] already trained",
                  "[eval] reusing"):
        assert stage in second.stdout, second.stdout
