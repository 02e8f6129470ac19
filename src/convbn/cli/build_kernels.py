"""``convbn build-kernels``: compile convbn's C++ kernels now, into the cache the library loads them from."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .options import CLIError, HelpFormatter

DESCRIPTION = """\
Build convbn's C++/OpenMP kernels (the CPU implementations of the convbn::tune_* and convbn::bn_fission_*
ops) ahead of time, e.g. in a container image or on a cluster's login node, so that no run needs a
compiler. Kernels are cached in $TORCH_EXTENSIONS_DIR/convbn_<name> (default ~/.cache/convbn), keyed by
their source, the compiler flags, the torch version and the CPU's features (-march=native: build on, or
for, the machine type that runs them). Needs a C++17 compiler with OpenMP: g++ (apt install g++,
conda install gxx) or the one named by CXX."""

EPILOG = """\
examples:
  convbn build-kernels                          # build what is not cached yet; prints each .so path
  convbn build-kernels --force                  # rebuild
  CXX=g++-13 convbn build-kernels
  TORCH_EXTENSIONS_DIR=/opt/convbn-kernels convbn build-kernels   # then set the same variable at run time
  python -m convbn.ops build                    # the same, without the console script
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("build-kernels", help="compile the C++ kernels ahead of time (images, clusters)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    _arguments(p)
    p.set_defaults(func=run, command="build-kernels")
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even if cached")


def run(args: argparse.Namespace) -> int:
    from ..ops import build_kernels
    from ..ops._build import cache_root

    try:
        built = build_kernels(force=args.force)
    except RuntimeError as exc:
        raise CLIError(f"{exc}\nInstall a C++17 compiler with OpenMP (e.g. `apt install g++`, `conda install "
                           f"gxx`) or set CXX to one, then run `convbn build-kernels` again.") from None
    for name, path in built.items():
        print(f"{name}: {path}")
    print(f"cache: {cache_root()}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m convbn.ops build [--force]``."""
    p = argparse.ArgumentParser(prog="python -m convbn.ops", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _arguments(sub.add_parser("build", help="compile the C++ kernels ahead of time"))
    args = p.parse_args(argv)
    try:
        return run(args)
    except CLIError as exc:
        print(f"python -m convbn.ops build: error: {exc}", file=sys.stderr)
        return 1
