"""Property-based fuzzing over random layer configurations (hypothesis, derandomized: the same
configurations every CI run, no example database).

Drawn: kind (Conv1/2/3d, ConvTranspose1/2/3d, Linear), channels, groups, kernel, stride, padding
(ints, "same", "valid", padding_mode zeros/reflect/replicate/circular), dilation, output_padding,
bias, affine, a ReLU after the BN or not, dtype, batch and input size. Properties:

* tune == eval (output, input gradient and every parameter gradient),
* deploy == eval (output),
* train with recompute=True / fission=True == plain train (output, gradients, running statistics),
  when the installed convbn has them.

float64 cases compare directly at 1e-9. float32 cases compare both sides against the float64 truth:
the converted model's error must be no worse than 4x plain PyTorch's own float32 error (+1e-6 of
the tensor's scale), so round-off never makes a flaky failure and a real bug always shows.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Tuple, Union

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

import convbn
from conftest import frozen_reference, randomize_bn

HAS_TRAIN_VARIANTS = "recompute" in inspect.signature(convbn.convert).parameters
KINDS = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear"]
_BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

COUNTS = {"tune": 0, "deploy": 0, "recompute": 0, "fission": 0}
EXAMPLES = {"tune": 300, "deploy": 200, "recompute": 150, "fission": 100}
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@dataclass(frozen=True)
class Config:
    kind: str
    c_in: int
    c_out: int
    groups: int
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Union[str, Tuple[int, ...]]
    padding_mode: str
    dilation: Tuple[int, ...]
    output_padding: Tuple[int, ...]
    bias: bool
    affine: bool
    relu: bool
    dtype: str
    batch: int
    size: Tuple[int, ...]
    seed: int

    @property
    def dims(self) -> int:
        return 0 if self.kind == "Linear" else int(self.kind[-2])

    def build(self) -> Tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(self.seed)
        if self.kind == "Linear":
            layer = nn.Linear(self.c_in, self.c_out, bias=self.bias)
        else:
            kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                      bias=self.bias)
            if self.kind.startswith("ConvTranspose"):
                kw["output_padding"] = self.output_padding
            else:
                kw["padding_mode"] = self.padding_mode
            layer = getattr(nn, self.kind)(self.c_in, self.c_out, self.kernel, **kw)
        bn = _BN[self.dims](self.c_out, affine=self.affine)
        randomize_bn(bn, torch.Generator().manual_seed(self.seed + 1))
        with torch.no_grad():
            layer.weight.mul_(2.0)
            if self.bias:
                layer.bias.normal_()
        model = nn.Sequential(layer, bn, nn.ReLU()) if self.relu else nn.Sequential(layer, bn)
        x = torch.randn(self.batch, self.c_in, *self.size, generator=torch.Generator().manual_seed(self.seed + 2))
        dtype = getattr(torch, self.dtype)
        return model.to(dtype), x.to(dtype)


@st.composite
def configs(draw, kinds=KINDS, min_batch=1) -> Config:
    kind = draw(st.sampled_from(kinds))
    common = dict(bias=draw(st.booleans()), affine=draw(st.booleans()), relu=draw(st.booleans()),
                  dtype=draw(st.sampled_from(["float32", "float64"])), batch=draw(st.integers(min_batch, 3)),
                  seed=draw(st.integers(0, 2 ** 16)))
    if kind == "Linear":
        return Config(kind, draw(st.integers(1, 8)), draw(st.integers(1, 8)), 1, (), (), (), "zeros", (), (),
                      size=(), **common)
    n = int(kind[-2])
    small = 2 if n == 3 else 3  # keep 3-D cheap
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, small)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    span = tuple(d * (k - 1) for d, k in zip(dilation, kernel))  # receptive extent - 1
    if kind.startswith("ConvTranspose"):
        padding = tuple(draw(st.integers(0, s // 2)) for s in span)
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        size = tuple(draw(st.integers(1, 4 if n == 3 else 6)) for _ in range(n))
        return Config(kind, c_in, c_out, groups, kernel, stride, padding, "zeros", dilation, output_padding,
                      size=size, **common)
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    choice = draw(st.sampled_from(["int", "int", "int", "same", "valid"]))
    if choice == "same":
        stride = (1,) * n  # torch: padding='same' needs stride 1
        padding: Union[str, Tuple[int, ...]] = "same"
        pads = tuple(s - s // 2 for s in span)  # the larger side
    elif choice == "valid":
        padding, pads = "valid", (0,) * n
    else:
        padding = pads = tuple(draw(st.integers(0, 2)) for _ in range(n))
    lo = []
    for s, p in zip(span, pads):
        need = max(1, s + 1 - 2 * p)  # at least one output position
        if padding_mode in ("reflect", "circular"):
            need = max(need, p + 1)  # reflect/circular need padding < input size
        lo.append(need)
    size = tuple(draw(st.integers(m, m + (2 if n == 3 else 4))) for m in lo)
    return Config(kind, c_in, c_out, groups, kernel, stride, padding, padding_mode, dilation, (0,) * n,
                  size=size, **common)


def _run(model: nn.Module, x: torch.Tensor, with_grads: bool = True):
    x = x.detach().clone().requires_grad_(with_grads)
    out = model(x)
    if not with_grads:
        return [out.detach()]
    # a random (seeded) output gradient: a symmetric one makes bias gradients cancel to ~0
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out, [x] + params, g, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, [x] + params)]


def _err(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    return float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), floor, 1e-300)


def _check(got, expected, truth, what: str) -> None:
    """got/expected: the converted and the plain-PyTorch results in the config's dtype; truth: plain
    PyTorch in float64 (or None when the dtype is float64). Errors are relative to each tensor's
    largest value, floored at 1e-3 of the largest gradient: a gradient that is ~0 in exact arithmetic
    (a conv bias before a batch-statistics BN) is round-off in every implementation."""
    ref = truth or expected
    grad_scale = max([float(t.double().abs().max()) for t in ref[1:]] or [0.0])
    names = ["output", "input grad"] + [f"param grad {i}" for i in range(len(got) - 2)]
    for i, (name, a, b, t) in enumerate(zip(names, got, expected, ref)):
        floor = 0.0 if i == 0 else 1e-3 * grad_scale
        floored = float(t.double().abs().max()) < floor  # ~0 in exact arithmetic: round-off of the grad scale
        if truth is None:
            err = _err(a, b, floor)
            assert err <= (1e-6 if floored else 1e-9), f"{what} {name}: float64 relative error {err:.3g}"
        else:
            e_conv, e_plain = _err(a, t, floor), _err(b, t, floor)
            slack = 1e-3 if floored else 1e-6
            assert e_conv <= 4 * e_plain + slack, (
                f"{what} {name}: float32 error vs float64 truth {e_conv:.3g}, plain PyTorch's own {e_plain:.3g}")


def _truth(cfg: Config, model_fn, with_grads=True):
    if cfg.dtype == "float64":
        return None
    model, x = cfg.build()
    return _run(model_fn(model.double()), x.double(), with_grads)


@settings(max_examples=EXAMPLES["tune"], **FUZZ)
@given(cfg=configs())
def test_fuzz_tune_equals_eval(cfg: Config):
    note(repr(cfg))
    COUNTS["tune"] += 1
    model, x = cfg.build()
    ref = frozen_reference(model)
    convbn.convert(model, "tune")
    report = convbn.report(model)
    assert [r.status for r in report] == ["converted"], str(report)
    _check(_run(model.train(), x), _run(ref, x), _truth(cfg, frozen_reference), "tune vs eval")


@settings(max_examples=EXAMPLES["deploy"], **FUZZ)
@given(cfg=configs())
def test_fuzz_deploy_equals_eval(cfg: Config):
    note(repr(cfg))
    COUNTS["deploy"] += 1
    model, x = cfg.build()
    ref = frozen_reference(model)
    # eval(): the example forward must not need batch statistics (a batch of 1 value per channel);
    # deploying a train()-mode model with such an input is a row of tests/test_bad_inputs.py
    shipped = convbn.deploy(model.eval(), example_inputs=x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in shipped.modules()), \
        str(convbn.report(shipped))
    with torch.no_grad():
        _check(_run(shipped, x, False), _run(ref, x, False), _truth(cfg, frozen_reference, False), "deploy vs eval")


def _train_variant_property(cfg: Config, variant: str) -> None:
    note(repr(cfg))
    model, x = cfg.build()
    ref = copy.deepcopy(model).train()
    expected = _run(ref, x)
    if cfg.dtype == "float32":
        # With a handful of values per channel the exact input gradient of a batch-statistics BN is
        # ~eps/var of its natural scale (x_hat = +-1 for two values): pure cancellation, so float32
        # results differ at O(1) relative between any two correct implementations. float64 covers
        # these shapes exactly.
        assume(expected[0].numel() // expected[0].shape[1] >= 8)
    COUNTS[variant] += 1
    convbn.convert(model, "train", **{variant: True}).train()
    got = _run(model, x)
    truth = _truth(cfg, lambda m: m.train())
    _check(got, expected, truth, f"train {variant} vs train")
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        if truth is None:
            assert _err(a, b, 0.0) <= 1e-9, f"train {variant}: buffer {name}"
        else:
            assert _err(a, b, 0.0) <= 1e-5, f"train {variant}: buffer {name} ({_err(a, b, 0.0):.3g})"


needs_train_variants = pytest.mark.skipif(
    not HAS_TRAIN_VARIANTS, reason="convbn.convert(model, 'train', recompute=/fission=) not available yet")


# batch >= 2: a train-mode BN refuses a batch with one value per channel
@needs_train_variants
@settings(max_examples=EXAMPLES["recompute"], **FUZZ)
@given(cfg=configs(min_batch=2))
def test_fuzz_train_recompute_equals_train(cfg: Config):
    _train_variant_property(cfg, "recompute")


@needs_train_variants
@settings(max_examples=EXAMPLES["fission"], **FUZZ)
@given(cfg=configs(min_batch=2))
def test_fuzz_train_fission_equals_train(cfg: Config):
    _train_variant_property(cfg, "fission")


def test_fuzz_ran_at_least_500_configurations(request):
    """Runs last in this file: counts the configurations the properties above actually ran."""
    if COUNTS["tune"] == 0 or COUNTS["deploy"] == 0:
        pytest.skip("the fuzz properties did not run in this session (selected out)")
    total = sum(COUNTS.values())
    print(f"fuzz configurations run: {COUNTS} total {total}")
    assert total >= 500, COUNTS
