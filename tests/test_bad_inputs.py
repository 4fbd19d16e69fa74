"""The bad input table (DESIGN.md "Errors"): every user mistake in `BAD` stops the run BEFORE
any training or XLA compilation, with ONE one-line message naming the field and the allowed
values, and leaves the artifacts already in the workdir byte-identical (sha256 of every
file before and after). `NUMERICAL` are the faults that can only show up while computing
(a NaN loss, a diverging LiSSA, a non-converging CG): they stop with the step or the
residual and the knob to change. `CLI` runs a few of each through the command line: one
``error: ...`` line on stderr, no traceback, exit status 2.

Each row is (id, config overrides, exception type, field regex, allowed-values regex).
Override values may name fixture files as ``{name}`` (see `files`); ``__workdir`` replaces
the workdir and ``__free_bytes`` makes the filesystem report that much free space.
"""

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from kdprune_jax import config_checks, context, pipeline
from kdprune_jax.errors import ArtifactError, ConfigError, DataError, UserError
from kdprune_jax.scoring import SolverError
from kdprune_jax.stages import training
from kdprune_jax.train import NonFiniteLossError
from tests.multiprocess import cli_env
from tests.test_pipeline import ROOT, load_config, override, snapshot

SMOKE = "configs/quickstart.py:smoke"

