"""The feed-forward half of a layer: a dense SiLU-gated MLP for the leading layers, else the
DeepSeek-V2 MoE — softmax router, greedy or group-limited top-K, V2 weight semantics, routed
experts plus always-on shared experts. h `[T, D]` → `[T, D]`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..kernels.base import Backend, FFNWeights, QTensor
from ..weights.gguf_file import ModelFile
from ..weights.store import ExpertSource
from .config import ModelConfig


@dataclass
class FFNLayer:
    layer: int
    router: QTensor | None        # [E, D]; None for a dense layer
    always: FFNWeights | None     # the dense MLP, or the shared experts

    @staticmethod
    def load(mf: ModelFile, layer: int) -> "FFNLayer":
        t, p, cfg = mf.tensors, f"blk.{layer}.", mf.config
        if not cfg.layer_is_moe(layer):
            return FFNLayer(layer, None, FFNWeights(t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"],
                                                    t[p + "ffn_down.weight"]))
        shared = (FFNWeights(t[p + "ffn_gate_shexp.weight"], t[p + "ffn_up_shexp.weight"],
                             t[p + "ffn_down_shexp.weight"]) if cfg.n_shared else None)
        return FFNLayer(layer, t[p + "ffn_gate_inp.weight"], shared)


def route(cfg: ModelConfig, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """probs `[T, E]` (softmax of router logits) → ids int32 `[T, K]`, weights float32 `[T, K]`,
    ordered by descending weight; ties go to the lower expert id."""
    scores = probs
    if cfg.group_limited:
        T, E = probs.shape
        grouped = probs.reshape(T, cfg.n_group, E // cfg.n_group)
        group_score = grouped.max(axis=2)                       # V2: the group's best expert
        keep = np.argsort(-group_score, axis=1, kind="stable")[:, :cfg.topk_group]
        mask = np.zeros_like(group_score, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        scores = np.where(np.repeat(mask, E // cfg.n_group, axis=1), probs, np.float32(0.0))
    # Decode runs this once per layer with cold caches, so: methods and ufuncs called directly,
    # not numpy's Python-level wrappers (np.argsort, take_along_axis, ndarray.sum) around them.
    ids = (-scores).argsort(axis=1, kind="stable")[:, :cfg.n_expert_used]
    w = probs[np.arange(probs.shape[0])[:, None], ids]
    if cfg.expert_weights_norm and cfg.n_expert_used > 1:
        w = w / (np.add.reduce(w, axis=1, keepdims=True) + np.float32(1e-20))
    w = w * np.float32(cfg.expert_weights_scale)
    return ids.astype(np.int32), w.astype(np.float32, copy=False)


RouteHook = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


def ffn(be: Backend, cfg: ModelConfig, f: FFNLayer, h: np.ndarray, experts: ExpertSource,
        on_route: RouteHook | None = None) -> np.ndarray:
    """The layer's FFN output for h `[T, D]`.

    Routed experts run in a canonical partition — the distinct routed ids, sorted, in chunks of
    K — whatever the expert source, so results are bit-identical whether experts come from the
    memory map or a RAM-budgeted pool of any size (which must hold one chunk at a time). Each
    chunk's (token, expert) pairs go to the backend as single-expert rows, each expert's weights
    read once; partial results are added in a fixed order: shared, then chunk by chunk, slot k
    ascending. While a chunk computes, the next one's reads are already under way.
    """
    T = h.shape[0]
    out = be.moe(h, np.zeros((T, 0), np.int32), np.zeros((T, 0), np.float32), {}, f.always) \
        if f.always is not None else np.zeros_like(h)
    if f.router is None:
        return out
    probs = be.softmax(be.matmul(h, f.router))
    ids, w = route(cfg, probs)
    if on_route is not None:
        on_route(f.layer, ids, w, probs)
    K = cfg.n_expert_used
    uniq = sorted(set(ids.ravel().tolist()))     # np.unique costs several times more in decode
    if len(uniq) <= K:
        # One chunk holds every (token, slot) pair — always so in decode. In the row-major
        # order the partition below would produce, the pairs' rows are each token K times and
        # their results add slot by slot to every token at once: no index arithmetic needed.
        y = be.moe(h.repeat(K, axis=0), ids.reshape(-1, 1), w.reshape(-1, 1),
                   experts.experts(f.layer, uniq), None).reshape(T, K, h.shape[1])
        for k in range(K):
            out += y[:, k]
        return out
    chunks = [uniq[i:i + K] for i in range(0, len(uniq), K)]
    for c, chunk in enumerate(chunks):
        weights = experts.experts(f.layer, chunk)
        if c + 1 < len(chunks):
            experts.prefetch(f.layer, chunks[c + 1])
        rows, slots = np.nonzero(np.isin(ids, chunk))
        y = be.moe(np.ascontiguousarray(h[rows]), ids[rows, slots][:, None],
                   np.ascontiguousarray(w[rows, slots][:, None]), weights, None)
        for k in range(K):
            sel = slots == k
            out[rows[sel]] += y[sel]
    return out


def predict(be: Backend, cfg: ModelConfig, f: FFNLayer, norm: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Distinct experts layer `f` is expected to route `x` `[T, D]` (the residual stream one layer
    early) to: its own norm and router applied ahead of time."""
    probs = be.softmax(be.matmul(be.rmsnorm(x, norm, cfg.rms_eps), f.router))
    return np.unique(route(cfg, probs)[0])
