"""convbn.bench.compare: modes side by side, memory in this process, time in one worker process per mode."""

import copy

import pytest
import torch
from torch import nn

from convbn.bench.compare import FixedProjectionLoss, compare_modes, compare_ticks, mode_variants


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 3))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.3, 3.0)
    return net


def test_compare_times_every_mode_in_a_worker_and_leaves_the_model_alone():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    before = copy.deepcopy(net.state_dict())
    ticks = []
    variants = mode_variants(["eval", "tune", "deploy"])[0]
    res = compare_modes(net, x, variants, rounds=2, warmup=0, progress=ticks.append)
    assert len(ticks) == compare_ticks(len(variants), 2)
    assert [r.name for r in res.rows] == ["eval", "tune", "deploy"]
    for r in res.rows:
        assert len(r.times_s) == 2 and r.median_s > 0 and r.time_ratio_vs_eval is not None
        assert r.blocks["converted"] == 2
    ev, tu = res.row("eval"), res.row("tune")
    assert tu.saved_bytes < ev.saved_bytes
    assert tu.max_err_vs_eval < 1e-5 and res.row("deploy").err_out_vs_eval < 1e-5
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert "forward" not in net[0].__dict__ and "forward" not in net[1].__dict__  # never converted in place


def test_compare_rejects_negative_rounds_and_a_model_without_tensor_output():
    with pytest.raises(ValueError, match="rounds and warmup must be >= 0"):
        compare_modes(_net(), torch.randn(2, 3, 8, 8), mode_variants(["eval"])[0], rounds=-1)
    with pytest.raises(ValueError, match="no floating-point tensor"):
        FixedProjectionLoss()({"labels": torch.tensor([1])})
