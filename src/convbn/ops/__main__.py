"""``python -m convbn.ops build [--force]``: build the C++ kernels ahead of time (as ``convbn build-kernels``)."""

import sys

from ..cli.build_kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
