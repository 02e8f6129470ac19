"""The experiments on tiny settings: exit codes, tables, files written, and the checks they make
(adversarial eval == tune, transfer plumbing, Appendix M prediction == measurement). Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import appendix_m
from experiments.__main__ import main
from experiments.adversarial import AdversarialConfig, run_adversarial
from experiments.models import small_resnet
from experiments.transfer import TransferConfig, run_transfer

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("matplotlib", reason="the experiments write PNGs with matplotlib: pip install -e .[dev]")


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_sweep_tiny_writes_json_csv_png(tmp_path, capsys):
    csv_path = tmp_path / "b.csv"
    assert main(["sweep", "--model", "small_resnet", "--batch-sizes", "2,4", "--input-sizes", "8,12",
                 "--modes", "eval,tune", "--rounds", "1", "--warmup", "0", "--quiet",
                 "--out-dir", str(tmp_path), "--csv", str(csv_path)]) == 0
    assert "tune/eval mem" in capsys.readouterr().out
    data = _load(tmp_path / "bench.json")
    points = {(r["batch_size"], r["input_size"]) for r in data["records"]}
    assert points == {(2, 12), (4, 12), (4, 8)}  # two 1-D sweeps through the centre (4, 12)
    assert len(data["records"]) == 2 * len(points)
    assert csv_path.read_text().splitlines()[0].startswith("batch_size,input_size,mode")
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_appendix_m_tiny(tmp_path, capsys):
    assert main(["appendix-m", "small_resnet", "--input-size", "8", "--quiet", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "converted" in out and "gamma/sqrt(var+eps)" in out and "measured KiB" in out
    assert (tmp_path / "inspect_small_resnet_scales.png").stat().st_size > 0
    assert (tmp_path / "inspect_small_resnet_appendix_m.png").stat().st_size > 0
    data = _load(tmp_path / "inspect_small_resnet.json")
    assert len(data["report"]["rows"]) == 9 and len(data["scales"]["values"]) == 16 * 3 + 32 * 3 + 64 * 3
    assert main(["appendix-m", "--list"]) == 0
    assert "monai:resnet50" in capsys.readouterr().out


@pytest.mark.parametrize("dims,size", [(2, 12), (1, 16), (3, 6)])
def test_appendix_m_prediction_matches_measurement(dims, size):
    """Saved bytes are deterministic: convbn's Tune saves exactly |Y| per block less than Eval (it keeps
    neither Y nor w'); tolerance 1% of |Y| for per-channel vectors."""
    torch.manual_seed(0)
    model = small_resnet(dims=dims)
    x = torch.randn((2, 3) + (size,) * dims)
    res = appendix_m.appendix_m_blocks(model, x)
    assert len(res["blocks"]) == 9
    for b in res["blocks"]:
        assert abs(b["measured_saving_bytes"] - b["predicted_convbn_bytes"]) <= 0.01 * b["y_bytes"], b
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
    assert len(row["eval"]["times_s"]) == len(row["tune"]["times_s"]) == 1  # timed, each mode in its own process


def test_adversarial_cli_tiny(tmp_path, capsys):
    assert main(["adversarial", "--models", "small_resnet", "--batch-size", "2", "--input-size", "8", "--steps", "2",
                 "--rounds", "1", "--warmup", "0", "--quiet", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "same (f64)" in out and "yes" in out
    assert (tmp_path / "adversarial.png").exists() and (tmp_path / "adversarial.json").exists()


def test_transfer_plumbing_one_seed():
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn: pip install -e .[dev]")
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
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn: pip install -e .[dev]")
    assert main(["transfer", "--model", "small_resnet", "--modes", "eval,deploy", "--seeds", "0", "--iterations", "3",
                 "--batch-size", "8", "--image-size", "8", "--quiet", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test acc % (mean +- std)" in out and "ms/iter" in out
    assert (tmp_path / "transfer.json").exists() and (tmp_path / "transfer.png").exists()


def test_help_has_examples_for_every_experiment(capsys):
    for cmd in ("sweep", "appendix-m", "transfer", "adversarial"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"python -m experiments {cmd}" in text, cmd


def test_results_md_renders_tables_from_json(tmp_path):
    from convbn.cli.main import main as convbn_main
    from experiments.results_md import render

    assert convbn_main(["run", "--model", "experiments.models:small_resnet", "--input-size", "8", "--batch-size", "2",
                        "--rounds", "0", "--modes", "eval,tune,deploy", "--quiet", "--no-plot",
                        "--out-dir", str(tmp_path)]) == 0
    assert main(["appendix-m", "small_resnet", "--input-size", "8", "--quiet", "--no-plot",
                 "--out-dir", str(tmp_path)]) == 0
    text = render(str(tmp_path))
    assert "| tune |" in text and "Paper Table" not in text.split("## Figure 2a")[0].split("## `convbn`")[0]
    assert "## Figure 2a and Appendix M" in text and "small_resnet" in text


@pytest.mark.slow
def test_run_all_quick_regenerates_every_result_file(tmp_path):
    """`bash benchmarks/run_all.sh --quick DIR`: every experiment on tiny sizes, then RESULTS.md from their JSON."""
    pytest.importorskip("sklearn", reason="transfer needs scikit-learn's digits")
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)] + os.environ.get("PYTHONPATH", "").split(
               os.pathsep))}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_all.sh"), "--quick", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("default.json", "bench.json", "inspect_small_resnet.json", "transfer.json", "adversarial.json",
                 "default.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "RESULTS.md").read_text()
    for section in ("## `convbn` (default run)", "## Table 6", "## Table 3", "## Table 10", "## Figure 2a"):
        assert section in text, section
