"""Corrupt and stale artifacts (issue 5, items 2 and 3).

Corrupt: every artifact kind is damaged in a copy of a finished workdir (garbage bytes, cut to
half, emptied, a valid file with a key missing, a valid file with a wrong shape; checkpoints:
a truncated or deleted file inside a step, unreadable metadata, state bytes that no longer
match the checksum saved with them). The rerun must name the damaged file in ONE log line,
rebuild it and reach exactly the clean run's artifact (so the damaged bytes were never used),
or, for inputs the user gave (prune.scores_file, ifbeta.features_dir, teacher.init), refuse
with one-line UserError before any training. A damaged checkpoint step is moved aside to
``<dir>.corrupt-<time>/<step>`` (never deleted) and training resumes from the previous intact
step.

Stale: one change per test (teacher, data, scoring parameters, keep fraction) rebuilds
exactly the artifacts downstream of it and leaves every other one untouched (file hashes,
``.stale-`` directories).

Two reference runs of the quickstart smoke config are shared by the module (el2n with one
proxy; IF-Beta with 3 policy steps); each case runs on a copy. The suite's persistent XLA
compilation cache (tests/conftest.py) makes the many small reruns cheap: every program is
compiled once instead of once per run.
"""

import glob
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdprune_jax import artifacts, context, pipeline
from kdprune_jax.errors import ArtifactError, ConfigError, UserError
from kdprune_jax.stages import features, scores
from kdprune_jax.train.checkpoint import state_checksums
from kdprune_jax.train.state import TrainState
from tests.test_pipeline import load_config, override, snapshot

EL2N = dict(prune__method="el2n", proxy__num_models=1, proxy__num_epochs=1)
IFBETA = dict(prune__method="ifbeta", policy__max_steps=3)
STEPS = 21  # smoke schedules: 1,368-image pool or 684-image subset, batch 64 (+ ckpt every 10)


def _reference(tmp_path_factory, seed, name, fields):
    # The smoke teacher is the same for every reference: copied, not retrained.
    workdir = seed(str(tmp_path_factory.mktemp(name)), ["teacher", "teacher_eval.json"])
    config = override(load_config("quickstart.py", "smoke"), **fields)
    return config, workdir, pipeline.run(config, workdir)


@pytest.fixture(scope="module")
def el2n_ref(tmp_path_factory, quickstart_smoke_run):
    return _reference(tmp_path_factory, quickstart_smoke_run, "el2n", EL2N)


@pytest.fixture(scope="module")
def ifbeta_ref(tmp_path_factory, quickstart_smoke_run):
    return _reference(tmp_path_factory, quickstart_smoke_run, "ifbeta", IFBETA)


def _copy(ref, tmp_path, name="w"):
    wd = str(tmp_path / name)
    shutil.copytree(ref[1], wd)
    return wd


def _run(config, wd, capsys):
    capsys.readouterr()
    results = pipeline.run(config, wd)
    return results, capsys.readouterr().out


def _one_line(out, *parts):
    """The single log line holding every part (fails if none or several)."""
    lines = [x for x in out.splitlines() if all(p in x for p in parts)]
    assert len(lines) == 1, f"{parts}: {lines}\n{out}"
    return lines[0]


# ----------------------------------------------------------------------------- corruptions
def garbage(p):
    n = os.path.getsize(p)
    with open(p, "wb") as f:
        f.write(np.random.default_rng(0).bytes(max(n, 64)))


def half(p):
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])


def empty(p):
    open(p, "wb").close()


def _edit_json(p, fn):
    with open(p) as f:
        d = json.load(f)
    fn(d)
    with open(p, "w") as f:
        json.dump(d, f)


def _edit_npz(p, fn):
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    fn(arrays)
    with open(p, "wb") as f:
        np.savez(f, **arrays)


def _edit_npy(p, fn):
    a = fn(np.load(p))
    with open(p, "wb") as f:
        np.save(f, a)


