"""Tests of quant.blocks: Q4_0 / Q8_0 / F32 / F16 / BF16 byte-identical to gguf.quants; Q4_K and
Q6_K checked through gguf's dequantizers; input validation.

Error thresholds for the K-quants (measured on these seeds, then given ~10-15% headroom):
Gaussian 64×1024: Q4_0 0.0865, Q4_K 0.0712, Q6_K 0.0174. Student-t(3): Q4_0 0.127, Q4_K 0.0908,
Q6_K 0.0251. Student-t(3) with 8 columns ×20: Q4_0 0.123, Q4_K 0.0895, Q6_K 0.0308.
Q4_K and Q4_0 both cost 4.5 bits/weight, so Q4_K (scale + min per 32, fitted by search) must beat
Q4_0 (one max-derived scale per 32); Q6_K's 6 bits per weight should sit ~4× below Q4_K.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from lite.errors import FormatError, LiteError, UnsupportedError
from quant import blocks
from quant.blocks import _bf16_rows, _f16_bits_to_f32, _f32_to_f16_bits


def _ref_bytes(a: np.ndarray, qt: QT) -> np.ndarray:
    """gguf.quants.quantize output as uint8 rows (F32/F16 come back as float arrays)."""
    r = np.ascontiguousarray(gq.quantize(a, qt))
    return r.view(np.uint8).reshape(*a.shape[:-1], -1)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _exact_cases():
    rng = _rng(0)
    cases = {
        "uniform": rng.uniform(-1, 1, (7, 256)),
        "gaussian": rng.standard_normal((33, 128)) * 0.02,
        "tiny": rng.standard_normal((5, 64)) * 1e-7,
        "tinier": rng.standard_normal((3, 96)) * 1e-20,
        "zeros": np.zeros((3, 64)),
        "positive": rng.uniform(0, 3, (9, 64)),
        "negative": -rng.uniform(0, 3, (9, 64)),
        "student_t": rng.standard_t(3, (11, 320)),
        "one_d": rng.standard_normal(160),
        "three_d": rng.standard_normal((3, 5, 64)),
        # exact ties and halfway points: ±max in one block, values on k + 0.5 after scaling
        "ties": np.tile(np.concatenate([[-4.0, 4.0], np.arange(30) / 4.0 - 3.5]), (3, 2)),
        "halves": np.tile(np.arange(-15.5, 16.5, 1.0), (2, 1)) * (127 / 15.5),
        "mixed_rows": np.stack([np.full(64, 2.5), np.full(64, -2.5), np.r_[np.zeros(63), [-1e-3]]]),
    }
    return {k: v.astype(np.float32) for k, v in cases.items()}


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q8_0, QT.BF16, QT.F16, QT.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(_exact_cases()))
def test_bytes_identical_to_gguf(qt, case):
    a = _exact_cases()[case]
    q = blocks.quantize(a, qt)
    ref = _ref_bytes(a, qt)
    assert q.dtype == np.uint8
    assert q.shape == ref.shape == (*a.shape[:-1], a.shape[-1] // gq.GGML_QUANT_SIZES[qt][0]
                                    * gq.GGML_QUANT_SIZES[qt][1])
    np.testing.assert_array_equal(q, ref)


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q8_0, QT.BF16, QT.F16], ids=lambda t: t.name)
def test_float64_and_noncontiguous_input_match_gguf(qt):
    a = _rng(1).standard_normal((6, 128))  # float64: gguf converts it the same way
    np.testing.assert_array_equal(blocks.quantize(a, qt), _ref_bytes(a, qt))
    b = _rng(2).standard_normal((64, 10)).astype(np.float32).T  # Fortran-ordered rows
    np.testing.assert_array_equal(blocks.quantize(b[:, :64], qt), _ref_bytes(np.ascontiguousarray(b[:, :64]), qt))


def test_f32_output_is_a_copy():
    a = np.ones((2, 32), np.float32)
    q = blocks.quantize(a, QT.F32)
    a[:] = 5
    assert (q.view(np.float32) == 1).all()


@numba.njit(cache=True)
def _to_f16_all(x, out):
    for i in range(x.shape[0]):
        out[i] = _f32_to_f16_bits(x[i])


@numba.njit(cache=True)
def _from_f16_all(h, out):
    for i in range(h.shape[0]):
        out[i] = _f16_bits_to_f32(h[i])


def test_fp16_conversion_matches_numpy():
    rng = _rng(3)
    # random bit patterns biased towards fp16's range, plus every rounding boundary region
    bits = np.concatenate([
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
        (rng.integers(0x30000000, 0x48000000, 200_000)).astype(np.uint32),
        np.array([0, 0x80000000, 0x33000000, 0x33000001, 0x32FFFFFF, 0x387FE000, 0x387FF000,
                  0x38800000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x7F7FFFFF, 0x7F800000,
                  0xFF800000], np.uint32),
    ])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    got = np.empty(x.shape, np.uint16)
    _to_f16_all(x, got)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got, x.astype(np.float16).view(np.uint16))
    allh = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    back = np.empty(65536, np.float32)
    _from_f16_all(allh, back)
    ref = allh.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert (np.isnan(back) == nan).all()
    np.testing.assert_array_equal(back[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_bf16_kernel_rounding_and_nan_match_gguf():
    rng = _rng(4)
    bits = np.concatenate([
        rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32),
        np.array([0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFF8000, 0x3F808000, 0x3F818000,
                  0x3F807FFF, 0x7F7FFFFF, 0x7F800000], np.uint32),  # NaNs, ties, overflow
    ]).reshape(1, -1)
    out = np.empty((1, bits.shape[1] * 2), np.uint8)
    _bf16_rows(bits, out)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gq.quantize(bits.view(np.float32), QT.BF16)
    np.testing.assert_array_equal(out, ref.reshape(out.shape))


# ---------------------------------------------------------------------------------------------
# K-quants
# ---------------------------------------------------------------------------------------------

def _matrices():
    rng = _rng(1)
    g = rng.standard_normal((64, 1024)).astype(np.float32)
    t = rng.standard_t(3, (64, 1024)).astype(np.float32)
    t_out = t.copy()
    t_out[:, rng.choice(1024, 8, replace=False)] *= 20
    return {"gaussian": g, "student_t3": t, "student_t3_outliers": t_out}


# (Q4_K max, Q6_K max) relative error per matrix; see the module docstring for measured values
_LIMITS = {"gaussian": (0.08, 0.02), "student_t3": (0.10, 0.029), "student_t3_outliers": (0.10, 0.035)}


@pytest.mark.parametrize("case", list(_LIMITS))
def test_k_quants_reconstruct_and_beat_q4_0(case):
    a = _matrices()[case]
    errs = {}
    for qt in (QT.Q4_0, QT.Q4_K, QT.Q6_K):
        q = blocks.quantize(a, qt)
        assert q.shape == (a.shape[0], a.shape[1] // gq.GGML_QUANT_SIZES[qt][0] * gq.GGML_QUANT_SIZES[qt][1])
        errs[qt] = blocks.rel_error(a, q, qt)
    q4k, q6k = _LIMITS[case]
    assert errs[QT.Q4_K] < q4k, errs
    assert errs[QT.Q6_K] < q6k, errs
    assert errs[QT.Q4_K] < 0.9 * errs[QT.Q4_0], errs  # same 4.5 bits/weight, clearly better
    assert errs[QT.Q6_K] < errs[QT.Q4_K] / 2.5, errs


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_k_quant_edge_rows(qt):
    rng = _rng(5)
    a = np.stack([
        np.zeros(512),
        np.full(512, 0.75),
        np.full(512, -0.75),
        np.r_[np.zeros(256), rng.standard_normal(256)],  # an all-zero super-block next to data
        rng.standard_normal(512) * 1e-6,  # tiny magnitudes: scales are fp16 subnormals or less
        rng.uniform(0, 1, 512),  # one-signed rows: Q4_K's min is pinned at 0
    ]).astype(np.float32)
    q = blocks.quantize(a, qt)
    back = gq.dequantize(q, qt)
    np.testing.assert_array_equal(back[0], 0)
    np.testing.assert_array_equal(back[3, :256], 0)
    np.testing.assert_allclose(back[1], 0.75, rtol=2e-3)
    np.testing.assert_allclose(back[2], -0.75, rtol=2e-3)
    lim = 0.08 if qt == QT.Q4_K else 0.02
    assert blocks.rel_error(a[3:4], q[3:4], qt) < lim
    assert blocks.rel_error(a[5:6], q[5:6], qt) < lim
    # tiny magnitudes: the fp16 d is subnormal (rounded up, never to 0); measured 0.077 / 0.026
    assert blocks.rel_error(a[4:5], q[4:5], qt) < 0.15


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_k_quant_shapes_1d_3d(qt):
    a = _rng(6).standard_normal((2, 3, 256)).astype(np.float32)
    q3 = blocks.quantize(a, qt)
    assert q3.shape == (2, 3, gq.GGML_QUANT_SIZES[qt][1])
    np.testing.assert_array_equal(q3.reshape(6, -1), blocks.quantize(a.reshape(6, 256), qt))
    np.testing.assert_array_equal(blocks.quantize(a[1, 2], qt), q3[1, 2])


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_importance_weights_reduce_error_where_important(qt):
    rng = _rng(7)
    a = rng.standard_t(4, (32, 512)).astype(np.float32)
    imp = np.ones(512)
    hot = rng.choice(512, 24, replace=False)
    imp[hot] = 200.0
    plain = gq.dequantize(blocks.quantize(a, qt), qt)
    weighted = gq.dequantize(blocks.quantize(a, qt, weights=imp), qt)
    e_plain = np.sqrt(np.mean((plain[:, hot] - a[:, hot]) ** 2))
    e_weighted = np.sqrt(np.mean((weighted[:, hot] - a[:, hot]) ** 2))
    assert e_weighted < 0.8 * e_plain, (e_weighted, e_plain)
    # zero importance somewhere does not zero those columns
    imp0 = np.ones(512)
    imp0[:64] = 0
    back = gq.dequantize(blocks.quantize(a, qt, weights=imp0), qt)
    assert blocks.rel_error(a[:, :64], blocks.quantize(a[:, :64].copy(), QT.F32), QT.F32) == 0
    assert np.sqrt(np.mean((back[:, :64] - a[:, :64]) ** 2)) < 0.2 * np.sqrt(np.mean(a[:, :64] ** 2))


# ---------------------------------------------------------------------------------------------
# Validation and helpers
# ---------------------------------------------------------------------------------------------

def test_bits_per_weight():
    assert blocks.bits_per_weight(QT.Q4_0) == 4.5
    assert blocks.bits_per_weight(QT.Q4_K) == 4.5
    assert blocks.bits_per_weight(QT.Q8_0) == 8.5
    assert blocks.bits_per_weight(QT.Q6_K) == 6.5625
    assert blocks.bits_per_weight(QT.BF16) == 16
    assert blocks.bits_per_weight(QT.F32) == 32


def test_rel_error_basics():
    z = np.zeros((2, 32), np.float32)
    assert blocks.rel_error(z, blocks.quantize(z, QT.Q8_0), QT.Q8_0) == 0.0
    a = _rng(8).standard_normal((4, 64)).astype(np.float32)
    assert blocks.rel_error(a, blocks.quantize(a, QT.F32), QT.F32) == 0.0
    assert 0 < blocks.rel_error(a, blocks.quantize(a, QT.F16), QT.F16) < 1e-3


@pytest.mark.parametrize("a, qt, match", [
    (np.zeros((2, 48), np.float32), QT.Q4_0, "row length 48 .* Q4_0 block size 32"),
    (np.zeros((2, 1408), np.float32), QT.Q4_K, "row length 1408 .* Q4_K block size 256"),
    (np.zeros((2, 0), np.float32), QT.Q8_0, "row length 0"),
    (np.zeros((2, 32), np.int32), QT.Q8_0, "float array .* int32"),
    (np.zeros((2, 32), np.float32)[0, 0], QT.Q8_0, "numpy array"),
    (np.array(1.0, np.float32), QT.Q8_0, "scalar"),
    (np.r_[np.zeros(40), [np.nan], np.zeros(23)].astype(np.float32), QT.Q4_0, r"non-finite value nan at index \(40,\)"),
    (np.r_[np.zeros(40), [-np.inf], np.zeros(23)].astype(np.float32).reshape(2, 32), QT.BF16, r"non-finite value -inf at index \(1, 8\)"),
    (np.full((1, 32), 1e6, np.float32), QT.Q4_0, "overflows the fp16 block scales"),
    (np.full((1, 32), 7e4, np.float32), QT.F16, "overflows the fp16 values"),
])
def test_bad_input_raises_format_error(a, qt, match):
    with pytest.raises(FormatError, match=match) as ei:
        blocks.quantize(a, qt)
    assert isinstance(ei.value, LiteError) and not isinstance(ei.value, ValueError)


def test_unsupported_type_and_bad_weights():
    a = np.zeros((2, 256), np.float32)
    with pytest.raises(UnsupportedError, match="Q5_0"):
        blocks.quantize(a, QT.Q5_0)
    with pytest.raises(FormatError, match=r"shape \(256,\)"):
        blocks.quantize(a, QT.Q4_K, weights=np.ones(128))
    with pytest.raises(FormatError, match="non-negative"):
        blocks.quantize(a, QT.Q6_K, weights=-np.ones(256))
    with pytest.raises(FormatError, match="all zero"):
        blocks.quantize(a, QT.Q6_K, weights=np.zeros(256))


def test_empty_leading_axis():
    q = blocks.quantize(np.zeros((0, 256), np.float32), QT.Q4_K)
    assert q.shape == (0, 144) and q.dtype == np.uint8
