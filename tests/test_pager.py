"""The expert pager: bit-identical results in every mode and budget, budget refusal, stats,
faults (truncation, read errors) and no leaks across load/close cycles."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import lite
from conftest import FIXTURE_NAMES, backends
from lite.weights.pager import ExpertPager, parse_size
from lite.weights.policy import simulate


def minimum_budget(path) -> int:
    with pytest.raises(lite.LiteError, match="minimum is") as e:
        lite.load(path, ram_budget=1)
    return int(str(e.value).rsplit("(", 1)[1].split(" bytes")[0].replace(",", ""))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("backend", backends())
def test_bit_identical_across_modes_and_budgets(name, backend, converted, reference_outputs):
    path = converted(name, "q8_0")
    ref, _ = reference_outputs(name)
    ids = ref["input_ids"][0][:40]
    base = lite.load(path, backend=backend)
    want_logits = base.logits(ids)
    want_gen = base.generate(list(ids), max_tokens=6).token_ids
    low = minimum_budget(path)
    slot = ExpertPager(base.file, 10**12).slot_bytes
    for budget in (low, low + slot, low + 5 * slot, 10**12):
        m = lite.load(path, backend=backend, ram_budget=budget)
        assert np.array_equal(m.logits(ids), want_logits), budget
        assert m.generate(list(ids), max_tokens=6).token_ids == want_gen, budget
        st = m.stats
        assert st["expert_mode"] == "budget" and st["expert_hits"] + st["expert_misses"] > 0
        assert st["resident_bytes"] <= budget and st["bytes_read"] > 0
        m.close()


def test_expert_views_reused_while_resident(converted):
    """A resident expert is handed out as the same view (the layout the MoE checked and cached on
    it included) rather than rebuilt at every hit; evicted and read into another slot, it gets a
    view of that slot, holding its own bytes."""
    m = lite.load(converted("lite-tiny", "q8_0"))
    probe = ExpertPager(m.file, 10**12)
    p = ExpertPager(m.file, probe.resident_bytes + probe.K * probe.slot_bytes)   # one layer's K slots
    probe.close()
    layer, k, n = p.layers[0], p.K, m.config.n_expert
    gate = m.file.tensors[f"blk.{layer}.ffn_gate_exps.weight"].data
    seen, moved, kept = {}, 0, 0
    rng = np.random.default_rng(0)
    for _ in range(60):
        got = p.experts(layer, rng.choice(n, k, replace=False))
        for e, ffn in got.items():
            assert np.array_equal(ffn.gate.data, gate[e]), e
            if e in seen:
                same_slot = ffn.gate.data.ctypes.data == seen[e].gate.data.ctypes.data
                assert (ffn is seen[e]) == same_slot, e
                moved += not same_slot
                kept += same_slot
            seen[e] = ffn
    assert moved and kept
    p.close()
    m.close()


def test_budget_refused_with_minimum(converted):
    path = converted("lite-tiny", "q8_0")
    low = minimum_budget(path)
    with pytest.raises(lite.LiteError, match=f"minimum is .*{low:,} bytes"):
        lite.load(path, ram_budget=low - 1)
    lite.load(path, ram_budget=low).close()


def test_parse_size():
    assert parse_size("6GB") == 6 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == 1_500_000_000 and parse_size(1234) == 1234
    for bad in ("lots", "-1GB", "0", "5 parsecs"):
        with pytest.raises(lite.LiteError, match="ram budget"):
            parse_size(bad)


def test_prefetch_and_stats(converted):
    path = converted("v2-tiny-yarn", "f32")
    m = lite.load(path, ram_budget=10**12)
    m.generate(list(range(3, 40)), max_tokens=8)
    st = m.stats
    assert st["expert_prefetch_issued"] > 0 and st["expert_prefetch_hits"] > 0
    assert 0.0 < st["prefetch_accuracy"] <= 1.0 and st["io_stall_s"] >= 0.0
    m.close()


@pytest.mark.parametrize("budgeted", [False, True])
def test_file_truncated_while_open(converted, tmp_path, budgeted):
    p = tmp_path / "m.gguf"
    p.write_bytes(converted("lite-tiny", "q8_0").read_bytes())
    m = lite.load(p, ram_budget=minimum_budget(p) if budgeted else None)
    m.logits([5, 6, 7])
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    with pytest.raises(lite.LiteError, match="truncated or replaced"):
        m.logits([5, 6, 7, 8])


def test_read_error_names_layer_and_expert(converted, monkeypatch):
    m = lite.load(converted("lite-tiny", "q8_0"), ram_budget=10**12, prefetch=False)
    import lite.weights.pager as pager

    def failing(fd, bufs, off):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(pager.os, "preadv", failing)
    with pytest.raises(lite.LiteError, match=r"reading expert \d+ of layer \d+ .*Input/output error"):
        m.logits([5, 6, 7])
    monkeypatch.undo()
    assert np.isfinite(m.logits([5, 6, 7])).all()    # the failed slots were not kept as valid
    m.close()


def test_no_leaks_over_load_close_cycles(converted):
    path = converted("lite-tiny", "q8_0")
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    for budget in (None, 10**12):   # warm up both paths
        lite.load(path, ram_budget=budget).close()
    gc.collect()                    # models left by earlier tests close their files now, not mid-loop
    fd0, rss0 = fds(), rss()
    for i in range(1000):
        m = lite.load(path, ram_budget=None if i % 2 else 10**12)
        if i % 100 == 0:
            m.logits([5, 6])
        m.close()
    del m
    gc.collect()
    assert fds() <= fd0
    assert rss() - rss0 < 64 * 2**20


def test_policies_on_a_trace():
    rng = np.random.default_rng(0)
    popular = rng.choice(64, 12, replace=False)
    trace = []
    for _ in range(300):
        for layer in range(4):
            ids = set()
            while len(ids) < 6:
                ids.add(int(rng.choice(popular)) if rng.random() < 0.7 else int(rng.integers(64)))
            trace.append([(layer, e) for e in sorted(ids)])
    for cap in (32, 64, 128):
        rates = {p: simulate(trace, cap, p).hit_rate for p in ("lru", "lfu", "cycle", "belady")}
        assert rates["belady"] >= max(rates["lru"], rates["lfu"], rates["cycle"]) - 1e-12
        assert 0.0 < rates["lru"] < 1.0
    everything = simulate(trace, 4 * 64, "lru")
    assert everything.hit_rate == pytest.approx(1 - len({k for s in trace for k in s}) / sum(map(len, trace)))
    assert everything.reads == everything.requests - everything.hits and everything.prefetch_reads == 0


def test_routing_trace_round_trip(converted, tmp_path):
    from lite.trace import RoutingTrace
    m = lite.load(converted("lite-tiny", "q8_0"))
    trace = RoutingTrace()
    m.record_routing(trace)
    m.logits([5, 6, 7, 8])
    m.record_routing(None)
    m.logits([5, 6])
    moe_layers = [i for i in range(m.config.n_layer) if m.config.layer_is_moe(i)]
    assert [layer for layer, _ in trace.records] == moe_layers
    trace.save(tmp_path / "t.jsonl")
    back = RoutingTrace.load(tmp_path / "t.jsonl")
    assert [(l, i.tolist()) for l, i in back.records] == [(l, i.tolist()) for l, i in trace.records]
    steps = back.decode_steps()
    assert len(steps) == 4 * len(moe_layers) and all(len(s) == m.config.n_expert_used for s in steps)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(lite.LiteError, match="bad.jsonl:1"):
        RoutingTrace.load(tmp_path / "bad.jsonl")