# kind -> {artifact: corruption}; each kind damages several independent artifacts in ONE
# run (every stage checks its own file), so each must be named and rebuilt on its own.
EL2N_FILES = {
    "garbage": dict.fromkeys(("scores/el2n.npz", "subset.json", "teacher_eval.json",
                              "results.json"), garbage),
    "half": dict.fromkeys(("scores/el2n.npz", "subset.json", "teacher_eval.json",
                           "results.json"), half),
    "empty": dict.fromkeys(("scores/el2n.npz", "subset.json", "teacher_eval.json",
                            "results.json"), empty),
    "missing_key": {
        "scores/el2n.npz": lambda p: _edit_npz(p, lambda a: a.pop("meta")),
        "subset.json": lambda p: _edit_json(p, lambda d: d.pop("indices")),
        "teacher_eval.json": lambda p: _edit_json(p, lambda d: d["metrics"].pop("accuracy")),
        "results.json": lambda p: _edit_json(p, lambda d: d.pop("student")),
    },
    "wrong_shape": {
        "scores/el2n.npz": lambda p: _edit_npz(p, lambda a: a.update(scores=a["scores"][:-1])),
        "subset.json": lambda p: _edit_json(p, lambda d: d.update(indices=[d["indices"]])),
        "teacher_eval.json": lambda p: _edit_json(
            p, lambda d: d["metrics"].update(accuracy=[d["metrics"]["accuracy"]])),
        "results.json": lambda p: _edit_json(
            p, lambda d: d["subset"].update(num_kept=d["subset"]["num_kept"] + 1)),
    },
    # Well-formed files whose values cannot be right: NaN scores, a kept index outside the
    # pool (the validation split), counts that do not match the labels.
    "bad_values": {
        "scores/el2n.npz": lambda p: _edit_npz(
            p, lambda a: a.update(scores=np.where(np.arange(len(a["scores"])) == 7, np.nan,
                                                  a["scores"]).astype(np.float32))),
        "subset.json": lambda p: _edit_json(p, lambda d: d.update(
            indices=sorted(d["indices"][1:] + [_val_index(d)]))),
    },
}
WHAT = {"scores/el2n.npz": ("[scores]", "recomputing"), "subset.json": ("[select]", "rebuilding"),
        "teacher_eval.json": ("[teacher]", "re-evaluating"),
        "results.json": ("[eval]", "re-evaluating")}


def _val_index(subset_json):
    ds = context.load_splits(override(load_config("quickstart.py", "smoke"), **EL2N))
    return int(ds.val[0])


def _load(wd, rel):
    with open(os.path.join(wd, rel)) as f:
        return json.load(f)


def _comparable_results(r):
    """What a run decided and measured (not how long it took: timings differ run to run)."""
    keep = ("fingerprint", "student", "teacher", "subset", "kd", "policy", "devices")
    out = json.loads(json.dumps({k: r.get(k) for k in keep}))
    for part in ("student", "teacher"):
        (out[part] or {}).pop("train_seconds", None)
    return out


def _corrupt_and_rerun(reference, files, tmp_path, capsys):
    """Copy a reference workdir, damage `files` ({relative path: corrupt(path)}), run the
    same config again; returns (workdir, results, captured output)."""
    config = reference[0]
    wd = _copy(reference, tmp_path)
    for rel, corrupt in files.items():
        corrupt(os.path.join(wd, rel))
    results, out = _run(config, wd, capsys)
    return wd, results, out


@pytest.mark.parametrize("kind", list(EL2N_FILES))
def test_corrupt_files_are_named_and_rebuilt(el2n_ref, tmp_path, capsys, kind):
    ref, ref_results = el2n_ref[1:]
    wd, results, out = _corrupt_and_rerun(el2n_ref, EL2N_FILES[kind], tmp_path, capsys)
    for rel in EL2N_FILES[kind]:
        stage, action = WHAT[rel]
        line = _one_line(out, stage, f"{rel} is unreadable (")
        assert line.rstrip().endswith(action), line
    # Rebuilt exactly as the clean run built them (so nothing damaged was used) ...
    s_ref, s_new = (scores.read_scores(os.path.join(d, "scores/el2n.npz")) for d in
                    (ref, wd))
    np.testing.assert_array_equal(s_new[0], s_ref[0])
    assert s_new[1]["fingerprint"] == s_ref[1]["fingerprint"]
    a, b = snapshot(ref), snapshot(wd)
    assert a["subset.json"] == b["subset.json"]
    assert _load(ref, "teacher_eval.json") == _load(wd, "teacher_eval.json")
    assert _comparable_results(_load(ref, "results.json")) == \
        _comparable_results(_load(wd, "results.json"))
    assert _comparable_results(results) == _comparable_results(ref_results)
    # ... and nothing else was retrained: every checkpoint file is untouched.
    ckpts = [k for k in a if k.startswith(("teacher/", "proxies/", "student/"))]
    assert ckpts and all(a[k] == b[k] for k in ckpts)
    assert not glob.glob(os.path.join(wd, "*.stale-*")) + glob.glob(
        os.path.join(wd, "*.corrupt-*"))


