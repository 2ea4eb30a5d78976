"""The numpy reference backend: slow, obvious float32 code that defines what every op means.
Fast backends are tested against it. Weights are dequantized to float32 on every call."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import BackendError
from . import composed
from .base import FFNWeights, QTensor, check_f32, check_mla, check_rmsnorm, check_rope
from .dequant import dequantize


def dense(w: QTensor) -> np.ndarray:
    """A weight as float32 `[N, cols]` (or `[E, N, cols]`)."""
    return dequantize(w.data, w.qtype)


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):   # e^-x = inf below x = -88 gives the right limit, -0
        return x / (np.float32(1.0) + np.exp(-x))


class ReferenceBackend:
    name = "reference"
    moe_slot_order = True

    def matmul(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        x = check_f32("matmul input", x, 2)
        if len(w.shape) != 2 or x.shape[1] != w.shape[1]:
            raise BackendError(f"matmul: input [T, {x.shape[1]}] does not fit weight {w.name} {w.shape}")
        return x @ dense(w).T

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        x, w = check_rmsnorm(x, w, eps)
        var = np.mean(x * x, axis=1, keepdims=True, dtype=np.float32)
        return w * (x / np.sqrt(var + np.float32(eps)))

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        x, cos, sin = check_rope(x, cos, sin)
        even, odd = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2] = even * c - odd * s
        out[..., 1::2] = even * s + odd * c
        return out

    def softmax(self, x: np.ndarray) -> np.ndarray:
        x = check_f32("softmax input", x, 2)
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        if g.shape != u.shape:
            raise BackendError(f"silu_mul: shapes {g.shape} and {u.shape} differ")
        return silu(g) * u

    def mla_attention(self, q_lat: np.ndarray, q_pe: np.ndarray, ckv: np.ndarray, kpe: np.ndarray,
                      scale: float, start: int) -> np.ndarray:
        a = check_mla(q_lat, q_pe, ckv, kpe, scale, start)
        q_lat, q_pe, ckv, kpe, start = a.q_lat, a.q_pe, a.ckv, a.kpe, a.start
        t, _, _, _, s = a.dims
        scores = (np.einsum("thc,sc->ths", q_lat, ckv) + np.einsum("thr,sr->ths", q_pe, kpe)) * np.float32(scale)
        future = np.arange(s)[None, :] > (start + np.arange(t))[:, None]
        scores[np.broadcast_to(future[:, None, :], scores.shape)] = -np.inf
        p = np.exp(scores - scores.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        return np.einsum("ths,sc->thc", p, ckv).astype(np.float32)

    def ffn(self, x: np.ndarray, w: FFNWeights) -> np.ndarray:
        return self.matmul(self.silu_mul(self.matmul(x, w.gate), self.matmul(x, w.up)), w.down)

    def moe(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            experts: Mapping[int, FFNWeights], shared: FFNWeights | None) -> np.ndarray:
        x = check_f32("moe input", x, 2)
        if ids.shape != weights.shape or ids.ndim != 2 or ids.shape[0] != x.shape[0]:
            raise BackendError(f"moe: ids {ids.shape} / weights {weights.shape} do not fit input {x.shape}")
        out = self.ffn(x, shared) if shared is not None else np.zeros_like(x)
        # Each expert once over all of its tokens, so that a row's result does not depend on how
        # rows are split between calls (BLAS rounds by the shape it is given) ...
        ys = {}
        for e in np.unique(ids):
            if int(e) not in experts:
                raise BackendError(f"moe: expert {int(e)} was routed to but not supplied")
            rows = np.nonzero((ids == e).any(axis=1))[0]
            ys[int(e)] = rows, self.ffn(x[rows], experts[int(e)])
        for k in range(ids.shape[1]):           # ... then per token: shared, then slot by slot
            for e in np.unique(ids[:, k]):
                rows_e, y = ys[int(e)]
                rows = np.nonzero(ids[:, k] == e)[0]
                out[rows] += y[np.searchsorted(rows_e, rows)] * weights[rows, k][:, None]
        return out

    # The fused ops: their compositions of the ops above are what they mean.
    add_rmsnorm, route, norm_route = composed.add_rmsnorm, composed.route, composed.norm_route
    mla_prep, mla_step = composed.mla_prep, composed.mla_step
