"""The zoo: real torchvision / timm models, their inputs and losses, and what counts as a norm layer.

Every case builds a fresh float32 model with ``weights=None`` (nothing is downloaded) and says how to
call it in ``train()`` (detectors: images + random targets, returning a loss dict) and in ``eval()``.
The norm layers get random, non-trivial statistics (:func:`randomize_norms`), FrozenBN buffers included.

What counts as a norm layer is decided here, independently of convbn: torch ``_BatchNorm``
subclasses, any class named ``FrozenBatchNorm2d`` (torchvision, timm, detectron2), and timm's
``BatchNormAct2d`` / ``FrozenBatchNormAct2d`` / ``SyncBatchNormAct``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from conftest import NORM_CLASS_NAMES, is_norm  # noqa: F401 (re-exported: the zoo's definition of a norm)



@functools.lru_cache(maxsize=None)
def importable(package: str) -> Optional[str]:
    """None if ``package`` imports, else why not (an installed but broken build counts as missing)."""
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed"
    try:
        importlib.import_module(package)
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision built for another torch
        return f"{package} does not import ({type(e).__name__}: {e})"
    return None

LAYER_TYPES = (_ConvNd, nn.Linear)


def norm_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Qualified name -> norm module, each module once (its first name, as ``named_modules`` gives it)."""
    return {name: m for name, m in model.named_modules() if is_norm(m)}


def norm_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every buffer of every norm module (running_mean/var, num_batches_tracked, FrozenBN weight/bias), cloned."""
    out = {}
    for name, m in norm_modules(model).items():
        for bname, b in m.named_buffers(recurse=False):
            if b is not None:
                out[f"{name}.{bname}"] = b.detach().clone()
    return out


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Realistic, non-trivial statistics for every norm layer (tests/conftest.py's ``randomize_bn``,
    extended to FrozenBN buffers): var log-uniform in [1e-2, 4], non-zero means, |gamma|/sqrt(var+eps)
    log-uniform in [0.05, 20] with ~20% negative gammas, non-zero beta, num_batches_tracked = 100."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in norm_modules(model).values():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            ref = rm if rm is not None else w
            if ref is None:
                continue
            c, eps = ref.numel(), float(m.eps)
            if rm is not None and rv is not None:
                var = torch.exp(torch.empty(c).uniform_(math.log(1e-2), math.log(4.0), generator=g))
                rv.copy_(var)
                rm.copy_(torch.randn(c, generator=g) * 2.0)
                nbt = getattr(m, "num_batches_tracked", None)
                if nbt is not None:
                    nbt.fill_(100)
            else:
                var = torch.ones(c)
            if w is not None:
                scale = torch.exp(torch.empty(c).uniform_(math.log(0.05), math.log(20.0), generator=g))
                sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
                w.copy_(sign * scale * torch.sqrt(var + eps))
            if b is not None:
                b.copy_(torch.randn(c, generator=g))
    return model


class D2FrozenBatchNorm2d(nn.Module):
    """detectron2's ``FrozenBatchNorm2d`` (detectron2/layers/batch_norm.py), re-written here so the zoo
    covers it without installing detectron2: same buffers (weight, bias, running_mean, running_var), same
    ``eps`` attribute, same two forward paths (an explicit affine when the input needs grad, else
    ``F.batch_norm(training=False)``). convbn must recognise it without importing detectron2."""

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            scale = scale.reshape(1, -1, 1, 1)
            bias = bias.reshape(1, -1, 1, 1)
            out_dtype = x.dtype
            return x * scale.to(out_dtype) + bias.to(out_dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)

    def __repr__(self) -> str:
        return f"FrozenBatchNorm2d(num_features={self.num_features}, eps={self.eps})"


# detectron2 names its class FrozenBatchNorm2d; the zoo's norm predicate goes by class name.
D2FrozenBatchNorm2d.__name__ = D2FrozenBatchNorm2d.__qualname__ = "FrozenBatchNorm2d"


# ----------------------------------------------------------------------------- inputs and losses

def _images(n: int, sizes: List[Tuple[int, int]], dtype: torch.dtype, seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g, dtype=torch.float64).to(dtype) for (h, w) in sizes[:n]]


def _targets(images: List[torch.Tensor], num_classes: int, masks: bool, seed: int) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for img in images:
        _, h, w = img.shape
        k = 3
        x1 = torch.rand(k, generator=g, dtype=torch.float64) * (w * 0.6)
        y1 = torch.rand(k, generator=g, dtype=torch.float64) * (h * 0.6)
        bw = 8 + torch.rand(k, generator=g, dtype=torch.float64) * (w * 0.4 - 8)
        bh = 8 + torch.rand(k, generator=g, dtype=torch.float64) * (h * 0.4 - 8)
        boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], 1).to(img.dtype)
        t = {"boxes": boxes, "labels": torch.randint(1, num_classes, (k,), generator=g)}
        if masks:
            m = torch.zeros(k, h, w, dtype=torch.uint8)
            for i, (a, b_, c, d) in enumerate(boxes.round().long().tolist()):
                m[i, b_:d, a:c] = 1
            t["masks"] = m
        out.append(t)
    return out


@dataclass
class ZooCase:
    """One zoo model: how to build it and call it.

    ``train_args(dtype)`` / ``eval_args(dtype)`` are positional arguments for ``model(*args)`` in
    train() / eval() (a detector's are ``(images,)`` or ``(images, targets)``: a tuple holding the list).
    """

    name: str
    family: str  # "classification" | "detection" | "segmentation" | "timm"
    requires: str  # "torchvision" | "timm"
    build: Callable[[], nn.Module]
    train_args: Callable[[torch.dtype], Tuple[Any, ...]]
    eval_args: Callable[[torch.dtype], Tuple[Any, ...]]
    detector: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def unavailable(self) -> Optional[str]:
        """Why this case cannot run here, or None. timm cases need torchvision too (timm imports it)."""
        return importable("torchvision") or (importable("timm") if self.requires == "timm" else None)

    def model(self) -> nn.Module:
        """A fresh float64 model with random norm statistics, in train()."""
        torch.manual_seed(0)
        model = self.build()
        randomize_norms(model, seed=1)
        return model.double().train()


def _image_batch(n: int, size: int, seed: int = 0):
    def make(dtype: torch.dtype) -> Tuple[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, 3, size, size, generator=g, dtype=torch.float64).to(dtype),)
    return make


def loss_of(case: ZooCase, out: Any) -> torch.Tensor:
    """The scalar to backprop: a detector's summed loss dict, else a fixed random projection of every
    output tensor (not ``.sum()``, whose gradient is degenerate after e.g. a softmax or a mean)."""
    if case.detector:
        return sum(out.values())
    tensors = flatten_tensors(out)
    g = torch.Generator().manual_seed(7)
    total = 0.0
    for t in tensors:
        w = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
        total = total + (t * w).sum()
    return total


def flatten_tensors(obj: Any) -> List[torch.Tensor]:
    """Every tensor in a nested output (tuples/namedtuples, lists, dicts in key order)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in obj for t in flatten_tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in flatten_tensors(o)]
    return []