IFBETA_FILES = {  # one features file + policy.json per kind
    "garbage": {"features/features.npy": garbage, "ifbeta/policy.json": garbage},
    "half": {"features/logits.npy": half, "ifbeta/policy.json": half},
    "empty": {"features/meta.json": empty, "ifbeta/policy.json": empty},
    "missing_key": {
        "features/meta.json": lambda p: _edit_json(p, lambda d: d.pop("num_examples")),
        "ifbeta/policy.json": lambda p: _edit_json(p, lambda d: d.pop("phi")),
    },
    "wrong_shape": {
        "features/features.npy": lambda p: _edit_npy(p, lambda a: a[:-1]),
        "ifbeta/policy.json": lambda p: _edit_json(p, lambda d: d["phi"].append(0.5)),
    },
    "bad_values": {
        "features/logits.npy": lambda p: _edit_npy(p, lambda a: np.where(
            np.arange(a.size).reshape(a.shape) == 3, np.inf, a).astype(a.dtype)),
        "ifbeta/policy.json": lambda p: _edit_json(p, lambda d: d.update(a=d["a"] + 1.0)),
    },
}


@pytest.mark.parametrize("kind", list(IFBETA_FILES))
def test_corrupt_ifbeta_artifacts_are_named_and_rebuilt(ifbeta_ref, tmp_path, capsys, kind):
    ref, ref_results = ifbeta_ref[1:]
    wd, results, out = _corrupt_and_rerun(ifbeta_ref, IFBETA_FILES[kind], tmp_path, capsys)
    (feat_file,) = [os.path.basename(r) for r in IFBETA_FILES[kind] if r.startswith("feat")]
    line = _one_line(out, "[features]", "/features is unreadable (", f"({feat_file}:")
    assert line.rstrip().endswith("recomputing")
    _one_line(out, "[policy]", "ifbeta/policy.json is unreadable (", "); relearning")
    for name in ("features.npy", "logits.npy"):
        np.testing.assert_array_equal(np.load(os.path.join(wd, "features", name)),
                                      np.load(os.path.join(ref, "features", name)))
    m_ref, m_new = (_load(d, "features/meta.json") for d in (ref, wd))
    assert m_ref.pop("seconds") > 0 and m_new.pop("seconds") > 0 and m_ref == m_new
    recs = [_load(d, "ifbeta/policy.json") for d in (ref, wd)]
    for key in ("fingerprint", "phi", "a", "b", "history", "outer_at_learned"):
        assert recs[0][key] == recs[1][key], key
    assert snapshot(ref)["subset.json"] == snapshot(wd)["subset.json"]
    assert _comparable_results(results) == _comparable_results(ref_results)
    assert not os.path.exists(os.path.join(wd, "features.tmp"))
    assert not os.path.exists(os.path.join(wd, "features.old"))


# ----------------------------------------------------------------------------- checkpoints
def _state(ckpt_dir, step=None):
    """Every restored array of a checkpoint (raw, as saved) and its step."""
    mgr = ocp.CheckpointManager(ckpt_dir)
    step = mgr.latest_step() if step is None else step
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mgr.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(out["state"])]


def _bump_checksum(p):
    _edit_json(p, lambda d: d["checksum"].update(state=(d["checksum"]["state"] + 1) % 2**32))


