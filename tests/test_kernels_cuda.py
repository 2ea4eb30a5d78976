"""The CUDA backend against the numpy reference: every op on random inputs, the weight cache and
VRAM budget, CPU fallback for expert misses, device buffers, bad input refused, and the fixture
models end to end. GPU tests carry the `gpu` mark and skip (with the import's one-line reason)
when the backend is unavailable; `test_library_built` needs only nvcc and runs everywhere else.

The GPU keeps activations in float32 (no int8 activation quantization), so quantized matmuls are
checked at the C backend's "tight" tolerance directly against float64 products of the
dequantized weights."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import gguf.quants as gq

from lite.errors import BackendError
from lite.kernels.base import FFNWeights, QTensor, QType
from lite.kernels.dequant import dequantize
from lite.kernels.reference import ReferenceBackend

try:
    from lite.kernels import cuda as cmod
    from lite.kernels.cuda import CudaBackend, DeviceBuffer
    CB = CudaBackend()
    WHY = ""
except ImportError as e:
    cmod = CB = None
    WHY = str(e).splitlines()[0] if str(e) else type(e).__name__

REF = ReferenceBackend()
QUANT = (QType.Q8_0, QType.Q4_0, QType.Q4_K, QType.Q6_K)
FLOAT = (QType.F32, QType.F16, QType.BF16)


def gpu(f):
    """Mark a test as needing the GPU and skip it (with the reason) when the backend is absent."""
    return pytest.mark.gpu(pytest.mark.skipif(CB is None, reason=f"CUDA backend not available: {WHY}")(f))


def rng(seed=0):
    return np.random.default_rng(seed)


def make_weight(qtype: QType, n: int, cols: int, seed: int = 1, name: str = "w", readonly: bool = False) -> QTensor:
    g = rng(seed)
    w = (g.standard_normal((n, cols)) * 0.5).astype(np.float32)
    if qtype == QType.F32:
        data = w.view(np.uint8).reshape(n, -1).copy()
    elif qtype in (QType.Q4_K, QType.Q6_K):
        # gguf has no K-quant quantizer: random blocks are valid blocks; keep the scales sane.
        size = {QType.Q4_K: 144, QType.Q6_K: 210}[qtype]
        data = g.integers(0, 256, (n, cols // 256, size), dtype=np.uint8)
        amp = 0.002 if qtype == QType.Q4_K else 0.0002
        d = (g.random((n, cols // 256)) * amp + amp / 4).astype(np.float16).view(np.uint8).reshape(n, -1, 2)
        if qtype == QType.Q4_K:
            data[..., 0:2] = d
            data[..., 2:4] = d
        else:
            data[..., 208:210] = d
        data = data.reshape(n, -1)
    else:
        data = np.ascontiguousarray(np.asarray(gq.quantize(w, qtype)).view(np.uint8).reshape(n, -1))
    if readonly:
        data.flags.writeable = False
    return QTensor(name, qtype, (n, cols), data)


def dense64(w: QTensor) -> np.ndarray:
    return dequantize(w.data, w.qtype).astype(np.float64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


# ---- no GPU needed -----------------------------------------------------------------------------------

def _native_lib() -> str | None:
    import lite
    if os.environ.get("LITE_CUDA_LIB"):
        return os.environ["LITE_CUDA_LIB"]
    for p in lite.__path__:
        cand = os.path.join(p, "_native", "liblite_cuda.so")
        if os.path.isfile(cand):
            return cand
    return None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: the CUDA library is not built")
def test_library_built():
    """With nvcc present the install builds liblite_cuda.so; it opens without a GPU or driver,
    has the header's ABI version, and reports a missing device as a status (never a crash)."""
    from cffi import FFI
    path = _native_lib()
    assert path, "liblite_cuda.so was not installed into lite/_native (is nvcc visible to CMake?)"
    header_path = os.path.join(os.path.dirname(path), "lite_cuda.h")
    if not os.path.isfile(header_path):            # a build tree: the header stays in csrc/
        header_path = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "lite_cuda.h")
    header = open(header_path).read()
    ffi = FFI()
    ffi.cdef("int lite_cuda_abi_version(void); int lite_cuda_device_count(int *count);"
             "int lite_cuda_last_error(char *buf, int64_t n);"
             "int lite_cuda_matmul(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t cols,"
             " const uint8_t *w, int64_t w_bytes, int type, int64_t n_rows, void *stream);")
    lib = ffi.dlopen(path)
    assert lib.lite_cuda_abi_version() == int(re.search(r"LITE_CUDA_ABI_VERSION\s+(\d+)", header).group(1))
    n = ffi.new("int *")
    rc = lib.lite_cuda_device_count(n)
    buf = ffi.new("char[512]")
    if n[0] == 0:
        assert rc == -8                                # LITE_CUDA_ERR_NODEV
        assert lib.lite_cuda_last_error(buf, 512) == -8 and ffi.string(buf)
    else:
        assert rc == 0
    # Argument checks run before any CUDA call: they work without a device.
    null = ffi.NULL
    assert lib.lite_cuda_matmul(null, 8, null, 1, 64, null, 36, 6, 1, null) == -2        # Q5_0: unsupported
    assert lib.lite_cuda_matmul(null, 8, null, 1, 60, null, 36, 2, 1, null) == -5        # 60 % 32
    lib.lite_cuda_last_error(buf, 512)
    assert b"multiple" in ffi.string(buf)
    # The Python module turns a missing device into a one-line ImportError.
    if n[0] == 0:
        r = subprocess.run([sys.executable, "-c", "import lite.kernels.cuda"], capture_output=True, text=True)
        assert r.returncode != 0 and "ImportError: no usable CUDA device" in r.stderr
        from lite.kernels import available_backends
        assert "cuda" not in available_backends()


