"""Building and loading the C++ kernels (convbn.ops._build): the switch, the cache key without a subprocess,
a warm cache without a compiler, the warning at the user's line, the ahead-of-time build command."""

import copy
import os
import shutil
import subprocess
import sys
import warnings

import pytest

from conftest import assert_close_rel
from convbn.functions import tune
from convbn.ops import _build
from convbn.ops._build import NativeLibrary, extension_mode, use_extension
from convbn.ops import tune as tune_ops
from layer_cases import make_block

HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler")


def _source(tmp_path, text='extern "C" int one() { return 1; }', name="one.cpp"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_use_extension_validates_and_restores_the_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        with use_extension("fast"):
            pass
    with pytest.raises(ValueError, match="mode must be one of"):
        with use_extension("sweeps"):  # gone: eager and torch.compile call the same ops
            pass
    before = extension_mode()
    with pytest.raises(RuntimeError):
        with use_extension("torch"):
            assert extension_mode() == "torch"
            raise RuntimeError("boom")
    assert extension_mode() == before


def test_failed_build_warns_once_at_the_callers_line_then_falls_back_or_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lib = NativeLibrary("broken", _source(tmp_path), {"one": []}, "test", register=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lib.get() is None
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "test C++ kernel could not be built" in message and "no C++ compiler" in message
    assert "apt install g++" in message and "set CXX" in message and "convbn build-kernels" in message
    assert caught[0].filename == __file__  # the user's line, not convbn's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not retried, not re-warned
        assert lib.get() is None
    with use_extension("extension"), pytest.raises(RuntimeError, match="required"):
        lib.get()


def test_the_warning_points_at_the_users_forward_call(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(tune_ops, "LIB", NativeLibrary("tune", tune_ops.LIB.source_path, tune_ops._argtypes(),
                                                       "Tune", register=False))
    layer, bn, x = make_block("Conv2d", True, True, 1)
    bn.eval()
    ref = copy.deepcopy(bn)(copy.deepcopy(layer)(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tune.tune_conv_bn(x, layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                bn.eps, padding=layer.padding, stride=layer.stride, dilation=layer.dilation)
    assert [w.filename for w in caught] == [__file__] and "Tune C++ kernel" in str(caught[0].message)
    assert_close_rel(out, ref, 2e-6)  # the reference ran


@needs_cxx
def test_a_compile_error_is_reported_with_the_compiler_output(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lib = NativeLibrary("bad_source", _source(tmp_path, "this is not C++", "bad.cpp"), {}, "test", register=False)
    with pytest.warns(RuntimeWarning, match="failed"):
        assert lib.get() is None


def test_the_cache_key_follows_the_source_flags_and_torch_but_needs_no_process(monkeypatch, tmp_path):
    def no_process(*a, **k):
        raise AssertionError("the cache key spawned a process")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    key = _build.cache_key(b"int x;")
    assert key == _build.cache_key(b"int x;") and key != _build.cache_key(b"int y;")
    monkeypatch.setattr(_build, "CXXFLAGS", _build.CXXFLAGS + ["-DX"])
    assert _build.cache_key(b"int x;") != key
    monkeypatch.setattr(_build.torch, "__version__", "0.0.0")
    assert _build.cache_key(b"int x;") != key
    monkeypatch.setenv("CXX", "some-other-compiler")  # not in the key: the kernels are extern "C", no torch ABI
    monkeypatch.setattr(_build, "CXXFLAGS", _build.CXXFLAGS[:-1])


@needs_cxx
def test_a_warm_cache_loads_without_a_compiler_and_without_a_process(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    src = _source(tmp_path)
    assert NativeLibrary("warm", src, {"one": []}, "test", register=False).get().one() == 1  # cold: builds
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    def no_process(*a, **k):
        raise AssertionError("a warm cache spawned a process")

    monkeypatch.setattr(subprocess, "run", no_process)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = NativeLibrary("warm", src, {"one": []}, "test", register=False).get()
    assert lib is not None and lib.one() == 1


@needs_cxx
@pytest.mark.parametrize("how", ["cli", "module"])
def test_the_ahead_of_time_build_command_fills_the_cache_the_library_loads(how, tmp_path, capsys):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    if how == "cli":
        from convbn.cli.main import main

        old = os.environ.get("TORCH_EXTENSIONS_DIR")
        os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path)
        try:
            assert main(["build-kernels"]) == 0
        finally:
            os.environ.pop("TORCH_EXTENSIONS_DIR") if old is None else os.environ.__setitem__("TORCH_EXTENSIONS_DIR",
                                                                                               old)
        out = capsys.readouterr().out
    else:
        src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(_build.__file__))), os.pardir)
        proc = subprocess.run([sys.executable, "-m", "convbn.ops", "build"], env=dict(env, PYTHONPATH=src),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
    built = sorted(p.name for p in tmp_path.glob("convbn_*/*.so"))
    assert [n.rsplit("_", 1)[0] for n in built] == ["bn_fission", "bn_fission_native", "tune"], built
    for name in ("tune", "bn_fission", "bn_fission_native"):
        assert f"{name}: {tmp_path}" in out
    # what was built is what a run loads: same path, no compiler needed afterwards
    assert tune_ops.LIB.so_path().replace(_build.cache_root(), str(tmp_path)) in out


def test_the_build_command_fails_with_what_to_install(monkeypatch, tmp_path, capsys):
    from convbn.cli.main import main

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert main(["build-kernels"]) == 1
    err = capsys.readouterr().err
    assert "no C++ compiler" in err and "apt install g++" in err
