"""lite.sampling: greedy, seeded determinism, top-k / top-p / min-p filtering, penalties,
returned log-probabilities and parameter validation."""
from __future__ import annotations

import numpy as np
import pytest

from lite.errors import LiteError
from lite.sampling import Sampler, SamplingParams, log_softmax, top_logprobs


def logits_of(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def draw_counts(params: SamplingParams, logits: np.ndarray, n: int = 3000, history=()) -> np.ndarray:
    s = Sampler(params)
    counts = np.zeros(logits.shape[0], dtype=np.int64)
    for _ in range(n):
        counts[s.sample(logits, history)[0]] += 1
    return counts


def test_greedy_is_argmax_and_uses_no_rng():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    s = Sampler(SamplingParams())
    state = s.rng.bit_generator.state
    tok, lp = s.sample(logits, [])
    assert tok == int(np.argmax(logits))
    assert s.rng.bit_generator.state == state
    assert lp == pytest.approx(float(log_softmax(logits)[tok]), abs=1e-5)


def test_logprob_is_under_unmodified_softmax():
    logits = logits_of([0.5, 0.3, 0.2])
    params = SamplingParams(temperature=0.7, top_k=2, repetition_penalty=1.3, seed=1)
    s = Sampler(params)
    for _ in range(50):
        tok, lp = s.sample(logits, [0])
        assert lp == pytest.approx(np.log([0.5, 0.3, 0.2])[tok], abs=1e-6)


def test_same_seed_same_tokens():
    rng = np.random.default_rng(1)
    steps = [rng.standard_normal(500).astype(np.float32) for _ in range(40)]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)

    def run(p):
        s = Sampler(p)
        return [s.sample(x, [])[0] for x in steps]

    a, b = run(params), run(SamplingParams(**{**params.__dict__}))
    assert a == b
    assert run(SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99)) != a
    s = Sampler(params)
    first = [s.sample(x, [])[0] for x in steps]
    s.reset()
    assert [s.sample(x, [])[0] for x in steps] == first


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(2)
    s = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=0))
    for _ in range(30):
        x = rng.standard_normal(300).astype(np.float32)
        assert s.sample(x, [])[0] == int(np.argmax(x))


def test_top_k_keeps_only_k_best():
    logits = logits_of([0.3, 0.25, 0.2, 0.15, 0.1])
    counts = draw_counts(SamplingParams(temperature=1.0, top_k=2, seed=3), logits)
    assert counts[2:].sum() == 0
    assert counts[0] > counts[1] > 0
    # Renormalised over the two kept tokens: 0.3/0.55 ≈ 0.545.
    assert counts[0] / counts.sum() == pytest.approx(0.3 / 0.55, abs=0.04)


def test_top_p_excludes_the_tail():
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    # 0.5 + 0.3 = 0.8 reaches top_p=0.79: tokens 2 and 3 are cut.
    counts = draw_counts(SamplingParams(temperature=1.0, top_p=0.79, seed=4), logits)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0
    assert counts[0] / counts.sum() == pytest.approx(0.5 / 0.8, abs=0.04)
    # The token that crosses the threshold stays in.
    counts = draw_counts(SamplingParams(temperature=1.0, top_p=0.81, seed=4), logits, n=2000)
    assert counts[2] > 0 and counts[3] == 0


def test_min_p_excludes_unlikely_tokens():
    logits = logits_of([0.6, 0.25, 0.1, 0.05])
    # Threshold 0.2 * 0.6 = 0.12: tokens 2 (0.10) and 3 (0.05) go.
    counts = draw_counts(SamplingParams(temperature=1.0, min_p=0.2, seed=5), logits)
    assert counts[2:].sum() == 0 and counts[1] > 0
    assert counts[0] / counts.sum() == pytest.approx(0.6 / 0.85, abs=0.04)


def test_sampling_follows_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    counts = draw_counts(SamplingParams(temperature=1.0, seed=6), logits_of(probs), n=4000)
    np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.03)


def test_low_temperature_sharpens():
    logits = logits_of([0.4, 0.35, 0.25])
    hot = draw_counts(SamplingParams(temperature=1.0, seed=7), logits, n=2000)
    cold = draw_counts(SamplingParams(temperature=0.1, seed=7), logits, n=2000)
    assert cold[0] > hot[0] and cold[0] / 2000 > 0.75


