"""PyTorch teacher import: torchvision ResNet-18/34/50 (and a torchvision-style CIFAR ResNet)
converted to our NNX models give the same inference logits; .pt file formats; mismatched
checkpoints refused with the key and both shapes; teacher.init=file.pt in the pipeline.

Needs the `torch` extra (pip install -e '.[torch]', part of the README's test command);
without torch these tests FAIL (never skip).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdprune_jax import context, data, models, pipeline, sharding
from kdprune_jax.errors import ArtifactError, ConfigError
from kdprune_jax.models.torch_import import load_torch_checkpoint, torch_state_dict_to_nnx
from kdprune_jax.stages import teacher
from tests.test_pipeline import load_config, override


@pytest.fixture(scope="module")
def torch():
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError as e:
        # Never skip (a skipped test checks nothing): the README's test command installs
        # the torch extra.
        pytest.fail(f"torch/torchvision not importable ({e}); pip install -e '.[torch]'")
    torch.set_num_threads(2)
    return torch


def _randomize_bn(torch, net, seed=0):
    """Non-trivial BN affine parameters and running statistics (fresh ones are the identity
    in eval mode, which would hide a swapped or dropped statistic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
    return net.eval()


def _torchvision(torch, name, num_classes, seed=0):
    import torchvision

    torch.manual_seed(seed)
    return _randomize_bn(torch, getattr(torchvision.models, name)(weights=None,
                                                                  num_classes=num_classes), seed)


def _torch_cifar_resnet(torch, depth, num_classes, width, seed=0):
    """The PyTorch equivalent of our `cifar_resnet{depth}` (models.torch_cifar)."""
    from kdprune_jax.models.torch_cifar import torch_cifar_resnet

    torch.manual_seed(seed)
    return _randomize_bn(torch, torch_cifar_resnet(depth, num_classes, width), seed)


def _our_logits(name, num_classes, width, params, batch_stats, x_nchw):
    graphdef = nnx.split(nnx.eval_shape(lambda: models.create_model(
        name, num_classes=num_classes, width=width)), nnx.Param, nnx.BatchStat)[0]
    model = nnx.merge(graphdef, params, batch_stats)
    return np.asarray(model(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), train=False))


def _check_logits(torch, net, name, num_classes, width, hw):
    x = torch.randn(2, 3, hw, hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(x).numpy()
    params, batch_stats = torch_state_dict_to_nnx(net.state_dict(), name, num_classes, width)
    got = _our_logits(name, num_classes, width, params, batch_stats, x.numpy())
    print(f"{name}: max |ours - torch| = {np.abs(got - want).max():.3g} "
          f"(max |logit| {np.abs(want).max():.3g})")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want).std() > 0.1  # not a degenerate (constant) output


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_logits_match(torch, name):
    _check_logits(torch, _torchvision(torch, name, 7), name, 7, 1.0, 64)


def test_cifar_resnet_logits_match(torch):
    _check_logits(torch, _torch_cifar_resnet(torch, 20, 10, 0.5), "cifar_resnet20", 10, 0.5, 16)


