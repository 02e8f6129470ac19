"""ICF (BN Fission-n-Fusion, Sec. "Inter-Composite-layer Fusion"): reuse batch statistics across
the concatenations of a DenseNet.

A dense block's layer ``k`` normalizes ``cat([x_0, ..., x_{k-1}], dim=1)``. Per-channel batch
statistics of a channel-concatenation are the concatenation of its pieces' statistics, so once a
piece has been measured it never needs another sweep: each BN then measures only the channels it has
not seen -- O(L) statistics work per dense block instead of O(L^2). The known channels are a leading
run of pieces (in a DenseNet: every earlier layer's features); the trailing new ones are measured by
the BN's own fused forward in its normalize pass (``bn_fission_forward`` with the first ``K``
channels' statistics given), so no layer pays for an extra statistics op.

How it is wired, without touching the user's code: while a fission-converted model runs forward in
eager mode, a ``TorchFunctionMode`` (entered and left by forward hooks on the root module, the
post-hook with ``always_call=True`` so an exception cannot leak it) records every ``torch.cat``
along the channel axis. The fission BNs ask :meth:`StatsCache.stats_for` for their input's
statistics.

When a statistic is reused (never stale). A cached statistic describes the data it was measured on;
reusing it is sound only if that data cannot have changed since. The version counter sees every
in-place torch op, but not writes through ``.data``, through NumPy (``.numpy()``, ``__array__``,
``torch.from_numpy``), through ``data_ptr()``/storages or DLPack. So a tensor's statistics are
measured fresh unless the tensor is *trusted*: it was produced by a torch op during this very
forward (the recorder sees every op's output -- model inputs, parameters and buffers never are),
no op that hands out its memory outside version tracking (``.data``, ``.numpy()``, ``__array__``,
``data_ptr``, ``untyped_storage``/``storage``, ``__dlpack__``, ``share_memory_``, ``.data = ...``)
was called during this forward on any tensor sharing its storage, and its version counter is the one
recorded when it was measured. Under ``torch.inference_mode`` (no version counters) nothing is reused.
Untracked aliasing the recorder cannot see (memory shared before the forward began is covered: such
tensors were not produced in this forward) would need code that writes into an op's output through
an alias obtained outside torch, e.g. ``torch.utils.dlpack.to_dlpack`` called from inside the forward.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .lowmem import SavedRecipes

__all__ = ["StatsCache", "ConcatRecorder"]

_CATS = {torch.cat, torch.concat, torch.concatenate}
_RELUS = {torch.nn.functional.relu, torch.nn.functional.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}


_DATA = torch.Tensor.data  # the ``.data`` descriptor: its __get__/__set__ reach the recorder
# Tensor methods that hand out a tensor's memory outside version tracking
_ESCAPES = {"numpy", "__array__", "data_ptr", "untyped_storage", "storage", "_typed_storage", "__dlpack__",
            "share_memory_", "set_"}


def _storage_key(t: Tensor) -> Optional[int]:
    try:
        with torch._C.DisableTorchFunction():
            return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (e.g. sparse): never trusted
        return None


class StatsCache:
    """Per-forward cache: tensor -> per-channel ``(mean, biased var)`` (float64), and concat records.

    Only *trusted* tensors (see the module docstring) are cached or reused; everything else is swept.
    """

    def __init__(self) -> None:
        self.stats: Dict[int, Tuple[weakref.ref, int, Tensor, Tensor]] = {}
        # id(cat output) -> (weakref, version, [(channel offset, channels, piece stats or None,
        #                                         weakref to the piece or None, its version)])
        self.cats: Dict[int, CatRecord] = {}
        self.last_cat: Optional[CatRecord] = None  # the latest concatenation recorded in this forward
        self.produced: Dict[int, weakref.ref] = {}  # id -> tensor, for every op output of this forward
        self.keys: Dict[int, Optional[int]] = {}  # id(produced tensor) -> its storage key, once asked
        self.escaped: Set[int] = set()  # storages whose memory was handed out untracked during this forward
        self.swept_channels = 0  # channels measured by a statistics sweep (for tests/benchmarks)
        self.reused_channels = 0  # channels whose statistics came from the cache
        self.reused_elements = 0  # elements of this forward whose statistics came from the cache
        self.lookups = 0  # fission BN calls that asked for statistics in this forward
        self.relu_elements = 0  # elements of functional ReLU calls passed through (fused) in this forward
        self.recording = False  # a ConcatRecorder is active (the root module's forward is running, eagerly)
        self.awaiting: Dict[int, object] = {}  # id(fission output, ReLU already applied) -> its block
        # convert(..., low_memory=True): concatenations and fission outputs saved for backward as recipes
        self.recipes: Optional[SavedRecipes] = None
        self.storing_recipes = False  # the recipes' saved-tensor hooks are active (this forward)

    def await_relu(self, out: Tensor, block) -> None:
        """``out`` already holds relu(bn(x)); the user's ``F.relu(out)`` passes it through (see ConcatRecorder)."""
        self.awaiting[id(out)] = block

    def clear(self) -> None:
        self.reused_elements = self.lookups = self.relu_elements = 0
        self.awaiting.clear()
        if self.recipes is not None:
            self.recipes.clear()
        self.stats.clear()
        self.cats.clear()
        self.last_cat = None
        self.produced.clear()
        self.keys.clear()
        self.escaped.clear()

    # pickling / deepcopy: weakrefs are transient
    def __getstate__(self) -> dict:
        return {"low_memory": self.recipes is not None}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        if state.get("low_memory"):
            self.recipes = SavedRecipes()

    # ---------------------------------------------------------------- what the recorder sees
    def record_output(self, out) -> None:
        """Remember the tensor(s) an op returned during this forward."""
        if isinstance(out, Tensor):
            self.produced[id(out)] = weakref.ref(out)
            self.keys.pop(id(out), None)  # an id freed and reused: the new tensor's storage is asked afresh
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, Tensor):
                    self.produced[id(t)] = weakref.ref(t)
                    self.keys.pop(id(t), None)

    def record_escape(self, args) -> None:
        """An op handed out the memory of the tensors in ``args`` outside version tracking."""
        for t in args:
            if isinstance(t, Tensor):
                key = _storage_key(t)
                if key is not None:
                    self.escaped.add(key)

    def trusted(self, t: Tensor) -> bool:
        """Whether ``t``'s data can change only through version-counted ops from here on (see above)."""
        if torch.is_inference_mode_enabled() or t.is_inference():
            return False
        ref = self.produced.get(id(t))
        if ref is None or ref() is not t:
            return False
        key = self.keys.get(id(t), self)  # a tensor's storage changes only by set_ / .data=, which escape the
        if key is self:                   # old storage: its cached key is then in ``escaped``
            key = self.keys[id(t)] = _storage_key(t)
        return key is not None and key not in self.escaped

    # ---------------------------------------------------------------- the cache
    def record_cat(self, out: Tensor, parts: List[Tensor]) -> None:
        """Remember ``out = cat(parts, dim=1)`` with each piece's statistics *as of now* (the data the
        cat copied), so they stay usable after the piece itself is freed (e.g. under no_grad), and a
        weak reference to each trusted piece with its version, so statistics measured later for the
        concatenation are stored under the piece too.

        torchvision's DenseNet concatenates the list of all earlier pieces again in every layer: when
        the previous concatenation's pieces, unchanged, lead this one's (the common case), the record
        links to it -- its measured statistics are this cat's leading channels' -- and only the new
        pieces are examined, so a layer's bookkeeping does not grow with its depth."""
        if not self.trusted(out):
            return
        prev, start = self.last_cat, 0
        if prev is not None and len(prev.sig) < len(parts) and not self.escaped and all(
                r() is p and v == p._version for (r, v), p in zip(prev.sig, parts)):
            start = len(prev.sig)  # (trusted then, unchanged since, no escape: trusted now)
        else:
            prev = None
        new = parts[start:]
        trust = [self.trusted(p) for p in new]  # asked once, for both records
        sig = [(weakref.ref(p), p._version) for p in new]
        offset = prev.channels if prev is not None else 0
        pieces = []
        for p, trusted, (ref, version) in zip(new, trust, sig):
            channels = p.shape[1]
            pieces.append((offset, channels, self._entry(p, version), ref, version) if trusted else
                          (offset, channels, None, None, 0))
            offset += channels
        if prev is not None:
            pieces = prev.pieces + pieces
            sig, trust = prev.sig + sig, prev.trust + trust
        self.cats[id(out)] = self.last_cat = CatRecord(out, pieces, sig, trust, prev, offset)
        if self.storing_recipes:
            self.recipes.record_cat(out, parts, trust)

    def _cat_of(self, x: Tensor) -> Optional["CatRecord"]:
        """The record of the concatenation that produced ``x``, if ``x`` is unchanged since."""
        cat = self.cats.get(id(x))
        return cat if cat is not None and cat.out() is x and cat.version == x._version else None

    def _entry(self, t: Tensor, version: int) -> Optional[Tuple[Tensor, Tensor]]:
        """Statistics stored for ``t`` (trusted when stored) at ``version``, if any."""
        entry = self.stats.get(id(t))
        if entry is not None and entry[1] == version and entry[0]() is t:
            return entry[2], entry[3]
        return None

    def _unchanged(self, t: Tensor, version: int) -> bool:
        """A tensor trusted earlier in this forward still holds the data it had at ``version``: same
        version, and no memory escaped since (only an escape can end a produced tensor's trust)."""
        return t._version == version and (not self.escaped or self.trusted(t))

    def _piece(self, ref, version: int) -> Optional[Tensor]:
        """The piece a cat copied, if it is still alive, trusted and unchanged since (its data is then
        exactly the cat's channels), else ``None``."""
        t = ref() if ref is not None else None
        return t if t is not None and self._unchanged(t, version) else None

    def _cached(self, t: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """Cached statistics of ``t`` if they describe its current data (trusted, same version)."""
        entry = self.stats.get(id(t))
        if entry is not None and entry[0]() is t and self.trusted(t) and entry[1] == t._version:
            return entry[2], entry[3]
        return None

    def stats_for(self, x: Tensor, sweep) -> Optional[Tuple[Tensor, Tensor]]:
        """Statistics of ``x``'s leading channels that need no sweep of ``x`` itself: ``(mean, var)`` of
        the first ``K`` channels (``K`` = all when ``x``'s own are cached), or ``None``. The caller's
        fused forward measures the other channels in its normalize pass (the data is then read once)
        and reports the full statistics with :meth:`measured`.

        For a recorded concatenation: the pieces measured earlier (by another BN), then -- when a later
        piece is known again -- an unmeasured piece between them is swept alone with ``sweep`` (the
        piece itself if unchanged, else its slice of ``x``); the trailing unmeasured pieces (in a
        DenseNet, the previous layer's new features) are left to the fused forward."""
        self.lookups += 1
        if not self.trusted(x):  # an input, parameter or buffer, aliased memory, inference mode: measure
            return None
        hit = self._cached(x)
        if hit is not None:
            self._reused(x, x.shape[1])
            return hit
        cat = self._cat_of(x)
        if cat is None:
            return None
        if cat.prefix is not None and cat.prefix.stats is not None and not self.escaped:
            # the previous concatenation led this one with the same, unchanged pieces: its statistics
            # are this one's leading channels' (the new pieces are left to the fused forward)
            self._reused(x, cat.prefix.channels)
            return cat.prefix.stats
        known = []  # (channels, hit or None, piece or None, ref, version) per piece
        last = -1  # the last piece whose statistics are known
        for offset, channels, hit, ref, version in cat.pieces:
            piece = self._piece(ref, version)
            if hit is None and piece is not None:  # measured since the cat (by another BN)
                hit = self._entry(piece, version)
            if hit is not None:
                last = len(known)
            known.append((offset, channels, hit, piece, ref, version))
        if last < 0:
            return None
        means, vars_ = [], []
        for offset, channels, hit, piece, ref, version in known[:last + 1]:
            if hit is None:  # a gap before a known piece: sweep just these channels
                hit = sweep(piece if piece is not None else x.narrow(1, offset, channels))
                self.swept_channels += channels
                if piece is not None:  # (trusted and unchanged: just checked)
                    self.stats[id(piece)] = (ref, version, hit[0], hit[1])
            else:
                self._reused(x, channels)
            means.append(hit[0])
            vars_.append(hit[1])
        if len(means) == 1:
            return means[0], vars_[0]
        return torch.cat(means), torch.cat(vars_)

    def _reused(self, x: Tensor, channels: int) -> None:
        self.reused_channels += channels
        self.reused_elements += channels * (x.numel() // x.shape[1])

    def reuse_pays(self) -> bool:
        """Whether what the recorder enabled in this forward -- statistics reuse, and functional ReLUs
        fused into their BN (each saves a ReLU pass forward and one backward: counted twice) -- saved
        more than the recorder costs (see :class:`RootHooks`)."""
        saved = self.reused_elements + 2 * self.relu_elements
        return saved >= REUSE_ELEMENTS_PER_LOOKUP * torch.get_num_threads() * max(self.lookups, 1)

    def measured(self, x: Tensor, mean: Tensor, var: Tensor, known: int) -> None:
        """``x``'s full statistics, of which the first ``known`` channels came from :meth:`stats_for`:
        stored under ``x`` and under each piece of its concatenation that was not measured yet, so
        every later concatenation of those pieces reuses them."""
        self.swept_channels += x.shape[1] - known
        if not self.trusted(x):
            return
        self.stats[id(x)] = (weakref.ref(x), x._version, mean, var)
        cat = self._cat_of(x)
        if cat is None:
            return
        cat.stats = (mean, var)  # for the next concatenation that extends this one
        for offset, channels, _, ref, version in reversed(cat.pieces):  # the pieces measured just now
            if offset + channels <= known:
                break
            piece = self._piece(ref, version)
            if piece is not None and self._entry(piece, version) is None:
                self.stats[id(piece)] = (ref, version, mean.narrow(0, offset, channels),
                                         var.narrow(0, offset, channels))


class CatRecord:
    """One recorded ``out = cat(parts, dim=1)`` of this forward (see :meth:`StatsCache.record_cat`)."""

    __slots__ = ("out", "version", "pieces", "sig", "trust", "prefix", "channels", "stats")

    def __init__(self, out: Tensor, pieces: List[tuple], sig: List[tuple], trust: List[bool],
                 prefix: Optional["CatRecord"], channels: int):
        self.out, self.version = weakref.ref(out), out._version
        # per piece: (channel offset, channels, its statistics as of the cat or None, weakref or None, version)
        self.pieces = pieces
        self.sig = sig  # (weakref, version) of every part, to recognise a later cat that extends this one
        self.trust = trust  # each part's trust when it was first concatenated
        self.prefix = prefix  # the earlier record whose parts lead this one's, unchanged, or None
        self.channels = channels
        self.stats: Optional[Tuple[Tensor, Tensor]] = None  # out's statistics once a BN measured them


class ConcatRecorder(TorchFunctionMode):
    """Records every op output (trust), memory escapes, and channel-axis ``torch.cat`` calls into a
    :class:`StatsCache`; every call itself passes through unchanged."""

    def __init__(self, cache: StatsCache):
        super().__init__()
        self.cache = cache

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cache = self.cache
        if cache.awaiting and func in _RELUS and args:
            block = cache.awaiting.pop(id(args[0]), None)
            if block is not None and block._pending is args[0] and block.take(args[0], block.functional_relu):
                cache.relu_elements += args[0].numel()
                return args[0]  # fission already applied this ReLU: the call is a pass-through
        out = func(*args, **kwargs)
        if torch.is_inference_mode_enabled():
            return out
        kind = _kind(func)
        if kind is _ESCAPE:
            cache.record_escape(args)
        cache.record_output(out)
        if kind is _CAT and isinstance(out, Tensor) and out.dim() >= 2:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if isinstance(tensors, (list, tuple)) and dim in (1, 1 - out.dim()) and \
                    all(isinstance(t, Tensor) and t.dim() == out.dim() for t in tensors):
                cache.record_cat(out, list(tensors))
        return out


_PLAIN, _ESCAPE, _CAT = "plain", "escape", "cat"
_KINDS: Dict[object, str] = {}  # func -> what the recorder does with it (asked once per function)


def _kind(func) -> str:
    try:
        return _KINDS[func]
    except KeyError:
        pass
    except TypeError:  # an unhashable callable: classify it every time
        return _classify(func)
    kind = _KINDS[func] = _classify(func)
    return kind


def _classify(func) -> str:
    name = getattr(func, "__name__", None)
    if name in _ESCAPES or (name in ("__get__", "__set__") and getattr(func, "__self__", None) is _DATA):
        return _ESCAPE
    return _CAT if func in _CATS else _PLAIN


# ICF's reuse must save more than its recorder costs. Reusing a channel's statistics saves the fused
# forward's reduction over that channel (~0.2 ns an element and thread on an x86 core: the data is in
# L1 for the normalize pass anyway), while the recorder costs ~40 us of Python per BN (the
# TorchFunctionMode on every op, the cat records and lookups). So reuse pays from ~200k reused elements
# per BN call and thread: torchvision DenseNet121 reuses ~34M elements in 121 BN calls at batch 16,
# 112 px (~280k per call; with 2 threads the recorder measured 2% slower there, 3% at batch 4, 64 px).
REUSE_ELEMENTS_PER_LOOKUP = 200_000


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, Tensor) else type(a) for a in args)


