"""convbn.integrations.lightning.ConvBNCallback with a real lightning.Trainer on CPU (a few steps, float64):
tune trains exactly as a plain loop with BN in eval, checkpoints load strict into the unconverted module,
BaseFinetuning's freeze/unfreeze is honoured, and fit end recalibrates and exports a deployed copy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convbn
from convbn.icf import root_hooks
from conftest import assert_close_rel, randomize_all_bn
from convbn.runtime import installed_block

pl = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed (pip install lightning; the dev "
                                                     "extra has it)")
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint  # noqa: E402

from convbn.integrations.lightning import ConvBNCallback  # noqa: E402

DT = torch.float64
LR = 0.05


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))


def make_net():
    torch.manual_seed(0)
    return randomize_all_bn(Net()).to(DT)


class Lit(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = make_net()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


def dataset():
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8, generator=g, dtype=DT),
                                          torch.randint(0, 4, (8,), generator=g))


def loader():
    return torch.utils.data.DataLoader(dataset(), batch_size=4, shuffle=False)


def trainer(tmp_path, callbacks, max_steps=4, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks,
                      num_sanity_val_steps=0, **kw)


def test_tune_trains_like_a_plain_eval_bn_loop_and_checkpoints_load_into_the_plain_module(tmp_path):
    lit = Lit()
    initial = {k: v.clone() for k, v in lit.state_dict().items()}
    cb = ConvBNCallback("tune", module="model")
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), filename="last")
    trainer(tmp_path, [cb, ckpt]).fit(lit, loader())
    assert [(r.mode, r.status) for r in cb.report] == [("tune", "converted")] * 2, str(cb.report)
    assert installed_block(lit.model.backbone[1]).mode == "tune"

    # the reference: a plain loop, BN in eval, the same SGD steps
    ref = make_net().train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for _ in range(2):
        for x, y in loader():
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
    state = lit.model.state_dict()
    for k, v in ref.state_dict().items():
        assert_close_rel(state[k], v, 1e-12, k)
    for k in ("backbone.1.running_mean", "backbone.4.running_var"):  # tune froze the statistics
        assert torch.equal(state[k], initial[f"model.{k}"])

    # the checkpoint Lightning wrote: same keys, loads strict into the unconverted module, same outputs
    path = ckpt.best_model_path or ckpt.last_model_path
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert list(saved) == list(initial)
    plain = Lit()
    plain.load_state_dict(saved, strict=True)
    assert not any("forward" in m.__dict__ for m in plain.modules())
    x = dataset().tensors[0]
    with torch.no_grad():
        assert_close_rel(lit.eval()(x), plain.eval()(x), 1e-12, "outputs")
    reloaded = Lit.load_from_checkpoint(path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("kw", [{"recompute": True}, {"fission": True}, {"fission": True, "low_memory": True}],
                         ids=["recompute", "fission", "fission-low-memory"])
def test_train_variants_train_like_plain_pytorch(tmp_path, kw):
    lit = Lit()
    cb = ConvBNCallback("train", module="model", **kw)
    trainer(tmp_path, [cb], enable_checkpointing=False).fit(lit, loader())
    variant = "train+" + next(iter(kw))
    assert [(r.mode, r.status) for r in cb.report] == [(variant, "converted")] * 2, str(cb.report)
    if kw.get("low_memory"):  # the BN outputs were rebuilt in backward, not stored
        assert root_hooks(lit.model).cache.recipes.recipes_packed > 0
    ref = make_net().train()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for _ in range(2):
        for x, y in loader():
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
    state = lit.model.state_dict()
    for k, v in ref.state_dict().items():  # parameters and the running statistics train mode updated
        if k.endswith("num_batches_tracked"):
            assert torch.equal(state[k], v), k
        else:
            assert_close_rel(state[k], v, 1e-10, k)


class FreezeBackbone(BaseFinetuning):
    """Lightning's documented pattern: frozen backbone (its BNs with track_running_stats=False), unfrozen at epoch 1."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.model.backbone, train_bn=False)

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.model.backbone, optimizer, train_bn=True)

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_base_finetuning_freeze_and_unfreeze_are_honoured_and_tune_stays_exact(tmp_path):
    lit = Lit()
    initial = {k: v.clone() for k, v in lit.model.state_dict().items()}
    freeze, cb = FreezeBackbone(), ConvBNCallback("tune", module="model")
    trainer(tmp_path, [freeze, cb], enable_checkpointing=False).fit(lit, loader())
    # BaseFinetuning's setup froze the BNs (track_running_stats=False) before the callback converted: still tune
    assert [(r.bn, r.mode, r.status) for r in cb.report] == [
        ("backbone.1", "tune", "converted"), ("backbone.4", "tune", "converted")], str(cb.report)
    epoch0, epoch1 = freeze.seen[0], freeze.seen[1]
    for k in ("backbone.0.weight", "backbone.1.weight", "backbone.3.bias"):
        assert torch.equal(epoch0[k], initial[k]), f"{k} changed while frozen"
        assert not torch.equal(epoch1[k], epoch0[k]), f"{k} not trained after unfreezing"
    assert not torch.equal(epoch0["head.weight"], initial["head.weight"])
    for k in ("backbone.1.running_mean", "backbone.4.running_var"):  # never updated (frozen, then tune)
        assert torch.equal(epoch1[k], initial[k])
    assert lit.model.backbone[1].track_running_stats is True  # as make_trainable left it
    assert all(p.requires_grad for p in lit.parameters())
    plain = copy.deepcopy(lit.model)
    convbn.revert(plain).eval()
    x = dataset().tensors[0]
    lit.train()  # tune: eval's function even in train()
    with torch.no_grad():
        assert_close_rel(lit(x), plain(x), 1e-12, "tune vs plain eval")


