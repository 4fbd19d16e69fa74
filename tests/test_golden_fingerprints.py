"""Every stage's artifact key stays byte-identical across refactors (the stage-layer issue).

`tests/golden_fingerprints.json` was produced by running the code as it was BEFORE any
stage-layer refactor (``KDPRUNE_WRITE_GOLDEN=1 python -m pytest tests/test_golden_fingerprints.py``
rewrites it; do that only in a commit of its own that names the keys that change and why).
Two kinds of entries:

- "runs": the fingerprints READ BACK FROM DISK after real end-to-end smoke runs (quickstart
  smoke with random, el2n and IF-Beta selection): checkpoints' metadata, scores, subset,
  policy, features and results files. They are what reuse compares against, so they are
  checked as the artifacts carry them, not as a key function computes them.
- "configs": the keys that depend on the config alone (teacher / student / eval keys, with
  fixed stand-ins for the data and upstream fingerprints) for every shipped config and arg,
  including the full CIFAR-10 and ImageNet recipes that no test can run end to end.

A study's finished cells (days of compute) are reused only if these stay equal.
"""

import glob
import json
import os

import numpy as np
import pytest

from kdprune_jax import context, pipeline
from kdprune_jax.stages import student, training
from tests.test_pipeline import ROOT, load_config, override

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_fingerprints.json")
CONFIG_ARGS = {
    "quickstart.py": ("", "smoke"),
    "cifar10_kd.py": ("", "smoke", "el2n", "ifbeta", "influence"),
    "cifar10_random_kd.py": ("", "smoke"),
    "cifar10_ifbeta.py": ("", "smoke"),
    "imagenet_random_kd.py": ("", "smoke"),
    "imagenet_ifbeta.py": ("", "smoke"),
}


def _disk_fingerprints(workdir: str) -> dict:
    """{relative artifact path: fingerprint} as the workdir's artifacts carry them."""
    from kdprune_jax.train.checkpoint import Checkpointer

    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "**", "*.json"), recursive=True)):
        rel = os.path.relpath(path, workdir)
        if rel.startswith(("teacher/", "student/", "proxies/")) or "metrics" in rel:
            continue  # checkpoint internals: read through the checkpointer below
        with open(path) as f:
            d = json.load(f)
        if isinstance(d, dict) and isinstance(d.get("fingerprint"), str):
            out[rel] = d["fingerprint"]
        elif rel.endswith("meta.json") and isinstance(d, dict):  # features / teacher views
            out[rel] = {k: v for k, v in d.items() if k != "seconds"}
    for path in sorted(glob.glob(os.path.join(workdir, "scores", "*.npz"))):
        meta = json.loads(str(np.load(path)["meta"]))
        out[os.path.relpath(path, workdir)] = meta["fingerprint"]
    for ckpt in ["teacher", "student", *sorted(
            os.path.relpath(p, workdir) for p in glob.glob(os.path.join(workdir, "proxies", "*")))]:
        if os.path.isdir(os.path.join(workdir, ckpt)):
            ck = Checkpointer(os.path.join(workdir, ckpt))
            out[ckpt] = (ck.read_meta() or {}).get("fingerprint")
            ck.close()
    return out


def _config_keys() -> dict:
    """Config-only keys of every shipped config (stand-ins for data and upstream keys)."""
    fake = context.Splits(train=None, test=None, train_labels=None, pool=None, val=None,
                          flipped=None, fingerprint="DATA", test_fingerprint="TEST")
    out = {}
    for name, args in CONFIG_ARGS.items():
        for arg in args:
            c = load_config(name, arg)
            run = context.Run(c, "", None, fake, None)
            teacher = training.role_key(c, "teacher", data="DATA")
            student_key = training.role_key(
                c, "student", data="DATA", subset="SUBSET", teacher=teacher,
                kd=student.kd_key(c))
            out[f"{name}:{arg}"] = {"teacher": teacher, "student": student_key,
                                    "eval": training.eval_key(run, student_key)}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, quickstart_smoke_run):
    base = load_config("quickstart.py", "smoke")
    out = {"quickstart:smoke": _disk_fingerprints(
        quickstart_smoke_run(str(tmp_path_factory.mktemp("random"))))}
    for label, fields in (("quickstart:smoke+el2n", dict(prune__method="el2n",
                                                         proxy__num_models=1,
                                                         proxy__num_epochs=1)),
                          ("quickstart:smoke+ifbeta", dict(prune__method="ifbeta",
                                                           policy__max_steps=2))):
        wd = quickstart_smoke_run(str(tmp_path_factory.mktemp(label.split("+")[1])),
                                  parts=["teacher", "teacher_eval.json"])
        pipeline.run(override(base, **fields), wd)
        out[label] = _disk_fingerprints(wd)
    return out


def test_every_stage_key_equals_the_golden_file(runs):
    got = {"runs": runs, "configs": _config_keys()}
    if os.environ.get("KDPRUNE_WRITE_GOLDEN") == "1":
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        want = json.load(f)
    assert got["configs"] == want["configs"]
    for label, keys in want["runs"].items():
        assert got["runs"][label] == keys, label
    # The golden file covers every stage the smoke runs write.
    stages = {k.split("/")[0].split(".")[0] for r in want["runs"].values() for k in r}
    assert {"teacher", "student", "subset", "results", "scores", "proxies", "ifbeta",
            "features"} <= stages, stages
    assert os.path.dirname(GOLDEN).startswith(ROOT)


def test_config_only_keys_equal_the_golden_file():
    """The "configs" half of the golden file alone (no smoke runs, seconds): what a change to
    configs/ or config_helpers must keep."""
    with open(GOLDEN) as f:
        assert _config_keys() == json.load(f)["configs"]
