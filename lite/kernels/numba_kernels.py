"""Numba kernels behind `NumbaBackend`: fused dequantize-and-dot for every ggml block type, the
row-parallel matmul (and its all-heads form), the small elementwise ops, absorbed MLA attention
and the one-call MoE layer.

Nothing here validates its inputs: `numba_backend.py` checks every shape, dtype and byte count
before calling in, so these loops may index without bounds checks.

Numerics: a one- or two-token product with quantized weights quantizes its activations to 8-bit
blocks first, as the C kernels do (Q4_0 and Q8_0: ggml's Q8_0, d = amax/127 rounded to float16
per 32, q = roundf(x/d); Q4_K and Q6_K: d = amax/127 per 256), and sums integer products, so it
agrees with the C backend's product (and with the reference to that quantization's error). Every
other product (float weights; more tokens) dequantizes weights block by block in registers and
multiplies them into float32 activations, so it agrees with the numpy reference to float32
rounding. Reductions are compiled with fastmath flags `reassoc` and `contract` only,
which lets LLVM keep several SIMD partial sums (and fuse multiply-adds); no flag that changes
inf/nan/signed-zero semantics is used. Elementwise kernels use no fastmath at all.

Shape legend: T tokens, S cached positions, H heads, C latent width, R rope dims, N weight rows,
K (here) row length of a weight, D hidden, F expert width.
"""
from __future__ import annotations

import math

import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from llvmlite import ir
from numba.extending import intrinsic, models, register_model

# ggml type codes (gguf.constants.GGMLQuantizationType values).
F32, F16, Q4_0, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 8, 12, 14, 30

FM = {"reassoc", "contract"}

# The inner block loops' trip count, given to every kernel at run time (see the dot kernels).
N16 = 16

# float16 / bfloat16 bit patterns → float32, exact (numba has no float16 arithmetic).
LUT_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
LUT_BF16 = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32).copy()


@intrinsic
def _u8ptr(typingctx, addr):
    """An int64 address → `uint8*` (MoE receives its expert slices as addresses)."""
    if not isinstance(addr, types.Integer):
        return None
    ptr = types.CPointer(types.uint8)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(addr), codegen


# ---------------------------------------------------------------------------------------------
# One weight row · one float32 activation row. `row` is the row's raw ggml bytes.
#
# Two rules keep these loops vectorised (measured on a float Q8_0 dot this module once had, 2048x2048,
# T=1, one thread: 1.2 → 7 GB/s; they hold for the row decoder and the float dots):
# - Each block is read through slices (`row[o:o + 34]`, `x[b * 32:b * 32 + 32]`) indexed by the
#   loop counter, which LLVM knows is ≥ 0. An index like `row[o + 2 + j]` may be negative as far
#   as LLVM knows, so numba's negative-index wraparound stays in and every load becomes a scalar
#   load plus an insert.
# - The inner loop's trip count is `n16` (always 16, or 2 * n16 = 32), passed in at run time from
#   Python. With a literal 16 or 32, LLVM unrolls the loop completely before its loop vectoriser
#   runs and the SLP vectoriser then leaves the unrolled code scalar. Q4_K's row decoder is the
#   exception. The Q4_0, Q8_0 and K-quant dots are explicit vectors (below) and need neither rule.

@njit(cache=True, fastmath=FM)
def _dot_f32v(a, b):
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(cache=True, fastmath=FM)
def _dot_lut(row, x, lut):
    u = row.view(np.uint16)
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += lut[u[i]] * x[i]
    return s




# Q4_0 and Q8_0 (one or two tokens) read x quantized to 8-bit blocks: `_prep` writes, at the
# start of the prepared row, x's int8 quants (K bytes, as K / 4 floats), then each block's scale d
# (float16-rounded, as ggml stores it) and the sum of its quants, and `_dot_a8` multiplies the
# weights' quants into them as integers (see `_a8_pair`) and each block's sum by d_w·d_x, taking
# the offset (Q4_0's 8, Q8_0's bias of 128) off with the quants' sums.
#
# Q4_K and Q6_K read x quantized to 256-blocks (the C kernels' Q8_K), with the sums of quants over
# each 32 (Q4_K's mins) and each 16 (Q6_K's −32; see `_q4k_block`, `_q6k_block`).

@njit(cache=True, inline="always")
def _prep_layout(k):
    """Where a prepared row of x `[K]` keeps each part, in floats: the Q8_0 blocks' scales and
    sums of quants (their int8 quants are its first K bytes), then the Q8_K blocks' quants (K
    bytes), scales, sums over 32 and sums over 16, and the row's width."""
    a8_d = k // 4
    a8_s = a8_d + k // 32
    q8k = a8_s + k // 32
    q8k_d = q8k + k // 4
    q8k_s32 = q8k_d + k // 256
    q8k_s16 = q8k_s32 + k // 32
    return a8_d, a8_s, q8k, q8k_d, q8k_s32, q8k_s16, q8k_s16 + k // 16


@njit(cache=True, inline="always")
def _prep_width(k):
    """The width of a prepared row of x `[K]` (`_prep_layout`)."""
    return _prep_layout(k)[6]


@njit(cache=True, inline="always")
def _roundf(v):
    """C's roundf (halves away from zero) of a float32, exactly: |v| + 0.5 in float64."""
    r = math.floor(abs(np.float64(v)) + 0.5)
    return r if v >= 0 else -r


@njit(cache=True, inline="always")
def _quant_block(xv, xq, o):
    """The block xv as int8 quants at xq[o:o + len(xv)] (d = amax/127, q = roundf(x/d), as C's
    quantizer): its d and the sum of its quants."""
    amax = np.float32(0.0)
    for j in range(xv.shape[0]):
        a = abs(xv[j])
        amax = a if a > amax else amax
    d = amax / np.float32(127.0)
    inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
    total = 0
    for j in range(xv.shape[0]):
        q = int(_roundf(xv[j] * inv))
        xq[o + j] = q
        total += q
    return d, total


