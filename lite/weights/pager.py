"""The expert pager: routed experts live in the GGUF file and are read on demand into a fixed
pool of slots allocated once from the RAM budget, by a background I/O thread pool (pread, with
O_DIRECT where the file's alignment allows, so the page cache neither helps nor hides costs).

One slot holds one expert of one layer: its gate, up and down slices, each contiguous in the
file (3-D expert tensors, `general.alignment` 4096). Slots in use by the chunk being computed
are pinned; everything else is evictable by the chosen policy (victims for all of a request's
misses are chosen at once, after its resident experts are pinned). `prefetch(layer, ids)` starts
reads early: for the next chunk of the layer being computed (a certain need) or for the next
layer's predicted experts (a guess, right with the layer's running accuracy). A guess takes a
free slot or a slot the policy holds to be worth less than it (`Policy.prefetch_victims`), never
one it holds likelier to be needed: in a small cache, wasted reads that evict useful experts
cost more than the prefetch saves. Every guess is also a hint to the policy, which keeps the
cached keys it names. `wants_guess` tells the model when a guess would go unused.
"""
from __future__ import annotations

import mmap
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..errors import LiteError
from ..kernels.base import FFNWeights, QTensor
from ..model.tensors import is_expert_tensor
from .gguf_file import ModelFile
from .policy import DEFAULT_POLICY, GuessAccuracy, make_policy

PAGE = 4096
IDLE_AFTER = 16         # guesses in a row that read nothing before a layer's predictions pause
SAMPLE_EVERY = 16       # ... and the one call in so many that still predicts
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
    prefetch_declined: int = 0      # prefetches not started: no slot was worth giving up for them
    prefetch_hits: int = 0          # used experts that a prefetch had brought in (or was bringing)
    bytes_read: int = 0
    stall_s: float = 0.0            # time the compute thread waited for reads
    predicted: int = 0              # next-layer predictions that were checked ...
    predicted_right: int = 0        # ... and turned out to be used


