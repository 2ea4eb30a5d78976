"""Multi-head Latent Attention, in the absorbed form for every step (prefill and decode alike):
the no-rope query is taken into latent space by W_UK, scores run against the cached latents, and
the weighted latent sum is expanded by W_UV. h `[T, D]` → `[T, D]`. The step itself is the
backend's `mla_step` (spelled out in kernels/base.py); this module loads its weights."""
from __future__ import annotations

import numpy as np

from ..kernels.base import Backend, MLAWeights
from ..kernels.composed import fused
from ..weights.gguf_file import ModelFile
from ..weights.store import attention_up_projections, float_vector
from .cache import LatentCache
from .config import ModelConfig

# The original DeepSeek code normalises q_a and kv_a with eps 1e-6 whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


def load_weights(mf: ModelFile, layer: int) -> MLAWeights:
    t, p = mf.tensors, f"blk.{layer}."
    k_b, v_b = attention_up_projections(mf, layer)
    lora = mf.config.q_lora_rank > 0
    return MLAWeights(
        norm=float_vector(t[p + "attn_norm.weight"]),
        q=None if lora else t[p + "attn_q.weight"],
        q_a=t[p + "attn_q_a.weight"] if lora else None,
        q_a_norm=float_vector(t[p + "attn_q_a_norm.weight"]) if lora else None,
        q_b=t[p + "attn_q_b.weight"] if lora else None,
        kv_a=t[p + "attn_kv_a_mqa.weight"],
        kv_a_norm=float_vector(t[p + "attn_kv_a_norm.weight"]),
        k_b=k_b, v_b=v_b, out=t[p + "attn_output.weight"])


def mla(be: Backend, cfg: ModelConfig, w: MLAWeights, x: np.ndarray, delta: np.ndarray | None, layer: int,
        cache: LatentCache, start: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The attention sublayer: x `[T, D]` += delta in place (the previous sublayer's output, or
    None), then the attention output `[T, D]` of norm(x) at positions start.. (cos/sin `[T, R/2]`
    their rope tables), with the layer's latents and rope keys for those positions written to
    `cache`."""
    ckv, kpe = cache.layer(layer)
    return fused(be, "mla_step")(x, delta, w, ckv, kpe, cos, sin, start, cfg.softmax_scale, LATENT_NORM_EPS,
                                 cfg.rms_eps)
