"""The implementation switches (``use_extension``, ``tune_route``) are context-local: two threads
running two models at once, each under its own setting, each get their own path."""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

import convbn
from conftest import randomize_all_bn
from convbn.functions import tune
from convbn.functions.native import extension_mode, use_extension
from convbn.functions.tune import tune_route


def _model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return randomize_all_bn(model).eval()


def test_two_threads_with_different_settings_each_get_their_own_path():
    barrier = threading.Barrier(2, timeout=60)
    results, errors = {}, []
    w = torch.empty(8, 8, 3, 3)

    def run(name, mode, route, seed):
        try:
            ref = _model(seed)
            model = convbn.convert(copy.deepcopy(ref), "tune")
            x = torch.randn(2, 3, 6, 6, requires_grad=True)
            with use_extension(mode), tune_route(route):
                barrier.wait()  # both threads are inside their own settings now
                seen = [(extension_mode(), tune._activation_route(10, w), tune._activation_route(10**6, w))]
                for _ in range(5):
                    out = model(x)
                    seen.append(_path_of(out))
                    out.sum().backward()
                barrier.wait()  # ... and still are, after the other has run too
                seen.append((extension_mode(), tune._activation_route(10, w), tune._activation_route(10**6, w)))
            results[name] = (seen, torch.allclose(out, ref(x), atol=1e-5))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=("a", "torch", "weight", 0)),
               threading.Thread(target=run, args=("b", "extension", "activation", 1))]
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
    assert set(seen_a[1:-1]) == {"torch-ops"} and set(seen_b[1:-1]) == {"kernel"}
    assert extension_mode() == "auto"  # the main thread never saw either setting
    assert tune._activation_route(10, w) and not tune._activation_route(10**6, w)


def _path_of(out):
    """Which implementation Tune's Function took for the call that made ``out`` (its ctx records it)."""
    node = out.grad_fn
    while not hasattr(node, "native"):  # past the ReLU's node
        node = node.next_functions[0][0]
    return "kernel" if node.native is not None else "torch-ops"