@njit(cache=True)
def _prep(x, xp):
    """x `[T, K]` → xp `[T, _prep_width(K)]`: x as 8-bit blocks, bit for bit as the C kernels
    quantize it: for Q4_0 and Q8_0 ggml's Q8_0 (int8 quants, each 32-block's float16-rounded
    scale and its quants' sum), for the K-quants Q8_K (int8 quants, each 256-block's scale, the
    sums of its quants over each 32 and each 16)."""
    k = x.shape[1]
    a8_d, a8_s, q8k, q8k_d, s32, s16, _ = _prep_layout(k)
    for t in range(x.shape[0]):
        xq = xp[t, :q8k_d].view(np.int8)
        for b in range(k // 32):
            d, total = _quant_block(x[t, b * 32:b * 32 + 32], xq, b * 32)
            xp[t, a8_d + b] = _f16_round(d)
            xp[t, a8_s + b] = np.float32(total)
        if k % 256 == 0:
            for b in range(k // 256):
                d, _ = _quant_block(x[t, b * 256:b * 256 + 256], xq, 4 * q8k + b * 256)
                xp[t, q8k_d + b] = d
                for j in range(16):
                    total = 0
                    for i in range(16):
                        total += xq[4 * q8k + b * 256 + 16 * j + i]
                    xp[t, s16 + 16 * b + j] = np.float32(total)
                for j in range(8):
                    xp[t, s32 + 8 * b + j] = xp[t, s16 + 16 * b + 2 * j] + xp[t, s16 + 16 * b + 2 * j + 1]


# Explicit vectors (`V16`, an LLVM <16 x float>, and intrinsics on them) for the dots
# of the quantized kinds. Written as numba loops, LLVM kept a row's lane sums in a vector for
# four blocks at most (a horizontal sum, slice bounds and scale loads per four blocks) and
# vectorised parts of it across blocks with byte gathers; here each block's work is a few vector
# operations into lane sums, and one horizontal sum per row is left.

class _VecType(types.Type):
    """An LLVM <lanes x float> as a numba type."""

    def __init__(self, lanes: int):
        self.lanes = lanes
        super().__init__(name=f"V{lanes}f32")


V16 = _VecType(16)
_V8F = ir.VectorType(ir.FloatType(), 8)
_V8I = ir.VectorType(ir.IntType(32), 8)
_I32 = ir.IntType(32)
_FFLAGS = ("reassoc", "contract")  # as FM


@register_model(_VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), fe_type.lanes))


# IR building blocks of the intrinsics below (plain Python, run when a kernel compiles).

def _vi(vals, lanes: int = 8) -> ir.Constant:
    """An <lanes x i32> constant: one int in every lane, or `lanes` ints."""
    return ir.Constant(ir.VectorType(_I32, lanes), list(vals) if hasattr(vals, "__iter__") else [vals] * lanes)


def _data(context, builder, ty, arr):
    """The data pointer of the array argument `arr` of numba type `ty`."""
    return context.make_array(ty)(context, builder, arr).data


def _load(builder, ptr, base, off, vty, align):
    """A load of type `vty` at element base + off of `ptr` (base an i64 value, off an int)."""
    p = builder.gep(ptr, [builder.add(base, base.type(off))])
    return builder.load(builder.bitcast(p, vty.as_pointer()), align=align)


def _element(context, builder, signature, args, ty, align):
    """The `ty` at element args[1] of the array args[0], an intrinsic's (array, index) arguments,
    with no wraparound or bounds checks."""
    arrty, ity = signature.args
    at = context.cast(builder, args[1], ity, types.int64)
    return _load(builder, _data(context, builder, arrty, args[0]), at, 0, ty, align)


def _bytes8(builder, ptr, base, off):
    """8 bytes at ptr[base + off], zero-extended to <8 x i32>."""
    return builder.zext(_load(builder, ptr, base, off, ir.VectorType(ir.IntType(8), 8), 1), _V8I)


def _floats8(builder, ptr, base, off):
    """8 float32 at ptr[base + off]."""
    return _load(builder, ptr, base, off, _V8F, 4)


def _lane(builder, v, i):
    """Lane i of v in every lane."""
    return builder.shuffle_vector(v, v, _vi(i, v.type.count))


def _splat(builder, f, lanes: int = 8):
    """The float32 scalar f in every lane."""
    v = ir.Constant(ir.VectorType(ir.FloatType(), lanes), ir.Undefined)
    return _lane(builder, builder.insert_element(v, f, _I32(0)), 0)


def _add(builder, a, b):
    return builder.fadd(a, b, flags=_FFLAGS)


def _mul(builder, a, b):
    return builder.fmul(a, b, flags=_FFLAGS)


@intrinsic
def _h(typingctx, row, o):
    """The fp16 scale at byte offset o of row (contiguous bytes), as a LUT index: one unaligned
    16-bit load. Read as `row[o] | row[o + 1] << 8`, each signed index was checked for wraparound:
    a dozen scalar instructions per block in the Q4_0 loop, about as many as its vector work."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint8 and row.layout == "C"
            and isinstance(o, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.zext(_element(context, builder, signature, args, ir.IntType(16), 1), ir.IntType(64))

    return types.int64(row, o), codegen


@intrinsic
def _v_zero(typingctx):
    """A V16 of zeros."""

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.VectorType(ir.FloatType(), 16), [0.0] * 16)

    return V16(), codegen


@intrinsic
def _v_add(typingctx, a, b):
    if not isinstance(a, _VecType) or a != b:
        return None

    def codegen(context, builder, signature, args):
        return _add(builder, args[0], args[1])

    return a(a, b), codegen


@intrinsic
def _v_sum(typingctx, v):
    """The sum of v's lanes: halves added until two lanes are left."""
    if not isinstance(v, _VecType):
        return None

    def codegen(context, builder, signature, args):
        s = args[0]
        n = signature.args[0].lanes
        while n > 2:
            n //= 2
            s = builder.fadd(builder.shuffle_vector(s, s, _vi(range(n), n)),
                             builder.shuffle_vector(s, s, _vi(range(n, 2 * n), n)), flags=_FFLAGS)
        return builder.fadd(builder.extract_element(s, _I32(0)), builder.extract_element(s, _I32(1)),
                            flags=_FFLAGS)

    return types.float32(v), codegen


def _host_has_vnni() -> bool:
    """Whether numba compiles for this CPU and it has AVX-512 VNNI (`vpdpbusd`)."""
    import numba
    from llvmlite import binding
    if numba.config.CPU_NAME:           # compiling for another CPU (a portable cache)
        return False
    try:
        features = binding.get_host_cpu_features()
    except RuntimeError:                # features unknown on this platform
        return False
    return bool(features.get("avx512vnni") and features.get("avx512bw"))


# `_a8_pair` forms its integer lane sums with one `vpdpbusd` where the CPU has it, else in
# portable vector IR that gives the same integers.
A8_VNNI = _host_has_vnni()


