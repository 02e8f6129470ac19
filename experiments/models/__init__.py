"""Models for the experiments: built-ins, offline MobileNetV2, a spec registry.

``experiments.models.mobilenet_v2`` is the module; build a random MobileNetV2 with
``build_model("mobilenet_v2")`` or ``MobileNetV2()``.
"""

from .builtin import SmallResNet, small_resnet
from .mobilenet_v2 import MobileNetV2, load_pretrained_mobilenet_v2
from .registry import available_models, build_model, default_input_shape

__all__ = [
    "MobileNetV2",
    "SmallResNet",
    "available_models",
    "build_model",
    "default_input_shape",
    "load_pretrained_mobilenet_v2",
    "small_resnet",
]
