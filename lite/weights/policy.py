"""Eviction policies for the expert cache, usable online (by the pager) and offline (on recorded
routing traces, with Belady's optimal as the upper bound).

Keys are (layer, expert) pairs. A policy sees `touch(key)` for every key of a request before any
slot is taken for it (so it knows which layer is being computed when it picks victims),
`victims(candidates, n)` when slots are needed, `forget(key)` when a key leaves the cache, and
`expect(key, chance)` when a prefetch brought `key` in on a guess that is right with probability
`chance`, and `hint(layer, ids)` with every such guess (the model's prediction of the experts
that `layer`'s next visit will use), whether or not it is prefetched.
`prefetch_victims(candidates, n, chance)` says which keys a guess may displace: a wrong guess
costs a wasted read and possibly a later miss, so a guess must be worth more than what it
displaces.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np

Key = tuple[int, int]


class Policy(Protocol):
    name: str

    def touch(self, key: Key) -> None: ...

    def forget(self, key: Key) -> None: ...

    def victims(self, candidates: Sequence[Key], n: int) -> list[Key]:
        """The n candidates to evict (n <= len(candidates)), first choice first."""
        ...

    def expect(self, key: Key, chance: float) -> None: ...

    def hint(self, layer: int, ids: Sequence[int]) -> None: ...

    def prefetch_victims(self, candidates: Sequence[Key], n: int, chance: float) -> list[Key]:
        """Up to n candidates that a guess right with probability `chance` may displace."""
        ...


class LRU:
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: Key) -> None:
        self._order.pop(key, None)

    def victims(self, candidates: Sequence[Key], n: int) -> list[Key]:
        cand = set(candidates)
        out = []
        for key in self._order:          # oldest first
            if len(out) == n:
                return out
            if key in cand:
                out.append(key)
        return out + [k for k in candidates if k not in self._order][:n - len(out)]

    def expect(self, key: Key, chance: float) -> None:
        self.touch(key)                  # else the prefetched key is the oldest, the first evicted

    def hint(self, layer: int, ids: Sequence[int]) -> None:
        pass                             # recency has no use for a prediction

    def prefetch_victims(self, candidates: Sequence[Key], n: int, chance: float) -> list[Key]:
        # Recency cannot say how likely a key is to be used, so no guess may displace one: in a
        # cycle of layers the oldest key belongs to the layer computed next.
        return []


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

    def victims(self, candidates: Sequence[Key], n: int) -> list[Key]:
        return heapq.nsmallest(n, candidates, key=lambda k: (self._count.get(k, 0.0), self._last.get(k, 0)))

    def expect(self, key: Key, chance: float) -> None:
        self._last[key] = self._clock

    def hint(self, layer: int, ids: Sequence[int]) -> None:
        pass                             # counts have no use for a prediction

    def prefetch_victims(self, candidates: Sequence[Key], n: int, chance: float) -> list[Key]:
        return []                        # counts are not probabilities: see LRU


class LayerCycle:
    """Decode visits the MoE layers in a fixed cycle, so a cached key of layer l gets its next
    chance of a hit when l comes round again, `ahead(l) + 1` layer-steps from now. Keeping it
    until then costs that many slot-steps for a hit with probability p; evict the keys with the
    least p per slot-step (p / (ahead + 1)). LRU does the opposite: it keeps the layer just
    computed, whose experts are needed last.

    p is learned online, pooled over all layers: the rate at which keys are used at the
    `a`-th visit of their layer since their last use, for each age a (recency: a key just used
    is often used again) and each class of long-run frequency (an exponential average of the
    key's use per visit of its layer; some experts are simply popular). Counts are halved every
    `period` touches so the estimate follows a change of text.

    Two learned tables sharpen p where routing leaves more to go on (both per layer, E x E, so
    they scale to Lite's 64 experts; both only from visits of at most n_used keys, i.e. decode):
    - what a layer's experts at one visit say of the next: p is averaged with the mean, over the
      experts f used at the layer's last visit, of P(e used | f used at the visit before);
    - the model's guess for the layer computed next (`hint`): until that visit, p of its keys is
      the mean, over the guessed experts g, of P(e used | g guessed). That is a better estimate
      than the guess's raw accuracy (a guessed expert is often used, an unguessed one rarely; a
      poor guesser's picks still say something), and it tells which cached keys of the next
      layer to keep just before they are needed. A prefetched guess counts with at least the
      guess's chance until its layer's next visit.

    Per-key state lives in arrays indexed by layer position · E + expert, so that scoring the
    ~800 candidates of a Lite-sized cache is one vectorised pass, not 800 Python calls.
    """

    name = "cycle"
    AGES = 16            # ages 1..AGES are told apart; older ones share one class
    CLASSES = 6          # frequency classes: below 1/8, 1/4, 1/2, 1, 2 times the mean, and above

    def __init__(self, layers: Sequence[int], n_expert: int, n_used: int, memory: float = 0.97,
                 period: int = 8192) -> None:
        """layers: the MoE layers in the order decode visits them; each has n_expert experts,
        n_used of which each token uses."""
        self._pos = {layer: i for i, layer in enumerate(layers)}
        self._n, self._E = max(1, len(layers)), n_expert
        self.mean_use = n_used / n_expert               # the prior for a key never used
        self.memory, self.period = memory, period
        size = self._n * n_expert
        self._visits = np.zeros(self._n, np.int64)
        self._current = -1                              # position of the layer being computed
        self._freq = np.zeros(size)                     # exponential average at the last use
        self._last = np.full(size, -1, np.int64)        # visit of its layer at the last use
        self._class = np.zeros(size, np.int64)
        self._expected = np.zeros(size)                 # a guess's chance, until its layer's visit
        self._expecting: set[int] = set()
        # _uses[c, a]: reuses at age a (a = AGES + 1: older) by keys of frequency class c;
        # _tail_tries[c]: visits spent at those older ages, for their hazard.
        self._uses = np.zeros((self.CLASSES, self.AGES + 2))
        self._tail_tries = np.zeros(self.CLASSES)
        self._touches = 0
        self._table: np.ndarray | None = None
        self._table_age = 0                             # reuses counted since the table was built
        self._n_used = n_used
        prior = np.full((self._n, n_expert, n_expert), self.mean_use)
        # _follow[l, f, e] / _follow_n[l, f]: e used at the visit of l after one that used f.
        self._follow, self._follow_n = prior, np.ones((self._n, n_expert))
        # _hit[l, g, e] / _hit_n[l, g]: e used at a visit of l for which g was guessed.
        self._hit, self._hit_n = prior.copy(), np.ones((self._n, n_expert))
        self._visit_keys: list[int] = []                # experts used so far at the current visit
        self._prev: list[list[int]] = [[] for _ in range(self._n)]    # per layer: its last visit's
        self._guess: list[list[int]] = [[] for _ in range(self._n)]   # ... and its pending guess
        self._after = np.zeros((self._n, n_expert))     # per layer: P(e | its last visit), by _follow
        self._has_after = np.zeros(self._n, bool)
        self._guessed = np.zeros((self._n, n_expert))   # per layer: P(e | pending guess), by _hit
        self._has_guess = np.zeros(self._n, bool)
        # Rows of _after / _guessed not yet worked out (layer position -> the experts they come
        # from), until a score reads them: most visits of a pool that holds what it needs evict
        # nothing. The counts they come from keep their ratios until then (the layer's own next
        # visit, which replaces the row, is the only update besides halving both), so the rows
        # are the bits an eager update gives.
        self._after_due: dict[int, list[int]] = {}
        self._guess_due: dict[int, list[int]] = {}
        # Visits whose counts (_follow, _hit) are not yet added, in order: (pos, previous
        # visit's experts, guessed experts, used experts). Added in bulk before anything reads
        # or halves the counts, or every 64 visits.
        self._uncounted: list[tuple[int, list[int], list[int], list[int]]] = []

    def _id(self, key: Key) -> int:
        return self._pos[key[0]] * self._E + key[1]

    def touch(self, key: Key) -> None:
        pos, i = self._pos[key[0]], self._id(key)
        if pos != self._current:
            if self._current >= 0:
                self._end_visit(self._current)
            self._visits[pos] += 1
            self._current = pos
            self._has_guess[pos] = False                # the guess was for this visit, not the next
            self._guess_due.pop(pos, None)
            settled = [j for j in self._expecting if j // self._E == pos]   # this visit settles them
            self._expected[settled] = 0.0
            self._expecting.difference_update(settled)
        if key[1] not in self._visit_keys:
            self._visit_keys.append(key[1])
        self._expected[i] = 0.0
        self._expecting.discard(i)
        now = int(self._visits[pos])
        last = int(self._last[i])
        if last < 0:
            freq = self.mean_use * self.memory ** now
        else:
            age = now - last
            if age < 1:
                return                                  # touched twice in one visit
            c = int(self._class[i])
            if age > self.AGES:
                self._uses[c, self.AGES + 1] += 1.0
                self._tail_tries[c] += age - self.AGES
            else:
                self._uses[c, age] += 1.0
            self._table_age += 1
            freq = float(self._freq[i]) * self.memory ** age
        freq += 1.0 - self.memory
        self._freq[i], self._last[i] = freq, now
        ratio, c = freq / self.mean_use, 0
        while c < self.CLASSES - 1 and ratio >= 0.125 * 2 ** c:
            c += 1
        self._class[i] = c
        self._touches += 1
        if self._touches % self.period == 0:
            self._count()
            for counts in (self._uses, self._tail_tries, self._follow, self._follow_n, self._hit, self._hit_n):
                counts *= 0.5

    def _end_visit(self, pos: int) -> None:
        """Learn from the visit of layer position `pos` that just ended: which experts followed its
        previous visit's, and which followed its guess."""
        used, prev, guess = self._visit_keys, self._prev[pos], self._guess[pos]
        self._visit_keys, self._guess[pos] = [], []
        self._has_guess[pos] = False
        self._guess_due.pop(pos, None)
        if len(used) > self._n_used:                   # a prefill chunk: not a decode step
            self._prev[pos] = []
            self._has_after[pos] = False
            self._after_due.pop(pos, None)
            return
        self._uncounted.append((pos, prev, list(dict.fromkeys(guess)), used))
        if len(self._uncounted) >= 64:
            self._count()
        self._prev[pos] = used
        self._after_due[pos] = used
        self._has_after[pos] = True

    def _follows(self, pos: int, used: Sequence[int]) -> np.ndarray:
        return (self._follow[pos, used] / self._follow_n[pos, used, None]).mean(axis=0)

    def hint(self, layer: int, ids: Sequence[int]) -> None:
        pos = self._pos[layer]
        ids = [int(e) for e in ids]
        if pos == self._current or not ids or len(ids) > self._n_used:
            return                                      # (a prefill's guess covers many tokens)
        self._guess[pos] = ids
        self._guess_due[pos] = ids
        self._has_guess[pos] = True

    def _hazards(self) -> np.ndarray:
        """[class, age] → chance of use at that visit, given no use since: uses at that age over
        uses at that age or later, with the prior as one pseudo-observation."""
        # Rebuilt only every 64 reuses: one more count barely moves it, and victims are chosen
        # many times per token.
        if self._table is None or self._table_age >= 64:
            self._table_age = 0
            u = self._uses
            later = np.cumsum(u[:, ::-1], axis=1)[:, ::-1]        # uses at that age or older
            table = (u + self.mean_use) / (later + 1.0)
            table[:, self.AGES + 1] = (u[:, self.AGES + 1] + self.mean_use) / \
                (self._tail_tries + u[:, self.AGES + 1] + 1.0)
            self._table = table
        return self._table

    def _count(self) -> None:
        """Add the counts of the visits in _uncounted: 1 to _follow[pos, f, e] for each f of the
        visit before and each e used, and to _follow_n[pos, f]; _hit and _hit_n likewise for each
        guessed g. np.add.at adds repeated indices one by one in order, as the visits one at a
        time did (a guess's repeats count once, as its fancy-indexed += did)."""
        for k, counts, totals in ((1, self._follow, self._follow_n), (2, self._hit, self._hit_n)):
            p: list[int] = []
            f: list[int] = []
            e: list[int] = []
            tp: list[int] = []
            tf: list[int] = []
            for visit in self._uncounted:
                pos, used = visit[0], visit[3]
                for g in visit[k]:                      # the visit before's experts, or the guess
                    p += [pos] * len(used)
                    f += [g] * len(used)
                    e += used
                    tp.append(pos)
                    tf.append(g)
            if p:
                np.add.at(counts, (p, f, e), 1.0)
            if tp:
                np.add.at(totals, (tp, tf), 1.0)
        self._uncounted = []

    def _work_out(self) -> None:
        """The rows of _after and _guessed still due."""
        self._count()
        for q, used in self._after_due.items():
            self._after[q] = self._follows(q, used)
        for q, ids in self._guess_due.items():
            self._guessed[q] = (self._hit[q, ids] / self._hit_n[q, ids, None]).mean(axis=0)
        self._after_due.clear()
        self._guess_due.clear()

    def _score(self, candidates: Sequence[Key]) -> tuple[np.ndarray, np.ndarray]:
        """(p, p per slot-step) of each candidate."""
        self._work_out()
        pos, E = self._pos, self._E
        ids = np.fromiter((pos[layer] * E + e for layer, e in candidates), np.int64, len(candidates))
        lp = ids // E
        last = self._last[ids]
        age = np.minimum(self._visits[lp] - last + 1, self.AGES + 1)
        p = np.where(last < 0, self.mean_use, self._hazards()[self._class[ids], age])
        e = ids % E
        after = self._after[lp, e]
        has_after = self._has_after[lp]
        if self._current >= 0 and 0 < len(self._visit_keys) <= self._n_used:
            # The current layer's next visit follows this one, not the one before.
            now = lp == self._current
            after = np.where(now, self._follows(self._current, self._visit_keys)[e], after)
            has_after = has_after | now
        p = np.where(has_after, 0.5 * (p + after), p)
        p = np.where(self._has_guess[lp], self._guessed[lp, e], p)
        p = np.maximum(p, self._expected[ids])
        return p, p / ((lp - self._current - 1) % self._n + 1)

    def chance(self, key: Key) -> float:
        """Estimated probability that the next visit of key's layer uses it."""
        return float(self._score([key])[0][0])

    def victims(self, candidates: Sequence[Key], n: int) -> list[Key]:
        density = self._score(candidates)[1]
        return [candidates[i] for i in np.argsort(density, kind="stable")[:n]]

    def forget(self, key: Key) -> None:
        i = self._id(key)                # the key's history stays: it is its frequency
        self._expected[i] = 0.0
        self._expecting.discard(i)

    def expect(self, key: Key, chance: float) -> None:
        i = self._id(key)
        self._expected[i] = max(chance, float(self._expected[i]))
        self._expecting.add(i)

    def prefetch_victims(self, candidates: Sequence[Key], n: int, chance: float) -> list[Key]:
        # Displacing v for a guess right with chance g: right, the read would have come as a miss
        # anyway and its wait is hidden (a read's time saved); wrong, the read is wasted and, with
        # v's chance p, v misses later (1 + p reads' time spent). So it pays if g > (1 - g)(1 + p),
        # which needs g > 1/2; and a guess never displaces a key at least as likely to be used.
        if not candidates:
            return []
        p, density = self._score(candidates)
        ok = np.nonzero((p < chance) & (chance * (2.0 + p) > 1.0 + p))[0]
        return [candidates[i] for i in ok[np.argsort(density[ok], kind="stable")[:n]]]


POLICIES = ("lru", "lfu", "cycle")
DEFAULT_POLICY = "cycle"


def make_policy(name: str, layers: Sequence[int], n_expert: int, n_used: int) -> Policy:
    """A policy by name for a model whose MoE layers are `layers` (in visit order), each with
    n_expert routed experts of which a token uses n_used."""
    from ..errors import LiteError
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFUAging()
    if name == "cycle":
        return LayerCycle(layers, n_expert, n_used)
    raise LiteError(f"unknown expert cache policy {name!r}: choose {', '.join(POLICIES)}")


@dataclass
class Replay:
    """What a cache did over a trace: demand requests, hits among them, and reads (misses plus
    prefetches), of which `prefetch_reads` were prefetches and `prefetch_used` were used."""
    requests: int = 0
    hits: int = 0
    reads: int = 0
    prefetch_reads: int = 0
    prefetch_used: int = 0
    guessed: int = 0                 # requested keys that had a guess ...
    guessed_right: int = 0           # ... which named them

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def reads_per_request(self) -> float:
        return self.reads / self.requests if self.requests else 0.0

    @property
    def prediction_accuracy(self) -> float | None:
        return self.guessed_right / self.guessed if self.guessed else None


class GuessAccuracy:
    """Per layer, the running rate at which next-layer guesses name the experts then used: the
    confidence a prefetch of that layer is given (guesses for the first MoE layer, made from the
    dense layer's output, can be far worse than the rest)."""

    def __init__(self, prior: float = 0.5, memory: float = 0.98) -> None:
        self.prior, self.memory = prior, memory
        self._rate: dict[int, float] = {}

    def __getitem__(self, layer: int) -> float:
        return self._rate.get(layer, self.prior)

    def update(self, layer: int, guess: Iterable[int], used: Sequence[int]) -> None:
        if not used:
            return
        right = len(set(guess) & set(used)) / len(used)
        self._rate[layer] = self.memory * self[layer] + (1.0 - self.memory) * right


def simulate(trace: Sequence[Sequence[Key]], capacity: int, policy: str,
             guesses: Sequence[Sequence[Key]] | None = None, prefetch: bool = True) -> Replay:
    """Replay `trace` (a list of steps, each the keys one layer of one token needs at once; they
    are pinned together, as in the pager) through a cache of `capacity` experts, as the pager
    runs it. `policy` is a name in POLICIES or "belady" (evict the keys whose next use is
    farthest: the optimum without prefetch). With `guesses` (guesses[i]: the keys predicted for
    step i, made just before step i-1 is requested, as decode does) the policy is given each as a
    hint and, if `prefetch`, prefetch is replayed too: reads are instantaneous, and a guess takes
    a free slot or what `prefetch_victims` allows. Without `prefetch` every read is a miss, as
    for Belady, so the two compare fairly."""
    flat = [k for step in trace for k in step]
    next_use: list[int] = [0] * len(flat)
    seen: dict[Key, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        next_use[i] = seen.get(flat[i], 1 << 62)
        seen[flat[i]] = i
    layers = sorted({k[0] for k in flat})
    K = max((len(s) for s in trace), default=1)
    online = None if policy == "belady" else \
        make_policy(policy, layers, max((k[1] for k in flat), default=0) + 1, K)
    accuracy = GuessAccuracy()
    cached: dict[Key, int] = {}          # key → index of its next use (for Belady)
    prefetched: set[Key] = set()
    r = Replay()
    i = 0

    def make_room(keys: list[Key], pinned: set[Key], chance: float | None) -> list[Key]:
        """Evict for `keys` (a demand when chance is None); returns the keys that got room."""
        need = len(cached) + len(keys) - capacity
        if need > 0:
            cands = [k for k in cached if k not in pinned]
            if online is None:
                out = heapq.nlargest(need, cands, key=cached.__getitem__)
            elif chance is None:
                out = online.victims(cands, need)
            else:
                out = online.prefetch_victims(cands, need, chance)
            for k in out:
                if online is not None:
                    online.forget(k)
                del cached[k]
                prefetched.discard(k)
            keys = keys[:len(keys) - need + len(out)]
        return keys

    for s, step in enumerate(trace):
        if online is not None and guesses is not None and s + 1 < len(trace) and guesses[s + 1]:
            chance = accuracy[guesses[s + 1][0][0]]
            online.hint(guesses[s + 1][0][0], [k[1] for k in guesses[s + 1]])
            wanted = [k for k in list(guesses[s + 1])[:K] if k not in cached] if prefetch else []
            for key in make_room(wanted, set(trace[s - 1]) if s else set(), chance):
                cached[key] = 0
                online.expect(key, chance)
                prefetched.add(key)
                r.reads += 1
                r.prefetch_reads += 1
        if guesses is not None and guesses[s]:
            used = [k[1] for k in step]
            accuracy.update(step[0][0], [k[1] for k in guesses[s]], used)
            r.guessed += len(used)
            r.guessed_right += len({k[1] for k in guesses[s]} & set(used))
        if online is not None:
            for key in step:
                online.touch(key)
        missing = [k for k in step if k not in cached]
        make_room(missing, set(step), None)
        for key in step:
            r.requests += 1
            if key in cached:
                r.hits += 1
                r.prefetch_used += key in prefetched
            else:
                r.reads += 1
            prefetched.discard(key)
            cached[key] = next_use[i]
            i += 1
    return r
