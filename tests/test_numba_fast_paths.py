"""The Numba backend's decode fast paths against the numpy reference: the four-row Q8_0 kernel and
the four-block Q4_0 kernel (with their tails), matmul_heads, the serial and parallel forms of
every op (below and above the size thresholds), and the MoE kernel's odd-sized and mixed-type
branches. Tolerance as in test_kernels_numba.py: 1e-5 relative to the largest output magnitude.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from lite.errors import BackendError
from lite.kernels import numba_kernels as nk
from lite.kernels.base import FFNWeights, QTensor
from lite.kernels.dequant import dequantize
from lite.kernels.numba_backend import set_threads
from test_kernels_numba import MEANING, NB, REF, THREADS, TOL, random_weight, rel
from test_kernels_numba import threads  # noqa: F401 (a fixture)


@pytest.mark.parametrize("qt", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_K, QT.Q6_K],
                         ids=lambda q: q.name)
def test_decode_with_runtime_trip_count_bit_exact(qt):
    """The tile path passes n16 at run time (a different compiled loop): still equal to dequant.py."""
    w = random_weight(np.random.default_rng(2), qt, 3, 512)
    want = dequantize(w.data, qt)
    got = np.empty_like(want)
    for r in range(3):
        nk._decode(int(qt), w.data[r], got[r], nk.LUT_F16, nk.LUT_BF16, nk.N16)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("cols", [32, 96, 160, 224, 1408])  # 1, 3, 5, 7 and 44 blocks: Q4_0's tail loop
@pytest.mark.parametrize("t", [1, 2, 3])
def test_matmul_block_and_row_tails(qt, cols, t, threads):
    rng = np.random.default_rng(cols + t)
    for n in (5, 6, 7, 13):  # rows not a multiple of the four-row kernel (n = 1 alone: see rel)
        w = random_weight(rng, qt, n, cols)
        x = rng.standard_normal((t, cols)).astype(np.float32)
        assert rel(NB.matmul(x, w), MEANING.matmul(x, w)) < TOL, (n, cols, t)


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q8_0, QT.F32], ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 2, 3])
def test_matmul_serial_and_parallel_sizes(qt, t, threads):
    """Both sides of SERIAL_BYTES: the small matmul runs on the calling thread."""
    rng = np.random.default_rng(t)
    cols = 256
    for n in (8, 4000):
        w = random_weight(rng, qt, n, cols)
        assert (w.data.nbytes * t <= nk.SERIAL_BYTES) == (n == 8)
        x = rng.standard_normal((t, cols)).astype(np.float32)
        assert rel(NB.matmul(x, w), MEANING.matmul(x, w)) < TOL


def _heads(rng, qt, h, n, cols) -> QTensor:
    ws = [random_weight(rng, qt, n, cols) for _ in range(h)]
    return QTensor("heads", qt, (h, n, cols), np.stack([w.data for w in ws]))


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_0, QT.F32, QT.F16, QT.Q4_K], ids=lambda q: q.name)
@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("n", [10, 1024])  # below and (but for Q4_0 at T=1) above SERIAL_BYTES
def test_matmul_heads(qt, t, n, threads):
    rng = np.random.default_rng(n + t)
    h, cols = 3, 256
    w3 = _heads(rng, qt, h, n, cols)
    x = rng.standard_normal((t, h, cols)).astype(np.float32)
    got = NB.matmul_heads(x, w3)
    assert got.shape == (t, h, n) and got.flags.c_contiguous
    want = np.stack([MEANING.matmul(np.ascontiguousarray(x[:, i]), w3.expert(i)) for i in range(h)], axis=1)
    assert rel(got, want) < TOL
    for i in range(h):  # one call for all heads is exactly the per-head matmul
        np.testing.assert_array_equal(got[:, i], NB.matmul(np.ascontiguousarray(x[:, i]), w3.expert(i)))


def test_matmul_heads_model_path():
    """composed.per_head takes the batched op."""
    from lite.kernels.composed import per_head
    rng = np.random.default_rng(3)
    w3 = _heads(rng, QT.Q8_0, 4, 16, 64)
    x = rng.standard_normal((2, 4, 64)).astype(np.float32)
    want = np.stack([MEANING.matmul(np.ascontiguousarray(x[:, i]), w3.expert(i)) for i in range(4)], axis=1)
    assert rel(per_head(NB, x, w3), want) < TOL


def test_matmul_heads_bad_input():
    rng = np.random.default_rng(0)
    w3 = _heads(rng, QT.Q8_0, 4, 16, 64)
    with pytest.raises(BackendError, match="matmul_heads: input"):
        NB.matmul_heads(np.ones((2, 3, 64), np.float32), w3)           # head count
    with pytest.raises(BackendError, match="matmul_heads: input"):
        NB.matmul_heads(np.ones((2, 4, 32), np.float32), w3)           # cols
    with pytest.raises(BackendError, match="must be 3-D"):
        NB.matmul_heads(np.ones((2, 4, 64), np.float32), random_weight(rng, QT.Q8_0, 16, 64))
    with pytest.raises(BackendError, match="matmul_heads input"):
        NB.matmul_heads(np.ones((2, 4, 64), np.float64), w3)
    with pytest.raises(BackendError, match="must be a QTensor"):
        NB.matmul_heads(np.ones((2, 4, 64), np.float32), w3.data)
    assert NB.matmul_heads(np.zeros((0, 4, 64), np.float32), w3).shape == (0, 4, 16)


@pytest.mark.parametrize("shape", [(1, 2048), (40, 2048)], ids=["serial", "parallel"])
def test_row_ops_serial_and_parallel(shape, threads):
    """rmsnorm, softmax, rope and silu_mul run on the calling thread below SERIAL_ELEMS."""
    rng = np.random.default_rng(shape[0])
    x = rng.standard_normal(shape).astype(np.float32)
    assert (x.size < nk.SERIAL_ELEMS) == (shape[0] == 1)
    w = rng.standard_normal(shape[1]).astype(np.float32)
    assert rel(NB.rmsnorm(x, w, 1e-6), REF.rmsnorm(x, w, 1e-6)) < TOL
    assert rel(NB.softmax(x), REF.softmax(x)) < TOL
    u = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(NB.silu_mul(x, u), REF.silu_mul(x, u), rtol=1e-6, atol=1e-7)
    xr = x.reshape(shape[0], 32, 64)
    ang = rng.uniform(0, 6, (shape[0], 32)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    np.testing.assert_allclose(NB.rope(xr, cos, sin), REF.rope(xr, cos, sin), rtol=1e-6, atol=1e-6)


def _moe_case(rng, t, d, f, qts, e=4, k=2):
    experts = {i: FFNWeights(random_weight(rng, qts[0], f, d), random_weight(rng, qts[1], f, d),
                             random_weight(rng, qts[2], d, f)) for i in range(e)}
    x = rng.standard_normal((t, d)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.1, 1, (t, k)).astype(np.float32)
    return x, ids, w, experts


@pytest.mark.parametrize("t", [1, 2, 3])
@pytest.mark.parametrize("d,f,qts", [
    (256, 96, (QT.Q4_0, QT.Q8_0, QT.Q4_0)),   # gate and up of different types: no fused pair
    (256, 37, (QT.Q4_0, QT.Q4_0, QT.F32)),    # odd expert width: a single gate/up row at the end
    (50, 64, (QT.F16, QT.F16, QT.Q4_0)),      # D = 50: output chunks end in a 2-row tail
    (96, 64, (QT.Q8_0, QT.Q8_0, QT.Q8_0)),    # four-row Q8_0 kernel for gate/up pairs and down rows
    (256, 256, (QT.Q4_K, QT.Q6_K, QT.Q6_K)),  # one prepared x read by Q4_K and Q6_K; Q6_K down rows
    (512, 256, (QT.Q6_K, QT.Q6_K, QT.Q4_0)),  # Q6_K gate/up pairs; prepared h read by Q4_0
], ids=["mixed-gate-up", "odd-width", "row-tail", "q8", "k-quants", "q6k-pairs"])
def test_moe_branches(t, d, f, qts, threads):
    rng = np.random.default_rng(t + d + f)
    x, ids, w, experts = _moe_case(rng, t, d, f, qts)
    shared = FFNWeights(random_weight(rng, qts[0], 2 * f, d), random_weight(rng, qts[1], 2 * f, d),
                        random_weight(rng, qts[2], d, 2 * f))
    for sh in (shared, None):
        assert rel(NB.moe(x, ids, w, experts, sh), MEANING.moe(x, ids, w, experts, sh)) < TOL


def test_moe_same_result_any_thread_count():
    """Every output element has one writer and a fixed order of additions."""
    rng = np.random.default_rng(11)
    x, ids, w, experts = _moe_case(rng, 2, 256, 96, (QT.Q4_0, QT.Q4_0, QT.Q4_0), e=6, k=3)
    before = numba.get_num_threads()
    try:
        outs = []
        for n in THREADS:
            set_threads(n)
            outs.append(NB.moe(x, ids, w, experts, None))
    finally:
        set_threads(before)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
