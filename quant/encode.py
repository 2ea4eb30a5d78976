"""Float32 → ggml block bytes for one tensor (errors name the tensor), and its reconstruction error."""
from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as QT

from lite import LiteError
from lite.kernels.dequant import dequantize

from .blocks import quantize


def encode(a: np.ndarray, qtype: QT, tensor: str, weights: np.ndarray | None = None) -> np.ndarray:
    """Raw uint8 blocks `[..., row_bytes]` of `a` in `qtype`."""
    try:
        return quantize(a, qtype, weights)
    except LiteError as e:
        raise type(e)(f"tensor {tensor}: {e}") from None


def relative_error(a: np.ndarray, q: np.ndarray, qtype: QT) -> tuple[float, float]:
    """(Σ squared reconstruction error, Σ squared weight) — summed across tensors of a class."""
    d = dequantize(q, qtype) - a
    return float(np.dot(d.ravel(), d.ravel())), float(np.dot(a.ravel(), a.ravel()))
