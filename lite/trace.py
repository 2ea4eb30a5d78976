"""Routing traces: which experts each token chose in each MoE layer, recorded during a run
(`lite bench --trace FILE`) so eviction policies can be compared offline on real routing.

File format: JSON lines, one object per forward call and layer:
`{"layer": L, "ids": [[e, ...] per token]}` — a token's K experts in routing order.
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

    def hook(self, layer: int, ids: np.ndarray, weights: np.ndarray, probs: np.ndarray) -> None:
        """Install as `model.route_hook`."""
        self.records.append((layer, ids.copy()))

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w") as f:
            for layer, ids in self.records:
                f.write(json.dumps({"layer": layer, "ids": ids.tolist()}) + "\n")

    @staticmethod
    def load(path: str | os.PathLike[str]) -> "RoutingTrace":
        t = RoutingTrace()
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    rec: Any = json.loads(line)
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