# ---- device buffers and library basics ---------------------------------------------------------------

@gpu
def test_device_buffer_lifetime():
    a = rng(1).standard_normal(1000).astype(np.float32)
    with DeviceBuffer(a.nbytes) as b:
        b.upload(a)
        assert np.array_equal(b.download(np.empty_like(a)), a)
        with pytest.raises(BackendError):
            b.upload(np.zeros(2000, np.float32))
    with pytest.raises(BackendError):
        b.ptr
    b.free()                                   # idempotent
    with pytest.raises(BackendError):
        DeviceBuffer(0)
    props = cmod.device_properties(0)
    assert props["total_bytes"] > 0 and props["compute_capability"][0] >= 7


# ---- matmul ------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("qtype", FLOAT, ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 3, 17])
def test_matmul_float(qtype, t):
    w = make_weight(qtype, 37, 200, seed=t)         # 200: not a multiple of 32
    x = rng(t).standard_normal((t, 200)).astype(np.float32)
    assert rel(CB.matmul(x, w), REF.matmul(x, w)) < 1e-5


@gpu
@pytest.mark.parametrize("qtype", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 3, 17])
def test_matmul_quant(qtype, t):
    cols = 512 if qtype in (QType.Q4_K, QType.Q6_K) else 1408
    w = make_weight(qtype, 37, cols, seed=t + 10)
    x = rng(t + 20).standard_normal((t, cols)).astype(np.float32)
    y = CB.matmul(x, w)
    assert rel(y, x.astype(np.float64) @ dense64(w).T) < 1e-5
    assert rel(y, REF.matmul(x, w)) < 2e-2


@pytest.fixture(params=[1, 0], ids=["block_per_row", "warp_per_row"])
def matvec_variant(request):
    """Run a one-token test under each matvec variant (the library default is 1)."""
    cmod._check(CB.lib.lite_cuda_set_matvec(request.param), "set_matvec")
    yield request.param
    cmod._check(CB.lib.lite_cuda_set_matvec(1), "set_matvec")


@gpu
@pytest.mark.parametrize("qtype", QUANT + FLOAT, ids=lambda q: q.name)
@pytest.mark.parametrize("n,cols", [(37, 1408), (70, 2048), (5, 96)])
def test_matvec_variants(qtype, n, cols, matvec_variant):
    """One token (decode): both kernels against float64, odd row counts, rows whose device
    layout is 8-, 4- or 2-byte aligned (Q4_0 / Q8_0 at 1408, 2048, 96 columns)."""
    if qtype in (QType.Q4_K, QType.Q6_K):
        cols = {1408: 1536, 96: 256}.get(cols, cols)
    w = make_weight(qtype, n, cols, seed=n + cols)
    x = rng(n).standard_normal((1, cols)).astype(np.float32)
    assert rel(CB.matmul(x, w), x.astype(np.float64) @ dense64(w).T) < 1e-5


@gpu
@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q6_K, QType.BF16], ids=lambda q: q.name)
def test_matmul_large_tiles(qtype):
    """Tokens and rows crossing the 8-token tile and the 4-row block edges."""
    w = make_weight(qtype, 70, 512, seed=5)
    x = rng(5).standard_normal((130, 512)).astype(np.float32)
    assert rel(CB.matmul(x, w), x.astype(np.float64) @ dense64(w).T) < 1e-5