CKPT = [
    # (id, [(file to damage, how)], what the log says about the step, expected resume line)
    ("teacher_truncated_file", [("teacher/21/state/_METADATA", half)],
     ["teacher/21"], "[teacher] resumed from step 20/21"),
    ("teacher_unreadable_meta", [("teacher/21/meta/metadata", garbage)],
     ["teacher/21"], "[teacher] resumed from step 20/21"),
    ("student_deleted_file", [("student/21/state/manifest.ocdbt", os.remove)],
     ["student/21"], "[student] resumed from step 20/21"),
    ("student_checksum_mismatch", [("student/21/meta/metadata", _bump_checksum)],
     ["student/21"], "[student] resumed from step 20/21"),
    ("student_every_step", [("student/21/state/_METADATA", garbage),
                            ("student/20/state/_METADATA", empty)],
     ["student/21", "student/20"], None),
]


@pytest.mark.parametrize("damage,steps,resumed", [c[1:] for c in CKPT],
                         ids=[c[0] for c in CKPT])
def test_corrupt_checkpoint_step_is_set_aside_and_retrained(el2n_ref, tmp_path, capsys,
                                                            damage, steps, resumed):
    config, ref, ref_results = el2n_ref
    wd = _copy(el2n_ref, tmp_path)
    role = steps[0].split("/")[0]
    for rel, corrupt in damage:
        corrupt(os.path.join(wd, rel))
    results, out = _run(config, wd, capsys)
    for step_dir in steps:
        line = _one_line(out, f"[{role}] checkpoint {os.path.join(wd, step_dir)} is unreadable (")
        assert f"moved to {os.path.join(wd, role)}.corrupt-" in line
        aside = line.split("moved to ")[-1].strip()
        assert os.path.isdir(aside) and aside.endswith("/" + step_dir.split("/")[1])
    if resumed:
        _one_line(out, resumed)
    else:  # no intact step left: trained again from step 0
        assert f"[{role}] resumed" not in out and f"[{role}] already trained" not in out
    # The retrained model equals the clean run's (a resumed run reproduces it exactly).
    step_a, a = _state(os.path.join(ref, role))
    step_b, b = _state(os.path.join(wd, role))
    assert step_a == step_b == STEPS
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    assert _comparable_results(results)["student"]["test"] == ref_results["student"]["test"]
    assert not glob.glob(os.path.join(wd, "*.stale-*"))  # corrupt is not stale


def test_checksum_sees_every_bit():
    leaf = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = TrainState(np.int32(3), {"w": leaf, "b": np.zeros(4, np.float32)},
                       {"mean": np.ones(4, np.float32)}, (np.zeros(2, np.int32),))
    c = state_checksums(state)
    flipped = leaf.copy()
    flipped.view(np.uint32)[1, 2] ^= 1 << 3  # one mantissa bit of one parameter
    c2 = state_checksums(state.replace(params={"w": flipped, "b": state.params["b"]}))
    assert c2["params"] != c["params"] and c2["state"] != c["state"]
    assert c2["batch_stats"] == c["batch_stats"]
    swapped = state.replace(params={"w": leaf, "b": state.params["b"] + 0.0})
    assert state_checksums(swapped) == c  # same bits -> same checksum


# ----------------------------------------------------------------------------- user inputs
def _refused(config, wd, match):
    with pytest.raises(UserError, match=match) as e:
        pipeline.run(config, wd)
    assert "\n" not in str(e.value)  # main prints it as one line and exits with status 2
    assert not os.path.exists(os.path.join(wd, "teacher"))  # before any training
    return e.value


def test_corrupt_user_score_file_is_refused(el2n_ref, tmp_path):
    config, ref, _ = el2n_ref
    for name, corrupt, match, kind in [
            ("garbage", garbage, r"config\.prune\.scores_file=.*is unreadable", ConfigError),
            ("no_meta", lambda p: _edit_npz(p, lambda a: a.pop("meta")),
             r"prune\.scores_file=.*no array 'meta'", ConfigError),
            ("short", lambda p: _edit_npz(p, lambda a: a.update(scores=a["scores"][:-1])),
             r"has 1437 scores, the training split has 1438", ArtifactError)]:
        src = str(tmp_path / f"{name}.npz")
        shutil.copy(os.path.join(ref, "scores", "el2n.npz"), src)
        corrupt(src)
        with open(src, "rb") as f:
            before = f.read()
        err = _refused(override(config, prune__scores_file=src), str(tmp_path / name), match)
        assert isinstance(err, kind)
        with open(src, "rb") as f:
            assert f.read() == before  # the user's file is never rewritten


