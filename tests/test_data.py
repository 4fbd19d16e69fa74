"""Data: sources (digits, image folder / .tar.gz incl. the real CIFAR-10 archive, tfds mock),
splits, transforms, and grain loaders (determinism, per-process slicing, eval padding)."""

import io
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from kdprune_jax import data
from kdprune_jax.errors import ConfigError, DataError
from tests.helpers import cifar_archive


def _cfg(**kw):
    base = dict(source="digits", name="", path="", data_dir="", max_per_class=0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _jpeg(color, size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _make_tar(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))


def test_digits_split_is_fixed_and_disjoint():
    tr, te = data.load_split(_cfg(), "train"), data.load_split(_cfg(), "test")
    assert len(tr) + len(te) == 1797 and tr.num_classes == 10
    assert tr.source[0]["image"].shape == (8, 8, 1) and tr.source[0]["image"].dtype == np.uint8
    assert np.bincount(te.labels).min() >= 35  # stratified 20%
    assert tr.fingerprint == data.load_split(_cfg(), "train").fingerprint


def test_image_folder_tar_and_directory_agree(tmp_path):
    files = {f"train/{c}/{i}.jpg": _jpeg((40 * i, 100 * k, 0))
             for k, c in enumerate(["cat", "dog"]) for i in range(3)}
    _make_tar(tmp_path / "d.tar.gz", files)
    for name, blob in files.items():
        p = tmp_path / "dir" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    a = data.load_split(_cfg(source="image_folder", path=str(tmp_path / "d.tar.gz")), "train")
    b = data.load_split(_cfg(source="image_folder", path=str(tmp_path / "dir")), "train")
    assert a.class_names == ("cat", "dog") and list(a.labels) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(a.source.images, b.source.images)
    lim = data.load_split(_cfg(source="image_folder", path=str(tmp_path / "d.tar.gz"),
                               max_per_class=2), "train")
    assert list(lim.labels) == [0, 0, 1, 1]


def test_corrupt_image_names_the_file(tmp_path):
    files = {"train/a/0.jpg": _jpeg((1, 2, 3)), "train/a/1.jpg": b"not a jpeg at all"}
    _make_tar(tmp_path / "bad.tar.gz", files)
    with pytest.raises(DataError, match=r"train/a/1\.jpg"):
        data.load_split(_cfg(source="image_folder", path=str(tmp_path / "bad.tar.gz")), "train")


def test_wrong_size_image_names_the_file(tmp_path):
    files = {"train/a/0.jpg": _jpeg((1, 2, 3)), "train/a/1.jpg": _jpeg((1, 2, 3), (9, 8))}
    _make_tar(tmp_path / "sz.tar.gz", files)
    with pytest.raises(DataError, match=r"train/a/1\.jpg.*shape"):
        data.load_split(_cfg(source="image_folder", path=str(tmp_path / "sz.tar.gz")), "train")


def test_truncated_archive_and_missing_path(tmp_path):
    blob = (tmp_path / "t.tar.gz")
    _make_tar(blob, {f"train/a/{i}.jpg": os.urandom(3000) for i in range(20)})
    raw = blob.read_bytes()
    blob.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.load_split(_cfg(source="image_folder", path=str(blob)), "train")
    with pytest.raises(ConfigError, match="data.path"):
        data.load_split(_cfg(source="image_folder", path=str(tmp_path / "nope")), "train")


def test_real_cifar10_archive_slice():
    path = cifar_archive()
    s = data.load_split(_cfg(source="image_folder", path=path, max_per_class=20), "test")
    assert len(s) == 200 and s.num_classes == 10
    assert s.class_names[0] == "airplane" and s.class_names[-1] == "truck"
    img = s.source[0]["image"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    # Real photos: pixel statistics near the published CIFAR-10 mean (~120), not noise.
    assert 80 < s.source.images.mean() < 160 and s.source.images.std() > 40


def test_tfds_source_on_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        s = data.load_split(_cfg(source="tfds", name="cifar10"), "train")
        assert len(s) == 12 and s.num_classes == 10
        ex = s.source[3]
        assert ex["image"].shape == (32, 32, 3) and ex["label"] == s.labels[3]


def test_stratified_split_and_label_noise():
    labels = np.repeat(np.arange(4), [100, 50, 20, 2])
    rest, val = data.stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(rest, val)) == 0 and len(rest) + len(val) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=4), [10, 5, 2, 1])
    rest2, val2 = data.stratified_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(val, val2)
    noisy, flipped = data.symmetric_label_noise(labels, 0.3, 4, seed=0)
    assert len(flipped) == round(0.3 * len(labels))
    assert np.all(noisy[flipped] != labels[flipped])
    unchanged = np.setdiff1d(np.arange(len(labels)), flipped)
    np.testing.assert_array_equal(noisy[unchanged], labels[unchanged])