@intrinsic
def _f16_round(typingctx, v):
    """v rounded to the nearest float16 (ties to even), as float32."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(v), codegen


@intrinsic
def _pair_scale(typingctx, a, b):
    """A V16 of a in lanes 0-7 and b in lanes 8-15 (two blocks' scales, see `_a8_pair`)."""
    if a != types.float32 or b != types.float32:
        return None

    def codegen(context, builder, signature, args):
        v = ir.Constant(ir.VectorType(ir.FloatType(), 16), ir.Undefined)
        v = builder.insert_element(builder.insert_element(v, args[0], _I32(0)), args[1], _I32(8))
        return builder.shuffle_vector(v, v, _vi([0] * 8 + [8] * 8, 16))

    return V16(types.float32, types.float32), codegen


def _a8_lanes(builder, q, x):
    """<16 x i32>: lane j = Σ q[4j + k]·x[4j + k] (k < 4), q 64 unsigned and x 64 signed bytes."""
    v32 = ir.VectorType(_I32, 16)
    if A8_VNNI:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32, [v32, v32, v32]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [ir.Constant(v32, [0] * 16), builder.bitcast(q, v32), builder.bitcast(x, v32)])
    p = builder.mul(builder.zext(q, ir.VectorType(_I32, 64)), builder.sext(x, ir.VectorType(_I32, 64)))
    for n in (32, 16):   # adjacent pairs added twice
        p = builder.add(builder.shuffle_vector(p, p, _vi(range(0, 2 * n, 2), n)),
                        builder.shuffle_vector(p, p, _vi(range(1, 2 * n, 2), n)))
    return p


def _nibbles(builder, q, shifts):
    """q (<64 x i8>) with each 16-bit word shifted right by shifts[word] (0 where the caller laid
    out bytes for their low nibbles, 4 for their high ones), then masked to 4 bits."""
    i8, i16 = ir.IntType(8), ir.IntType(16)
    q = builder.lshr(builder.bitcast(q, ir.VectorType(i16, 32)), ir.Constant(ir.VectorType(i16, 32), shifts))
    return builder.and_(builder.bitcast(q, ir.VectorType(i8, 64)), ir.Constant(ir.VectorType(i8, 64), [15] * 64))


@intrinsic
def _a8_pair(typingctx, row, o, xp, xo, scale, blocks, kind):
    """Two blocks at byte o of row (`blocks` 2; with 1, the first alone) times their 64 int8
    activations at byte xo of xp (a row of `_prep`, read as bytes), `kind` 0 for Q4_0 (18-byte
    blocks: the nibbles laid out as [block 0's low nibbles, its high, block 1's low, its high]) or
    1 for Q8_0 (34-byte blocks: each int8 quant q as the unsigned byte q + 128). Lane j of the
    integer sums holds weights 4j..4j+3 (as `vpdpbusd` forms them); the lanes are returned as
    floats times `scale` (each block's d_w·d_x in its 8 lanes), without the offset (8 or 128
    times the block's sum of activation quants). No bounds checks."""
    if not (isinstance(row, types.Array) and isinstance(xp, types.Array) and scale == V16
            and isinstance(blocks, types.IntegerLiteral) and blocks.literal_value in (1, 2)
            and isinstance(kind, types.IntegerLiteral) and kind.literal_value in (0, 1)):
        return None
    two, q8 = blocks.literal_value == 2, kind.literal_value == 1

    def codegen(context, builder, signature, args):
        rowty, _, xty, _, _, _, _ = signature.args
        row, o, xp, xo, scale, _, _ = args
        rp = _data(context, builder, rowty, row)
        xb = builder.bitcast(_data(context, builder, xty, xp), ir.IntType(8).as_pointer())
        i8 = ir.IntType(8)
        if q8:
            v32b = ir.VectorType(i8, 32)
            bias = ir.Constant(v32b, [0x80] * 32)
            q0 = builder.xor(_load(builder, rp, o, 2, v32b, 1), bias)
            q1 = builder.xor(_load(builder, rp, o, 36, v32b, 1), bias) if two else ir.Constant(v32b, [0] * 32)
            q = builder.shuffle_vector(q0, q1, _vi(range(64), 64))
        else:
            v16b = ir.VectorType(i8, 16)
            q0 = _load(builder, rp, o, 2, v16b, 1)
            q1 = _load(builder, rp, o, 20, v16b, 1) if two else ir.Constant(v16b, [0] * 16)
            q = builder.shuffle_vector(q0, q1, _vi(list(range(16)) * 2 + list(range(16, 32)) * 2, 64))
            q = _nibbles(builder, q, ([0] * 8 + [4] * 8) * 2)   # runs: low, high, low, high nibbles
        dot = _a8_lanes(builder, q, _load(builder, xb, xo, 0, ir.VectorType(i8, 64), 1))
        return _mul(builder, builder.sitofp(dot, ir.VectorType(ir.FloatType(), 16)), scale)

    return V16(row, types.int64, xp, types.int64, V16, blocks, kind), codegen


