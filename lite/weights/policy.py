"""Eviction policies for the expert cache, usable online (by the pager) and offline (on recorded
routing traces, with Belady's optimal as the upper bound).

A policy sees `touch(key)` on every use and picks `victim(candidates)` among evictable keys.
Keys are (layer, expert) pairs.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Hashable, Iterable, Sequence

Key = Hashable


class LRU:
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Iterable[Key]) -> Key:
        cand = set(candidates)
        for key in self._order:          # oldest first
            if key in cand:
                return key
        return next(iter(cand))


class LFUAging:
    """Frequency-aware: evict the least-used key, counts halved every `period` touches so that
    old popularity fades; ties go to the least recently used."""

    name = "lfu"

    def __init__(self, period: int = 4096) -> None:
        self.period = period
        self._count: defaultdict[Key, float] = defaultdict(float)
        self._last: dict[Key, int] = {}
        self._clock = 0

    def touch(self, key: Key) -> None:
        self._clock += 1
        self._count[key] += 1.0
        self._last[key] = self._clock
        if self._clock % self.period == 0:
            for k in self._count:
                self._count[k] *= 0.5

    def forget(self, key: Key) -> None:
        self._last.pop(key, None)       # the count survives eviction: it is the key's history

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self._count.get(k, 0.0), self._last.get(k, 0)))


class LayerCycle:
    """Layer-aware estimate of Belady's choice. Decode visits the MoE layers in a fixed cycle, so
    a key of layer l is next needed `ahead(l)` layer-steps from now if its layer's next token
    picks it, and each later token picks it with probability p ≈ its (aged) frequency among that
    layer's visits. The expected time to its next use is `ahead + n_layers·(1/p − 1)`; evict the
    key for which that is largest. LRU does the opposite on a cycle: it keeps the layer just
    computed, whose experts are needed last."""

    name = "cycle"

    def __init__(self, n_layers: int, period: int = 4096, prior: float = 0.1) -> None:
        self.n_layers = max(1, n_layers)
        self.period, self.prior = period, prior
        self._count: defaultdict[Key, float] = defaultdict(float)
        self._visits: defaultdict[int, float] = defaultdict(float)
        self.current = -1
        self._clock = 0

    def touch(self, key: Key) -> None:
        layer = key[0]  # type: ignore[index]
        if layer != self.current:
            self._visits[layer] += 1.0
            self.current = layer
        self._count[key] += 1.0
        self._clock += 1
        if self._clock % self.period == 0:   # let old popularity fade
            for k in self._count:
                self._count[k] *= 0.5
            for l in self._visits:
                self._visits[l] *= 0.5

    def forget(self, key: Key) -> None:
        pass                                   # counts are the key's history, kept across evictions

    def victim(self, candidates: Iterable[Key]) -> Key:
        def expected_next_use(k: Key) -> float:
            layer = k[0]  # type: ignore[index]
            ahead = (layer - self.current - 1) % self.n_layers
            p = (self._count.get(k, 0.0) + self.prior) / (self._visits.get(layer, 0.0) + 1.0)
            return ahead + self.n_layers * (1.0 / min(p, 1.0) - 1.0)
        return max(candidates, key=expected_next_use)


POLICIES = {"lru": LRU, "lfu": LFUAging, "cycle": LayerCycle}


def make_policy(name: str, n_layers: int = 1) -> LRU | LFUAging:
    from ..errors import LiteError
    if name not in POLICIES:
        raise LiteError(f"unknown expert cache policy {name!r}: choose {', '.join(POLICIES)}")
    return LayerCycle(n_layers) if name == "cycle" else POLICIES[name]()


def simulate(trace: Sequence[Sequence[Key]], capacity: int, policy: str, n_layers: int | None = None) -> float:
    """Hit rate of a cache of `capacity` experts over `trace`: a list of steps, each the keys one
    layer of one token needs at once (they are pinned together, as in the pager). `policy` is
    a name in POLICIES or "belady" (evict the key whose next use is farthest: the optimum)."""
    flat = [k for step in trace for k in step]
    next_use: list[int] = [0] * len(flat)
    seen: dict[Key, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        next_use[i] = seen.get(flat[i], 1 << 62)
        seen[flat[i]] = i
    if n_layers is None:
        n_layers = max(k[0] for k in flat) + 1 if flat else 1   # type: ignore[index]
    online = None if policy == "belady" else make_policy(policy, n_layers)
    cached: dict[Key, int] = {}          # key → index of its next use (for Belady)
    hits = total = 0
    i = 0
    for step in trace:
        pinned = set(step)
        for key in step:
            total += 1
            if key in cached:
                hits += 1
            else:
                if len(cached) >= capacity:
                    cands = [k for k in cached if k not in pinned]
                    if online is not None:
                        out = online.victim(cands)
                        online.forget(out)
                    else:
                        out = max(cands, key=cached.__getitem__)
                    del cached[out]
            cached[key] = next_use[i]
            if online is not None:
                online.touch(key)
            i += 1
    return hits / total if total else 0.0