def test_cifar_augment_is_crop_and_flip():
    img = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = data.transforms.cifar_augment(img, rng)
        assert out.shape == img.shape
    # Shift 0 and no flip reproduces the centered crop exactly for some draw.
    seen_identity = any(
        np.array_equal(data.transforms.cifar_augment(img, np.random.default_rng(s)), img)
        for s in range(400))
    assert seen_identity


def test_imagenet_transforms_shapes():
    img = np.random.default_rng(0).integers(0, 255, (47, 71, 3), dtype=np.uint8)
    tr, ev = data.make_transforms("imagenet", 24, (0, 0, 0), (1, 1, 1))
    assert tr(img, np.random.default_rng(1)).shape == (24, 24, 3)
    assert ev(img).shape == (24, 24, 3) and ev(img).dtype == np.float32


def _digits_train():
    return data.load_split(_cfg(), "train")


def test_train_loader_deterministic_resumable_and_process_disjoint():
    split = _digits_train()
    idx = np.arange(0, 300)
    tr, _ = data.make_transforms("cifar", 8, (0,), (1,))
    kw = dict(global_batch_size=32, num_steps=20, seed=5, transform=tr)
    full = list(data.train_dataset(split, idx, **kw))
    again = list(data.train_dataset(split, idx, **kw))
    assert len(full) == 20 and full[0]["image"].shape == (32, 8, 8, 1)
    for a, b in zip(full, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    # Every epoch is a permutation of the indices (300 examples = 9.375 batches).
    first_epoch = np.concatenate([b["index"] for b in full])[:300]
    np.testing.assert_array_equal(np.sort(first_epoch), idx)
    # Two processes read disjoint halves that together form each global batch.
    p0 = list(data.train_dataset(split, idx, process_index=0, process_count=2, **kw))
    p1 = list(data.train_dataset(split, idx, process_index=1, process_count=2, **kw))
    for g, a, b in zip(full, p0, p1):
        np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), g["index"])
        np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), g["image"])
    # Resume from a saved iterator state gives the same remaining batches.
    it = iter(data.train_dataset(split, idx, **kw))
    for _ in range(7):
        next(it)
    state = it.get_state()
    it2 = iter(data.train_dataset(split, idx, **kw))
    it2.set_state(state)
    for want in full[7:]:
        np.testing.assert_array_equal(next(it2)["image"], want["image"])


def test_train_loader_with_worker_processes_matches_in_process():
    split = _digits_train()
    tr, _ = data.make_transforms("cifar", 8, (0,), (1,))
    kw = dict(global_batch_size=16, num_steps=6, seed=1, transform=tr)
    a = list(data.train_dataset(split, np.arange(100), **kw))
    b = list(data.train_dataset(split, np.arange(100), num_workers=2, **kw))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_eval_loader_pads_and_masks_every_example_once():
    split = _digits_train()
    _, ev = data.make_transforms("none", 8, (0,), (1,))
    idx = np.arange(10, 111)  # 101 examples, batch 16 -> 7 batches, 11 padding rows
    ds, n = data.eval_dataset(split, idx, global_batch_size=16, transform=ev)
    batches = list(ds)
    assert n == 7 and len(batches) == 7
    got = np.concatenate([b["index"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(got, idx)
    assert sum(float(b["mask"].sum()) for b in batches) == 101
