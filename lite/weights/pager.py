"""The expert pager: routed experts live in the GGUF file and are read on demand into a fixed
pool of slots allocated once from the RAM budget, by a background I/O thread pool (pread, with
O_DIRECT where the file's alignment allows, so the page cache neither helps nor hides costs).

One slot holds one expert of one layer: its gate, up and down slices, each contiguous in the
file (3-D expert tensors, `general.alignment` 4096). Slots in use by the chunk being computed
are pinned; everything else is evictable by the chosen policy. `prefetch(layer, ids)` starts
reads early (the model calls it with the next layer's predicted experts).
"""
from __future__ import annotations

import mmap
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..errors import LiteError
from ..kernels.base import FFNWeights, QTensor
from ..model.tensors import is_expert_tensor
from .gguf_file import ModelFile
from .policy import make_policy

PAGE = 4096
PARTS = ("gate", "up", "down")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(value: str | int) -> int:
    """'6GB', '512MiB', '1.5g' or a byte count → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m or m.group(2) is not None and m.group(2).lower() not in _UNITS:
            raise LiteError(f"ram budget {value!r}: expected a size such as 6GB, 512MiB or a byte count")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise LiteError(f"ram budget must be positive, got {value!r}")
    return n


def _fmt(n: int) -> str:
    return (f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB") + f" ({n:,} bytes)"


@dataclass
class PagerStats:
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0          # used experts that a prefetch had brought in (or was bringing)
    bytes_read: int = 0
    stall_s: float = 0.0            # time the compute thread waited for reads
    predicted: int = 0              # next-layer predictions that were checked ...
    predicted_right: int = 0        # ... and turned out to be used


class ExpertPager:
    """ExpertSource with a RAM budget. Thread-safe for one compute thread plus its I/O threads."""

    def __init__(self, mf: ModelFile, budget: int, policy: str = "lru", io_threads: int = 4,
                 direct: bool = True) -> None:
        cfg = mf.config
        self.mf, self.budget, self.K = mf, budget, cfg.n_expert_used
        self.layers = [i for i in range(cfg.n_layer) if cfg.layer_is_moe(i)]
        # Per layer and part: (file offset of expert 0, bytes per expert).
        self._src: dict[int, list[tuple[int, int]]] = {}
        self._tensors: dict[int, list[QTensor]] = {}
        for i in self.layers:
            ts = [mf.tensors[f"blk.{i}.ffn_{p}_exps.weight"] for p in PARTS]
            self._tensors[i] = ts
            self._src[i] = [(mf.data_offsets[t.name], t.nbytes // t.shape[0]) for t in ts]
        part_cap = [max(self._src[i][j][1] for i in self.layers) for j in range(3)]
        self._part_off = [0, _round(part_cap[0]), _round(part_cap[0]) + _round(part_cap[1])]
        self.slot_bytes = self._part_off[2] + _round(part_cap[2])
        self.resident_bytes = sum(t.nbytes for n, t in mf.tensors.items() if not is_expert_tensor(n))
        n_total = len(self.layers) * cfg.n_expert
        minimum = self.resident_bytes + self.K * self.slot_bytes
        if budget < minimum:
            raise LiteError(f"ram budget {_fmt(budget)} is too small for {mf.path.name}: the resident "
                            f"tensors need {_fmt(self.resident_bytes)} and one layer's {self.K} experts "
                            f"{_fmt(self.K * self.slot_bytes)}; the minimum is {_fmt(minimum)}")
        self.n_slots = min(n_total, (budget - self.resident_bytes) // self.slot_bytes)
        # Allocated once, never grown; page-aligned because O_DIRECT needs it. numpy owns the
        # memory, so views a backend may still cache stay valid after close().
        raw = np.empty(self.n_slots * self.slot_bytes + PAGE, dtype=np.uint8)
        start = -raw.ctypes.data % PAGE
        self._pool = raw[start:start + self.n_slots * self.slot_bytes]
        self._fd = os.open(mf.path, os.O_RDONLY)
        self._fd_direct = _open_direct(mf.path) if direct else None
        self._policy = make_policy(policy, cfg.n_layer)
        self.policy_name = policy
        self._slot_of: dict[tuple[int, int], int] = {}
        self._key_of: list[tuple[int, int] | None] = [None] * self.n_slots
        self._loading: dict[int, Future] = {}
        self._prefetched: set[tuple[int, int]] = set()
        self._pinned: set[int] = set()
        self._free = list(range(self.n_slots - 1, -1, -1))
        # Re-entrant: a read that finishes before its done-callback is attached runs the
        # callback at once, in the thread that holds the lock.
        self._lock = threading.RLock()
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="lite-io")
        self.stats = PagerStats()

    # -- ExpertSource --

    def experts(self, layer: int, ids: Iterable[int]) -> dict[int, FFNWeights]:
        """Bring `ids` of `layer` into slots (they stay pinned until the next call) and return
        views of them. Raises LiteError naming the layer and expert if a read fails."""
        keys = [(layer, int(e)) for e in ids]
        if len(keys) > self.n_slots:
            raise LiteError(f"internal: {len(keys)} experts requested at once, pool has {self.n_slots}")
        with self._lock:
            self._pinned = set()
            waits: list[tuple[tuple[int, int], Future]] = []
            for key in keys:
                slot = self._slot_of.get(key)
                prefetched = key in self._prefetched
                self._prefetched.discard(key)
                if slot is None:
                    self.stats.misses += 1
                    slot = self._start_read(key)
                else:    # resident, or on its way because a prefetch asked for it
                    self.stats.hits += 1
                    self.stats.prefetch_hits += prefetched
                self._pinned.add(slot)
                self._policy.touch(key)
                if slot in self._loading:
                    waits.append((key, self._loading[slot]))
        t0 = time.perf_counter()
        for _, fut in waits:
            exc = fut.exception()
            if exc is not None:
                raise exc
        self.stats.stall_s += time.perf_counter() - t0
        return {e: self._view(layer, e) for _, e in keys}

    def prefetch(self, layer: int, ids: Iterable[int]) -> None:
        """Start reading experts that are not resident, using only free or evictable slots; at most
        K per call, so a wide guess (a long prefill) cannot flush what the current layer needs."""
        with self._lock:
            for e in list(ids)[:self.K]:
                key = (layer, int(e))
                if key in self._slot_of:
                    continue
                # Prefetches use only the slack beyond one chunk of K: the next demand for K
                # experts must always find slots that are not busy loading a guess.
                if len(self._loading) >= self.n_slots - self.K or not (self._free or self._evictable()):
                    return
                self._start_read(key)
                self._prefetched.add(key)
                self.stats.prefetch_issued += 1

    def note_prediction(self, predicted: Iterable[int], actual: Iterable[int]) -> None:
        p, a = set(int(x) for x in predicted), set(int(x) for x in actual)
        self.stats.predicted += len(a)
        self.stats.predicted_right += len(p & a)

    # -- internals --

    def _evictable(self) -> list[tuple[int, int]]:
        return [k for s, k in enumerate(self._key_of)
                if k is not None and s not in self._pinned and s not in self._loading]

    def _start_read(self, key: tuple[int, int]) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            cands = self._evictable()
            if not cands:
                raise LiteError("internal: no evictable expert slot (all pinned or loading)")
            victim = self._policy.victim(cands)
            self._policy.forget(victim)
            self._prefetched.discard(victim)
            slot = self._slot_of.pop(victim)
        self._slot_of[key] = slot
        self._key_of[slot] = key
        fut = self._io.submit(self._read, key, slot)
        self._loading[slot] = fut
        fut.add_done_callback(lambda f, s=slot: self._done(s, f))
        return slot

    def _done(self, slot: int, fut: Future) -> None:
        with self._lock:
            if self._loading.get(slot) is fut:
                del self._loading[slot]
                if fut.exception() is not None:   # never leave a half-read slot looking valid
                    key = self._key_of[slot]
                    if key is not None:
                        self._drop(key)

    def _drop(self, key: tuple[int, int]) -> None:
        with self._lock:
            slot = self._slot_of.pop(key, None)
            if slot is not None:
                self._key_of[slot] = None
                self._free.append(slot)
                self._policy.forget(key)

    def _read(self, key: tuple[int, int], slot: int) -> None:
        layer, e = key
        base = slot * self.slot_bytes
        for j, (off0, size) in enumerate(self._src[layer]):
            off = off0 + e * size
            dst = self._pool[base + self._part_off[j]: base + self._part_off[j] + _round(size)]
            direct = self._fd_direct is not None and off % PAGE == 0
            fd = self._fd_direct if direct else self._fd
            want = _round(size) if direct else size
            try:
                got = os.preadv(fd, [memoryview(dst[:want])], off)
            except OSError as err:
                raise LiteError(f"{self.mf.path}: reading expert {e} of layer {layer} ({PARTS[j]}) "
                                f"failed: {err.strerror}") from None
            if got < size:
                raise LiteError(f"{self.mf.path}: expert {e} of layer {layer} ({PARTS[j]}) is cut short "
                                f"({got} of {size} bytes at offset {off}): the file was truncated or "
                                f"replaced while open")
            with self._lock:
                self.stats.bytes_read += size

    def _view(self, layer: int, e: int) -> FFNWeights:
        slot = self._slot_of[(layer, e)]
        base = slot * self.slot_bytes
        out = []
        for j, t in enumerate(self._tensors[layer]):
            size = self._src[layer][j][1]
            raw = self._pool[base + self._part_off[j]: base + self._part_off[j] + size]
            out.append(QTensor(f"{t.name}[{e}]", t.qtype, t.shape[1:], raw.reshape(t.data.shape[1:])))
        return FFNWeights(*out)

    @property
    def pool_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def close(self) -> None:
        self._io.shutdown(wait=True)
        for fd in (self._fd, self._fd_direct):
            if fd is not None:
                os.close(fd)
        self._slot_of.clear()
        self._fd = self._fd_direct = None
        self._pool = np.zeros(0, np.uint8)


def _round(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _open_direct(path) -> int | None:
    """An O_DIRECT descriptor, or None where the file system refuses it (tmpfs, some overlays)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None
    buf = mmap.mmap(-1, PAGE)
    try:
        os.preadv(fd, [buf], 0)
    except OSError:
        os.close(fd)
        return None
    finally:
        buf.close()
    return fd