@gpu
def test_weight_cache():
    """Read-only weights (the memory map) are uploaded once; writable ones are streamed."""
    be = CudaBackend()
    w = make_weight(QType.Q4_0, 64, 256, seed=3, readonly=True)
    x = rng(3).standard_normal((2, 256)).astype(np.float32)
    y1 = be.matmul(x, w)
    y2 = be.matmul(x, w)
    assert np.array_equal(y1, y2) and be.stats.uploads == 1 and be.stats.resident_bytes == w.nbytes
    wv = make_weight(QType.Q4_0, 64, 256, seed=3)
    assert np.array_equal(be.matmul(x, wv), y1) and be.stats.streamed_bytes == wv.nbytes
    del w
    import gc
    gc.collect()
    be._sweep()
    assert be.stats.resident_bytes == 0
    be.close()


@gpu
@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.F16], ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 5])
def test_matmul_heads(qtype, t):
    h, n, cols = 4, 48, 128
    w = make_weight(qtype, h * n, cols, seed=t, readonly=True)
    w3 = QTensor("blk.0.attn_k_b.weight", qtype, (h, n, cols), w.data.reshape(h, n, -1))
    x = rng(t).standard_normal((t, h, cols)).astype(np.float32)
    want = np.stack([REF.matmul(np.ascontiguousarray(x[:, i]), w3.expert(i)) for i in range(h)], axis=1)
    assert rel(CB.matmul_heads(x, w3), want) < 1e-5


# ---- small float ops ---------------------------------------------------------------------------------

@gpu
def test_rmsnorm():
    g = rng(2)
    x = g.standard_normal((5, 300)).astype(np.float32)
    w = g.standard_normal(300).astype(np.float32)
    assert rel(CB.rmsnorm(x, w, 1e-6), REF.rmsnorm(x, w, 1e-6)) < 1e-5


@gpu
def test_rope():
    g = rng(3)
    x = g.standard_normal((3, 4, 64)).astype(np.float32)
    ang = g.random((3, 32)).astype(np.float32) * 6
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    assert rel(CB.rope(x, cos, sin), REF.rope(x, cos, sin)) < 1e-6


@gpu
def test_softmax_silu():
    g = rng(4)
    x = (g.standard_normal((4, 1000)) * 10).astype(np.float32)
    assert rel(CB.softmax(x), REF.softmax(x)) < 1e-5
    u = g.standard_normal((4, 1000)).astype(np.float32)
    assert rel(CB.silu_mul(x, u), REF.silu_mul(x, u)) < 1e-5


# ---- MLA attention -----------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("t,h,c,r,s,start", [
    (1, 16, 512, 64, 40, 39),      # decode
    (3, 4, 64, 16, 12, 5),          # chunk with S > start + T
    (17, 3, 96, 8, 17, 0),          # prefill from empty
    (2, 5, 128, 32, 300, 200),      # several online-softmax chunks
    (1, 2, 32, 0, 5, 4),            # no rope dims
    (2, 16, 512, 64, 1100, 1098),   # Lite dims, long cache
    (1, 16, 512, 64, 5000, 4999),   # decode over many splits of the positions
    (4, 3, 64, 16, 300, 296),       # splits with causal tokens (later splits empty for early tokens)
])
def test_mla_attention(t, h, c, r, s, start):
    g = rng(t * 100 + s)
    q_lat = g.standard_normal((t, h, c)).astype(np.float32)
    q_pe = g.standard_normal((t, h, r)).astype(np.float32)
    ckv = g.standard_normal((s, c)).astype(np.float32)
    kpe = g.standard_normal((s, r)).astype(np.float32)
    scale = 1.0 / np.sqrt(c + r)
    got = CB.mla_attention(q_lat, q_pe, ckv, kpe, scale, start)
    assert rel(got, REF.mla_attention(q_lat, q_pe, ckv, kpe, scale, start)) < 1e-5


def dev(a: np.ndarray) -> DeviceBuffer:
    """`a` on the device (uploaded and waited for)."""
    b = DeviceBuffer(max(a.nbytes, 4))
    b.upload(a)
    CB.synchronize()
    cmod._check(CB.lib.lite_cuda_device_sync(), "sync")
    return b


def fetch(b: DeviceBuffer, shape, dtype=np.float32) -> np.ndarray:
    cmod._check(CB.lib.lite_cuda_device_sync(), "sync")
    return b.download(np.empty(shape, dtype))