BAD = [
    # ---- config values (config_checks.validate, before the data is read)
    ("negative_learning_rate", dict(student__optim__learning_rate=-0.1), ConfigError,
     r"config\.student\.optim\.learning_rate=-0\.1", "a positive number"),
    ("zero_temperature", dict(kd__temperature=0.0), ConfigError, r"config\.kd\.temperature=0\.0",
     "a positive number"),
    ("compute_dtype_float16", dict(compute_dtype="float16"), ConfigError,
     r"config\.compute_dtype='float16'", "float32, bfloat16"),
    ("teacher_views_negative", dict(kd__teacher_views=-1), ConfigError,
     r"config\.kd\.teacher_views=-1", "an integer >= 0"),
    ("alpha_above_1", dict(kd__alpha=1.5), ConfigError, r"config\.kd\.alpha=1\.5", r"\[0, 1\]"),
    ("alpha_below_0", dict(kd__alpha=-0.1), ConfigError, r"config\.kd\.alpha=-0\.1",
     r"\[0, 1\]"),
    ("keep_fraction_0", dict(prune__keep_fraction=0.0), ConfigError,
     r"config\.prune\.keep_fraction=0\.0", r"a number in \(0, 1\]"),
    ("keep_fraction_above_1", dict(prune__keep_fraction=1.5), ConfigError,
     r"config\.prune\.keep_fraction=1\.5", r"a number in \(0, 1\]"),
    ("unknown_student_model", dict(student__model="resnet7"), ConfigError,
     r"config\.student\.model='resnet7'",
     r"cifar_resnet14, cifar_resnet20, .*cifar_resnet8, resnet18.*resnet50"),
    ("unknown_teacher_model", dict(teacher__model="vit_b16"), ConfigError,
     r"config\.teacher\.model='vit_b16'", r"cifar_resnet56.*resnet18"),
    ("unknown_method", dict(prune__method="el2m"), ConfigError, r"config\.prune\.method='el2m'",
     r"random, el2n, .*influence.*ifbeta"),
    ("unknown_source", dict(data__source="hdf5"), ConfigError, r"config\.data\.source='hdf5'",
     "digits, image_folder, tfds, arrays"),
    ("unknown_schedule", dict(student__optim__schedule="linear"), ConfigError,
     r"config\.student\.optim\.schedule='linear'", "cosine.*step.*constant"),
    ("unknown_solver", dict(prune__method="influence", influence__solver="newton"), ConfigError,
     r"config\.influence\.solver='newton'", "exact, cg, lissa"),
    ("unknown_direction", dict(prune__direction="up"), ConfigError,
     r"config\.prune\.direction='up'", "auto, highest, lowest, middle"),
    ("unknown_augment", dict(data__augment="mixup"), ConfigError,
     r"config\.data\.augment='mixup'", "none.*cifar.*imagenet"),
    ("momentum_1", dict(student__optim__momentum=1.0), ConfigError,
     r"config\.student\.optim\.momentum=1\.0", r"a number in \[0, 1\)"),
    ("negative_weight_decay", dict(teacher__optim__weight_decay=-1e-4), ConfigError,
     r"config\.teacher\.optim\.weight_decay=-0\.0001", "a number >= 0"),
    ("val_fraction_1", dict(data__val_fraction=1.0), ConfigError,
     r"config\.data\.val_fraction=1\.0", r"a number in \[0, 1\)"),
    ("max_per_class_negative", dict(data__max_per_class=-1), ConfigError,
     r"^config\.data\.max_per_class=-1 is invalid", r"an integer >= 0 \(0 = every example"),
    ("teacher_init_missing", dict(teacher__init="/nonexistent/run/teacher"), ConfigError,
     r"config\.teacher\.init='/nonexistent/run/teacher'", "teacher checkpoint directory"),
    ("unknown_preconditioner", dict(policy__preconditioner="jacobi"), ConfigError,
     r"config\.policy\.preconditioner='jacobi'", "auto, kronecker, none"),
    ("kronecker_with_mlp_head", dict(ifbeta__head="mlp", ifbeta__damping=0.1,
                                     policy__damping=0.1, policy__preconditioner="kronecker"),
     ConfigError, r"config\.policy\.preconditioner='kronecker'",
     "auto or none with ifbeta.head=mlp"),
    # ---- config values that need the labels (pipeline.run, right after reading them)
    ("class_left_empty", dict(prune__keep_fraction=0.001), ConfigError,
     r"config\.prune\.keep_fraction=0\.001", "keeps at least one example of every class"),
    ("batch_larger_than_subset", dict(student__optim__batch_size=1024), ConfigError,
     r"config\.student\.optim\.batch_size=1024", r"at most the subset size \(684 examples"),
    # equal_steps trains on the subset for as many steps as the whole pool would take; a
    # batch larger than the pool gives no step at all (was only caught after the teacher).
    ("no_full_batch", dict(student__equal_steps=True, student__optim__batch_size=4096),
     ConfigError, r"config\.student\.optim\.batch_size=4096",
     r"at most the number of training examples \(1\d{3}\) times student\.optim\.num_epochs"),
    # A validation split that leaves too few pool examples for keep_fraction to keep one of
    # each class names data.val_fraction (the field that caused it), not keep_fraction.
    ("val_fraction_starves_a_class", dict(data__val_fraction=0.99), ConfigError,
     r"^config\.data\.val_fraction=0\.99 is invalid",
     r"at least 2 training examples outside the validation split, so that "
     r"prune\.keep_fraction=0\.5 keeps one of each \(class \d+ has 1 of its \d+ left\); "
     r"use data\.val_fraction <= 0\.98\d+$"),
    ("val_fraction_takes_a_class", dict(data__val_fraction=0.997), ConfigError,
     r"^config\.data\.val_fraction=0\.997 is invalid",
     r"leaving every class at least 2 training examples outside the validation split "
     r"\(it takes all \d+ of class \d+\); use data\.val_fraction <= 0\.98\d+$"),
    ("mean_per_channel", dict(data__mean=(64.0, 64.0, 64.0), data__std=(96.0, 96.0, 96.0)),
     ConfigError, r"config\.data\.mean=\(64\.0, 64\.0, 64\.0\)", r"1 value\(s\), one per"),
    ("teacher_num_classes", dict(teacher__init="{teacher_3_classes}"), ConfigError,
     r"config\.teacher\.init='.*/three/teacher'",
     r"one output per class of the data \(10 classes\).*trained on data with 3 classes"),
    ("teacher_other_model", dict(teacher__init="{digits_teacher}",
                                 teacher__model="cifar_resnet20"), ArtifactError,
     r"teacher checkpoint .*/teacher \(step \d+\) does not fit teacher\.model='cifar_resnet20'",
     "set teacher.model/width to the checkpoint's model"),
    # ---- files
    ("data_path_missing", dict(data__source="image_folder", data__path="/nonexistent/c.tar.gz"),
     ConfigError, r"config\.data\.path='/nonexistent/c\.tar\.gz'",
     r"an existing image folder, \.tar/\.tar\.gz or \.npz path"),
    # chmod 000 would not stop root (the tests run as root; root bypasses file permissions),
    # so "unreadable" is a path that cannot be read as the expected kind of file: a
    # directory where the .npz should be, and a directory named like an image file (open()
    # fails with EISDIR, the same OSError path as EACCES for a non-root user).
    ("npz_is_a_directory", dict(data__source="arrays", data__path="{dir_named_npz}"),
     ConfigError, r"config\.data\.path='.*/data\.npz'", r"an existing \.npz file"),
    ("unreadable_image", dict(data__source="image_folder", data__path="{unreadable_folder}"),
     DataError, r"cannot read image file '.*train/b/0003\.png' in data\.path",
     "allowed: readable JPEG/PNG/BMP files"),
    ("corrupt_archive", dict(data__source="image_folder", data__path="{truncated_tar_gz}"),
     DataError, r"data\.path='.*truncated\.tar\.gz': archive is truncated or corrupt",
     r"allowed: an image folder or a readable \.tar/\.tar\.gz"),
    ("corrupt_image_in_archive", dict(data__source="image_folder",
                                      data__path="{bad_jpeg_tar_gz}"),
     DataError, r"corrupt or unreadable image file '.*train/b/0005\.jpg'",
     "allowed in data.path: JPEG/PNG/BMP files PIL can decode"),
    ("image_wrong_size", dict(data__source="image_folder", data__path="{wrong_size_folder}"),
     DataError, r"image '.*train/b/0002\.png' has shape \(10, 10, 3\), expected \(8, 8, 3\)",
     r"allowed: images of one size \(resize them all to 8x8\)"),
    ("missing_split_dir", dict(data__source="image_folder", data__path="{wrong_size_folder}",
                               data__train_split="training"), DataError,
     r"data\.path='.*' has no split directory 'training' \(data\.train_split",
     "allowed: test, train"),
    ("npz_without_labels", dict(data__source="arrays", data__path="{npz_without_labels}"),
     DataError, r"data\.path='.*nolabels\.npz' has no array 'train_labels'",
     r"allowed: an \.npz holding uint8 'train_images'"),
    ("npz_corrupt", dict(data__source="arrays", data__path="{corrupt_npz}"), DataError,
     r"data\.path='.*corrupt\.npz' is not a readable \.npz file", r"allowed: an \.npz holding"),
    # The class count of an arrays file is its largest label + 1: a gap is refused, with
    # the file, the split and the classes missing.
    ("npz_labels_not_0_to_c", dict(data__source="arrays", data__path="{npz_labels_0_and_7}"),
     DataError, r"^/.*/gap\.npz: split 'train': labels must be 0\.\.C-1 with every class "
     r"present", r"found 2 distinct labels \[0, 7\] and C=8 \(the largest label \+ 1\), "
     r"missing classes \[1, 2, 3, 4, 5, 6\]$"),
    ("npz_images_vs_labels", dict(data__source="arrays", data__path="{npz_40_images_30_labels}"),
     DataError, r"^/.*/count\.npz: split 'train': ", r"40 images but 30 labels$"),
    ("npz_test_label_not_a_train_class", dict(data__source="arrays",
                                              data__path="{npz_test_label_2}"),
     DataError, r"^/.*/test_label_2\.npz: split 'test': ",
     r"labels must be 0\.\.C-1 for the train split's C=2 classes; found labels outside "
     r"0\.\.1: \[2\]$"),
    ("workdir_under_a_file", dict(__workdir="{regular_file}/run"), ConfigError,
     r"--workdir='.*/a_file/run'", "a writable directory .*Not a directory"),
    ("workdir_is_a_file", dict(__workdir="{regular_file}"), ConfigError,
     r"--workdir='.*/a_file'", "a writable directory .*File exists"),
    # A full disk, as statvfs reports it (shutil.disk_usage), on the real workdir.
    ("workdir_full", dict(__free_bytes=5 << 20), ConfigError, r"--workdir='.*'",
     r"at least 100 MiB free .*\(it has 5\.0 MiB free\)"),
    # ---- environment: global batches must split evenly over the 8 (simulated) devices
    ("student_batch_vs_devices", dict(student__optim__batch_size=12), ConfigError,
     r"config\.student\.optim\.batch_size=12", r"a positive multiple of the device count \(8\)"),
    ("teacher_batch_vs_devices", dict(teacher__optim__batch_size=60), ConfigError,
     r"config\.teacher\.optim\.batch_size=60", r"multiple of the device count \(8\)"),
    ("eval_batch_vs_devices", dict(eval__batch_size=100), ConfigError,
     r"config\.eval\.batch_size=100", r"multiple of the device count \(8\)"),
    ("score_batch_vs_devices", dict(prune__method="el2n", score__batch_size=100), ConfigError,
     r"config\.score\.batch_size=100", r"multiple of the device count \(8\)"),
]