def test_corrupt_user_features_dir_is_refused(ifbeta_ref, tmp_path):
    config, ref, _ = ifbeta_ref
    given = str(tmp_path / "features")
    shutil.copytree(os.path.join(ref, "features"), given)
    half(os.path.join(given, "features.npy"))
    _refused(override(config, ifbeta__features_dir=given), str(tmp_path / "w"),
             r"config\.ifbeta\.features_dir=.*is unreadable \(features\.npy: ")


@pytest.mark.parametrize("rel,corrupt,match", [
    ("21/state/_METADATA", half, r"latest step 21 is unreadable"),
    ("21/meta/metadata", lambda p: _edit_json(p, lambda d: d["checksum"].update(
        params=d["checksum"]["params"] ^ 1)), r"params of its step 21 do not match the checksum"),
], ids=["truncated", "checksum"])
def test_corrupt_teacher_init_is_refused(el2n_ref, tmp_path, rel, corrupt, match):
    config, ref, _ = el2n_ref
    given = str(tmp_path / "their_teacher")
    shutil.copytree(os.path.join(ref, "teacher"), given)
    corrupt(os.path.join(given, rel))
    before = snapshot(given)
    err = _refused(override(config, teacher__init=given), str(tmp_path / "w"),
                   r"config\.teacher\.init=.*" + match)
    assert isinstance(err, ConfigError)
    assert snapshot(given) == before  # a user's checkpoint is never moved or modified


# ----------------------------------------------------------------------------- stale
ALL = ("teacher", "teacher_eval.json", "proxies/0", "scores/el2n.npz", "subset.json", "student",
       "results.json")
AFTER_TEACHER = {"teacher_eval.json", "student", "results.json"}
STALE = [
    # (changed field(s), rebuilt artifacts; every other one of ALL must be untouched)
    ("teacher.optim.learning_rate", dict(teacher__optim__learning_rate=0.02),
     {"teacher"} | AFTER_TEACHER),  # el2n scores come from proxies: not downstream
    ("teacher.init", "other_teacher", AFTER_TEACHER),
    ("data.source+path", "arrays", set(ALL)),
    ("data.train_split", dict(data__train_split="test"), set(ALL)),
    ("data.label_noise", dict(data__label_noise=0.1), set(ALL)),
    ("data.val_seed", dict(data__val_seed=1), set(ALL)),
    ("data.mean", dict(data__mean=(60.0,)), set(ALL)),  # proxies see normalized images too
    ("data.eval_split", dict(data__eval_split="train"), {"teacher_eval.json", "results.json"}),
    ("proxy.num_epochs", dict(proxy__num_epochs=2),
     {"proxies/0", "scores/el2n.npz", "subset.json", "student", "results.json"}),
    ("prune.keep_fraction", dict(prune__keep_fraction=0.3),
     {"subset.json", "student", "results.json"}),
    ("influence.damping", dict(influence__damping=0.1), set()),  # el2n does not read it
]


REUSE_LINES = {"scores/el2n.npz": "[scores] reusing", "subset.json": "[select] reusing",
               "results.json": "[eval] reusing", "student": "[student] already trained"}


def _artifact_hashes(wd):
    """artifact -> hash of its bytes (a checkpoint directory: of all its files)."""
    snap = snapshot(wd)
    out = {}
    for name in ALL:
        files = sorted((k, v) for k, v in snap.items() if k == name or k.startswith(name + "/"))
        out[name] = hashlib.sha256(repr(files).encode()).hexdigest() if files else None
    return out


