"""DistributedDataParallel (gloo, 2 processes on localhost, spawned here): a converted model gives the
gradients of single-process training on the same global batch; SyncBatchNorm models convert.

Each rank trains one step on its half of the global batch. With BN on running statistics (eval,
tune) every sample's computation is batch-independent, so DDP's gradient average of two half-batch
mean losses equals the full-batch mean-loss gradient. With SyncBatchNorm in train mode the batch
statistics are global, so the same holds for plain train mode too.
"""

import copy
import inspect
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import convbn
from conftest import assert_close_rel, randomize_all_bn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
GLOBAL_BATCH = 8
HAS_RECOMPUTE = "recompute" in inspect.signature(convbn.convert).parameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def make_net(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_all_bn(Net())
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync else model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 12, 12, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


# name -> (SyncBatchNorm?, how the worker converts and wraps, single-process reference mode).
# DDP refuses SyncBatchNorm on CPU modules ("SyncBatchNorm layers only work with GPU modules") and a
# training-mode SyncBatchNorm needs a GPU to sync; so on CPU the SyncBatchNorm cases run the converted
# model unwrapped and all-reduce the gradients by hand, which is what DDP does.
CASES = {
    "tune: convert, then wrap": (False, "before", "tune"),
    "tune: wrap, then convert ddp.module": (False, "after-module", "tune"),
    "eval: convert, then wrap": (False, "before", "eval"),
    "SyncBatchNorm tune (manual all-reduce)": (True, "allreduce", "tune"),
    "SyncBatchNorm eval (manual all-reduce)": (True, "allreduce", "eval"),
}


def _convert(model, mode):
    return convbn.convert(model, mode)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y = data()
        half = GLOBAL_BATCH // WORLD
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        results = {}
        for name, (sync, order, mode) in CASES.items():
            model = make_net(sync).train()
            if order == "before":
                _convert(model, mode)
                ddp = nn.parallel.DistributedDataParallel(model)
            elif order == "after-module":
                ddp = nn.parallel.DistributedDataParallel(model)
                _convert(ddp.module, mode)
            else:
                ddp = _convert(model, mode)
            nn.functional.cross_entropy(ddp(x), y).backward()
            module = ddp.module if isinstance(ddp, nn.parallel.DistributedDataParallel) else ddp
            if order == "allreduce":
                for p in module.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
            results[name] = {
                "grads": {n: p.grad.clone() for n, p in module.named_parameters()},
                "buffers": {n: b.clone() for n, b in module.named_buffers()},
                "report": [(r.bn, r.kind, r.mode, r.status) for r in convbn.report(module)],
            }
        # converting the DDP wrapper itself: record what happens (documented in docs/distributed.md)
        ddp = nn.parallel.DistributedDataParallel(make_net(False))
        try:
            convbn.convert(ddp, "tune")
            nn.functional.cross_entropy(ddp(x), y).backward()
            results["wrapper"] = ("ok", [(r.bn, r.status) for r in convbn.report(ddp)])
        except Exception as e:  # noqa: BLE001 - recorded for the parent to check
            results["wrapper"] = (type(e).__name__, str(e))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    # spawned children re-import this module by name: make sure they find it
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _single_process_reference(sync: bool, mode: str):
    model = make_net(False).train()  # on one process SyncBatchNorm == BatchNorm
    if mode in ("eval", "tune"):
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_gradients_equal_single_process_on_the_global_batch(ddp_results, name):
    sync, _, mode = CASES[name]
    grads, buffers = _single_process_reference(sync, mode)
    for rank, res in enumerate(ddp_results):
        got = res[name]
        for n, g in grads.items():
            assert_close_rel(got["grads"][n], g, 1e-5, f"rank {rank} {name}: grad {n}")
        for n, b in buffers.items():  # running statistics untouched (frozen in eval/tune)
            assert torch.equal(got["buffers"][n], b), f"rank {rank} {name}: buffer {n} changed"
    report = ddp_results[0][name]["report"]
    assert [(m, s) for _, _, m, s in report] == [(mode, "converted")] * 2, report
    if sync:
        assert {k for _, k, _, _ in report} == {"Conv2d->SyncBatchNorm"}


def test_sync_batchnorm_models_convert_in_every_mode():
    model = make_net(True)
    for mode in ("eval", "tune", "deploy", "train"):
        m = convbn.convert(copy.deepcopy(model), mode)
        assert {r.status for r in convbn.report(m)} == {"converted"}, str(convbn.report(m))


@pytest.mark.skipif(not HAS_RECOMPUTE, reason="convbn.convert(model, 'train', recompute=True) not available yet")
def test_sync_batchnorm_is_never_recomputed_locally():
    # recompute computes batch statistics inside one process; SyncBatchNorm needs the global ones
    report = convbn.report(convbn.convert(make_net(True), "train", recompute=True))
    rows = [r for r in report if "SyncBatchNorm" in r.kind]
    assert rows and all(r.mode == "train" and r.status != "converted" and r.reason for r in rows), str(report)


def test_converting_the_ddp_wrapper_itself(ddp_results):
    outcome, detail = ddp_results[0]["wrapper"]
    # A clear error that says what to do (convert before wrapping, or convert ddp.module).
    assert outcome == "ConvBNError", (outcome, detail)
    assert "got a DistributedDataParallel wrapper" in detail and "wrapper.module" in detail, detail
