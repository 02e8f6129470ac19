"""Building, caching and loading the C++ kernels of :mod:`convbn.ops`, and the switch that chooses them.

The kernels are plain C++17 + OpenMP (no torch headers) in ``convbn/ops/csrc/*.cpp``, shipped as package
data, compiled with the system compiler into ``$TORCH_EXTENSIONS_DIR/convbn_<name>`` or
``~/.cache/convbn/convbn_<name>`` and loaded with ``ctypes``; each op's CPU implementation calls them.

The cache key is a hash of the source file's bytes, the compiler flags, the torch version, the CPU's
feature flags (``-march=native`` binaries are only valid where they were built; read from
``/proc/cpuinfo``) and the platform -- computed without spawning a process, so a warm cache loads without
a compiler (images and clusters: build ahead of time with ``convbn build-kernels``). A failed or
missing build warns once, at the user's line, saying what to install; the ops then run their torch
reference on the CPU too.
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
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ..errors import user_stacklevel

__all__ = ["NativeLibrary", "TorchOpLibrary", "extension_mode", "use_extension", "build_kernels", "KERNELS", "CSRC",
           "cache_root"]

CXXFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC",
            "-std=c++17"]
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
MODES = ("auto", "torch", "extension")
# "auto": the kernels if they build; "torch": every op runs its torch reference; "extension": require the
# kernels (raise if unavailable). Context-local: a thread (or asyncio task) starts with "auto", and its
# use_extension never changes another's.
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("convbn_extension_mode", default="auto")


def extension_mode() -> str:
    """The current :func:`use_extension` mode (of this thread / context)."""
    return _MODE.get()


@contextlib.contextmanager
def use_extension(mode: str) -> Iterator[None]:
    """Temporarily choose the CPU implementation of convbn's ops, in this thread (context) only.

    Args:
        mode: ``"auto"`` runs the C++ kernels when they build; ``"torch"`` runs every op's torch reference
            (what other devices run); ``"extension"`` raises ``RuntimeError`` if a kernel is unavailable.

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


