"""The DeepSeek-V2 forward pass: embedding, per layer `x += MLA(norm(x))`, `x += FFN(norm(x))`,
final norm and output projection. Token ids `[T]` at positions start..start+T-1 → logits
`[T, vocab]`, with the latent cache updated for those positions."""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from ..errors import BackendError, Cancelled, LiteError
from ..kernels.base import Backend, DecodeLayer
from ..kernels.composed import fused
from ..kernels.dequant import dequantize
from ..weights.gguf_file import ModelFile
from ..weights.store import ExpertSource, float_vector
from .cache import LatentCache
from .config import ModelConfig
from .mla import LATENT_NORM_EPS, load_weights, mla
from .moe import FFNLayer, RouteHook, ffn, ffn_input, predict, route_options
from .rope import RopeTables

# observe(name, array): receives intermediate tensors (embed, attn_out_layerL, mlp_out_layerL,
# hidden_after_layerL, router_layerL_*, final_norm) — for tests and debugging.
Observer = Callable[[str, np.ndarray], None]


class DeepSeek2:
    def __init__(self, mf: ModelFile, backend: Backend, experts: ExpertSource) -> None:
        self.file = mf
        self.cfg: ModelConfig = mf.config
        self.backend = backend
        self.experts = experts
        t = mf.tensors
        self.embed = t["token_embd.weight"]
        self.output = t["output.weight"]
        self.output_norm = float_vector(t["output_norm.weight"])
        self.ffn_norm = [float_vector(t[f"blk.{i}.ffn_norm.weight"]) for i in range(self.cfg.n_layer)]
        self.attn = [load_weights(mf, i) for i in range(self.cfg.n_layer)]
        self.ffn = [FFNLayer.load(mf, i) for i in range(self.cfg.n_layer)]
        self.rope = RopeTables(self.cfg)
        self.route_hook: RouteHook | None = None   # e.g. a routing-trace recorder
        self.prefetch_next = True
        self._pack: object | None = None     # the backend's decode_layers pack, once built
        self._pack_tried = False

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise LiteError(f"token id out of range 0..{self.cfg.vocab_size - 1}")
        return dequantize(self.embed.data[ids], self.embed.qtype)

    def forward(self, ids: np.ndarray, cache: LatentCache, start: int, observe: Observer | None = None,
                all_logits: bool = True, cancel: threading.Event | None = None) -> np.ndarray:
        """Run tokens `ids` at positions start.. and return logits for every position (or only
        the last one when `all_logits` is false, which saves the vocab projection in prefill).
        A step run layer by layer (every multi-token one) raises `Cancelled` before its next
        layer once `cancel` is set."""
        be, cfg = self.backend, self.cfg
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        cache.reserve(start + len(ids))
        x = self.embed_tokens(ids)
        note = observe or (lambda name, a: None)
        if observe is not None:             # x is updated in place below: the observer gets a copy
            observe("embed", x.copy())
        cos, sin = self.rope(start, len(ids))
        self.file.check_unchanged()
        pack = self._decode_pack() if len(ids) == 1 and observe is None and self.route_hook is None \
            and not self.prefetch_next else None
        if pack is not None:
            # One backend call for the whole stack: nothing outside needs the layers' insides.
            delta = be.decode_layers(x, pack, [cache.layer(i) for i in range(cfg.n_layer)], cos, sin, start,
                                     cfg.softmax_scale, LATENT_NORM_EPS, cfg.rms_eps, *route_options(cfg))[0]
        else:
            # Only the last position's logits wanted and nobody watching the layers: the last
            # layer's FFN runs for that position alone (nothing reads the others' outputs).
            last_only = not all_logits and observe is None and self.route_hook is None
            delta = self._layers(x, cache, start, cos, sin, observe, last_only, cancel)
        cache.length = start + len(ids)
        if not all_logits:
            x, delta = x[-1:], delta[-1:]
        x = fused(be, "add_rmsnorm")(x, delta, self.output_norm, cfg.rms_eps)
        note("final_norm", x)
        return be.matmul(x, self.output)

    def _decode_pack(self) -> object | None:
        """The backend's pack for `decode_layers`, built on first use; None where the backend has
        no such op or the expert source hands out experts that move (a pool)."""
        if not self._pack_tried:
            self._pack_tried = True
            prepare = getattr(self.backend, "prepare_layers", None)
            table = getattr(self.experts, "table", None)
            tables = [() if f.router is None else table(i) if table is not None else None
                      for i, f in enumerate(self.ffn)]
            if prepare is not None and all(t is not None for t in tables):
                try:
                    self._pack = prepare([DecodeLayer(self.attn[i], self.ffn_norm[i], f.router, tables[i], f.always)
                                          for i, f in enumerate(self.ffn)], self.cfg.d_model, self.cfg.n_expert_used)
                except BackendError:
                    pass    # beyond what the one-call op takes (e.g. K > 64): the per-layer ops serve
        return self._pack

    def _layers(self, x: np.ndarray, cache: LatentCache, start: int, cos: np.ndarray, sin: np.ndarray,
                observe: Observer | None, last_only: bool = False,
                cancel: threading.Event | None = None) -> np.ndarray:
        """Every layer, op by op: x `[T, D]` updated in place up to the last layer's FFN output,
        which is returned (`[1, D]`, for the last position, if `last_only`). A set `cancel`
        stops it before the next layer: `cache.length` moves only once all layers are done, so
        the positions written so far are past the cache's end and nothing reads them."""
        be, cfg = self.backend, self.cfg
        # guess[i]: the experts predicted for layer i one layer early (for prefetch accuracy).
        guess: dict[int, np.ndarray] = {}

        def route_cb(layer: int, rid: np.ndarray, rw: np.ndarray, probs: np.ndarray) -> None:
            if layer in guess:
                self.experts.note_prediction(guess.pop(layer), np.unique(rid))
            if self.route_hook is not None:
                self.route_hook(layer, rid, rw, probs)
            if observe is not None:
                observe(f"router_layer{layer}_ids", rid)
                observe(f"router_layer{layer}_weights", rw)
                observe(f"router_layer{layer}_probs", probs)

        # Without an observer, a hook or predictions to score, routing needs no callback.
        on_route = route_cb if observe is not None or self.route_hook is not None or self.prefetch_next else None
        # The residual stream x is updated in place: each sublayer's output `delta` is added by
        # the (fused) op that also normalises x for the next sublayer (observers get copies).
        delta = None
        last = cfg.n_layer - 1
        for i in range(cfg.n_layer):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled at layer {i} of {cfg.n_layer}")
            a = mla(be, cfg, self.attn[i], x, delta, i, cache, start, cos, sin)
            if observe is not None:     # not `note`: the names would be formatted for nothing
                observe(f"attn_out_layer{i}", a)
            # Every position's latents are in the cache now; past this point, with last_only,
            # the last layer serves the last position alone (x[-1:] is a view: updated in place).
            xs, a = (x[-1:], a[-1:]) if last_only and i == last else (x, a)
            h, routing = ffn_input(be, cfg, self.ffn[i], xs, a, self.ffn_norm[i])
            nxt = self.ffn[i + 1] if i + 1 < cfg.n_layer else None
            # The source says when a guess would go unused (all resident, or nothing worth
            # displacing): that spares the router pass.
            if self.prefetch_next and nxt is not None and nxt.router is not None and self.experts.wants_guess(i + 1):
                # Start reading layer i+1's likely experts while layer i's FFN computes.
                ahead = x[-1:] if last_only and i + 1 == last else x
                guess[i + 1] = predict(be, cfg, nxt, self.ffn_norm[i + 1], ahead)
                self.experts.prefetch(i + 1, guess[i + 1])
            delta = ffn(be, cfg, self.ffn[i], h, self.experts, on_route, routing)
            if observe is not None:
                observe(f"mlp_out_layer{i}", delta)
                observe(f"hidden_after_layer{i}", x + delta)
        return delta
