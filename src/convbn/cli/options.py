"""Options and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

DEFAULT_OUT_DIR = "convbn_results"


class CLIError(ValueError):
    """A bad command-line setting (what, why, how to fix); ``convbn`` prints it without a traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's example lines as written and shows defaults."""


def int_list(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,4,8; got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 2,4,8; got {text!r}")
    return vals


def str_list(text: str) -> List[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return vals


SPEC_HELP = ("model spec: package.module:factory for your own model (called with no arguments, plus "
             "--channels/--dims if given), torchvision:NAME (weights=None), timm:NAME (pretrained=False) or "
             "monai:NAME")


def add_model_options(p: argparse.ArgumentParser, default_model: Optional[str], *, positional: bool = False,
                      optional: bool = False, help: str = SPEC_HELP) -> None:
    """``SPEC`` (positional; required unless it has a default or ``optional``) or ``--model SPEC``,
    plus ``--channels`` and ``--dims``."""
    if positional:
        p.add_argument("model", metavar="SPEC", nargs="?" if default_model is not None or optional else None,
                       default=default_model, help=help)
    else:
        p.add_argument("--model", "-m", metavar="SPEC", default=default_model, help=help)
    p.add_argument("--channels", type=int, default=None, help="input channels (default: the model's)")
    p.add_argument("--dims", type=int, choices=(1, 2, 3), default=None, help="spatial dims (default: the model's)")


def add_run_options(p: argparse.ArgumentParser, *, out_name: str, plot: bool = True) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 keeps timings stable on a shared machine, 0 = torch's default")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="directory for the JSON and PNG files")
    p.add_argument("--json", default=None, metavar="PATH", help=f"JSON output (default: OUT_DIR/{out_name}.json)")
    if plot:
        p.add_argument("--plot", default=None, metavar="PATH", help=f"PNG output (default: OUT_DIR/{out_name}.png)")
        p.add_argument("--no-plot", action="store_true", help="do not write PNGs (no matplotlib needed)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def setup_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", 0)
    if threads and threads > 0:
        torch.set_num_threads(threads)


def out_path(args: argparse.Namespace, explicit: Optional[str], name: str) -> str:
    return explicit if explicit else os.path.join(args.out_dir, name)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def say(*lines: str) -> None:
    for line in lines:
        print(line)
    sys.stdout.flush()


def settings_line(d: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
           "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise CLIError(f"unknown dtype {name!r}; choose float32, float64, bfloat16 or float16") from None


def make_input(shape: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A standard-normal input batch from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def memory_format_for(x: torch.Tensor, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    if x.dim() == 4:
        return torch.channels_last
    if x.dim() == 5:
        return torch.channels_last_3d
    raise CLIError(f"--channels-last needs 2-D or 3-D images (4-D/5-D input), got a {x.dim()}-D input")


def require(*modules: str, extra: str = "bench", why: str = "") -> None:
    """Fail fast, before any work, when an optional package is missing (the message says what to install)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = {"sklearn": "scikit-learn"}
        pkgs = " ".join(names.get(m, m) for m in missing)
        raise CLIError(f"{why or 'this command'} needs {', '.join(missing)}, which is not installed. Install it with "
                       f"`pip install {pkgs}` (or `pip install \"convbn[{extra}]\"`) and run again.")


# ---------------------------------------------------------------------------------------- output
def environment() -> Dict[str, Any]:
    """What the numbers were measured on."""
    import convbn

    return {
        "convbn": convbn.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(path: str, payload: Dict[str, Any]) -> str:
    """Write ``payload`` (plus ``environment``) as indented JSON; create parent directories."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    payload = {"environment": environment(), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if hasattr(obj, "__dict__"):
        return vars(obj)
    return str(obj)


class Progress:
    """A dependency-free progress bar on stderr: redrawn in place on a terminal, one line per
    step otherwise (logs stay readable); silent when ``enabled`` is False. Call it with a label."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, width: int = 28):
        self.total, self.label, self.enabled, self.width = max(int(total), 1), label, enabled, width
        self.done = 0
        self.start = time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()

    def __call__(self, what: str = "") -> None:
        self.update(what)

    def update(self, what: str = "", n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        line = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.0f}s (eta {eta:4.0f}s) {what}"
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
            if self.done >= self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
