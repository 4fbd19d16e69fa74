"""Import PyTorch ResNet weights (torchvision layout) into our flax.nnx models.

    sd = load_torch_checkpoint("resnet50_teacher.pt")          # {torch key: np.ndarray}
    params, batch_stats = torch_state_dict_to_nnx(sd, "resnet50", num_classes=1000)
    graphdef, _, _ = nnx.split(create_model("resnet50", num_classes=1000), nnx.Param,
                               nnx.BatchStat)
    logits = nnx.merge(graphdef, params, batch_stats)(images_nhwc, train=False)

The checkpoint must use torchvision's ResNet key layout (what
``torchvision.models.resnet{18,34,50}(...).state_dict()`` produces). Our modules carry the
same blocks under other attribute names, so keys are renamed, never reordered:

    torch key                                  nnx path
    conv1.weight            [O, I, 7, 7]       stem/kernel           [7, 7, I, O]   (HWIO)
    bn1.{weight,bias}       [C]                stem_bn/{scale,bias}  [C]
    bn1.{running_mean,running_var}             stem_bn/{mean,var}    (batch_stats)
    layer{s}.{b}.conv1 ... bn3                 stages/{s-1}/{b}/conv1 ... bn3
    layer{s}.{b}.downsample.{0,1}              stages/{s-1}/{b}/downsample/{0,1}
    fc.weight               [K, D]             head/kernel           [D, K]
    fc.bias                 [K]                head/bias             [K]

``*.num_batches_tracked`` is ignored (our BatchNorm uses a fixed momentum). The CIFAR family
(``cifar_resnet{8,...,56}``) maps the same way from a PyTorch net written in torchvision's
style: ``conv1`` 3x3/1 (padding 1), ``bn1``, no max pool, ``layer1..3`` of torchvision
``BasicBlock``s with 16/32/64 * width planes and a 1x1 conv + BN ``downsample`` wherever the
shape changes (option B shortcuts; the parameter-free option A "pad" shortcut of some CIFAR
repos has no equivalent here), global average pooling, ``fc``. A ``width`` != 1 means every
channel count scaled by ``width`` (not torchvision's ``wide_resnet``, which widens only the
bottleneck's inner convs).

Inputs: the imported net sees what our pipeline feeds every model, NHWC images normalized with
``data.mean``/``data.std`` on the 0..255 scale; for a net trained with torchvision's
``Normalize(mean, std)`` on 0..1 images set ``data.mean = 255 * mean`` and
``data.std = 255 * std`` (channels in RGB order in both).

torch is needed only to read a file (``load_torch_checkpoint``), and is imported there;
converting an already loaded state dict needs numpy only.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdprune_jax.errors import ArtifactError, ConfigError

_IGNORED_SUFFIX = ".num_batches_tracked"
# nnx leaf name -> torch parameter/buffer name.
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}


def _torch_key(path: tuple) -> str:
    """nnx path (e.g. ``('stages', 0, 1, 'downsample', 0, 'kernel')``) -> torch key
    (``'layer1.1.downsample.0.weight'``)."""
    *mods, leaf = path
    if mods[0] == "stages":
        mods = [f"layer{int(mods[1]) + 1}", *mods[2:]]
    else:
        mods = [{"stem": "conv1", "stem_bn": "bn1", "head": "fc"}[mods[0]], *mods[1:]]
    return ".".join([*map(str, mods), _LEAF[leaf]])


def _to_torch_layout_shape(path: tuple, shape: tuple) -> tuple:
    """Shape an nnx array has in torch's layout (HWIO -> OIHW, [in, out] -> [out, in])."""
    if path[-1] == "kernel":
        return tuple(shape[::-1]) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _from_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    """A torch array in our layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if path[-1] == "kernel":
        value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(value)


def _to_numpy(key: str, value) -> np.ndarray:
    """np.ndarray or torch.Tensor (duck-typed, so torch is not imported) -> np.ndarray;
    floating tensors become float32 (numpy has no bfloat16)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value)
    raise ArtifactError(f"PyTorch state dict entry {key!r} is a {type(value).__name__}, not a "
                        "tensor; expected a model's state_dict()")


def _path_names(key_path) -> tuple:
    """jax key path of a State leaf -> names, without nnx's trailing ``value`` attribute."""
    names = []
    for k in key_path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            continue  # Variable.value
        names.append(getattr(k, "key", getattr(k, "idx", k)))
    return tuple(names)


def _guess_architecture(shapes: Mapping[str, tuple]) -> str | None:
    """Best guess of a torchvision-layout checkpoint's model from {key: shape}, for error
    messages only (None when the keys do not look like a torchvision-style ResNet)."""
    blocks = {}
    for k in shapes:
        m = re.match(r"layer(\d+)\.(\d+)\.", k)
        if m:
            s = int(m.group(1))
            blocks[s] = max(blocks.get(s, 0), int(m.group(2)) + 1)
    if not blocks or not shapes.get("conv1.weight") or not shapes.get("fc.weight"):
        return None
    counts = tuple(blocks[s] for s in sorted(blocks))
    bottleneck = any(k.endswith(".conv3.weight") for k in shapes)
    stem_out, classes = shapes["conv1.weight"][0], shapes["fc.weight"][0]
    if len(counts) == 4:
        name = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                ((3, 4, 6, 3), True): "resnet50"}.get((counts, bottleneck))
        width = stem_out / 64
    elif len(counts) == 3 and len(set(counts)) == 1 and not bottleneck:
        name, width = f"cifar_resnet{6 * counts[0] + 2}", stem_out / 16
    else:
        name, width = None, None
    if name is None:
        return f"a ResNet with {counts} blocks per stage and {classes} classes"
    return f"{name} (width {width:g}) with {classes} classes"


