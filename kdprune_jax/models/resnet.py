"""flax.nnx ResNets: the CIFAR family (He et al. 2016, depth 6n+2) and the ImageNet family
(ResNet-18/34/50, layer for layer as torchvision's, so PyTorch weights map 1:1).

Call: ``model(x, *, train=False, return_features=False)`` with x float [B, H, W, C] (NHWC).
``train=True`` normalizes with batch statistics and updates the running ones;
``train=False`` is inference mode. Returns logits float32 [B, num_classes], or
``(logits, features)`` with the pooled penultimate features float32 [B, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdprune_jax.models.batchnorm import BatchNorm

# Explicit symmetric padding (not "SAME"): for stride 2, SAME pads asymmetrically
# (0 before, 1 after), which would not match PyTorch's padding=1 / padding=3.
_PAD1 = ((1, 1), (1, 1))
_PAD3 = ((3, 3), (3, 3))


def _conv(cin, cout, k, stride, pad, rngs, dtype):
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=pad, use_bias=False,
                    kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _bn(c, rngs, dtype, zero=False):
    # momentum 0.9 in flax's convention == torch's momentum 0.1; eps as torch.
    return BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                         scale_init=nnx.initializers.zeros if zero else nnx.initializers.ones,
                         rngs=rngs)


def _projection(cin, cout, stride, rngs, dtype):
    """1x1 conv (stride s) + BN where the block changes shape, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nnx.List([_conv(cin, cout, 1, stride, "VALID", rngs, dtype), _bn(cout, rngs, dtype)])


def _shortcut(downsample, x, use_running_average):
    if downsample is None:
        return x
    conv, bn = downsample
    return bn(conv(x), use_running_average=use_running_average)


class BasicBlock(nnx.Module):
    """3x3 conv-BN-relu, 3x3 conv-BN, + shortcut (1x1 conv-BN projection when the shape
    changes), relu."""

    expansion = 1

    def __init__(self, cin, planes, stride, *, rngs, dtype, zero_init_residual=False):
        self.conv1 = _conv(cin, planes, 3, stride, _PAD1, rngs, dtype)
        self.bn1 = _bn(planes, rngs, dtype)
        self.conv2 = _conv(planes, planes, 3, 1, _PAD1, rngs, dtype)
        self.bn2 = _bn(planes, rngs, dtype, zero=zero_init_residual)
        self.downsample = _projection(cin, planes, stride, rngs, dtype)

    def __call__(self, x, train: bool):
        ura = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        return nnx.relu(y + _shortcut(self.downsample, x, ura))


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (carries the stride: torchvision's "v1.5"), 1x1 expand x4."""

    expansion = 4

    def __init__(self, cin, planes, stride, *, rngs, dtype, zero_init_residual=False):
        out = planes * 4
        self.conv1 = _conv(cin, planes, 1, 1, "VALID", rngs, dtype)
        self.bn1 = _bn(planes, rngs, dtype)
        self.conv2 = _conv(planes, planes, 3, stride, _PAD1, rngs, dtype)
        self.bn2 = _bn(planes, rngs, dtype)
        self.conv3 = _conv(planes, out, 1, 1, "VALID", rngs, dtype)
        self.bn3 = _bn(out, rngs, dtype, zero=zero_init_residual)
        self.downsample = _projection(cin, out, stride, rngs, dtype)

    def __call__(self, x, train: bool):
        ura = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=ura))
        y = self.bn3(self.conv3(y), use_running_average=ura)
        return nnx.relu(y + _shortcut(self.downsample, x, ura))


def _width(c, width):
    return max(1, int(round(c * width)))


class _ResNetBase(nnx.Module):
    def _build(self, block, blocks, base_widths, strides, *, stem, num_classes, rngs, dtype,
               width, zero_init_residual, in_channels):
        """Stem conv (kernel, stride, padding) + BN, the stages, and the `head`."""
        self.dtype = dtype
        self.in_channels = in_channels
        widths = [_width(c, width) for c in base_widths]
        k, st, pad = stem
        self.stem = _conv(in_channels, widths[0], k, st, pad, rngs, dtype)
        self.stem_bn = _bn(widths[0], rngs, dtype)
        self.stages, cout = self._make_stages(block, widths[0], widths, blocks, strides, rngs,
                                              dtype, zero_init_residual)
        self.head = nnx.Linear(cout, num_classes, dtype=dtype, param_dtype=jnp.float32,
                               rngs=rngs)

    def _stem(self, x, train):
        x = _adapt_channels(x, self.in_channels).astype(self.dtype)
        return nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))

    def _make_stages(self, block, cin, widths, blocks, strides, rngs, dtype, zir):
        stages = []
        for planes, n, stride in zip(widths, blocks, strides):
            layer = []
            for i in range(n):
                layer.append(block(cin, planes, stride if i == 0 else 1, rngs=rngs, dtype=dtype,
                                   zero_init_residual=zir))
                cin = planes * block.expansion
            stages.append(nnx.List(layer))
        return nnx.List(stages), cin

    def _trunk(self, x, train):
        for stage in self.stages:
            for blk in stage:
                x = blk(x, train)
        return x

    def _finish(self, x, return_features):
        feats = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
        logits = self.head(feats.astype(self.dtype)).astype(jnp.float32)
        return (logits, feats) if return_features else logits


class CifarResNet(_ResNetBase):
    """CIFAR ResNet of depth 6n+2 (8, 14, 20, 32, 56, ...): 3x3 stem with 16*width channels,
    three stages of n BasicBlocks with 16/32/64 * width channels (strides 1, 2, 2),
    global average pooling, linear `head`. Features: [B, 64 * width]."""

    def __init__(self, depth: int, *, num_classes: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 width: float = 1.0, zero_init_residual: bool = False, in_channels: int = 3):
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 >= 8, got {depth}")
        n = (depth - 2) // 6
        self._build(BasicBlock, [n] * 3, (16, 32, 64), [1, 2, 2], stem=(3, 1, _PAD1),
                    num_classes=num_classes, rngs=rngs, dtype=dtype, width=width,
                    zero_init_residual=zero_init_residual, in_channels=in_channels)

    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        return self._finish(self._trunk(self._stem(x, train), train), return_features)


class ImageNetResNet(_ResNetBase):
    """torchvision-layout ResNet: 7x7/2 stem, 3x3/2 max pool, four stages (64, 128, 256,
    512) * width, BasicBlock (18/34) or Bottleneck (50), global average pooling, `head`.
    Features: [B, 512 * width * expansion]."""

    def __init__(self, block, blocks, *, num_classes: int, rngs: nnx.Rngs, dtype=jnp.float32,
                 width: float = 1.0, zero_init_residual: bool = False, in_channels: int = 3):
        self._build(block, blocks, (64, 128, 256, 512), [1, 2, 2, 2], stem=(7, 2, _PAD3),
                    num_classes=num_classes, rngs=rngs, dtype=dtype, width=width,
                    zero_init_residual=zero_init_residual, in_channels=in_channels)

    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        x = self._stem(x, train)
        # Max pool 3x3/2 with padding 1 (padding value -inf, as torch.nn.MaxPool2d).
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
        return self._finish(self._trunk(x, train), return_features)


def _adapt_channels(x, in_channels):
    """Grayscale input to a 3-channel model: repeat the channel (cheap, exact for gray)."""
    if x.shape[-1] == 1 and in_channels == 3:
        return jnp.repeat(x, 3, axis=-1)
    return x
