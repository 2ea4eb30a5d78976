"""The C backend against the numpy reference: every op, every ISA level this CPU supports
(scalar, AVX2, AVX-512), 1 and 2 threads; activation quantization bit-exact; bad input refused."""
from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import gguf.quants as gq

from lite.errors import BackendError
from lite.kernels.base import FFNWeights, QTensor, QType
from lite.kernels.dequant import dequantize
from lite.kernels.reference import ReferenceBackend

try:
    from lite.kernels.c import ISA_NAMES, CBackend
except ImportError as e:  # library not built
    pytest.skip(f"C backend not available: {e}", allow_module_level=True)

REF = ReferenceBackend()
CB = CBackend()
LEVELS = CB.isa_levels()
QUANT = (QType.Q8_0, QType.Q4_0, QType.Q4_K, QType.Q6_K)
FLOAT = (QType.F32, QType.F16, QType.BF16)


@pytest.fixture(params=[(isa, th) for isa in ISA_NAMES for th in (1, 2)],
                ids=lambda p: f"{ISA_NAMES[p[0]]}-t{p[1]}")
def cb(request):
    isa, threads = request.param
    if isa not in LEVELS:
        pytest.skip(f"ISA level {isa} not supported by this CPU/build")
    old_isa, old_threads = LEVELS[-1], CB.threads
    CB.set_isa(isa)
    CB.set_threads(threads)
    yield CB
    CB.set_isa(old_isa)
    CB.set_threads(old_threads)


def rng(seed=0):
    return np.random.default_rng(seed)


# ---- numpy helpers: quantizers and weights ---------------------------------------------------

def np_roundf(a):
    return gq.np_roundf(a)


def q8_0_ref(x: np.ndarray) -> np.ndarray:
    """ggml Q8_0 bytes, from gguf.quants (the spec)."""
    return np.asarray(gq.quantize(x, QType.Q8_0)).view(np.uint8)