@gpu
@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_K, QType.F16], ids=lambda q: q.name)
def test_matmul_heads_strided(qtype):
    """Each head's input read at a stride (the query's nope part, inside [H, N + R]) and its output
    written at another: one launch for all heads, as decode_layers uses it."""
    h, n, cols, xs, os_ = 4, 40, 256, 256 + 64, 48
    w = make_weight(qtype, h * n, cols, seed=5)
    x = rng(5).standard_normal((h, xs)).astype(np.float32)
    want = np.stack([x[i, :cols].astype(np.float64) @ dense64(w)[i * n:(i + 1) * n].T for i in range(h)])
    dx, dw, do = dev(x), CB.upload_weight(w), dev(np.full((h, os_), np.nan, np.float32))
    cmod._check(CB.lib.lite_cuda_matmul_heads(do.typed(), h * os_, os_, dx.typed(), xs, 1, cols,
                                              dw.typed("uint8_t *"), w.nbytes, int(qtype), n, h, CB.ffi.NULL), "t")
    got = fetch(do, (h, os_))
    assert rel(got[:, :n], want) < 1e-5
    assert np.isnan(got[:, n:]).all()                 # nothing written between heads


@gpu
@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q8_0, QType.Q4_K], ids=lambda q: q.name)
def test_repack_layout(qtype):
    """The device layout: per row the blocks' quants in order, then their scales (Q4_0 / Q8_0);
    other types unchanged."""
    cols = 256 if qtype == QType.Q4_K else 96
    w = make_weight(qtype, 5, cols, seed=7)
    raw, out = dev(w.data), dev(np.zeros_like(w.data))
    cmod._check(CB.lib.lite_cuda_repack(out.typed("uint8_t *"), raw.typed("uint8_t *"), w.nbytes, int(qtype), cols,
                                        CB.ffi.NULL), "repack")
    got = fetch(out, w.data.shape, np.uint8)
    if qtype == QType.Q4_K:
        np.testing.assert_array_equal(got, w.data)
        return
    bs = 18 if qtype == QType.Q4_0 else 34
    blocks = w.data.reshape(5, cols // 32, bs)
    want = np.concatenate([blocks[:, :, 2:].reshape(5, -1), blocks[:, :, :2].reshape(5, -1)], axis=1)
    np.testing.assert_array_equal(got, want)
    assert CB.lib.lite_cuda_repack(raw.typed("uint8_t *"), raw.typed("uint8_t *"), w.nbytes, int(qtype), cols,
                                   CB.ffi.NULL) == CB.lib.LITE_CUDA_ERR_ARG          # in place: refused


@gpu
def test_add_rmsnorm_and_rope_rows():
    g = rng(6)
    x, d = g.standard_normal((3, 300)).astype(np.float32), g.standard_normal((3, 300)).astype(np.float32)
    w = g.standard_normal(300).astype(np.float32)
    dx, dd, dw, do = dev(x), dev(d), dev(w), dev(np.zeros_like(x))
    cmod._check(CB.lib.lite_cuda_add_rmsnorm_f32(do.typed(), dx.typed(), dd.typed(), dw.typed(), 3, 300, 1e-6,
                                                 CB.ffi.NULL), "t")
    assert rel(fetch(dx, x.shape), x + d) == 0                       # x updated in place
    assert rel(fetch(do, x.shape), REF.rmsnorm(x + d, w, 1e-6)) < 1e-5
    # rope over the last 16 of each head's 40 values, written to a packed [T, H, 16]
    q = g.standard_normal((2, 3, 40)).astype(np.float32)
    ang = g.random((2, 8)).astype(np.float32) * 6
    cos, sin = np.cos(ang), np.sin(ang)
    dq, dc, ds, dr = dev(q), dev(cos), dev(sin), dev(np.zeros((2, 3, 16), np.float32))
    cmod._check(CB.lib.lite_cuda_rope_rows(dr.typed(), 16, dq.typed() + 24, 40, dc.typed(), ds.typed(), 2, 3, 16,
                                           CB.ffi.NULL), "t")
    assert rel(fetch(dr, (2, 3, 16)), REF.rope(np.ascontiguousarray(q[..., 24:]), cos, sin)) < 1e-6


# ---- routing -----------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("e,k,groups,topg,norm,scale", [
    (64, 6, 1, 1, False, 1.0),      # Lite: greedy
    (160, 6, 8, 3, False, 16.0),    # full: group-limited, scaled
    (32, 4, 4, 2, True, 2.5),       # renormalised
])
def test_route(e, k, groups, topg, norm, scale):
    from lite.model.moe import route
    logits = (rng(e).standard_normal((9, e)) * 2).astype(np.float32)
    ids, w, probs = CB.route(logits, k, groups, topg, norm, scale)
    cfg = SimpleNamespace(group_limited=groups > 1, n_group=groups, topk_group=topg, n_expert_used=k,
                          expert_weights_norm=norm, expert_weights_scale=scale)
    want_p = REF.softmax(logits)
    want_ids, want_w = route(cfg, want_p)
    np.testing.assert_allclose(probs, want_p, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(w, want_w, atol=1e-6 * scale, rtol=0)


# ---- MoE ---------------------------------------------------------------------------------------------

def ffn(types, d, f, seed, prefix=None, readonly=False):
    names = [f"{prefix}.ffn_{p}_exps.weight[{seed}]" if prefix else p for p in ("gate", "up", "down")]
    return FFNWeights(make_weight(types[0], f, d, seed, names[0], readonly),
                      make_weight(types[1], f, d, seed + 1, names[1], readonly),
                      make_weight(types[2], d, f, seed + 2, names[2], readonly))


def moe64(x, ids, weights, experts, shared):
    def run(a, fw):
        gt, up = a @ dense64(fw.gate).T, a @ dense64(fw.up).T
        return (gt / (1 + np.exp(-gt)) * up) @ dense64(fw.down).T
    x = x.astype(np.float64)
    out = run(x, shared) if shared is not None else np.zeros(x.shape)
    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        np.add.at(out, rows, run(x[rows], experts[int(e)]) * weights[rows, slots][:, None])
    return out


def moe_id(v) -> str:
    return "-".join(x.name for x in v) if isinstance(v, tuple) else str(v)


MOE_TYPES = [
    ((QType.Q4_0, QType.Q4_0, QType.Q4_0), 256, 96),
    ((QType.Q4_K, QType.Q4_K, QType.Q8_0), 256, 160),
    ((QType.Q6_K, QType.Q4_0, QType.F16), 512, 256),
]
IDS = np.array([[5, 2], [5, 7], [11, 5], [2, 7], [7, 5]], np.int32)


@gpu
@pytest.mark.parametrize("types,d,f", MOE_TYPES, ids=moe_id)
@pytest.mark.parametrize("t", [1, 5, 40])
def test_moe(types, d, f, t):
    g = rng(t)
    experts = {e: ffn(types, d, f, 100 + 3 * e) for e in (2, 5, 7, 11)}
    shared = ffn(types, d, 2 * f if types[2] != QType.Q4_K else f, 900)
    ids = np.resize(IDS, (t, 2))
    weights = g.random(ids.shape).astype(np.float32)
    x = g.standard_normal((t, d)).astype(np.float32)
    got = CB.moe(x, ids, weights, experts, shared)
    assert rel(got, moe64(x, ids, weights, experts, shared)) < 1e-4
    assert rel(got, REF.moe(x, ids, weights, experts, shared)) < 1e-4
    got2 = CB.moe(x, ids.astype(np.int64), weights, experts, None)
    assert rel(got2, REF.moe(x, ids, weights, experts, None)) < 1e-4


@gpu
def test_moe_dense():
    """K = 0: a dense MLP passed as `shared`."""
    d, f, t = 256, 352, 3
    dense = ffn((QType.Q4_0, QType.Q4_0, QType.Q4_0), d, f, 7)
    x = rng(9).standard_normal((t, d)).astype(np.float32)
    ids, w = np.zeros((t, 0), np.int32), np.zeros((t, 0), np.float32)
    got = CB.moe(x, ids, w, {}, dense)
    assert rel(got, moe64(x, ids, w, {}, dense)) < 1e-4
    assert rel(got, REF.ffn(x, dense)) < 1e-4


@gpu
@pytest.mark.parametrize("types,d,f", MOE_TYPES, ids=moe_id)
@pytest.mark.parametrize("with_shared", [True, False])
def test_moe_decode(types, d, f, with_shared):
    """One token's experts with ids and weights on the device and a device table of every expert
    (ids outside the table are skipped)."""
    g = rng(12)
    table = [ffn(types, d, f, 100 + 3 * e) for e in range(6)]
    shared = ffn(types, d, 2 * f if types[2] != QType.Q4_K else f, 900)
    entries = table + ([shared] if with_shared else [])
    ids = np.array([4, 1, 9, 3], np.int32)                          # 9: not in the table
    wts = g.random(4).astype(np.float32)
    x = g.standard_normal((1, d)).astype(np.float32)
    ffi, lib = CB.ffi, CB.lib
    keep = [CB.upload_weight(q) for fw in entries for q in (fw.gate, fw.up, fw.down)]
    tab = ffi.new("lite_cuda_expert[]", len(entries))
    rb = ffi.new("int64_t *")
    for j, fw in enumerate(entries):
        width = fw.gate.shape[0]
        for p, (q, cols) in enumerate(((fw.gate, d), (fw.up, d), (fw.down, width))):
            tab[j].w[p] = keep[3 * j + p].typed("uint8_t *")
            cmod._check(lib.lite_cuda_row_bytes(rb, int(q.qtype), cols), "t")
            tab[j].row_bytes[p], tab[j].type[p] = rb[0], int(q.qtype)
        tab[j].ffn = width
    dtab = dev(np.frombuffer(ffi.buffer(tab), np.uint8))
    max_ffn = max(fw.gate.shape[0] for fw in entries)
    n_scr = 5 * ((max_ffn + 31) // 32 * 32)
    dx, di, dwt, do, scr = dev(x), dev(ids), dev(wts), dev(np.zeros(d, np.float32)), dev(np.zeros(n_scr, np.float32))
    cmod._check(lib.lite_cuda_moe_decode(do.typed(), dx.typed(), d, di.typed("int32_t *"), dwt.typed(), 4,
                                         dtab.typed("lite_cuda_expert *"), len(entries), 6 if with_shared else -1,
                                         max_ffn, scr.typed(), n_scr, ffi.NULL), "moe_decode")
    keep_ids = ids[None, [0, 1, 3]]
    want = moe64(x, keep_ids, wts[None, [0, 1, 3]], dict(enumerate(table)), shared if with_shared else None)
    assert rel(fetch(do, (1, d)), want) < 1e-4


def _expert_setup(t=6, readonly=True):
    types = (QType.Q4_0, QType.Q4_0, QType.Q4_0)
    experts = {e: ffn(types, 256, 128, e, prefix="blk.1", readonly=readonly) for e in range(8)}
    shared = ffn(types, 256, 128, 50, readonly=readonly)
    g = rng(11)
    ids = np.stack([g.permutation(8)[:3] for _ in range(t)]).astype(np.int32)
    w = g.random(ids.shape).astype(np.float32)
    x = g.standard_normal((t, 256)).astype(np.float32)
    return x, ids, w, experts, shared


@gpu
@pytest.mark.parametrize("readonly", [True, False], ids=["mmap", "pager"])
def test_expert_cache_budget(readonly):
    """A budget that holds the shared expert and ~3 routed experts: hits, evictions, exact results.
    Writable expert views (the pager's slots) are cached by name within their pool."""
    x, ids, w, experts, shared = _expert_setup(readonly=readonly)
    one = sum(q.nbytes for q in (shared.gate, shared.up, shared.down))
    be = CudaBackend(vram_budget=4 * one)
    want = REF.moe(x, ids, w, experts, shared)
    for _ in range(3):
        for r in range(x.shape[0]):
            got = be.moe(x[r:r + 1], ids[r:r + 1], w[r:r + 1], experts, shared)
            assert rel(got, want[r:r + 1]) < 1e-4
    st = be.stats
    assert st.expert_hits > 0 and st.expert_evictions > 0
    assert st.resident_bytes + st.expert_bytes <= be.vram_budget
    be.close()


@gpu
def test_tiny_budget_streams():
    x, ids, w, experts, shared = _expert_setup()
    be = CudaBackend(vram_budget=1)
    assert rel(be.moe(x, ids, w, experts, shared), REF.moe(x, ids, w, experts, shared)) < 1e-4
    assert be.stats.streamed_bytes > 0 and be.stats.expert_bytes == 0
    be.close()


@gpu
@pytest.mark.parametrize("policy", ["cpu", "auto"])
def test_expert_misses_on_cpu(policy):
    x, ids, w, experts, shared = _expert_setup()
    be = CudaBackend(miss_policy=policy)
    want = REF.moe(x, ids, w, experts, shared)
    for _ in range(2):
        assert rel(be.moe(x, ids, w, experts, shared), want) < 5e-2   # CPU experts: int8 activations
    assert be.stats.cpu_experts > 0 and be.stats.cpu_s_per_byte is not None
    if policy == "auto":
        assert be.stats.expert_bytes > 0        # misses were copied for next time
    be.close()


# ---- bad input -----------------------------------------------------------------------------------------

def _forge(w: QTensor, **kw) -> QTensor:
    forged = object.__new__(QTensor)
    for k in ("name", "qtype", "shape", "data"):
        object.__setattr__(forged, k, kw.get(k, getattr(w, k)))
    return forged


@gpu
def test_bad_input_raises():
    w = make_weight(QType.Q4_0, 8, 64)
    x = np.ones((2, 64), np.float32)
    cases = [
        lambda: CB.matmul(x.astype(np.float64), w),
        lambda: CB.matmul(np.ones((2, 32), np.float32), w),
        lambda: CB.matmul(x, _forge(w, data=w.data[:, :20])),
        lambda: CB.matmul(x, _forge(w, data=w.data[:5])),
        lambda: CB.matmul(np.ones((2, 60), np.float32), _forge(w, shape=(8, 60))),
        lambda: CB.matmul(x, _forge(w, qtype=QType.Q5_0)),
        lambda: CB.matmul(x, _forge(w, data=w.data.astype(np.int8))),
        lambda: CB.matmul(x[None], w),
        lambda: CB.rmsnorm(x, np.ones(63, np.float32), 1e-6),
        lambda: CB.rope(np.ones((2, 2, 8), np.float32), np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)),
        lambda: CB.silu_mul(x, np.ones((2, 63), np.float32)),
        lambda: CB.mla_attention(np.ones((2, 2, 8), np.float32), np.ones((2, 2, 4), np.float32),
                                 np.ones((2, 8), np.float32), np.ones((2, 4), np.float32), 1.0, 1),
        lambda: CB.mla_attention(np.ones((1, 2, 8), np.float32), np.ones((1, 2, 4), np.float32),
                                 np.ones((3, 7), np.float32), np.ones((3, 4), np.float32), 1.0, 0),
        lambda: CB.mla_attention(np.ones((1, 1, 1024), np.float32), np.ones((1, 1, 64), np.float32),
                                 np.ones((1, 1024), np.float32), np.ones((1, 64), np.float32), 1.0, 0),
        lambda: CB.route(np.ones((2, 10), np.float32), 11),
        lambda: CB.route(np.ones((2, 10), np.float32), 2, n_group=3, topk_group=1),
        lambda: CB.moe(x, np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32), {}, None),
        lambda: CB.moe(x, np.zeros((2, 1), np.float32), np.ones((2, 1), np.float32), {0: None}, None),
        lambda: CB.moe(x, np.zeros((2, 1), np.int32), np.ones((2, 2), np.float32), {}, None),
        lambda: CB.moe(x, np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32), {0: FFNWeights(w, w, w)}, None),
        lambda: CudaBackend(miss_policy="sometimes"),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(BackendError):
            case()
            pytest.fail(f"case {i} did not raise")


