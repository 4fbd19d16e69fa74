"""Random-access data sources. Each split is a `Split`: `split.source[i]` returns
``{"image": uint8[H, W, C], "label": int}`` and `split.labels` holds all labels without
decoding images (needed for stratified splits and class-balanced selection).

An example's stable `index` is its position in its source split; everything downstream
(validation split, subsets, scores, checkpoints) refers to examples by that index.

Kinds (``config.data.source``):
  digits        scikit-learn's 8x8 handwritten digits, shipped inside the installed package
                (1,797 images, 10 classes); a fixed stratified 80/20 train/test cut.
  image_folder  ``<root>/<split>/<class>/<file>`` of JPEG/PNG files, where root is a
                directory or a .tar / .tar.gz of one (read in place, never extracted to disk).
  tfds          ``tfds.data_source(name, split)`` over a prepared TFDS data dir (no download).
  arrays        an .npz with ``<split>_images`` uint8 [N, H, W, C] and ``<split>_labels`` [N].
                C is the training split's largest label + 1, so its labels must be exactly
                0..C-1 with every class present (`check_train_labels`); an eval split may
                lack classes but not hold others (`with_train_classes`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import tarfile
import zipfile
from collections.abc import Sequence

import numpy as np

from kdprune_jax.errors import ConfigError, DataError

SOURCE_KINDS = ("digits", "image_folder", "tfds", "arrays")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
      source: random-access sequence; ``source[i] -> {"image": uint8[H,W,C], "label": int}``.
      labels: int32 [N], ``labels[i] == source[i]["label"]``.
      num_classes: C.
      class_names: C names in label order.
      fingerprint: short hash identifying the exact examples (source, split, slice, labels).
    """

    source: Sequence
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        return int(self.source[0]["image"].shape[-1])


