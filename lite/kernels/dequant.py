"""ggml block formats decoded to float32 in plain numpy: the spec the fast kernels are checked
against, and bit-exact with `gguf.quants.dequantize` (same float32 operation order).

Input: uint8 `[..., row_bytes]` as stored in GGUF; output float32 `[..., cols]`.
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ..errors import UnsupportedError

QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, :2])
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return d * q


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, :2])
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte 6-bit (scale, min) pairs of Q4_K super-blocks: `[n, 12]` → two `[n, 8]`."""
    s = scales.astype(np.uint8)
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, mn


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = q4_k_scale_min(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(n, 4, 32)
    # Each 32-byte chunk holds two sub-blocks: low nibbles first, then high nibbles.
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    scale = (d * sc.astype(np.float32)).reshape(n, 8, 1)
    offset = (dmin * mn.astype(np.float32)).reshape(n, 8, 1)
    return (scale * q - offset).reshape(n, QK_K)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:210])
    lo = np.stack([ql.reshape(n, 2, 64) & 0x0F, ql.reshape(n, 2, 64) >> 4], axis=2).reshape(n, 2, 4, 32)
    hi = np.stack([(qh.reshape(n, 2, 32) >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    return ((d * sc).reshape(n, 16, 1) * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


_BLOCK_DECODERS = {QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_K: _q4_k, QT.Q6_K: _q6_k}
SUPPORTED = (QT.F32, QT.F16, QT.BF16, *_BLOCK_DECODERS)


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Raw ggml bytes `[..., row_bytes]` of type `qtype` → float32 `[..., cols]`."""
    raw = np.ascontiguousarray(data).view(np.uint8)
    lead = raw.shape[:-1]
    if qtype == QT.F32:
        return raw.view(np.float32).copy()
    if qtype == QT.F16:
        return raw.view(np.float16).astype(np.float32)
    if qtype == QT.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    decode = _BLOCK_DECODERS.get(qtype)
    if decode is None:
        raise UnsupportedError(f"block type {qtype.name} is not supported (supported: "
                               f"{', '.join(t.name for t in SUPPORTED)})")
    block, size = GGML_QUANT_SIZES[qtype]
    out = decode(raw.reshape(-1, size))
    return out.reshape(*lead, raw.shape[-1] // size * block)
