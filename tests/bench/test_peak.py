"""Known-answer tests for the live-tensor peak meter (float32: 4 bytes per element)."""

from __future__ import annotations

import doctest

import pytest
import torch

import convbn.bench.peak as peak_mod
from convbn.bench.peak import LiveTensorMeter, peak_live_tensor_bytes, storage_bytes

N = 1000  # elements; 4000 bytes per float32 buffer


def test_docstring_examples_run() -> None:
    result = doctest.testmod(peak_mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def test_chain_of_ops_peak_is_sum_of_live_intermediates() -> None:
    x = torch.randn(N)

    def chain() -> torch.Tensor:
        a = x + 1  # 4000
        b = a * 2  # 8000 live
        c = b.sum()  # +4 -> 8004
        return c

    out, peak = peak_live_tensor_bytes(chain)
    assert peak == 2 * 4 * N + 4
    torch.testing.assert_close(out, ((x + 1) * 2).sum())


def test_intermediate_freed_before_next_allocation_is_not_counted() -> None:
    x = torch.randn(N)
    with LiveTensorMeter() as meter:
        a = x + 1  # 4000
        b = a * 2  # 8000
        del a  # 4000
        c = b * 3  # 8000 again, not 12000
        d = torch.empty(2 * N)  # factory ops count too: 16000
    assert meter.peak == 4 * 4 * N
    assert meter.current == 4 * 4 * N
    assert meter.num_allocations == 4
    assert meter.allocated == 5 * 4 * N
    assert meter.peak_op == "aten.empty.memory_format"
    del b, c, d


def test_views_and_in_place_ops_allocate_nothing() -> None:
    x = torch.randn(10, 100)
    with LiveTensorMeter() as meter:
        v = x.view(100, 10)
        t = x.t()
        s = x[::2, 1:]
        d = x.detach()
        x.mul_(2).add_(1)
        torch.add(x, 1, out=x)
    assert meter.peak == 0 and meter.num_allocations == 0
    del v, t, s, d

    with LiveTensorMeter() as meter:
        a = x.clone()  # 4000
        a.relu_()
        a.view(-1)[:5].zero_()
        b = a.t()  # view of a tracked storage: counted once
    assert meter.peak == 4 * N and meter.num_allocations == 1
    del a, b


def test_storage_shared_by_views_freed_only_when_last_view_dies() -> None:
    x = torch.randn(N)
    with LiveTensorMeter() as meter:
        a = x * 2
        v = a[10:]
        del a
        assert meter.current == 4 * N  # v keeps the storage alive
        del v
        assert meter.current == 0
        b = x * 3
    assert meter.peak == 4 * N
    del b


def test_in_place_resize_grows_tracked_storage() -> None:
    with LiveTensorMeter() as meter:
        a = torch.empty(0)
        a.resize_(N)
    assert meter.peak == 4 * N
    del a


def test_backward_allocations_are_seen() -> None:
    w = torch.randn(100, 100, requires_grad=True)
    x = torch.randn(8, 100)

    def step() -> torch.Tensor:
        y = (x @ w).relu()  # mm (3200) alive while relu writes its output (3200): 6400
        loss = y.sum()  # after this: y 3200 + loss 4
        loss.backward()  # + seed grad 4 + relu grad 3200 + mm's w.grad 40000
        return loss

    with LiveTensorMeter(baseline=(w, x)) as meter:
        step()
    assert meter.peak == 3200 + 4 + 4 + 3200 + 40000
    assert meter.peak_op == "aten.mm.default"  # the weight-gradient mm in backward
    assert meter.current == 40000  # only w.grad outlives the step
    assert meter.num_allocations == 6  # mm, relu, sum | ones_like, threshold_backward, mm
    assert meter.baseline == 40000 + 3200
    assert meter.peak_total == meter.baseline + meter.peak
    assert w.grad is not None


def test_gradient_accumulation_into_existing_grad_is_in_place() -> None:
    w = torch.randn(100, requires_grad=True)
    (w * 2).sum().backward()  # w.grad exists before the meter
    with LiveTensorMeter() as meter:
        (w * 3).sum().backward()  # backward's mul output (400) is added into w.grad in place
    assert meter.current == 0
    torch.testing.assert_close(w.grad, torch.full_like(w, 5.0))


def test_conv_bn_training_step_sees_more_than_forward_only() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, fwd_peak = peak_live_tensor_bytes(lambda: model(x))
    _, step_peak = peak_live_tensor_bytes(lambda: model(x).sum().backward())
    out_bytes = 2 * 8 * 14 * 14 * 4
    assert fwd_peak >= 2 * out_bytes  # conv output and BN output alive together
    assert step_peak > fwd_peak


def test_finished_meter_ignores_later_frees_and_can_be_reused() -> None:
    x = torch.randn(N)
    meter = LiveTensorMeter()
    with meter:
        a = x + 1
    del a
    assert meter.current == 4 * N and meter.peak == 4 * N
    with meter:
        b = x.sum()
    assert (meter.peak, meter.current, meter.num_allocations) == (4, 4, 1)
    del b


def test_exception_inside_leaves_meter_usable() -> None:
    x = torch.randn(N)
    with pytest.raises(RuntimeError):
        with LiveTensorMeter() as meter:
            a = x + 1
            torch.mm(x, x)  # 1-D inputs: an error from aten
    assert meter.peak == 4 * N
    del a


def test_storage_bytes_counts_each_storage_once() -> None:
    lin = torch.nn.Linear(10, 10)
    tied = torch.nn.Sequential(lin, lin)  # same parameters twice
    bn = torch.nn.BatchNorm1d(10)  # 4 float vectors + int64 counter
    x = torch.randn(4, 10)
    expected = (100 + 10) * 4 + 4 * 10 * 4 + 8 + 40 * 4
    assert storage_bytes(tied, bn, x, x[1:], {"again": [x.t()]}) == expected
    with LiveTensorMeter(baseline=[tied, bn, x]) as meter:
        pass
    assert meter.baseline == expected and meter.peak == 0


def test_bad_baseline_item_says_what_to_pass() -> None:
    with pytest.raises(TypeError, match="baseline=\\(model, x\\)"):
        storage_bytes("not a tensor")
