"""``python -m experiments COMMAND``: the paper reproductions (not shipped in the convbn wheel).

Run from the repository root (``experiments`` is a folder there, not an installed package)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from convbn.cli.options import CLIError, HelpFormatter
from convbn.errors import ConvBNError

from . import cli_adversarial, cli_appendix_m, cli_sweep, cli_transfer

SUBCOMMANDS = (cli_sweep, cli_appendix_m, cli_transfer, cli_adversarial)

DESCRIPTION = """\
The paper's experiments on CPU (Huang et al., ICLR 2024), next to the convbn library: the Table 6 /
Fig. 3 sweep, Fig. 2a + Appendix M per block, transfer learning (Tables 3/7) and adversarial examples
(Table 10). `bash benchmarks/run_all.sh` runs them all and rebuilds benchmarks/RESULTS.md."""

EPILOG = """\
examples:
  python -m experiments sweep --model small_resnet       # Table 6 / Fig. 3 over batch and input sizes
  python -m experiments appendix-m mobilenet_v2_pretrained   # report, Fig. 2a histogram, Appendix M
  python -m experiments transfer                          # Table 7 on CPU: pretrained MobileNetV2 on digits
  python -m experiments adversarial                       # Table 10: FGSM/PGD in eval vs tune
  python -m experiments COMMAND --help
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run an experiment; returns the exit code (0 ok, 1 it could not run, 2 bad usage)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        return int(args.func(args) or 0)
    except (CLIError, ConvBNError, ValueError, TypeError, ImportError, FileNotFoundError) as e:
        print(f"python -m experiments {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
