"""``convbn inspect``: the conversion report, the gamma/sqrt(var+eps) distribution (paper Fig. 2a) and
the per-block memory saving of Tune over Eval, predicted (paper Appendix M) vs measured.

Appendix M: per Conv-BN block, Eval saves the conv input X and the conv output Y for backward, Tune
saves X and the transformed weight w', so the saving is |Y| - |w'| = N*C_out*H_out*W_out - k^2*C_in*C_out/g
elements. convbn's Tune Function does not keep w' (it rebuilds it in backward), so its predicted
saving is |Y|. *Measured*: bytes saved for backward by the forward of the whole model in eval
(``model.eval()``, plain BN) minus the same with only that block converted to tune -- exact byte
counts (``convbn.bench.memory.saved_tensor_bytes``), deterministic.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import convbn
from convbn.bench.memory import saved_tensor_bytes

from .common import Progress, input_shape, make_input, resolve_model
from convbn.bench.compare import format_table
from convbn.bench.stats import bn_scales, calibrate_if_untouched
from convbn.cli.inspect_cmd import scale_summary  # one copy: the library's

__all__ = ["inspect_model", "appendix_m_blocks", "appendix_m_table", "scale_summary"]


def _conv_outputs(model: nn.Module, x: torch.Tensor, names: List[str]) -> Dict[str, torch.Size]:
    modules = dict(model.named_modules())
    shapes: Dict[str, torch.Size] = {}
    handles = []
    for name in names:
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
            shapes.setdefault(name, out.shape)
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def appendix_m_blocks(model: nn.Module, x: torch.Tensor, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Predicted vs measured saving of Tune over Eval for every block convbn can tune.

    Args:
        model: a plain (unconverted) model; not modified (a deep copy is measured).
        x: the input batch.
        progress: ticked once per block.

    Returns:
        ``{"blocks": [...], "total": {...}}``; each block has ``conv``, ``output_shape``,
        ``y_bytes``, ``w_bytes``, ``predicted_paper_bytes`` (|Y| - |w'|), ``predicted_convbn_bytes``
        (|Y|) and ``measured_saving_bytes``.

    Example:
        >>> from experiments.models import small_resnet
        >>> res = appendix_m_blocks(small_resnet(), torch.randn(2, 3, 16, 16))
        >>> b = res["blocks"][0]
        >>> abs(b["measured_saving_bytes"] - b["predicted_convbn_bytes"]) <= 0.01 * b["y_bytes"]
        True
    """
    m = copy.deepcopy(model).eval()
    plan = convbn.report(m, "tune")
    rows = [r for r in plan.converted if r.conv is not None]
    modules = dict(m.named_modules())
    shapes = _conv_outputs(m, x, [r.conv for r in rows])
    base = saved_tensor_bytes(lambda: m(x))
    blocks = []
    for r in rows:
        conv = modules[r.conv]
        convbn.convert(m, "tune", filter_fn=lambda mod, name, target=r.conv: name == target)
        m.eval()
        tuned = saved_tensor_bytes(lambda: m(x))
        shape = shapes.get(r.conv)
        elem = x.element_size()
        y_bytes = (torch.Size(shape).numel() * elem) if shape is not None else 0
        w_bytes = conv.weight.numel() * conv.weight.element_size()
        blocks.append({
            "conv": r.conv, "bn": r.bn, "kind": r.kind, "output_shape": list(shape) if shape is not None else None,
            "weight_shape": list(conv.weight.shape), "y_bytes": y_bytes, "w_bytes": w_bytes,
            "predicted_paper_bytes": y_bytes - w_bytes, "predicted_convbn_bytes": y_bytes,
            "measured_saving_bytes": base - tuned,
        })
        if progress is not None:
            progress.update(r.conv)
    convbn.convert(m, "tune")
    m.eval()
    all_tuned = saved_tensor_bytes(lambda: m(x))
    convbn.revert(m)
    total = {
        "eval_saved_bytes": base, "tune_saved_bytes": all_tuned, "measured_saving_bytes": base - all_tuned,
        "predicted_paper_bytes": sum(b["predicted_paper_bytes"] for b in blocks),
        "predicted_convbn_bytes": sum(b["predicted_convbn_bytes"] for b in blocks),
        "sum_of_block_savings_bytes": sum(b["measured_saving_bytes"] for b in blocks),
    }
    return {"blocks": blocks, "total": total}


