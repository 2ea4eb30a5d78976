"""NumbaBackend against the numpy ReferenceBackend: every op on random inputs, odd sizes, 1 and
2 threads, and input validation.

What is compared. A product of one or two tokens with quantized weights quantizes its
activations to 8-bit blocks first, as the C kernels do; `MEANING` is the reference with that
step (a round trip through ggml's Q8_0 from gguf.quants, or for the K-quants through
256-blocks), and the products and the MoE are held to it. Every other product dequantizes
weights in float32 exactly as dequant.py does (the row decoder is checked bit for bit below) and
multiplies them into float32 activations, as the reference does.

Tolerances. Only the order of float32 additions differs from `MEANING` (SIMD partial sums,
factored block scales). Relative to the largest output magnitude the measured error is ≤ 7e-7
for most cases, so MoE is held to 1e-5; but where one row's terms cancel to a small output,
float32 rounding of terms ~50x larger than it is 9e-6 of it on a Zen 3 and 1.1e-5 on an AVX-512
Xeon (Q4_0, T=1, one row), so matmul is held to 1e-6 of the largest sum of |x_i w_i| (the scale
float32 rounding grows with; measured ≤ 4e-8 of it, where one wrong block would be ~1e-2). rope and silu_mul do
the same float32 operations as the reference; rmsnorm/softmax/attention accumulate in a
different order: all held to 1e-5.

Random K-quant weights are random bytes with sane fp16 scales (gguf has no K-quant quantizer;
every byte pattern of the 6-bit scales and quants is a valid block).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from lite.errors import BackendError
from lite.kernels import numba_kernels as nk
from lite.kernels.base import FFNWeights, QTensor
from lite.kernels.dequant import dequantize
from lite.kernels.numba_backend import NumbaBackend, set_threads
from lite.kernels.reference import ReferenceBackend

def q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x's 256-blocks as the C kernels' Q8_K: int8 quants roundf(x/d) and float32 d = amax/127."""
    b = x.reshape(-1, 256)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    return gq.np_roundf(b * inv).astype(np.int8), d


def a8(x: np.ndarray, qt: QT) -> np.ndarray:
    """x as the 8-bit blocks of a qt product see it, quantized and dequantized: ggml's Q8_0 for
    Q4_0 and Q8_0 weights, Q8_K for the K-quants."""
    if qt not in (QT.Q4_K, QT.Q6_K):
        return dequantize(np.asarray(gq.quantize(x, QT.Q8_0)).view(np.uint8), QT.Q8_0).reshape(x.shape)
    q, d = q8_k(x)
    return (q.astype(np.float32) * d).reshape(x.shape)


class NumbaMeaning(ReferenceBackend):
    """The reference with the numba backend's one choice of numerics: quantized products of one or
    two tokens meet 8-bit activations, and the MoE takes each expert's tokens (from every slot) at
    once, as the numba kernel groups them."""

    def matmul(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        if w.qtype in (QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q6_K) and 0 < x.shape[0] <= 2:
            x = a8(x, w.qtype)
        return super().matmul(x, w)

    def moe(self, x, ids, weights, experts, shared):
        out = self.ffn(x, shared) if shared is not None else np.zeros_like(x)
        for e in np.unique(ids):
            rows, slots = np.nonzero(ids == e)
            np.add.at(out, rows, self.ffn(x[rows], experts[int(e)]) * weights[rows, slots][:, None])
        return out


NB = NumbaBackend()
REF = ReferenceBackend()
MEANING = NumbaMeaning()
TOL = 1e-5
ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_K, QT.Q6_K]
THREADS = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def threads(request):
    before = numba.get_num_threads()
    set_threads(request.param)
    yield request.param
    set_threads(before)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == np.float32
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(*v.shape, 2)


def random_weight(rng, qt: QT, n: int, cols: int, name: str = "w") -> QTensor:
    """A random [n, cols] weight of type qt."""
    a = rng.standard_normal((n, cols)).astype(np.float32)
    if qt in (QT.Q4_K, QT.Q6_K):
        nb = cols // 256
        if qt == QT.Q4_K:
            raw = rng.integers(0, 256, (n, nb, 144), dtype=np.uint8)
            raw[..., 0:2] = _f16_bytes(rng.uniform(2e-4, 2e-3, (n, nb)))
            raw[..., 2:4] = _f16_bytes(rng.uniform(2e-4, 2e-3, (n, nb)))
        else:
            raw = rng.integers(0, 256, (n, nb, 210), dtype=np.uint8)
            raw[..., 208:210] = _f16_bytes(rng.uniform(2e-4, 2e-3, (n, nb)))
        return QTensor(name, qt, (n, cols), raw.reshape(n, -1))
    r = np.ascontiguousarray(gq.quantize(a, qt)).view(np.uint8).reshape(n, -1)
    return QTensor(name, qt, (n, cols), r)


