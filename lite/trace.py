"""Routing traces: which experts each token chose in each MoE layer, recorded during a run
(`lite bench --trace FILE`) so eviction policies can be compared offline on real routing; and,
where the model predicted a layer's experts one layer early (next-layer prefetch), what it
predicted, so prefetch can be replayed too.

File format: JSON lines, one object per forward call and layer:
`{"layer": L, "ids": [[e, ...] per token]}` — a token's K experts in routing order — with
`"guess": [e, ...]` added where a prediction was made for that call.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .errors import FormatError


class RoutingTrace:
    def __init__(self) -> None:
        self.records: list[tuple[int, np.ndarray]] = []
        self.guesses: dict[int, np.ndarray] = {}     # record index → experts predicted for it
        self._pending: np.ndarray | None = None

    def hook(self, layer: int, ids: np.ndarray, weights: np.ndarray, probs: np.ndarray) -> None:
        """Install as `model.route_hook`."""
        if self._pending is not None:
            self.guesses[len(self.records)] = self._pending
            self._pending = None
        self.records.append((layer, ids.copy()))

    def guess_hook(self, predicted: np.ndarray) -> None:
        """Install as the pager's `on_prediction`: the model reports a layer's predicted experts
        just before that layer's routing reaches `hook`, which files them with it."""
        self._pending = np.asarray(predicted, dtype=np.int32).copy()

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w") as f:
            for n, (layer, ids) in enumerate(self.records):
                rec: dict[str, Any] = {"layer": layer, "ids": ids.tolist()}
                if n in self.guesses:
                    rec["guess"] = self.guesses[n].tolist()
                f.write(json.dumps(rec) + "\n")

    @staticmethod
    def load(path: str | os.PathLike[str]) -> "RoutingTrace":
        t = RoutingTrace()
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    rec: Any = json.loads(line)
                    if "guess" in rec:
                        t.guesses[len(t.records)] = np.asarray(rec["guess"], dtype=np.int32).reshape(-1)
                    t.records.append((int(rec["layer"]), np.asarray(rec["ids"], dtype=np.int32)))
                except (ValueError, KeyError, TypeError) as e:
                    raise FormatError(f"{path}:{n}: not a routing trace record ({e})") from None
        return t

    def decode_steps(self) -> list[list[tuple[int, int]]]:
        """The trace as cache requests: per token, per layer, the set of (layer, expert) keys
        needed at once — the order in which decode asks the pager. Prefill records (several
        tokens per call) are expanded token by token."""
        steps = []
        for layer, ids in self.records:
            for row in ids:
                steps.append([(layer, int(e)) for e in sorted(set(row.tolist()))])
        return steps

    def decode_guesses(self) -> list[list[tuple[int, int]]]:
        """Aligned with `decode_steps`: the keys predicted for each step (empty where none was,
        and for prefill records, whose one guess covers several tokens)."""
        out = []
        for n, (layer, ids) in enumerate(self.records):
            g = self.guesses.get(n) if len(ids) == 1 else None
            out.append([(layer, int(e)) for e in g.tolist()] if g is not None else [])
            out.extend([] for _ in range(len(ids) - 1))
        return out
