"""The fast paths of the MoE layer give exactly the canonical partition's results: `ffn`'s
decode call, its one call for every chunk where the source holds every expert, the cheaper
gather in `route`, and the C backend's per-object MLP validation cache (validated once, never
stale, bad input still refused)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import lite.kernels.base as base
from lite.errors import BackendError
from lite.kernels import get_backend
from lite.kernels.base import FFNWeights, QTensor
from lite.model.moe import FFNLayer, ffn, route

from conftest import backends

E, K, D, F = 8, 2, 64, 32


def cfg(**kw) -> SimpleNamespace:
    c = dict(n_expert_used=K, group_limited=False, n_group=1, topk_group=1, expert_weights_norm=True,
             expert_weights_scale=1.5)
    c.update(kw)
    return SimpleNamespace(**c)


def mlp(rng: np.random.Generator, name: str, width: int = F) -> FFNWeights:
    def w(part: str, shape: tuple[int, int]) -> QTensor:
        return QTensor.from_float(f"{name}.{part}", rng.standard_normal(shape).astype(np.float32) * 0.2)
    return FFNWeights(w("gate", (width, D)), w("up", (width, D)), w("down", (D, width)))


class Experts:
    """An ExpertSource over a dict, recording the chunks asked for; `whole`: it holds every
    expert at once, as a memory map does."""

    def __init__(self, weights: dict[int, FFNWeights], whole: bool = False) -> None:
        self.weights, self.whole, self.asked = weights, whole, []

    def experts(self, layer, ids):
        ids = [int(e) for e in ids]
        self.asked.append(ids)
        return {e: self.weights[e] for e in ids}

    def prefetch(self, layer, ids):
        pass

    def table(self, layer):
        return tuple(self.weights[e] for e in sorted(self.weights)) if self.whole else None


def spec(be, c, f: FFNLayer, h: np.ndarray, src: Experts) -> np.ndarray:
    """The canonical partition, spelled out: shared, then the sorted distinct routed ids in chunks
    of K, each chunk's (token, expert) pairs as single-expert rows added slot by slot."""
    t = h.shape[0]
    out = be.moe(h, np.zeros((t, 0), np.int32), np.zeros((t, 0), np.float32), {}, f.always)
    ids, w = route(c, be.softmax(be.matmul(h, f.router)))
    uniq = np.unique(ids)
    for i in range(0, len(uniq), c.n_expert_used):
        chunk = uniq[i:i + c.n_expert_used]
        rows, slots = np.nonzero(np.isin(ids, chunk))
        y = be.moe(np.ascontiguousarray(h[rows]), ids[rows, slots][:, None],
                   np.ascontiguousarray(w[rows, slots][:, None]), src.experts(f.layer, chunk), None)
        for k in range(c.n_expert_used):
            sel = slots == k
            out[rows[sel]] += y[sel]
    return out


class Streaming:
    """A backend that declares it copies moe's weights to a device per call."""
    moe_streams_weights = True

    def __init__(self, be) -> None:
        self._be = be

    def __getattr__(self, name):
        return getattr(self._be, name)


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize("case", ["decode", "same-route", "prefill", "prefill, every expert at hand",
                                  "prefill, every expert at hand, weights streamed"])
def test_ffn_matches_canonical_partition_bit_for_bit(name, case):
    """Chunk by chunk from a pool (or to a backend that streams weights), or all chunks in one
    call where the source holds every expert: the canonical partition's bits either way."""
    be = Streaming(get_backend(name)) if case.endswith("streamed") else get_backend(name)
    rng = np.random.default_rng(3)
    layer = FFNLayer(1, QTensor.from_float("router", rng.standard_normal((E, D)).astype(np.float32)),
                     mlp(rng, "shared", 2 * F))
    src = Experts({e: mlp(rng, f"e{e}") for e in range(E)}, whole="at hand" in case)
    h = rng.standard_normal((1, D) if case in ("decode", "same-route") else (6, D)).astype(np.float32)
    if case == "same-route":      # T > 1 with every pair in one chunk
        h = np.repeat(h, 3, axis=0)
    got = ffn(be, cfg(), layer, h, src)
    asked = src.asked
    src.asked = []
    want = spec(be, cfg(), layer, h, src)
    if case.endswith("at hand"):                 # one request for every chunk's experts, in order
        assert asked == [sum(src.asked, [])] and len(src.asked) > 1
    else:                                        # the same chunks, in the same order
        assert asked == src.asked and (len(asked) == 1) == (case in ("decode", "same-route"))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", backends())
