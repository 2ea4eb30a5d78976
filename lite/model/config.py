"""The model's hyperparameters, parsed once from llama.cpp's `deepseek2` GGUF metadata keys into
a frozen dataclass. Every later module reads shapes from here, never from the file again."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from gguf.constants import Keys

from ..errors import FormatError, UnsupportedError

ARCH = "deepseek2"
GATING_SOFTMAX = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


def yarn_mscale(factor: float, m: float) -> float:
    """DeepSeek's `get_mscale`: the attention-temperature correction of YaRN."""
    return 1.0 if factor <= 1.0 else 0.1 * m * math.log(factor) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    n_layer: int
    d_model: int            # D
    n_head: int             # H
    q_lora_rank: int        # Q; 0 = direct query projection (Lite)
    kv_lora_rank: int       # C
    qk_nope: int            # N
    qk_rope: int            # R
    v_head: int             # V
    vocab_size: int
    n_ctx_train: int
    ffn_dense: int          # width of the leading dense layers
    n_expert: int           # E
    n_expert_used: int      # K
    n_shared: int
    expert_ffn: int         # F
    n_dense_lead: int
    rms_eps: float
    rope_theta: float
    yarn_factor: float      # 1.0 = no YaRN
    yarn_orig_ctx: int
    yarn_beta_fast: float
    yarn_beta_slow: float
    yarn_mscale_all_dim: float
    rope_attn_factor: float  # cos/sin multiplier: mscale(f, mscale) / mscale(f, mscale_all_dim)
    expert_weights_norm: bool
    expert_weights_scale: float
    n_group: int
    topk_group: int
    bos_id: int | None
    eos_id: int | None

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def layer_is_moe(self, i: int) -> bool:
        return self.is_moe and i >= self.n_dense_lead

    @property
    def softmax_scale(self) -> float:
        scale = (self.qk_nope + self.qk_rope) ** -0.5
        if self.yarn_factor > 1.0 and self.yarn_mscale_all_dim:
            scale *= yarn_mscale(self.yarn_factor, self.yarn_mscale_all_dim) ** 2
        return scale

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1 and 0 < self.topk_group < self.n_group

    @staticmethod
    def from_metadata(meta: Mapping[str, Any], source: str = "model") -> "ModelConfig":
        try:
            return ModelConfig._parse(meta, source)
        except (TypeError, ValueError, OverflowError) as e:
            raise FormatError(f"{source}: a metadata value has the wrong type ({e})") from None

    @staticmethod
    def _parse(meta: Mapping[str, Any], source: str) -> "ModelConfig":
        arch = meta.get(Keys.General.ARCHITECTURE)
        if arch != ARCH:
            raise UnsupportedError(f"{source}: architecture {arch!r} is not supported "
                                   f"(lite runs {ARCH!r}: DeepSeek-V2 / DeepSeek-Coder-V2)")

        def key(template: str) -> str:
            return template.format(arch=ARCH)

        def req(template: str) -> Any:
            k = key(template)
            if k not in meta:
                raise FormatError(f"{source}: metadata key {k!r} is missing")
            return meta[k]

        def opt(template: str, default: Any) -> Any:
            return meta.get(key(template), default)

        def positive(template: str) -> int:
            v = req(template)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise FormatError(f"{source}: metadata key {key(template)!r} must be a positive integer, got {v!r}")
            return v

        L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
        n_head = positive(A.HEAD_COUNT)
        rope = positive(R.DIMENSION_COUNT)
        if rope % 2:
            raise FormatError(f"{source}: {key(R.DIMENSION_COUNT)} must be even, got {rope}")
        # Current llama.cpp files carry the per-head MLA dims in *_mla keys; older ones in key/value_length.
        if key(A.KEY_LENGTH_MLA) in meta:
            qk_nope, v_head = positive(A.KEY_LENGTH_MLA) - rope, positive(A.VALUE_LENGTH_MLA)
        else:
            qk_nope, v_head = positive(A.KEY_LENGTH) - rope, positive(A.VALUE_LENGTH)
        if qk_nope <= 0:
            raise FormatError(f"{source}: key length leaves no no-rope dims (rope {rope})")
        n_expert = int(opt(L.EXPERT_COUNT, 0))
        gating = opt(L.EXPERT_GATING_FUNC, GATING_SOFTMAX)
        if n_expert and gating != GATING_SOFTMAX:
            raise UnsupportedError(f"{source}: {key(L.EXPERT_GATING_FUNC)} = {gating}: only softmax "
                                   f"routing (DeepSeek-V2) is supported")
        scaling = opt(R.SCALING_TYPE, "none")
        if scaling not in ("none", "yarn"):
            raise UnsupportedError(f"{source}: rope scaling {scaling!r} is not supported (none or yarn)")
        yarn = scaling == "yarn"
        factor = float(opt(R.SCALING_FACTOR, 1.0)) if yarn else 1.0
        mscale_all = float(opt(R.SCALING_YARN_LOG_MUL, 0.0)) / 0.1 if yarn else 0.0
        cfg = ModelConfig(
            name=str(meta.get(Keys.General.NAME, source)),
            n_layer=positive(L.BLOCK_COUNT),
            d_model=positive(L.EMBEDDING_LENGTH),
            n_head=n_head,
            q_lora_rank=int(opt(A.Q_LORA_RANK, 0)),
            kv_lora_rank=positive(A.KV_LORA_RANK),
            qk_nope=qk_nope, qk_rope=rope, v_head=v_head,
            vocab_size=int(opt(L.VOCAB_SIZE, 0)),
            n_ctx_train=int(opt(L.CONTEXT_LENGTH, 4096)),
            ffn_dense=int(opt(L.FEED_FORWARD_LENGTH, 0)),
            n_expert=n_expert,
            n_expert_used=int(opt(L.EXPERT_USED_COUNT, 0)),
            n_shared=int(opt(L.EXPERT_SHARED_COUNT, 0)),
            expert_ffn=int(opt(L.EXPERT_FEED_FORWARD_LENGTH, 0)),
            n_dense_lead=int(opt(L.LEADING_DENSE_BLOCK_COUNT, 0)),
            rms_eps=float(opt(A.LAYERNORM_RMS_EPS, 1e-6)),
            rope_theta=float(opt(R.FREQ_BASE, 10000.0)),
            yarn_factor=factor,
            yarn_orig_ctx=int(opt(R.SCALING_ORIG_CTX_LEN, 4096)),
            yarn_beta_fast=float(opt(R.SCALING_YARN_BETA_FAST, 32.0)),
            yarn_beta_slow=float(opt(R.SCALING_YARN_BETA_SLOW, 1.0)),
            yarn_mscale_all_dim=mscale_all,
            rope_attn_factor=float(opt(R.SCALING_YARN_ATTN_FACTOR, 1.0)) if yarn else 1.0,
            expert_weights_norm=bool(opt(L.EXPERT_WEIGHTS_NORM, False)),
            expert_weights_scale=float(opt(L.EXPERT_WEIGHTS_SCALE, 1.0)),
            n_group=int(opt(L.EXPERT_GROUP_COUNT, 0)),
            topk_group=int(opt(L.EXPERT_GROUP_USED_COUNT, 0)),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        )
        cfg._check(source)
        return cfg

    def _check(self, source: str) -> None:
        # Bounds far above any real DeepSeek model, so a corrupted count fails here instead of
        # driving a loop or an allocation of billions.
        limits = {"n_layer": 1024, "d_model": 1 << 16, "n_head": 1024, "q_lora_rank": 1 << 16,
                  "kv_lora_rank": 1 << 14, "qk_nope": 4096, "qk_rope": 4096, "v_head": 4096,
                  "vocab_size": 1 << 22, "n_ctx_train": 1 << 24, "ffn_dense": 1 << 20, "n_expert": 4096,
                  "n_shared": 64, "expert_ffn": 1 << 18, "n_dense_lead": 1024, "n_group": 4096, "topk_group": 4096}
        for name, limit in limits.items():
            v = getattr(self, name)
            if not 0 <= v <= limit:
                raise FormatError(f"{source}: {name} = {v} is outside the supported range 0..{limit}")
        if self.is_moe:
            if not 0 < self.n_expert_used <= self.n_expert:
                raise FormatError(f"{source}: expert_used_count {self.n_expert_used} must be in 1..{self.n_expert}")
            if self.expert_ffn <= 0:
                raise FormatError(f"{source}: expert_feed_forward_length is missing for an MoE model")
            if self.group_limited and (self.n_expert % self.n_group
                                       or self.n_expert_used > self.topk_group * self.n_expert // self.n_group):
                raise FormatError(f"{source}: {self.n_expert} experts do not split into {self.n_group} groups "
                                  f"of which {self.topk_group} can supply {self.n_expert_used} experts")
        if self.n_dense_lead > 0 and self.ffn_dense <= 0:
            raise FormatError(f"{source}: feed_forward_length is missing for the leading dense layers")
        if self.q_lora_rank < 0 or self.yarn_factor <= 0 or self.rms_eps <= 0 or self.rope_theta <= 0:
            raise FormatError(f"{source}: invalid q_lora_rank, rope scaling factor, rms eps or rope base")