def test_fit_end_recalibrates_and_exports_a_deployed_copy(tmp_path):
    lit = Lit()
    path = tmp_path / "deployed.pt"
    cb = ConvBNCallback("tune", module="model", recalibrate_batches="train", export_deployed=path)
    trainer(tmp_path, [cb], max_steps=2, enable_checkpointing=False).fit(lit, loader())
    assert cb.recalibration is not None and cb.recalibration.num_batches == 2
    assert [r.status for r in cb.recalibration] == ["recalibrated"] * 2
    # batch statistics in the forward: recalibrating again on the same data gives the same statistics
    again = copy.deepcopy(lit.model)
    convbn.recalibrate(again, loader(), progress=False)
    for k, v in again.state_dict().items():
        assert torch.equal(lit.model.state_dict()[k], v), k
    x = dataset().tensors[0]
    ref = convbn.revert(copy.deepcopy(lit.model)).eval()
    with torch.no_grad():
        assert_close_rel(cb.deployed(x), ref(x), 1e-12, "deployed vs eval of the recalibrated model")
        loaded = torch.load(path, weights_only=False)
        assert_close_rel(loaded(x), ref(x), 1e-12, "saved deployed copy")
    assert type(cb.deployed.backbone[1]).__name__ == "Identity"
    assert installed_block(lit.model.backbone[1]).mode == "tune"  # the trained model stays converted


def test_arguments_are_checked_when_the_callback_is_built():
    with pytest.raises(ValueError, match="export_deployed"):
        ConvBNCallback("deploy")
    with pytest.raises(convbn.ConvBNError, match="unknown mode"):
        ConvBNCallback("tnue")
    with pytest.raises(ValueError, match="recalibrate_batches"):
        ConvBNCallback(recalibrate_batches="val")
    with pytest.raises(AttributeError, match="no submodule 'net'"):
        ConvBNCallback(module="net").target(Lit())


def test_the_pytorch_lightning_package_gets_the_same_callback(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning", reason="the pytorch_lightning package is not installed")
    from convbn.integrations.pytorch_lightning import ConvBNCallback as PTLCallback

    class PTLLit(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_net()

        training_step, configure_optimizers, forward = Lit.training_step, Lit.configure_optimizers, Lit.forward

    lit, cb = PTLLit(), PTLCallback("eval", module="model")
    ptl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                callbacks=[cb]).fit(lit, loader())
    assert [(r.mode, r.status) for r in cb.report] == [("eval", "converted")] * 2

