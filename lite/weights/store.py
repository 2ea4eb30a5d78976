"""Access to a model's weights by GGUF name: resident tensors are zero-copy views of the memory
map; routed experts are handed out per layer and id by an expert source (here: the map itself;
the pager provides a RAM-budgeted one with the same interface)."""
from __future__ import annotations

import mmap
from typing import Any, Iterable, Protocol

import numpy as np

from ..kernels.base import FFNWeights, QTensor
from ..kernels.dequant import dequantize
from .gguf_file import ModelFile


class ExpertSource(Protocol):
    def experts(self, layer: int, ids: Iterable[int]) -> dict[int, FFNWeights]:
        """The routed experts `ids` of `layer`, ready for `Backend.moe` (valid until the next call)."""
        ...

    def prefetch(self, layer: int, ids: Iterable[int]) -> None:
        """A hint that `ids` of `layer` will be asked for soon."""
        ...

    def note_prediction(self, predicted: Iterable[int], actual: Iterable[int]) -> None:
        """Record how well a prefetch guess matched the experts actually routed to."""
        ...

    def wants_guess(self, layer: int) -> bool:
        """Whether a prediction of `layer`'s experts would be used now (it costs a router pass)."""
        ...

    def table(self, layer: int) -> tuple[FFNWeights, ...] | None:
        """Every routed expert of `layer` by id, fixed for the source's lifetime (what lets one
        backend call run all layers), or None where experts move, as in a pool."""
        ...

    stats: Any


class MappedExperts:
    """Experts read straight through the memory map: the OS page cache decides what stays.
    Expert ranges are marked MADV_RANDOM (no readahead into unused experts) and prefetches
    become MADV_WILLNEED."""

    def __init__(self, mf: ModelFile) -> None:
        self.mf = mf
        self._t = mf.tensors
        self._views: dict[tuple[int, int], FFNWeights] = {}
        self.stats = None
        self._advise([t.data for n, t in mf.tensors.items() if n.endswith("_exps.weight")], "MADV_RANDOM")

    def _advise(self, views: Iterable[np.ndarray], flag: str) -> None:
        m = getattr(self.mf.mapping, "_mmap", None)   # numpy keeps the mmap object here
        advice = getattr(mmap, flag, None)
        if m is None or advice is None:
            return
        base = self.mf.mapping.ctypes.data            # the mapping starts at file offset 0
        for a in views:
            start = a.ctypes.data - base
            lo = start - start % mmap.PAGESIZE
            try:
                m.madvise(advice, lo, start + a.nbytes - lo)
            except (OSError, ValueError):
                return

    def experts(self, layer: int, ids: Iterable[int]) -> dict[int, FFNWeights]:
        return {int(e): self._expert(layer, int(e)) for e in ids}

    def _expert(self, layer: int, e: int) -> FFNWeights:
        # The views never change, so each is built once: the same array objects also let a
        # backend keep its per-weight validation and pointer caches warm (~2 ms/token saved).
        key = (layer, e)
        w = self._views.get(key)
        if w is None:
            p = f"blk.{layer}.ffn_"
            w = FFNWeights(*(self._t[p + part + "_exps.weight"].expert(e) for part in ("gate", "up", "down")))
            self._views[key] = w
        return w

    def prefetch(self, layer: int, ids: Iterable[int]) -> None:
        self._advise([w.data for f in self.experts(layer, ids).values() for w in (f.gate, f.up, f.down)],
                     "MADV_WILLNEED")

    def note_prediction(self, predicted: Iterable[int], actual: Iterable[int]) -> None:
        pass

    def wants_guess(self, layer: int) -> bool:
        return True

    def table(self, layer: int) -> tuple[FFNWeights, ...] | None:
        n = self._t[f"blk.{layer}.ffn_gate_exps.weight"].shape[0]
        return tuple(self._expert(layer, e) for e in range(n))

    def close(self) -> None:
        pass


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
