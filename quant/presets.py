"""Quantization presets: which ggml type each tensor class gets, plus per-class overrides.

Classes: `experts` (routed `*_exps`), `shared` (`*_shexp` and the dense leading layers' MLP),
`attn` (attention projections), `embed` (`token_embd`), `output`. Norms and routers stay F32.
"""
from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from lite import LiteError
from lite.model.tensors import FLOAT_ONLY_SUFFIXES, is_expert_tensor

CLASSES = ("experts", "shared", "attn", "embed", "output")

PRESETS: dict[str, dict[str, QT]] = {
    "f32": dict.fromkeys(CLASSES, QT.F32),
    "f16": dict.fromkeys(CLASSES, QT.F16),
    "bf16": dict.fromkeys(CLASSES, QT.BF16),
    "q8_0": dict.fromkeys(CLASSES, QT.Q8_0),
    "q4_0": {"experts": QT.Q4_0, "shared": QT.Q8_0, "attn": QT.Q8_0, "embed": QT.Q8_0, "output": QT.Q8_0},
    # Experts Q4_K: 4.5 bpw like Q4_0 with ~18% lower RMS error (Gaussian weights; ~26% with
    # heavy tails). Lite's ffn_down_exps rows (1408) and dense ffn_down rows (10944) are not
    # multiples of 256 and fall back to Q4_0 / Q8_0. Shared experts, attention and output Q6_K
    # (6.56 bpw, 3x Q8_0's error but still ~5x below 4-bit). Embeddings stay Q8_0: on the demo
    # model a Q4_K token_embd alone raised held-out perplexity by 0.39% while every other class
    # together moved it by 0.01% (benchmarks/bench_quality.py); on Lite Q8_0 costs ~105 MB more.
    "q4_k_m": {"experts": QT.Q4_K, "shared": QT.Q6_K, "attn": QT.Q6_K, "embed": QT.Q8_0, "output": QT.Q6_K},
}

TYPE_NAMES = {t.name.lower(): t for t in (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_K, QT.Q6_K)}

# When a row is not a whole number of blocks: K-quants (256) fall back to a 32-block type of about
# the same size, 32-block types to F16 (llama.cpp does the same).
FALLBACK = {QT.Q4_K: QT.Q4_0, QT.Q6_K: QT.Q8_0, QT.Q4_0: QT.F16, QT.Q8_0: QT.F16, QT.F16: QT.F16, QT.BF16: QT.BF16}


def tensor_class(name: str) -> str | None:
    """The class of a GGUF tensor name, or None for tensors that always stay F32."""
    if name.endswith(FLOAT_ONLY_SUFFIXES):
        return None
    if is_expert_tensor(name):
        return "experts"
    if name == "token_embd.weight":
        return "embed"
    if name == "output.weight":
        return "output"
    if ".attn_" in name:
        return "attn"
    return "shared"


def resolve(preset: str, overrides: dict[str, str | None]) -> dict[str, QT]:
    if preset not in PRESETS:
        raise LiteError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    table = dict(PRESETS[preset])
    for cls, type_name in overrides.items():
        if type_name is None:
            continue
        if type_name.lower() not in TYPE_NAMES:
            raise LiteError(f"--{cls} {type_name}: unknown type (choose {', '.join(TYPE_NAMES)})")
        table[cls] = TYPE_NAMES[type_name.lower()]
    return table


def choose_type(name: str, shape: tuple[int, ...], table: dict[str, QT]) -> QT:
    cls = tensor_class(name)
    if cls is None or len(shape) < 2:
        return QT.F32
    qtype = table[cls]
    while shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = FALLBACK[qtype]
    return qtype