def appendix_m_table(res: Dict[str, Any], limit: Optional[int] = None) -> str:
    """Per-block table (KiB) and a total line."""
    headers = ["conv", "Y shape", "|Y| KiB", "|w'| KiB", "pred. App.M KiB", "pred. convbn KiB", "measured KiB",
               "meas/pred"]
    body = []
    blocks = res["blocks"] if limit is None else res["blocks"][:limit]
    for b in blocks:
        pred = b["predicted_convbn_bytes"]
        body.append([b["conv"], "x".join(map(str, b["output_shape"] or [])), f"{b['y_bytes'] / 1024:.1f}",
                     f"{b['w_bytes'] / 1024:.1f}", f"{b['predicted_paper_bytes'] / 1024:.1f}",
                     f"{pred / 1024:.1f}", f"{b['measured_saving_bytes'] / 1024:.1f}",
                     f"{b['measured_saving_bytes'] / pred:.3f}" if pred else "-"])
    t = res["total"]
    body.append(["TOTAL (all blocks tuned)", "", "", "", f"{t['predicted_paper_bytes'] / 1024:.1f}",
                 f"{t['predicted_convbn_bytes'] / 1024:.1f}", f"{t['measured_saving_bytes'] / 1024:.1f}",
                 f"{t['measured_saving_bytes'] / t['predicted_convbn_bytes']:.3f}"
                 if t["predicted_convbn_bytes"] else "-"])
    text = format_table(headers, body)
    if limit is not None and len(res["blocks"]) > limit:
        text += f"\n... {len(res['blocks']) - limit} more blocks in the JSON"
    return text


def inspect_model(spec: str, *, batch_size: int = 2, input_size: Optional[int] = None,
                  channels: Optional[int] = None, dims: Optional[int] = None, mode: str = "tune", seed: int = 0,
                  calibrate: bool = True, measure: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Everything ``convbn inspect`` prints, as a JSON-ready dict (plus the Report under ``"_report"``).

    Example:
        >>> res = inspect_model("small_resnet", input_size=8, progress=False)
        >>> res["appendix_m"]["total"]["measured_saving_bytes"] > 0
        True
    """
    model = resolve_model(spec, in_channels=channels, dims=dims)
    shape = input_shape(spec, batch_size, input_size=input_size, in_channels=channels, dims=dims)
    x = make_input(shape, seed)
    notes = []
    if calibrate and calibrate_if_untouched(model, make_input(shape, seed + 1)):
        notes.append("the model was freshly initialised: its BN statistics were calibrated (synthetic, not "
                     "trained; pass --no-calibrate to see the untouched ones) -- a pretrained model such as "
                     "mobilenet_v2_pretrained shows the real distribution")
    report = convbn.report(model, mode)
    scales = [float(v) for _, s in bn_scales(model) for v in s.tolist()]
    result: Dict[str, Any] = {
        "experiment": "inspect (paper Fig. 2a, Appendix M)", "model": spec, "input_shape": list(shape),
        "mode": mode, "notes": notes,
        "report": {"summary": report.summary(), "rows": [vars(r) if hasattr(r, "__dict__") else r._asdict()
                                                          for r in report.rows]},
        "scales": {"summary": scale_summary(scales), "values": scales},
        "_report": report,
    }
    if measure:
        n_blocks = len([r for r in convbn.report(model, "tune").converted if r.conv is not None])
        bar = Progress(n_blocks, "App. M", enabled=progress)
        result["appendix_m"] = appendix_m_blocks(model, x, bar)
    return result