def test_structure_matches_split(torch):
    """Same tree, shapes and dtypes as nnx.split of a fresh model; every value came from
    the state dict (fc kernel transposed, a conv kernel OIHW -> HWIO)."""
    net = _torchvision(torch, "resnet18", 5)
    sd = net.state_dict()
    params, batch_stats = torch_state_dict_to_nnx(sd, "resnet18", 5)
    _, p0, b0 = nnx.split(nnx.eval_shape(lambda: models.create_model("resnet18", num_classes=5)),
                          nnx.Param, nnx.BatchStat)
    for ours, ref in ((params, p0), (batch_stats, b0)):
        assert jax.tree.structure(ours) == jax.tree.structure(ref)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(params["head"]["kernel"][...], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(params["stages"][1][0]["downsample"][0]["kernel"][...],
                                  sd["layer2.0.downsample.0.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(batch_stats["stages"][3][1]["bn2"]["var"][...],
                                  sd["layer4.1.bn2.running_var"].numpy())


def test_load_torch_checkpoint_formats(torch, tmp_path):
    net = _torchvision(torch, "resnet18", 4)
    sd = net.state_dict()
    variants = {
        "plain.pt": sd,
        "wrapped.pth": {"state_dict": sd, "epoch": 7, "best_acc": 0.9},
        "ddp.pt": {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
    }
    for fname, obj in variants.items():
        torch.save(obj, tmp_path / fname)
        got = load_torch_checkpoint(str(tmp_path / fname))
        assert set(got) == set(sd), fname
        for k, v in sd.items():
            assert isinstance(got[k], np.ndarray)
            np.testing.assert_array_equal(got[k], v.numpy(), err_msg=f"{fname}: {k}")
    # Half-precision weights are read as float32 (numpy has no bfloat16).
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in sd.items()}, tmp_path / "bf16.pt")
    assert load_torch_checkpoint(str(tmp_path / "bf16.pt"))["fc.weight"].dtype == np.float32
    # A pickled nn.Module is refused (weights_only), as is something that is no state dict.
    torch.save(net, tmp_path / "module.pt")
    with pytest.raises(ArtifactError, match=r"cannot read PyTorch checkpoint .*state_dict"):
        load_torch_checkpoint(str(tmp_path / "module.pt"))
    torch.save({"epoch": 3}, tmp_path / "nodict.pt")
    with pytest.raises(ArtifactError, match=r"not a state dict"):
        load_torch_checkpoint(str(tmp_path / "nodict.pt"))


def test_mismatched_checkpoint_is_refused(torch):
    sd = _torchvision(torch, "resnet18", 10).state_dict()
    with pytest.raises(ArtifactError) as e:  # wrong architecture
        torch_state_dict_to_nnx(sd, "resnet50", 10)
    msg = str(e.value)
    assert "'layer1.0.conv1.weight' is (64, 64, 3, 3) there, (64, 64, 1, 1) here" in msg
    assert "looks like resnet18 (width 1) with 10 classes" in msg
    assert "set teacher.model" in msg.lower()
    with pytest.raises(ArtifactError, match=r"'fc.weight' is \(10, 512\) there, \(7, 512\) here"
                       r".*num_classes"):
        torch_state_dict_to_nnx(sd, "resnet18", 7)  # wrong number of classes
    with pytest.raises(ArtifactError, match=r"'conv1.weight' is \(64, 3, 7, 7\) there, "
                       r"\(32, 3, 7, 7\) here"):
        torch_state_dict_to_nnx(sd, "resnet18", 10, width=0.5)
    missing = {k: v for k, v in sd.items() if k != "layer3.1.bn1.running_var"}
    with pytest.raises(ArtifactError, match=r"'layer3.1.bn1.running_var' is missing there "
                       r"\(\(256,\) expected\)"):
        torch_state_dict_to_nnx(missing, "resnet18", 10)
    extra = {**sd, "fc2.weight": torch.zeros(3, 3)}
    with pytest.raises(ArtifactError, match=r"'fc2.weight' \(3, 3\) there is not used"):
        torch_state_dict_to_nnx(extra, "resnet18", 10)
    # num_batches_tracked is ignored, present or not.
    torch_state_dict_to_nnx({k: v for k, v in sd.items()
                             if not k.endswith("num_batches_tracked")}, "resnet18", 10)


def test_missing_torch_is_a_config_error(monkeypatch, tmp_path):
    """Runs without torch too: a None entry in sys.modules makes `import torch` fail."""
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConfigError, match=r"teacher.init.*pip install 'kdprune_jax\[torch\]'"):
        load_torch_checkpoint(str(tmp_path / "t.pt"))


def test_pipeline_teacher_init_from_pt_file(torch, tmp_path):
    """teacher.init=file.pt: the quickstart smoke run (8x8 grayscale digits; our model repeats
    the channel, so torch gets it repeated too) with the PyTorch equivalent of its
    cifar_resnet8 (width 0.25) teacher; torchvision's ResNets take the same code path
    (`torch_state_dict_to_nnx`) and are checked above. The pipeline's teacher test loss and
    accuracy must equal torch's on the same images."""
    net = _torch_cifar_resnet(torch, 8, 10, 0.25)
    pt = tmp_path / "teacher.pt"
    torch.save(net.state_dict(), pt)
    # One student epoch, no mid-run checkpoint: the teacher import is what is tested here.
    config = override(load_config("quickstart.py", "smoke"), teacher__init=str(pt),
                      student__optim__num_epochs=1, checkpoint_every_steps=1000)
    assert (config.teacher.model, config.teacher.width) == ("cifar_resnet8", 0.25)
    r = pipeline.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "teacher")  # imported, not trained
    assert r["teacher"]["source"] == str(pt)

    ds = context.load_splits(config)
    _, eval_fn = data.make_transforms(config.data.augment, config.data.image_size,
                                      config.data.mean, config.data.std)
    x = np.stack([eval_fn(ds.test.source[i]["image"]) for i in range(len(ds.test))])
    x = np.repeat(x, 3, axis=-1).transpose(0, 3, 1, 2)  # NHWC gray -> NCHW RGB
    with torch.no_grad():
        logits = net(torch.from_numpy(np.ascontiguousarray(x)))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(
            ds.test.labels.astype(np.int64))).item()
    acc = float((logits.argmax(1).numpy() == ds.test.labels).mean())
    assert r["teacher"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert r["teacher"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert np.isfinite(r["student"]["test"]["loss"])

    # Same file content -> same teacher fingerprint (its eval is reused); a missing file is
    # a ConfigError naming teacher.init before anything runs.
    mesh = sharding.make_mesh()
    fp = teacher.import_teacher(config, 10, mesh).fingerprint
    moved = tmp_path / "moved.pth"
    os.rename(pt, moved)
    fp_moved = teacher.import_teacher(override(config, teacher__init=str(moved)), 10,
                                      mesh).fingerprint
    assert fp == fp_moved
    with pytest.raises(ConfigError, match=r"teacher.init.*existing .pt/.pth file"):
        pipeline.run(config, str(tmp_path / "run2"))
    assert not os.path.exists(tmp_path / "run2" / "results.json")
