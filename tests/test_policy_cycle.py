"""The layer-cycle eviction policy, what it learns (recency, what follows a visit, what a guess
says), prefetch admission (a guess never displaces what is likelier to be needed), their replay
on traces, and the pager's use of them: still bit-identical results, declined guesses, paused
predictions."""
from __future__ import annotations

import numpy as np
import pytest

import lite
from lite.trace import RoutingTrace
from lite.weights.pager import IDLE_AFTER, SAMPLE_EVERY, ExpertPager
from lite.weights.policy import LRU, GuessAccuracy, LFUAging, LayerCycle, make_policy, simulate


def cycle_trace(n_layers: int, n_expert: int, k: int, tokens: int, sticky: float, seed: int = 0):
    """Decode-order requests with some reuse of the previous token's experts, and guesses for
    each step that are right with probability 0.7 per expert."""
    rng = np.random.default_rng(seed)
    prev = {layer: [] for layer in range(n_layers)}
    steps, guesses = [], []
    for _ in range(tokens):
        for layer in range(n_layers):
            ids = [e for e in prev[layer] if rng.random() < sticky]
            while len(ids) < k:
                e = int(rng.integers(n_expert))
                if e not in ids:
                    ids.append(e)
            prev[layer] = ids
            guess = [e if rng.random() < 0.7 else int(rng.integers(n_expert)) for e in ids]
            steps.append([(layer, e) for e in sorted(ids)])
            guesses.append([(layer, e) for e in dict.fromkeys(guess)])
    return steps, guesses


def test_evicts_the_layer_needed_last():
    cyc, lru = LayerCycle([1, 2, 3], 8, 2), LRU()
    for policy in (cyc, lru):
        for layer in (1, 2, 3, 1):
            policy.touch((layer, layer))
    # Layer 1 is being computed: layer 2 comes next, layer 3 after it. LRU keeps the wrong one.
    assert cyc.victims([(2, 2), (3, 3)], 1) == [(3, 3)]
    assert lru.victims([(2, 2), (3, 3)], 1) == [(2, 2)]


def test_learns_that_recently_used_experts_return():
    policy = LayerCycle([0, 1], 16, 2)
    steps, _ = cycle_trace(2, 16, 2, 400, sticky=0.8)
    for step in steps:
        for key in step:
            policy.touch(key)
    last = steps[-1]                                       # layer 1's experts, just used
    stale = [(1, e) for e in range(16) if all(k[1] != e for s in steps[-8:] for k in s)]
    assert stale
    assert min(policy.chance(k) for k in last) > 2 * max(policy.chance(k) for k in stale)


def test_learns_what_follows_a_visit():
    policy = LayerCycle([0, 1], 8, 2)
    for t in range(200):                                   # layer 0 alternates {0, 1} and {2, 3}
        for key in ((0, 0), (0, 1)) if t % 2 else ((0, 2), (0, 3)):
            policy.touch(key)
        policy.touch((1, 4)); policy.touch((1, 5))
    policy.touch((0, 0)); policy.touch((0, 1))             # now {0, 1}: {2, 3} comes next
    assert min(policy.chance((0, e)) for e in (2, 3)) > max(policy.chance((0, e)) for e in (0, 1)) + 0.2


def test_a_hint_keeps_the_guessed_keys():
    policy = LayerCycle([0, 1], 8, 2)
    rng = np.random.default_rng(0)
    for _ in range(300):                                   # layer 1's guesses are always right
        policy.touch((0, 0)); policy.touch((0, 1))
        ids = [int(e) for e in rng.choice(8, 2, replace=False)]
        policy.hint(1, ids)
        for e in ids:
            policy.touch((1, e))
    policy.touch((0, 0)); policy.touch((0, 1))
    policy.hint(1, [3, 6])
    # P(e used | g guessed), averaged over the K guessed g: a guessed key gets at least its own
    # guess's certainty over K, an unguessed one only how often it came with a guessed one.
    assert policy.chance((1, 3)) > 0.5 and policy.chance((1, 2)) < 0.2
    assert set(policy.victims([(1, e) for e in range(8)], 6)) == {(1, e) for e in (0, 1, 2, 4, 5, 7)}
    policy.touch((1, 3))                                   # the visit settles the hint
    policy.touch((0, 0))
    assert policy.chance((1, 6)) < 0.4


