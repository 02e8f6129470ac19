"""Saved-for-backward bytes of tune / eval / deploy on two real models with non-stock norm layers
(issue 12's "Done when"): timm efficientnet_b0 (BatchNormAct2d: BN, drop, SiLU in one module) and the
backbone of a torchvision Faster R-CNN ResNet-50-FPN with FrozenBatchNorm2d (what the builder uses
whenever weights are given; built here with weights=None and the pretrained default of 3 trainable
backbone layers).

float32; each model in train() after conversion; forward + backward w.r.t. the parameters (the input
needs no grad). Bytes are counted by ``convbn.bench.memory.saved_tensor_bytes`` (each storage once,
parameters included; "without parameters" subtracts every parameter's bytes). Deterministic: no timing,
so a busy machine does not matter. The issue wants tune within 1% of deploy.

"plain" is the unconverted model with every norm module in eval() (what a user fine-tunes today).
"folded by hand" is the target deploy must reach: every norm layer whose input is a Conv's output
folded into that conv with ``torch.nn.utils.fusion.fuse_conv_bn_weights`` and replaced by what follows
inside it (timm: its drop + act; else nothing), independently of convbn.

    PYTHONPATH=src python benchmarks/bench_zoo_memory.py
    PYTHONPATH=src python benchmarks/bench_zoo_memory.py --out benchmarks/results/zoo_memory.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import convbn
from convbn.bench.memory import saved_tensor_bytes

NORM_CLASS_NAMES = {"FrozenBatchNorm2d", "BatchNormAct2d", "FrozenBatchNormAct2d", "SyncBatchNormAct"}


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) or any(c.__name__ in NORM_CLASS_NAMES for c in type(m).__mro__)


def efficientnet_b0(batch: int, size: int) -> Tuple[nn.Module, torch.Tensor]:
    import timm
    torch.manual_seed(0)
    return timm.create_model("efficientnet_b0", pretrained=False), torch.randn(batch, 3, size, size)


def frozen_fasterrcnn_backbone(batch: int, size: int) -> Tuple[nn.Module, torch.Tensor]:
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    torch.manual_seed(0)
    body = torchvision.models.resnet50(weights=None, norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    model = FasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)
    return model.backbone, torch.randn(batch, 3, size, size)


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        return sum(v.float().sum() for v in out.values())
    return out.float().sum()


def _norm_parts(norm: nn.Module):
    """(running_mean, running_var, weight, bias, eps) of any norm layer; weight/bias may be buffers or None."""
    return (norm.running_mean, norm.running_var, getattr(norm, "weight", None), getattr(norm, "bias", None),
            float(norm.eps))


def folded_by_hand(base: nn.Module, x: torch.Tensor) -> nn.Module:
    """Fold every norm layer that directly consumes a Conv2d's output, without convbn (the deploy target)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    m = copy.deepcopy(base).eval()
    names = {id(mod): n for n, mod in m.named_modules()}
    outputs: Dict[int, nn.Module] = {}
    pairs: Dict[str, Tuple[nn.Module, nn.Module]] = {}
    handles = []
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(lambda c, i, o: outputs.__setitem__(id(o), (c, o))))
        elif is_norm(mod):
            def pre(n, inp):
                src = outputs.get(id(inp[0]))
                if src is not None and src[1] is inp[0]:
                    pairs.setdefault(names[id(n)], (src[0], n))
            handles.append(mod.register_forward_pre_hook(pre))
    with torch.no_grad():
        m(x)
    for h in handles:
        h.remove()
    convs = [c for c, _ in pairs.values()]
    for name, (conv, norm) in pairs.items():
        if convs.count(conv) != 1:
            continue
        rm, rv, w, b, eps = _norm_parts(norm)
        with torch.no_grad():
            fw, fb = fuse_conv_bn_weights(conv.weight, conv.bias, rm, rv, eps, w, b)
        conv.weight = nn.Parameter(fw.detach(), requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(fb.detach(), requires_grad=conv.weight.requires_grad)
        after = [norm.drop, norm.act] if hasattr(norm, "act") else []
        parent_name, _, child = name.rpartition(".")
        parent = m.get_submodule(parent_name) if parent_name else m
        setattr(parent, child, nn.Sequential(*after) if after else nn.Identity())
    return m.train()


def _variant(base: nn.Module, mode: str, x: torch.Tensor) -> nn.Module:
    if mode == "folded by hand":
        return folded_by_hand(base, x)
    if mode == "plain":
        m = copy.deepcopy(base).train()
        for mod in m.modules():
            if is_norm(mod):
                mod.eval()
        return m
    if mode == "deploy":
        return convbn.deploy(base, example_inputs=(x,)).train()
    return convbn.convert(copy.deepcopy(base).train(), mode, example_inputs=(x,)).train()


def measure(name: str, build: Callable[[int, int], Tuple[nn.Module, torch.Tensor]], batch: int,
            size: int) -> Dict[str, Any]:
    base, x = build(batch, size)
    base.train()
    n_norms = sum(is_norm(m) for m in base.modules())
    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    result: Dict[str, Any] = {"model": name, "batch": batch, "size": size, "norm_layers": n_norms,
                              "parameter_bytes": param_bytes, "modes": {}}
    for mode in ("plain", "eval", "tune", "deploy", "folded by hand"):
        m = _variant(base, mode, x)
        saved = saved_tensor_bytes(lambda m=m: _loss(m(x)))
        # The backward runs too (outside the count: it packs nothing), so a mode that cannot backprop shows.
        for p in m.parameters():
            p.grad = None
        _loss(m(x)).backward()
        row: Dict[str, Any] = {"saved_bytes": saved, "saved_bytes_without_parameters": saved - param_bytes,
                               "norm_layers_left": sum(is_norm(mod) for mod in m.modules())}
        if mode in ("eval", "tune", "deploy"):
            rep = convbn.report(m)
            row["report"] = rep.summary()
            row["rows"] = {s: len(rep.by_status(s)) for s in ("converted", "fallback", "skipped")}
        result["modes"][mode] = row
        del m
    s = {k: v["saved_bytes"] for k, v in result["modes"].items()}
    result["ratios"] = {"tune_over_eval": s["tune"] / s["eval"], "tune_over_deploy": s["tune"] / s["deploy"],
                        "deploy_over_eval": s["deploy"] / s["eval"], "tune_over_plain": s["tune"] / s["plain"],
                        "tune_over_folded_by_hand": s["tune"] / s["folded by hand"],
                        "deploy_over_folded_by_hand": s["deploy"] / s["folded by hand"]}
    result["tune_within_1pct_of_deploy"] = abs(s["tune"] / s["deploy"] - 1) <= 0.01
    # The ratios mean something only once tune folds every norm layer and deploy removes them all.
    tune_rows = result["modes"]["tune"]["rows"]
    result["meaningful"] = (tune_rows["converted"] == n_norms and result["modes"]["deploy"]["norm_layers_left"] == 0)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo_memory.json"))
    ap.add_argument("--cls-batch", type=int, default=8)
    ap.add_argument("--cls-size", type=int, default=224)
    ap.add_argument("--det-batch", type=int, default=2)
    ap.add_argument("--det-size", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)  # memory counts do not depend on it; a shared machine runs faster so
    results = [
        measure("timm efficientnet_b0 (BatchNormAct2d)", efficientnet_b0, args.cls_batch, args.cls_size),
        measure("torchvision fasterrcnn_resnet50_fpn backbone (FrozenBatchNorm2d, 3 trainable layers)",
                frozen_fasterrcnn_backbone, args.det_batch, args.det_size),
    ]
    out = {"setup": {"torch": torch.__version__, "dtype": "float32", "machine": platform.machine(),
                     "measure": "convbn.bench.memory.saved_tensor_bytes, forward in train() after conversion"},
           "results": results}
    try:
        import timm
        import torchvision
        out["setup"].update(torchvision=torchvision.__version__, timm=timm.__version__)
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    mib = 1 / 2**20
    for r in results:
        print(f"{r['model']}: batch {r['batch']}, {r['size']}x{r['size']}, {r['norm_layers']} norm layers, "
              f"parameters {r['parameter_bytes'] * mib:.1f} MiB")
        print(f"  {'mode':15}{'saved MiB':>11}{'w/o params':>12}{'norms left':>12}  report")
        for mode, row in r["modes"].items():
            print(f"  {mode:15}{row['saved_bytes'] * mib:11.1f}{row['saved_bytes_without_parameters'] * mib:12.1f}"
                  f"{row['norm_layers_left']:12d}  {row.get('report', '-')}")
        q = r["ratios"]
        print(f"  tune/eval {q['tune_over_eval']:.4f}  tune/deploy {q['tune_over_deploy']:.4f}  "
              f"deploy/eval {q['deploy_over_eval']:.4f}  tune within 1% of deploy: {r['tune_within_1pct_of_deploy']}"
              + ("" if r["meaningful"] else "  (NOT meaningful: tune does not fold every norm layer)"))
        print(f"  tune/folded-by-hand {q['tune_over_folded_by_hand']:.4f}  "
              f"deploy/folded-by-hand {q['deploy_over_folded_by_hand']:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
