"""Write a synthetic Hugging Face checkpoint with the real DeepSeek-Coder-V2-Lite dimensions and
random weights, for benchmarks of the quantizer (memory, throughput) at the real tensor sizes.

    python benchmarks/make_synthetic_hf.py --layers 2 --out /tmp/lite-synth-2

Dimensions are Coder-V2-Lite's (hidden 2048, 16 heads, q_lora_rank null, kv_lora_rank 512, rope
64, nope 128, v 128, vocab 102400, 64 routed experts top-6, 2 shared, expert width 1408, dense
width 10944, first layer dense, YaRN factor 40 over 4096, mscale = mscale_all_dim = 0.707); only
the layer count is reduced. Weights are bf16 N(0, std) (default 0.02), norms 1.0, written in one
safetensors shard per layer plus one for the embeddings and one for the head, with an index.

Drawing 0.7 GB of normals per layer would dominate the run time, so every tensor is a slice of one
pool of 16 Mi bf16 normals, at a random offset (wrapping around): the values have the right
distribution, which is all quantization cost and error depend on. Deterministic for a --seed.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

POOL = 1 << 24

LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "v_head_dim": 128, "vocab_size": 102400,
}


def layer_shapes(c: dict, i: int) -> dict[str, tuple[int, ...]]:
    D, H, C = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"]
    N, R, V = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    p = f"model.layers.{i}."
    out = {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
           p + "self_attn.q_proj.weight": (H * (N + R), D),
           p + "self_attn.kv_a_proj_with_mqa.weight": (C + R, D),
           p + "self_attn.kv_a_layernorm.weight": (C,),
           p + "self_attn.kv_b_proj.weight": (H * (N + V), C),
           p + "self_attn.o_proj.weight": (D, H * V)}
    if i < c["first_k_dense_replace"]:
        F = c["intermediate_size"]
        out.update({p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                    p + "mlp.down_proj.weight": (D, F)})
        return out
    F, E, S = c["moe_intermediate_size"], c["n_routed_experts"], c["n_shared_experts"]
    out[p + "mlp.gate.weight"] = (E, D)
    for e in range(E):
        q = f"{p}mlp.experts.{e}."
        out.update({q + "gate_proj.weight": (F, D), q + "up_proj.weight": (F, D), q + "down_proj.weight": (D, F)})
    out.update({p + "mlp.shared_experts.gate_proj.weight": (F * S, D),
                p + "mlp.shared_experts.up_proj.weight": (F * S, D),
                p + "mlp.shared_experts.down_proj.weight": (D, F * S)})
    return out


class _Pool:
    def __init__(self, seed: int, std: float) -> None:
        self.rng = np.random.default_rng(seed)
        w = self.rng.standard_normal(POOL, dtype=np.float32) * np.float32(std)
        # float32 → bf16 with round-to-nearest-even
        u = w.view(np.uint32)
        self.bf16 = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        self.one = np.full(1, 0x3F80, np.uint16)   # bf16 1.0

    def write(self, f, name: str, n: int) -> None:
        if name.endswith("norm.weight"):
            f.write(np.repeat(self.one, n).tobytes())
            return
        off = int(self.rng.integers(POOL))
        while n:
            k = min(n, POOL - off)
            f.write(memoryview(self.bf16[off:off + k]))
            n -= k
            off = 0


def write_shard(path: Path, shapes: dict[str, tuple[int, ...]], pool: _Pool) -> int:
    header, pos = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes.items():
            pool.write(f, name, int(np.prod(shape)))
    return pos


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, required=True, help="number of layers (layer 0 is dense)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    args = ap.parse_args(argv)
    cfg = dict(LITE_CONFIG, num_hidden_layers=args.layers)
    D, vocab = cfg["hidden_size"], cfg["vocab_size"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    pool = _Pool(args.seed, args.std)
    shards = [{"model.embed_tokens.weight": (vocab, D)}]
    shards += [layer_shapes(cfg, i) for i in range(args.layers)]
    shards.append({"model.norm.weight": (D,), "lm_head.weight": (vocab, D)})
    weight_map, total, n_params = {}, 0, 0
    for k, shapes in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(args.out / name, shapes, pool)
        n_params += sum(int(np.prod(s)) for s in shapes.values())
        weight_map.update(dict.fromkeys(shapes, name))
        print(f"wrote {name} ({total / 2**30:.2f} GiB so far)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"{args.out}: {args.layers} layers, {n_params:,} parameters, {total / 2**30:.2f} GiB of bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