def test_a_guess_displaces_only_colder_keys():
    policy = LayerCycle([0, 1], 8, 2)
    for _ in range(50):                                    # (0, 0) and (1, 1) are always used
        policy.touch((0, 0)); policy.touch((0, 5))
        policy.touch((1, 1)); policy.touch((1, 6))
    cold = [(0, e) for e in (2, 3)]
    for key in cold:
        policy.touch(key)                                  # used once, long ago ...
    for _ in range(30):
        policy.touch((0, 0)); policy.touch((1, 1))
    assert policy.prefetch_victims([(0, 0), *cold], 2, 0.9) == cold
    assert policy.prefetch_victims([(0, 0)], 1, 0.9) == []     # ... but not a key used every time
    assert policy.prefetch_victims(cold, 2, 0.5) == []         # a coin-flip guess displaces nothing
    policy.touch((0, 0))                                   # layer 0 is computed, layer 1 guessed
    policy.expect((1, 7), 0.8)
    assert policy.chance((1, 7)) >= 0.8 and policy.prefetch_victims([(1, 7)], 1, 0.8) == []
    policy.touch((1, 1))                                   # layer 1's visit settles the guess
    assert policy.chance((1, 7)) < 0.8
    for other in (LRU(), LFUAging()):
        assert other.prefetch_victims(cold, 2, 0.99) == []


def test_victims_of_each_policy():
    keys = [(0, e) for e in range(6)]
    for name in ("lru", "lfu", "cycle"):
        policy = make_policy(name, [0], 6, 2)
        for key in keys:
            policy.touch(key)
        out = policy.victims(keys, 3)
        assert len(out) == len(set(out)) == 3 and set(out) <= set(keys), name
    with pytest.raises(lite.LiteError, match="unknown expert cache policy 'mru'"):
        make_policy("mru", [0], 6, 2)


def test_estimates_worked_out_late_are_the_eager_ones():
    """What a visit and a guess teach is worked out only when a score reads it: worked out after
    every step instead, the chances come out the same, with counts halved (a short period) in
    between. (Scores themselves are compared only now and then, alike for both: the recency table
    they read is rebuilt when a score finds it old, so scoring more often changes it.)"""
    steps, guesses = cycle_trace(5, 16, 4, 200, sticky=0.5, seed=3)
    eager, lazy = (LayerCycle(list(range(5)), 16, 4, period=64) for _ in range(2))
    every = [(layer, e) for layer in range(5) for e in range(16)]
    checked = 0
    for i, (keys, guess) in enumerate(zip(steps, guesses)):
        for policy in (eager, lazy):
            for key in keys:
                policy.touch(key)
            policy.hint((keys[0][0] + 1) % 5, [e for lg, e in guess if lg == keys[0][0]])
        eager._work_out()
        if i % 37 == 0:
            np.testing.assert_array_equal(lazy._score(every)[0], eager._score(every)[0])
            checked += 1
    assert checked > 20


def test_guess_accuracy():
    acc = GuessAccuracy(prior=0.5, memory=0.5)
    assert acc[3] == 0.5
    acc.update(3, [1, 2], [1, 2])
    assert acc[3] == 0.75 and acc[4] == 0.5
    acc.update(3, [1, 2], [1, 5])
    assert acc[3] == pytest.approx(0.625)


def test_replay_with_prefetch():
    steps, guesses = cycle_trace(4, 16, 2, 600, sticky=0.3)
    for cap in (8, 16, 32):
        plain = simulate(steps, cap, "cycle")
        ahead = simulate(steps, cap, "cycle", guesses)
        assert plain.prefetch_reads == 0 and plain.reads == plain.requests - plain.hits
        assert ahead.reads == ahead.requests - ahead.hits + ahead.prefetch_reads
        assert ahead.hit_rate > plain.hit_rate and 0 < ahead.prefetch_used <= ahead.prefetch_reads
        assert ahead.prediction_accuracy == pytest.approx(0.7, abs=0.05)
        assert simulate(steps, cap, "belady").hit_rate >= plain.hit_rate
    # Guesses that are always wrong get no slot once the cache is full: no reads beyond the
    # free slots they found at the start.
    wrong = [[(step[0][0], e) for e in range(16) if (step[0][0], e) not in step][:2] for step in steps]
    bad = simulate(steps, 16, "cycle", [[]] + wrong[1:])
    assert bad.prediction_accuracy == 0.0 and bad.prefetch_reads <= 16
    assert bad.hit_rate == pytest.approx(simulate(steps, 16, "cycle").hit_rate, abs=0.02)
    # LRU and LFU cannot tell a cold slot, so their guesses only ever take free ones.
    assert simulate(steps, 16, "lru", guesses).prefetch_reads <= 16
    # Without prefetch, guesses are hints only: every read is a miss, as for Belady. Right
    # guesses tell which cached keys of the next layer to keep (in a small cache, where it matters).
    for cap in (4, 6):
        hinted = simulate(steps, cap, "cycle", steps, prefetch=False)
        assert hinted.prefetch_reads == 0 and hinted.reads == hinted.requests - hinted.hits
        assert simulate(steps, cap, "cycle").hit_rate < hinted.hit_rate <= simulate(steps, cap, "belady").hit_rate