class ArraySource:
    """In-memory random-access source over uint8 images [N, H, W, C] and labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(
                f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(np.ascontiguousarray(p).data if isinstance(p, np.ndarray)
                 else repr(p).encode())
    return h.hexdigest()[:16]


def array_split(images, labels, *, num_classes=None, class_names=None, name="arrays") -> Split:
    """A `Split` over in-memory arrays (images uint8 [N, H, W, C], labels int [N])."""
    labels = np.asarray(labels, np.int32)
    num_classes = int(num_classes or (labels.max() + 1 if len(labels) else 0))
    names = tuple(class_names or (str(c) for c in range(num_classes)))
    return Split(
        ArraySource(np.asarray(images), labels), labels, num_classes, names,
        # The pixels too: another file with the same name, shape and labels is other data.
        _fingerprint(name, labels, images.shape, np.asarray(images)),
    )


# ----------------------------------------------------------------------------- digits
def _digits_split(split: str) -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are 0..16; scale to the uint8 range every other source uses.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    # sklearn ships no test split: carve a fixed stratified 20% (seed fixed forever, so the
    # test set never changes between runs or versions of this package).
    rng = np.random.default_rng(20240307)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[: round(0.2 * (labels == c).sum())]
         for c in range(10)]
    )
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    keep = is_test if split == "test" else ~is_test
    return array_split(images[keep], labels[keep], num_classes=10, name=f"digits/{split}")


# ----------------------------------------------------------------------------- image folder
def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"corrupt or unreadable image file {name!r}: {e}; allowed in "
                        "data.path: JPEG/PNG/BMP files PIL can decode (replace or remove "
                        "this one)") from None


def _folder_members(root: str, split: str):
    """Yield (class_name, file_name, read_bytes_fn) for root/<split>/<class>/<file>."""
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        have = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise DataError(f"image folder data.path={root!r} has no split directory {split!r} "
                        f"(data.train_split / data.eval_split); allowed: {', '.join(have)}")
    for cls in sorted(os.listdir(base)):
        cdir = os.path.join(base, cls)
        if not os.path.isdir(cdir):
            continue
        for f in sorted(os.listdir(cdir)):
            if f.lower().endswith(_IMAGE_EXTENSIONS):
                path = os.path.join(cdir, f)
                yield cls, path, (lambda p=path: open(p, "rb").read())


_IN_MEMORY_ARCHIVE_BYTES = 2 << 30


def _open_tar(path: str) -> tarfile.TarFile:
    """Open a .tar/.tar.gz for random member access.

    A gzip stream is not seekable, so tarfile would re-decompress from the start to reach
    each member (15 s to list CIFAR-10's 60k members). Archives up to 2 GiB are instead
    decompressed into memory once (0.3 s, 93 MB for CIFAR-10) and read from there.
    """
    if os.path.getsize(path) > _IN_MEMORY_ARCHIVE_BYTES:
        return tarfile.open(path, "r:*")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")


def _image_folder_split(path: str, split: str, max_per_class: int | None) -> Split:
    """Decode root/<split>/<class>/* (a directory or a .tar[.gz] of one) into memory.

    Images are decoded eagerly so that a corrupt file or an image of the wrong size stops
    the run before any training, with the file's name. CIFAR-10 decodes in about 10 s and
    takes 184 MB as uint8; datasets that do not fit in memory belong in TFDS.
    """
    if not os.path.exists(path):
        raise ConfigError("data.path", path, "an existing image folder or .tar/.tar.gz of one")
    entries = []  # (class, name, bytes)
    if os.path.isdir(path):
        per_class: dict[str, int] = {}
        for cls, name, read in _folder_members(path, split):
            if max_per_class and per_class.get(cls, 0) >= max_per_class:
                continue
            per_class[cls] = per_class.get(cls, 0) + 1
            try:
                entries.append((cls, name, read()))
            except OSError as e:  # e.g. a directory named like an image, or no permission
                raise DataError(f"cannot read image file {name!r} in data.path ({e.strerror});"
                                " allowed: readable JPEG/PNG/BMP files") from None
    else:
        try:
            tf = _open_tar(path)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"data.path={path!r}: archive is truncated or corrupt ({e}); "
                            f"allowed: an image folder or a readable .tar/.tar.gz of "
                            f"<split>/<class>/<image>") from None
        with tf:
            # Members beyond max_per_class are skipped without decoding.
            members = []
            try:
                for m in tf:
                    parts = m.name.lstrip("./").split("/")
                    # Accept an optional top-level directory: [top/]split/class/file.
                    if len(parts) >= 3 and parts[-3] == split and m.isfile():
                        if parts[-1].lower().endswith(_IMAGE_EXTENSIONS):
                            members.append((parts[-2], m))
                members.sort(key=lambda cm: (cm[0], cm[1].name))
                per_class = {}
                for cls, m in members:
                    if max_per_class and per_class.get(cls, 0) >= max_per_class:
                        continue
                    per_class[cls] = per_class.get(cls, 0) + 1
                    f = tf.extractfile(m)
                    entries.append((cls, f"{path}:{m.name}", f.read()))
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"data.path={path!r}: archive is truncated or corrupt ({e}); "
                                f"allowed: an image folder or a readable .tar/.tar.gz of "
                                f"<split>/<class>/<image>") from None
    if not entries:
        raise DataError(f"no images found for split {split!r} in {path!r}")
    class_names = tuple(sorted({c for c, _, _ in entries}))
    cls_index = {c: i for i, c in enumerate(class_names)}
    images = [_decode(b, n) for _, n, b in entries]
    shape = images[0].shape
    for img, (_, n, _) in zip(images, entries):
        if img.shape != shape:
            raise DataError(
                f"image {n!r} has shape {img.shape}, expected {shape} like the first image "
                f"{entries[0][1]!r} in data.path; allowed: images of one size (resize them "
                f"all to {shape[1]}x{shape[0]})"
            )
    labels = np.array([cls_index[c] for c, _, _ in entries], np.int32)
    images = np.stack(images)
    names = [n.rsplit(":", 1)[-1] for _, n, _ in entries]
    return Split(
        ArraySource(images, labels), labels, len(class_names), class_names,
        _fingerprint("image_folder", os.path.basename(path), split, names, labels, images),
    )


# ----------------------------------------------------------------------------- tfds
class _TfdsSource:
    """Wraps a tfds data source so items are {"image", "label"} numpy values."""

    def __init__(self, ds, image_key="image", label_key="label"):
        self.ds, self.image_key, self.label_key = ds, image_key, label_key

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        ex = self.ds[int(i)]
        img = np.asarray(ex[self.image_key], np.uint8)
        if img.ndim == 2:
            img = img[..., None]
        return {"image": img, "label": int(ex[self.label_key])}


def _tfds_split(name: str, split: str, data_dir: str | None, max_per_class) -> Split:
    import tensorflow_datasets as tfds

    try:
        # download=False: nothing is fetched at run time; the data must be prepared.
        ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        info = tfds.builder(name, data_dir=data_dir or None).info
    except Exception as e:  # tfds raises several unrelated types for "not prepared"
        raise DataError(
            f"tfds dataset {name!r} split {split!r} is not available in data_dir "
            f"{data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')!r}: {e}"
        ) from None
    # Labels are read once without decoding images (SkipDecoding keeps them as bytes).
    try:
        lab_ds = tfds.data_source(
            name, split=split, data_dir=data_dir or None, download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        labels = np.array([int(lab_ds[i]["label"]) for i in range(len(lab_ds))], np.int32)
    except Exception:
        labels = np.array([int(ds[i]["label"]) for i in range(len(ds))], np.int32)
    num_classes = int(info.features["label"].num_classes)
    names = tuple(info.features["label"].names)
    source = _TfdsSource(ds)
    if max_per_class:
        keep = np.concatenate(
            [np.flatnonzero(labels == c)[:max_per_class] for c in range(num_classes)]
        )
        keep.sort()
        source = _Subset(source, keep)
        labels = labels[keep]
    return Split(
        source, labels, num_classes, names,
        _fingerprint("tfds", name, split, len(ds), labels, max_per_class),
    )


class _Subset:
    def __init__(self, source, idx):
        self.source, self.idx = source, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.source[int(self.idx[i])]


# ----------------------------------------------------------------------------- entry point
def load_split(data_cfg, split: str) -> Split:
    """Build the `Split` named `split` from ``config.data`` (see module docstring)."""
    kind = data_cfg.source
    max_per_class = data_cfg.get("max_per_class", 0) or None
    if kind == "digits":
        s = _digits_split(split)
        if max_per_class:
            keep = np.sort(np.concatenate(
                [np.flatnonzero(s.labels == c)[:max_per_class] for c in range(s.num_classes)]
            ))
            s = array_split(s.source.images[keep], s.labels[keep], num_classes=10,
                            name=f"digits/{split}/{max_per_class}")
        return s
    if kind == "image_folder":
        return _image_folder_split(data_cfg.path, split, max_per_class)
    if kind == "tfds":
        return _tfds_split(data_cfg.name, split, data_cfg.get("data_dir", ""), max_per_class)
    if kind == "arrays":
        if not os.path.exists(data_cfg.path):
            raise ConfigError("data.path", data_cfg.path, "an existing .npz file")
        allowed = (f"allowed: an .npz holding uint8 '{split}_images' [N, H, W, C] and "
                   f"'{split}_labels' [N]")
        try:
            with np.load(data_cfg.path) as z:
                missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in z]
                if missing:
                    raise DataError(f"data.path={data_cfg.path!r} has no array "
                                    f"{missing[0]!r} (it has {sorted(z.files)}); {allowed}")
                images, labels = z[f"{split}_images"], z[f"{split}_labels"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"data.path={data_cfg.path!r} is not a readable .npz file "
                            f"({type(e).__name__}: {e}); {allowed}") from None
        _check_arrays(images, labels, describe_split(data_cfg, split), allowed)
        return array_split(images, labels,
                           name=f"arrays/{os.path.basename(data_cfg.path)}/{split}")
    raise ConfigError("data.source", kind, ", ".join(SOURCE_KINDS))


def _check_arrays(images, labels, where: str, allowed: str) -> None:
    """The shapes and types of one split of an arrays .npz, checked here (not only in
    `ArraySource`) so that the message names the file and the split."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 [N, H, W, C], got {images.dtype} "
                        f"{images.shape}; {allowed}")
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be class ids [N], got shape {labels.shape} "
                        f"(one-hot labels? store labels.argmax(-1)); {allowed}")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    # Casting to int32 would truncate 2.5 to 2 without a word; integral floats are fine.
    if labels.dtype.kind not in "iub":
        integral = (np.isfinite(labels) & (labels == np.round(labels))
                    if labels.dtype.kind == "f" else np.zeros(len(labels), bool))
        if not integral.all():
            raise DataError(f"{where}: labels must be integer class ids, got {labels.dtype} "
                            f"values such as {labels[~integral][0].item()!r}; {allowed}")


def describe_split(data_cfg, split: str) -> str:
    """How a message names a split: its file (or dataset) and the split's name."""
    if data_cfg.source in ("arrays", "image_folder"):
        return f"{data_cfg.path}: split {split!r}"
    if data_cfg.source == "tfds":
        return f"tfds dataset {data_cfg.name!r}: split {split!r}"
    return f"data.source={data_cfg.source!r}: split {split!r}"


def _listed(values, limit: int = 12) -> str:
    values = [int(v) for v in values]
    if len(values) <= limit:
        return str(values)
    return f"[{', '.join(map(str, values[:limit]))}, ...] ({len(values)} in all)"


def check_train_labels(s: Split, where: str, inferred: bool,
                       allow_missing: bool = False) -> None:
    """Refuse a training split whose labels are not exactly 0..C-1 with every class present.

    `allow_missing` (TFDS: C is the dataset's published class list) accepts classes absent
    from a slice such as ``train[:1%]``; such a class keeps no examples. Labels outside
    0..C-1 are refused either way.

    Every class gets an output unit and a share of the kept subset, so a class without a
    training example is a model output nothing teaches and a per-class count of zero. When
    C is inferred from the largest label (``inferred``, arrays files), a gap in the labels
    is also the sign of a file that is not what its user thinks: a slice of a bigger
    dataset, or labels that start at 1.

    Raises:
      DataError naming `where` (the file and split), the labels found and the classes
      missing.
    """
    if not len(s.labels):
        raise DataError(f"{where}: no examples; allowed: a training split with at least one "
                        "example of every class")
    present = np.unique(s.labels)
    c = s.num_classes
    outside = present[(present < 0) | (present >= c)]
    missing = np.setdiff1d(np.arange(c), present) if not allow_missing else np.zeros(0, int)
    if len(outside) == 0 and len(missing) == 0:
        return
    how = "the largest label + 1" if inferred else "the dataset's class list"
    problems = []
    if len(missing):
        problems.append(f"missing classes {_listed(missing)}")
    if len(outside):
        problems.append(f"labels outside 0..{c - 1}: {_listed(outside)}")
    raise DataError(f"{where}: labels must be 0..C-1 with every class present; found "
                    f"{len(present)} distinct labels {_listed(present)} and C={c} ({how}), "
                    + "; ".join(problems))


def with_train_classes(test: Split, train: Split, where: str) -> Split:
    """An arrays eval split with the train split's C classes: its own class count (the
    largest label + 1) says nothing when a small test set lacks the last class, so only
    labels outside the train split's 0..C-1 are refused."""
    c = train.num_classes
    present = np.unique(test.labels)
    outside = present[(present < 0) | (present >= c)]
    if len(outside):
        raise DataError(f"{where}: labels must be 0..C-1 for the train split's C={c} classes; "
                        f"found labels outside 0..{c - 1}: {_listed(outside)}")
    return dataclasses.replace(test, num_classes=c, class_names=train.class_names)