@intrinsic
def _at(typingctx, x, i):
    """x[i] of a contiguous float32 array, without the signed index's wraparound checks (a
    dozen scalar instructions where the loop reads a block's two scales). No bounds checks."""
    if not (isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C"
            and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return _element(context, builder, signature, args, ir.FloatType(), 4)

    return types.float32(x, i), codegen


# Bytes ahead of a Q4_0 or Q8_0 row read that `_dot_a8` prefetches: decode streams many short rows
# (1152 or 792 bytes, MoE gate/up/down) whose successors are contiguous in memory, and the
# hardware prefetchers, retrained at every short stream, left the loop waiting on RAM. (The same
# prefetch in the K-quant dots changed nothing measurable on the q4_k_m file, before and after
# Q4_K's vector rewrite.) Once the integer dot made the row's arithmetic cheaper, 2 KiB ahead
# decoded 1.09x as fast as 1 KiB (alternating in one process; 3 KiB 1.11x, 512 bytes 1.0x in a
# noisier round).
PREFETCH = 2048


@intrinsic
def _prefetch(typingctx, row, o):
    """Prefetch (read, keep in all levels) the cache line at byte o of row (any address: a
    prefetch never faults)."""
    if not isinstance(row, types.Array):
        return None

    def codegen(context, builder, signature, args):
        p = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[1]])
        p = builder.bitcast(p, ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [p.type, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [p, _I32(0), _I32(3), _I32(1)])
        return context.get_dummy_value()

    return types.none(row, types.int64), codegen


@njit(cache=True, inline="always")
def _dot_a8(w, base, nb, xp, lut, kind):
    """The nb-block row at byte `base` of w (`kind` 0: Q4_0, 1: Q8_0) · x as `_prep` quantized
    it: two blocks a step, their integer sums times d_w·d_x (`_a8_pair`); the offset (8 for
    Q4_0's nibbles, 128 for Q8_0's biased quants) comes off once per row as offset · Σ d_w·d_x·
    (the block's sum of quants). One thread, Q4_0 1408x2048 from L2: 8.4 → 14.5 GB/s against the
    float32 dot it replaced (16 lanes of dequantized weights times x)."""
    bs = 18 if kind == 0 else 34
    sd, ss = _prep_layout(nb * 32)[:2]
    acc = _v_zero()
    off = np.float32(0.0)
    b = 0
    while b + 2 <= nb:
        o = base + b * bs
        _prefetch(w, o + PREFETCH)
        d0 = lut[_h(w, o)] * _at(xp, sd + b)
        d1 = lut[_h(w, o + bs)] * _at(xp, sd + b + 1)
        acc = _v_add(acc, _a8_pair(w, o, xp, b * 32, _pair_scale(d0, d1), 2, kind))
        off += d0 * _at(xp, ss + b) + d1 * _at(xp, ss + b + 1)
        b += 2
    if b < nb:
        o = base + b * bs
        d0 = lut[_h(w, o)] * _at(xp, sd + b)
        acc = _v_add(acc, _a8_pair(w, o, xp, b * 32, _pair_scale(d0, d0), 1, kind))
        off += d0 * _at(xp, ss + b)
    return _v_sum(acc) - np.float32(8.0 if kind == 0 else 128.0) * off


@njit(cache=True, inline="always")
def _q4k_scale_min(row, o, j):
    """6-bit (scale, min) of sub-block j (0..7) of the Q4_K super-block at byte offset o."""
    s = o + 4
    if j < 4:
        sc = np.int64(row[s + j]) & 63
        mn = np.int64(row[s + j + 4]) & 63
    else:
        sc = (np.int64(row[s + j + 4]) & 15) | ((np.int64(row[s + j - 4]) >> 6) << 4)
        mn = (np.int64(row[s + j + 4]) >> 4) | ((np.int64(row[s + j]) >> 6) << 4)
    return sc, mn


# Q4_K weight j of sub-block i (0..7) is d·sc_i·q − dmin·m_i. Its dot is integer, as Q4_0's: the
# float form it replaced (8 lanes of bare quants times x, 1.1-1.3x the loop before it) decoded
# the 8-layer q4_k_m file 1.09x slower (alternating in one process).

@intrinsic
def _q4k_block(typingctx, acc, row, o, xp, xo, so, ddx, mdx):
    """acc + the Q4_K super-block at byte o of row · its 256 activations as `_prep` quantized them
    (Q8_K: int8 quants at byte xo of xp, their sums over each 32 at xp[so:so + 8]), with ddx =
    d·d_x and mdx = dmin·d_x. The 6-bit scales and mins are unpacked as <8 x i32> (lane i:
    sub-block i); each 32-byte quant run is sub-blocks 2c (low nibbles) and 2c + 1 (high) against
    64 activation bytes, its integer lane sums (`_a8_lanes`) times the sub-blocks' scales in
    integers, as the C kernel's; the mins come off as dmin·d_x·Σ m_i·(sum of quants i), in lanes
    0-7. No bounds checks."""
    if not (acc == V16 and isinstance(row, types.Array) and isinstance(xp, types.Array)
            and ddx == types.float32 and mdx == types.float32):
        return None

    def codegen(context, builder, signature, args):
        _, rowty, _, xty, _, _, _, _ = signature.args
        acc, row, o, xp, xo, so, ddx, mdx = args
        rp, xf = _data(context, builder, rowty, row), _data(context, builder, xty, xp)
        xb = builder.bitcast(xf, ir.IntType(8).as_pointer())
        # Scales and mins: P = bytes 4..11 of the block, Q = bytes 8..15 (the 12 scale bytes).
        pb, qb = _bytes8(builder, rp, o, 4), _bytes8(builder, rp, o, 8)
        r = builder.shuffle_vector(pb, qb, _vi([0, 1, 2, 3, 12, 13, 14, 15]))
        sh = builder.shuffle_vector(pb, _vi(0), _vi([8, 8, 8, 8, 0, 1, 2, 3]))
        sc = builder.or_(builder.and_(r, _vi([63] * 4 + [15] * 4)), builder.lshr(builder.and_(sh, _vi(192)), _vi(2)))
        mn = builder.or_(builder.and_(builder.lshr(qb, _vi([0] * 4 + [4] * 4)), _vi([63] * 4 + [15] * 4)),
                         builder.lshr(builder.and_(pb, _vi([0] * 4 + [192] * 4)), _vi(2)))
        v32b = ir.VectorType(ir.IntType(8), 32)
        isum = ir.Constant(ir.VectorType(_I32, 16), [0] * 16)
        for c in range(4):
            q = _load(builder, rp, o, 16 + 32 * c, v32b, 1)
            q = _nibbles(builder, builder.shuffle_vector(q, q, _vi(list(range(32)) * 2, 64)), [0] * 16 + [4] * 16)
            dot = _a8_lanes(builder, q, _load(builder, xb, xo, 64 * c, ir.VectorType(ir.IntType(8), 64), 1))
            isum = builder.add(isum, builder.mul(dot, builder.shuffle_vector(sc, sc, _vi([2 * c] * 8 + [2 * c + 1] * 8,
                                                                                       16))))
        v16f = ir.VectorType(ir.FloatType(), 16)
        out = _add(builder, acc, _mul(builder, builder.sitofp(isum, v16f), _splat(builder, ddx, 16)))
        mins = _mul(builder, builder.sitofp(mn, _V8F), _floats8(builder, xf, so, 0))
        mins = builder.shuffle_vector(_mul(builder, mins, _splat(builder, mdx)), ir.Constant(_V8F, [0.0] * 8),
                                      _vi(range(16), 16))
        return builder.fsub(out, mins, flags=_FFLAGS)

    return V16(V16, row, types.int64, xp, types.int64, types.int64, types.float32, types.float32), codegen


@njit(cache=True, inline="always")
def _dot_q4_k(w, base, nsb, xp, lut):
    """The nsb-super-block Q4_K row at byte `base` of w · x as `_prep` quantized it (Q8_K, as the
    C kernels do). No prefetch: a 1 KiB one, three lines per super-block, cost 20% from L3 and
    gained nothing measurable in decode (measured on the float form this replaced)."""
    q8k, dk, sk = _prep_layout(nsb * 256)[2:5]
    acc = _v_zero()
    for b in range(nsb):
        o = base + b * 144
        dx = _at(xp, dk + b)
        acc = _q4k_block(acc, w, o, xp, 4 * q8k + 256 * b, sk + 8 * b, lut[_h(w, o)] * dx, lut[_h(w, o + 2)] * dx)
    return _v_sum(acc)


# Q6_K weight i (0..255) of a super-block is d·sc·(q − 32), sc the int8 scale of its 16 weights
# (byte 192 + i // 16) and q 4 bits of ql | 2 bits of qh << 4: in half h (128 weights), 32-weight
# group g (0..3) takes the low (g < 2) or high nibbles of ql[64h + 32(g & 1) + j] and bits 2g,
# 2g + 1 of qh[32h + j] (j 0..31; dequant.py). Its dot is integer, as Q4_K's: q (0..63) meets
# the Q8_K activations, each 16 weights' integer sums times their scale, and the −32 comes off
# as 32·Σ sc·(sum of those 16 quants).

@intrinsic
def _q6k_block(typingctx, acc, row, o, xp, xo, so, ddx):
    """acc + the Q6_K super-block at byte o of row · its 256 activations as `_prep` quantized them
    (Q8_K: int8 quants at byte xo of xp, their sums over each 16 at xp[so:so + 16]), ddx = d·d_x.
    Per half, one 64-byte load of ql and the 32 qh bytes (twice, shifted per run) give weights
    0-63 and 64-127 as bytes 0..63; their integer lane sums (`_a8_lanes`, 4 lanes per 16 weights)
    times the 16 weights' scale. No bounds checks."""
    if not (acc == V16 and isinstance(row, types.Array) and isinstance(xp, types.Array) and ddx == types.float32):
        return None

    def codegen(context, builder, signature, args):
        _, rowty, _, xty, _, _, _ = signature.args
        acc, row, o, xp, xo, so, ddx = args
        rp, xf = _data(context, builder, rowty, row), _data(context, builder, xty, xp)
        xb = builder.bitcast(xf, ir.IntType(8).as_pointer())
        i8, i16 = ir.IntType(8), ir.IntType(16)
        v64b, v32w = ir.VectorType(i8, 64), ir.VectorType(i16, 32)
        sc = builder.sext(_load(builder, rp, o, 192, ir.VectorType(i8, 16), 1), ir.VectorType(_I32, 16))
        isum = ir.Constant(ir.VectorType(_I32, 16), [0] * 16)
        for h in range(2):
            ql = _load(builder, rp, o, 64 * h, v64b, 1)
            qh = _load(builder, rp, o, 128 + 32 * h, ir.VectorType(i8, 32), 1)
            qh = builder.bitcast(builder.shuffle_vector(qh, qh, _vi(list(range(32)) * 2, 64)), v32w)
            for part in range(2):   # weights 0-63 (low nibbles, qh bits 0-3), 64-127 (high, bits 4-7)
                hi = builder.lshr(qh, ir.Constant(v32w, [4 * part] * 16 + [4 * part + 2] * 16))
                hi = builder.shl(builder.and_(hi, ir.Constant(v32w, [0x0303] * 32)), ir.Constant(v32w, [4] * 32))
                q = builder.or_(_nibbles(builder, ql, [4 * part] * 32), builder.bitcast(hi, v64b))
                dot = _a8_lanes(builder, q, _load(builder, xb, xo, 128 * h + 64 * part, v64b, 1))
                s4 = 8 * h + 4 * part
                isum = builder.add(isum, builder.mul(dot, builder.shuffle_vector(
                    sc, sc, _vi([s4 + j // 4 for j in range(16)], 16))))
        v16f = ir.VectorType(ir.FloatType(), 16)
        bs = _load(builder, xf, so, 0, v16f, 4)
        off = _mul(builder, builder.sitofp(sc, v16f), bs)   # lane k: sc_k · (sum of quants k)
        total = builder.fsub(builder.sitofp(isum, v16f), _mul(builder, off, ir.Constant(v16f, [32.0] * 16)),
                             flags=_FFLAGS)
        return _add(builder, acc, _mul(builder, total, _splat(builder, ddx, 16)))

    return V16(V16, row, types.int64, xp, types.int64, types.int64, types.float32), codegen


@njit(cache=True, inline="always")
def _dot_q6_k(w, base, nsb, xp, lut):
    """The nsb-super-block Q6_K row at byte `base` of w · x as `_prep` quantized it (Q8_K)."""
    q8k, dk, _, s16 = _prep_layout(nsb * 256)[2:6]
    acc = _v_zero()
    for b in range(nsb):
        o = base + b * 210
        acc = _q6k_block(acc, w, o, xp, 4 * q8k + 256 * b, s16 + 16 * b, lut[_h(w, o + 208)] * _at(xp, dk + b))
    return _v_sum(acc)


@njit(cache=True, inline="always")
def _reads_prep(qt):
    return qt == Q4_0 or qt == Q8_0 or qt == Q4_K or qt == Q6_K


# The quantized kinds (the types that read xp) are compiled into one kernel that dots a range of
# rows, each addressed as a byte offset into the weight's flat bytes, x and xp as whole rows. The
# earlier form took four row views per call (`w[r]` in a tuple, `xp[:k]` sliced per row), and
# every view and array argument had its reference count touched (~14 NRT calls per four rows):
# ~30 ns a row whatever its length, the better part of a 128-wide row. Same sums bit for bit. T=1,
# interleaved A/B on the noisy 2-core machine, min (median) µs, one thread / two:
# matmul Q6_K 2816x2048 586 (640) → 505 (560) / 325 (450) → 305 (361); Q4_K 1408x2048 267 (287)
# → 214 (225) / 158 (234) → 149 (185); Q4_0 1408x2048 256 (272) → 221 (237) / 146 (273) → 128
# (240); matmul_heads (MLA, 16 heads) W_UK 512x128 Q4_0 598 (885) → 265 (391) / 387 (469) → 177
# (222), W_UV 128x512 Q6_K 271 (350) → 141 (195) / 175 (215) → 118 (140).

@njit(cache=True, inline="always")
def _row_prep(qt, w, base, x, xp, lut16):
    k = x.shape[0]
    if qt == Q4_0:
        return _dot_a8(w, base, k // 32, xp, lut16, 0)
    if qt == Q8_0:
        return _dot_a8(w, base, k // 32, xp, lut16, 1)
    if qt == Q4_K:
        return _dot_q4_k(w, base, k // 256, xp, lut16)
    return _dot_q6_k(w, base, k // 256, xp, lut16)


@njit(cache=True, fastmath=FM)
def _rows_prep(qt, w, rb, r0, r1, x, xp, lut16, out):
    """out[r − r0] = row r of w · x for r0 ≤ r < r1, w the rows' flat bytes (rb per row) of type
    qt (Q4_0, Q8_0, Q4_K or Q6_K) and xp x as prepared by `_prep`."""
    for r in range(r0, r1):
        out[r - r0] = _row_prep(qt, w, r * rb, x, xp, lut16)


@njit(cache=True)
def _dot(qt, row, x, lut16, lutbf):
    """One row of a float type qt · x."""
    if qt == F16:
        return _dot_lut(row, x, lut16)
    if qt == BF16:
        return _dot_lut(row, x, lutbf)
    return _dot_f32v(row.view(np.float32), x)


@njit(cache=True)
def _row_range(qt, w, rb, r0, r1, x, xp, lut16, lutbf, out):
    """out[r − r0] = row r of w · x for r0 ≤ r < r1, one token, any type; w the rows' flat bytes,
    rb per row, xp x as prepared by `_prepared`."""
    if _reads_prep(qt):
        _rows_prep(qt, w, rb, r0, r1, x, xp, lut16, out)
        return
    for r in range(r0, r1):
        out[r - r0] = _dot(qt, w[r * rb:(r + 1) * rb], x, lut16, lutbf)


@njit(cache=True)
def _prepared(qt, x):
    """xp for `_dot` on weights of type qt: filled for Q4_0 and the K-quants, unused (but
    allocated, so every caller has one type) otherwise. x `[T, K]` → `[T, _prep_width(K)]`."""
    xp = np.empty((x.shape[0], _prep_width(x.shape[1])), np.float32)
    if _reads_prep(qt):
        _prep(x, xp)
    return xp


# ---------------------------------------------------------------------------------------------
# One weight row → float32, bit-identical with dequant.py (same float32 operations).

@njit(cache=True)
def _decode(qt, row, out, lut16, lutbf, n16=N16):
    """`n16` as in the dot kernels (a run-time 16 made Q4_0/Q8_0/Q6_K rows 1.7-2x faster to
    decode); the default serves callers outside the hot loops."""
    k = out.shape[0]
    if qt == Q4_0:
        for b in range(k // 32):
            q = row[b * 18:b * 18 + 18]
            o = out[b * 32:b * 32 + 32]
            d = lut16[_h(q, 0)]
            for j in range(n16):
                v = q[2 + j]
                o[j] = d * (np.float32(v & 15) - np.float32(8.0))
                o[16 + j] = d * (np.float32(v >> 4) - np.float32(8.0))
    elif qt == Q8_0:
        qs = row.view(np.int8)
        for b in range(k // 32):
            q = qs[b * 34 + 2:b * 34 + 34]
            o = out[b * 32:b * 32 + 32]
            d = lut16[_h(row, b * 34)]
            for j in range(2 * n16):
                o[j] = d * np.float32(q[j])
    elif qt == Q4_K:
        for b in range(k // 256):
            o = b * 144
            d = lut16[_h(row, o)]
            dmin = lut16[_h(row, o + 2)]
            for c in range(4):
                sc0, m0 = _q4k_scale_min(row, o, 2 * c)
                sc1, m1 = _q4k_scale_min(row, o, 2 * c + 1)
                a0, z0 = d * np.float32(sc0), dmin * np.float32(m0)
                a1, z1 = d * np.float32(sc1), dmin * np.float32(m1)
                q = row[o + 16 + 32 * c:o + 48 + 32 * c]
                ob = out[b * 256 + 64 * c:b * 256 + 64 * c + 64]
                for j in range(32):
                    v = q[j]
                    ob[j] = a0 * np.float32(v & 15) - z0
                    ob[32 + j] = a1 * np.float32(v >> 4) - z1
    elif qt == Q6_K:
        for b in range(k // 256):
            o = b * 210
            d = lut16[_h(row, o + 208)]
            for h in range(2):
                for g in range(4):
                    lo_off = o + 64 * h + 32 * (g & 1)
                    qh_off = o + 128 + 32 * h
                    shift_lo = 4 * (g >> 1)
                    shift_hi = 2 * g
                    for half in range(2):
                        # elements 16·half .. 16·half+15 of group g share scale sc[8h + 2g + half]
                        sc = np.float32(np.int8(row[o + 192 + h * 8 + g * 2 + half]))
                        lo = row[lo_off + 16 * half:lo_off + 16 * half + 16]
                        hi = row[qh_off + 16 * half:qh_off + 16 * half + 16]
                        ob0 = b * 256 + h * 128 + g * 32 + 16 * half
                        ob = out[ob0:ob0 + 16]
                        for l in range(n16):
                            q = (((np.int32(lo[l]) >> shift_lo) & 15)
                                 | (((np.int32(hi[l]) >> shift_hi) & 3) << 4)) - 32
                            ob[l] = (d * sc) * np.float32(q)
    elif qt == F16 or qt == BF16:
        u = row.view(np.uint16)
        lut = lut16 if qt == F16 else lutbf
        for i in range(k):
            out[i] = lut[u[i]]
    else:
        f = row.view(np.float32)
        for i in range(k):
            out[i] = f[i]


@njit(cache=True, fastmath=FM)
def _dot4_f32(w, x, r0, out4):
    """Four decoded rows w[r0:r0+4] · x, sharing each load of x."""
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    for i in range(x.shape[0]):
        xv = x[i]
        s0 += w[r0, i] * xv
        s1 += w[r0 + 1, i] * xv
        s2 += w[r0 + 2, i] * xv
        s3 += w[r0 + 3, i] * xv
    out4[0] = s0
    out4[1] = s1
    out4[2] = s2
    out4[3] = s3


# Up to this many tokens, re-decode each weight row per token (fused, no buffer), FUSED_ROWS rows
# per work item; above it, decode a tile of TILE rows once into a thread-local float buffer and
# reuse it for every token. Work items of 32 rows, against 8 (T=1, interleaved, min µs, one thread
# / two): W_UK Q8_0 311 → 213 / 186 → 125, Q4_0 280 → 180 / 237 → 157; Q6_K 2816x2048 684 → 631 /
# 374 → 339 (a call into the row kernel and its arguments' reference counts per item).
SMALL_T = 2
TILE = 8
FUSED_ROWS = 32
# Up to this many weight bytes × tokens a matmul runs on the calling thread alone: waking the
# pool costs more than it saves (the MoE router, 64×2048 F32 = 512 KiB: 20 µs on one thread,
# 32 µs on two).
SERIAL_BYTES = 1 << 19


@njit(cache=True)
def _mm_rows(x, xp, w, qt, out, r0, r1, lut16, lutbf, n16):
    """out[:, r0:r1] = x `[T, K]` · w[r0:r1]ᵀ; xp from `_prepared`."""
    t_count = x.shape[0]
    if t_count <= SMALL_T:
        wf = w.reshape(-1)
        for t in range(t_count):
            _row_range(qt, wf, w.shape[1], r0, r1, x[t], xp[t], lut16, lutbf, out[t, r0:r1])
        return
    buf = np.empty((r1 - r0, x.shape[1]), np.float32)
    s4 = np.empty(4, np.float32)
    nr = r1 - r0
    for i in range(nr):
        _decode(qt, w[r0 + i], buf[i], lut16, lutbf, n16)
    for t in range(t_count):
        xr = x[t]
        i = 0
        while i + 4 <= nr:
            _dot4_f32(buf, xr, i, s4)
            out[t, r0 + i] = s4[0]
            out[t, r0 + i + 1] = s4[1]
            out[t, r0 + i + 2] = s4[2]
            out[t, r0 + i + 3] = s4[3]
            i += 4
        while i < nr:
            out[t, r0 + i] = _dot_f32v(buf[i], xr)
            i += 1


@njit(parallel=True, cache=True)
def matmul(x, w, qt, out, lut16, lutbf, n16):
    """x `[T, K]` · W `[N, K]`ᵀ → out `[T, N]`; W is raw ggml rows of type `qt`."""
    n = w.shape[0]
    step = FUSED_ROWS if x.shape[0] <= SMALL_T else TILE
    nch = (n + step - 1) // step
    xp = _prepared(qt if x.shape[0] <= SMALL_T else F32, x)  # tiles (T > SMALL_T) use x as is
    if w.size * x.shape[0] <= SERIAL_BYTES:
        _mm_rows(x, xp, w, qt, out, 0, n, lut16, lutbf, n16)
        return
    for c in prange(nch):
        _mm_rows(x, xp, w, qt, out, c * step, min(n, c * step + step), lut16, lutbf, n16)


@njit(parallel=True, cache=True)
def matmul_heads(x, w, qt, out, lut16, lutbf, n16):
    """x `[H, T, K]` · w[h] `[N, K]`ᵀ for every head h → out `[H, T, N]`, one parallel region."""
    h_count, t_count, k = x.shape
    n = w.shape[1]
    step = FUSED_ROWS if t_count <= SMALL_T else TILE
    nch = (n + step - 1) // step
    xp = _prepared(qt if t_count <= SMALL_T else F32, x.reshape(h_count * t_count, k))
    xp = xp.reshape(h_count, t_count, xp.shape[1])
    if w.size * t_count <= SERIAL_BYTES:
        for h in range(h_count):
            _mm_rows(x[h], xp[h], w[h], qt, out[h], 0, n, lut16, lutbf, n16)
        return
    for item in prange(h_count * nch):
        h = item // nch
        c = item % nch
        _mm_rows(x[h], xp[h], w[h], qt, out[h], c * step, min(n, c * step + step), lut16, lutbf, n16)


# ---------------------------------------------------------------------------------------------
# Elementwise and row ops (no fastmath: same float32 operations as the reference). Below
# SERIAL_ELEMS elements they run on the calling thread: a decode step has ~140 of these calls,
# each a few microseconds of work, and waking the thread pool for each cost more than the work.

SERIAL_ELEMS = 1 << 16


@njit(cache=True, inline="always")
def _rmsnorm_row(x, w, eps, out, t):
    d = x.shape[1]
    ss = 0.0  # float64 accumulator
    for i in range(d):
        v = np.float64(x[t, i])
        ss += v * v
    r = np.sqrt(np.float32(ss / d) + eps)
    for i in range(d):
        out[t, i] = w[i] * (x[t, i] / r)


@njit(parallel=True, cache=True)
def rmsnorm(x, w, eps, out):
    if x.size < SERIAL_ELEMS:
        for t in range(x.shape[0]):
            _rmsnorm_row(x, w, eps, out, t)
        return
    for t in prange(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)


@njit(cache=True, inline="always")
def _rope_row(x, cos, sin, out, t):
    for h in range(x.shape[1]):
        for i in range(x.shape[2] // 2):
            e = x[t, h, 2 * i]
            o = x[t, h, 2 * i + 1]
            c = cos[t, i]
            s = sin[t, i]
            out[t, h, 2 * i] = e * c - o * s
            out[t, h, 2 * i + 1] = e * s + o * c


@njit(parallel=True, cache=True)
def rope(x, cos, sin, out):
    if x.size < SERIAL_ELEMS:
        for t in range(x.shape[0]):
            _rope_row(x, cos, sin, out, t)
        return
    for t in prange(x.shape[0]):
        _rope_row(x, cos, sin, out, t)


@njit(cache=True, inline="always")
def _softmax_row(x, out, t):
    n = x.shape[1]
    m = x[t, 0]
    for i in range(1, n):
        if x[t, i] > m:
            m = x[t, i]
    tot = 0.0
    for i in range(n):
        e = np.exp(x[t, i] - m)
        out[t, i] = e
        tot += e
    z = np.float32(tot)
    for i in range(n):
        out[t, i] = out[t, i] / z


@njit(parallel=True, cache=True)
def softmax(x, out):
    if x.size < SERIAL_ELEMS:
        for t in range(x.shape[0]):
            _softmax_row(x, out, t)
        return
    for t in prange(x.shape[0]):
        _softmax_row(x, out, t)


@njit(cache=True, inline="always")
def _silu(g):
    return g / (np.float32(1.0) + np.exp(-g))


@njit(parallel=True, cache=True)
def silu_mul(g, u, out):
    if g.shape[0] < SERIAL_ELEMS:
        for i in range(g.shape[0]):
            out[i] = _silu(g[i]) * u[i]
        return
    for i in prange(g.shape[0]):
        out[i] = _silu(g[i]) * u[i]


# ---------------------------------------------------------------------------------------------
# Absorbed MLA attention. Work item = (token, group of heads); inside, the cache is walked once
# per item with all the group's heads, so each cached row is loaded once per group.

HEAD_GROUP = 8


@njit(parallel=True, cache=True, fastmath=FM)
def mla_attention(q_lat, q_pe, ckv, kpe, scale, start, out):
    t_count, h_count, c = q_lat.shape
    r = q_pe.shape[2]
    ngroups = (h_count + HEAD_GROUP - 1) // HEAD_GROUP
    for item in prange(t_count * ngroups):
        t = item // ngroups
        h0 = (item % ngroups) * HEAD_GROUP
        h1 = min(h_count, h0 + HEAD_GROUP)
        n = start + t + 1  # causal: positions 0..start+t
        p = np.empty((h1 - h0, n), np.float32)
        for s in range(n):
            for h in range(h0, h1):
                a = np.float32(0.0)
                for i in range(c):
                    a += q_lat[t, h, i] * ckv[s, i]
                b = np.float32(0.0)
                for i in range(r):
                    b += q_pe[t, h, i] * kpe[s, i]
                p[h - h0, s] = (a + b) * scale
        for h in range(h0, h1):
            row = p[h - h0]
            m = row[0]
            for s in range(1, n):
                m = max(m, row[s])
            tot = np.float32(0.0)
            for s in range(n):
                e = np.exp(row[s] - m)
                row[s] = e
                tot += e
            for s in range(n):
                row[s] = row[s] / tot
            for i in range(c):
                out[t, h, i] = np.float32(0.0)
        for s in range(n):
            for h in range(h0, h1):
                ps = p[h - h0, s]
                for i in range(c):
                    out[t, h, i] += ps * ckv[s, i]


# ---------------------------------------------------------------------------------------------
# One MoE layer in one call. Experts (routed ones, plus the shared MLP as one more "expert" with
# every token at weight 1) arrive as byte addresses of their gate/up/down rows; the caller keeps
# the arrays alive and has checked their sizes. Token lists are CSR: expert e serves
# toks[offs[e]:offs[e+1]] with weights wts[...]. Phase 1 (parallel over chunks of gate/up rows
# of every expert) fills h = silu(gate·x)·up·x per (expert, token); phase 2 (parallel over chunks
# of the D output rows) adds wt·down·h in expert order, so every output element has one writer
# and the same order of additions whatever the thread count. For T ≤ 2 both phases dot whole chunks
# of rows through `_row_range` (gate rows, then up rows), as matmul does: one token, 6 of 64
# experts + a 2816-wide shared one, two threads, interleaved A/B, min (median) ms: Q4_K gate/up,
# Q4_0 down, Q6_K shared 6.7 (7.6) → 5.6 (6.2); all Q4_0 5.8 (7.1) → 4.6 (6.6); C 2.9 / 2.3.

MOE_CHUNK = 16


@njit(cache=True, inline="always")
def _rows(addr, n, nbytes):
    return carray(_u8ptr(addr), (n, nbytes))


@njit(parallel=True, cache=True)
def moe(x, addrs, rbytes, qts, widths, offs, toks, wts, lut16, lutbf, n16, out):
    t_count, d = x.shape
    ne = widths.shape[0]
    # h layout: expert e's block starts at hoff[e], one row of widths[e] per token slot.
    hoff = np.zeros(ne + 1, np.int64)
    choff = np.zeros(ne + 1, np.int64)
    for e in range(ne):
        hoff[e + 1] = hoff[e] + (offs[e + 1] - offs[e]) * widths[e]
        nc = (widths[e] + MOE_CHUNK - 1) // MOE_CHUNK if offs[e + 1] > offs[e] else 0
        choff[e + 1] = choff[e] + nc
    h = np.empty(hoff[ne], np.float32)
    maxf = 1
    for e in range(ne):
        maxf = max(maxf, widths[e])
    fused_prep = False  # does any expert take the fused path on gate/up rows that read xp?
    for e in range(ne):
        m = offs[e + 1] - offs[e]
        fused_prep |= 0 < m <= SMALL_T and (_reads_prep(qts[e, 0]) or _reads_prep(qts[e, 1]))
    xp = _prepared(Q4_0 if fused_prep else F32, x)

    for item in prange(choff[ne]):
        e = np.searchsorted(choff, item, side="right") - 1
        f = widths[e]
        qg, qu = qts[e, 0], qts[e, 1]
        gate = _rows(addrs[e, 0], f, rbytes[e, 0])
        up = _rows(addrs[e, 1], f, rbytes[e, 1])
        m = offs[e + 1] - offs[e]
        r0 = (item - choff[e]) * MOE_CHUNK
        r1 = min(f, r0 + MOE_CHUNK)
        if m <= SMALL_T:
            # this chunk's gate rows, then its up rows (each a run of rows in memory)
            ub = np.empty(MOE_CHUNK, np.float32)
            for i in range(m):
                tk = toks[offs[e] + i]
                hv = h[hoff[e] + i * f + r0:hoff[e] + i * f + r1]
                _row_range(qg, gate.reshape(-1), rbytes[e, 0], r0, r1, x[tk], xp[tk], lut16, lutbf, hv)
                _row_range(qu, up.reshape(-1), rbytes[e, 1], r0, r1, x[tk], xp[tk], lut16, lutbf, ub)
                for j in range(r1 - r0):
                    hv[j] = _silu(hv[j]) * ub[j]
        else:
            bg = np.empty(d, np.float32)
            bu = np.empty(d, np.float32)
            for r in range(r0, r1):
                _decode(qg, gate[r], bg, lut16, lutbf, n16)
                _decode(qu, up[r], bu, lut16, lutbf, n16)
                for i in range(m):
                    xr = x[toks[offs[e] + i]]
                    h[hoff[e] + i * f + r] = _silu(_dot_f32v(bg, xr)) * _dot_f32v(bu, xr)

    # h rows of experts whose down rows read xp (and take the fused path), prepared once; expert
    # e's block starts at hpoff[e], one row of _prep_width(widths[e]) per token slot.
    hpoff = np.zeros(ne + 1, np.int64)
    for e in range(ne):
        hpoff[e + 1] = hpoff[e] + (offs[e + 1] - offs[e]) * _prep_width(widths[e])
    hp = np.empty(hpoff[ne], np.float32)
    for e in range(ne):
        m = offs[e + 1] - offs[e]
        if _reads_prep(qts[e, 2]) and 0 < m <= SMALL_T:
            f = widths[e]
            _prep(h[hoff[e]:hoff[e + 1]].reshape(m, f), hp[hpoff[e]:hpoff[e + 1]].reshape(m, _prep_width(f)))

    # Expert by expert within each chunk of output rows: each expert's rows stream in order.
    nch = (d + MOE_CHUNK - 1) // MOE_CHUNK
    for c in prange(nch):
        r0 = c * MOE_CHUNK
        r1 = min(d, r0 + MOE_CHUNK)
        for r in range(r0, r1):
            for t in range(t_count):
                out[t, r] = np.float32(0.0)
        bd = np.empty(maxf, np.float32)
        yb = np.empty(MOE_CHUNK, np.float32)
        for e in range(ne):
            m = offs[e + 1] - offs[e]
            if m == 0:
                continue
            f = widths[e]
            qd = qts[e, 2]
            down = _rows(addrs[e, 2], d, rbytes[e, 2])
            if m <= SMALL_T:
                fp = _prep_width(f)
                for i in range(m):
                    hv = h[hoff[e] + i * f:hoff[e] + (i + 1) * f]
                    hpv = hp[hpoff[e] + i * fp:hpoff[e] + (i + 1) * fp]
                    _row_range(qd, down.reshape(-1), rbytes[e, 2], r0, r1, hv, hpv, lut16, lutbf, yb)
                    k = offs[e] + i
                    for j in range(r1 - r0):
                        out[toks[k], r0 + j] += yb[j] * wts[k]
            else:
                for r in range(r0, r1):
                    _decode(qd, down[r], bd[:f], lut16, lutbf, n16)
                    for i in range(m):
                        k = offs[e] + i
                        y = _dot_f32v(bd[:f], h[hoff[e] + i * f:hoff[e] + (i + 1) * f])
                        out[toks[k], r] += y * wts[k]