def _cols(qt: QT, base: int = 512) -> int:
    return base if qt not in (QT.Q4_K, QT.Q6_K) else 512


# --- matmul -------------------------------------------------------------------------------------

@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.name)
def test_decode_row_bit_exact(qt):
    """The kernels' row decoder equals dequant.py bit for bit (incl. extreme scales)."""
    rng = np.random.default_rng(1)
    w = random_weight(rng, qt, 5, 512)
    want = dequantize(w.data, qt)
    got = np.empty_like(want)
    for r in range(5):
        nk._decode(int(qt), w.data[r], got[r], nk.LUT_F16, nk.LUT_BF16)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 2, 3, 17])
def test_matmul_parity(qt, t, threads):
    rng = np.random.default_rng(t)
    for n in (1, 37, 64):  # N not a multiple of the row tile (8) or of 4
        w = random_weight(rng, qt, n, 512)
        x = rng.standard_normal((t, 512)).astype(np.float32)
        got, want = NB.matmul(x, w), MEANING.matmul(x, w)
        terms = np.abs(x).astype(np.float64) @ np.abs(dequantize(w.data, qt)).astype(np.float64).T
        assert np.abs(got - want).max() < 1e-6 * terms.max(), (qt.name, t, n)


@pytest.mark.parametrize("qt,cols", [(QT.Q4_0, 1408), (QT.Q8_0, 1408), (QT.Q4_K, 2048),
                                     (QT.Q6_K, 768), (QT.F16, 1408), (QT.BF16, 96)])
@pytest.mark.parametrize("t", [1, 3])
def test_matmul_real_row_lengths(qt, cols, t):
    """Rows of 1408 = 44 Q4_0 blocks (Lite's ffn_down_exps), K-quant rows of 256·k."""
    rng = np.random.default_rng(cols)
    w = random_weight(rng, qt, 19, cols)
    x = rng.standard_normal((t, cols)).astype(np.float32)
    assert rel(NB.matmul(x, w), MEANING.matmul(x, w)) < TOL


def test_a8_vnni_and_portable_paths(tmp_path):
    """The quantized dots form their integer sums with `vpdpbusd` where numba compiles for a
    CPU with AVX-512 VNNI and in portable vector code elsewhere (another CPU, or NUMBA_CPU_NAME
    for a portable cache): whichever this machine uses ran above, and a child process compiled
    for a CPU without AVX-512 runs the portable one here too."""
    code = """
import json, sys
import numpy as np
from gguf import GGMLQuantizationType as QT
sys.path.insert(0, sys.argv[1])
import test_kernels_numba as t
from lite.kernels import numba_kernels as nk
rng = np.random.default_rng(7)
err = []
for qt in (QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q6_K):
    for n, cols, tok in ((19, 1408, 1), (37, 512, 2), (5, 96, 2), (3, 32, 1)):
        cols = cols if qt in (QT.Q4_0, QT.Q8_0) else 256 * (1 + cols // 512)
        w = t.random_weight(rng, qt, n, cols)
        x = rng.standard_normal((tok, cols)).astype(np.float32)
        got, want = t.NB.matmul(x, w), t.MEANING.matmul(x, w)
        terms = np.abs(x).astype(np.float64) @ np.abs(t.dequantize(w.data, qt)).astype(np.float64).T
        err.append(float(np.abs(got - want).max() / terms.max()))
print(json.dumps({"vnni": nk.A8_VNNI, "err": max(err)}))
"""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["vnni"] is False
    assert got["err"] < 1e-6


