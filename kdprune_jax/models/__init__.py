"""Model registry: name -> constructor of a flax.nnx module.

    model = create_model("cifar_resnet20", num_classes=10, seed=0)
    logits = model(images, train=False)                   # [B, 10] float32
    logits, feats = model(images, return_features=True)    # + [B, 64] float32

Models never see a config, only these arguments. `torch_state_dict_to_nnx` /
`load_torch_checkpoint` import torchvision-layout PyTorch ResNet weights (`torch_import`).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from kdprune_jax.models import torch_import
from kdprune_jax.models.batchnorm import BatchNorm
from kdprune_jax.models.resnet import BasicBlock, Bottleneck, CifarResNet, ImageNetResNet
from kdprune_jax.models.torch_import import load_torch_checkpoint, torch_state_dict_to_nnx

_REGISTRY = {}


def register_model(name: str, constructor) -> None:
    """Add ``constructor(*, num_classes, rngs, dtype, width, zero_init_residual)``."""
    global MODEL_NAMES
    _REGISTRY[name] = constructor
    MODEL_NAMES = tuple(sorted(_REGISTRY))


for _d in (8, 14, 20, 32, 56):
    register_model(f"cifar_resnet{_d}", functools.partial(CifarResNet, _d))
register_model("resnet18", functools.partial(ImageNetResNet, BasicBlock, [2, 2, 2, 2]))
register_model("resnet34", functools.partial(ImageNetResNet, BasicBlock, [3, 4, 6, 3]))
register_model("resnet50", functools.partial(ImageNetResNet, Bottleneck, [3, 4, 6, 3]))

MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def create_model(name: str, *, num_classes: int, seed: int = 0, dtype=jnp.float32,
                 width: float = 1.0, zero_init_residual: bool = False) -> nnx.Module:
    """Build the registered model `name` with parameters initialized from `seed`.

    Raises ValueError naming the allowed models for an unknown `name`.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _REGISTRY[name](num_classes=num_classes, rngs=nnx.Rngs(seed), dtype=dtype,
                           width=width, zero_init_residual=zero_init_residual)


def _with_layer_attrs(graphdef, params, batch_stats, types, **attrs):
    """A new graphdef whose layers of `types` have `attrs` set. Layer attributes such as
    `dtype` are static: they live in the graphdef, so a new graphdef
    (and a new jit trace) is the whole change; parameters are not touched."""
    model = nnx.merge(graphdef, params, batch_stats)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, types):
            for k, v in attrs.items():
                setattr(m, k, v)
    return nnx.split(model, nnx.Param, nnx.BatchStat)[0]


def with_compute_dtype(graphdef, params, batch_stats, dtype):
    """The graphdef of the same model computing in `dtype` (e.g. jnp.bfloat16).

    Mixed precision the usual way: every Conv/Linear/BatchNorm computes in `dtype`, while
    the parameters and BatchNorm statistics stay float32 (each layer casts its float32
    weights when it runs) and losses upcast the logits (`losses._f32`), so the loss, the
    gradients and the optimizer update are float32. `dtype=None` returns `graphdef`.

    Args: graphdef, params, batch_stats from ``nnx.split(model, nnx.Param, nnx.BatchStat)``.
    """
    if dtype is None:
        return graphdef
    return _with_layer_attrs(graphdef, params, batch_stats,
                             (nnx.Conv, nnx.Linear, nnx.BatchNorm), dtype=dtype)


def with_batchnorm_vjp(graphdef, params, batch_stats, *, closed_form: bool):
    """The graphdef of the same model whose `models.batchnorm.BatchNorm` layers train with
    our closed-form backward (`closed_form=True`, the default of every model) or with
    flax.nnx.BatchNorm's own call (False; what benchmarks/kd_step.py compares against).
    Variables and results are the same up to float32 rounding."""
    return _with_layer_attrs(graphdef, params, batch_stats, (BatchNorm,),
                             closed_form_vjp=closed_form)


__all__ = ["MODEL_NAMES", "create_model", "load_torch_checkpoint", "register_model",
           "torch_import", "torch_state_dict_to_nnx", "with_batchnorm_vjp",
           "with_compute_dtype"]