@gpu
def test_library_side_checks():
    """The library refuses bad sizes and codes itself, with a message."""
    lib, ffi = CB.lib, CB.ffi
    w = make_weight(QType.Q4_0, 8, 64)
    with DeviceBuffer(w.nbytes) as dw, DeviceBuffer(64 * 4) as dx, DeviceBuffer(16 * 4) as do:
        dw.upload(w.data)
        args = lambda wb, typ, ob: (do.typed(), ob, dx.typed(), 2, 64, dw.typed("uint8_t *"), wb, typ, 8, ffi.NULL)
        assert lib.lite_cuda_matmul(*args(w.nbytes, 2, 16)) == 0
        assert lib.lite_cuda_matmul(*args(w.nbytes - 1, 2, 16)) == lib.LITE_CUDA_ERR_SIZE
        assert lib.lite_cuda_matmul(*args(w.nbytes, 2, 15)) == lib.LITE_CUDA_ERR_SIZE
        assert lib.lite_cuda_matmul(*args(w.nbytes, 6, 16)) == lib.LITE_CUDA_ERR_TYPE
        assert "weight" in cmod._last_error(ffi, lib) or "type" in cmod._last_error(ffi, lib)
        assert lib.lite_cuda_matmul(ffi.NULL, 16, ffi.NULL, 2, 64, ffi.NULL, w.nbytes, 2, 8, ffi.NULL) == \
            lib.LITE_CUDA_ERR_NULL
        assert lib.lite_cuda_mla_attention(do.typed(), dx.typed(), dx.typed(), dx.typed(), dx.typed(),
                                           1, 1, 8, 8, 1, 3, 1.0, ffi.NULL, 0, ffi.NULL) == lib.LITE_CUDA_ERR_SIZE
        assert lib.lite_cuda_matmul_heads(do.typed(), 16, 8, dx.typed(), 4, 2, 64, dw.typed("uint8_t *"), w.nbytes,
                                          2, 4, 2, ffi.NULL) == lib.LITE_CUDA_ERR_ARG      # heads overlap
        assert lib.lite_cuda_stream_sync(ffi.NULL) == 0