def _changes(wd, before, after):
    """Which of ALL were rebuilt: a file's bytes changed, or a checkpoint directory was moved
    aside as stale and written anew (reused ones keep their bytes and stay in place)."""
    rebuilt = set()
    for name in ALL:
        if os.path.basename(name) in ("teacher", "student", "0"):
            stale = glob.glob(os.path.join(wd, name + ".stale-*"))
            if stale:
                assert after[name] is not None and after[name] != before[name], name
                rebuilt.add(name)
            else:
                assert after[name] == before[name], f"{name} changed without being set aside"
        elif after[name] != before[name]:
            rebuilt.add(name)
    return rebuilt


def _arrays_npz(tmp_path):
    """The digits as an `arrays` .npz, one training pixel changed."""
    ds = context.load_splits(load_config("quickstart.py", "smoke"))
    train = ds.train.source.images.copy()
    train[0, 0, 0, 0] ^= 0xFF
    path = str(tmp_path / "digits.npz")
    np.savez(path, train_images=train, train_labels=ds.train.labels,
             test_images=ds.test.source.images, test_labels=ds.test.labels)
    return path


@pytest.mark.parametrize("fields,rebuilt", [s[1:] for s in STALE], ids=[s[0] for s in STALE])
def test_change_rebuilds_exactly_downstream(el2n_ref, tmp_path, capsys, fields, rebuilt):
    config, ref, _ = el2n_ref
    wd = _copy(el2n_ref, tmp_path)
    if fields == "other_teacher":  # another teacher: the reference's own, one step earlier
        other = str(tmp_path / "other_teacher")
        shutil.copytree(os.path.join(ref, "teacher"), other)
        shutil.rmtree(os.path.join(other, str(STEPS)))
        fields = dict(teacher__init=other)
    elif fields == "arrays":
        fields = dict(data__source="arrays", data__path=_arrays_npz(tmp_path))
    before = _artifact_hashes(wd)
    _, out = _run(override(config, **fields), wd, capsys)
    assert _changes(wd, before, _artifact_hashes(wd)) == rebuilt
    assert "is unreadable" not in out  # a stale artifact is not reported as corrupt
    for name, line in REUSE_LINES.items():
        assert (line in out) == (name not in rebuilt), (name, out)


def test_influence_damping_rebuilds_influence_scores_and_downstream(el2n_ref, tmp_path, capsys):
    config, ref, _ = el2n_ref
    wd = _copy(el2n_ref, tmp_path)
    infl = override(config, prune__method="influence")
    pipeline.run(infl, wd)  # scores/influence.npz next to el2n.npz; subset and student redone
    before = snapshot(wd)
    _, out = _run(override(infl, influence__damping=1e-2), wd, capsys)
    after = snapshot(wd)
    _one_line(out, "[scores]", "influence.npz is stale")
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert {"scores/influence.npz", "subset.json", "results.json"} <= changed
    assert len(glob.glob(os.path.join(wd, "student.stale-*"))) == 2  # el2n's, damping 1e-3's
    untouched = [k for k in before if k.startswith(("teacher", "proxies/", "scores/el2n"))]
    assert untouched and all(before[k] == after[k] for k in untouched)


def test_data_fingerprint_follows_content_not_path(tmp_path):
    """An `arrays` file with the same name, shape and labels but one other pixel is other
    data; an identical copy elsewhere is the same data."""
    a = _arrays_npz(tmp_path)
    os.makedirs(tmp_path / "copy")
    os.makedirs(tmp_path / "other")
    shutil.copy(a, tmp_path / "copy" / "digits.npz")
    with np.load(a) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train_images"][5, 3, 3, 0] ^= 1
    np.savez(tmp_path / "other" / "digits.npz", **arrays)
    base = override(load_config("quickstart.py", "smoke"), data__source="arrays")
    fp = {name: context.load_splits(override(base, data__path=str(p))).fingerprint
          for name, p in (("a", a), ("copy", tmp_path / "copy" / "digits.npz"),
                          ("other", tmp_path / "other" / "digits.npz"))}
    assert fp["a"] == fp["copy"] != fp["other"]
    assert artifacts.fingerprint({"x": 1}) == artifacts.fingerprint({"x": 1})
    assert features.read_features(str(tmp_path / "nowhere")) == (None, None)
