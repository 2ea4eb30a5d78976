"""The feed-forward half of a layer: a dense SiLU-gated MLP for the leading layers, else the
DeepSeek-V2 MoE — softmax router, greedy or group-limited top-K, V2 weight semantics, routed
experts plus always-on shared experts. h `[T, D]` → `[T, D]`."""
from __future__ import annotations

from dataclasses import dataclass

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
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :cfg.n_expert_used]
    w = np.take_along_axis(probs, ids, axis=1)
    if cfg.expert_weights_norm and cfg.n_expert_used > 1:
        w = w / (w.sum(axis=1, keepdims=True) + np.float32(1e-20))
    w = w * np.float32(cfg.expert_weights_scale)
    return ids.astype(np.int32), w.astype(np.float32)


def ffn(be: Backend, cfg: ModelConfig, f: FFNLayer, h: np.ndarray, experts: ExpertSource,
        on_route=None) -> np.ndarray:
    T = h.shape[0]
    if f.router is None:
        empty = np.zeros((T, 0), np.int32)
        return be.moe(h, empty, np.zeros((T, 0), np.float32), {}, f.always)
    probs = be.softmax(be.matmul(h, f.router))
    ids, w = route(cfg, probs)
    if on_route is not None:
        on_route(f.layer, ids, w, probs)
    return be.moe(h, ids, w, experts.experts(f.layer, np.unique(ids)), f.always)
