"""The ``convbn`` CLI on tiny settings: exit codes, table columns, files written, specs, fail-fast checks.
Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convbn
from convbn.bench.compare import mode_variants
from convbn.cli.main import main

SPEC = "cli_nets:tiny_net"  # tests/cli/cli_nets.py: a user's own module:factory
TINY = [SPEC, "--batch-size", "2", "--input-size", "8", "--rounds", "1", "--warmup", "0", "--quiet"]


def _load(path):
    with open(path) as f:
        return json.load(f)


def _hide(monkeypatch, *names):
    """Make ``importlib.util.find_spec`` report ``names`` as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_run_on_a_user_model_table_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the default run writes a PNG with matplotlib: pip install -e .[dev]")
    assert main(["run", "--model", *TINY, "--modes", "train,eval,tune,deploy", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("mode "))
    for col in ("saved MiB", "peak MiB", "step ms", "time/eval (IQR)", "err vs eval: out | dL/dx"):
        assert col in header
    for mode in ("train", "eval", "tune", "deploy"):
        assert any(line.startswith(mode + " ") for line in out.splitlines()), mode
    assert "blocks (tune): 2 converted, 0 fallback, 0 skipped" in out
    assert (tmp_path / "default.png").stat().st_size > 0 and str(tmp_path / "default.png") in out
    rows = {r["name"]: r for r in _load(tmp_path / "default.json")["rows"]}
    assert rows["tune"]["saved_bytes"] < rows["eval"]["saved_bytes"]
    assert rows["tune"]["max_err_vs_eval"] < 1e-4 and rows["deploy"]["err_out_vs_eval"] < 1e-4
    assert all(len(r["times_s"]) == 1 and r["median_s"] > 0 for r in rows.values())  # timed (in worker processes)


def test_bench_memory_only_and_options_without_command_mean_run(tmp_path, capsys):
    assert main(["bench", *TINY[:-5], "--rounds", "0", "--modes", "eval,tune", "--out-dir", str(tmp_path)]) == 0
    data = _load(tmp_path / "bench_cli_nets_tiny_net.json")
    assert [r["name"] for r in data["rows"]] == ["eval", "tune"] and data["rows"][0]["times_s"] == []
    assert main(["--model", SPEC, "--input-size", "8", "--rounds", "0", "--modes", "tune", "--no-plot", "--quiet",
                 "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "default.json").exists() and not (tmp_path / "default.png").exists()


def test_default_run_checks_optional_dependencies_before_any_work(tmp_path, capsys, monkeypatch):
    if importlib.util.find_spec("monai") is not None:  # (the primary CI leg; the core-only leg has no MONAI)
        _hide(monkeypatch, "matplotlib")
        assert main(["--out-dir", str(tmp_path), "--quiet"]) == 1  # the default: MONAI ResNet-50 and a PNG
        err = capsys.readouterr().err
        assert "needs matplotlib" in err and "pip install matplotlib" in err and "--no-plot" in err
        assert not any(tmp_path.iterdir())  # failed before measuring anything
    _hide(monkeypatch, "monai")
    assert main(["--out-dir", str(tmp_path), "--quiet", "--no-plot"]) == 1
    assert "pip install monai" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_mode_variants_follow_the_convert_signature():
    def convert_without_fission(model, mode, *, recompute=False):
        return model

    names = [v.name for v in mode_variants(convert=convert_without_fission)[0]]
    assert names == ["train", "train+recompute", "eval", "tune", "deploy"]
    assert any("train+fission" in n for n in mode_variants(convert=convert_without_fission)[1])
    with pytest.raises(ValueError, match="fission=True"):
        mode_variants(["train+fission"], convert=convert_without_fission)
    # the real convert has both train variants: every mode is offered
    assert [v.name for v in mode_variants()[0]] == ["train", "train+recompute", "train+fission", "eval", "tune",
                                                     "deploy"]


def test_cli_mode_names_are_the_report_mode_names():
    """A mode the CLI names (``--modes train+recompute``) is the mode the report of that conversion shows."""
    from cli_nets import tiny_net

    for variant in mode_variants()[0]:
        if variant.mode == "deploy":
            continue  # deploy's report rows say "deploy" too, but deploy replaces modules: checked in test_api
        model = tiny_net()
        rows = convbn.report(model.train(variant.is_train), variant.mode, **variant.options).rows
        assert rows and {r.mode for r in rows if r.status == "converted"} == {variant.name}, variant.name


def test_bad_spec_mode_and_user_model_without_shape(tmp_path, capsys):
    assert main(["bench", "resnet50", "--quiet"]) == 1
    assert "not PREFIX:NAME" in capsys.readouterr().err
    assert main(["bench", "no_such_pkg_xyz:f", "--input-size", "8", "--quiet"]) == 1
    assert "cannot import module 'no_such_pkg_xyz'" in capsys.readouterr().err
    assert main(["bench", "torch.nn:NoSuchThing", "--input-size", "8", "--quiet"]) == 1
    assert "has no attribute 'NoSuchThing'" in capsys.readouterr().err
    assert main(["bench", "builtins:dict", "--input-size", "8", "--quiet"]) == 1
    assert "not an nn.Module" in capsys.readouterr().err
    assert main(["bench", "monai:nope", "--quiet"]) == 1
    err = capsys.readouterr().err  # (the core-only CI leg has no MONAI: then the spec needs it)
    assert ("unknown MONAI model 'nope'" if _importable("monai") else "needs monai, which is not installed") in err
    assert main(["bench", SPEC, "--input-size", "8", "--modes", "tunee", "--quiet"]) == 1
    assert "unknown mode 'tunee'" in capsys.readouterr().err
    assert main(["bench", SPEC, "--quiet", "--out-dir", str(tmp_path)]) == 1
    assert "--input-size" in capsys.readouterr().err


def test_help_has_examples_for_every_subcommand(capsys):
    for cmd in ("run", "bench", "inspect"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"convbn {cmd} " in text, cmd


def test_inspect_user_model_prints_report_and_writes_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["inspect", SPEC, "--input-size", "8", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 converted" in out and "body.0" in out and "gamma/sqrt(var+eps) over 16 BN channels" in out
    data = _load(path)
    assert len(data["report"]["rows"]) == 2 and len(data["scales"]["values"]) == 16


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # absent, or built for another torch (torchvision on the torch 2.13 leg)
        return False
    return True


@pytest.mark.skipif(not _importable("torchvision"), reason="needs torchvision (installed in the primary CI leg)")
def test_bench_refuses_a_detector_clearly(capsys):
    assert main(["bench", "torchvision:ssdlite320_mobilenet_v3_large", "--input-size", "64", "--rounds", "0",
                 "--quiet"]) == 1
    assert "use `convbn inspect`" in capsys.readouterr().err


def test_missing_optional_package_is_a_clear_error(capsys, monkeypatch):
    import convbn.cli.spec as spec_mod

    real = spec_mod.importlib.import_module

    def fake(name, *a):
        if name.split(".")[0] in ("torchvision", "timm", "monai"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a)

    monkeypatch.setattr(spec_mod.importlib, "import_module", fake)
    for spec, package in (("torchvision:resnet18", "torchvision"), ("timm:resnet18", "timm"),
                          ("monai:resnet18", "monai")):
        assert main(["inspect", spec]) == 1
        err = capsys.readouterr().err
        # "not importable here" (import fails), or "not installed" where the package is truly absent
        assert f"needs {package}, which is not" in err and f"pip install {package}" in err, err


@pytest.mark.slow
@pytest.mark.skipif(not _importable("torchvision"), reason="needs torchvision (installed in the primary CI leg)")
def test_inspect_torchvision_detector_takes_a_list_of_images(capsys):
    assert main(["inspect", "torchvision:fasterrcnn_resnet50_fpn", "--batch-size", "1", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "example input a list of 1 images 3x64x64" in out
    assert "53 converted" in out and "53 norm layers" in out, out  # every backbone norm of the detector


@pytest.mark.slow
@pytest.mark.skipif(not _importable("timm"), reason="needs timm (installed in the primary CI leg)")
def test_inspect_timm_model(capsys):
    assert main(["inspect", "timm:efficientnet_b0", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "example input a batch tensor 2x3x64x64" in out and "49 converted" in out and "of 49 norm layers" in out, out


def test_entry_point_subprocess(tmp_path):
    """`python -m convbn.cli.main` runs and exits 0 (the console script calls the same main)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent)] + sys.path)}
    proc = subprocess.run([sys.executable, "-m", "convbn.cli.main", "inspect", SPEC, "--input-size", "8"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "converted" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "convbn.cli.main", "--version"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == f"convbn {convbn.__version__}"


def test_threads_option_does_not_leak_into_the_calling_process():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    assert main(["inspect", SPEC, "--input-size", "8", "--threads", str(target)]) == 0
    assert torch.get_num_threads() == before
