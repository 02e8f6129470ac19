"""Ship a model: fold every foldable BatchNorm, export to ONNX, and check onnxruntime agrees.

``export_onnx`` is :func:`convbn.deploy` followed by ``torch.onnx.export`` of the folded copy: the
user's model is never touched (it may be plain, or converted to train/eval/tune). Folded blocks
export as a single ``Conv`` / ``ConvTranspose`` / ``Gemm`` node with no ``BatchNormalization``
after it; BNs convbn could not fold (see the report) stay as ``BatchNormalization`` with their
running statistics.

``onnx``, ``onnxruntime`` and ``onnxscript`` (the default ``torch.export``-based exporter) come
from the ``onnx`` extra: ``pip install convbn[onnx]``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .api import convert, report, revert
from .errors import ConvBNError
from .analysis import normalize_example_inputs
from .plan import Report

__all__ = ["OnnxExport", "export_onnx", "onnxruntime_outputs"]


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and checked.

    Attributes:
        path: the ``.onnx`` file.
        report: the deploy plan of the exported copy (which blocks were folded, which not and why).
        batch_norm_nodes: ``BatchNormalization`` nodes left in the graph (one per BN not folded).
        max_rel_error: ``max |ort - torch| / max |torch|`` over every output and every batch size
            checked, the PyTorch reference being the original model in ``eval()``; ``None`` when
            ``verify=False``.
        batch_sizes: the batch sizes onnxruntime was run with (two when ``dynamic_batch``).
    """

    path: str
    report: Report
    batch_norm_nodes: int
    max_rel_error: Optional[float]
    batch_sizes: Tuple[int, ...]


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ConvBNError(
            f"convbn.export_onnx needs the `{module}` package, which is not installed. Install the extra: "
            f"pip install 'convbn[onnx]' (onnx, onnxruntime, onnxscript)") from None


def _flatten_tensors(obj: Any) -> List[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flatten_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flatten_tensors(o)]
    return []