def named_outputs(obj: Any, prefix: str = "out") -> Dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        out = {}
        for k in obj:
            out.update(named_outputs(obj[k], f"{prefix}[{k!r}]"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, o in enumerate(obj):
            out.update(named_outputs(o, f"{prefix}[{i}]"))
        return out
    return {}


# ----------------------------------------------------------------------------- builders

def _tv_classifier(name: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kw)
    return build


def _frozen_bn(kind: str):
    """The norm_layer for a detector backbone: torchvision's FrozenBatchNorm2d (the builders' choice
    whenever weights are given) or nn.BatchNorm2d (their choice without weights)."""
    import torchvision
    return torchvision.ops.misc.FrozenBatchNorm2d if kind == "frozen" else nn.BatchNorm2d


# Small detector settings: float64 in train() must stay fast. Every proposal/sampling count is cut down.
_RCNN_KW = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
                box_batch_size_per_image=32, box_detections_per_img=20, num_classes=11)
_ONE_STAGE_KW = dict(min_size=96, max_size=128, detections_per_img=20, topk_candidates=100, num_classes=11)
_DET_SIZES = [(96, 128), (112, 96)]


def _resnet_fpn_backbone(norm: str, trainable_layers: int, retina: bool):
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    body = torchvision.models.resnet50(weights=None, norm_layer=_frozen_bn(norm))
    if retina:
        return _resnet_fpn_extractor(body, trainable_layers, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))
    return _resnet_fpn_extractor(body, trainable_layers)


def _trainable(norm: str, pretrained_default: int, max_value: int) -> int:
    # The FrozenBN variants mimic a pretrained fine-tuning set-up: the builders' default number of
    # trainable backbone layers when weights are given (the rest has requires_grad=False).
    return pretrained_default if norm == "frozen" else max_value


def _fasterrcnn_resnet50_fpn(norm: str):
    def build():
        from torchvision.models.detection import FasterRCNN
        return FasterRCNN(_resnet_fpn_backbone(norm, _trainable(norm, 3, 5), retina=False), **_RCNN_KW)
    return build


