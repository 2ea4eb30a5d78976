"""The tensors a `deepseek2` GGUF must hold, by llama.cpp name, with numpy shapes derived from the
config. One table serves both the loader (validation) and the converter (what to write)."""
from __future__ import annotations

from .config import ModelConfig

# Tensors that are never quantized (llama.cpp keeps them in F32 too).
FLOAT_ONLY_SUFFIXES = ("_norm.weight", "ffn_gate_inp.weight")


def attention_shapes(cfg: ModelConfig, i: int, split_kv_b: bool = True) -> dict[str, tuple[int, ...]]:
    H, D, C, N, R, V, Q = (cfg.n_head, cfg.d_model, cfg.kv_lora_rank, cfg.qk_nope, cfg.qk_rope,
                           cfg.v_head, cfg.q_lora_rank)
    p = f"blk.{i}."
    out: dict[str, tuple[int, ...]] = {p + "attn_norm.weight": (D,)}
    if Q:
        out[p + "attn_q_a.weight"] = (Q, D)
        out[p + "attn_q_a_norm.weight"] = (Q,)
        out[p + "attn_q_b.weight"] = (H * (N + R), Q)
    else:
        out[p + "attn_q.weight"] = (H * (N + R), D)
    out[p + "attn_kv_a_mqa.weight"] = (C + R, D)
    out[p + "attn_kv_a_norm.weight"] = (C,)
    if split_kv_b:
        out[p + "attn_k_b.weight"] = (H, C, N)   # W_UK per head, transposed: ggml ne {N, C, H}
        out[p + "attn_v_b.weight"] = (H, V, C)   # W_UV per head: ggml ne {C, V, H}
    else:
        out[p + "attn_kv_b.weight"] = (H * (N + V), C)
    out[p + "attn_output.weight"] = (D, H * V)
    return out


def ffn_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    D, p = cfg.d_model, f"blk.{i}."
    out: dict[str, tuple[int, ...]] = {p + "ffn_norm.weight": (D,)}
    if not cfg.layer_is_moe(i):
        F = cfg.ffn_dense
        out.update({p + "ffn_gate.weight": (F, D), p + "ffn_up.weight": (F, D), p + "ffn_down.weight": (D, F)})
        return out
    E, F = cfg.n_expert, cfg.expert_ffn
    out[p + "ffn_gate_inp.weight"] = (E, D)
    out.update({p + "ffn_gate_exps.weight": (E, F, D), p + "ffn_up_exps.weight": (E, F, D),
                p + "ffn_down_exps.weight": (E, D, F)})
    if cfg.n_shared:
        S = F * cfg.n_shared
        out.update({p + "ffn_gate_shexp.weight": (S, D), p + "ffn_up_shexp.weight": (S, D),
                    p + "ffn_down_shexp.weight": (D, S)})
    return out


def expected_shapes(cfg: ModelConfig, split_kv_b: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model in file order, name → numpy shape."""
    out = {"token_embd.weight": (cfg.vocab_size, cfg.d_model)}
    for i in range(cfg.n_layer):
        out.update(attention_shapes(cfg, i, split_kv_b))
        out.update(ffn_shapes(cfg, i))
    out["output_norm.weight"] = (cfg.d_model,)
    out["output.weight"] = (cfg.vocab_size, cfg.d_model)
    return out


def is_expert_tensor(name: str) -> bool:
    return name.endswith("_exps.weight")
