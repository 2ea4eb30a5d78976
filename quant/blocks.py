"""Block quantizers: float rows → ggml block bytes, in Numba.

`quantize(a, qtype)` takes a float array whose last axis is the row length (any leading shape:
a `[rows, cols]` matrix or a `[E, rows, cols]` expert tensor) and returns uint8 of shape
`(*a.shape[:-1], row_bytes)`, laid out exactly as ggml stores the blocks (the same layout
`gguf.quants.quantize` produces and `gguf.quants.dequantize` reads).

- `Q4_0`, `Q8_0`: byte-for-byte identical to `gguf.quants.quantize` (which mirrors ggml's reference
  quantizers): same float32 arithmetic, same rounding, same fp16 rounding of the scale.
- `Q4_K`, `Q6_K`: gguf has no quantizer for these. Ours search, per sub-block, for the scale (and
  for Q4_K the min) that minimise a weighted squared error, then quantize the sub-block scales to
  6 bits (Q4_K) or 8 bits (Q6_K) against the super-block fp16 `d`/`dmin`, trying the neighbours of
  the rounded sub-block scale and keeping the one with the smallest error. Optional per-column
  importance `weights` (an "imatrix" row) steer that search.
- `F32`, `F16`, `BF16`: identical to gguf (BF16: round to nearest even, NaNs forced quiet).

Inputs are validated (row length a multiple of the block size, float dtype, finite values,
scales representable in fp16); failures raise `lite.errors.FormatError` naming what is wrong.
Callers add the tensor name.
"""
from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES
from numba import prange

from lite.errors import FormatError, UnsupportedError

__all__ = ["quantize", "rel_error", "bits_per_weight", "SUPPORTED_TYPES"]

SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q6_K)

QK_K = 256
_F16_MAX = 65504.0

_f32 = np.float32


# --------------------------------------------------------------------------------------------
# Scalar helpers (inlined by LLVM into the kernels)
# --------------------------------------------------------------------------------------------

