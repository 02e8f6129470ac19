"""Small C++/OpenMP kernels built on first use with the system compiler and loaded with ``ctypes``.

No torch headers and no build step at install time: a kernel's source is a string, compiled once into
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/convbn`` (keyed by a hash of source, flags, compiler and CPU
features, since ``-march=native`` binaries are only valid where they were built), and every caller
degrades to its pure-torch path -- with one warning -- when the build fails.

One switch, :func:`use_extension`, chooses for all of convbn's kernels (BN fission's and Tune's).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Dict, Iterator, List, Optional

__all__ = ["NativeLibrary", "extension_mode", "use_extension"]

CXXFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC",
            "-std=c++17"]
MODES = ("auto", "torch", "extension", "sweeps")
# "auto": the kernels if they build; "torch": pure-torch paths; "extension": require the kernels;
# "sweeps": require them, but take the paths torch.compile takes (BN fission: one custom op per sweep;
# Tune: its torch-op path), for testing those paths eagerly. Context-local: a thread (or asyncio task)
# starts with "auto" and its use_extension never changes another's.
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("convbn_extension_mode", default="auto")


def extension_mode() -> str:
    """The current :func:`use_extension` mode (of this thread / context)."""
    return _MODE.get()


@contextlib.contextmanager
def use_extension(mode: str) -> Iterator[None]:
    """Temporarily choose the implementation of convbn's native kernels, in this thread (context) only.

    Args:
        mode: ``"auto"`` uses the C++ kernels when they build; ``"torch"`` always uses the pure-torch
            paths; ``"extension"`` raises ``RuntimeError`` if a kernel is unavailable; ``"sweeps"`` is
            ``"extension"`` but runs the paths ``torch.compile`` takes (BN fission's per-sweep custom
            ops, Tune's torch ops), for testing them eagerly.

    Example:
        >>> with use_extension("torch"):
        ...     extension_mode()
        'torch'
    """
    if mode not in MODES:
        raise ValueError(f"use_extension: mode must be one of {MODES}, got {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def _cache_dir(name: str) -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "convbn")
    return os.path.join(root, f"convbn_{name}")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def build_library(name: str, source: str, argtypes: Dict[str, List]) -> ctypes.CDLL:
    """Compile ``source`` (cached), load it and set each exported function's ``argtypes``."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"C++ compiler {cxx!r} not found (set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([source, " ".join(CXXFLAGS), cxx, version, _cpu_flags(),
                                    sys.platform]).encode()).hexdigest()[:16]
    build_dir = _cache_dir(name)
    os.makedirs(build_dir, exist_ok=True)
    so_path = os.path.join(build_dir, f"{name}_{key}.so")
    if not os.path.exists(so_path):
        with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
            src, out = os.path.join(tmp, f"{name}.cpp"), os.path.join(tmp, f"{name}.so")
            with open(src, "w") as f:
                f.write(source)
            proc = subprocess.run([cxx, *CXXFLAGS, src, "-o", out], capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{cxx} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            os.replace(out, so_path)  # atomic: concurrent builders never see a half-written file
    lib = ctypes.CDLL(so_path)
    for fn, types in argtypes.items():
        getattr(lib, fn).argtypes = types
    return lib


class NativeLibrary:
    """A kernel library built on first :meth:`get` (thread-safe; a failed build warns once and is
    not retried).

    Example:
        >>> lib = NativeLibrary("doc_example", 'extern "C" int one() { return 1; }', {"one": []}, "example")
        >>> with use_extension("torch"):
        ...     lib.get() is None
        True
        >>> import shutil
        >>> built = lib.get()
        >>> (built is not None) == (shutil.which(os.environ.get("CXX", "c++")) is not None)  # built where a compiler is
        True
        >>> built is None or built.one() == 1
        True
    """

    def __init__(self, name: str, source: str, argtypes: Dict[str, List], what: str):
        self.name, self.source, self.argtypes, self.what = name, source, argtypes, what
        self.lib: Optional[ctypes.CDLL] = None
        self.tried = False
        self._lock = threading.Lock()

    def get(self) -> Optional[ctypes.CDLL]:
        """The loaded library, or ``None`` (``use_extension("torch")``, or the build failed);
        raises ``RuntimeError`` if ``use_extension`` requires it and it is unavailable."""
        mode = _MODE.get()
        if mode == "torch":
            return None
        if not self.tried:
            with self._lock:
                if not self.tried:
                    try:
                        self.lib = build_library(self.name, self.source, self.argtypes)
                    except Exception as exc:  # any failure degrades to the pure-torch path
                        warnings.warn(f"convbn: the {self.what} C++ kernel could not be built, using the slower "
                                      f"pure-torch path ({exc}). Install a C++ compiler with OpenMP (g++) or "
                                      f"set CXX to fix this.", RuntimeWarning, stacklevel=3)
                        self.lib = None
                    self.tried = True
        if self.lib is None and mode in ("extension", "sweeps"):
            raise RuntimeError(f"convbn: the {self.what} C++ kernel is required (use_extension('{mode}')) "
                               "but could not be built; see the earlier warning.")
        return self.lib
