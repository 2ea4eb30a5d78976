"""A Hugging Face DeepSeek-V2 `config.json` → llama.cpp `deepseek2` GGUF metadata, in its current
MLA layout, with V2 routing semantics mapped onto llama.cpp's keys (see DESIGN.md)."""
from __future__ import annotations

from typing import Any

from gguf import GGUFValueType
from gguf.constants import Keys

from lite import FormatError, UnsupportedError
from lite.model.config import ARCH, GATING_SOFTMAX, yarn_mscale

# (key template, value type) pairs; templates use {arch}.
U32, F32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING


def gguf_metadata(hf: dict[str, Any], source: str) -> dict[str, tuple[Any, GGUFValueType]]:
    """GGUF key → (value, type) for the model hyperparameters (tokenizer keys are added elsewhere)."""
    def get(key: str, default: Any = None, required: bool = True) -> Any:
        v = hf.get(key, default)
        if v is None and required:
            raise FormatError(f"{source}: config.json has no {key!r}")
        return v

    if hf.get("model_type") not in ("deepseek_v2", None) and "DeepseekV2ForCausalLM" not in hf.get("architectures", []):
        raise UnsupportedError(f"{source}: model_type {hf.get('model_type')!r} is not DeepSeek-V2 "
                               f"(lite converts deepseek_v2 checkpoints)")
    scoring = hf.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise UnsupportedError(f"{source}: scoring_func {scoring!r} is not supported (DeepSeek-V2 uses softmax)")
    topk_method = hf.get("topk_method", "greedy")
    if topk_method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedError(f"{source}: topk_method {topk_method!r} is not supported "
                               f"(greedy or group_limited_greedy)")
    if int(hf.get("moe_layer_freq", 1)) != 1:
        raise UnsupportedError(f"{source}: moe_layer_freq {hf['moe_layer_freq']} is not supported (1)")

    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    nh, C, R_ = get("num_attention_heads"), get("kv_lora_rank"), get("qk_rope_head_dim")
    N, V = get("qk_nope_head_dim"), get("v_head_dim")
    n_expert = int(get("n_routed_experts", 0, required=False) or 0)
    norm = bool(hf.get("norm_topk_prob", False))
    meta: dict[str, tuple[Any, GGUFValueType]] = {
        L.CONTEXT_LENGTH: (get("max_position_embeddings"), U32),
        L.EMBEDDING_LENGTH: (get("hidden_size"), U32),
        L.FEED_FORWARD_LENGTH: (get("intermediate_size"), U32),
        L.BLOCK_COUNT: (get("num_hidden_layers"), U32),
        L.VOCAB_SIZE: (get("vocab_size"), U32),
        A.HEAD_COUNT: (nh, U32),
        A.HEAD_COUNT_KV: (1, U32),            # MLA: one latent "head" shared by all heads
        A.KEY_LENGTH: (C + R_, U32),
        A.VALUE_LENGTH: (C, U32),
        A.KEY_LENGTH_MLA: (N + R_, U32),
        A.VALUE_LENGTH_MLA: (V, U32),
        A.LAYERNORM_RMS_EPS: (float(get("rms_norm_eps", 1e-6)), F32),
        # Always written: llama.cpp only infers a missing q_lora_rank for 26/27-layer models.
        A.Q_LORA_RANK: (int(hf.get("q_lora_rank") or 0), U32),
        A.KV_LORA_RANK: (C, U32),
        R.DIMENSION_COUNT: (R_, U32),
        R.FREQ_BASE: (float(get("rope_theta", 10000.0)), F32),
        L.LEADING_DENSE_BLOCK_COUNT: (int(hf.get("first_k_dense_replace", 0)), U32),
    }
    if n_expert:
        meta.update({
            L.EXPERT_COUNT: (n_expert, U32),
            L.EXPERT_USED_COUNT: (get("num_experts_per_tok"), U32),
            L.EXPERT_SHARED_COUNT: (int(hf.get("n_shared_experts") or 0), U32),
            L.EXPERT_FEED_FORWARD_LENGTH: (get("moe_intermediate_size"), U32),
            # V2 normalises OR scales; llama.cpp normalises then scales, so scale is 1 when normalising.
            L.EXPERT_WEIGHTS_NORM: (norm, BOOL),
            L.EXPERT_WEIGHTS_SCALE: (1.0 if norm else float(hf.get("routed_scaling_factor", 1.0)), F32),
            L.EXPERT_GATING_FUNC: (GATING_SOFTMAX, U32),
        })
        if topk_method == "group_limited_greedy":
            meta[L.EXPERT_GROUP_COUNT] = (get("n_group"), U32)
            meta[L.EXPERT_GROUP_USED_COUNT] = (get("topk_group"), U32)
    rs = hf.get("rope_scaling")
    if rs:
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise UnsupportedError(f"{source}: rope_scaling type {kind!r} is not supported (yarn)")
        f = float(rs["factor"])
        m, m_all = float(rs.get("mscale", 1.0)), float(rs.get("mscale_all_dim", 0.0))
        meta.update({
            R.SCALING_TYPE: ("yarn", STR),
            R.SCALING_FACTOR: (f, F32),
            R.SCALING_ORIG_CTX_LEN: (int(rs.get("original_max_position_embeddings", 4096)), U32),
            R.SCALING_YARN_LOG_MUL: (0.1 * m_all, F32),
            R.SCALING_YARN_BETA_FAST: (float(rs.get("beta_fast", 32)), F32),
            R.SCALING_YARN_BETA_SLOW: (float(rs.get("beta_slow", 1)), F32),
        })
        attn_factor = yarn_mscale(f, m) / yarn_mscale(f, m_all)
        if abs(attn_factor - 1.0) > 1e-12:
            meta[R.SCALING_YARN_ATTN_FACTOR] = (attn_factor, F32)
    return {k.format(arch=ARCH): v for k, v in meta.items()}