class ExpertPager:
    """ExpertSource with a RAM budget. Thread-safe for one compute thread plus its I/O threads."""

    def __init__(self, mf: ModelFile, budget: int, policy: str = DEFAULT_POLICY, io_threads: int = 4,
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
        self._evicts = self.n_slots < n_total      # whether the pool can ever be short of a slot
        # Allocated once, never grown; page-aligned because O_DIRECT needs it. numpy owns the
        # memory, so views a backend may still cache stay valid after close().
        raw = np.empty(self.n_slots * self.slot_bytes + PAGE, dtype=np.uint8)
        start = -raw.ctypes.data % PAGE
        self._pool = raw[start:start + self.n_slots * self.slot_bytes]
        self._fd = os.open(mf.path, os.O_RDONLY)
        self._fd_direct = _open_direct(mf.path) if direct else None
        self._policy = make_policy(policy, self.layers, cfg.n_expert, self.K)
        self.policy_name = policy
        self._accuracy = GuessAccuracy()
        self._guess: dict[int, list[int]] = {}     # layer → its pending next-layer guess
        self._layer: int | None = None             # the layer of the last request
        self._idle: dict[int, int] = {}            # layer → its last guesses in a row that read nothing
        self._asked: dict[int, int] = {}           # layer → wants_guess calls
        # Called with every next-layer prediction the model reports (a routing trace records them).
        self.on_prediction: Callable[[np.ndarray], None] | None = None
        self._slot_of: dict[tuple[int, int], int] = {}
        self._key_of: list[tuple[int, int] | None] = [None] * self.n_slots
        self._loading: dict[int, Future] = {}
        self._prefetched: set[tuple[int, int]] = set()
        self._pinned: set[int] = set()
        self._free = list(range(self.n_slots - 1, -1, -1))
        # (layer, expert) -> (slot, its view), at most one entry an expert of the file.
        self._views: dict[tuple[int, int], tuple[int, FFNWeights]] = {}
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
            guess = self._guess.pop(layer, None)
            if guess is not None:
                self._accuracy.update(layer, guess, [e for _, e in keys])
            self._layer = layer
            # Every key first, so that victims are chosen knowing which layer is being computed.
            for key in keys:
                self._policy.touch(key)
            waits: list[Future] = []
            missing: list[tuple[int, int]] = []
            for key in keys:
                slot = self._slot_of.get(key)
                if slot is None:
                    missing.append(key)
                    continue
                # Resident, or on its way because a prefetch asked for it.
                self.stats.hits += 1
                self.stats.prefetch_hits += key in self._prefetched
                self._prefetched.discard(key)
                if slot in self._loading:
                    waits.append(self._loading[slot])
                self._pinned.add(slot)
            missed = list(zip(missing, self._take_slots(len(missing))))
            for key, slot in missed:
                self.stats.misses += 1
                self._prefetched.discard(key)
                self._assign(key, slot)
                self._pinned.add(slot)
            # A miss is waited for at once, so its gate, up and down slices are read in parallel
            # (an O_DIRECT read mostly waits on the device). This thread reads the last slice
            # itself, sparing a thread hand-off.
            parts = [(key, slot, j) for key, slot in missed for j in range(len(PARTS))]
            inline = parts.pop() if parts else None
            reads = [(key, self._io.submit(self._read_part, key, slot, j)) for key, slot, j in parts]
        t0 = time.perf_counter()
        failed: dict[tuple[int, int], BaseException] = {}
        if inline is not None:
            try:
                self._read_part(*inline)
            except BaseException as exc:
                failed[inline[0]] = exc
        for key, fut in reads:
            exc = fut.exception()
            if exc is not None:
                failed.setdefault(key, exc)
        if failed:
            for key in failed:              # never leave a half-read slot looking valid
                self._drop(key)
            raise next(iter(failed.values()))
        for fut in waits:
            exc = fut.exception()
            if exc is not None:
                raise exc
        self.stats.stall_s += time.perf_counter() - t0
        return {e: self._view(layer, e) for _, e in keys}

    def prefetch(self, layer: int, ids: Iterable[int]) -> None:
        """Start reading experts that are not resident: at most K per call, so a wide guess (a
        long prefill) cannot flush what the current layer needs. For the layer being computed
        (its next chunk) the need is certain; for another layer `ids` is a guess."""
        ids = [int(e) for e in ids]
        with self._lock:
            # (A model with a single MoE layer has its guesses taken as certain: no harm to results.)
            certain = layer == self._layer
            if not certain and len(ids) <= self.K:
                self._guess[layer] = ids        # scored when the layer is requested
                self._policy.hint(layer, ids)   # which cached keys to keep, even with no read
            chance = None if certain else self._accuracy[layer]
            wanted = [(layer, e) for e in ids[:self.K] if (layer, e) not in self._slot_of]
            # Prefetches use only the slack beyond one chunk of K: the next demand for K experts
            # must always find slots that are not busy loading a guess.
            wanted = wanted[:max(0, self.n_slots - self.K - len(self._loading))]
            slots = [self._free.pop() for _ in range(min(len(wanted), len(self._free)))]
            if len(slots) < len(wanted):
                cands = self._evictable()
                n = min(len(wanted) - len(slots), len(cands))
                victims = self._policy.victims(cands, n) if chance is None else \
                    self._policy.prefetch_victims(cands, n, chance)
                slots += [self._evict(v) for v in victims]
                self.stats.prefetch_declined += len(wanted) - len(slots)
            for key, slot in zip(wanted, slots):
                self._assign(key, slot)
                self._submit(key, slot)
                self._policy.expect(key, 1.0 if chance is None else chance)
                self._prefetched.add(key)
            self.stats.prefetch_issued += len(slots)
            if not certain:
                self._idle[layer] = 0 if slots else self._idle.get(layer, 0) + 1

    def wants_guess(self, layer: int) -> bool:
        """Whether to predict `layer`'s experts (a router pass one layer early, ~0.15 ms on
        the demo model): always while the pool is full and smaller than the model, since the
        policy then uses the guess to choose victims even when it reads nothing; otherwise not
        while its last guesses started no read (all resident), except at one call in
        SAMPLE_EVERY, which keeps its accuracy and the state of the cache sampled."""
        n = self._asked[layer] = self._asked.get(layer, 0) + 1
        return (self._evicts and not self._free) or self._idle.get(layer, 0) < IDLE_AFTER \
            or n % SAMPLE_EVERY == 0

    def table(self, layer: int) -> None:
        return None     # experts move between slots of the pool

    def note_prediction(self, predicted: Iterable[int], actual: Iterable[int]) -> None:
        p, a = set(int(x) for x in predicted), set(int(x) for x in actual)
        self.stats.predicted += len(a)
        self.stats.predicted_right += len(p & a)
        if self.on_prediction is not None:
            self.on_prediction(np.asarray(sorted(p), dtype=np.int32))

    # -- internals --

    def _evictable(self) -> list[tuple[int, int]]:
        return [k for s, k in enumerate(self._key_of)
                if k is not None and s not in self._pinned and s not in self._loading]

    def _take_slots(self, n: int) -> list[int]:
        """n slots for a demand: free ones, then the policy's victims among the unpinned."""
        slots = [self._free.pop() for _ in range(min(n, len(self._free)))]
        if len(slots) < n:
            cands = self._evictable()
            if len(cands) < n - len(slots):
                raise LiteError("internal: no evictable expert slot (all pinned or loading)")
            slots += [self._evict(v) for v in self._policy.victims(cands, n - len(slots))]
        return slots

    def _evict(self, key: tuple[int, int]) -> int:
        self._policy.forget(key)
        self._prefetched.discard(key)
        slot = self._slot_of.pop(key)
        self._key_of[slot] = None
        return slot

    def _assign(self, key: tuple[int, int], slot: int) -> None:
        self._slot_of[key] = slot
        self._key_of[slot] = key

    def _submit(self, key: tuple[int, int], slot: int) -> Future:
        # One thread reads the slices in turn: a prefetch has a layer's compute to finish in, and
        # three threads' hand-offs cost the compute thread more CPU than they save (measured).
        fut = self._io.submit(self._read_all, key, slot)
        self._loading[slot] = fut
        fut.add_done_callback(lambda f, s=slot: self._done(s, f))
        return fut

    def _read_all(self, key: tuple[int, int], slot: int) -> None:
        for j in range(len(PARTS)):
            self._read_part(key, slot, j)

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

    def _read_part(self, key: tuple[int, int], slot: int, j: int) -> None:
        layer, e = key
        off0, size = self._src[layer][j]
        off = off0 + e * size
        base = slot * self.slot_bytes + self._part_off[j]
        dst = self._pool[base: base + _round(size)]
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
        seen = self._views.get((layer, e))
        if seen is not None and seen[0] == slot:
            # The same slot's memory under the same names: the view, and the layout the MoE
            # validated and cached on it, still hold (new views and checks at every hit cost
            # 5-14 ms of Python a token on the 27-layer Lite file).
            return seen[1]
        base = slot * self.slot_bytes
        out = []
        for j, t in enumerate(self._tensors[layer]):
            size = self._src[layer][j][1]
            raw = self._pool[base + self._part_off[j]: base + self._part_off[j] + size]
            out.append(QTensor(f"{t.name}[{e}]", t.qtype, t.shape[1:], raw.reshape(t.data.shape[1:])))
        view = FFNWeights(*out)
        self._views[(layer, e)] = (slot, view)
        return view

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