def cache_root() -> str:
    """Where built kernels are cached: ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/convbn``."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "convbn")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def cache_key(source: bytes, flags: Optional[Sequence[str]] = None) -> str:
    """The build's cache key: source bytes, flags, torch version, CPU features, platform (no subprocess)."""
    parts = [source, " ".join(CXXFLAGS if flags is None else flags).encode(), torch.__version__.encode(),
             _cpu_flags().encode(),
             sys.platform.encode(), platform.machine().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH")
    return cxx


class NativeLibrary:
    """One kernel library (a ``.cpp`` file): built on first :meth:`get` (thread-safe; a failed build
    warns once and is not retried), or ahead of time by :meth:`build`.

    Example:
        >>> import pathlib, tempfile
        >>> src = pathlib.Path(tempfile.mkdtemp()) / "one.cpp"
        >>> _ = src.write_text('extern "C" int one() { return 1; }')
        >>> lib = NativeLibrary("doc_example", str(src), {"one": []}, "example", register=False)
        >>> with use_extension("torch"):
        ...     lib.get() is None
        True
        >>> built = lib.get()
        >>> (built is not None) == (shutil.which(os.environ.get("CXX", "c++")) is not None)  # built where a compiler is
        True
        >>> built is None or built.one() == 1
        True
    """

    def __init__(self, name: str, source_path: str, argtypes: Dict[str, List], what: str, register: bool = True,
                 includes: Sequence[str] = ()):
        self.name, self.source_path, self.argtypes, self.what = name, source_path, argtypes, what
        self.includes = tuple(includes)  # other sources the file #includes (part of the cache key)
        self.lib: Optional[ctypes.CDLL] = None
        self.tried = False
        self.error: Optional[str] = None
        self._lock = threading.Lock()
        if register:
            KERNELS[name] = self

    def flags(self) -> List[str]:
        return list(CXXFLAGS)

    def so_path(self) -> str:
        source = b""
        for path in (self.source_path, *self.includes):
            with open(path, "rb") as f:
                source += f.read() + b"\0"
        key = cache_key(source, self.flags())
        return os.path.join(cache_root(), f"convbn_{self.name}", f"{self.name}_{key}.so")

    def build(self, force: bool = False) -> str:
        """Compile (unless cached, or ``force``) and return the ``.so`` path; raises ``RuntimeError`` on failure."""
        so_path = self.so_path()
        if force or not os.path.exists(so_path):
            cxx = _compiler()
            build_dir = os.path.dirname(so_path)
            os.makedirs(build_dir, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
                out = os.path.join(tmp, f"{self.name}.so")
                proc = subprocess.run([cxx, *self.flags(), self.source_path, "-o", out, *self.link_flags()],
                                      capture_output=True, text=True, timeout=600)
                if proc.returncode != 0:
                    raise RuntimeError(f"{cxx} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
                os.replace(out, so_path)  # atomic: concurrent builders never see a half-written file
        return so_path

    def link_flags(self) -> List[str]:
        return []

    def load(self) -> ctypes.CDLL:
        lib = ctypes.CDLL(self.build())
        for fn, types in self.argtypes.items():
            getattr(lib, fn).argtypes = types
        return lib

    def get(self) -> Optional[ctypes.CDLL]:
        """The loaded library, or ``None`` (``use_extension("torch")``, or the build failed); raises
        ``RuntimeError`` if ``use_extension("extension")`` requires it and it is unavailable."""
        mode = _MODE.get()
        if mode == "torch":
            return None
        if not self.tried:
            with self._lock:
                if not self.tried:
                    try:
                        self.lib = self.load()
                    except Exception as exc:  # any failure: the ops run their torch reference
                        self.error = str(exc)
                        warnings.warn(
                            f"convbn: the {self.what} C++ kernel could not be built ({exc}); its ops run their "
                            f"pure-torch reference instead (same function, slower on the CPU). To fix this, install "
                            f"a C++17 compiler with OpenMP (e.g. `apt install g++`, `conda install gxx`) or set CXX "
                            f"to one, then run `convbn build-kernels` (or `python -m convbn.ops build`).",
                            RuntimeWarning, stacklevel=user_stacklevel())
                        self.lib = None
                    self.tried = True
        if self.lib is None and mode == "extension":
            raise RuntimeError(f"convbn: the {self.what} C++ kernel is required (use_extension('extension')) "
                               f"but could not be built: {self.error}")
        return self.lib


class TorchOpLibrary(NativeLibrary):
    """A kernel library built against the torch headers that registers dispatcher ops (with their
    autograd formulas) when loaded -- ``torch.ops.load_library`` instead of ``ctypes``. Same cache, key
    (plus the torch C++ ABI flag), one-time warning and :func:`use_extension` switch as
    :class:`NativeLibrary`; :meth:`get` returns ``True`` once the ops are registered, else ``None``."""

    def flags(self) -> List[str]:
        include = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "include")
        # (torch.utils.cpp_extension.include_paths() gives these too, but importing it warns on CUDA builds
        # without a CUDA runtime)
        abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
        return [f for f in CXXFLAGS if not f.startswith("-std=")] + [
            "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H=0",
            f"-I{include}", f"-I{os.path.join(include, 'torch', 'csrc', 'api', 'include')}", "-w"]

    def link_flags(self) -> List[str]:
        lib_dir = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "lib")
        return [f"-L{lib_dir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib_dir}"]

    def load(self):
        torch.ops.load_library(self.build())
        return True


KERNELS: Dict[str, NativeLibrary] = {}


def build_kernels(force: bool = False) -> Dict[str, str]:
    """Build every kernel library ahead of time (e.g. in a container image); returns ``{name: .so path}``.

    Raises ``RuntimeError`` (with the compiler's output) if one fails. Afterwards no compiler is needed:
    the cache is keyed by the sources, flags, torch version and CPU features, not by the compiler.
    """
    from . import bn_fission, native, tune  # noqa: F401 (registers their kernels)

    return {name: lib.build(force=force) for name, lib in KERNELS.items()}
