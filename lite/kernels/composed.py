"""The fused ops composed from the core Backend ops: what each fused op means, and every
backend's fallback where it has no fused op of its own (`fused`). Also `topk_route`, the numpy
definition of top-K routing the compositions and the model use."""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from .base import Backend, MLAWeights, QTensor, check_add_rmsnorm, check_mla_prep, check_route


def topk_route(probs: np.ndarray, k: int, n_group: int = 1, topk_group: int = 1, norm: bool = False,
               scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """probs `[T, E]` → ids int32 `[T, K]`, weights float32 `[T, K]`: the K experts of highest
    probability, best first, ties to the lower id; with n_group > 1 only experts in the topk_group
    groups of best top expert compete. Weights are the chosen probabilities, renormalised (sum +
    1e-20) when `norm` and K > 1, times `scale`."""
    scores = probs
    if n_group > 1:
        t, e = probs.shape
        group_score = probs.reshape(t, n_group, e // n_group).max(axis=2)    # V2: the group's best expert
        keep = np.argsort(-group_score, axis=1, kind="stable")[:, :topk_group]
        mask = np.zeros_like(group_score, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        scores = np.where(np.repeat(mask, e // n_group, axis=1), probs, np.float32(0.0))
    # Methods and ufuncs called directly, not numpy's Python-level wrappers (np.argsort,
    # take_along_axis, ndarray.sum): several times cheaper once per layer with cold caches.
    ids = (-scores).argsort(axis=1, kind="stable")[:, :k]
    w = probs[np.arange(probs.shape[0])[:, None], ids]
    if norm and k > 1:
        w = w / (np.add.reduce(w, axis=1, keepdims=True) + np.float32(1e-20))
    w = w * np.float32(scale)
    return ids.astype(np.int32), w.astype(np.float32, copy=False)


def add_rmsnorm(be: Backend, x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float) -> np.ndarray:
    x, delta, w = check_add_rmsnorm(x, delta, w, eps)
    if delta is not None:
        np.add(x, delta, out=x)
    return be.rmsnorm(x, w, eps)


def route(be: Backend, logits: np.ndarray, k: int, n_group: int = 1, topk_group: int = 1, norm: bool = False,
          scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probs = be.softmax(check_route(logits, k, n_group, topk_group, scale))
    return (*topk_route(probs, k, n_group, topk_group, norm, scale), probs)


def norm_route(be: Backend, x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float, router: QTensor,
               k: int, n_group: int = 1, topk_group: int = 1, norm: bool = False,
               scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    h = fused(be, "add_rmsnorm")(x, delta, w, eps)
    return (h, *fused(be, "route")(be.matmul(h, router), k, n_group, topk_group, norm, scale))


def mla_prep(be: Backend, q: np.ndarray, kv: np.ndarray, norm: np.ndarray, eps: float, cos: np.ndarray,
             sin: np.ndarray, ckv: np.ndarray, kpe: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    q, kv, norm, cos, sin, ckv, kpe, start = check_mla_prep(q, kv, norm, eps, cos, sin, ckv, kpe, start)
    t, c, r = q.shape[0], ckv.shape[1], kpe.shape[1]
    n = q.shape[2] - r
    ckv[start:start + t] = be.rmsnorm(kv[:, :c], norm, eps)
    kpe[start:start + t] = be.rope(kv[:, None, c:], cos, sin)[:, 0]
    return np.ascontiguousarray(q[..., :n]), be.rope(q[..., n:], cos, sin)


def per_head(be: Backend, x: np.ndarray, w: QTensor) -> np.ndarray:
    """x `[T, H, cols]` times each head's own weight `w[h]` `[rows, cols]` → `[T, H, rows]`.
    One backend call for all heads where the backend has `matmul_heads` (an optional op)."""
    heads = getattr(be, "matmul_heads", None)
    if heads is not None:
        return heads(x, w)
    return np.stack([be.matmul(np.ascontiguousarray(x[:, h]), w.expert(h)) for h in range(w.shape[0])], axis=1)


def mla_step(be: Backend, x: np.ndarray, delta: np.ndarray | None, w: MLAWeights, ckv: np.ndarray, kpe: np.ndarray,
             cos: np.ndarray, sin: np.ndarray, start: int, scale: float, eps: float, norm_eps: float) -> np.ndarray:
    h = fused(be, "add_rmsnorm")(x, delta, w.norm, norm_eps)
    t, n_head = h.shape[0], w.k_b.shape[0]
    if w.q is not None:
        q = be.matmul(h, w.q)
    else:
        q = be.matmul(be.rmsnorm(be.matmul(h, w.q_a), w.q_a_norm, eps), w.q_b)
    kv = be.matmul(h, w.kv_a)                                                  # [T, C+R]
    q = q.reshape(t, n_head, q.shape[1] // n_head)                            # [T, H, N+R]
    q_nope, q_pe = fused(be, "mla_prep")(q, kv, w.kv_a_norm, eps, cos, sin, ckv, kpe, start)   # [T, H, N], [T, H, R]
    q_lat = per_head(be, q_nope, w.k_b)                                        # [T, H, C]
    o_lat = be.mla_attention(q_lat, q_pe, ckv[:start + t], kpe[:start + t], scale, start)
    o = per_head(be, o_lat, w.v_b)                                             # [T, H, V]
    return be.matmul(o.reshape(t, o.shape[1] * o.shape[2]), w.out)


_COMPOSED = {"add_rmsnorm": add_rmsnorm, "route": route, "norm_route": norm_route, "mla_prep": mla_prep,
             "mla_step": mla_step}


def fused(be: Backend, name: str) -> Callable:
    """`be`'s own fused op `name` (a key of _COMPOSED), else its composition from the core ops
    above."""
    own = getattr(be, name, None)
    return own if own is not None else partial(_COMPOSED[name], be)