class RootHooks:
    """The pre/post forward hooks on the model root that scope one :class:`ConcatRecorder` per forward.

    Adaptive: the first forward for an input signature (shapes, dtypes, devices of the positional
    arguments) records; if its statistics reuse did not pay (:meth:`StatsCache.reuse_pays`: too few
    reused elements per BN for this thread count), later forwards of that signature run without the
    recorder -- each fission BN then measures its whole input in its fused forward, and a functional
    ReLU after a BN runs as the user's call: the same function. The recorder always runs when it is
    needed for more than speed: ``low_memory`` (its recipes). ``decisions`` holds the choice per
    signature."""

    _convbn_installed = True

    def __init__(self, cache: StatsCache):
        self.cache = cache
        # (recorder or None, recipes' hooks pushed, signature to decide or None) per forward in flight
        self.active: List[Tuple[Optional[ConcatRecorder], bool, Optional[tuple]]] = []
        self.decisions: Dict[tuple, bool] = {}  # input signature -> record (ICF pays) or not

    def __getstate__(self) -> dict:
        return {"cache": self.cache, "active": [], "decisions": {}}

    def pre(self, module, args):
        if torch.compiler.is_compiling():
            return None
        self.cache.clear()
        needed = self.cache.recipes is not None
        sig = None if needed else _signature(args)
        if sig is not None and self.decisions.get(sig) is False:
            self.active.append((None, False, None))
            self.cache.recording = self.cache.storing_recipes = False
            return None
        recorder = ConcatRecorder(self.cache)
        recorder.__enter__()
        recipes = self.cache.recipes
        pushed = recipes is not None and recipes.push(type(module).__name__)
        self.active.append((recorder, pushed, sig if sig is not None and sig not in self.decisions else None))
        self.cache.recording = True
        self.cache.storing_recipes = pushed
        return None

    def post(self, module, args, output):
        if self.active:
            recorder, pushed, sig = self.active.pop()
            if pushed:
                SavedRecipes.pop()
            if recorder is not None:
                recorder.__exit__(None, None, None)
            if sig is not None and self.cache.lookups:
                self.decisions[sig] = self.cache.reuse_pays()
        self.cache.recording = bool(self.active) and self.active[-1][0] is not None
        self.cache.storing_recipes = bool(self.active) and self.active[-1][1]
        self.cache.clear()
        return None


def install_root_hooks(model: torch.nn.Module, cache: StatsCache) -> RootHooks:
    remove_root_hooks(model)
    hooks = RootHooks(cache)
    model.register_forward_pre_hook(hooks.pre)
    model.register_forward_hook(hooks.post, always_call=True)
    return hooks


def root_hooks(model: torch.nn.Module) -> Optional[RootHooks]:
    for fn in list(model._forward_pre_hooks.values()):
        if isinstance(getattr(fn, "__self__", None), RootHooks):
            return fn.__self__
    return None


def remove_root_hooks(model: torch.nn.Module) -> None:
    """Remove convbn's root hooks (found by owner, so deep copies and unpickled models work too)."""
    for table in (model._forward_pre_hooks, model._forward_hooks):
        for key, fn in list(table.items()):
            if isinstance(getattr(fn, "__self__", None), RootHooks):
                del table[key]
                getattr(model, "_forward_hooks_always_called", {}).pop(key, None)