def _png(size, value=0):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _image_folder(root, bad=None):
    """root/{train,test}/{a,b}/NNNN.png, 8x8; `bad(split, cls, i, path)` may spoil one."""
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c))
            for i in range(6):
                path = os.path.join(root, split, c, f"{i:04d}.png")
                if not (bad and bad(split, c, i, path)):
                    with open(path, "wb") as f:
                        f.write(_png(8, 20 * i))
    return root


def _write_tar_gz(path, folder):
    with tarfile.open(path, "w:gz") as tf:
        tf.add(folder, arcname=".")
    return path


def _digits_like_npz(path, num_classes, per_class=(50, 10)):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "test"), per_class):
        labels = np.repeat(np.arange(num_classes), n).astype(np.int32)
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(labels), 8, 8, 1), np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def done(tmp_path_factory, quickstart_smoke_run):
    """A finished quickstart smoke run: its workdir holds every artifact."""
    workdir = quickstart_smoke_run(str(tmp_path_factory.mktemp("done")))
    config = load_config("quickstart.py", "smoke")
    pipeline.run(config, workdir)
    return config, workdir


@pytest.fixture(scope="module")
def files(tmp_path_factory, done):
    d = tmp_path_factory.mktemp("inputs")
    out = {"digits_teacher": os.path.join(done[1], "teacher")}

    def wrong_size(split, c, i, path):
        if (split, c, i) == ("train", "b", 2):
            with open(path, "wb") as f:
                f.write(_png(10))
            return True

    def a_directory(split, c, i, path):
        if (split, c, i) == ("train", "b", 3):
            os.makedirs(path)
            return True

    out["wrong_size_folder"] = _image_folder(str(d / "wrong_size"), wrong_size)
    out["unreadable_folder"] = _image_folder(str(d / "unreadable"), a_directory)
    good = _image_folder(str(d / "good"))
    whole = _write_tar_gz(str(d / "whole.tar.gz"), good)
    blob = open(whole, "rb").read()
    out["truncated_tar_gz"] = str(d / "truncated.tar.gz")
    with open(out["truncated_tar_gz"], "wb") as f:
        f.write(blob[: len(blob) // 2])

    def truncated_jpeg(split, c, i, path):
        if (split, c, i) == ("train", "b", 5):
            with open(path[:-4] + ".jpg", "wb") as f:
                f.write(b"\xff\xd8\xff\xe0" + b"\0" * 36)  # a JPEG header, then nothing
            return True

    out["bad_jpeg_tar_gz"] = _write_tar_gz(str(d / "bad_jpeg.tar.gz"),
                                           _image_folder(str(d / "bad_jpeg"), truncated_jpeg))
    out["dir_named_npz"] = str(d / "data.npz")
    os.makedirs(out["dir_named_npz"])
    out["npz_without_labels"] = str(d / "nolabels.npz")
    np.savez(out["npz_without_labels"], train_images=np.zeros((4, 8, 8, 1), np.uint8))
    out["corrupt_npz"] = str(d / "corrupt.npz")
    with open(out["corrupt_npz"], "wb") as f:
        f.write(b"PK\x03\x04" + b"\x00" * 60)  # a zip local header, then garbage
    def npz(key, file, train_labels, test_labels=(0, 1), num_images=None):
        rng = np.random.default_rng(0)
        n = len(train_labels) if num_images is None else num_images
        out[key] = str(d / file)
        np.savez(out[key], train_images=rng.integers(0, 256, (n, 8, 8, 1), np.uint8),
                 train_labels=np.asarray(train_labels, np.int32),
                 test_images=rng.integers(0, 256, (len(test_labels), 8, 8, 1), np.uint8),
                 test_labels=np.asarray(test_labels, np.int32))

    npz("npz_labels_0_and_7", "gap.npz", [0, 7] * 20, test_labels=(0, 7))
    npz("npz_40_images_30_labels", "count.npz", [0, 1] * 15, num_images=40)
    npz("npz_test_label_2", "test_label_2.npz", [0, 1] * 20, test_labels=(0, 1, 2))
    out["regular_file"] = str(d / "a_file")
    with open(out["regular_file"], "w") as f:
        f.write("not a directory\n")
    # Another run's teacher/, trained on data with 3 classes (same architecture and image
    # size as the digits teacher, so only the class count differs): trained on first use,
    # so a process that runs no row naming it (the 8-device one) never trains it.
    def teacher_3_classes():
        npz3 = _digits_like_npz(str(d / "three.npz"), 3)
        three = str(d / "three")
        pipeline.run(override(done[0], data__source="arrays", data__path=npz3), three)
        return os.path.join(three, "teacher")

    return _Lazy(out, teacher_3_classes=teacher_3_classes)


class _Lazy(dict):
    """A dict whose named entries are computed on first lookup (str.format_map reads only
    the keys a value names)."""

    def __init__(self, values, **later):
        super().__init__(values)
        self._later = later

    def __missing__(self, key):
        if key not in self._later:
            raise KeyError(key)
        self[key] = self._later.pop(key)()
        return self[key]


@pytest.fixture
def compiles():
    """Count XLA compilations (jax.monitoring's backend-compile events) during a test."""
    from jax import monitoring
    from jax._src import dispatch

    events = []

    def listener(event, duration, **kw):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            events.append(kw.get("fun_name", "?"))

    monitoring.register_event_duration_secs_listener(listener)
    yield events
    monitoring.unregister_event_duration_listener(listener)


def _resolve(fields, files):
    return {k: v.format_map(files) if isinstance(v, str) else v for k, v in fields.items()}


def test_the_table_is_long_enough():
    assert len(BAD) >= 25 and len({row[0] for row in BAD}) == len(BAD)


# The batch-vs-devices rows check the 8-device message, so they run in the 8-device process.
@pytest.mark.parametrize("name,fields,exc,field,allowed", [
    pytest.param(*r, id=r[0], marks=[pytest.mark.multidevice] if r[0].endswith("_vs_devices")
                 else []) for r in BAD])
def test_bad_input_stops_before_any_training(done, files, compiles, monkeypatch, name, fields,
                                             exc, field, allowed):
    config, workdir = done
    fields = _resolve(fields, files)
    compiles.clear()  # an input file made on first use (above) is not the bad input's work
    target = fields.pop("__workdir", workdir)
    free = fields.pop("__free_bytes", None)
    if free is not None:
        usage = shutil.disk_usage(workdir)
        monkeypatch.setattr(config_checks.shutil, "disk_usage",
                            lambda p: usage._replace(free=free))

    def no_training(*a, **kw):
        raise AssertionError("training started for a bad input")

    monkeypatch.setattr(training, "train_model", no_training)
    before = snapshot(workdir)
    with pytest.raises(UserError) as e:
        pipeline.run(override(config, **fields), target)
    msg = str(e.value)
    print(f"{name}: {type(e.value).__name__}: {msg}")  # pytest -rP lists every message
    assert type(e.value) is exc, (type(e.value), msg)
    assert "\n" not in msg, msg  # one message, one line
    assert re.search(field, msg), msg
    assert re.search(allowed, msg), msg
    assert compiles == [], f"compiled {compiles} before stopping"
    assert snapshot(workdir) == before


def test_val_fraction_suggestion_is_accepted():
    """The data.val_fraction the message suggests is one the run accepts (the bound is
    computed with the split's own rounding, so taking the advice must not fail again)."""
    config = load_config("quickstart.py", "smoke")
    for bad in (0.99, 0.997):
        with pytest.raises(ConfigError) as e:
            c = override(config, data__val_fraction=bad)
            pipeline._class_keep_counts(c, context.load_splits(c))
        suggested = float(re.search(r"data\.val_fraction <= ([0-9.]+)$", str(e.value))[1])
        c = override(config, data__val_fraction=suggested)
        counts = pipeline._class_keep_counts(c, context.load_splits(c))
        assert counts.min() >= 1, (bad, suggested, counts)


# ---- numerical faults: they happen while computing, so the run gets as far as the fault
NUMERICAL = [
    ("nan_loss", dict(student__optim__learning_rate=1e12), NonFiniteLossError,
     r"\[student\] non-finite (loss at|parameters after) step \d+",
     r"last finite metrics: .*last good checkpoint: .*config\.student\.optim\.learning_rate"),
    ("lissa_diverges", dict(prune__method="influence", influence__solver="lissa",
                            influence__lissa_scale=1e-3, influence__max_iters=500),
     SolverError, r"LiSSA diverged after \d+ iterations \(relative residual ([0-9.e+-]+|inf|nan)",
     r"raise influence\.lissa_scale \(now 0\.001\) and/or influence\.damping \(now 0\.001\)"),
    ("cg_not_converging", dict(prune__method="influence", influence__max_iters=1,
                               influence__tol=1e-9),
     SolverError, r"cg inverse-HVP did not converge: relative residual [0-9.e+-]+ after 1 "
     "iterations", r"raise influence\.max_iters \(now 1\) or influence\.damping \(now 0\.001\)"),
]


@pytest.fixture(scope="module")
def done_copy(done, tmp_path_factory):
    """A copy of the finished run (its teacher is reused; the original stays pristine)."""
    wd = str(tmp_path_factory.mktemp("numerical") / "w")
    shutil.copytree(done[1], wd)
    return done[0], wd


@pytest.mark.parametrize("name,fields,exc,what,knob", NUMERICAL, ids=[r[0] for r in NUMERICAL])
def test_numerical_fault_stops_with_where_and_the_knob(done_copy, name, fields, exc, what,
                                                       knob):
    config, workdir = done_copy
    with pytest.raises(UserError) as e:
        pipeline.run(override(config, **fields), workdir)
    msg = str(e.value)
    print(f"{name}: {type(e.value).__name__}: {msg}")
    assert type(e.value) is exc, (type(e.value), msg)
    assert "\n" not in msg, msg
    assert re.search(what, msg) and re.search(knob, msg), msg
    if exc is NonFiniteLossError:  # no checkpoint with non-finite weights was kept
        from tests.test_train import _saved_steps_all_finite

        assert all(_saved_steps_all_finite(os.path.join(workdir, "student")).values())


# ---- through the command line: one line on stderr, exit status 2, artifacts untouched
CLI = [
    ("keep_fraction", ["--config.prune.keep_fraction=1.5"], None,
     r"^error: config\.prune\.keep_fraction=1\.5 is invalid; allowed: a number in \(0, 1\]$"),
    ("batch_vs_devices", ["--config.student.optim.batch_size=12"], None,
     r"^error: config\.student\.optim\.batch_size=12 is invalid; allowed: a positive multiple "
     r"of the device count \(8\)$"),
    ("corrupt_archive", ["--config.data.source=image_folder",
                         "--config.data.path={truncated_tar_gz}"], None,
     r"^error: data\.path='.*truncated\.tar\.gz': archive is truncated or corrupt"),
    # Goes as far as the data (loaded, validation split carved) before the one line.
    ("val_fraction_starves_a_class", ["--config.data.val_fraction=0.99"], None,
     r"^error: config\.data\.val_fraction=0\.99 is invalid; allowed: a fraction leaving "
     r"every class at least 2 training examples"),
    ("workdir_under_a_file", [], "{regular_file}/run",
     r"^error: --workdir='.*/a_file/run' is invalid; allowed: a writable directory"),
    ("lissa_diverges", ["--config.prune.method=influence", "--config.influence.solver=lissa",
                        "--config.influence.lissa_scale=0.001", "--config.influence.max_iters=500",
                        "--config.teacher.init={digits_teacher}"], "{fresh}",
     r"^error: influence scores: LiSSA diverged .*relative residual.*raise "
     r"influence\.lissa_scale"),
]


@pytest.mark.parametrize("name,flags,workdir,line", CLI, ids=[r[0] for r in CLI])
def test_cli_prints_one_error_line_and_exits_2(done, files, tmp_path, name, flags, workdir,
                                               line):
    ctx = _Lazy(files, **files._later, fresh=lambda: str(tmp_path / "fresh"))
    workdir = (workdir or done[1]).format_map(ctx)
    before = snapshot(done[1])
    proc = subprocess.run(
        [sys.executable, "-m", "kdprune_jax.main", f"--config={SMOKE}", f"--workdir={workdir}",
         *(f.format_map(ctx) for f in flags)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=cli_env(8),  # 8 devices, whatever this process has (the batch row needs them)
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and re.search(line, errors[0]), proc.stderr[-3000:]
    assert proc.stderr.rstrip("\n").splitlines()[-1] == errors[0]  # the last thing printed
    assert snapshot(done[1]) == before