def minimum_budget(path) -> int:
    with pytest.raises(lite.LiteError, match="minimum is") as e:
        lite.load(path, ram_budget=1)
    return int(str(e.value).rsplit("(", 1)[1].split(" bytes")[0].replace(",", ""))


@pytest.mark.parametrize("policy", ["lru", "lfu", "cycle"])
def test_bit_identical_with_each_policy(converted, policy):
    path = converted("v2-tiny-yarn", "q8_0")
    ids = list(range(3, 43))
    want = lite.load(path).logits(ids)
    low = minimum_budget(path)
    slot = ExpertPager(lite.load(path).file, 10**12).slot_bytes
    for budget in (low, low + 3 * slot):
        for prefetch in (False, True):
            m = lite.load(path, ram_budget=budget, expert_policy=policy, prefetch=prefetch)
            assert np.array_equal(m.logits(ids), want), (budget, prefetch)
            for t in (7, 8, 9):                     # decode: one token per call
                m.logits([t])
            assert m.stats["expert_policy"] == policy
            m.close()


def test_pager_declines_a_weak_guess(converted):
    path = converted("v2-tiny-yarn", "q8_0")
    m = lite.load(path, ram_budget=minimum_budget(path) + 2 * ExpertPager(lite.load(path).file, 10**12).slot_bytes,
                  expert_policy="cycle", prefetch=False)
    pager = m.experts
    for e in range(0, 16, 4):                     # fill every slot
        pager.experts(1, range(e, e + 4))
    assert not pager._free
    reads = pager.stats.prefetch_issued
    pager.prefetch(2, [0, 1])                     # a guess, with the prior accuracy of 1/2
    assert pager.stats.prefetch_issued == reads and pager.stats.prefetch_declined == 2
    # A declined guess still tells the policy what to keep, so a full pool keeps predicting.
    assert all(pager.wants_guess(2) for _ in range(2 * IDLE_AFTER))
    pager.prefetch(1, [0, 1])                     # the layer being computed: a certain need
    assert pager.stats.prefetch_issued == reads + 2
    m.close()


def test_predictions_pause_when_unused(converted):
    path = converted("v2-tiny-yarn", "q8_0")
    m = lite.load(path, ram_budget=10**12)
    pager = m.experts
    pager.experts(2, [0, 1, 2, 3])
    pager.experts(1, [0, 1, 2, 3])                # layer 1 is being computed, 2 is guessed
    asked = []
    for _ in range(IDLE_AFTER + 2 * SAMPLE_EVERY):
        want = pager.wants_guess(2)
        asked.append(want)
        if want:
            pager.prefetch(2, [0, 1])             # all resident: nothing to read
    assert all(asked[:IDLE_AFTER]) and not all(asked[IDLE_AFTER:])
    assert 1 <= sum(asked[IDLE_AFTER:]) <= 3      # one call in SAMPLE_EVERY still predicts
    pager.prefetch(2, [9])                        # a guess that reads resumes predictions
    assert pager.wants_guess(2) and pager.stats.prefetch_issued == 1
    m.close()


def test_trace_records_guesses(converted, tmp_path):
    m = lite.load(converted("v2-tiny-yarn", "q8_0"), ram_budget=10**12)
    trace = RoutingTrace()
    m.record_routing(trace)
    m.experts.on_prediction = trace.guess_hook
    cache = m.new_cache()
    m.forward([5, 6, 7], cache)                   # prefill: one record per layer, 3 tokens each
    for t in (8, 9, 10, 11):
        m.forward([t], cache)
    trace.save(tmp_path / "t.jsonl")
    back = RoutingTrace.load(tmp_path / "t.jsonl")
    steps, guesses = back.decode_steps(), back.decode_guesses()
    assert len(steps) == len(guesses) == 7 * 3
    assert all(g == [] for g in guesses[:9])      # prefill guesses cover several tokens
    decode = guesses[9:]
    assert sum(bool(g) for g in decode) >= 9      # layers 2 and 3 every token, layer 1 after the first
    for step, g in zip(steps[9:], decode):
        assert all(k[0] == step[0][0] for k in g) and len(g) <= 4
    assert back.guesses.keys() == trace.guesses.keys()
