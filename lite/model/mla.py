"""Multi-head Latent Attention, in the absorbed form for every step (prefill and decode alike):
the no-rope query is taken into latent space by W_UK, scores run against the cached latents, and
the weighted latent sum is expanded by W_UV. h `[T, D]` → `[T, D]`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels.base import Backend, QTensor
from ..weights.gguf_file import ModelFile
from ..weights.store import attention_up_projections, float_vector
from .cache import LatentCache
from .config import ModelConfig

# The original DeepSeek code normalises q_a and kv_a with eps 1e-6 whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


@dataclass
class MLAWeights:
    q: QTensor | None           # direct query [H·(N+R), D]
    q_a: QTensor | None         # q-LoRA down [Q, D]
    q_a_norm: np.ndarray | None
    q_b: QTensor | None         # q-LoRA up [H·(N+R), Q]
    kv_a: QTensor               # [C+R, D]
    kv_a_norm: np.ndarray       # [C]
    k_b: QTensor                # [H, C, N]
    v_b: QTensor                # [H, V, C]
    out: QTensor                # [D, H·V]

    @staticmethod
    def load(mf: ModelFile, layer: int) -> "MLAWeights":
        t, p = mf.tensors, f"blk.{layer}."
        k_b, v_b = attention_up_projections(mf, layer)
        lora = mf.config.q_lora_rank > 0
        return MLAWeights(
            q=None if lora else t[p + "attn_q.weight"],
            q_a=t[p + "attn_q_a.weight"] if lora else None,
            q_a_norm=float_vector(t[p + "attn_q_a_norm.weight"]) if lora else None,
            q_b=t[p + "attn_q_b.weight"] if lora else None,
            kv_a=t[p + "attn_kv_a_mqa.weight"],
            kv_a_norm=float_vector(t[p + "attn_kv_a_norm.weight"]),
            k_b=k_b, v_b=v_b, out=t[p + "attn_output.weight"])


def per_head(be: Backend, x: np.ndarray, w: QTensor) -> np.ndarray:
    """x `[T, H, cols]` times each head's own weight `w[h]` `[rows, cols]` → `[T, H, rows]`.
    One backend call for all heads where the backend has `matmul_heads` (an optional op)."""
    heads = getattr(be, "matmul_heads", None)
    if heads is not None:
        return heads(x, w)
    return np.stack([be.matmul(np.ascontiguousarray(x[:, h]), w.expert(h)) for h in range(w.shape[0])], axis=1)


def mla(be: Backend, cfg: ModelConfig, w: MLAWeights, h: np.ndarray, layer: int, cache: LatentCache,
        start: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Attention output `[T, D]` for h `[T, D]` at positions start.. (cos/sin `[T, R/2]` their
    rope tables), with the layer's latents and rope keys for those positions written to `cache`."""
    T, H, N, R, C = h.shape[0], cfg.n_head, cfg.qk_nope, cfg.qk_rope, cfg.kv_lora_rank
    if w.q is not None:
        q = be.matmul(h, w.q)
    else:
        q = be.matmul(be.rmsnorm(be.matmul(h, w.q_a), w.q_a_norm, LATENT_NORM_EPS), w.q_b)
    q = q.reshape(T, H, N + R)
    kv = be.matmul(h, w.kv_a)                                          # [T, C+R]
    # Slices go to the backend as they are: every op makes its inputs contiguous itself.
    ckv = be.rmsnorm(kv[:, :C], w.kv_a_norm, LATENT_NORM_EPS)
    q_pe = be.rope(q[..., N:], cos, sin)                               # [T, H, R]
    k_pe = be.rope(kv[:, None, C:], cos, sin)[:, 0]                    # [T, R]
    cache.write(layer, start, ckv, k_pe)
    c_all, k_all = cache.view(layer, start + T)
    q_lat = per_head(be, q[..., :N], w.k_b)                            # [T, H, C]
    o_lat = be.mla_attention(q_lat, q_pe, c_all, k_all, cfg.softmax_scale, start)
    o = per_head(be, o_lat, w.v_b)                                     # [T, H, V]
    return be.matmul(o.reshape(T, H * cfg.v_head), w.out)
