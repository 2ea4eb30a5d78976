"""Choosing the next token from a logits vector `[vocab]`.

Pipeline, in this order: repetition / frequency / presence penalties (over the ids in `history`)
→ temperature → top-k → top-p → min-p → draw. Temperature 0 means greedy: the argmax of the
penalised logits, without touching the random generator. The returned log-probability is always
taken under the plain softmax of the logits as given (what OpenAI-style `logprobs` report), not
under the filtered distribution.

Penalties follow llama.cpp / OpenAI: a seen token's logit is divided by `repetition_penalty` when
positive and multiplied by it otherwise, then `count * frequency_penalty + presence_penalty` is
subtracted. The caller decides how much history to pass (e.g. the last 64 tokens).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lite.errors import LiteError


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults are greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0                    # 0: no limit
    top_p: float = 1.0                # 1.0: off
    min_p: float = 0.0                # 0.0: off
    repetition_penalty: float = 1.0   # 1.0: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None           # None: fresh entropy
    logprobs: bool = False            # whether callers should report log-probabilities

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise LiteError(f"sampling parameter {name} = {v!r} must be a finite number")
            return float(v)

        if number("temperature") < 0:
            raise LiteError(f"sampling parameter temperature = {self.temperature} must be >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise LiteError(f"sampling parameter top_k = {self.top_k!r} must be an integer >= 0")
        if not 0.0 < number("top_p") <= 1.0:
            raise LiteError(f"sampling parameter top_p = {self.top_p} must be in (0, 1]")
        if not 0.0 <= number("min_p") <= 1.0:
            raise LiteError(f"sampling parameter min_p = {self.min_p} must be in [0, 1]")
        if number("repetition_penalty") <= 0:
            raise LiteError(f"sampling parameter repetition_penalty = {self.repetition_penalty} "
                            "must be > 0")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise LiteError(f"sampling parameter {name} = {getattr(self, name)} must be in [-2, 2]")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise LiteError(f"sampling parameter seed = {self.seed!r} must be None or an integer >= 0")
        if not isinstance(self.logprobs, bool):
            raise LiteError(f"sampling parameter logprobs = {self.logprobs!r} must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities `[vocab]` (float64) of a logits vector."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def top_logprobs(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The `n` most likely tokens and their log-probabilities, best first."""
    lp = log_softmax(logits)
    n = max(0, min(int(n), lp.shape[0]))
    if n == 0:
        return []
    idx = np.argpartition(-lp, n - 1)[:n]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]


# How many of the best logits top-p sorts before falling back to sorting the whole vocabulary.
_NUCLEUS_FIRST = 512


class Sampler:
    """Stateful sampler: owns the random generator, so equal seeds give equal token streams."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params if params is not None else SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def reset(self, seed: int | None = None) -> None:
        """Restart the random stream (from `seed`, else from the params' seed)."""
        self.rng = np.random.default_rng(self.params.seed if seed is None else seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[int, float]:
        """Pick one token; returns (token id, its log-probability under softmax(logits))."""
        p = self.params
        raw = np.asarray(logits)
        if raw.ndim != 1 or raw.shape[0] == 0:
            raise LiteError(f"sampler expects logits of shape [vocab], got {raw.shape}")
        if raw.dtype not in (np.float32, np.float64):
            raw = raw.astype(np.float32)
        top = raw.max()
        if np.isnan(top):   # max propagates NaN: one pass finds both
            raise LiteError("sampler got NaN logits")

        x = self._apply_penalties(raw, history)
        if p.greedy:
            tok = int(np.argmax(x))
        else:
            tok = self._draw(x / np.float32(p.temperature))
        if not np.isfinite(top):
            return tok, float("-inf") if top < 0 else 0.0
        lse = float(top) + math.log(float(np.sum(np.exp(raw - top), dtype=np.float64)))
        return tok, float(raw[tok]) - lse

    def _apply_penalties(self, raw: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Penalised copy of the logits (or `raw` itself when no penalty applies)."""
        p = self.params
        if len(history) == 0 or (p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0
                                 and p.presence_penalty == 0.0):
            return raw
        vocab = raw.shape[0]
        ids, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)
        if ids[0] < 0 or ids[-1] >= vocab:
            raise LiteError(f"sampler history holds token ids outside [0, {vocab})")
        x = raw.copy()
        seen = x[ids].astype(np.float64)
        if p.repetition_penalty != 1.0:
            seen = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        seen = seen - counts * p.frequency_penalty - p.presence_penalty
        x[ids] = seen
        return x

    def _draw(self, x: np.ndarray) -> int:
        p = self.params
        cand = np.arange(x.shape[0])
        vals = x
        finite = np.isfinite(vals)
        if not finite.all():
            cand, vals = cand[finite], vals[finite]
            if cand.size == 0:
                raise LiteError("sampler got logits that are all -inf")

        if 0 < p.top_k < cand.size:
            keep = np.argpartition(-vals, p.top_k - 1)[:p.top_k]
            cand, vals = cand[keep], vals[keep]

        if p.top_p < 1.0 and cand.size > 1:
            order = self._nucleus(vals, p.top_p)
            cand, vals = cand[order], vals[order]

        if p.min_p > 0.0 and cand.size > 1:
            # prob >= min_p * max_prob  <=>  logit >= max_logit + log(min_p)
            keep = vals >= np.max(vals) + math.log(p.min_p)
            cand, vals = cand[keep], vals[keep]

        cum = np.cumsum(np.exp(vals - np.max(vals)), dtype=np.float64)
        i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return int(cand[min(i, cand.size - 1)])

    @staticmethod
    def _nucleus(vals: np.ndarray, top_p: float) -> np.ndarray:
        """Indices (best first) of the smallest prefix whose probability mass reaches top_p; the
        token that crosses the threshold stays in."""
        probs = np.exp(vals - np.max(vals))
        total = float(np.sum(probs, dtype=np.float64))
        # Sorting 100k logits per token is slow; the nucleus nearly always lies in the best few
        # hundred, so sort those first and fall back to a full sort only when they fall short.
        k = min(vals.size, _NUCLEUS_FIRST)
        while True:
            if k < vals.size:
                idx = np.argpartition(-vals, k - 1)[:k]
                idx = idx[np.argsort(-vals[idx], kind="stable")]
            else:
                idx = np.argsort(-vals, kind="stable")
            cum = np.cumsum(probs[idx], dtype=np.float64) / total
            n = int(np.searchsorted(cum, top_p, side="left")) + 1
            if n <= k or k == vals.size:
                return idx[:min(n, k)]
            k = vals.size

