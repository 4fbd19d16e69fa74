"""Per-example image transforms (numpy, run inside grain workers).

Every transform maps uint8 [H, W, C] -> float32 [h, w, C] normalized with per-channel
mean/std given in [0, 255] units. Random transforms take a `np.random.Generator` supplied by
grain's `random_map`, derived from the pipeline seed and the element's position, so the
augmentation of every example is reproducible and independent of the worker count.
"""

from __future__ import annotations

import numpy as np

AUGMENTATIONS = ("none", "cifar", "imagenet")


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    x = image.astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def cifar_augment(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Zero-pad by `pad` pixels, take a random crop of the original size, random h-flip."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    out = padded[dy : dy + h, dx : dx + w]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (height, width) with PIL (antialiased when shrinking)."""
    from PIL import Image

    squeeze = image.shape[-1] == 1
    im = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(im.resize((size[1], size[0]), Image.BILINEAR))
    return out[..., None] if squeeze else out


def random_resized_crop(
    image: np.ndarray, rng: np.random.Generator, size: int,
    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10,
) -> np.ndarray:
    """Inception-style crop (as in torchvision / big_vision): random area and aspect ratio,
    resized to size x size; falls back to a center crop."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            return _resize(image[y : y + ch, x : x + cw], (size, size))
    return center_crop(image, size, crop_fraction=1.0)


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Resize the shorter side to size / crop_fraction (256 for 224), then center-crop."""
    h, w = image.shape[:2]
    short = int(round(size / crop_fraction))
    if h <= w:
        nh, nw = short, max(short, int(round(w * short / h)))
    else:
        nw, nh = short, max(short, int(round(h * short / w)))
    image = _resize(image, (nh, nw))
    y, x = (nh - size) // 2, (nw - size) // 2
    return image[y : y + size, x : x + size]


def imagenet_augment(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    out = random_resized_crop(image, rng, size)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def make_transforms(augment: str, image_size: int, mean, std):
    """Returns (train_fn(image, rng) -> float32, eval_fn(image) -> float32)."""
    if augment == "cifar":
        return (lambda im, rng: normalize(cifar_augment(im, rng), mean, std),
                lambda im: normalize(im, mean, std))
    if augment == "imagenet":
        return (lambda im, rng: normalize(imagenet_augment(im, rng, image_size), mean, std),
                lambda im: normalize(center_crop(im, image_size), mean, std))
    if augment == "none":
        return (lambda im, rng: normalize(im, mean, std), lambda im: normalize(im, mean, std))
    from kdprune_jax.errors import ConfigError

    raise ConfigError("data.augment", augment, ", ".join(AUGMENTATIONS))
