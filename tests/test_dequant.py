"""numpy block dequantization is bit-exact with gguf.quants for every supported type."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf.constants import GGMLQuantizationType as QT

from lite.kernels.dequant import SUPPORTED, dequantize
from lite.errors import UnsupportedError


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: q.name)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_random_bytes_bit_exact(qtype, lead):
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype) * 7 + len(lead))
    cols = 2 * max(block, 256)
    raw = rng.integers(0, 256, size=(*lead, cols // block * size), dtype=np.uint8)
    with np.errstate(all="ignore"):  # random fp16 scale bytes include NaN/Inf on both sides
        got, want = dequantize(raw, qtype), quants.dequantize(raw, qtype)
    assert got.shape == (*lead, cols) and got.dtype == np.float32
    assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.F16, QT.BF16])
def test_roundtrip_of_quantized_weights(qtype):
    a = np.random.default_rng(1).standard_normal((7, 64)).astype(np.float32)
    q = quants.quantize(a, qtype)
    assert np.array_equal(dequantize(q.view(np.uint8).reshape(7, -1), qtype), quants.dequantize(q, qtype))


def test_unsupported_type_is_named():
    with pytest.raises(UnsupportedError, match="Q5_1"):
        dequantize(np.zeros((1, 24), np.uint8), QT.Q5_1)
