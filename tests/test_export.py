"""convbn.export.export_onnx: folded graph (no BatchNormalization where a block was folded),
onnxruntime == PyTorch eval, dynamic batch axis, the original model untouched."""

import copy
import sys

import pytest
import torch
from torch import nn

import convbn
from conftest import calibrate_bn, randomize_all_bn
from layer_cases import MixedBlocksNet, make_block

onnx = pytest.importorskip("onnx", reason="install the onnx extra: pip install -e .[onnx]")
pytest.importorskip("onnxruntime", reason="install the onnx extra: pip install -e .[onnx]")
pytest.importorskip("onnxscript", reason="install the onnx extra: pip install -e .[onnx]")

from convbn.export import export_onnx, onnxruntime_outputs  # noqa: E402

# Stated tolerance: max |ort - torch| / max |torch| over all outputs. onnxruntime's MLAS convolution
# sums in another order than oneDNN; measured ~2e-7 per block, ~1e-6 on a 7-block ResNet.
RTOL = 1e-5


def small_resnet(seed=0):
    torch.manual_seed(seed)
    return randomize_all_bn(MixedBlocksNet(conv2_bias=False, up_channels=8), seed)


def op_types(path):
    return [n.op_type for n in onnx.load(path).graph.node]


def test_export_folds_every_block_matches_onnxruntime_and_leaves_model_untouched(tmp_path):
    model = convbn.convert(small_resnet(), "tune")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    result = export_onnx(model, x, tmp_path / "m.onnx", rtol=RTOL)
    ops = op_types(result.path)
    assert result.batch_norm_nodes == 0 and "BatchNormalization" not in ops
    assert ops.count("Conv") == 4 and ops.count("ConvTranspose") == 1
    assert {r.status for r in result.report} == {"converted"}
    assert result.max_rel_error <= RTOL and result.batch_sizes == (2, 3)
    # the original keeps its mode, BN modules and values
    assert convbn.report(model).requested_mode == "tune" and isinstance(model.bn1, nn.BatchNorm2d)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_dynamic_batch_axis_is_symbolic_and_any_batch_size_runs(tmp_path):
    model = small_resnet().eval()
    result = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", rtol=RTOL)
    dim0 = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value, "batch axis must be symbolic"
    for batch in (1, 5, 8):
        x = torch.randn(batch, 3, 16, 16)
        (got,) = onnxruntime_outputs(result.path, [x])
        with torch.no_grad():
            expected = model(x)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max() / expected.abs().max()) <= RTOL


def test_static_batch_when_asked(tmp_path):
    result = export_onnx(small_resnet(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", dynamic_batch=False)
    dim0 = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 2 and result.batch_sizes == (2,)


@pytest.mark.parametrize("kind", ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                                  "ConvTranspose3d", "Linear"])
def test_every_layer_kind_exports_folded(kind, tmp_path):
    groups = 1 if kind == "Linear" else 2
    layer, bn, x = make_block(kind, bias=False, affine=True, groups=groups)
    model = nn.Sequential(layer, bn, nn.ReLU())
    result = export_onnx(model, x, tmp_path / "m.onnx", rtol=RTOL)
    assert result.batch_norm_nodes == 0, op_types(result.path)
    assert result.max_rel_error <= RTOL


def test_unfoldable_batchnorm_stays_a_batchnormalization_node(tmp_path):
    # BN after a ReLU has nothing to fold into: it must survive, with its running statistics
    model = randomize_all_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                                           nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4)))
    result = export_onnx(model, torch.randn(2, 3, 9, 9), tmp_path / "m.onnx", rtol=RTOL)
    statuses = [r.status for r in result.report]
    assert statuses.count("fallback") == 1
    assert result.batch_norm_nodes == 1
    assert result.max_rel_error <= RTOL


def test_torchscript_exporter_also_works(tmp_path):
    model = small_resnet()
    result = export_onnx(model, (torch.randn(2, 3, 16, 16),), tmp_path / "m.onnx", dynamo=False, rtol=RTOL)
    assert result.batch_norm_nodes == 0 and result.max_rel_error <= RTOL


class KwargModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, image, scale):
        return self.bn(self.conv(image)) * scale


def test_keyword_example_inputs(tmp_path):
    model = randomize_all_bn(KwargModel())
    result = export_onnx(model, {"image": torch.randn(2, 3, 8, 8), "scale": torch.rand(2, 1, 1, 1)},
                         tmp_path / "m.onnx", rtol=RTOL)
    assert result.batch_norm_nodes == 0 and result.max_rel_error <= RTOL


def test_a_disagreeing_runtime_is_an_error_not_a_silent_export(tmp_path, monkeypatch):
    import convbn.export as export
    real = export.onnxruntime_outputs
    monkeypatch.setattr(export, "onnxruntime_outputs", lambda p, xs: [o * 1.01 for o in real(p, xs)])
    with pytest.raises(convbn.ConvBNError, match="onnxruntime disagrees"):
        export_onnx(small_resnet(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")


def test_missing_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(convbn.ConvBNError, match=r"pip install 'convbn\[onnx\]'"):
        export_onnx(small_resnet(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")


@pytest.mark.slow
def test_monai_resnet18_exports_without_batchnorm(tmp_path):
    nets = pytest.importorskip("monai.networks.nets")
    model = nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    calibrate_bn(model, x)
    reference = copy.deepcopy(model).eval()
    result = export_onnx(model, x, tmp_path / "resnet18.onnx", rtol=1e-4)
    assert result.batch_norm_nodes == 0 and len(result.report.converted) >= 20
    (got,) = onnxruntime_outputs(result.path, [x[:1]])
    with torch.no_grad():
        assert float((got - reference(x[:1])).abs().max() / reference(x[:1]).abs().max()) <= 1e-4
    print(f"MONAI resnet18 ONNX max relative error {result.max_rel_error:.2e}")


def test_docstring_examples_run():
    import doctest

    import convbn.export

    result = doctest.testmod(convbn.export, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
