"""The fused decode ops (add_rmsnorm, route, norm_route, mla_prep, mla_step) on every backend, and
the C backend's whole-stack decode_layers: bit for bit what the unfused ops of the same backend
compute (their composition in composed.py is the meaning; the C library's own versions must match
it exactly, which keeps decode logits unchanged), the C router bit for bit with numpy's top-k
(ties, groups, renormalisation), and bad input refused."""
from __future__ import annotations

import gguf.quants as gq
import numpy as np
import pytest

import lite
from lite.errors import BackendError
from lite.kernels import composed, get_backend
from lite.kernels.base import MLAWeights, QTensor, QType
from lite.kernels.composed import topk_route

from conftest import FIXTURE_NAMES, backends


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


class WithFusedOps:
    """A backend with every fused op: its own where it has one, else the composition (the cuda
    backend has route only), so each backend runs every test."""

    def __init__(self, be) -> None:
        self._be = be

    def __getattr__(self, name: str):
        if name in ("add_rmsnorm", "route", "norm_route", "mla_prep", "mla_step"):
            return composed.fused(self._be, name)
        return getattr(self._be, name)


@pytest.fixture(params=backends())
def be(request):
    return WithFusedOps(get_backend(request.param))


def c_backend():
    try:
        from lite.kernels.c import CBackend
    except ImportError as e:
        pytest.skip(f"C backend not available: {e}")
    return CBackend(threads=2)


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm_is_add_then_rmsnorm(be, t, with_delta):
    rng = np.random.default_rng(t)
    x = rng.standard_normal((t, 300)).astype(np.float32) * 3
    d = rng.standard_normal((t, 300)).astype(np.float32) if with_delta else None
    w = rng.standard_normal(300).astype(np.float32)
    want_x = x + d if with_delta else x.copy()
    want = be.rmsnorm(want_x, w, 1e-6)
    got = be.add_rmsnorm(x, d, w, 1e-6)
    np.testing.assert_array_equal(bits(x), bits(want_x))      # updated in place
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("e,k,groups,topg,norm,scale", [
    (64, 6, 1, 1, False, 1.0),      # Lite: greedy
    (160, 6, 8, 3, False, 16.0),    # full V2: group-limited, scaled
    (32, 4, 4, 2, True, 2.5),       # renormalised (numpy's sequential sum)
    (48, 12, 1, 1, True, 1.0),      # renormalised over >= 8 terms (numpy's pairwise sum)
    (16, 6, 4, 1, True, 1.0),       # more experts wanted than one group holds: zeros compete
    (8, 0, 1, 1, False, 1.0),       # no routed experts
])
def test_route_is_softmax_then_topk(be, e, k, groups, topg, norm, scale):
    logits = (np.random.default_rng(e + k).standard_normal((9, e)) * 2).astype(np.float32)
    logits[:, 5] = logits[:, 2] = logits[:, 7]                  # ties go to the lower id
    logits[3] = 0.0                                              # a row of ties only
    ids, w, probs = be.route(logits, k, groups, topg, norm, scale)
    want_p = be.softmax(logits)
    want_ids, want_w = topk_route(want_p, k, groups, topg, norm, scale)
    assert ids.dtype == np.int32 and w.dtype == np.float32 and ids.shape == w.shape == (9, k)
    if be.name == "cuda":       # the device softmax rounds differently; the choice must agree
        np.testing.assert_allclose(probs, want_p, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(ids, want_ids)
        return
    np.testing.assert_array_equal(bits(probs), bits(want_p))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(bits(w), bits(want_w))


@pytest.mark.parametrize("t,start", [(1, 0), (1, 37), (4, 3)])
def test_mla_prep_is_norm_rope_and_cache_write(be, t, start):
    h, n, c, r, cap = 3, 16, 32, 8, 48
    rng = np.random.default_rng(t + start)
    q = rng.standard_normal((t, h, n + r)).astype(np.float32)
    kv = rng.standard_normal((t, c + r)).astype(np.float32)
    norm = rng.standard_normal(c).astype(np.float32)
    ang = rng.random((t, r // 2)).astype(np.float32) * 6
    cos, sin = np.cos(ang), np.sin(ang)
    ckv, kpe = (rng.standard_normal((cap, c)).astype(np.float32),
                rng.standard_normal((cap, r)).astype(np.float32))
    want_ckv, want_kpe = ckv.copy(), kpe.copy()
    want_ckv[start:start + t] = be.rmsnorm(kv[:, :c], norm, 1e-6)
    want_kpe[start:start + t] = be.rope(kv[:, None, c:], cos, sin)[:, 0]
    q_nope, q_pe = be.mla_prep(q, kv, norm, 1e-6, cos, sin, ckv, kpe, start)
    np.testing.assert_array_equal(bits(q_nope), bits(q[..., :n]))
    np.testing.assert_array_equal(bits(q_pe), bits(be.rope(q[..., n:], cos, sin)))
    np.testing.assert_array_equal(bits(ckv), bits(want_ckv))   # other rows untouched
    np.testing.assert_array_equal(bits(kpe), bits(want_kpe))


def q8(name: str, a: np.ndarray) -> QTensor:
    a = a.astype(np.float32)
    return QTensor(name, QType.Q8_0, a.shape, gq.quantize(a, QType.Q8_0))


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("groups,topg,norm", [(1, 1, False), (4, 2, True)])
def test_norm_route_is_add_rmsnorm_matmul_route(be, t, groups, topg, norm):
    rng = np.random.default_rng(t + groups)
    x = rng.standard_normal((t, 64)).astype(np.float32)
    d = rng.standard_normal((t, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    router = q8("router", rng.standard_normal((16, 64)))
    want_x = x.copy()
    want_h = be.add_rmsnorm(want_x, d, w, 1e-6)
    want = be.route(be.matmul(want_h, router), 4, groups, topg, norm, 2.0)
    got = be.norm_route(x, d, w, 1e-6, router, 4, groups, topg, norm, 2.0)
    np.testing.assert_array_equal(bits(x), bits(want_x))
    np.testing.assert_array_equal(bits(got[0]), bits(want_h))
    for g, wv in zip(got[1:], want):
        np.testing.assert_array_equal(g.view(np.uint32), wv.view(np.uint32))


def attention(rng: np.random.Generator, lora: bool, d: int = 64, h: int = 4, n: int = 16, r: int = 8, c: int = 32,
              v: int = 16, q: int = 32, q_float: bool = False) -> MLAWeights:
    """Small MLA weights; `q_float`: q (or q_a) in F32, whose products read other activations
    than kv_a's Q8_0 (the q/kv_a products then run as two sets)."""
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.3
    first = QTensor.from_float if q_float else q8
    return MLAWeights(
        norm=f32(d), q=None if lora else first("q", f32(h * (n + r), d)), q_a=first("q_a", f32(q, d)) if lora else None,
        q_a_norm=f32(q) if lora else None, q_b=QTensor.from_float("q_b", f32(h * (n + r), q)) if lora else None,
        kv_a=q8("kv_a", f32(c + r, d)), kv_a_norm=f32(c), k_b=QTensor.from_float("k_b", f32(h, c, n)),
        v_b=q8("v_b", f32(h, v, c)), out=q8("out", f32(d, h * v)))


@pytest.mark.parametrize("lora", [False, True], ids=["q", "q_lora"])
@pytest.mark.parametrize("t,start", [(1, 0), (1, 20), (5, 3)])
@pytest.mark.parametrize("q_float", [False, True], ids=["q8", "q_f32"])
def test_mla_step_is_its_composition(be, lora, t, start, q_float):
    rng = np.random.default_rng(t + start + lora)
    w = attention(rng, lora, q_float=q_float)
    x = rng.standard_normal((t, 64)).astype(np.float32)
    delta = rng.standard_normal((t, 64)).astype(np.float32) if start else None
    ang = rng.random((t, 4)).astype(np.float32) * 6
    cos, sin = np.cos(ang), np.sin(ang)
    caches = [rng.standard_normal((32, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)]
    want_x, want_caches = x.copy(), [a.copy() for a in caches]
    want = composed.mla_step(be, want_x, delta, w, *want_caches, cos, sin, start, 0.2, 1e-6, 1e-5)
    got = be.mla_step(x, delta, w, *caches, cos, sin, start, 0.2, 1e-6, 1e-5)
    for g, wv in [(got, want), (x, want_x), *zip(caches, want_caches)]:
        np.testing.assert_array_equal(bits(g), bits(wv))


def test_composed_defaults_serve_a_backend_without_fused_ops():
    class Core:   # only the core ops, borrowed from the reference
        def __init__(self) -> None:
            ref = get_backend("reference")
            self.rmsnorm, self.rope, self.softmax = ref.rmsnorm, ref.rope, ref.softmax
    core = Core()
    x = np.ones((1, 8), np.float32)
    np.testing.assert_array_equal(composed.fused(core, "add_rmsnorm")(x, x.copy(), np.ones(8, np.float32), 0.0),
                                  np.ones((1, 8), np.float32))
    ids, _, _ = composed.fused(core, "route")(np.arange(8, dtype=np.float32)[None], 2)
    np.testing.assert_array_equal(ids, [[7, 6]])


def test_fused_ops_refuse_bad_input(be):
    x = np.ones((2, 64), np.float32)
    w = np.ones(64, np.float32)
    q, kv = np.ones((1, 2, 24), np.float32), np.ones((1, 40), np.float32)
    cs = np.ones((1, 4), np.float32)
    ckv, kpe = np.zeros((4, 32), np.float32), np.zeros((4, 8), np.float32)
    cases = [
        lambda: be.add_rmsnorm(x, np.ones((2, 63), np.float32), w, 1e-6),       # delta shape
        lambda: be.add_rmsnorm(x, None, np.ones(63, np.float32), 1e-6),          # weight shape
        lambda: be.add_rmsnorm(np.ones((4, 64), np.float32)[::2], None, w, 1e-6),  # not contiguous
        lambda: be.add_rmsnorm(x.astype(np.float64), None, w, 1e-6),
        lambda: be.add_rmsnorm(x, None, w, -1.0),
        lambda: be.route(np.ones((2, 10), np.float32), 11),                     # K > E
        lambda: be.route(np.ones((2, 10), np.float32), 2, n_group=3, topk_group=1),
        lambda: be.route(np.ones((2, 10), np.float32), 2, n_group=2, topk_group=3),
        lambda: be.route(np.ones((2, 2000), np.float32), 2),                    # E > 1024
        lambda: be.mla_prep(q, kv, np.ones(32, np.float32), 1e-6, cs, cs, ckv, kpe, 4),   # past the cache
        lambda: be.mla_prep(q, kv[:, :39], np.ones(32, np.float32), 1e-6, cs, cs, ckv, kpe, 0),
        lambda: be.mla_prep(q, kv, np.ones(31, np.float32), 1e-6, cs, cs, ckv, kpe, 0),
        lambda: be.mla_prep(q, kv, np.ones(32, np.float32), 1e-6, cs[:, :3], cs, ckv, kpe, 0),
        lambda: be.mla_prep(q, kv, np.ones(32, np.float32), 1e-6, cs, cs, ckv[:, :16], kpe, 0),
        lambda: be.mla_prep(q, kv, np.ones(32, np.float32), 1e-6, cs, cs, ckv[:3], kpe, 0),
        lambda: be.mla_prep(q, kv, np.ones(32, np.float32), 1e-6, cs, cs, ckv, kpe, -1),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(BackendError):
            case()
            pytest.fail(f"case {i} did not raise")


def test_norm_route_and_mla_step_refuse_bad_input(be):
    rng = np.random.default_rng(0)
    x, w = np.ones((1, 64), np.float32), np.ones(64, np.float32)
    router = q8("router", np.ones((16, 64)))
    good = attention(rng, False)
    cs = np.ones((1, 4), np.float32)
    ckv, kpe = np.zeros((8, 32), np.float32), np.zeros((8, 8), np.float32)
    step = lambda wts, x=x, ckv=ckv, kpe=kpe, cs=cs, start=0: be.mla_step(x, None, wts, ckv, kpe, cs, cs, start, 0.2,
                                                                           1e-6, 1e-6)
    step(good)
    cases = [
        lambda: be.norm_route(x, None, w, 1e-6, q8("r", np.ones((16, 32))), 4),          # router cols
        lambda: be.norm_route(x, None, w, 1e-6, router, 17),                              # K > E
        lambda: be.norm_route(x, None, w, 1e-6, router, 4, n_group=3),
        lambda: be.norm_route(x, np.ones((2, 64), np.float32), w, 1e-6, router, 4),       # delta shape
        lambda: step(good, x=np.ones((1, 32), np.float32)),                               # hidden size
        lambda: step(good, start=8),                                                      # past the cache
        lambda: step(good, kpe=np.zeros((8, 6), np.float32)),                             # rope dims
        lambda: step(good, kpe=np.zeros((4, 8), np.float32)),                             # cache rows differ
        lambda: step(good, ckv=np.zeros((16, 32), np.float32)[::2]),                      # not contiguous
        lambda: step(good, cs=np.ones((1, 3), np.float32)),                               # tables
        lambda: step(MLAWeights(**{**good.__dict__, "norm": np.ones(63, np.float32)})),
        lambda: step(MLAWeights(**{**good.__dict__, "out": q8("out", np.ones((64, 32)))})),
        lambda: step(MLAWeights(**{**good.__dict__, "v_b": QTensor.from_float("v_b", np.ones((4, 16, 31),
                                                                                             np.float32))})),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(BackendError):
            case()
            pytest.fail(f"case {i} did not raise")


def test_c_side_checks():
    """The library refuses bad sizes and NULL pointers itself (never reads out of bounds)."""
    cb = c_backend()
    lib, ffi = cb.lib, cb.ffi
    f = lambda a: ffi.from_buffer("float[]", a)
    x, out, w = np.ones((2, 8), np.float32), np.empty((2, 8), np.float32), np.ones(8, np.float32)
    assert lib.lite_add_rmsnorm_f32(f(out), f(x), ffi.NULL, f(w), 2, 8, 1e-6) == 0
    assert lib.lite_add_rmsnorm_f32(f(out), f(x), f(x), f(w), 2, 0, 1e-6) == lib.LITE_ERR_ARG
    assert lib.lite_add_rmsnorm_f32(f(out), ffi.NULL, f(x), f(w), 2, 8, 1e-6) == lib.LITE_ERR_NULL
    ids, wt, probs = np.empty((2, 2), np.int32), np.empty((2, 2), np.float32), np.empty((2, 8), np.float32)
    route = lambda e, k, g, tg, s=1.0: lib.lite_route(ffi.from_buffer("int32_t[]", ids), f(wt), f(probs), f(x), 2, e,
                                                      k, g, tg, 0, s)
    assert route(8, 2, 1, 1) == 0
    assert route(8, 9, 1, 1) == lib.LITE_ERR_ARG             # K > E
    assert route(8, 2, 3, 1) == lib.LITE_ERR_ARG             # groups do not divide E
    assert route(8, 2, 2, 3) == lib.LITE_ERR_ARG             # topk_group > n_group
    assert route(8, 2, 1, 1, float("inf")) == lib.LITE_ERR_ARG
    assert route(2000, 2, 1, 1) == lib.LITE_ERR_ARG          # E > 1024
    assert lib.lite_route(ffi.NULL, f(wt), f(probs), f(x), 2, 8, 2, 1, 1, 0, 1.0) == lib.LITE_ERR_NULL
    q, kv, cs = np.ones((1, 2, 24), np.float32), np.ones((1, 40), np.float32), np.ones((1, 4), np.float32)
    qn, qp = np.empty((1, 2, 16), np.float32), np.empty((1, 2, 8), np.float32)
    ckv, kpe, nw = np.zeros((4, 32), np.float32), np.zeros((4, 8), np.float32), np.ones(32, np.float32)
    prep = lambda rows, start, r=8: lib.lite_mla_prep(f(qn), f(qp), f(ckv), f(kpe), rows, f(q), f(kv), f(nw), f(cs),
                                                      f(cs), 1, 2, 16, 32, r, start, 1e-6)
    assert prep(4, 3) == 0
    assert prep(4, 4) == lib.LITE_ERR_SIZE                   # past the cache
    assert prep(4, -1) == lib.LITE_ERR_ARG
    assert prep(4, 0, r=7) == lib.LITE_ERR_ARG               # odd rope dims
    router = np.ones((8, 8), np.float32)
    scratch = np.empty(4096, np.uint8)
    nr = lambda k, sb=4096: lib.lite_norm_route(f(out), f(x), ffi.NULL, f(w), 1e-6, 2, 8,
                                                ffi.from_buffer("uint8_t[]", router), router.nbytes, 0, 8,
                                                ffi.from_buffer("int32_t[]", ids), f(wt), f(probs), k, 1, 1, 0, 1.0,
                                                ffi.from_buffer("uint8_t[]", scratch), sb)
    assert nr(2) == 0
    assert nr(9) == lib.LITE_ERR_ARG                         # K > E, refused before x is touched
    types = ffi.new("int32_t[]", [0] * 6)
    box = ffi.new("int64_t *")
    assert lib.lite_mla_step_scratch_bytes(box, types, 1, 64, 4, 16, 8, 32, 16, 0) == 0 and box[0] > 0
    assert lib.lite_mla_step_scratch_bytes(box, types, 1, 64, 4, 16, 7, 32, 16, 0) == lib.LITE_ERR_ARG
    assert lib.lite_mla_step_scratch_bytes(box, types, 1, 64, 4, 16, 8, 2048, 16, 0) == lib.LITE_ERR_ARG  # C > max
    types[2] = 99
    assert lib.lite_mla_step_scratch_bytes(box, types, 1, 64, 4, 16, 8, 32, 16, 0) == lib.LITE_ERR_TYPE


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("short", [3, 4], ids=["k_b", "v_b"])
def test_mla_step_c_refuses_short_head_weights(t, short):
    """The library itself refuses a k_b or v_b shorter than the dims say, whether one token's heads
    run in one region or op by op (a caller that skipped Python's checks gets an error, not a read
    past the weights)."""
    cb = c_backend()
    ffi, lib = cb.ffi, cb.lib
    w = attention(np.random.default_rng(3), False)
    p = cb._mla_pack(w, 64)
    f = lambda a: ffi.from_buffer("float[]", a)
    x, out = np.ones((t, 64), np.float32), np.empty((t, 64), np.float32)
    ckv, kpe, cs = np.zeros((8, 32), np.float32), np.zeros((8, 8), np.float32), np.ones((t, 4), np.float32)
    box = ffi.new("int64_t *")
    assert lib.lite_mla_step_scratch_bytes(box, p.types, t, 64, *p.dims) == 0
    scratch = np.empty(box[0], np.uint8)

    def step(nbytes):
        return lib.lite_mla_step(f(out), out.size, f(x), ffi.NULL, p.norm, 1e-6, t, 64, p.ptrs, nbytes, p.types,
                                 p.q_a_norm, p.kv_norm, *p.dims, f(ckv), f(kpe), 8, f(cs), f(cs), 0, 0.2, 1e-6,
                                 ffi.from_buffer("uint8_t[]", scratch), scratch.nbytes)

    sizes = [p.nbytes[i] for i in range(6)]
    assert step(ffi.new("int64_t[]", sizes)) == 0
    sizes[short] -= 1
    assert step(ffi.new("int64_t[]", sizes)) == lib.LITE_ERR_SIZE


def per_layer(model) -> None:
    """Make `model` decode op by op, as it does without decode_layers."""
    model._net._pack, model._net._pack_tried = None, True


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m", "f16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_layers_is_the_per_layer_path(converted, name, preset, threads):
    """A decode step through all layers in one C call: the same logits, bit for bit, as the
    per-layer calls, over a prompt and several steps (dense lead layers, shared experts, q-LoRA
    in v2-tiny-yarn, K-quants, float weights)."""
    c_backend()
    path = converted(name, preset)
    runs = []
    for fused_stack in (True, False):
        m = lite.load(path, backend="c")
        m.backend.set_threads(threads)
        if not fused_stack:
            per_layer(m)
        cache = m.new_cache()
        steps = [m.forward([3, 14, 15, 92, 65], cache)]
        for tok in (35, 89, 79, 32):
            steps.append(m.forward([tok], cache))
        assert (m._net._pack is not None) == fused_stack
        runs.append(np.concatenate([bits(s) for s in steps], axis=0))
        m.close()
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_decode_same_bits_on_any_thread_count(converted, name):
    """A decode step shares rows, heads and experts between the threads of one region that meet
    at lite's own barriers: the logits must not depend on how many threads there are. 5 and 8
    threads on this machine's 2 cores also take the barriers' sleeping path (partners
    descheduled for longer than the spin) and its switch between spinning and sleeping."""
    c_backend()
    path = converted(name, "q4_0")
    runs = {}
    for threads in (1, 2, 3, 5, 8):
        m = lite.load(path, backend="c")
        m.backend.set_threads(threads)
        cache = m.new_cache()
        steps = [m.forward([3, 14, 15, 92, 65], cache)]
        for tok in (35, 89, 79, 32, 7, 11, 2, 5):
            steps.append(m.forward([tok], cache))
        runs[threads] = np.concatenate([bits(s) for s in steps], axis=0)
        m.close()
    for threads, got in runs.items():
        np.testing.assert_array_equal(got, runs[1], err_msg=f"{threads} threads")


def test_decode_layers_refuses_bad_input(converted):
    cb = c_backend()
    m = lite.load(converted("lite-tiny", "q8_0"), backend="c")
    m.forward([3], m.new_cache())
    net, pack = m._net, m._net._pack
    cache = m.new_cache()
    cache.reserve(4)
    caches = [cache.layer(i) for i in range(net.cfg.n_layer)]
    cos, sin = net.rope(0, 1)
    x = np.zeros((1, net.cfg.d_model), np.float32)
    args = (cos, sin, 0, 0.1, 1e-6, 1e-6)
    with pytest.raises(BackendError, match="pack must come from this backend"):
        cb.decode_layers(x, pack, caches, *args)
    with pytest.raises(BackendError, match="caches do not fit"):
        m.backend.decode_layers(x, pack, caches[:-1], *args)
    with pytest.raises(BackendError, match="do not fit"):
        m.backend.decode_layers(np.zeros((2, net.cfg.d_model), np.float32), pack, caches, *args)
    rows = caches[0][0].shape[0]
    with pytest.raises(BackendError, match=f"start {rows} "):
        m.backend.decode_layers(x, pack, caches, cos, sin, rows, 0.1, 1e-6, 1e-6)
    bad = list(caches)
    bad[1] = (caches[1][0][:2], caches[1][1])
    with pytest.raises(BackendError, match="layer 1 caches"):
        m.backend.decode_layers(x, pack, bad, *args)
    with pytest.raises(BackendError, match="prepare_layers"):
        m.backend.prepare_layers([], net.cfg.d_model, 2)
    m.close()


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_decode_layers_stops_every_thread_on_a_refusal_inside(converted, threads):
    """A check that can only fail once a layer has routed (an expert's block type, read when its
    MoE is planned inside the one parallel region) stops every thread at the same barrier: the
    call returns the error, named, instead of hanging or reading the bad expert."""
    c_backend()
    m = lite.load(converted("lite-tiny", "q8_0"), backend="c")
    m.backend.set_threads(threads)
    m.forward([3], m.new_cache())
    net, pack = m._net, m._net._pack
    layer = next(i for i in range(net.cfg.n_layer) if pack.arr[i].router != m.backend.ffi.NULL)
    for e in range(pack.arr[layer].n_exp):
        pack.arr[layer].types[3 * e] = 99      # no such ggml type
    cache = m.new_cache()
    cache.reserve(4)
    cos, sin = net.rope(0, 1)
    x = np.zeros((1, net.cfg.d_model), np.float32)
    with pytest.raises(BackendError, match="unsupported block type"):
        m.backend.decode_layers(x, pack, [cache.layer(i) for i in range(net.cfg.n_layer)], cos, sin, 0, 0.1, 1e-6,
                                1e-6)
    m.close()


def test_decode_falls_back_when_the_stack_is_refused(converted, monkeypatch):
    """A stack the one-call op refuses (say K beyond its limit) decodes op by op instead."""
    from lite.kernels.c import CBackend
    c_backend()
    path = converted("lite-tiny", "q8_0")
    want = lite.load(path, backend="c")
    per_layer(want)
    cache = want.new_cache()
    want_logits = [want.forward([3, 1, 4], cache), want.forward([1], cache)]

    def refuse(self, layers, d, k):
        raise BackendError("prepare_layers: refused for the test")
    monkeypatch.setattr(CBackend, "prepare_layers", refuse)
    m = lite.load(path, backend="c")
    cache = m.new_cache()
    got = [m.forward([3, 1, 4], cache), m.forward([1], cache)]
    assert m._net._pack is None and m._net._pack_tried
    for a, b in zip(got, want_logits):
        np.testing.assert_array_equal(bits(a), bits(b))