def torch_state_dict_to_nnx(state_dict: Mapping, model_name: str, num_classes: int,
                            width: float = 1.0, *, where: str = "PyTorch state dict"):
    """Convert a torchvision-layout ResNet state dict to our model's (params, batch_stats).

    Args:
      state_dict: {torch key: np.ndarray | torch.Tensor}, e.g. ``model.state_dict()`` or
        ``load_torch_checkpoint(path)``. Conv weights [O, I, kh, kw], BN vectors [C],
        fc weight [num_classes, D] and bias [num_classes].
      model_name: a registered name (``resnet18/34/50``, ``cifar_resnet{8,...,56}``).
      num_classes: classes of our model; must equal the checkpoint's fc rows.
      width: our channel multiplier (must match the checkpoint's channel counts).
      where: how error messages name the source (e.g. the file path).

    Returns:
      (params, batch_stats): ``nnx.State`` pytrees with the structure, shapes (HWIO conv
      kernels, [in, out] head kernel) and float32 dtype of
      ``nnx.split(create_model(model_name, num_classes=..., width=...), nnx.Param,
      nnx.BatchStat)[1:]``, holding jax arrays.

    Raises:
      ArtifactError: a key of the model missing from the state dict, a key of the state dict
        the model does not use (``num_batches_tracked`` aside), or a shape mismatch; the
        message names the key(s), both shapes (torch layout) and the fix.
    """
    from kdprune_jax.models import create_model  # here: models/__init__ imports this module

    model = nnx.eval_shape(lambda: create_model(model_name, num_classes=num_classes,
                                                width=width))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    # Problems are reported in the checkpoint's key order (torch's module order: conv1,
    # bn1, layer1..., fc), so the first one shown is where the architectures diverge.
    order = {k: i for i, k in enumerate(sd)}
    used, problems = set(), []

    def fill(key_path, leaf):
        path = _path_names(key_path)
        key, want = _torch_key(path), _to_torch_layout_shape(path, leaf.shape)
        if key not in sd:
            problems.append((len(order), f"{key!r} is missing there ({want} expected)"))
            return leaf
        used.add(key)
        got = _to_numpy(key, sd[key])
        if tuple(got.shape) != want:
            problems.append((order[key], f"{key!r} is {tuple(got.shape)} there, {want} here"))
            return leaf
        return jnp.asarray(_from_torch_layout(path, got), leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, params)
    batch_stats = jax.tree_util.tree_map_with_path(fill, batch_stats)
    problems += [(order[k], f"{k!r} {tuple(np.shape(sd[k]))} there is not used by {model_name}")
                 for k in set(sd) - used]
    if problems:
        problems = [text for _, text in sorted(problems)]
        guess = _guess_architecture({k: np.shape(v) for k, v in state_dict.items()})
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} problems in all)"
                                           if len(problems) > 3 else "")
        raise ArtifactError(
            f"{where} does not fit teacher.model={model_name!r} (width {width:g}, "
            f"num_classes {num_classes}), shapes in torch layout: {shown}. "
            + (f"The checkpoint looks like {guess}. " if guess else "")
            + "Set teacher.model/teacher.width to the checkpoint's architecture; its fc must "
            "have as many outputs as the data has classes (num_classes)")
    return params, batch_stats


def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Read a ``.pt``/``.pth`` PyTorch checkpoint into {key: np.ndarray} (floats as float32).

    Accepts a plain state dict (``torch.save(model.state_dict(), path)``) or a dict holding
    one under ``"state_dict"`` or ``"model"`` (common training-script checkpoints); a
    ``"module."`` key prefix (``nn.DataParallel``/DDP) is stripped. Read with
    ``weights_only=True``: tensors and plain containers only, no code from the file runs.

    Raises:
      ConfigError (field ``teacher.init``): torch is not installed.
      ArtifactError: the file cannot be read or holds no state dict.
    """
    try:
        import torch
    except ImportError as e:
        raise ConfigError("teacher.init", path,
                          "a kdprune_jax teacher checkpoint directory; reading a PyTorch "
                          ".pt/.pth file needs torch: pip install 'kdprune_jax[torch]'") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ArtifactError(
            f"cannot read PyTorch checkpoint {path}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}; save it with "
            "torch.save(model.state_dict(), path) (a pickled nn.Module is refused)") from e

    def is_state_dict(d):
        return isinstance(d, Mapping) and d and all(isinstance(v, torch.Tensor)
                                                    for v in d.values())

    if not is_state_dict(obj) and isinstance(obj, Mapping):
        obj = next((obj[k] for k in ("state_dict", "model") if is_state_dict(obj.get(k))), obj)
    if not is_state_dict(obj):
        what = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping)
                else f"a {type(obj).__name__}")
        raise ArtifactError(f"PyTorch checkpoint {path} holds {what}, not a state dict of "
                            "tensors (plain, or under 'state_dict' or 'model')")
    return {k.removeprefix("module."): _to_numpy(k, v) for k, v in obj.items()}


def file_sha256(path: str, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (a fingerprint that survives moving/copying the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
