"""FSDP2 (``torch.distributed.fsdp.fully_shard``, gloo, 2 processes on CPU, spawned here): a model converted
*before* sharding trains in eval, tune, train, train+recompute and train+fission, sharded per block and at
the root only, with the gradients of single-process training, and its full state dict is the plain model's.
Converting (or deploying) an already sharded model raises before any work, saying which order to use.

Each rank runs one step on its half of the global batch; FSDP averages the gradients. With running statistics
(eval, tune) every sample is independent, so that equals the full-batch gradient. With batch statistics (the
train modes) each rank's BN normalizes with its half's statistics, so the reference is the average of the two
half-batch gradients computed in one process (what plain DDP computes with BatchNorm).
"""

import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import convbn
from convbn.ops import native
from conftest import assert_close_rel, randomize_all_bn

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
except ImportError:  # pragma: no cover - torch without FSDP2
    fully_shard = None

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(fully_shard is None, reason="torch.distributed.fsdp.fully_shard (FSDP2) is not available"),
    pytest.mark.slow,
]

WORLD = 2
GLOBAL_BATCH = 8
LR = 0.1
DT = torch.float64
MODES = {"eval": ("eval", {}), "tune": ("tune", {}), "train": ("train", {}),
         "train+recompute": ("train", {"recompute": True}), "train+fission": ("train", {"fission": True})}
SHARDINGS = ("per-block", "root")
CASES = [(m, s) for m in MODES for s in SHARDINGS]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_all_bn(Net()).to(DT).train()


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(GLOBAL_BATCH, 3, 10, 10, generator=g, dtype=DT),
            torch.randint(0, 5, (GLOBAL_BATCH,), generator=g))