def _with_batch(obj: Any, batch: int) -> Any:
    """Every tensor of ``obj`` resized along dim 0 to ``batch`` (by repeating its rows)."""
    if isinstance(obj, Tensor):
        if obj.dim() == 0:
            return obj
        reps = -(-batch // obj.shape[0])
        return obj.repeat(reps, *([1] * (obj.dim() - 1)))[:batch].clone()
    if isinstance(obj, tuple):
        return tuple(_with_batch(o, batch) for o in obj)
    if isinstance(obj, list):
        return [_with_batch(o, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _with_batch(v, batch) for k, v in obj.items()}
    return obj


def _dynamic_batch_opts(args: Tuple[Any, ...], kwargs: Dict[str, Any], dynamo: bool) -> Dict[str, Any]:
    if dynamo:
        dim = torch.export.Dim.DYNAMIC

        def spec(o: Any) -> Any:
            if isinstance(o, Tensor):
                return {0: dim} if o.dim() > 0 else None
            if isinstance(o, (list, tuple)):
                return type(o)(spec(i) for i in o)
            if isinstance(o, dict):
                return {k: spec(v) for k, v in o.items()}
            return None

        if kwargs:
            return {"dynamic_shapes": {**{f"arg{i}": spec(a) for i, a in enumerate(args)},
                                       **{k: spec(v) for k, v in kwargs.items()}}}
        return {"dynamic_shapes": tuple(spec(a) for a in args)}
    names = [f"input_{i}" for i, _ in enumerate(_flatten_tensors((args, kwargs)))]
    return {"input_names": names, "dynamic_axes": {n: {0: "batch"} for n in names}}


def onnxruntime_outputs(path: Union[str, os.PathLike], inputs: Sequence[Tensor]) -> List[Tensor]:
    """Run an ONNX file with onnxruntime (CPU) on ``inputs`` (fed to the graph inputs in order).

    Example:
        >>> import convbn.export, torch, tempfile, os
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        >>> f = os.path.join(tempfile.mkdtemp(), "m.onnx")
        >>> _ = convbn.export.export_onnx(m, torch.randn(1, 3, 8, 8), f)
        >>> convbn.export.onnxruntime_outputs(f, [torch.randn(5, 3, 8, 8)])[0].shape
        torch.Size([5, 4, 6, 6])
    """
    ort = _require("onnxruntime")
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != len(inputs):
        raise ConvBNError(
            f"the ONNX graph has {len(graph_inputs)} inputs ({', '.join(i.name for i in graph_inputs)}) but "
            f"{len(inputs)} tensors were given; non-tensor arguments are baked into the graph at export time")
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(graph_inputs, inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: Union[str, os.PathLike],
    *,
    dynamic_batch: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    **opts: Any,
) -> OnnxExport:
    """Fold every foldable Conv/Linear -> BN block of a copy of ``model`` and export it to ONNX.

    ``model`` is untouched (it may be plain PyTorch, in ``train()``, or converted to any mode). A
    copy is put in ``eval()``, folded like :func:`convbn.deploy` and exported with
    ``torch.onnx.export``; then, unless
    ``verify=False``, onnxruntime runs the file on ``example_inputs`` (and, with
    ``dynamic_batch``, on a batch of another size) and its outputs are compared with the original
    model in ``eval()``.

    Args:
        model: the model to ship.
        example_inputs: a Tensor, a tuple of positional arguments or a dict of keyword arguments
            for ``model.forward`` (as for :func:`convbn.convert`).
        path: the ``.onnx`` file to write.
        dynamic_batch: make dim 0 of every input a dynamic axis (and check a second batch size).
        verify: run onnxruntime and compare with PyTorch.
        rtol: largest ``max |ort - torch| / max |torch|`` accepted by ``verify`` (float32 round-off
            of a re-ordered convolution is ~1e-6 per layer; 1e-4 leaves room for deep nets).
        filter_fn: as for :func:`convbn.convert`; blocks it rejects keep their BatchNorm.
        **opts: passed to ``torch.onnx.export`` (e.g. ``opset_version``, ``dynamo=False`` for the
            TorchScript exporter, ``input_names``, your own ``dynamic_shapes`` / ``dynamic_axes``).

    Returns:
        An :class:`OnnxExport` with the path, the fold report, the BatchNormalization nodes left
        and the measured error.

    Raises:
        ConvBNError: a required package is missing, the export fails, or onnxruntime disagrees with
            PyTorch by more than ``rtol``.

    Example:
        >>> import convbn.export, torch, tempfile, os
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> f = os.path.join(tempfile.mkdtemp(), "m.onnx")
        >>> result = convbn.export.export_onnx(m, torch.randn(2, 3, 8, 8), f)
        >>> result.batch_norm_nodes, result.max_rel_error < 1e-4, result.batch_sizes
        (0, True, (2, 3))
    """
    onnx = _require("onnx")
    dynamo = bool(opts.pop("dynamo", True))
    if dynamo:
        _require("onnxscript")
        opts.setdefault("verbose", False)
    if verify:
        _require("onnxruntime")
    args, kwargs = normalize_example_inputs(example_inputs)
    # One private copy, plain PyTorch in eval(): it is the reference, then it is folded. eval() first,
    # so the example forward never needs batch statistics (a batch of one image is fine).
    shipped = copy.deepcopy(model)
    try:
        revert(shipped)
    except ConvBNError:
        pass  # already deployed: folded blocks stay folded
    shipped.eval()
    tensors = _flatten_tensors((args, kwargs))
    batch = tensors[0].shape[0] if tensors and tensors[0].dim() > 0 else 1
    batches: Tuple[int, ...] = ((batch, batch + 1) if dynamic_batch else (batch,)) if verify else ()
    checks = []
    with torch.no_grad():
        for b in batches:
            a, k = (args, kwargs) if b == batch else _with_batch((args, kwargs), b)
            checks.append((b, _flatten_tensors((a, k)), _flatten_tensors(shipped(*a, **k))))
    convert(shipped, "deploy", example_inputs=example_inputs, filter_fn=filter_fn)
    plan = report(shipped)
    if dynamic_batch and not ({"dynamic_shapes", "dynamic_axes"} & set(opts)):
        for key, v in _dynamic_batch_opts(args, kwargs, dynamo).items():
            opts.setdefault(key, v)
    path = os.fspath(path)
    try:
        with torch.no_grad():
            torch.onnx.export(shipped, args, path, kwargs=kwargs or None, dynamo=dynamo, **opts)
    except Exception as e:
        raise ConvBNError(
            f"torch.onnx.export of the folded copy failed with {type(e).__name__}: {e}. The folding itself "
            f"succeeded ({plan.summary()}); try dynamo={not dynamo} or an explicit opset_version") from e
    graph = onnx.load(path, load_external_data=False).graph
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in graph.node)

    max_err: Optional[float] = None
    if verify:
        max_err = 0.0
        for b, inputs, expected in checks:
            got = onnxruntime_outputs(path, inputs)
            if len(got) != len(expected):
                raise ConvBNError(f"the ONNX graph has {len(got)} outputs, the model {len(expected)}")
            for g, e in zip(got, expected):
                if tuple(g.shape) != tuple(e.shape):
                    raise ConvBNError(f"onnxruntime output shape {tuple(g.shape)} != PyTorch {tuple(e.shape)} "
                                      f"at batch size {b}")
                denom = e.abs().max().clamp_min(1e-30)
                max_err = max(max_err, float((g.to(e.dtype) - e).abs().max() / denom))
        if not max_err <= rtol:
            raise ConvBNError(
                f"onnxruntime disagrees with PyTorch eval: max relative error {max_err:.3g} > rtol={rtol:g} "
                f"(file kept at {path}). Check the exporter warnings, or pass a larger rtol if the model is "
                f"numerically sensitive")
    return OnnxExport(path, plan, bn_nodes, max_err, batches)
