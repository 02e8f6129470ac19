import copy
import warnings

import pytest

from conftest import assert_close_rel
from convbn.functions import tune
from convbn.functions.native import NativeLibrary, extension_mode, use_extension
from layer_cases import make_block


def test_use_extension_validates_and_restores_the_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        with use_extension("fast"):
            pass
    before = extension_mode()
    with pytest.raises(RuntimeError):
        with use_extension("torch"):
            assert extension_mode() == "torch"
            raise RuntimeError("boom")
    assert extension_mode() == before


def test_failed_build_warns_once_then_falls_back_or_raises_when_required(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lib = NativeLibrary("broken", 'extern "C" int one() { return 1; }', {"one": []}, "test")
    with pytest.warns(RuntimeWarning, match="test C\\+\\+ kernel could not be built.*set CXX"):
        assert lib.get() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not retried, not re-warned
        assert lib.get() is None
    with use_extension("extension"), pytest.raises(RuntimeError, match="required"):
        lib.get()


def test_a_compile_error_is_reported_with_the_compiler_output(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lib = NativeLibrary("bad_source", "this is not C++", {}, "test")
    with pytest.warns(RuntimeWarning, match="failed"):
        assert lib.get() is None


def test_tune_without_its_kernel_takes_the_torch_op_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(tune, "_LIB", NativeLibrary("tune", tune._CPP_SOURCE, tune._argtypes(), "Tune"))
    layer, bn, x = make_block("Conv2d", True, True, 1)
    bn.eval()
    ref = copy.deepcopy(bn)(copy.deepcopy(layer)(x))
    with pytest.warns(RuntimeWarning, match="Tune C\\+\\+ kernel"):
        out = tune.tune_conv_bn(x, layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                bn.eps, padding=layer.padding, stride=layer.stride, dilation=layer.dilation)
    assert out.grad_fn.native is None
    assert_close_rel(out, ref, 2e-6)
