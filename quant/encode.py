"""Float32 → ggml block bytes for one tensor, and its reconstruction error."""
from __future__ import annotations

import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType as QT

from lite import FormatError
from lite.kernels.dequant import dequantize


def encode(a: np.ndarray, qtype: QT, tensor: str) -> np.ndarray:
    """Raw uint8 blocks `[..., row_bytes]` of `a` in `qtype`."""
    try:
        q = quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)
    except (ValueError, NotImplementedError, quants.QuantError) as e:
        raise FormatError(f"tensor {tensor}: cannot encode as {qtype.name} ({e})") from None
    return np.ascontiguousarray(q).view(np.uint8).reshape(*a.shape[:-1], -1)


def relative_error(a: np.ndarray, q: np.ndarray, qtype: QT) -> tuple[float, float]:
    """(Σ squared reconstruction error, Σ squared weight) — summed across tensors of a class."""
    d = dequantize(q, qtype) - a
    return float(np.dot(d.ravel(), d.ravel())), float(np.dot(a.ravel(), a.ravel()))
