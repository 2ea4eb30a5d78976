"""The CUDA backend: the kernels of csrc/cuda/ (liblite_cuda.so, ABI header lite_cuda.h), opened
with cffi in ABI mode, plus device buffers with explicit lifetimes and a VRAM-budgeted weight
cache.

Importing this module raises ImportError with a one-line reason when the library is missing
(`LITE_CUDA_LIB`, else `<p>/_native/liblite_cuda.so` for p in `lite.__path__`), stale (ABI
version or symbol mismatch) or when no GPU is usable (no driver: the CUDA runtime is linked
statically and opens libcuda.so lazily, so its absence is a status code, not a crash; or zero
devices). `get_backend` then falls back to the CPU backends without a word.

Shapes follow base.py: T tokens, S cached positions, D hidden, H heads, C latent dims, R rope
dims, K experts per token, F expert width, N weight rows, E experts. Every argument is validated
here before the library sees it (the library validates again); failures raise BackendError with
the library's message. Activations are float32 and are not quantized on the GPU: results match
the numpy reference to float rounding (much tighter than the C backend's int8 activations).

Placement (weights on the device under `vram_budget`)
------------------------------------------------------
Weights are uploaded once (at first use) and cached:

1. Budget. `vram_budget` (constructor argument, or `LITE_VRAM_BUDGET` such as "6GB"; default:
   free device memory at start minus a reserve for scratch) bounds the bytes of cached weights
   (buffers kept for reuse included; scratch and latent caches come on top).
2. Resident tensors first. Non-expert weights (attention, shared experts, dense MLP, router,
   embeddings' output projection) are admitted whenever they fit, evicting cached experts if
   needed; they are never evicted for experts. A resident tensor that cannot fit is streamed
   (copied into a per-call arena) - correct, slow, and visible in `stats.streamed_bytes`.
3. A GPU expert cache in the remainder: routed experts (names `blk.L.ffn_*_exps.weight[e]`),
   least-recently-used eviction, never evicting an expert the current call uses; an evicted
   expert's buffer is reused for the next expert of its size. Experts that come from the memory
   map (read-only views) are keyed by address; experts handed out by the host pager
   (`lite/weights/pager.py`, writable slot views) are keyed by (pager pool, tensor name), which
   names the same bytes wherever the pager put them. So the host pager feeds the GPU cache:
   disk → pager slot (RAM budget) → device (VRAM budget).
4. Copies pass through pinned staging slots (`_Staging`); copies of missing experts go on a
   separate copy stream and the compute stream waits on an event, so they overlap with the
   kernels already queued. `prefetch(experts)` starts such copies early.
5. A miss may be computed on the CPU instead (`miss_policy`: "copy" always copies, "cpu" never
   copies a missing expert and runs it on the CPU backend, "auto" decides per expert). The
   decision compares two measured quantities for the expert's byte size B and its token count
   T_e: copy time B / bw_h2d (bandwidth measured once at first use through the staging slots)
   against CPU time B · s_cpu · max(1, T_e / 8), where s_cpu (seconds per weight byte for a
   memory-bound matvec; up to ~8 tokens share one read of the weights) is an exponential
   average over the CPU expert computations actually done (the first miss goes to the CPU to
   measure it). A slow link with a fast CPU computes misses on the CPU and copies them in the
   background for next time (when the budget has room).

Decoding on the device (`prepare_layers` / `decode_layers`)
------------------------------------------------------------
When every weight fits the budget, the model's decode steps run whole on the GPU: the pack pins
every weight in the cache (never evicted), each layer's expert table lives on the device
(`lite_cuda_expert`), routing feeds the experts without a host round trip
(`lite_cuda_moe_decode`), and the latent caches are mirrored on the device. A mirror knows how
many leading rows of each layer it shares with the host; a step sends the rows the host wrote
since (a prefill on the per-layer ops) and writes its new row back, and `mla_attention` marks a
mirror stale from the first row it was given to write. Rows changed on the host by anything
else (not a kernel) must be in a fresh cache. Per step: the token's hidden state and rope tables
go up, ~16 launches a layer, then the result, the routing and each layer's new cache row come
back. When the weights do not fit, prepare_layers refuses and the per-layer ops run with the
expert cache above.
"""
from __future__ import annotations

import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import BackendError
from . import native
from .base import (DecodeLayer, FFNWeights, QTensor, check_decode_layers, check_f32, check_heads_fit, check_mla,
                   check_norm, check_rmsnorm, check_rope, check_weight, mla_dims)

_STATUS = {-1: "invalid argument", -2: "unsupported block type", -3: "NULL pointer",
           -4: "buffer too small for the shapes", -5: "row length not a multiple of the block size",
           -7: "CUDA error", -8: "no CUDA device", -9: "out of device memory"}
MLA_MAX_C = 1024
ROUTE_MAX_E, ROUTE_MAX_K = 1024, 64
MAX_TOKENS = 65535 * 8
RESERVE_BYTES = 1536 << 20          # kept free for scratch when no budget is given
_FLOAT_TYPES = (0, 1, 30)            # F32, F16, BF16: read one weight at a time
_REPACKED = (2, 8)                   # Q4_0, Q8_0: quants and scales apart on the device (lite_cuda_repack)
_EXPERT_NAME = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_exps\.weight\[\d+\]$")


# ---- the library ---------------------------------------------------------------------------------

def open_library():
    """(ffi, lib, path) of liblite_cuda.so, checked for staleness; needs no GPU."""
    return native.open_library("lite_cuda", "LITE_CUDA_LIB", "liblite_cuda.so", "needs nvcc at install time",
                               "lite_cuda.h", "csrc/cuda")


def _last_error(ffi, lib) -> str:
    buf = ffi.new("char[512]")
    lib.lite_cuda_last_error(buf, 512)
    return ffi.string(buf).decode(errors="replace")


def device_count(ffi, lib) -> tuple[int, str]:
    """(number of devices, reason when 0) without raising."""
    n = ffi.new("int *")
    rc = lib.lite_cuda_device_count(n)
    if rc != 0 or n[0] == 0:
        return 0, _last_error(ffi, lib) or _STATUS.get(rc, str(rc))
    return int(n[0]), ""


_ffi, _lib, LIB_PATH = open_library()
_n_dev, _why = device_count(_ffi, _lib)
if _n_dev == 0:
    raise ImportError(f"no usable CUDA device ({_why})")


def _check(rc: int, op: str, what: str = "") -> None:
    if rc != 0:
        msg = _last_error(_ffi, _lib)
        raise BackendError(f"{op}: the CUDA library failed ({_STATUS.get(rc, rc)})"
                           + (f": {what}" if what else "") + (f" [{msg}]" if msg else ""))