def _maskrcnn_resnet50_fpn(norm: str):
    def build():
        from torchvision.models.detection import MaskRCNN
        return MaskRCNN(_resnet_fpn_backbone(norm, _trainable(norm, 3, 5), retina=False), **_RCNN_KW)
    return build


def _retinanet_resnet50_fpn(norm: str):
    def build():
        from torchvision.models.detection import RetinaNet
        kw = dict(_ONE_STAGE_KW)
        return RetinaNet(_resnet_fpn_backbone(norm, _trainable(norm, 3, 5), retina=True), **kw)
    return build


def _fcos_resnet50_fpn(norm: str):
    def build():
        from torchvision.models.detection import FCOS
        return FCOS(_resnet_fpn_backbone(norm, _trainable(norm, 3, 5), retina=True), **_ONE_STAGE_KW)
    return build


def _fasterrcnn_mobilenet_v3_large_fpn(norm: str):
    def build():
        import torchvision
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.backbone_utils import _mobilenet_extractor
        body = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=_frozen_bn(norm))
        backbone = _mobilenet_extractor(body, True, _trainable(norm, 3, 6))
        anchor_sizes = ((32, 64, 128, 256, 512),) * 3
        aspect_ratios = ((0.5, 1.0, 2.0),) * len(anchor_sizes)
        return FasterRCNN(backbone, rpn_anchor_generator=AnchorGenerator(anchor_sizes, aspect_ratios),
                          rpn_score_thresh=0.05, **_RCNN_KW)
    return build


def _ssdlite320_mobilenet_v3_large(norm: str):
    def build():
        import torchvision
        norm_layer = (partial(torchvision.ops.misc.FrozenBatchNorm2d, eps=0.001) if norm == "frozen"
                      else partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
        model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=11, norm_layer=norm_layer,
            detections_per_img=20, topk_candidates=100)
        # The builder fixes 320x320; 128 keeps float64 fast (the anchors follow the feature maps).
        model.transform.min_size, model.transform.max_size, model.transform.fixed_size = (128,), 128, (128, 128)
        return model
    return build


def _detector_case(name: str, build, masks: bool = False) -> ZooCase:
    def train_args(dtype):
        images = _images(2, _DET_SIZES, dtype, seed=0)
        return (images, _targets(images, 11, masks, seed=0))

    def eval_args(dtype):
        return (_images(2, _DET_SIZES, dtype, seed=0),)

    return ZooCase(name, "detection", "torchvision", build, train_args, eval_args, detector=True)


def _timm(name: str, frozen: bool = False, sync: bool = False, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        model = timm.create_model(name, pretrained=False, **kw)
        if sync:
            # BatchNormAct2d -> SyncBatchNormAct (its train() forward needs a process group: frozen, it must not)
            from timm.layers import convert_sync_batchnorm
            model = convert_sync_batchnorm(model)
        if frozen:
            # timm's own way to freeze: BatchNorm2d -> timm FrozenBatchNorm2d, BatchNormAct2d -> FrozenBatchNormAct2d
            from timm.layers import freeze_batch_norm_2d
            model = freeze_batch_norm_2d(model)
        return model
    return build


def _d2_resnet50() -> nn.Module:
    import torchvision
    return torchvision.models.resnet50(weights=None, norm_layer=D2FrozenBatchNorm2d)


def _segmentation(name: str, **kw):
    def build():
        import torchvision
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5, **kw)
    return build