@numba.njit(cache=True, inline="always")
def _f32_to_f16_bits(f):
    """IEEE binary16 bits of float32 `f`, round to nearest even (numpy's astype(float16))."""
    x = np.float32(f).view(np.uint32)
    sign = (x >> np.uint32(16)) & np.uint32(0x8000)
    x = x & np.uint32(0x7FFFFFFF)
    if x >= np.uint32(0x7F800000):  # inf / nan
        if x > np.uint32(0x7F800000):
            return np.uint16(sign | np.uint32(0x7E00))
        return np.uint16(sign | np.uint32(0x7C00))
    if x >= np.uint32(0x477FF000):  # rounds to 65520 or more: overflow
        return np.uint16(sign | np.uint32(0x7C00))
    if x >= np.uint32(0x38800000):  # normal half: rebias exponent, round off 13 mantissa bits
        x = x - np.uint32(112 << 23)
        x = (x + np.uint32(0xFFF) + ((x >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        return np.uint16(sign | x)
    if x < np.uint32(0x33000000):  # below half the smallest subnormal: zero
        return np.uint16(sign)
    # subnormal half: value / 2**-24, rounded to nearest even
    e = np.int64(x >> np.uint32(23))
    m = np.int64((x & np.uint32(0x7FFFFF)) | np.uint32(0x800000))
    shift = 126 - e  # 14 .. 24
    q = m >> shift
    rem = m - (q << shift)
    half = np.int64(1) << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return np.uint16(sign | np.uint32(q))


@numba.njit(cache=True, inline="always")
def _f16_bits_to_f32(h):
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0:
        # zero or subnormal: m * 2**-24, exact in float32
        v = np.float32(m) * np.float32(5.9604644775390625e-08)
        return -v if sign else v
    if e == 31:
        bits = sign | np.uint32(0x7F800000) | (m << np.uint32(13))
    else:
        bits = sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))
    return np.uint32(bits).view(np.float32)


@numba.njit(cache=True, inline="always")
def _fp16_round_up(f):
    """Smallest fp16 value ≥ float32 `f` ≥ 0, as float32: a super-block scale that never
    underflows to zero and never pushes the largest sub-block scale past its integer range."""
    h = _f32_to_f16_bits(f)
    v = _f16_bits_to_f32(h)
    if v < f:
        v = _f16_bits_to_f32(np.uint16(h + np.uint16(1)))
    return v


@numba.njit(cache=True, inline="always")
def _put_u16(out, r, pos, h):
    out[r, pos] = np.uint8(h & np.uint16(0xFF))
    out[r, pos + 1] = np.uint8(h >> np.uint16(8))


@numba.njit(cache=True, inline="always")
def _nearest(v):
    """Round half away from zero, as an int (for the K-quant searches; not bit-critical)."""
    if v >= 0.0:
        return np.int64(np.floor(v + 0.5))
    return -np.int64(np.floor(-v + 0.5))


# --------------------------------------------------------------------------------------------
# Q4_0 / Q8_0 / BF16: exact replicas of gguf.quants (float32 arithmetic throughout)
# --------------------------------------------------------------------------------------------

@numba.njit(parallel=True, cache=True)
def _q4_0_rows(x, out):
    nrows, n = x.shape
    nb = n // 32
    for r in prange(nrows):
        for ib in range(nb):
            base = ib * 32
            # first element of largest magnitude, keeping its sign
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for i in range(32):
                v = x[r, base + i]
                av = abs(v)
                if av > amax:
                    amax = av
                    mx = v
            d = mx / np.float32(-8.0)
            inv = np.float32(0.0) if d == np.float32(0.0) else np.float32(1.0) / d
            o = ib * 18
            _put_u16(out, r, o, _f32_to_f16_bits(d))
            for j in range(16):
                v0 = x[r, base + j] * inv + np.float32(8.5)
                v1 = x[r, base + 16 + j] * inv + np.float32(8.5)
                q0 = min(max(np.int64(v0), 0), 15) if v0 == v0 else 0
                q1 = min(max(np.int64(v1), 0), 15) if v1 == v1 else 0
                out[r, o + 2 + j] = np.uint8(q0 | (q1 << 4))


@numba.njit(cache=True, inline="always")
def _roundf_f32(v):
    """gguf's np_roundf (round half away from zero) evaluated in float32, step for step."""
    a = abs(v)
    fl = np.floor(a)
    b = fl + np.floor(np.float32(2.0) * (a - fl))
    if v > 0:
        return b
    if v < 0:
        return -b
    return np.float32(0.0)


@numba.njit(parallel=True, cache=True)
def _q8_0_rows(x, out):
    nrows, n = x.shape
    nb = n // 32
    for r in prange(nrows):
        for ib in range(nb):
            base = ib * 32
            amax = np.float32(0.0)
            for i in range(32):
                av = abs(x[r, base + i])
                if av > amax:
                    amax = av
            d = amax / np.float32(127.0)
            inv = np.float32(0.0) if d == np.float32(0.0) else np.float32(1.0) / d
            o = ib * 34
            _put_u16(out, r, o, _f32_to_f16_bits(d))
            for i in range(32):
                q = _roundf_f32(x[r, base + i] * inv)
                qi = np.int64(q) if q == q else 0
                out[r, o + 2 + i] = np.uint8(qi & 0xFF)


@numba.njit(parallel=True, cache=True)
def _bf16_rows(u, out):
    """`u`: the float32 rows viewed as uint32."""
    nrows, n = u.shape
    for r in prange(nrows):
        for i in range(n):
            b = u[r, i]
            if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: force quiet
                b = (b & np.uint32(0xFFFF0000)) | np.uint32(64 << 16)
            wide = np.uint64(b) + np.uint64(0x7FFF) + np.uint64((b >> np.uint32(16)) & np.uint32(1))
            h = np.uint16((wide >> np.uint64(16)) & np.uint64(0xFFFF))
            _put_u16(out, r, 2 * i, h)


# --------------------------------------------------------------------------------------------
# Q4_K: 256-weight super-blocks of 8 sub-blocks of 32; x ≈ d·sc_j·q − dmin·m_j, q ∈ 0..15
# layout: d f16 | dmin f16 | scales[12] (6-bit sc/m packed) | qs[128]
# --------------------------------------------------------------------------------------------

@numba.njit(cache=True)
def _affine_err(x, w, s, b, nmax, L):
    """Quantize x ≈ s·q + b with q ∈ 0..nmax into L; return the weighted squared error."""
    err = 0.0
    inv = 1.0 / s if s != 0.0 else 0.0
    for i in range(x.shape[0]):
        q = _nearest((x[i] - b) * inv)
        q = min(max(q, 0), nmax)
        L[i] = q
        e = s * q + b - x[i]
        err += w[i] * e * e
    return err


@numba.njit(cache=True, inline="always")
def _lsq_affine(x, w, L):
    """Weighted least-squares line x ≈ s·L + b with b ≤ 0; returns (s, b, error)."""
    sw = 0.0
    sl = 0.0
    sl2 = 0.0
    sx = 0.0
    slx = 0.0
    sx2 = 0.0
    for i in range(x.shape[0]):
        q = L[i]
        wi = w[i]
        wx = wi * x[i]
        sw += wi
        sl += wi * q
        sl2 += wi * q * q
        sx += wx
        slx += wx * q
        sx2 += wx * x[i]
    det = sw * sl2 - sl * sl
    if det <= 0.0 or sl2 <= 0.0:
        return 0.0, 0.0, np.inf
    s = (sw * slx - sl * sx) / det
    b = (sl2 * sx - sl * slx) / det
    if b > 0.0:
        b = 0.0
        s = slx / sl2
    if s <= 0.0:
        return 0.0, 0.0, np.inf
    err = s * s * sl2 + b * b * sw + sx2 + 2.0 * s * b * sl - 2.0 * s * slx - 2.0 * b * sx
    return s, b, err


@numba.njit(cache=True)
def _fit_affine(x, w, nmax, L, Lt):
    """Weighted least-squares search for x ≈ s·q + b, q ∈ 0..nmax, b ≤ 0 (ggml stores −b ≥ 0).

    Each candidate grid (steps around nmax/range) gives an assignment q, refitted in closed form;
    the best fit is then refined by re-rounding with its own (s, b) and refitting while the error
    falls. Returns (s, −b) and leaves the chosen q in L."""
    n = x.shape[0]
    xmin = x[0]
    xmax = x[0]
    for i in range(1, n):
        xmin = min(xmin, x[i])
        xmax = max(xmax, x[i])
    if xmin > 0.0:
        xmin = 0.0
    if xmax <= xmin:
        for i in range(n):
            L[i] = 0
        return 0.0, -xmin
    rng = xmax - xmin
    best_s = rng / nmax
    best_b = xmin
    best = _affine_err(x, w, best_s, best_b, nmax, L)
    for k in range(21):
        iscale = (nmax - 1.0 + 0.1 * k) / rng
        for i in range(n):
            Lt[i] = min(max(_nearest(iscale * (x[i] - xmin)), 0), nmax)
        s, b, e = _lsq_affine(x, w, Lt)
        if e < best:
            best = e
            best_s = s
            best_b = b
    for _it in range(4):
        e = _affine_err(x, w, best_s, best_b, nmax, Lt)
        if e > best * (1.0 + 1e-12):
            break
        best = min(best, e)
        for i in range(n):
            L[i] = Lt[i]
        s, b, e2 = _lsq_affine(x, w, Lt)
        if not e2 < best:
            break
        best = e2
        best_s = s
        best_b = b
    return best_s, -best_b


@numba.njit(cache=True, inline="always")
def _importance(xb, imp, base, use_imp, w):
    """Per-element weights of one super-block: |x|-boosted by default, imatrix-scaled if given."""
    n = xb.shape[0]
    s2 = 0.0
    for i in range(n):
        s2 += xb[i] * xb[i]
    if use_imp:
        sigma2 = 2.0 * s2 / n
        for i in range(n):
            w[i] = imp[base + i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:
        av = np.sqrt(s2 / n)
        for i in range(n):
            w[i] = av + abs(xb[i])


@numba.njit(parallel=True, cache=True)
def _q4_k_rows(x, imp, use_imp, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        xb = np.empty(QK_K, np.float64)
        w = np.empty(QK_K, np.float64)
        L = np.empty(QK_K, np.int64)
        Lt = np.empty(32, np.int64)
        Lb = np.empty(32, np.int64)
        sc = np.empty(8, np.float64)
        mn = np.empty(8, np.float64)
        ls = np.empty(8, np.int64)
        lm = np.empty(8, np.int64)
        for ib in range(nb):
            base = ib * QK_K
            for i in range(QK_K):
                xb[i] = x[r, base + i]
            _importance(xb, imp, base, use_imp, w)
            max_sc = 0.0
            max_mn = 0.0
            for j in range(8):
                s, m = _fit_affine(xb[32 * j:32 * j + 32], w[32 * j:32 * j + 32], 15,
                                   L[32 * j:32 * j + 32], Lt)
                sc[j] = s
                mn[j] = m
                max_sc = max(max_sc, s)
                max_mn = max(max_mn, m)
            d = _fp16_round_up(np.float32(max_sc / 63.0))
            dmin = _fp16_round_up(np.float32(max_mn / 63.0))
            d64 = np.float64(d)
            dmin64 = np.float64(dmin)
            # choose each 6-bit (sc, m) pair among the neighbours of the rounded values
            for j in range(8):
                xs = xb[32 * j:32 * j + 32]
                ws = w[32 * j:32 * j + 32]
                r0 = _nearest(sc[j] / d64) if d64 > 0.0 else 0
                m0 = _nearest(mn[j] / dmin64) if dmin64 > 0.0 else 0
                best = np.inf
                bs = 0
                bm = 0
                for a in range(r0 - 1, r0 + 2):
                    if a < 0 or a > 63:
                        continue
                    for c in range(m0 - 1, m0 + 2):
                        if c < 0 or c > 63:
                            continue
                        e = _affine_err(xs, ws, np.float64(np.float32(d * np.float32(a))),
                                        -np.float64(np.float32(dmin * np.float32(c))), 15, Lt)
                        if e < best:
                            best = e
                            bs = a
                            bm = c
                            for i in range(32):
                                Lb[i] = Lt[i]
                ls[j] = bs
                lm[j] = bm
                for i in range(32):
                    L[32 * j + i] = Lb[i]
            o = ib * 144
            _put_u16(out, r, o, _f32_to_f16_bits(d))
            _put_u16(out, r, o + 2, _f32_to_f16_bits(dmin))
            # 12 scale bytes: sc0..3 / m0..3 low 6 bits in bytes 0..7; sc4..7 / m4..7 split
            for j in range(4):
                out[r, o + 4 + j] = np.uint8(ls[j] | ((ls[j + 4] >> 4) << 6))
                out[r, o + 8 + j] = np.uint8(lm[j] | ((lm[j + 4] >> 4) << 6))
                out[r, o + 12 + j] = np.uint8((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4))
            # qs: each 64-weight chunk → 32 bytes, low nibble first 32, high nibble next 32
            for c in range(4):
                for l in range(32):
                    out[r, o + 16 + 32 * c + l] = np.uint8(L[64 * c + l] | (L[64 * c + 32 + l] << 4))


# --------------------------------------------------------------------------------------------
# Q6_K: 256-weight super-blocks of 16 sub-blocks of 16; x ≈ d·sc_j·(q − 32), q ∈ 0..63
# layout: ql[128] | qh[64] | scales[16] (int8) | d f16
# --------------------------------------------------------------------------------------------

@numba.njit(cache=True)
def _sym_err(x, w, s, L):
    err = 0.0
    inv = 1.0 / s if s != 0.0 else 0.0
    for i in range(x.shape[0]):
        q = min(max(_nearest(x[i] * inv), -32), 31)
        L[i] = q
        e = s * q - x[i]
        err += w[i] * e * e
    return err


@numba.njit(cache=True)
def _fit_symmetric(x, w):
    """Weighted least-squares scale s for x ≈ s·q, q ∈ −32..31 (the value of largest magnitude
    may take −32). Candidate grids around −32/max, each refitted and refined."""
    n = x.shape[0]
    mx = 0.0
    amax = 0.0
    for i in range(n):
        if abs(x[i]) > amax:
            amax = abs(x[i])
            mx = x[i]
    if amax == 0.0:
        return 0.0
    best_s = 0.0
    best_g = -1.0  # maximise (Σw·l·x)² / Σw·l², i.e. minimise the error of the fitted scale
    for k in range(-9, 10):
        iscale = -(32.0 + 0.1 * k) / mx
        for _it in range(3):
            slx = 0.0
            sl2 = 0.0
            for i in range(n):
                q = min(max(_nearest(iscale * x[i]), -32), 31)
                slx += w[i] * q * x[i]
                sl2 += w[i] * q * q
            if sl2 <= 0.0:
                break
            g = slx * slx / sl2
            if g > best_g:
                best_g = g
                best_s = slx / sl2
            else:
                break
            if slx == 0.0:
                break
            iscale = sl2 / slx  # re-round with the fitted scale
    return best_s


@numba.njit(parallel=True, cache=True)
def _q6_k_rows(x, imp, use_imp, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        xb = np.empty(QK_K, np.float64)
        w = np.empty(QK_K, np.float64)
        L = np.empty(QK_K, np.int64)
        Lt = np.empty(16, np.int64)
        sc = np.empty(16, np.float64)
        isc = np.empty(16, np.int64)
        for ib in range(nb):
            base = ib * QK_K
            for i in range(QK_K):
                xb[i] = x[r, base + i]
            _importance(xb, imp, base, use_imp, w)
            max_s = 0.0
            for j in range(16):
                s = _fit_symmetric(xb[16 * j:16 * j + 16], w[16 * j:16 * j + 16])
                sc[j] = s
                if abs(s) > abs(max_s):
                    max_s = s
            if max_s == 0.0:
                d = np.float32(0.0)
            else:
                d = _fp16_round_up(np.float32(abs(max_s) / 128.0))
                if max_s > 0.0:
                    d = -d
            d64 = np.float64(d)
            for j in range(16):
                xs = xb[16 * j:16 * j + 16]
                ws = w[16 * j:16 * j + 16]
                r0 = _nearest(sc[j] / d64) if d64 != 0.0 else 0
                best = np.inf
                bs = 0
                for a in range(r0 - 1, r0 + 2):
                    if a < -128 or a > 127:
                        continue
                    e = _sym_err(xs, ws, np.float64(np.float32(d * np.float32(a))), Lt)
                    if e < best:
                        best = e
                        bs = a
                        for i in range(16):
                            L[16 * j + i] = Lt[i] + 32
                isc[j] = bs
            o = ib * 210
            for h in range(2):  # two 128-weight halves: 64 ql bytes + 32 qh bytes each
                for l in range(32):
                    q1 = L[128 * h + l]
                    q2 = L[128 * h + 32 + l]
                    q3 = L[128 * h + 64 + l]
                    q4 = L[128 * h + 96 + l]
                    out[r, o + 64 * h + l] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
                    out[r, o + 64 * h + 32 + l] = np.uint8((q2 & 0xF) | ((q4 & 0xF) << 4))
                    out[r, o + 128 + 32 * h + l] = np.uint8(
                        (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))
            for j in range(16):
                out[r, o + 192 + j] = np.uint8(isc[j] & 0xFF)
            _put_u16(out, r, o + 208, _f32_to_f16_bits(d))


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

# Largest |x| whose block scale still fits fp16 (beyond it ggml would store inf scales).
_MAX_ABS = {
    QT.F16: 65504.0,
    QT.Q4_0: _F16_MAX * 8.0,
    QT.Q8_0: _F16_MAX * 127.0,
    QT.Q4_K: _F16_MAX * 63.0 / 2.0,   # sub-block mins reach |x|, scales (max−min)/15
    QT.Q6_K: _F16_MAX * 128.0 * 31.0,
}


def _qtype(qtype) -> QT:
    try:
        qt = QT(qtype)
    except ValueError:
        raise UnsupportedError(f"unknown GGML quantization type {qtype!r}") from None
    if qt not in SUPPORTED_TYPES:
        raise UnsupportedError(
            f"quantizing to {qt.name} is not supported (supported: "
            f"{', '.join(t.name for t in SUPPORTED_TYPES)})")
    return qt


def bits_per_weight(qtype) -> float:
    """Storage cost of one weight in `qtype`, scales included (Q4_0 and Q4_K: 4.5)."""
    qt = _qtype(qtype)
    block_size, type_size = GGML_QUANT_SIZES[qt]
    return type_size * 8.0 / block_size


def _check_input(a, qt: QT) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise FormatError(f"expected a numpy array to quantize to {qt.name}, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise FormatError(f"expected a float array to quantize to {qt.name}, got dtype {a.dtype}")
    if a.ndim == 0:
        raise FormatError(f"expected an array with a row axis to quantize to {qt.name}, got a scalar")
    block_size = GGML_QUANT_SIZES[qt][0]
    n = a.shape[-1]
    if n == 0 or n % block_size != 0:
        raise FormatError(
            f"row length {n} is not a positive multiple of the {qt.name} block size {block_size} "
            f"(shape {a.shape})")
    if a.size:
        finite = np.isfinite(a)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise FormatError(
                f"cannot quantize to {qt.name}: non-finite value {a[tuple(bad)]} at index "
                f"{tuple(int(i) for i in bad)} (shape {a.shape})")
        limit = _MAX_ABS.get(qt)
        if limit is not None:
            amax = float(np.max(np.abs(a)))
            if amax >= limit:
                raise FormatError(
                    f"cannot quantize to {qt.name}: max |value| {amax:g} overflows the fp16 "
                    f"{'values' if qt == QT.F16 else 'block scales'} (limit {limit:g})")
    return a


def _check_weights(weights, n: int, qt: QT):
    if weights is None:
        return np.ones(1, np.float64), False
    w = np.asarray(weights)
    if w.dtype.kind not in "fiu":
        raise FormatError(f"importance weights for {qt.name} must be numeric, got dtype {w.dtype}")
    if w.ndim != 1 or w.shape[0] != n:
        raise FormatError(
            f"importance weights for {qt.name} must have shape ({n},) (one per column), "
            f"got {w.shape}")
    w = w.astype(np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        raise FormatError(f"importance weights for {qt.name} must be finite and non-negative")
    if not (w > 0).any():
        raise FormatError(f"importance weights for {qt.name} are all zero")
    # a floor, so that columns of zero importance are still fitted rather than zeroed
    w = w + 1e-4 * w.mean()
    return np.ascontiguousarray(w), True


def quantize(a: np.ndarray, qtype, weights: np.ndarray | None = None) -> np.ndarray:
    """Quantize float rows to ggml blocks: uint8 of shape `(*a.shape[:-1], row_bytes)`.

    `weights` (optional, length = row length) is a per-column importance used by the Q4_K and
    Q6_K error-minimising searches; the other types ignore it."""
    qt = _qtype(qtype)
    _check_input(a, qt)
    n = a.shape[-1]
    block_size, type_size = GGML_QUANT_SIZES[qt]
    row_bytes = n // block_size * type_size
    lead = a.shape[:-1]

    if qt == QT.F16:
        # convert from the source dtype directly, as gguf does (no float64→f32→f16 double rounding)
        return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(*lead, row_bytes)
    x = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, n)
    if qt == QT.F32:
        if np.shares_memory(x, a):
            x = x.copy()  # never hand back a view of the caller's array
        return x.view(np.uint8).reshape(*lead, row_bytes)
    out = np.empty((x.shape[0], row_bytes), np.uint8)
    if x.shape[0]:
        if qt == QT.BF16:
            _bf16_rows(x.view(np.uint32), out)
        elif qt == QT.Q4_0:
            _q4_0_rows(x, out)
        elif qt == QT.Q8_0:
            _q8_0_rows(x, out)
        else:
            imp, use_imp = _check_weights(weights, n, qt)
            if qt == QT.Q4_K:
                _q4_k_rows(x, imp, use_imp, out)
            else:
                _q6_k_rows(x, imp, use_imp, out)
    return out.reshape(*lead, row_bytes)


def dequantize(q: np.ndarray, qtype) -> np.ndarray:
    """Blocks back to float32 rows, via `gguf.quants.dequantize` (the reference reader)."""
    qt = _qtype(qtype)
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if qt in (QT.F32, QT.F16):
        return gguf_quants.dequantize(q, qt).astype(np.float32, copy=False)
    return gguf_quants.dequantize(q, qt)


def rel_error(a: np.ndarray, q: np.ndarray, qtype) -> float:
    """RMS(dequant(q) − a) / RMS(a); 0 when both are zero, inf when only `a` is."""
    ref = np.asarray(a, dtype=np.float64)
    back = dequantize(q, qtype).astype(np.float64).reshape(ref.shape)
    err = float(np.sqrt(np.mean((back - ref) ** 2))) if ref.size else 0.0
    rms = float(np.sqrt(np.mean(ref ** 2))) if ref.size else 0.0
    if rms == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / rms