def _owner(a: np.ndarray) -> np.ndarray:
    """The outermost ndarray that owns `a`'s memory (a memmap, a pager pool, a test array)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


# ---- device buffers ------------------------------------------------------------------------------

class DeviceBuffer:
    """`nbytes` of device memory with an explicit lifetime: `free()` (idempotent), or use as a
    context manager. Freed on garbage collection as a last resort."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise BackendError(f"DeviceBuffer: size must be positive, got {nbytes}")
        p = _ffi.new("void **")
        _check(_lib.lite_cuda_malloc(p, int(nbytes)), "cuda malloc", f"{nbytes} bytes")
        self._ptr = p[0]
        self.nbytes = int(nbytes)

    @property
    def ptr(self):
        if self._ptr is None:
            raise BackendError("DeviceBuffer: used after free()")
        return self._ptr

    @property
    def address(self) -> int:
        return int(_ffi.cast("uintptr_t", self.ptr))

    def typed(self, ctype: str = "float *", offset: int = 0):
        return _ffi.cast(ctype, _ffi.cast("uint8_t *", self.ptr) + offset)

    def upload(self, a: np.ndarray, stream=None, offset: int = 0) -> None:
        """Copy a C-contiguous host array in (ordered on `stream`; pageable sources are staged
        before this returns, so `a` may be reused at once)."""
        a = np.ascontiguousarray(a)
        if offset < 0 or offset + a.nbytes > self.nbytes:
            raise BackendError(f"DeviceBuffer.upload: {a.nbytes} bytes at {offset} exceed {self.nbytes}")
        if a.nbytes:
            _check(_lib.lite_cuda_memcpy_h2d_async(self.typed("void *", offset), _ffi.from_buffer(a), a.nbytes,
                                                   stream if stream is not None else _ffi.NULL), "cuda upload")

    def download(self, out: np.ndarray, stream=None, offset: int = 0) -> np.ndarray:
        """Copy into the C-contiguous host array `out` and wait for it."""
        if not out.flags.c_contiguous or offset < 0 or offset + out.nbytes > self.nbytes:
            raise BackendError("DeviceBuffer.download: output must be C-contiguous and fit the buffer")
        if out.nbytes:
            s = stream if stream is not None else _ffi.NULL
            _check(_lib.lite_cuda_memcpy_d2h_async(_ffi.from_buffer(out), self.typed("void *", offset), out.nbytes, s),
                   "cuda download")
            _check(_lib.lite_cuda_stream_sync(s), "cuda download")
        return out

    def free(self) -> None:
        if self._ptr is not None:
            p, self._ptr = self._ptr, None
            _check(_lib.lite_cuda_free(p), "cuda free")

    def __enter__(self) -> "DeviceBuffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.free()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass


class Stream:
    def __init__(self) -> None:
        p = _ffi.new("void **")
        _check(_lib.lite_cuda_stream_create(p), "cuda stream")
        self.handle = p[0]

    def sync(self) -> None:
        _check(_lib.lite_cuda_stream_sync(self.handle), "cuda stream sync")

    def destroy(self) -> None:
        if self.handle is not None:
            h, self.handle = self.handle, None
            _check(_lib.lite_cuda_stream_destroy(h), "cuda stream destroy")


class Event:
    def __init__(self) -> None:
        p = _ffi.new("void **")
        _check(_lib.lite_cuda_event_create(p), "cuda event")
        self.handle = p[0]

    def record(self, stream: Stream) -> None:
        _check(_lib.lite_cuda_event_record(self.handle, stream.handle), "cuda event record")

    def wait_in(self, stream: Stream) -> None:
        _check(_lib.lite_cuda_stream_wait_event(stream.handle, self.handle), "cuda stream wait")

    def __del__(self) -> None:
        try:
            if self.handle is not None:
                _lib.lite_cuda_event_destroy(self.handle)
                self.handle = None
        except Exception:
            pass


def device_properties(device: int = 0) -> dict[str, Any]:
    name = _ffi.new("char[256]")
    total, free = _ffi.new("int64_t *"), _ffi.new("int64_t *")
    major, minor, sms = _ffi.new("int *"), _ffi.new("int *"), _ffi.new("int *")
    _check(_lib.lite_cuda_device_props(name, 256, total, free, major, minor, sms, device), "device properties")
    return {"name": _ffi.string(name).decode(), "total_bytes": int(total[0]), "free_bytes": int(free[0]),
            "compute_capability": (int(major[0]), int(minor[0])), "multiprocessors": int(sms[0]),
            "device": device, "count": _n_dev}


# ---- the weight cache ----------------------------------------------------------------------------

@dataclass
class CudaStats:
    resident_bytes: int = 0          # cached non-expert weights
    expert_bytes: int = 0            # cached experts
    uploads: int = 0
    uploaded_bytes: int = 0
    streamed_bytes: int = 0          # weights copied for one call only (did not fit / not cacheable)
    expert_hits: int = 0
    expert_misses: int = 0
    expert_evictions: int = 0
    cpu_experts: int = 0             # misses computed on the CPU backend
    h2d_gbs: float | None = None     # measured host-to-device bandwidth
    cpu_s_per_byte: float | None = None


@dataclass
class _Entry:
    buf: DeviceBuffer
    owner: weakref.ref
    expert: bool
    ready: Event | None = None       # set while an async copy is in flight
    pinned: bool = False             # held for a decode_layers pack: never evicted


class _Staging:
    """Pinned host slots that copies from pageable memory (the memory map, pager slots) pass
    through: the CPU fills a slot and the copy engine reads it asynchronously, at the pinned
    rate; a slot is refilled once the event recorded after its last copy has passed. Copies
    larger than a slot, or any while pinned memory is refused, go straight from pageable memory."""

    SLOTS, MIN_SLOT = 4, 8 << 20

    def __init__(self) -> None:
        self._size = 0
        self._ptrs: list = []
        self._views: list[np.ndarray] = []
        self._events: list[Event | None] = []
        self._next = 0
        self._raw_bufs: dict[int, DeviceBuffer] = {}

    def _grow(self, n: int) -> bool:
        self.free()
        size = max(self.MIN_SLOT, (n + (1 << 20) - 1) & ~((1 << 20) - 1))
        for _ in range(self.SLOTS):
            p = _ffi.new("void **")
            if _lib.lite_cuda_host_alloc(p, size) != 0:
                self.free()
                return False
            self._ptrs.append(p[0])
            self._views.append(np.frombuffer(_ffi.buffer(p[0], size), np.uint8))
            self._events.append(None)
        self._size = size
        return True

    def upload(self, dst, data: np.ndarray, stream: Stream, qtype: int | None = None, cols: int = 0) -> None:
        """Copy host `data` to the device pointer `dst` on `stream`; Q4_0 / Q8_0 weights (give their
        type and row length) land in a device scratch and are repacked into `dst` in the kernels'
        layout (lite_cuda_repack)."""
        n = data.nbytes
        repack = qtype is not None and int(qtype) in _REPACKED
        target = self._raw(n, stream) if repack else dst
        if n > self._size and not (n <= 256 << 20 and self._grow(n)):
            src = np.ascontiguousarray(data)
            _check(_lib.lite_cuda_memcpy_h2d_async(target, _ffi.from_buffer(src), n, stream.handle), "cuda upload")
        else:
            i = self._next
            self._next = (i + 1) % len(self._ptrs)
            if self._events[i] is not None:
                _check(_lib.lite_cuda_event_sync(self._events[i].handle), "staging")
            np.copyto(self._views[i][:n], np.ascontiguousarray(data).reshape(-1).view(np.uint8))
            _check(_lib.lite_cuda_memcpy_h2d_async(target, self._ptrs[i], n, stream.handle), "cuda upload")
            ev = self._events[i] or Event()
            ev.record(stream)
            self._events[i] = ev
        if repack:
            _check(_lib.lite_cuda_repack(_ffi.cast("uint8_t *", dst), _ffi.cast("uint8_t *", target), n, int(qtype),
                                         int(cols), stream.handle), "repack")

    def _raw(self, n: int, stream: Stream):
        """A device scratch of n bytes for `stream`'s raw weight bytes (one per stream: the stream's
        order keeps a repack's reads before the next upload's writes)."""
        b = self._raw_bufs.get(id(stream))
        if b is None or b.nbytes < n:
            if b is not None:
                stream.sync()
                b.free()
            b = self._raw_bufs[id(stream)] = DeviceBuffer(max(n, self.MIN_SLOT))
        return b.ptr

    def free(self) -> None:
        for ev in self._events:
            if ev is not None:
                _check(_lib.lite_cuda_event_sync(ev.handle), "staging")
        self._views.clear()                 # views first: they point into the pinned blocks
        for p in self._ptrs:
            _lib.lite_cuda_host_free(p)
        self._ptrs.clear()
        self._events.clear()
        self._size = 0

    def free_all(self) -> None:
        """The pinned slots and the device scratches (once no stream uses them)."""
        self.free()
        for b in self._raw_bufs.values():
            b.free()
        self._raw_bufs.clear()