def q8_k_ref(x: np.ndarray) -> np.ndarray:
    """Our 256-block activation format: float32 d = amax/127, int8 round(x/d), int16 sums of 16."""
    t, c = x.shape
    b = x.reshape(-1, 256)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np_roundf(b * inv).astype(np.int8)
    sums = q.reshape(-1, 16, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    out = np.concatenate([d.astype(np.float32).view(np.uint8), q.view(np.uint8), sums.view(np.uint8)], axis=1)
    return out.reshape(t, -1)


def deq_q8_k(blocks: np.ndarray, cols: int) -> np.ndarray:
    b = blocks.reshape(-1, 292)
    d = np.ascontiguousarray(b[:, :4]).view(np.float32)
    q = b[:, 4:260].view(np.int8).astype(np.float32)
    return (d * q).reshape(-1, cols)


def quant_act(x: np.ndarray, qtype: QType) -> np.ndarray:
    """The activations as the kernel sees them (quantized, then dequantized)."""
    if qtype in (QType.Q8_0, QType.Q4_0):
        return dequantize(q8_0_ref(x), QType.Q8_0)
    if qtype in (QType.Q4_K, QType.Q6_K):
        return deq_q8_k(q8_k_ref(x), x.shape[1])
    return x


def make_weight(qtype: QType, n: int, cols: int, seed: int = 1, name: str = "w") -> QTensor:
    g = rng(seed)
    w = (g.standard_normal((n, cols)) * 0.5).astype(np.float32)
    if qtype == QType.F32:
        return QTensor.from_float(name, w)
    if qtype in (QType.Q4_K, QType.Q6_K):
        # gguf has no K-quant quantizer: random blocks are valid blocks; keep the scales sane.
        size = {QType.Q4_K: 144, QType.Q6_K: 210}[qtype]
        data = g.integers(0, 256, (n, cols // 256, size), dtype=np.uint8)
        amp = 0.002 if qtype == QType.Q4_K else 0.0002     # Q6_K: int8 scales up to 127
        d = (g.random((n, cols // 256)) * amp + amp / 4).astype(np.float16).view(np.uint8).reshape(n, -1, 2)
        if qtype == QType.Q4_K:
            data[..., 0:2] = d
            data[..., 2:4] = d
        else:
            data[..., 208:210] = d
        return QTensor(name, qtype, (n, cols), data.reshape(n, -1))
    data = np.asarray(gq.quantize(w, qtype)).view(np.uint8).reshape(n, -1)
    return QTensor(name, qtype, (n, cols), np.ascontiguousarray(data))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


# ---- library basics --------------------------------------------------------------------------

def test_isa_from_environment(monkeypatch):
    """LITE_ISA picks the kernels' instruction set; a name it does not know, or a level this CPU
    lacks, is refused by name."""
    try:
        for level in LEVELS:
            monkeypatch.setenv("LITE_ISA", ISA_NAMES[level])
            assert CBackend().isa == ISA_NAMES[level]
        monkeypatch.setenv("LITE_ISA", "sse9")
        with pytest.raises(BackendError, match="LITE_ISA='sse9': expected one of scalar, avx2, avx512, avx512vbmi"):
            CBackend()
        if LEVELS[-1] < 2:
            monkeypatch.setenv("LITE_ISA", "avx512")
            with pytest.raises(BackendError, match="goes up to"):
                CBackend()
    finally:
        CB.set_isa(LEVELS[-1])


def test_prefetch_target_default_and_environment(monkeypatch):
    """The decode kernels prefetch into L2 on AMD CPUs and into L1 elsewhere (what each measured
    faster); LITE_PREFETCH chooses, and a name it does not know is refused by name."""
    vendor = next((line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id")),
                  None) if os.path.exists("/proc/cpuinfo") else None
    if vendor is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the default is chosen by the x86 vendor, which /proc/cpuinfo tells")
    old = CB.prefetch
    try:
        monkeypatch.delenv("LITE_PREFETCH", raising=False)
        assert old == ("l2" if vendor == "AuthenticAMD" else "l1")
        for target in ("l1", "l2"):
            monkeypatch.setenv("LITE_PREFETCH", target)
            assert CBackend().prefetch == target
        monkeypatch.setenv("LITE_PREFETCH", "l3")
        with pytest.raises(BackendError, match="LITE_PREFETCH='l3': expected one of l1, l2"):
            CBackend()
        assert CB.lib.lite_set_prefetch(2) == -1
    finally:
        CB.set_prefetch(old)


@pytest.mark.parametrize("qtype", QUANT, ids=lambda q: q.name)
def test_prefetch_targets_same_bits(cb, qtype):
    """Each one-token kernel is built once per prefetch target: both give the same bits, and the
    right products, through the one- and four-stream kernels; MLA attention over 21 chunks, each
    prefetching the next, likewise."""
    k = qtype in (QType.Q4_K, QType.Q6_K)
    cols = 1280 if k else 1440
    w = make_weight(qtype, 150, cols, seed=70)
    x = rng(71).standard_normal((1, cols)).astype(np.float32)
    g = rng(72)
    att = (g.standard_normal((1, 16, 512)).astype(np.float32), g.standard_normal((1, 16, 64)).astype(np.float32),
           g.standard_normal((1000, 512)).astype(np.float32), g.standard_normal((1000, 64)).astype(np.float32),
           1 / 24, 999)
    old = cb.prefetch
    got = {}
    try:
        for target in ("l1", "l2"):
            cb.set_prefetch(target)
            got[target] = cb.matmul(x, w), cb.mla_attention(*att)
    finally:
        cb.set_prefetch(old)
    np.testing.assert_array_equal(got["l1"][0], got["l2"][0])
    np.testing.assert_array_equal(got["l1"][1], got["l2"][1])
    tight = quant_act(x, qtype).astype(np.float64) @ dequantize(w.data, qtype).astype(np.float64).T
    assert rel(got["l2"][0], tight) < 1e-5
    assert rel(got["l2"][1], REF.mla_attention(*att)) < 1e-5


def test_abi_and_controls():
    import re
    from lite.kernels import c as cmod
    from lite.kernels.native import header_path
    header = open(header_path(cmod.LIB_PATH, "lite.h", "csrc/include")).read()
    assert CB.lib.lite_abi_version() == int(re.search(r"LITE_ABI_VERSION\s+(\d+)", header).group(1))
    assert LEVELS[0] == 0
    with pytest.raises(BackendError):
        CB.set_isa(7)
    with pytest.raises(BackendError):
        CB.set_threads(0)


def test_exit_with_spinning_workers():
    """With OMP_WAIT_POLICY=active the OpenMP workers spin between calls; the process still exits
    cleanly (the library used to be closed under them at interpreter exit: a segfault)."""
    import os
    import subprocess
    import sys
    code = ("import numpy as np; from lite.kernels.c import CBackend, read_bytes; CBackend().set_threads(2); "
            "print(read_bytes(np.ones(1 << 16, np.uint64), 2))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_WAIT_POLICY="active"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "0"


# ---- activation quantization (bit-exact) -----------------------------------------------------

@pytest.mark.parametrize("cols", [32, 256, 1408, 2048 + 256])
def test_quantize_q8_0_bitexact(cb, cols):
    g = rng(cols)
    x = g.standard_normal((3, cols)).astype(np.float32) * np.float32(3)
    x[0, :32] = 0                                      # an all-zero block
    x[1, 32:64] *= np.float32(1e-7)                    # fp16 subnormal scale
    x[2, :32] = np.float32(0.5) * np.arange(32, dtype=np.float32) * np.float32(127 / 15.5)  # exact halves
    np.testing.assert_array_equal(cb.quantize_q8_0(x), q8_0_ref(x))


@pytest.mark.parametrize("cols", [256, 2048, 1280])
def test_quantize_q8_k_bitexact(cb, cols):
    g = rng(cols + 1)
    x = g.standard_normal((2, cols)).astype(np.float32)
    x[0, :256] = 0
    np.testing.assert_array_equal(cb.quantize_q8_k(x), q8_k_ref(x))


# ---- matmul ------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", FLOAT, ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 3, 17])
def test_matmul_float(cb, qtype, t):
    w = make_weight(qtype, 37, 200, seed=t)
    x = rng(t).standard_normal((t, 200)).astype(np.float32)
    assert rel(cb.matmul(x, w), REF.matmul(x, w)) < 1e-5


@pytest.mark.parametrize("qtype", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("odd", [False, True], ids=["even", "odd"])
def test_matmul_quant(cb, qtype, t, odd):
    """37 rows: two streaming chunks of 16 and a short one for one token. 45 blocks of 32 take
    the Q4_0/Q8_0 kernels through 8-block groups, a 4-block group and a single block; 17 tokens
    through tiles of 4 and one of 1."""
    if qtype in (QType.Q4_K, QType.Q6_K):
        cols = 768 if odd else 512
    else:
        cols = 1440 if odd else 1408        # 45 / 44 blocks of 32
    n = 37
    w = make_weight(qtype, n, cols, seed=t + 10)
    x = rng(t + 20).standard_normal((t, cols)).astype(np.float32)
    y = cb.matmul(x, w)
    wd = dequantize(w.data, qtype).astype(np.float64)
    tight = quant_act(x, qtype).astype(np.float64) @ wd.T
    assert rel(y, tight) < 1e-5
    assert rel(y, REF.matmul(x, w)) < 2e-2


@pytest.mark.parametrize("qtype,cols", [(QType.Q4_0, 256), (QType.Q8_0, 1056), (QType.Q4_K, 1536), (QType.Q6_K, 1536)],
                         ids=["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_matmul_large_tiles(cb, qtype, cols):
    """Enough rows to cross a panel (64 rows, then 24) and tokens for many tiles, every tile edge
    too; for Q8_0 a whole chunk of 32 blocks and a partial one in the rows-in-lanes kernel; for
    the K-quants, 6 super-blocks: that kernel's chunk of 4 and a partial one."""
    w = make_weight(qtype, 88, cols, seed=5)
    x = rng(5).standard_normal((130, cols)).astype(np.float32)
    tight = quant_act(x, qtype).astype(np.float64) @ dequantize(w.data, qtype).astype(np.float64).T
    assert rel(cb.matmul(x, w), tight) < 1e-5


@pytest.mark.parametrize("qtype", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("odd", [False, True], ids=["even", "odd"])
def test_matmul_one_token_streams(cb, qtype, odd):
    """One token over 150 rows: where the ISA has a four-stream kernel for the kind, two work items
    of four 16-row runs, one at each quarter of rows 0-127, then 22 rows in runs of their own. Every
    row's result is the bits it gets alone, and the products are right (odd: a last partial group
    of blocks)."""
    k = qtype in (QType.Q4_K, QType.Q6_K)
    cols = (1280 if odd else 1536) if k else (1440 if odd else 1408)
    n = 150
    w = make_weight(qtype, n, cols, seed=60 + odd)
    x = rng(61).standard_normal((1, cols)).astype(np.float32)
    y = cb.matmul(x, w)
    alone = np.concatenate([cb.matmul(x, QTensor("row", qtype, (1, cols), w.data[i:i + 1])) for i in range(n)], axis=1)
    np.testing.assert_array_equal(y, alone)
    tight = quant_act(x, qtype).astype(np.float64) @ dequantize(w.data, qtype).astype(np.float64).T
    assert rel(y, tight) < 1e-5


@pytest.mark.parametrize("qtype", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("threads", [1, 2])
def test_avx512_matches_avx2(qtype, threads):
    """Where the AVX-512 kernels form the integer sums the AVX2 ones form and take the same float
    steps in the same order, every shape gives the same bits: rows through 32- and 16-row passes
    and a last 8 left to AVX2, whole and partial chunks of blocks, token passes and their tails.
    Q8_0's prefill kernel takes its weights' +128 offset off in float (see kern_avx512.c), and
    the one-token kernels add their sums in other float lanes, so there the two agree to float
    rounding."""
    if 2 not in LEVELS:
        pytest.skip("no AVX-512 VNNI on this CPU/build")
    k = qtype in (QType.Q4_K, QType.Q6_K)
    shapes = [(8, 256, 2), (24, 512, 5), (40, 1536, 3), (72, 2048, 9), (200, 1280 if k else 1440, 33), (37, 2048, 1)]
    for what, t, got in products_by_isa(qtype, shapes, (1, 2), 40, threads):
        if qtype == QType.Q8_0 or t == 1:
            assert rel(got[2], got[1]) < 1e-6, what
        else:
            np.testing.assert_array_equal(got[2], got[1], err_msg=what)


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q6_K, QType.F32], ids=lambda q: q.name)
def test_matmul_same_bits_on_any_thread_count(qtype):
    """A product's work items go out by lite_share (each thread's own share from the front, then
    the others' from the back): the outputs must not depend on the thread count, nor break where
    there are fewer items than threads."""
    old = CB.threads
    try:
        for n, cols, t in [(40, 512, 1), (300, 512, 1), (72, 512, 7), (1000, 256, 3)]:
            w = make_weight(qtype, n, cols, seed=70)
            x = rng(71).standard_normal((t, cols)).astype(np.float32)
            got = {}
            for threads in (1, 2, 3, 5, 8):
                CB.set_threads(threads)
                got[threads] = CB.matmul(x, w)
            for threads, y in got.items():
                np.testing.assert_array_equal(y, got[1], err_msg=f"{n}x{cols}, {t} tokens, {threads} threads")
    finally:
        CB.set_threads(old)


def products_by_isa(qtype: QType, shapes, levels, seed: int, threads: int) -> list:
    """CB.matmul of a random weight and input of each (rows, cols, tokens) shape at each ISA level,
    on `threads` threads: (label, tokens, {level: output}) per shape."""
    old = CB.threads
    CB.set_threads(threads)
    try:
        runs = []
        for i, (n, cols, t) in enumerate(shapes):
            w = make_weight(qtype, n, cols, seed=seed + i)
            x = rng(seed + i).standard_normal((t, cols)).astype(np.float32)
            got = {}
            for isa in levels:
                CB.set_isa(isa)
                got[isa] = CB.matmul(x, w)
            runs.append((f"{qtype.name} {n}x{cols}, {t} tokens", t, got))
        return runs
    finally:
        CB.set_isa(LEVELS[-1])
        CB.set_threads(old)


@pytest.mark.parametrize("qtype", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("threads", [1, 2])
def test_avx512_vbmi_same_bits(qtype, threads):
    """kern_avx512.c is built twice, the second time with VBMI and GFNI, whose byte permutes lay
    out Q4_0 blocks in fewer steps than word permutes and whose affine transform takes the high
    nibbles: the arithmetic is the same, so are the bits, for one token (one and four streams, rows
    left to single runs, block tails) and many."""
    if 3 not in LEVELS:
        pytest.skip("no AVX-512 VBMI and GFNI on this CPU/build")
    shapes = [(8, 256, 1), (37, 2048, 1), (200, 1280 if qtype in (QType.Q4_K, QType.Q6_K) else 1440, 1),
              (512, 256, 1), (129, 2304, 1), (72, 2048, 9), (40, 1536, 3)]
    for what, _, got in products_by_isa(qtype, shapes, (2, 3), 60, threads):
        np.testing.assert_array_equal(got[3], got[2], err_msg=what)


@pytest.mark.parametrize("qtype", (QType.Q8_0, QType.Q4_0, QType.Q4_K, QType.F32, QType.F16), ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 5, 70])
def test_matmul_heads(cb, qtype, t):
    """All heads in one call equals one matmul per head (MLA's W_UK [H, C, N] / W_UV [H, V, C])."""
    h, n = 3, 10
    cols = 256 if qtype == QType.Q4_K else 96
    ws = [make_weight(qtype, n, cols, seed=30 + i) for i in range(h)]
    w3 = QTensor("heads", qtype, (h, n, cols), np.stack([w.data for w in ws]))
    x = rng(t).standard_normal((t, h, cols)).astype(np.float32)
    got = cb.matmul_heads(x, w3)
    assert got.shape == (t, h, n)
    for i in range(h):
        want = cb.matmul(np.ascontiguousarray(x[:, i]), ws[i])
        np.testing.assert_allclose(got[:, i], want, rtol=0, atol=0)
    np.testing.assert_array_equal(cb.matmul_heads(x, w3), got)     # cached weight path


def test_matmul_heads_model_path():
    """mla.per_head takes the batched op and matches the per-head loop."""
    from lite.kernels.composed import per_head
    w3 = QTensor("k_b", QType.Q8_0, (4, 16, 64),
                 np.stack([make_weight(QType.Q8_0, 16, 64, seed=i).data for i in range(4)]))
    x = rng(3).standard_normal((2, 4, 64)).astype(np.float32)
    want = np.stack([REF.matmul(np.ascontiguousarray(x[:, i]), w3.expert(i)) for i in range(4)], axis=1)
    assert rel(per_head(CB, x, w3), want) < 2e-2


def test_matmul_heads_bad_input():
    w3 = QTensor("k_b", QType.Q8_0, (4, 16, 64),
                 np.stack([make_weight(QType.Q8_0, 16, 64, seed=i).data for i in range(4)]))
    with pytest.raises(BackendError):
        CB.matmul_heads(np.ones((2, 3, 64), np.float32), w3)          # head count
    with pytest.raises(BackendError):
        CB.matmul_heads(np.ones((2, 4, 32), np.float32), w3)          # cols
    with pytest.raises(BackendError):
        CB.matmul_heads(np.ones((2, 4, 64), np.float32), make_weight(QType.Q8_0, 16, 64))   # 2-D weight
    lib, ffi = CB.lib, CB.ffi
    x = np.ones((1, 4, 64), np.float32)
    out = np.empty((1, 4, 16), np.float32)
    scratch = np.empty(4096, np.uint8)
    call = lambda wb, ob: lib.lite_matmul_heads(ffi.from_buffer("float[]", out), ob, ffi.from_buffer("float[]", x),
                                                1, 4, 64, ffi.from_buffer("uint8_t[]", w3.data), wb, 8, 16,
                                                ffi.from_buffer("uint8_t[]", scratch), scratch.nbytes)
    assert call(w3.data.nbytes, out.size) == 0
    assert call(w3.data.nbytes - 1, out.size) == lib.LITE_ERR_SIZE
    assert call(w3.data.nbytes, out.size - 1) == lib.LITE_ERR_SIZE


def test_read_bytes(cb):
    """The bandwidth probe's read, every ISA's: each thread's 8 interleaved streams of 512-byte
    pieces and the rest after them (every byte once), vector loops and their word tails."""
    from lite.kernels.c import read_bytes
    for n in (100003, 4096 + 5, 1):
        b = rng(n).integers(0, 2**63, n, dtype=np.uint64)
        assert read_bytes(b, cb.threads) == int(np.bitwise_xor.reduce(b))
    with pytest.raises(BackendError):
        read_bytes(np.ones(3, np.uint8))


# ---- small float ops ---------------------------------------------------------------------------

def test_rmsnorm(cb):
    g = rng(2)
    x = g.standard_normal((5, 300)).astype(np.float32)
    w = g.standard_normal(300).astype(np.float32)
    assert rel(cb.rmsnorm(x, w, 1e-6), REF.rmsnorm(x, w, 1e-6)) < 1e-5


def test_rope(cb):
    g = rng(3)
    x = g.standard_normal((3, 4, 64)).astype(np.float32)
    ang = g.random((3, 32)).astype(np.float32) * 6
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    assert rel(cb.rope(x, cos, sin), REF.rope(x, cos, sin)) < 1e-6


def test_softmax_silu(cb):
    g = rng(4)
    x = (g.standard_normal((4, 1001)) * 10).astype(np.float32)    # 4004: a tail after the vectors of 8
    x[0, :4] = [-100.0, 100.0, 0.0, -0.0]
    assert rel(cb.softmax(x), REF.softmax(x)) < 1e-5
    u = g.standard_normal((4, 1001)).astype(np.float32)
    assert rel(cb.silu_mul(x, u), REF.silu_mul(x, u)) < 1e-5


# ---- MLA attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("t,h,c,r,s,start", [
    (1, 16, 512, 64, 40, 39),      # decode
    (1, 16, 512, 64, 1000, 999),    # decode over 21 chunks of 48, each prefetching the next
    (3, 4, 64, 16, 12, 5),          # chunk with S > start + T
    (17, 3, 96, 8, 17, 0),          # prefill from empty
    (2, 5, 128, 32, 300, 200),      # several online-softmax chunks
    (1, 2, 32, 0, 5, 4),            # no rope dims
    (2, 9, 64, 8, 101, 99),         # a head group of 8 and one of 1; chunks with 4- and 5-position tails
    (1, 7, 40, 4, 70, 69),          # sizes the vector kernel does not take: the scalar one runs
    (1, 8, 80, 16, 61, 60),         # AVX-512: a group of 8 heads over 32-dim blocks and a 16-dim tail
])
def test_mla_attention(cb, t, h, c, r, s, start):
    g = rng(t * 100 + s)
    q_lat = g.standard_normal((t, h, c)).astype(np.float32)
    q_pe = g.standard_normal((t, h, r)).astype(np.float32)
    ckv = g.standard_normal((s, c)).astype(np.float32)
    kpe = g.standard_normal((s, r)).astype(np.float32)
    scale = 1.0 / np.sqrt(c + r)
    got = cb.mla_attention(q_lat, q_pe, ckv, kpe, scale, start)
    assert rel(got, REF.mla_attention(q_lat, q_pe, ckv, kpe, scale, start)) < 1e-5


# ---- MoE -------------------------------------------------------------------------------------------

def ffn(types, d, f, seed):
    return FFNWeights(make_weight(types[0], f, d, seed, "gate"), make_weight(types[1], f, d, seed + 1, "up"),
                      make_weight(types[2], d, f, seed + 2, "down"))


def moe_tight(x, ids, weights, experts, shared):
    """MoE with the kernel's activation quantization, in float64."""
    def mm(a, w):
        return quant_act(a.astype(np.float32), w.qtype).astype(np.float64) @ dequantize(w.data, w.qtype).astype(np.float64).T

    def run(a, fw):
        gt, up = mm(a, fw.gate), mm(a, fw.up)
        return mm(gt / (1 + np.exp(-gt)) * up, fw.down)

    out = run(x, shared) if shared is not None else np.zeros(x.shape)
    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        np.add.at(out, rows, run(x[rows], experts[int(e)]) * weights[rows, slots][:, None])
    return out


MOE_TYPES = [
    ((QType.Q4_0, QType.Q4_0, QType.Q4_0), 256, 96),
    ((QType.Q4_K, QType.Q4_K, QType.Q8_0), 256, 160),
    ((QType.Q6_K, QType.Q4_0, QType.F16), 512, 256),
]


@pytest.mark.parametrize("types,d,f", MOE_TYPES, ids=lambda v: "-".join(x.name for x in v) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("t", [1, 5])
def test_moe(cb, types, d, f, t):
    g = rng(t)
    experts = {e: ffn(types, d, f, 100 + 3 * e) for e in (2, 5, 7, 11)}
    shared = ffn(types, d, 2 * f if types[2] != QType.Q4_K else f, 900)
    ids = np.array([[5, 2], [5, 7], [11, 5], [2, 7], [7, 5]][:t], np.int32)   # repeats across tokens
    weights = g.random(ids.shape).astype(np.float32)
    x = g.standard_normal((t, d)).astype(np.float32)
    got = cb.moe(x, ids, weights, experts, shared)
    assert rel(got, moe_tight(x, ids, weights, experts, shared)) < 1e-4
    assert rel(got, REF.moe(x, ids, weights, experts, shared)) < 6e-2
    got2 = cb.moe(x, ids.astype(np.int64), weights, experts, None)
    assert rel(got2, REF.moe(x, ids, weights, experts, None)) < 6e-2


def test_moe_many_tokens(cb):
    """Experts with dozens of tokens each: panels of 64 rows (f = 160) and token tiles edge to edge."""
    types, d, f, t = (QType.Q4_0, QType.Q8_0, QType.Q4_0), 256, 160, 70
    g = rng(11)
    experts = {e: ffn(types, d, f, 300 + e) for e in range(5)}
    ids = np.stack([g.choice(5, 2, replace=False) for _ in range(t)]).astype(np.int32)
    weights = g.random(ids.shape).astype(np.float32)
    x = g.standard_normal((t, d)).astype(np.float32)
    shared = ffn(types, d, 2 * f, 901)
    got = cb.moe(x, ids, weights, experts, shared)
    assert rel(got, moe_tight(x, ids, weights, experts, shared)) < 1e-4


def test_moe_adds_each_tokens_terms_in_slot_order(cb):
    """`moe_slot_order`: every token's terms add shared first, then slot by slot, each rounded,
    however the tokens' experts are ordered in the table: the sum built here term by term, bit for
    bit. Token 1's slots list the experts in the reverse of token 0's. Every expert takes all
    three tokens, so each product has the shape it has in the call under test."""
    types, d, f = (QType.Q4_0, QType.Q4_0, QType.Q4_0), 256, 96
    g = rng(12)
    experts = {e: ffn(types, d, f, 400 + 3 * e) for e in (3, 8, 9)}
    shared = ffn(types, d, 2 * f, 902)
    ids = np.array([[3, 8, 9], [9, 8, 3], [8, 3, 9]], np.int32)
    weights = (g.random(ids.shape) * 3).astype(np.float32)
    x = g.standard_normal((3, d)).astype(np.float32)
    one = np.ones((3, 1), np.float32)
    y = {e: cb.moe(x, np.full((3, 1), e, np.int32), one, experts, None) for e in experts}
    want = cb.moe(x, np.zeros((3, 0), np.int32), np.zeros((3, 0), np.float32), {}, shared)
    for j in range(3):
        for t in range(3):
            want[t] += weights[t, j] * y[int(ids[t, j])][t]
    assert type(cb).moe_slot_order
    np.testing.assert_array_equal(cb.moe(x, ids, weights, experts, shared).view(np.uint32), want.view(np.uint32))


def test_moe_dense(cb):
    """K = 0: a dense MLP passed as `shared`."""
    d, f, t = 256, 352, 3
    dense = ffn((QType.Q4_0, QType.Q4_0, QType.Q4_0), d, f, 7)
    x = rng(9).standard_normal((t, d)).astype(np.float32)
    ids = np.zeros((t, 0), np.int32)
    w = np.zeros((t, 0), np.float32)
    got = cb.moe(x, ids, w, {}, dense)
    assert rel(got, moe_tight(x, ids, w, {}, dense)) < 1e-4
    assert rel(got, REF.ffn(x, dense)) < 3e-2


# ---- bad input --------------------------------------------------------------------------------

def _forge(w: QTensor, **kw) -> QTensor:
    """A QTensor whose fields bypass the constructor's checks (what a buggy caller could pass)."""
    forged = object.__new__(QTensor)
    for k in ("name", "qtype", "shape", "data"):
        object.__setattr__(forged, k, kw.get(k, getattr(w, k)))
    return forged


def test_bad_input_raises():
    w = make_weight(QType.Q4_0, 8, 64)
    x = np.ones((2, 64), np.float32)
    cases = [
        lambda: CB.matmul(x.astype(np.float64), w),                                   # dtype
        lambda: CB.matmul(np.ones((2, 32), np.float32), w),                           # shape
        lambda: CB.matmul(x, _forge(w, data=w.data[:, :20])),                         # truncated rows
        lambda: CB.matmul(x, _forge(w, data=w.data[:5])),                             # truncated data
        lambda: CB.matmul(np.ones((2, 60), np.float32), _forge(w, shape=(8, 60))),    # not a multiple of 32
        lambda: CB.matmul(x, _forge(w, qtype=QType.Q5_0)),                            # unsupported type
        lambda: CB.matmul(x, _forge(w, data=w.data.astype(np.int8))),                 # data dtype
        lambda: CB.matmul(x[None], w),                                                # ndim
        lambda: CB.rmsnorm(x, np.ones(63, np.float32), 1e-6),
        lambda: CB.rope(np.ones((2, 2, 8), np.float32), np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)),
        lambda: CB.silu_mul(x, np.ones((2, 63), np.float32)),
        lambda: CB.mla_attention(np.ones((2, 2, 8), np.float32), np.ones((2, 2, 4), np.float32),
                                 np.ones((2, 8), np.float32), np.ones((2, 4), np.float32), 1.0, 1),  # S < start+T
        lambda: CB.mla_attention(np.ones((1, 2, 8), np.float32), np.ones((1, 2, 4), np.float32),
                                 np.ones((3, 7), np.float32), np.ones((3, 4), np.float32), 1.0, 0),
        lambda: CB.moe(x, np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32), {}, None),   # missing expert
        lambda: CB.moe(x, np.zeros((2, 1), np.float32), np.ones((2, 1), np.float32), {0: None}, None),
        lambda: CB.moe(x, np.zeros((2, 1), np.int32), np.ones((2, 2), np.float32), {}, None),
        lambda: CB.moe(x, np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32),
                       {0: FFNWeights(w, w, w)}, None),                                # down must be [D, F]
        lambda: CB.quantize_q8_0(np.ones((1, 40), np.float32)),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(BackendError):
            case()
            pytest.fail(f"case {i} did not raise")


def test_c_side_checks():
    """The library itself refuses short buffers and bad codes (never reads out of bounds)."""
    lib, ffi = CB.lib, CB.ffi
    w = make_weight(QType.Q4_0, 8, 64)
    x = np.ones((2, 64), np.float32)
    out = np.empty((2, 8), np.float32)
    scratch = np.empty(4096, np.uint8)
    args = lambda wb, typ, ob, sb: (ffi.from_buffer("float[]", out), ob, ffi.from_buffer("float[]", x), 2, 64,
                                    ffi.from_buffer("uint8_t[]", w.data), wb, typ, 8,
                                    ffi.from_buffer("uint8_t[]", scratch), sb)
    assert lib.lite_matmul(*args(w.data.nbytes, 2, 16, 4096)) == 0
    assert lib.lite_matmul(*args(w.data.nbytes - 1, 2, 16, 4096)) == lib.LITE_ERR_SIZE
    assert lib.lite_matmul(*args(w.data.nbytes, 2, 15, 4096)) == lib.LITE_ERR_SIZE
    assert lib.lite_matmul(*args(w.data.nbytes, 2, 16, 10)) == lib.LITE_ERR_SIZE
    assert lib.lite_matmul(*args(w.data.nbytes, 6, 16, 4096)) == lib.LITE_ERR_TYPE
    assert lib.lite_matmul(ffi.NULL, 16, ffi.NULL, 2, 64, ffi.NULL, 0, 2, 8, ffi.NULL, 0) == lib.LITE_ERR_NULL
    assert lib.lite_mla_attention(ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", x),
                                  ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", x),
                                  ffi.from_buffer("float[]", x), 1, 1, 8, 8, 1, 3, 1.0) == lib.LITE_ERR_SIZE
