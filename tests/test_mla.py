"""Absorbed (latent-space) MLA equals the expanded multi-head attention it stands for, and
prefill-then-decode equals one full forward."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURE_NAMES, backends
import lite
from lite.kernels import get_backend


def expanded_attention(q_nope, q_pe, ckv, kpe, w_uk, w_uv, scale, start):
    """Naive MLA: expand every cached latent into per-head keys and values, then attend.
    q_nope [T,H,N], q_pe [T,H,R], ckv [S,C], kpe [S,R], w_uk [H,N,C], w_uv [H,V,C] → [T,H,V]."""
    k_nope = np.einsum("hnc,sc->shn", w_uk, ckv)
    v = np.einsum("hvc,sc->shv", w_uv, ckv)
    T = q_nope.shape[0]
    out = np.zeros((T, q_nope.shape[1], w_uv.shape[1]), np.float64)
    for t in range(T):
        end = start + t + 1
        s = (np.einsum("hn,shn->hs", q_nope[t], k_nope[:end]) + np.einsum("hr,sr->hs", q_pe[t], kpe[:end])) * scale
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[t] = np.einsum("hs,shv->hv", p, v[:end])
    return out


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("T,start,extra", [(1, 0, 0), (1, 9, 0), (5, 0, 0), (4, 7, 3)])
def test_absorbed_equals_expanded(backend, T, start, extra):
    rng = np.random.default_rng(T * 100 + start)
    H, N, R, C, V = 3, 8, 4, 16, 8
    S = start + T + extra   # positions past start+T must be ignored
    q_nope = rng.standard_normal((T, H, N)).astype(np.float32)
    q_pe = rng.standard_normal((T, H, R)).astype(np.float32)
    ckv = rng.standard_normal((S, C)).astype(np.float32)
    kpe = rng.standard_normal((S, R)).astype(np.float32)
    w_uk = (rng.standard_normal((H, N, C)) / 4).astype(np.float32)
    w_uv = (rng.standard_normal((H, V, C)) / 4).astype(np.float32)
    scale = 0.3
    be = get_backend(backend)
    q_lat = np.einsum("thn,hnc->thc", q_nope, w_uk).astype(np.float32)
    o_lat = be.mla_attention(q_lat, q_pe, ckv, kpe, scale, start)
    got = np.einsum("thc,hvc->thv", o_lat, w_uv)
    want = expanded_attention(q_nope, q_pe, ckv, kpe, w_uk, w_uv, scale, start)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_prefill_then_decode_equals_full_forward(name, converted, reference_outputs):
    ref, _ = reference_outputs(name)
    m = lite.load(converted(name), backend="reference")
    ids = ref["input_ids"][1]
    full = m.logits(ids)
    cache = m.new_cache()
    split = len(ids) // 2
    steps = [m.forward(ids[:split], cache, all_logits=True)]
    steps += [m.forward([int(t)], cache) for t in ids[split:]]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=2e-5, rtol=0)
    m.close()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_prefill_runs_the_last_ffn_for_the_last_position_only(name, backend, converted, reference_outputs):
    """A prefill that wants only the last logits runs the last layer's FFN for that position
    alone, yet gives the full forward's logits there and a cache that decode continues from."""
    ids = reference_outputs(name)[0]["input_ids"][1]
    m = lite.load(converted(name), backend=backend)
    full = m.logits(ids)
    be, seen = m._net.backend, []
    moe = be.moe
    be.moe = lambda h, *a: seen.append(h.shape[0]) or moe(h, *a)
    try:
        cache = m.new_cache()
        split = len(ids) - 3
        got = [m.forward(ids[:split], cache)]
        last_layer_rows = seen[-1]
        got += [m.forward([int(t)], cache) for t in ids[split:]]
    finally:
        del be.moe
    assert last_layer_rows == 1 and max(seen) > 1
    np.testing.assert_allclose(np.concatenate(got), full[split - 1:], atol=1e-4, rtol=0)
    m.close()