def test_prefill_hands_the_tokens_over_in_one_call_where_the_backend_adds_by_slot(name):
    """Every expert at hand: a backend with `moe_slot_order` gets the tokens themselves and the
    shared experts in one call; another gets the shared experts, then the (token, expert) pairs."""
    inner = get_backend(name)
    calls = []

    class Recording:
        def __getattr__(self, attr):
            return getattr(inner, attr)

        def moe(self, x, ids, weights, experts, shared):
            calls.append((x.shape, ids.shape, shared is not None))
            return inner.moe(x, ids, weights, experts, shared)

    rng = np.random.default_rng(4)
    layer = FFNLayer(1, QTensor.from_float("router", rng.standard_normal((E, D)).astype(np.float32)),
                     mlp(rng, "shared", 2 * F))
    src = Experts({e: mlp(rng, f"e{e}") for e in range(E)}, whole=True)
    ffn(Recording(), cfg(), layer, rng.standard_normal((6, D)).astype(np.float32), src)
    if getattr(inner, "moe_slot_order", False):
        assert calls == [((6, D), (6, K), True)]
    else:
        assert calls == [((6, D), (6, 0), True), ((6 * K, D), (6 * K, 1), False)]


@pytest.mark.parametrize("group_limited", [False, True])
def test_route_matches_take_along_axis_with_ties(group_limited):
    rng = np.random.default_rng(5)
    probs = rng.random((7, E)).astype(np.float32)
    probs[:, 3] = probs[:, 5] = probs[:, 1]              # ties go to the lower id
    probs /= probs.sum(axis=1, keepdims=True)
    c = cfg(group_limited=group_limited, n_group=4 if group_limited else 1, topk_group=2, n_expert_used=3)
    ids, w = route(c, probs)
    scores = probs
    if group_limited:
        g = probs.reshape(7, 4, 2).max(axis=2)
        keep = np.argsort(-g, axis=1, kind="stable")[:, :2]
        mask = np.zeros_like(g, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        scores = np.where(np.repeat(mask, 2, axis=1), probs, np.float32(0.0))
    want_ids = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    want_w = np.take_along_axis(probs, want_ids, axis=1)
    want_w = want_w / (want_w.sum(axis=1, keepdims=True) + np.float32(1e-20)) * np.float32(1.5)
    assert ids.dtype == np.int32 and w.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(w.view(np.uint32), want_w.view(np.uint32))


@pytest.fixture
def cb():
    try:
        from lite.kernels.c import CBackend
    except ImportError as e:
        pytest.skip(f"C backend not available: {e}")
    return CBackend(threads=1)


def test_c_moe_validates_each_mlp_once(cb, monkeypatch):
    rng = np.random.default_rng(7)
    experts = {e: mlp(rng, f"e{e}") for e in range(3)}
    x = rng.standard_normal((3, D)).astype(np.float32)
    ids, w = np.array([[0], [2], [0]], np.int32), np.ones((3, 1), np.float32)
    first = cb.moe(x, ids, w, experts, None)
    checked = []
    monkeypatch.setattr(base, "check_weight", lambda *a: checked.append(a))
    np.testing.assert_array_equal(cb.moe(x, ids, w, experts, None), first)
    assert checked == []
    # The cache is per object and per hidden size: a new object (a refilled pager slot) or another D
    # is validated again.
    cb.moe(x, ids, w, {e: FFNWeights(f.gate, f.up, f.down) for e, f in experts.items()}, None)
    assert len(checked) == 2 * 3


def test_c_moe_reads_current_contents_of_reused_memory(cb):
    """A pager slot refilled with another expert: same buffer, new object, new bytes."""
    rng = np.random.default_rng(8)
    a, b = mlp(rng, "a"), mlp(rng, "b")
    slot = [QTensor.from_float(f"slot.{p}", np.zeros(s, np.float32)) for p, s in
            (("gate", (F, D)), ("up", (F, D)), ("down", (D, F)))]
    x = rng.standard_normal((2, D)).astype(np.float32)
    ids, w = np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32)
    for src in (a, b):
        for dst, part in zip(slot, (src.gate, src.up, src.down)):
            dst.data[...] = part.data
        got = cb.moe(x, ids, w, {0: FFNWeights(*slot)}, None)
        np.testing.assert_array_equal(got, cb.moe(x, ids, w, {0: src}, None))


def test_c_moe_still_refuses_bad_mlps(cb):
    rng = np.random.default_rng(9)
    good, bad = mlp(rng, "good"), mlp(rng, "bad")
    bad = FFNWeights(bad.gate, bad.up, bad.gate)           # down must be [D, F]
    x = np.ones((1, D), np.float32)
    one = (np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32))
    cb.moe(x, *one, {0: good}, None)
    with pytest.raises(BackendError, match="down"):
        cb.moe(x, *one, {0: bad}, None)
    with pytest.raises(BackendError, match="down"):           # refused every time, not cached
        cb.moe(x, *one, {0: bad}, None)
    with pytest.raises(BackendError):                         # validated for D=64, used with D=32
        cb.moe(np.ones((1, 32), np.float32), *one, {0: good}, None)
    with pytest.raises(BackendError, match="shared"):
        cb.moe(x, *one, {0: good}, "not an MLP")