# ---- the fixture models end to end -------------------------------------------------------------------

FIXTURES = ("lite-tiny", "v2-tiny-yarn")


@gpu
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_model(name, converted, reference_outputs):
    import lite
    ref, _ = reference_outputs(name)
    m = lite.load(converted(name, "f32"), backend="cuda")
    for b, ids in enumerate(ref["input_ids"]):
        np.testing.assert_allclose(m.logits(ids), ref["logits"][b], atol=1e-3, rtol=0)
    cache = m.new_cache()
    logits = m.forward(ref["input_ids"][0], cache)
    for j, want in enumerate(ref["greedy_ids"]):
        np.testing.assert_allclose(logits[-1], ref["greedy_logits"][j], atol=1e-3, rtol=0)
        assert int(np.argmax(logits[-1])) == int(want)
        logits = m.forward([int(want)], cache)
    m.close()


@gpu
@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("preset", ["q8_0", "bf16"])
def test_fixture_quantized_matches_reference(name, preset, converted, reference_outputs):
    """Same quantized file on the GPU and on the numpy reference: float32 activations on both."""
    import lite
    ref, _ = reference_outputs(name)
    path = converted(name, preset)
    ids = ref["input_ids"][0]
    want = lite.load(path, backend="reference").logits(ids)
    got = lite.load(path, backend="cuda").logits(ids)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)


