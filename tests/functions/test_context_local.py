"""The implementation switches (``use_extension``, ``tune_route``) are context-local: two threads
running two models at once, each under its own setting, each get their own path."""

from __future__ import annotations

import collections
import copy
import threading

import torch
from torch import nn

import convbn
from conftest import randomize_all_bn
from convbn.functions import tune
from convbn.ops import extension_mode, use_extension
from convbn.functions.tune import tune_route


def _model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return randomize_all_bn(model).eval()


def test_two_threads_with_different_settings_each_get_their_own_path(monkeypatch):
    from convbn.ops import tune as tune_ops

    kernel_ran = collections.defaultdict(set)  # thread id -> {whether the op's CPU implementation ran the kernel}
    real = tune_ops._kernel
    monkeypatch.setattr(tune_ops, "_kernel",
                        lambda *a: kernel_ran[threading.get_ident()].add(real(*a) is not None) or real(*a))
    barrier = threading.Barrier(2, timeout=60)
    results, errors = {}, []
    w = torch.empty(8, 8, 3, 3)

    # converted here: convert's torch.fx tracing patches module-level functions while it runs, so two
    # threads must not trace at once (what is tested is running the converted models concurrently)
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        ref = _model(seed)
        models[name] = (ref, convbn.convert(copy.deepcopy(ref), "tune"), torch.randn(2, 3, 6, 6, requires_grad=True))

    def run(name, mode, route):
        try:
            ref, model, x = models[name]
            with use_extension(mode), tune_route(route):
                barrier.wait()  # both threads are inside their own settings now
                seen = [(extension_mode(), tune._activation_route(10, w), tune._activation_route(10**6, w))]
                for _ in range(5):
                    out = model(x)
                    out.sum().backward()
                seen.append(kernel_ran[threading.get_ident()])
                barrier.wait()  # ... and still are, after the other has run too
                seen.append((extension_mode(), tune._activation_route(10, w), tune._activation_route(10**6, w)))
            results[name] = (seen, torch.allclose(out, ref(x), atol=1e-5))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=("a", "torch", "weight")),
               threading.Thread(target=run, args=("b", "extension", "activation"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    seen_a, ok_a = results["a"]
    seen_b, ok_b = results["b"]
    assert ok_a and ok_b
    assert seen_a[0] == seen_a[-1] == ("torch", False, False)  # forced weight route
    assert seen_b[0] == seen_b[-1] == ("extension", True, True)  # forced activation route
    assert seen_a[1] == {False} and seen_b[1] == {True}  # thread a: the references; thread b: the kernels
    assert extension_mode() == "auto"  # the main thread never saw either setting
    assert tune._activation_route(10, w) and not tune._activation_route(10**6, w)
