"""``convbn`` command line entry point: ``main(argv=None) -> int`` dispatches to one module per subcommand."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

import torch

import convbn
from convbn.errors import ConvBNError

from . import bench, build_kernels, inspect_cmd, run_default
from .options import CLIError, HelpFormatter

SUBCOMMANDS = (run_default, bench, inspect_cmd, build_kernels)

DESCRIPTION = """\
convbn: Train / Eval / Tune / Deploy modes of Conv->BatchNorm blocks (arXiv 2305.11624), on your model.
With no arguments, `convbn` runs the main job (`convbn run`): every mode side by side on MONAI
ResNet-50, printing memory, time and error as a table and writing JSON and a PNG bar chart.
SPEC names a model: package.module:factory (your own), torchvision:NAME, timm:NAME or monai:NAME."""

EPILOG = """\
examples:
  convbn                                       # the main job, about a minute
  convbn inspect torchvision:resnet50          # what convert() would do, block by block, with reasons
  convbn inspect mypkg.nets:build --input-size 128 --channels 1
  convbn bench timm:efficientnet_b0 --input-size 128   # every mode on your model: memory, time, error
  convbn build-kernels                         # compile the C++ kernels ahead of time (images, clusters)
  convbn COMMAND --help                        # options and more examples
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convbn", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"convbn {convbn.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def _with_default_command(argv: Sequence[str]) -> List[str]:
    """``convbn`` and ``convbn --model X ...`` mean ``convbn run ...``."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["run"] + argv
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``convbn`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Exit codes: 0 success, 1 the command could not run (the message says why and how to fix it),
    2 bad command-line usage (argparse).

    Example:
        >>> main(["inspect", "torch.nn:Identity", "--input-size", "4"])  # doctest: +ELLIPSIS
        convbn inspect torch.nn:Identity: ...
        0
    """
    parser = build_parser()
    args = parser.parse_args(_with_default_command(sys.argv[1:] if argv is None else argv))
    threads = torch.get_num_threads()  # --threads is for this run only (main() is also called in-process)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ConvBNError, ValueError, TypeError, ImportError, FileNotFoundError) as e:
        print(f"convbn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"convbn {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