@gpu
def test_fixture_with_pager(converted, reference_outputs):
    """Experts through the RAM-budgeted host pager into a small GPU expert cache: same logits."""
    import lite
    ref, _ = reference_outputs("lite-tiny")
    path = converted("lite-tiny", "q8_0")
    ids = ref["input_ids"][0][:40]
    want = lite.load(path, backend="cuda").logits(ids)
    with pytest.raises(lite.LiteError, match="minimum is") as e:
        lite.load(path, ram_budget=1)
    low = int(str(e.value).rsplit("(", 1)[1].split(" bytes")[0].replace(",", ""))
    m = lite.load(path, backend="cuda", ram_budget=low)
    assert np.array_equal(m.logits(ids), want)
    m.close()


# ---- decode through every layer on the device ------------------------------------------------------

def _per_layer(model) -> None:
    model._net._pack, model._net._pack_tried = None, True


@gpu
@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m", "f16"])
def test_decode_layers_matches_the_per_layer_path(name, preset, converted):
    """Decode with the layers on the device (latent caches mirrored there) against the per-layer
    ops on the same GPU: a prompt, decode steps, a second prompt chunk after them (host-written
    rows that the mirror must pick up), more steps."""
    import lite
    path = converted(name, preset)
    runs = []
    for on_device in (True, False):
        m = lite.load(path, backend="cuda")
        if not on_device:
            _per_layer(m)
        cache = m.new_cache()
        steps = [m.forward([3, 14, 15, 92, 65], cache)]
        steps += [m.forward([tok], cache) for tok in (35, 89, 79)]
        steps.append(m.forward([32, 38, 46], cache))
        steps += [m.forward([tok], cache) for tok in (26, 43)]
        assert (m._net._pack is not None) == on_device
        runs.append(np.concatenate(steps, axis=0))
        m.close()
    assert rel(runs[0], runs[1].astype(np.float64)) < 1e-4


@gpu
def test_decode_layers_needs_every_weight_in_the_budget(converted):
    """A VRAM budget that cannot hold every weight: prepare_layers refuses, holds nothing, and
    decoding goes op by op through the expert cache with the same logits."""
    import lite
    path = converted("lite-tiny", "q8_0")
    want_m = lite.load(path, backend="cuda")
    cache = want_m.new_cache()
    want = [want_m.forward([3, 1, 4], cache), want_m.forward([1], cache), want_m.forward([5], cache)]
    assert want_m._net._pack is not None
    from lite.model.tensors import is_expert_tensor
    tensors = want_m.file.tensors.items()
    resident = sum(t.nbytes for n, t in tensors if not is_expert_tensor(n) and n != "token_embd.weight")
    experts = sum(t.nbytes for n, t in tensors if is_expert_tensor(n))
    small = lite.load(path, backend="cuda", vram_budget=str(resident + experts // 2))
    cache = small.new_cache()
    got = [small.forward([3, 1, 4], cache), small.forward([1], cache), small.forward([5], cache)]
    assert small._net._pack is None and not any(e.pinned for e in small.backend._cache.values())
    for a, b in zip(got, want):
        assert rel(a, b.astype(np.float64)) < 1e-4
    want_m.close()
    small.close()
