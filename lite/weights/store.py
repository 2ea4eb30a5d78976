"""Access to a model's weights by GGUF name: resident tensors are zero-copy views of the memory
map; routed experts are handed out per layer and id by an expert source (here: the map itself;
the pager provides a RAM-budgeted one with the same interface)."""
from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np

from ..kernels.base import FFNWeights, QTensor
from ..kernels.dequant import dequantize
from .gguf_file import ModelFile


class ExpertSource(Protocol):
    def experts(self, layer: int, ids: Iterable[int]) -> dict[int, FFNWeights]:
        """The routed experts `ids` of `layer`, ready for `Backend.moe`."""
        ...


class MappedExperts:
    """Experts read straight through the memory map: the OS page cache decides what stays."""

    def __init__(self, mf: ModelFile) -> None:
        self._t = mf.tensors

    def experts(self, layer: int, ids: Iterable[int]) -> dict[int, FFNWeights]:
        p = f"blk.{layer}.ffn_"
        g, u, d = self._t[p + "gate_exps.weight"], self._t[p + "up_exps.weight"], self._t[p + "down_exps.weight"]
        return {int(e): FFNWeights(g.expert(int(e)), u.expert(int(e)), d.expert(int(e))) for e in ids}


def attention_up_projections(mf: ModelFile, layer: int) -> tuple[QTensor, QTensor]:
    """(attn_k_b `[H, C, N]`, attn_v_b `[H, V, C]`) in the current layout. Legacy files hold one
    `attn_kv_b` `[H·(N+V), C]`; it is split once at load, in float32 (W_UK must be transposed,
    which block formats cannot do in place)."""
    t = mf.tensors
    p = f"blk.{layer}."
    if mf.split_kv_b:
        return t[p + "attn_k_b.weight"], t[p + "attn_v_b.weight"]
    c = mf.config
    kv = dequantize(t[p + "attn_kv_b.weight"].data, t[p + "attn_kv_b.weight"].qtype)
    kv = kv.reshape(c.n_head, c.qk_nope + c.v_head, c.kv_lora_rank)
    k_b = np.ascontiguousarray(kv[:, :c.qk_nope, :].transpose(0, 2, 1))
    v_b = np.ascontiguousarray(kv[:, c.qk_nope:, :])
    return QTensor.from_float(p + "attn_k_b.weight", k_b), QTensor.from_float(p + "attn_v_b.weight", v_b)


def float_vector(t: QTensor) -> np.ndarray:
    """A 1-D tensor (norm weight) as float32."""
    return dequantize(t.data, t.qtype)