class RecordingSampler(Sampler):
    """Captures the logits handed to the draw (after penalties and temperature)."""

    def _draw(self, x):
        self.seen = x.copy()
        return super()._draw(x)


def penalised(params: SamplingParams, logits, history) -> np.ndarray:
    s = RecordingSampler(SamplingParams(**{**params.__dict__, "temperature": 1.0}))
    s.sample(np.asarray(logits, dtype=np.float32), history)
    return s.seen


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = [2.0, -2.0, 1.0, -1.0, 0.5]
    out = penalised(SamplingParams(repetition_penalty=2.0), logits, [0, 1, 1])
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, -1.0, 0.5])


def test_frequency_and_presence_penalties():
    logits = [1.0, 1.0, 1.0, 1.0]
    out = penalised(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), logits, [0, 0, 0, 2])
    np.testing.assert_allclose(out, [1.0 - 1.5 - 0.25, 1.0, 1.0 - 0.5 - 0.25, 1.0])


def test_penalties_change_greedy_choice_and_leave_input_untouched():
    logits = np.array([3.0, 2.9, 0.0], dtype=np.float32)
    before = logits.copy()
    s = Sampler(SamplingParams(repetition_penalty=1.5))
    assert s.sample(logits, [])[0] == 0
    assert s.sample(logits, [0])[0] == 1          # 3.0 / 1.5 = 2.0 < 2.9
    np.testing.assert_array_equal(logits, before)


def test_masked_logits_are_never_drawn():
    logits = np.full(10, -np.inf, dtype=np.float32)
    logits[[3, 7]] = [0.0, 0.0]
    counts = draw_counts(SamplingParams(temperature=1.0, seed=8), logits, n=200)
    assert set(np.nonzero(counts)[0]) == {3, 7}


def test_top_logprobs():
    logits = logits_of([0.1, 0.6, 0.3])
    got = top_logprobs(logits, 2)
    assert [t for t, _ in got] == [1, 2]
    assert got[0][1] == pytest.approx(np.log(0.6), abs=1e-6)
    assert top_logprobs(logits, 0) == [] and len(top_logprobs(logits, 10)) == 3


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": "hot"},
    {"top_k": -1}, {"top_k": 2.5}, {"top_p": 0.0}, {"top_p": 1.1}, {"min_p": -0.1},
    {"min_p": 1.5}, {"repetition_penalty": 0.0}, {"frequency_penalty": 2.5},
    {"presence_penalty": -3.0}, {"seed": -1}, {"seed": 1.5}, {"logprobs": "yes"},
])
def test_invalid_params(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(LiteError, match=name):
        SamplingParams(**kwargs)


def test_invalid_inputs():
    s = Sampler(SamplingParams())
    with pytest.raises(LiteError, match="shape"):
        s.sample(np.zeros((2, 3), dtype=np.float32), [])
    with pytest.raises(LiteError, match="NaN"):
        s.sample(np.array([0.0, np.nan], dtype=np.float32), [])
    with pytest.raises(LiteError, match="history"):
        Sampler(SamplingParams(repetition_penalty=1.1)).sample(np.zeros(4, np.float32), [4])
    with pytest.raises(LiteError, match="-inf"):
        Sampler(SamplingParams(temperature=1.0)).sample(np.full(4, -np.inf, np.float32), [])


def test_top_p_large_nucleus_matches_full_sort():
    # A flat distribution puts the nucleus beyond the first partial sort: the fallback must agree.
    rng = np.random.default_rng(9)
    vals = rng.standard_normal(5000) * 0.1
    idx = Sampler._nucleus(vals, 0.9)
    order = np.argsort(-vals, kind="stable")
    cum = np.cumsum(np.exp(vals[order] - vals.max()))
    cum /= cum[-1]
    n = int(np.searchsorted(cum, 0.9)) + 1
    assert n > 512
    np.testing.assert_array_equal(idx, order[:n])
    peaked = np.concatenate([[10.0, 9.0], rng.standard_normal(5000) - 5])
    assert list(Sampler._nucleus(peaked, 0.5)) == [0]
