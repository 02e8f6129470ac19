"""convbn: Train / Eval / Tune / Deploy modes for every Conv->BatchNorm block of a PyTorch model.

    >>> import convbn, torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> model = convbn.convert(model, "tune")
"""

from .api import convert, deploy, report, revert
from .calibration import NormChange, RecalibrationReport, recalibrate
from .errors import ConvBNError
from .export import export_onnx
from .fold import fold_conv_bn_weights
from .functions.tune import tune_conv_bn
from .norms import NormParams, register_norm, unregister_norm
from .plan import BlockReport, Report

__all__ = ["convert", "revert", "report", "deploy", "recalibrate", "RecalibrationReport", "NormChange",
           "export_onnx", "ConvBNError", "Report", "BlockReport",
           "fold_conv_bn_weights", "tune_conv_bn", "register_norm", "unregister_norm", "NormParams"]
__version__ = "0.1.0"
