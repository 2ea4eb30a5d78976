"""The feed-forward half of a layer: a dense SiLU-gated MLP for the leading layers, else the
DeepSeek-V2 MoE — softmax router, greedy or group-limited top-K, V2 weight semantics, routed
experts plus always-on shared experts. h `[T, D]` → `[T, D]`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..kernels.base import Backend, FFNWeights, QTensor
from ..kernels.composed import fused, topk_route
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


def route_options(cfg: ModelConfig) -> tuple[int, int, bool, float]:
    """What the router ops take after K: n_group and topk_group ((1, 1) when routing is not
    group-limited), whether weights are renormalised, and their scale."""
    groups = (cfg.n_group, cfg.topk_group) if cfg.group_limited else (1, 1)
    return (*groups, cfg.expert_weights_norm, cfg.expert_weights_scale)


def route(cfg: ModelConfig, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """probs `[T, E]` (softmax of router logits) → ids int32 `[T, K]`, weights float32 `[T, K]`,
    ordered by descending weight; ties go to the lower expert id."""
    return topk_route(probs, cfg.n_expert_used, *route_options(cfg))


def route_logits(be: Backend, cfg: ModelConfig, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Router logits `[T, E]` → (ids, weights, probs `[T, E]`): `route` of their softmax, in one
    backend call where the backend has it."""
    return fused(be, "route")(logits, cfg.n_expert_used, *route_options(cfg))


RouteHook = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]
Routing = tuple[np.ndarray, np.ndarray, np.ndarray]     # ids [T, K], weights [T, K], probs [T, E]


def ffn_input(be: Backend, cfg: ModelConfig, f: FFNLayer, x: np.ndarray, delta: np.ndarray | None,
              norm: np.ndarray) -> tuple[np.ndarray, Routing | None]:
    """x `[T, D]` += delta in place, then the FFN's input h = norm(x) and, for an MoE layer, its
    routing: one backend call where the backend has the fused op."""
    if f.router is None:
        return fused(be, "add_rmsnorm")(x, delta, norm, cfg.rms_eps), None
    h, ids, w, probs = norm_route(be, cfg, f, x, delta, norm)
    return h, (ids, w, probs)


def norm_route(be: Backend, cfg: ModelConfig, f: FFNLayer, x: np.ndarray, delta: np.ndarray | None,
               norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The backend's norm_route for MoE layer `f`: (h, ids, weights, probs)."""
    return fused(be, "norm_route")(x, delta, norm, cfg.rms_eps, f.router, cfg.n_expert_used, *route_options(cfg))


def always_on(be: Backend, f: FFNLayer, h: np.ndarray) -> np.ndarray:
    """The dense MLP's or the shared experts' output for h `[T, D]` (zeros when there are none)."""
    T = h.shape[0]
    return be.moe(h, np.zeros((T, 0), np.int32), np.zeros((T, 0), np.float32), {}, f.always) \
        if f.always is not None else np.zeros_like(h)


def ffn(be: Backend, cfg: ModelConfig, f: FFNLayer, h: np.ndarray, experts: ExpertSource,
        on_route: RouteHook | None = None, routing: Routing | None = None) -> np.ndarray:
    """The layer's FFN output for h `[T, D]` (routed here unless `routing` from `ffn_input`).

    Routed experts run in a canonical partition — the distinct routed ids, sorted, in chunks of
    K — whatever the expert source, so results are bit-identical whether experts come from the
    memory map or a RAM-budgeted pool of any size (which must hold one chunk at a time). Each
    chunk's (token, expert) pairs go to the backend as single-expert rows, each expert's weights
    read once; partial results are added in a fixed order: shared, then chunk by chunk, slot k
    ascending. While a chunk computes, the next one's reads are already under way. Where the
    source holds every expert (a memory map: `table` is not None) and the backend computes in
    place (not `moe_streams_weights`), all chunks' pairs go in one call, in chunk order: a
    pair's result does not depend on the other rows of its call, so the bits are the chunked
    path's, and a 256-token prefill on the C backend runs 1.08x faster. A backend that adds
    every token's terms in slot order (`moe_slot_order`) takes the tokens themselves instead,
    shared experts included, with each token's slots sorted into that order: no pair rows to
    copy, quantize and add up here.
    """
    T = h.shape[0]
    if f.router is None:
        return always_on(be, f, h)
    ids, w, probs = routing if routing is not None else route_logits(be, cfg, be.matmul(h, f.router))
    if on_route is not None:
        on_route(f.layer, ids, w, probs)
    K = cfg.n_expert_used
    uniq = sorted(set(ids.ravel().tolist()))     # np.unique costs several times more in decode
    if T == 1:
        # Decode: the shared experts and the token's K routed ones in one call, which adds its
        # terms shared first, then slot by slot: the order below.
        return be.moe(h, ids, w, experts.experts(f.layer, uniq), f.always)
    n_chunks = (len(uniq) + K - 1) // K
    chunk_of = np.zeros(uniq[-1] + 1, np.int64)
    chunk_of[uniq] = np.arange(len(uniq)) // K
    pair_chunk = chunk_of[ids.ravel()]
    whole = experts.table(f.layer) is not None and not getattr(be, "moe_streams_weights", False)
    if whole and getattr(be, "moe_slot_order", False):
        # The tokens themselves in one call, each token's slots put in (chunk, slot) order, the
        # order the backend adds them in after the shared experts.
        by = np.argsort(pair_chunk.reshape(T, K), axis=1, kind="stable")
        return be.moe(h, np.take_along_axis(ids, by, 1), np.take_along_axis(w, by, 1),
                      experts.experts(f.layer, uniq), f.always)
    out = always_on(be, f, h)
    # Every (token, slot) pair, chunk by chunk and row-major within a chunk: chunk c's pairs are
    # [first[c], first[c + 1]) of `rows`, `slots` and the results y.
    order = np.argsort(pair_chunk, kind="stable")
    rows, slots = np.divmod(order, K)
    first = np.searchsorted(pair_chunk[order], np.arange(n_chunks + 1))
    calls = [(0, n_chunks)] if whole else [(c, c + 1) for c in range(n_chunks)]
    # The results of every pair (one call's, or filled in call by call: one chunk's at a time on top).
    y = np.empty((len(order), h.shape[1]), np.float32) if len(calls) > 1 else None
    for i, (c0, c1) in enumerate(calls):
        weights = experts.experts(f.layer, uniq[c0 * K:c1 * K])
        if i + 1 < len(calls):
            experts.prefetch(f.layer, uniq[c1 * K:(c1 + 1) * K])
        r, s = rows[first[c0]:first[c1]], slots[first[c0]:first[c1]]
        part = be.moe(np.ascontiguousarray(h[r]), ids[r, s][:, None], np.ascontiguousarray(w[r, s][:, None]),
                      weights, None)
        if y is None:
            y = part
        else:
            y[first[c0]:first[c1]] = part
    # Each token has K pairs; sorted by their place in y they are in (chunk, slot) order, the
    # order their results add in: the j-th of every token at once.
    place = np.empty(len(order), np.int64)
    place[order] = np.arange(len(order))
    place = np.sort(place.reshape(T, K), axis=1)
    for j in range(K):
        out += y[place[:, j]]
    return out


def predict(be: Backend, cfg: ModelConfig, f: FFNLayer, norm: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Distinct experts layer `f` is expected to route `x` `[T, D]` (the residual stream one layer
    early) to: its own norm and router applied ahead of time."""
    return np.unique(norm_route(be, cfg, f, x, None, norm)[1])
