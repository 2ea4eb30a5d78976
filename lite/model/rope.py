"""Rotary embedding tables for the R rope dims, with DeepSeek's YaRN: interpolated inverse
frequencies and the cos/sin multiplier. Tables are `[T, R/2]` float32 for absolute positions."""
from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """`[R/2]` float64 inverse frequencies (YaRN-blended when a scaling factor is set)."""
    r, base = cfg.qk_rope, cfg.rope_theta
    extra = base ** (-np.arange(0, r, 2, dtype=np.float64) / r)
    if cfg.yarn_factor <= 1.0:
        return extra
    inter = extra / cfg.yarn_factor

    def corr(n_rot: float) -> float:
        return r * math.log(cfg.yarn_orig_ctx / (2 * math.pi * n_rot)) / (2 * math.log(base))

    low = max(math.floor(corr(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(corr(cfg.yarn_beta_slow)), r - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(r // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return inter * ramp + extra * (1.0 - ramp)


class RopeTables:
    """cos/sin for positions, computed on demand and cached up to the longest position seen."""

    def __init__(self, cfg: ModelConfig) -> None:
        self._inv = inv_freq(cfg)
        self._mult = cfg.rope_attn_factor
        self._cos = np.zeros((0, cfg.qk_rope // 2), np.float32)
        self._sin = self._cos

    def __call__(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        end = start + count
        if end > len(self._cos):
            n = max(end, 2 * len(self._cos), 256)
            ang = np.arange(n, dtype=np.float64)[:, None] * self._inv[None, :]
            self._cos = (np.cos(ang) * self._mult).astype(np.float32)
            self._sin = (np.sin(ang) * self._mult).astype(np.float32)
        return self._cos[start:end], self._sin[start:end]