def _cases() -> List[ZooCase]:
    small = _image_batch(2, 64)
    cases = [
        # torchvision classification
        ZooCase("tv:resnet50", "classification", "torchvision", _tv_classifier("resnet50"), small, small),
        ZooCase("tv:mobilenet_v3_large", "classification", "torchvision", _tv_classifier("mobilenet_v3_large"),
                small, small),
        ZooCase("tv:efficientnet_b0", "classification", "torchvision", _tv_classifier("efficientnet_b0"),
                small, small),
        ZooCase("tv:regnet_y_400mf", "classification", "torchvision", _tv_classifier("regnet_y_400mf"),
                small, small),
        ZooCase("tv:densenet121", "classification", "torchvision", _tv_classifier("densenet121"), small, small),
        ZooCase("tv:shufflenet_v2_x1_0", "classification", "torchvision", _tv_classifier("shufflenet_v2_x1_0"),
                small, small),
        ZooCase("tv:mnasnet1_0", "classification", "torchvision", _tv_classifier("mnasnet1_0"), small, small),
        # The aux head needs 299 px (its 5x5 conv runs on a 17x17 map pooled by 5/3). Batch 2: convert's
        # dynamic trace runs the model as it is, in train(), where a BN on the aux head's 1x1 map needs
        # more than one value per channel.
        ZooCase("tv:inception_v3(aux)", "classification", "torchvision",
                _tv_classifier("inception_v3", aux_logits=True, init_weights=False),
                _image_batch(2, 299), _image_batch(2, 299)),
        ZooCase("tv:googlenet(aux)", "classification", "torchvision",
                _tv_classifier("googlenet", aux_logits=True, init_weights=False), small, small),
        # detectron2-style FrozenBatchNorm2d in a torchvision ResNet-50
        ZooCase("d2frozen:resnet50", "classification", "torchvision", _d2_resnet50, small, small),
    ]
    for norm in ("frozen", "bn"):
        cases += [
            _detector_case(f"det:fasterrcnn_resnet50_fpn[{norm}]", _fasterrcnn_resnet50_fpn(norm)),
            _detector_case(f"det:fasterrcnn_mobilenet_v3_large_fpn[{norm}]", _fasterrcnn_mobilenet_v3_large_fpn(norm)),
            _detector_case(f"det:retinanet_resnet50_fpn[{norm}]", _retinanet_resnet50_fpn(norm)),
            _detector_case(f"det:maskrcnn_resnet50_fpn[{norm}]", _maskrcnn_resnet50_fpn(norm), masks=True),
            _detector_case(f"det:fcos_resnet50_fpn[{norm}]", _fcos_resnet50_fpn(norm)),
            _detector_case(f"det:ssdlite320_mobilenet_v3_large[{norm}]", _ssdlite320_mobilenet_v3_large(norm)),
        ]
    cases += [
        ZooCase("seg:deeplabv3_resnet50", "segmentation", "torchvision",
                _segmentation("deeplabv3_resnet50", aux_loss=True), small, small),
        ZooCase("seg:fcn_resnet50", "segmentation", "torchvision", _segmentation("fcn_resnet50", aux_loss=True),
                small, small),
        ZooCase("seg:lraspp_mobilenet_v3_large", "segmentation", "torchvision",
                _segmentation("lraspp_mobilenet_v3_large"), small, small),
    ]
    # timm: BatchNormAct2d families, plain-BN nets, and timm's own frozen variants
    for name in ("efficientnet_b0", "mobilenetv3_large_100", "regnety_016", "cspdarknet53", "rexnet_100", "dpn68",
                 "ghostnet_100", "resnet18", "resnet26d"):
        cases.append(ZooCase(f"timm:{name}", "timm", "timm", _timm(name), small, small))
    cases += [
        ZooCase("timm-frozen:efficientnet_b0", "timm", "timm", _timm("efficientnet_b0", frozen=True), small, small),
        ZooCase("timm-frozen:resnet26d", "timm", "timm", _timm("resnet26d", frozen=True), small, small),
        ZooCase("timm-sync:mobilenetv3_large_100", "timm", "timm", _timm("mobilenetv3_large_100", sync=True),
                small, small),
    ]
    return cases


ZOO: List[ZooCase] = _cases()
ZOO_BY_NAME: Dict[str, ZooCase] = {c.name: c for c in ZOO}


def layer_followed_norms(model: nn.Module, args: Tuple[Any, ...], seed: int = 0) -> Dict[str, Optional[str]]:
    """Which norm layers follow a Conv/Linear, found independently of convbn: run a deep copy once
    (no_grad, train/eval as the model is, its norm layers in eval) with hooks; a norm follows a layer when
    its first call's input *is* that layer's output object. Returns norm name -> layer name (None: follows
    no layer or never ran)."""
    import copy
    m = copy.deepcopy(model)
    for mod in m.modules():
        if is_norm(mod):
            mod.eval()
    names = {id(mod): n for n, mod in m.named_modules()}
    outputs: Dict[int, Tuple[str, torch.Tensor]] = {}
    found: Dict[str, Optional[str]] = {n: None for n in norm_modules(m)}
    seen = set()
    handles = []

    def layer_hook(mod, inp, out):
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = (names[id(mod)], out)

    def norm_pre_hook(mod, inp):
        n = names[id(mod)]
        if n in seen:
            return
        seen.add(n)
        x = inp[0] if inp else None
        src = outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
        if src is not None and src[1] is x:
            found[n] = src[0]

    for mod in m.modules():
        if is_norm(mod):
            handles.append(mod.register_forward_pre_hook(norm_pre_hook))
        elif isinstance(mod, LAYER_TYPES):
            handles.append(mod.register_forward_hook(layer_hook))
    torch.manual_seed(seed)
    with torch.no_grad():
        m(*args)
    for h in handles:
        h.remove()
    return found