def test_a8_activations_are_ggml_q8_0():
    """The one- and two-token Q4_0 and Q8_0 paths quantize x as ggml's Q8_0 does, bit for bit (the
    C kernels' activations): int8 quants, float16-rounded scales, and each block's sum of quants;
    zero, tiny and exact-half blocks included. The K-quants' 256-blocks as the C kernels' Q8_K."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 256)) * 3).astype(np.float32)
    x[0, :32] = 0
    x[1, 32:64] *= np.float32(1e-7)
    x[0, 64:96] = np.arange(32, dtype=np.float32) - np.float32(15.5)   # halves, ties to round away
    x[0, 64] = 127                                                      # from zero: amax 127, scale 1
    xp = nk._prepared(nk.Q4_0, x)
    ref = np.asarray(gq.quantize(x, QT.Q8_0)).view(np.uint8).reshape(2, -1, 34)
    qs = xp[:, :64].copy().view(np.int8).reshape(2, -1, 32)
    np.testing.assert_array_equal(qs, ref[..., 2:].view(np.int8))
    np.testing.assert_array_equal(xp[:, 64:72], ref[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    np.testing.assert_array_equal(xp[:, 72:80], qs.astype(np.float32).sum(axis=2))
    # the K-quants' 256-blocks (Q8_K): quants at float 80, then d, then sums per 32 and per 16
    q8k, d = q8_k(x)
    np.testing.assert_array_equal(xp[:, 80:144].copy().view(np.int8), q8k)
    np.testing.assert_array_equal(xp[:, 144], d[:, 0])
    np.testing.assert_array_equal(xp[:, 145:153], q8k.reshape(2, 8, 32).astype(np.float32).sum(axis=2))
    np.testing.assert_array_equal(xp[:, 153:169], q8k.reshape(2, 16, 16).astype(np.float32).sum(axis=2))


def test_matmul_f32_exactish_and_zero_tokens():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((33, 200)).astype(np.float32)
    w = QTensor.from_float("w", a)
    x = rng.standard_normal((5, 200)).astype(np.float32)
    np.testing.assert_allclose(NB.matmul(x, w), x.astype(np.float64) @ a.T.astype(np.float64),
                               rtol=1e-5, atol=1e-5)
    assert NB.matmul(np.zeros((0, 200), np.float32), w).shape == (0, 33)


def test_matmul_readonly_mmap_like_weight():
    rng = np.random.default_rng(4)
    w = random_weight(rng, QT.Q4_0, 16, 256)
    ro = w.data.copy()
    ro.setflags(write=False)
    w2 = QTensor("ro", QT.Q4_0, w.shape, ro)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    np.testing.assert_array_equal(NB.matmul(x, w2), NB.matmul(x, w))


# --- small ops ----------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 3, 17])
def test_rmsnorm_rope_softmax_silu(t, threads):
    rng = np.random.default_rng(10 + t)
    x = rng.standard_normal((t, 300)).astype(np.float32) * 3
    w = rng.standard_normal(300).astype(np.float32)
    assert rel(NB.rmsnorm(x, w, 1e-6), REF.rmsnorm(x, w, 1e-6)) < TOL

    xr = rng.standard_normal((t, 5, 64)).astype(np.float32)
    ang = rng.uniform(-3, 3, (t, 32)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    np.testing.assert_array_equal(NB.rope(xr, cos, sin), REF.rope(xr, cos, sin))

    s = rng.standard_normal((t, 1001)).astype(np.float32) * 10
    got, want = NB.softmax(s), REF.softmax(s)
    np.testing.assert_allclose(got, want, rtol=TOL, atol=1e-8)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)

    g = rng.standard_normal((t, 1408)).astype(np.float32) * 4
    u = rng.standard_normal((t, 1408)).astype(np.float32)
    np.testing.assert_allclose(NB.silu_mul(g, u), REF.silu_mul(g, u), rtol=1e-6, atol=1e-7)


def test_softmax_extremes():
    x = np.array([[1e30, 0, -1e30], [-np.inf, 0, 0], [5, 5, 5]], np.float32)
    np.testing.assert_allclose(NB.softmax(x), REF.softmax(x), rtol=1e-6)


# --- MLA attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("t,start,h", [(1, 0, 16), (1, 40, 16), (3, 0, 3), (3, 7, 9), (17, 5, 16),
                                       (17, 0, 1)])
def test_mla_attention(t, start, h, threads):
    rng = np.random.default_rng(100 * t + start)
    c, r = 64, 16
    s = start + t + 2  # cache longer than needed: entries past start+t must be masked
    q_lat = rng.standard_normal((t, h, c)).astype(np.float32)
    q_pe = rng.standard_normal((t, h, r)).astype(np.float32)
    ckv = rng.standard_normal((s, c)).astype(np.float32)
    kpe = rng.standard_normal((s, r)).astype(np.float32)
    got = NB.mla_attention(q_lat, q_pe, ckv, kpe, 0.1, start)
    want = REF.mla_attention(q_lat, q_pe, ckv, kpe, 0.1, start)
    assert rel(got, want) < TOL


def test_mla_attention_real_widths():
    rng = np.random.default_rng(7)
    t, h, c, r, start = 2, 16, 512, 64, 30
    q_lat = rng.standard_normal((t, h, c)).astype(np.float32)
    q_pe = rng.standard_normal((t, h, r)).astype(np.float32)
    ckv = rng.standard_normal((start + t, c)).astype(np.float32)
    kpe = rng.standard_normal((start + t, r)).astype(np.float32)
    scale = (128 + 64) ** -0.5
    got = NB.mla_attention(q_lat, q_pe, ckv, kpe, scale, start)
    assert rel(got, REF.mla_attention(q_lat, q_pe, ckv, kpe, scale, start)) < TOL


# --- MoE ----------------------------------------------------------------------------------------

def _ffn(rng, qt_gu, qt_d, d, f, name):
    return FFNWeights(random_weight(rng, qt_gu, f, d, f"{name}.gate"),
                      random_weight(rng, qt_gu, f, d, f"{name}.up"),
                      random_weight(rng, qt_d, d, f, f"{name}.down"))


def _stacked_experts(rng, qt_gu, qt_d, e, d, f):
    """Experts as slices of 3-D tensors, like ffn_{gate,up,down}_exps in a GGUF file."""
    gate = [random_weight(rng, qt_gu, f, d) for _ in range(e)]
    up = [random_weight(rng, qt_gu, f, d) for _ in range(e)]
    down = [random_weight(rng, qt_d, d, f) for _ in range(e)]
    g3 = QTensor("gate_exps", qt_gu, (e, f, d), np.stack([w.data for w in gate]))
    u3 = QTensor("up_exps", qt_gu, (e, f, d), np.stack([w.data for w in up]))
    d3 = QTensor("down_exps", qt_d, (e, d, f), np.stack([w.data for w in down]))
    return {i: FFNWeights(g3.expert(i), u3.expert(i), d3.expert(i)) for i in range(e)}


@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("qts", [(QT.Q4_0, QT.Q4_0), (QT.Q4_K, QT.Q8_0), (QT.F32, QT.F32)],
                         ids=lambda q: f"{q[0].name}-{q[1].name}")
def test_moe_parity(t, qts, threads):
    rng = np.random.default_rng(t)
    d, f, e, k = 256, 96, 8, 3
    experts = _stacked_experts(rng, qts[0], qts[1], e, d, f)
    shared = _ffn(rng, qts[0], qts[1], d, 2 * f, "shexp")
    x = rng.standard_normal((t, d)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.1, 1, (t, k)).astype(np.float32)
    for sh in (shared, None):
        got, want = NB.moe(x, ids, w, experts, sh), MEANING.moe(x, ids, w, experts, sh)
        assert rel(got, want) < TOL


def test_moe_repeated_experts_and_subset_mapping():
    rng = np.random.default_rng(5)
    d, f, t = 256, 64, 5
    full = _stacked_experts(rng, QT.Q4_0, QT.Q8_0, 6, d, f)
    ids = np.array([[2, 2], [4, 2], [4, 4], [2, 4], [4, 2]], np.int32)  # same expert twice per token
    experts = {2: full[2], 4: full[4]}  # only the routed ones are supplied
    w = rng.uniform(0, 1, ids.shape).astype(np.float32)
    x = rng.standard_normal((t, d)).astype(np.float32)
    assert rel(NB.moe(x, ids, w, experts, None), MEANING.moe(x, ids, w, experts, None)) < TOL
    # many tokens on one expert takes the decode-once path (m > 2 tokens per expert)
    ids_all = np.full((t, 1), 2, np.int32)
    w1 = np.ones((t, 1), np.float32)
    assert rel(NB.moe(x, ids_all, w1, experts, None), MEANING.moe(x, ids_all, w1, experts, None)) < TOL


@pytest.mark.parametrize("t", [1, 4])
def test_moe_k0_dense_mlp(t):
    rng = np.random.default_rng(9)
    d, f = 256, 1408  # dense layer of a synthetic model; down rows of 1408 = 44 Q4_0 blocks
    dense = _ffn(rng, QT.Q4_0, QT.Q4_0, d, f, "ffn")
    x = rng.standard_normal((t, d)).astype(np.float32)
    ids = np.zeros((t, 0), np.int32)
    w = np.zeros((t, 0), np.float32)
    got = NB.moe(x, ids, w, {}, dense)
    assert rel(got, MEANING.moe(x, ids, w, {}, dense)) < TOL
    assert rel(got, MEANING.ffn(x, dense)) < TOL
    np.testing.assert_array_equal(NB.moe(x, ids, w, {}, None), np.zeros_like(x))


# --- validation ---------------------------------------------------------------------------------

def test_bad_inputs_raise_backend_error():
    rng = np.random.default_rng(0)
    w = random_weight(rng, QT.Q4_0, 8, 64)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(BackendError, match="matmul input"):
        NB.matmul(x.astype(np.float64), w)
    with pytest.raises(BackendError, match="matmul input"):
        NB.matmul(x[0], w)
    with pytest.raises(BackendError, match="does not fit weight"):
        NB.matmul(rng.standard_normal((2, 96)).astype(np.float32), w)
    # truncated bytes (QTensor's own check bypassed the way a buggy caller could)
    bad = object.__new__(QTensor)
    for k, v in dict(name="trunc", qtype=QT.Q4_0, shape=(8, 64), data=w.data[:, :30]).items():
        object.__setattr__(bad, k, v)
    with pytest.raises(BackendError, match="truncated"):
        NB.matmul(x, bad)
    odd = object.__new__(QTensor)
    for k, v in dict(name="odd", qtype=QT.Q4_0, shape=(8, 48), data=w.data[:, :27]).items():
        object.__setattr__(odd, k, v)
    with pytest.raises(BackendError, match="block size"):
        NB.matmul(rng.standard_normal((2, 48)).astype(np.float32), odd)
    q5 = object.__new__(QTensor)
    for k, v in dict(name="q5", qtype=QT.Q5_0, shape=(8, 64), data=np.zeros((8, 44), np.uint8)).items():
        object.__setattr__(q5, k, v)
    with pytest.raises(BackendError, match="Q5_0"):
        NB.matmul(x, q5)
    with pytest.raises(BackendError, match="rmsnorm weight"):
        NB.rmsnorm(x, np.ones(64), 1e-6)
    with pytest.raises(BackendError, match="rmsnorm: weight shape"):
        NB.rmsnorm(x, np.ones(63, np.float32), 1e-6)
    with pytest.raises(BackendError, match="rope"):
        NB.rope(np.zeros((2, 3, 8), np.float32), np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(BackendError, match="softmax input"):
        NB.softmax(np.zeros(3, np.float32))
    with pytest.raises(BackendError, match="silu_mul"):
        NB.silu_mul(np.zeros(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(BackendError, match="silu_mul"):
        NB.silu_mul(np.zeros(3, np.float64), np.zeros(3, np.float64))
    q = np.zeros((2, 4, 16), np.float32)
    pe = np.zeros((2, 4, 8), np.float32)
    ckv, kpe = np.zeros((5, 16), np.float32), np.zeros((5, 8), np.float32)
    with pytest.raises(BackendError, match="mla_attention"):
        NB.mla_attention(q, pe, ckv, kpe, 0.1, 4)  # needs S ≥ start+T = 6
    with pytest.raises(BackendError, match="mla_attention"):
        NB.mla_attention(q, pe, ckv, kpe, 0.1, -1)
    with pytest.raises(BackendError, match="mla ckv"):
        NB.mla_attention(q, pe, ckv.astype(np.float16), kpe, 0.1, 0)

    ffn = _ffn(rng, QT.Q4_0, QT.Q4_0, 64, 32, "e")
    ids = np.array([[0], [1]], np.int32)
    wts = np.ones((2, 1), np.float32)
    with pytest.raises(BackendError, match="expert 1 was routed"):
        NB.moe(x, ids, wts, {0: ffn}, None)
    with pytest.raises(BackendError, match="moe: ids"):
        NB.moe(x, ids, np.ones((2, 2), np.float32), {0: ffn, 1: ffn}, None)
    with pytest.raises(BackendError, match="moe: ids"):
        NB.moe(x, ids.astype(np.float32), wts, {0: ffn, 1: ffn}, None)
    wrong = _ffn(rng, QT.Q4_0, QT.Q4_0, 96, 32, "w")
    with pytest.raises(BackendError, match="shared shapes"):
        NB.moe(x, ids, wts, {0: ffn, 1: ffn}, wrong)
    with pytest.raises(BackendError, match="set_threads"):
        set_threads(0)
    with pytest.raises(BackendError, match="set_threads"):
        set_threads(numba.config.NUMBA_NUM_THREADS + 1)


def test_backend_name_and_registry():
    from lite.kernels import get_backend
    assert NB.name == "numba"
    assert get_backend("numba").name == "numba"