def _shard(model, sharding, mesh):
    if sharding == "per-block":
        fully_shard(model.stem, mesh=mesh)
        fully_shard(model.block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _graph_nodes(loss):
    """The autograd node types of a step: which Functions ran (so a block that ran unfused is seen)."""
    seen, stack, names = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(n for n, _ in node.next_functions)
    return names


# the Function each mode's blocks run (3 blocks), read off the autograd graph (eager calls run its twin
# without setup_context: convbn.functions._conv.eager_twin)
NATIVE_FISSION = "torch::autograd::CppNode<(anonymous namespace)::BNReLUTrainNative>"  # convbn.ops.native
FUSED = {"tune": "TuneConvBNFunctionEagerBackward", "train+recompute": "RecomputeConvBNFunctionEagerBackward",
         "train+fission": "BNReLUTrainFunctionEagerBackward"}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        x, y = data()
        half = GLOBAL_BATCH // WORLD
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        results = {}
        for mode, sharding in CASES:
            name, kw = MODES[mode]
            model = convbn.convert(make_net(), name, **kw)  # convert, then shard
            _shard(model, sharding, mesh)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            loss = nn.functional.cross_entropy(model(x), y)
            nodes = _graph_nodes(loss)
            loss.backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            opt.step()
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            state = {k: v.clone() for k, v in full.items()}  # set_model_state_dict below shards `full` in place
            # round trip: load the full state dict back into the sharded model, read it again
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
            again = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            model.eval()
            with torch.no_grad():
                out = model(x)
            results[(mode, sharding)] = {
                "grads": grads, "state": state,
                "again": {k: v.clone() for k, v in again.items()}, "out": out,
                "report": [(r.bn, r.mode, r.status) for r in convbn.report(model)],
                "nodes": nodes,
            }
        # the other order, and deploy of a sharded model: refused before any work
        for what in ("convert", "deploy", "report"):
            model = make_net()
            _shard(model, "per-block", mesh)
            try:
                {"convert": lambda: convbn.convert(model, "tune"), "deploy": lambda: convbn.deploy(model),
                 "report": lambda: convbn.report(model, "tune")}[what]()
                results[what] = ("ok", "")
            except Exception as e:  # noqa: BLE001 - recorded for the parent to check
                results[what] = (type(e).__name__, str(e))
            model(x)  # the model is untouched: FSDP still runs it
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("fsdp"))
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _reference(mode):
    """Single-process gradients on the same global batch, and the plain model after one SGD step."""
    model = make_net()
    if mode in ("eval", "tune"):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    x, y = data()
    if mode in ("eval", "tune"):
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    else:  # per-rank batch statistics: the average of the half-batch gradients
        half = GLOBAL_BATCH // WORLD
        per_rank = []
        for r in range(WORLD):
            m = make_net()
            nn.functional.cross_entropy(m(x[r * half:(r + 1) * half]), y[r * half:(r + 1) * half]).backward()
            per_rank.append({n: p.grad for n, p in m.named_parameters()})
        grads = {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p -= LR * grads[n]
    return grads, model


# A conv bias before a train-mode BN has zero gradient in exact arithmetic: compare it to a noise floor.
NOISE = 1e-12


@pytest.mark.parametrize("mode,sharding", CASES)
def test_gradients_equal_single_process(fsdp_results, mode, sharding):
    grads, _ = _reference(mode)
    for rank, res in enumerate(fsdp_results):
        got = res[(mode, sharding)]["grads"]
        assert got.keys() == grads.keys()
        for n, g in grads.items():
            if mode.startswith("train") and n.endswith(".bias") and n in ("block.0.bias", "block.3.bias"):
                assert got[n].abs().max() < NOISE and g.abs().max() < NOISE, n
                continue
            assert_close_rel(got[n], g, 1e-10, f"rank {rank} {mode}/{sharding}: grad {n}")
    report = fsdp_results[0][(mode, sharding)]["report"]
    expected_mode = {"train+recompute": "train+recompute", "train+fission": "train+fission"}.get(mode, mode)
    assert [(m, s) for _, m, s in report] == [(expected_mode, "converted")] * 3, report
    nodes = fsdp_results[0][(mode, sharding)]["nodes"]
    if mode in FUSED:  # every block ran its fused Function under FSDP (none fell back to the unfused path)
        fused = NATIVE_FISSION if mode == "train+fission" and native.op() is not None else FUSED[mode]
        assert nodes.count(fused) == 3, sorted(set(nodes))
    else:
        assert nodes.count("NativeBatchNormBackward0") == 3, sorted(set(nodes))


@pytest.mark.parametrize("mode,sharding", CASES)
def test_full_state_dict_is_the_plain_models_and_round_trips(fsdp_results, mode, sharding):
    _, stepped = _reference(mode)
    plain_keys = list(make_net().state_dict())
    for res in fsdp_results:
        state, again = res[(mode, sharding)]["state"], res[(mode, sharding)]["again"]
        assert list(state) == plain_keys and list(again) == plain_keys
        for k, v in stepped.state_dict().items():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue  # train modes update them per rank (plain BatchNorm under data parallelism)
            assert_close_rel(state[k], v, 1e-10, f"{mode}/{sharding}: {k} after one SGD step")
        assert all(torch.equal(again[k], state[k]) for k in state)
    # the checkpoint loads into the unconverted architecture, strict, and computes what the sharded model did
    plain = make_net()
    plain.load_state_dict(fsdp_results[0][(mode, sharding)]["state"], strict=True)
    x, _ = data()
    with torch.no_grad():
        out = plain.eval()(x[:GLOBAL_BATCH // WORLD])
    assert_close_rel(fsdp_results[0][(mode, sharding)]["out"], out, 1e-12, "outputs")


def test_converting_or_deploying_a_sharded_model_is_refused_with_the_order_to_use(fsdp_results):
    for what in ("convert", "deploy", "report"):
        outcome, message = fsdp_results[0][what]
        assert outcome == "ConvBNError", (what, outcome, message)
        assert "already sharded (fully_shard)" in message and "Convert first, then shard" in message, message


def test_a_deployed_model_shards_like_any_model():
    # deploy is done on the unsharded model; the folded copy is a plain model FSDP can shard (checked by the
    # sharding detector only: a folded model has no convbn forwards left)
    shipped = convbn.deploy(make_net())
    assert convbn.sharding.sharding_of(shipped) is None
    assert not any("forward" in m.__dict__ for m in shipped.modules())
    assert copy.deepcopy(shipped) is not None