@dataclass
class _Mirror:
    """The device copy of one host latent-cache array (its whole owner: `[L, capacity, C]` for the
    model's cache) and, per layer view (its byte offset in the owner), how many leading rows are
    known equal on both sides."""
    buf: DeviceBuffer
    owner: weakref.ref
    addr: int
    synced: dict[int, int] = field(default_factory=dict)


@dataclass
class _Plan:
    """Where each weight of one call comes from: cached device pointers, or arena offsets."""
    ptrs: list = field(default_factory=list)
    stream: list = field(default_factory=list)   # (index, weight, arena offset)
    arena_bytes: int = 0


class CudaBackend:
    """Backend protocol on the CUDA library. One instance may be shared by threads (calls are
    serialised by a lock); one device."""

    name = "cuda"
    # Experts not in the device cache are uploaded into a per-call arena: a whole layer's in one
    # call (160 of the full model's: 2 GB) could exhaust a small budget, so moe.ffn sends chunks.
    moe_streams_weights = True

    def __init__(self, device: int = 0, vram_budget: int | str | None = None,
                 miss_policy: str | None = None) -> None:
        from ..weights.pager import parse_size

        self.ffi, self.lib = _ffi, _lib
        _check(_lib.lite_cuda_set_device(int(device)), "set device", f"device {device}")
        self.device = int(device)
        self.props = device_properties(self.device)
        budget = vram_budget if vram_budget is not None else os.environ.get("LITE_VRAM_BUDGET")
        self.vram_budget = (parse_size(budget) if budget not in (None, "")
                            else max(0, self.props["free_bytes"] - RESERVE_BYTES))
        self.miss_policy = miss_policy or os.environ.get("LITE_CUDA_MISS") or "copy"
        if self.miss_policy not in ("copy", "cpu", "auto"):
            raise BackendError(f"cuda: miss_policy must be copy, cpu or auto, got {self.miss_policy!r}")
        self._lock = threading.RLock()
        self._stream = Stream()            # compute
        self._copy = Stream()              # expert copies
        self._scratch: dict[str, DeviceBuffer] = {}
        self._host: dict[str, np.ndarray] = {}
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._used = 0
        self._in_use: set[tuple] = set()
        self._waited: list[_Entry] = []     # entries whose copy event the compute stream waited on
        self._cpu = None
        self._mirrors: dict[int, _Mirror] = {}
        self._spare: dict[int, list[DeviceBuffer]] = {}     # buffers of dropped entries, by size
        self._staging = _Staging()
        self.stats = CudaStats()

    # ---- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Free every device buffer this backend holds (it stays usable: buffers come back)."""
        with self._lock:
            self._stream.sync()
            self._copy.sync()
            for e in self._cache.values():
                e.buf.free()
            spares = [b for bufs in self._spare.values() for b in bufs]
            for b in [*self._scratch.values(), *(m.buf for m in self._mirrors.values()), *spares]:
                b.free()
            self._staging.free_all()
            self._cache.clear()
            self._scratch.clear()
            self._mirrors.clear()
            self._spare.clear()
            self._used = self.stats.resident_bytes = self.stats.expert_bytes = 0

    def gpu_stats(self) -> dict[str, Any]:
        """The device, the weight budget and the cache counters (`Model.stats()["gpu"]`)."""
        return {"device": self.props["name"], "vram_budget_bytes": self.vram_budget,
                "miss_policy": self.miss_policy, **asdict(self.stats)}

    def upload_weight(self, w: QTensor) -> DeviceBuffer:
        """A device copy of `w` in the layout the kernels read, outside the cache (the caller frees
        it): for driving the library's entry points directly (tests, benchmarks)."""
        flat = _flat(w)
        check_weight("upload_weight", flat, None, None)
        b = DeviceBuffer(flat.data.nbytes)
        with self._lock:
            self._staging.upload(b.ptr, flat.data, self._stream, flat.qtype, flat.shape[-1])
            self._stream.sync()
        return b

    def synchronize(self) -> None:
        self._stream.sync()
        self._copy.sync()

    def pin(self, a: np.ndarray) -> None:
        """Page-lock a long-lived host array (e.g. the pager's slot pool) so copies from it are
        truly asynchronous. Unpin with `unpin` before the array is freed."""
        _check(_lib.lite_cuda_host_register(_ffi.from_buffer(a), a.nbytes), "pin")

    def unpin(self, a: np.ndarray) -> None:
        _check(_lib.lite_cuda_host_unregister(_ffi.from_buffer(a)), "unpin")

    # ---- scratch -----------------------------------------------------------------------------------
    def _buf(self, role: str, nbytes: int) -> DeviceBuffer:
        """A grow-only device scratch buffer per role (ops on one stream reuse it in order)."""
        b = self._scratch.get(role)
        if b is None or b.nbytes < nbytes:
            if b is not None:
                self._stream.sync()        # queued work may still read the old one
                b.free()
            b = self._scratch[role] = DeviceBuffer(max(int(nbytes), 1 << 16))
        return b

    def _put(self, role: str, a: np.ndarray) -> DeviceBuffer:
        b = self._buf(role, a.nbytes)
        b.upload(a, self._stream.handle)
        return b

    def _get(self, b: DeviceBuffer, out: np.ndarray) -> np.ndarray:
        return b.download(out, self._stream.handle)

    def _hostbuf(self, role: str, nbytes: int) -> np.ndarray:
        h = self._host.get(role)
        if h is None or h.nbytes < nbytes:
            h = self._host[role] = np.empty(max(int(nbytes), 1 << 12), np.uint8)
        return h

    # ---- weights -----------------------------------------------------------------------------------

    @staticmethod
    def _key(w: QTensor) -> tuple | None:
        """Cache key of a weight, or None when its bytes may change under the same identity."""
        d = w.data
        if not d.flags.writeable:           # read-only (the memory map): the address names the bytes
            return ("ro", d.ctypes.data, d.nbytes, int(w.qtype), w.shape)
        if _EXPERT_NAME.match(w.name):      # a pager slot view: (pool, tensor) names the bytes
            return ("exp", id(_owner(d)), w.name, int(w.qtype), w.shape)
        return None

    def _lookup(self, key: tuple | None, w: QTensor) -> _Entry | None:
        if key is None:
            return None
        e = self._cache.get(key)
        if e is None:
            return None
        if e.owner() is not _owner(w.data):  # the owner died and its id/address was reused
            self._drop(key)
            return None
        self._cache.move_to_end(key)
        return e

    def _drop(self, key: tuple) -> None:
        """Forget an entry; its buffer becomes a spare for the next weight of its size (cudaFree
        waits for the whole device, and a decode step with misses drops dozens)."""
        e = self._cache.pop(key)
        if e.ready is not None:
            self._copy.sync()
        self._stream.sync()                 # queued kernels may still read it
        self._spare.setdefault(e.buf.nbytes, []).append(e.buf)
        if e.expert:
            self.stats.expert_bytes -= e.buf.nbytes
        else:
            self.stats.resident_bytes -= e.buf.nbytes

    def _sweep(self) -> None:
        """Free entries whose host owner is gone (a closed model, a dropped test array)."""
        for k in [k for k, e in self._cache.items() if e.owner() is None]:
            self._drop(k)

    def _room_for(self, n: int) -> DeviceBuffer | None:
        """A device buffer of n bytes within the budget (`_used` counts spares too): a spare of that
        size, else a new one after freeing the spares and evicting least recently used experts;
        None when the budget has no room."""
        swept = False
        while True:
            spare = self._spare.get(n)
            if spare:
                return spare.pop()
            if self._used + n <= self.vram_budget:
                self._used += n
                return DeviceBuffer(n)
            if any(self._spare.values()):
                for size, bufs in self._spare.items():
                    for b in bufs:
                        b.free()
                        self._used -= size
                self._spare.clear()
                continue
            if not swept:
                swept = True
                self._sweep()
                continue
            victim = next((k for k, e in self._cache.items() if e.expert and not e.pinned and k not in self._in_use),
                          None)
            if victim is None:
                return None
            self._drop(victim)
            self.stats.expert_evictions += 1

    def _admit(self, key: tuple, w: QTensor, expert: bool, stream: Stream) -> _Entry | None:
        """Upload `w` into the cache (on `stream`), or None when the budget has no room."""
        n = w.data.nbytes
        buf = self._room_for(n)
        if buf is None:
            return None
        self._staging.upload(buf.ptr, w.data, stream, w.qtype, w.shape[-1])
        e = _Entry(buf, weakref.ref(_owner(w.data)), expert)
        self._cache[key] = e
        self.stats.uploads += 1
        self.stats.uploaded_bytes += n
        if expert:
            self.stats.expert_bytes += n
        else:
            self.stats.resident_bytes += n
        return e

    def _mark_copy(self, e: _Entry) -> None:
        e.ready = Event()
        e.ready.record(self._copy)

    def _plan(self, op: str, weights: list[tuple[QTensor, int | None, int | None]]) -> _Plan:
        """Validate weights and find each one's device pointer: a cache hit, a new cache entry
        (copied on the copy stream for experts), or a slot in this call's arena."""
        plan = _Plan()
        self._in_use = {k for k in (self._key(w) for w, _, _ in weights) if k is not None}
        waits: list[Event] = []
        for i, (w, rows, cols) in enumerate(weights):
            check_weight(op, w, rows, cols)
            key = self._key(w)
            expert = bool(_EXPERT_NAME.match(w.name))
            e = self._lookup(key, w)
            if expert:
                if e is not None:
                    self.stats.expert_hits += 1
                else:
                    self.stats.expert_misses += 1
            if e is None and key is not None:
                e = self._admit(key, w, expert, self._copy if expert else self._stream)
                if e is not None and expert:
                    self._mark_copy(e)
            if e is not None:
                if e.ready is not None:
                    waits.append(e.ready)
                    self._waited.append(e)
                plan.ptrs.append(_ffi.cast("const uint8_t *", e.buf.ptr))
            else:
                plan.ptrs.append(None)
                plan.stream.append((i, w, plan.arena_bytes))
                plan.arena_bytes += (w.data.nbytes + 255) & ~255
        for ev in waits:
            ev.wait_in(self._stream)
        if plan.arena_bytes:
            arena = self._buf("arena", plan.arena_bytes)
            for i, w, off in plan.stream:
                self._staging.upload(arena.typed("void *", off), w.data, self._stream, w.qtype, w.shape[-1])
                plan.ptrs[i] = arena.typed("const uint8_t *", off)
                self.stats.streamed_bytes += w.data.nbytes
        return plan

    def _end_call(self) -> None:
        # The compute stream waited on these copies' events before the kernels that read them;
        # the caller synchronised it, so the events are spent.
        for e in self._waited:
            e.ready = None
        self._waited = []
        self._in_use = set()

    # ---- ops -----------------------------------------------------------------------------------------
    def matmul(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        x = check_f32("matmul input", x, 2)
        t, cols = x.shape
        if t > MAX_TOKENS:
            raise BackendError(f"matmul: {t} tokens exceed the kernel's limit {MAX_TOKENS}")
        with self._lock:
            plan = self._plan("matmul", [(w, None, cols)])
            n = w.shape[0]
            out = np.empty((t, n), np.float32)
            if t == 0:
                self._end_call()
                return out
            dx, dout = self._put("x", x), self._buf("out", out.nbytes)
            rc = self.lib.lite_cuda_matmul(dout.typed(), out.size, dx.typed(), t, cols, plan.ptrs[0],
                                           w.data.nbytes, int(w.qtype), n, self._stream.handle)
            _check(rc, "matmul", f"weight {w.name} {w.qtype.name} {w.shape}, input {x.shape}")
            self._get(dout, out)
            self._end_call()
        return out

    def matmul_heads(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        """Optional op: x `[T, H, cols]` times each head's weight `w[h]` `[N, cols]` → `[T, H, N]`;
        the 3-D weight `[H, N, cols]` is cached as one buffer, one launch per head."""
        x = check_f32("matmul_heads input", x, 3)
        t, h, cols = x.shape
        check_heads_fit(x, w)
        n = w.shape[1]
        flat = _flat(w)
        with self._lock:
            plan = self._plan("matmul_heads", [(flat, h * n, cols)])
            out = np.empty((h, t, n), np.float32)
            if t == 0 or h == 0:
                self._end_call()
                return out.transpose(1, 0, 2).copy()
            dx, dout = self._put("x", np.ascontiguousarray(x.transpose(1, 0, 2))), self._buf("out", out.nbytes)
            rc = self.lib.lite_cuda_matmul_heads(dout.typed(), out.size, t * n, dx.typed(), t * cols, t, cols,
                                                 plan.ptrs[0], flat.data.nbytes, int(w.qtype), n, h,
                                                 self._stream.handle)
            _check(rc, "matmul_heads", f"weight {w.name} {w.qtype.name} {w.shape}")
            self._get(dout, out)
            self._end_call()
        return np.ascontiguousarray(out.transpose(1, 0, 2))

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        x, w = check_rmsnorm(x, w, eps)
        out = np.empty_like(x)
        if x.size:
            with self._lock:
                dx, dw, do = self._put("x", x), self._put("w", w), self._buf("out", x.nbytes)
                _check(self.lib.lite_cuda_rmsnorm_f32(do.typed(), dx.typed(), dw.typed(), x.shape[0], x.shape[1],
                                                      float(eps), self._stream.handle), "rmsnorm")
                self._get(do, out)
        return out

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        x, cos, sin = check_rope(x, cos, sin)
        t, h, r = x.shape
        out = np.empty_like(x)
        if x.size:
            with self._lock:
                dx, dc, ds = self._put("x", x), self._put("cos", cos), self._put("sin", sin)
                do = self._buf("out", x.nbytes)
                _check(self.lib.lite_cuda_rope_f32(do.typed(), dx.typed(), dc.typed(), ds.typed(), t, h, r,
                                                   self._stream.handle), "rope")
                self._get(do, out)
        return out

    def softmax(self, x: np.ndarray) -> np.ndarray:
        x = check_f32("softmax input", x, 2)
        out = np.empty_like(x)
        if x.size:
            with self._lock:
                dx, do = self._put("x", x), self._buf("out", x.nbytes)
                _check(self.lib.lite_cuda_softmax_f32(do.typed(), dx.typed(), x.shape[0], x.shape[1],
                                                      self._stream.handle), "softmax")
                self._get(do, out)
        return out

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        if not isinstance(g, np.ndarray) or not isinstance(u, np.ndarray) or g.shape != u.shape:
            raise BackendError(f"silu_mul: shapes {getattr(g, 'shape', g)} and {getattr(u, 'shape', u)} differ")
        g, u = check_f32("silu_mul gate", g, g.ndim), check_f32("silu_mul up", u, u.ndim)
        out = np.empty_like(g)
        if g.size:
            with self._lock:
                dg, du, do = self._put("x", g), self._put("w", u), self._buf("out", g.nbytes)
                _check(self.lib.lite_cuda_silu_mul_f32(do.typed(), dg.typed(), du.typed(), g.size,
                                                       self._stream.handle), "silu_mul")
                self._get(do, out)
        return out

    def mla_attention(self, q_lat: np.ndarray, q_pe: np.ndarray, ckv: np.ndarray, kpe: np.ndarray,
                      scale: float, start: int) -> np.ndarray:
        a = check_mla(q_lat, q_pe, ckv, kpe, scale, start)
        q_lat, q_pe, ckv, kpe, start = a.q_lat, a.q_pe, a.ckv, a.kpe, a.start
        t, h, c, r, s = a.dims
        if c + r > MLA_MAX_C:
            raise BackendError(f"mla_attention: latent + rope size {c + r} exceeds the kernel's limit {MLA_MAX_C}")
        out = np.empty_like(q_lat)
        if t == 0:
            return out
        with self._lock:
            null = self.ffi.NULL
            dq, dc = self._put("x", q_lat), self._put("ckv", ckv)
            dp = self._put("w", q_pe) if r else None
            dk = self._put("kpe", kpe) if r else None
            do = self._buf("out", out.nbytes)
            scr, nf = self._mla_scratch(t, h, c, start)
            rc = self.lib.lite_cuda_mla_attention(do.typed(), dq.typed(), dp.typed() if dp else null, dc.typed(),
                                                  dk.typed() if dk else null, t, h, c, r, s, start, float(scale),
                                                  scr, nf, self._stream.handle)
            _check(rc, "mla_attention")
            self._get(do, out)
            # The caller wrote rows start.. of its cache: device copies of them are stale now.
            for arr in (ckv, kpe):
                got = self._mirror_of(arr, create=False)
                if got is not None:
                    m, off = got
                    m.synced[off] = min(m.synced.get(off, 0), start)
        return out

    def route(self, logits: np.ndarray, k: int, n_group: int = 1, topk_group: int = 1, norm: bool = False,
              scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Router on the device: logits `[T, E]` → (ids int32 `[T, K]`, weights `[T, K]`, probs
        `[T, E]`), the semantics of lite/model/moe.py:route on softmax(logits)."""
        logits = check_f32("route logits", logits, 2)
        t, e = logits.shape
        if not (0 < e <= ROUTE_MAX_E and 0 <= k <= min(e, ROUTE_MAX_K)):
            raise BackendError(f"route: E={e}, K={k} outside 1..{ROUTE_MAX_E} / 0..min(E, {ROUTE_MAX_K})")
        if n_group > 1 and (e % n_group or not 1 <= topk_group <= n_group):
            raise BackendError(f"route: {e} experts do not split into {n_group} groups (top {topk_group})")
        ids, w, probs = np.empty((t, k), np.int32), np.empty((t, k), np.float32), np.empty((t, e), np.float32)
        if t == 0:
            return ids, w, probs
        with self._lock:
            dl = self._put("x", logits)
            di, dw, dp = self._buf("ids", max(ids.nbytes, 4)), self._buf("w", max(w.nbytes, 4)), self._buf("out", probs.nbytes)
            _check(self.lib.lite_cuda_route(di.typed("int32_t *"), dw.typed(), dp.typed(), dl.typed(), t, e, k,
                                            int(n_group), int(topk_group), int(bool(norm)), float(scale),
                                            self._stream.handle), "route")
            self._get(di, ids)
            self._get(dw, w)
            self._get(dp, probs)
        return ids, w, probs

    def _mla_scratch(self, t: int, h: int, c: int, start: int) -> tuple[Any, int]:
        """(device pointer or NULL, floats) for the partials of the split attention."""
        nf = self.ffi.new("int64_t *")
        _check(self.lib.lite_cuda_mla_scratch_floats(nf, t, h, c, start), "mla_attention", "scratch size")
        n = int(nf[0])
        return (self._buf("mla", n * 4).typed(), n) if n else (self.ffi.NULL, 0)

    # ---- latent caches on the device ---------------------------------------------------------------
    def _mirror_of(self, a: np.ndarray, create: bool) -> tuple[_Mirror, int] | None:
        """The device mirror of the host array owning `a` and `a`'s byte offset in it; made (empty:
        no rows synced) when `create`, else None where there is none."""
        own = _owner(a)
        m = self._mirrors.get(id(own))
        if m is not None and (m.owner() is not own or m.addr != own.ctypes.data or m.buf.nbytes != own.nbytes):
            self._stream.sync()
            m.buf.free()
            del self._mirrors[id(own)]
            m = None
        if m is None:
            if not create:
                return None
            if not own.flags.c_contiguous:
                raise BackendError("decode_layers: a latent cache must be a view of a C-contiguous array")
            for key in [k for k, v in self._mirrors.items() if v.owner() is None]:
                self._stream.sync()
                self._mirrors.pop(key).buf.free()
            m = self._mirrors[id(own)] = _Mirror(DeviceBuffer(own.nbytes), weakref.ref(own), own.ctypes.data)
        return m, a.ctypes.data - m.addr

    # ---- a decode step through every layer (optional op) ---------------------------------------------
    def _pin(self, op: str, w: QTensor, pinned: list) -> Any:
        """`w`'s device pointer, its cache entry held for good (never evicted), or BackendError
        when the budget has no room for it."""
        check_weight(op, w, None, None)
        key = self._key(w)
        if key is None:
            raise BackendError(f"{op}: weight {w.name} has no stable identity to keep on the GPU")
        e = self._lookup(key, w)
        if e is None:
            e = self._admit(key, w, bool(_EXPERT_NAME.match(w.name)), self._stream)
            if e is None:
                raise BackendError(f"{op}: the weights do not fit the VRAM budget of {self.vram_budget} bytes")
        if not e.pinned:
            e.pinned = True
            pinned.append(e)
        return _ffi.cast("const uint8_t *", e.buf.ptr)

    def prepare_layers(self, layers: "list[DecodeLayer]", d: int, k: int) -> "_CudaLayers":
        """`layers` validated for hidden size d and K routed experts per token, with every weight
        held in the GPU cache, for `decode_layers`; BackendError (and nothing held) when they do
        not fit the VRAM budget - the per-layer ops then serve, with the expert cache."""
        if not layers or not all(isinstance(L, DecodeLayer) for L in layers):
            raise BackendError("prepare_layers: expected a non-empty sequence of DecodeLayer")
        if not 0 <= k <= ROUTE_MAX_K:
            raise BackendError(f"prepare_layers: K={k} outside 0..{ROUTE_MAX_K}")
        with self._lock:
            pinned: list[_Entry] = []
            try:
                pack = _CudaLayers(self, layers, d, k, pinned)
                self.synchronize()          # uploads done: the pack's entries need no copy events
                for e in pinned:
                    e.ready = None
                return pack
            except BaseException:
                for e in pinned:
                    e.pinned = False
                raise

    def decode_layers(self, x: np.ndarray, pack: "_CudaLayers", caches, cos: np.ndarray, sin: np.ndarray,
                      start: int, scale: float, eps: float, norm_eps: float, n_group: int = 1, topk_group: int = 1,
                      norm: bool = False, route_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """One token through every layer on the device, with the results of the per-layer ops (see
        CBackend.decode_layers): x `[1, D]` is updated in place up to the last layer's FFN input,
        the last FFN output `[1, D]` and the routed ids `[L, K]` (-1 for dense layers) are
        returned. caches[i] is layer i's host (ckv `[S, C]`, kpe `[S, R]`): the device keeps a
        mirror of each, sends it the rows written on the host since (prefill), computes on it and
        writes row `start` back, so host and device agree after every call."""
        if not isinstance(pack, _CudaLayers) or pack.owner is not self:
            raise BackendError("decode_layers: pack must come from this backend's prepare_layers")
        n_layer, (h, nn, r, c, v, q), dm, kk = len(pack.layers), pack.dims, pack.d, pack.k
        x, cos, sin, _, views = check_decode_layers(
            x, caches, cos, sin, start, scale, eps, norm_eps, n_group, topk_group, route_scale, n_layer=n_layer, d=dm,
            dims=pack.dims, k=kk, n_exps=pack.n_exps)
        start = int(start)
        lib, ffi, st = self.lib, self.ffi, self._stream.handle
        with self._lock:
            sc = self._buf("layers", pack.scratch_bytes)
            at = lambda name, ctype="float *": sc.typed(ctype, pack.off[name])  # noqa: E731
            xs, dl, hb, ab, qa, qb, kvb, qpe, ql, ol, ob, lg, pr, wt, cs = (
                at(n) for n in ("x", "delta", "h", "a", "qa", "q", "kv", "qpe", "qlat", "olat", "o", "logits",
                                "probs", "wts", "cs"))
            ids = at("ids", "int32_t *")
            mscr, mla_scr = at("moe"), at("mla")
            sc.upload(x, st, pack.off["x"])
            sc.upload(np.concatenate([cos.reshape(-1), sin.reshape(-1)]), st, pack.off["cs"])
            half = r // 2
            sn = cs + half
            _check(lib.lite_cuda_memset(ids, 0xFF, max(n_layer * kk, 1) * 4, st), "decode_layers")
            # Each layer's cache rows on the device: send what the host wrote since the last sync.
            dev = []
            for ckv, kpe in views:
                ptrs = []
                for a, width in ((ckv, c), (kpe, r)):
                    m, off = self._mirror_of(a, create=True)
                    done = m.synced.get(off, 0)
                    if done < start:
                        sc_rows = a[done:start]
                        _check(lib.lite_cuda_memcpy_h2d_async(m.buf.typed("void *", off + done * width * 4),
                                                              ffi.from_buffer(sc_rows), sc_rows.nbytes, st),
                               "decode_layers", "cache upload")
                    ptrs.append((m, off))
                dev.append(ptrs)
            nf_mla = pack.mla_floats
            for i, L in enumerate(pack.layers):
                (mc, oc), (mk, ok) = dev[i]
                ckv_d, kpe_d = mc.buf.typed("float *", oc), mk.buf.typed("float *", ok)
                _check(lib.lite_cuda_add_rmsnorm_f32(hb, xs, dl if i else ffi.NULL, L.attn_norm, 1, dm, norm_eps, st),
                       "decode_layers")
                if L.q is not None:
                    _check(lib.lite_cuda_matmul(qb, pack.hq, hb, 1, dm, L.q, L.q_bytes, L.q_type, pack.hq, st),
                           "decode_layers", f"layer {i} q")
                else:
                    _check(lib.lite_cuda_matmul(qa, q, hb, 1, dm, L.q_a, L.q_a_bytes, L.q_a_type, q, st),
                           "decode_layers", f"layer {i} q_a")
                    _check(lib.lite_cuda_rmsnorm_f32(qa, qa, L.q_a_norm, 1, q, eps, st), "decode_layers")
                    _check(lib.lite_cuda_matmul(qb, pack.hq, qa, 1, q, L.q_b, L.q_b_bytes, L.q_b_type, pack.hq, st),
                           "decode_layers", f"layer {i} q_b")
                _check(lib.lite_cuda_matmul(kvb, c + r, hb, 1, dm, L.kv_a, L.kv_a_bytes, L.kv_a_type, c + r, st),
                       "decode_layers", f"layer {i} kv_a")
                _check(lib.lite_cuda_rmsnorm_f32(ckv_d + start * c, kvb, L.kv_norm, 1, c, eps, st), "decode_layers")
                _check(lib.lite_cuda_rope_rows(kpe_d + start * r, r, kvb + c, r, cs, sn, 1, 1, r, st), "decode_layers")
                _check(lib.lite_cuda_rope_rows(qpe, r, qb + nn, nn + r, cs, sn, 1, h, r, st), "decode_layers")
                _check(lib.lite_cuda_matmul_heads(ql, h * c, c, qb, nn + r, 1, nn, L.k_b, L.k_b_bytes, L.k_b_type, c,
                                                  h, st), "decode_layers", f"layer {i} k_b")
                _check(lib.lite_cuda_mla_attention(ol, ql, qpe, ckv_d, kpe_d, 1, h, c, r, start + 1, start,
                                                   float(scale), mla_scr, nf_mla, st), "decode_layers")
                _check(lib.lite_cuda_matmul_heads(ob, h * v, v, ol, c, 1, c, L.v_b, L.v_b_bytes, L.v_b_type, v, h, st),
                       "decode_layers", f"layer {i} v_b")
                _check(lib.lite_cuda_matmul(ab, dm, ob, 1, h * v, L.out, L.out_bytes, L.out_type, dm, st),
                       "decode_layers", f"layer {i} out")
                _check(lib.lite_cuda_add_rmsnorm_f32(hb, xs, ab, L.ffn_norm, 1, dm, norm_eps, st), "decode_layers")
                lid = ids + i * kk
                if L.router is not None:
                    _check(lib.lite_cuda_matmul(lg, L.n_exp, hb, 1, dm, L.router, L.router_bytes, L.router_type,
                                                L.n_exp, st), "decode_layers", f"layer {i} router")
                    _check(lib.lite_cuda_route(lid, wt, pr, lg, 1, L.n_exp, kk, n_group, topk_group, int(bool(norm)),
                                               float(route_scale), st), "decode_layers", f"layer {i} route")
                _check(lib.lite_cuda_moe_decode(dl, hb, dm, lid, wt, kk if L.router is not None else 0, L.table,
                                                L.n_entries, L.always, L.max_ffn, mscr, pack.moe_floats, st),
                       "decode_layers", f"layer {i} experts")
            # x, delta and ids lie together at the start of the scratch: one copy back.
            io = self._hostbuf("layers_io", pack.io_bytes)[:pack.io_bytes]
            _check(lib.lite_cuda_memcpy_d2h_async(ffi.from_buffer(io), sc.ptr, pack.io_bytes, st), "decode_layers")
            for i, pair in enumerate(dev):
                for (m, off), a, width in zip(pair, views[i], (c, r)):
                    row = a[start]
                    src = m.buf.typed("void *", off + start * width * 4)
                    _check(lib.lite_cuda_memcpy_d2h_async(ffi.from_buffer(row), src, row.nbytes, st), "decode_layers",
                           "cache write-back")
            self._stream.sync()
            for pair in dev:
                for m, off in pair:
                    m.synced[off] = start + 1
        f32 = io[:pack.off["ids"]].view(np.float32)
        x[0] = f32[:dm]
        delta = f32[pack.off["delta"] // 4:pack.off["delta"] // 4 + dm].reshape(1, dm).copy()
        got_ids = io[pack.off["ids"]:pack.off["ids"] + n_layer * kk * 4].view(np.int32).reshape(n_layer, kk).copy()
        return delta, got_ids

    # ---- MoE -------------------------------------------------------------------------------------------
    def _cpu_backend(self):
        if self._cpu is None:
            from ..errors import LiteError
            from . import get_backend
            for name in ("c", "numba", "reference"):
                try:
                    self._cpu = get_backend(name)
                    break
                except LiteError:
                    continue
        return self._cpu

    def _measure_h2d(self) -> float:
        if self.stats.h2d_gbs is None:
            host = np.ones(_Staging.MIN_SLOT, np.uint8)
            with DeviceBuffer(host.nbytes) as b:     # the way misses are copied: through the staging
                self._staging.upload(b.ptr, host, self._copy)
                self._copy.sync()
                t0 = time.perf_counter()
                for _ in range(8):
                    self._staging.upload(b.ptr, host, self._copy)
                self._copy.sync()
                self.stats.h2d_gbs = 8 * host.nbytes / (time.perf_counter() - t0) / 1e9
        return self.stats.h2d_gbs

    def _on_cpu(self, ffn: FFNWeights, n_tok: int) -> bool:
        """Whether a missing routed expert is better computed on the CPU (see the module doc)."""
        if self.miss_policy == "copy":
            return False
        keys = [self._key(w) for w in (ffn.gate, ffn.up, ffn.down)]
        if all(k is not None and k in self._cache for k in keys):
            return False                    # resident: the GPU wins
        if self.miss_policy == "cpu":
            return True
        spb = self.stats.cpu_s_per_byte
        if spb is None:
            return True                     # measure the CPU once
        nbytes = sum(w.data.nbytes for w in (ffn.gate, ffn.up, ffn.down))
        copy_s = nbytes / (self._measure_h2d() * 1e9)
        return nbytes * spb * max(1.0, n_tok / 8) < copy_s

    def moe(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            experts: Mapping[int, FFNWeights], shared: FFNWeights | None) -> np.ndarray:
        x = check_f32("moe input", x, 2)
        t, d = x.shape
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise BackendError(f"moe: ids must be an integer array [T, K], got "
                               f"{getattr(ids, 'dtype', type(ids).__name__)} {getattr(ids, 'shape', '')}")
        weights = check_f32("moe weights", weights, 2)
        if ids.shape != weights.shape or ids.shape[0] != t:
            raise BackendError(f"moe: ids {ids.shape} / weights {weights.shape} do not fit input {x.shape}")
        if t > MAX_TOKENS:
            raise BackendError(f"moe: {t} tokens exceed the kernel's limit {MAX_TOKENS}")
        k = ids.shape[1]
        uniq, inv = np.unique(ids, return_inverse=True)
        inv = inv.reshape(t, k).astype(np.int32)
        table: list[FFNWeights] = []
        labels: list[str] = []
        for e in uniq.tolist():
            f = experts.get(int(e)) if hasattr(experts, "get") else None
            if f is None:
                raise BackendError(f"moe: expert {int(e)} was routed to but not supplied")
            table.append(f)
            labels.append(f"expert {int(e)}")
        n_routed = len(table)
        if shared is not None:
            table.append(shared)
            labels.append("shared")
        specs = []
        for f, label in zip(table, labels):
            if not isinstance(f, FFNWeights):
                raise BackendError(f"moe: {label} must be FFNWeights, got {type(f).__name__}")
            width = f.gate.shape[0] if isinstance(f.gate, QTensor) and len(f.gate.shape) == 2 else None
            specs += [(f"moe {label} gate", f.gate, None, d), (f"moe {label} up", f.up, width, d),
                      (f"moe {label} down", f.down, d, width)]
        for op, w, r, c in specs:
            check_weight(op, w, r, c)
        out = np.zeros((t, d), np.float32)
        if t == 0 or not table:
            return out
        with self._lock:
            try:
                # Routed experts missing from the GPU cache may run on the CPU (miss_policy).
                counts = np.bincount(inv.reshape(-1), minlength=n_routed)
                on_cpu = [i for i in range(n_routed) if self._on_cpu(table[i], int(counts[i]))]
                on_gpu = [i for i in range(len(table)) if i not in set(on_cpu)]
                dout = None
                if on_gpu:
                    plan = self._plan("moe", [(w, r, c) for i in on_gpu for _, w, r, c in specs[3 * i:3 * i + 3]])
                    remap = np.full(len(table), -1, np.int32)
                    remap[on_gpu] = np.arange(len(on_gpu), dtype=np.int32)
                    sh = int(remap[n_routed]) if shared is not None else -1
                    dout = self._moe_gpu(x, remap[inv], weights, [table[i] for i in on_gpu], sh, plan)
                if on_cpu:
                    self._moe_cpu(out, x, inv, weights, table, on_cpu, uniq)
                if dout is not None:
                    if on_cpu:
                        out += self._get(dout, np.empty((t, d), np.float32))
                    else:
                        self._get(dout, out)
            finally:
                self._end_call()
        return out

    def _moe_gpu(self, x: np.ndarray, slots: np.ndarray, weights: np.ndarray, entries: list[FFNWeights],
                 shared: int, plan: _Plan) -> DeviceBuffer:
        """Queue the fused expert FFN for the entries that run here; slots -1 are skipped."""
        t, d = x.shape
        k, n = slots.shape[1], len(entries)
        widths = np.array([f.gate.shape[0] for f in entries], np.int64)
        types = np.array([int(q.qtype) for f in entries for q in (f.gate, f.up, f.down)], np.int32)
        nbytes = np.array([q.data.nbytes for f in entries for q in (f.gate, f.up, f.down)], np.int64)
        ffi = self.ffi
        gp = ffi.new("const uint8_t *[]", plan.ptrs[0::3])
        up = ffi.new("const uint8_t *[]", plan.ptrs[1::3])
        dp = ffi.new("const uint8_t *[]", plan.ptrs[2::3])
        db, hb = ffi.new("int64_t *"), ffi.new("int64_t *")
        _check(self.lib.lite_cuda_moe_scratch_bytes(db, hb, t, d, k, int(widths.max()), n), "moe", "scratch size")
        dscr, hscr = self._buf("moe_scratch", int(db[0])), self._hostbuf("moe", int(hb[0]))
        dx, dout = self._put("x", x), self._buf("moe_out", t * d * 4)
        slots = np.ascontiguousarray(slots, np.int32)
        rc = self.lib.lite_cuda_moe(dout.typed(), t * d, dx.typed(), t, d, ffi.from_buffer("int32_t[]", slots),
                                    ffi.from_buffer("float[]", weights) if k else ffi.NULL, k, n, gp, up, dp,
                                    ffi.from_buffer("int32_t[]", types), ffi.from_buffer("int64_t[]", nbytes),
                                    ffi.from_buffer("int64_t[]", widths), shared, dscr.typed("uint8_t *"),
                                    dscr.nbytes, ffi.from_buffer("uint8_t[]", hscr), hscr.nbytes,
                                    self._stream.handle)
        _check(rc, "moe", f"T={t} D={d} K={k} experts={n}")
        return dout

    def _moe_cpu(self, out: np.ndarray, x: np.ndarray, inv: np.ndarray, weights: np.ndarray,
                 table: list[FFNWeights], on_cpu: list[int], uniq: np.ndarray) -> None:
        """Missing routed experts on the CPU backend while the GPU works on the rest; with
        miss_policy auto each is also copied into the GPU cache (copy stream) for next time."""
        cpu = self._cpu_backend()
        rows, slots = np.nonzero(np.isin(inv, on_cpu))
        sub = {int(uniq[i]): table[i] for i in on_cpu}
        nbytes = sum(q.data.nbytes for i in on_cpu for q in (table[i].gate, table[i].up, table[i].down))
        t0 = time.perf_counter()
        y = cpu.moe(np.ascontiguousarray(x[rows]), uniq[inv[rows, slots]][:, None].astype(np.int32),
                    np.ascontiguousarray(weights[rows, slots][:, None]), sub, None)
        dt = time.perf_counter() - t0
        np.add.at(out, rows, y)
        spb = dt / (nbytes * max(1.0, len(rows) / len(on_cpu) / 8))
        old = self.stats.cpu_s_per_byte
        self.stats.cpu_s_per_byte = spb if old is None else 0.8 * old + 0.2 * spb
        self.stats.cpu_experts += len(on_cpu)
        if self.miss_policy == "auto":
            for i in on_cpu:
                for q in (table[i].gate, table[i].up, table[i].down):
                    key = self._key(q)
                    if key is not None and key not in self._cache:
                        e = self._admit(key, q, True, self._copy)
                        if e is None:
                            return
                        self._mark_copy(e)

    def prefetch(self, experts: Mapping[int, FFNWeights]) -> None:
        """Start copying routed experts into the GPU cache on the copy stream (a hint: experts
        that do not fit the budget are skipped)."""
        with self._lock:
            for f in experts.values():
                for q in (f.gate, f.up, f.down):
                    check_weight("prefetch", q, None, None)
                    key = self._key(q)
                    if key is not None and self._lookup(key, q) is None:
                        e = self._admit(key, q, bool(_EXPERT_NAME.match(q.name)), self._copy)
                        if e is None:
                            return
                        self._mark_copy(e)


def _flat(w: QTensor) -> QTensor:
    """A per-head weight `[H, N, cols]` as the 2-D `[H*N, cols]` weight it is byte for byte (the
    cache keys it so, whoever asks)."""
    if isinstance(w.data, np.ndarray) and w.data.ndim == 3:
        h, n, cols = w.shape
        return QTensor(w.name, w.qtype, (h * n, cols), w.data.reshape(h * n, -1))
    return w


def _align(n: int) -> int:
    return (n + 255) & ~255


class _LayerPtrs:
    """One layer as decode_layers launches it: device pointers, byte sizes and types of its
    weights, its norms (in the pack's norm buffer) and its expert table (in the pack's table
    buffer)."""

    def __init__(self, be: CudaBackend, i: int, L: DecodeLayer, d: int, dims: tuple, pinned: list,
                 norm_at, table_at) -> None:
        op = f"decode_layers layer {i}"
        h, nn, r, c, v, q = dims
        w = L.attn

        def put(name: str, t: QTensor | None) -> None:
            if t is None:
                setattr(self, name, None)
                return
            t = _flat(t)
            setattr(self, name, be._pin(op, t, pinned))
            setattr(self, f"{name}_bytes", t.data.nbytes)
            setattr(self, f"{name}_type", int(t.qtype))

        for name in ("q", "q_a", "q_b", "kv_a", "k_b", "v_b", "out"):
            put(name, getattr(w, name))
        self.attn_norm = norm_at(check_norm(op, "attention norm", w.norm, d))
        self.q_a_norm = norm_at(check_norm(op, "q_a_norm", w.q_a_norm, q)) if q else None
        self.kv_norm = norm_at(check_norm(op, "kv_a_norm", w.kv_a_norm, c))
        self.ffn_norm = norm_at(check_norm(op, "ffn_norm", L.ffn_norm, d))
        if (L.router is None) != (len(L.experts) == 0) or (L.router is None and L.always is None):
            raise BackendError(f"{op}: needs a router with its experts, or neither and a dense MLP")
        self.n_exp = len(L.experts)
        self.router = None
        if L.router is not None:
            check_weight(op, L.router, self.n_exp, d)
            put("router", L.router)
        entries = [*L.experts, *([L.always] if L.always is not None else [])]
        self.always = len(entries) - 1 if L.always is not None else -1
        self.n_entries = len(entries)
        tab = be.ffi.new("lite_cuda_expert[]", self.n_entries)
        self.max_ffn = 1
        rb = be.ffi.new("int64_t *")
        for j, f in enumerate(entries):
            if not isinstance(f, FFNWeights):
                raise BackendError(f"{op}: expert {j} must be FFNWeights, got {type(f).__name__}")
            width = f.layout(f"{op} expert {j}", d).width
            self.max_ffn = max(self.max_ffn, width)
            for part, (t, cols) in enumerate(((f.gate, d), (f.up, d), (f.down, width))):
                tab[j].w[part] = be._pin(op, t, pinned)
                _check(be.lib.lite_cuda_row_bytes(rb, int(t.qtype), cols), op, f"expert {j}")
                tab[j].row_bytes[part] = rb[0]
                tab[j].type[part] = int(t.qtype)
            tab[j].ffn = width
        self.table = table_at(tab, self.n_entries)


class _CudaLayers:
    """Layers as decode_layers runs them: every weight held in the GPU cache, the norms in one
    device buffer, the expert tables (lite_cuda_expert) in another, and the scratch layout."""

    def __init__(self, be: CudaBackend, layers: "list[DecodeLayer]", d: int, k: int, pinned: list) -> None:
        op = "decode_layers"
        self.owner, self.d, self.k = be, d, k
        dims = None
        for i, L in enumerate(layers):
            got = mla_dims(f"{op} layer {i}", L.attn, d)
            if dims not in (None, got):
                raise BackendError(f"{op}: layer {i} attention dims {got} differ from layer 0's {dims}")
            dims = got
        h, nn, r, c, v, q = self.dims = dims
        if c + r > MLA_MAX_C:
            raise BackendError(f"{op}: latent + rope size {c + r} exceeds the kernel's limit {MLA_MAX_C}")
        self.hq = h * (nn + r)
        if (nn + r) % 4 and any(int(L.attn.k_b.qtype) not in _FLOAT_TYPES for L in layers):
            # the quantized matvec reads each head's query as float4s
            raise BackendError(f"{op}: a quantized k_b needs N + R = {nn + r} to be a multiple of 4")
        norms: list[np.ndarray] = []
        norm_offsets: list[int] = []
        tables: list[bytes] = []
        table_offsets: list[int] = []
        size = be.ffi.sizeof("lite_cuda_expert")

        def norm_at(a: np.ndarray):
            norm_offsets.append(sum(len(n) for n in norms))
            norms.append(a)
            return len(norm_offsets) - 1           # an index until the buffer exists

        def table_at(tab, n: int):
            table_offsets.append(sum(len(t) for t in tables))
            tables.append(bytes(be.ffi.buffer(tab, n * size)))
            return len(table_offsets) - 1

        self.layers = [_LayerPtrs(be, i, L, d, dims, pinned, norm_at, table_at) for i, L in enumerate(layers)]
        self.n_exps = sorted({p.n_exp for p in self.layers if p.router is not None}) or [max(k, 1)]
        self._norms = DeviceBuffer(4 * sum(len(n) for n in norms))
        self._norms.upload(np.concatenate(norms), be._stream.handle)
        self._tables = DeviceBuffer(max(1, sum(len(t) for t in tables)))
        self._tables.upload(np.frombuffer(b"".join(tables), np.uint8), be._stream.handle)
        for p in self.layers:
            for name in ("attn_norm", "q_a_norm", "kv_norm", "ffn_norm"):
                idx = getattr(p, name)
                if idx is not None:
                    setattr(p, name, self._norms.typed("float *", 4 * norm_offsets[idx]))
            p.table = self._tables.typed("lite_cuda_expert *", table_offsets[p.table])
        # Scratch: x, delta and ids first (copied back together), then the per-layer temporaries.
        n_layer = len(layers)
        e_max = max(self.n_exps)
        max_ffn = max(p.max_ffn for p in self.layers)
        self.moe_floats = (k + 1) * ((max_ffn + 31) // 32 * 32)
        nf = be.ffi.new("int64_t *")
        _check(be.lib.lite_cuda_mla_scratch_floats(nf, 1, h, c, 1 << 40), op, "scratch size")
        self.mla_floats = int(nf[0])
        sizes = [("x", 4 * d), ("delta", 4 * d), ("ids", 4 * max(1, n_layer * k)), ("h", 4 * d), ("a", 4 * d),
                 ("qa", 4 * max(q, 1)), ("q", 4 * self.hq), ("kv", 4 * (c + r)), ("qpe", 4 * h * r),
                 ("qlat", 4 * h * c), ("olat", 4 * h * c), ("o", 4 * h * v), ("logits", 4 * e_max),
                 ("probs", 4 * e_max), ("wts", 4 * max(k, 1)), ("cs", 4 * r), ("moe", 4 * self.moe_floats),
                 ("mla", 4 * max(self.mla_floats, 1))]
        self.off: dict[str, int] = {}
        at = 0
        for name, n in sizes:
            self.off[name] = at
            at += _align(n)
            if name == "ids":
                self.io_bytes = self.off["ids"] + 4 * max(1, n_layer * k)
        self.scratch_bytes = at
