"""The generation loop through the public API: text in, text out, stops, seeds, cancellation,
KV-prefix reuse, context limits and the one-generation-at-a-time rule."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import lite


@pytest.fixture(scope="module")
def model(text_model_path):
    return lite.load(text_model_path, backend="reference", n_ctx=256)


def test_text_round_trip_and_generation(model):
    ids = model.tokenize("def add(a, b):")
    assert ids[0] == model.tokenizer.bos_id
    assert model.detokenize(ids[1:]) == "def add(a, b):"
    g = model.generate("def add(a, b):", max_tokens=12)
    assert g.finish_reason in ("length", "stop") and g.prompt_tokens == len(ids)
    assert g.text == model.detokenize(g.token_ids)
    assert g.timings["total_s"] > 0 and len(g.logprobs) == len(g.token_ids)


def test_stream_pieces_concatenate_to_text(model):
    s = model.stream("for i in", max_tokens=10, temperature=0.8, seed=3)
    text = "".join(p.text for p in s)
    assert s.result is not None and s.result.text == text


def test_seed_reproducible_and_varies(model):
    a = model.generate("import", max_tokens=16, temperature=1.0, seed=7).token_ids
    b = model.generate("import", max_tokens=16, temperature=1.0, seed=7).token_ids
    c = model.generate("import", max_tokens=16, temperature=1.0, seed=8).token_ids
    assert a == b and a != c


def test_stop_string_is_never_emitted(model):
    full = model.generate("class", max_tokens=24).text
    assert len(full) > 4
    stop = full[2:4]
    s = model.stream("class", max_tokens=24, stop=[stop])
    pieces = [p.text for p in s]
    assert stop not in "".join(pieces) and s.result.finish_reason == "stop"
    assert full.startswith(s.result.text)


def test_prefix_reuse_gives_same_tokens_as_cold(model):
    prompt = model.tokenize("def add(a, b):\n    return a + b\n")
    model.reset()
    cold = model.generate(prompt, max_tokens=8)
    again = model.generate(prompt + cold.token_ids + model.tokenize(" for", add_bos=False), max_tokens=8)
    assert again.cached_tokens >= len(prompt)
    model.reset()
    fresh = model.generate(prompt + cold.token_ids + model.tokenize(" for", add_bos=False), max_tokens=8)
    assert fresh.cached_tokens == 0 and fresh.token_ids == again.token_ids


def test_cancel_from_another_thread(model):
    cancel = threading.Event()
    s = model.stream("import", max_tokens=200, cancel=cancel)
    n = 0
    for _ in s:
        n += 1
        if n == 3:
            threading.Thread(target=cancel.set).start()
    assert s.result.finish_reason == "cancelled" and len(s.result.token_ids) < 200


def test_cancel_stops_a_prefill_between_layers_and_keeps_the_cache(model):
    """A cancel set while a prompt's step runs stops it before the next layer: the step raises
    Cancelled, the cache is as before it, and a generation ends "cancelled" without waiting for
    the rest of the prompt."""
    prompt = model.tokenize("def add(a, b):\n    return a + b\n")
    cache = model.new_cache()
    model.forward(prompt[:5], cache)
    want = model.forward(prompt[5:], cache)
    cache = model.new_cache()
    model.forward(prompt[:5], cache)
    cancel, be, calls = threading.Event(), model._net.backend, []
    mla_step = be.mla_step

    def set_after_first(*a, **k):       # the first layer's attention sets the event
        calls.append(1)
        cancel.set()
        return mla_step(*a, **k)

    be.mla_step = set_after_first
    try:
        with pytest.raises(lite.Cancelled, match="layer 1 of"):
            model.forward(prompt[5:], cache, cancel=cancel)
        assert len(calls) == 1 and cache.length == 5
        cancel.clear()
        model.reset()
        g = model.generate(prompt, max_tokens=8, cancel=cancel)
        assert g.finish_reason == "cancelled" and g.token_ids == [] and len(calls) == 2
    finally:
        del be.mla_step
    np.testing.assert_array_equal(model.forward(prompt[5:], cache), want)


def test_context_limits(model):
    with pytest.raises(lite.LiteError, match="context holds 256"):
        model.generate(list(range(3, 300)), max_tokens=4)
    g = model.generate(list(range(3, 250)), max_tokens=50)
    assert g.finish_reason == "length" and model.cache.length <= 256


def test_chat_drop_oldest_turns(model):
    long = "the quick brown fox " * 40
    msgs = [{"role": "system", "content": "be brief"}] + [
        {"role": r, "content": long} for r in ("user", "assistant", "user", "assistant")] + [
        {"role": "user", "content": "hi"}]
    with pytest.raises(lite.LiteError):
        model.chat(msgs, max_tokens=8)
    g = model.chat(msgs, max_tokens=8, drop_oldest=True)
    assert g.finish_reason in ("length", "stop")


def test_concurrent_generation_is_refused(model):
    s = model.stream("import", max_tokens=5)
    it = iter(s)
    next(it)
    with pytest.raises(lite.LiteError, match="already running"):
        model.generate("x", max_tokens=1)
    for _ in it:
        pass
    assert model.generate("x", max_tokens=1).completion_tokens <= 1


def test_fim_prompt_layout(model):
    ids = model.tokenize(model.tokenizer.fim_prompt("def f():\n", "\n    return 1"), add_bos=False)
    assert ids[0] == model.tokenizer.bos_id and ids[1] == model.tokenizer.id_of("<｜fim▁begin｜>")
    g = model.complete_fim("def f():\n", "\n    return 1", max_tokens=4)
    assert g.prompt_tokens == len(ids)


def test_logits_unchanged_by_generation_state(model):
    a = model.logits([5, 6, 7])
    model.generate("import", max_tokens=3)
    np.testing.assert_array_equal(a, model.logits([5, 6, 7]))


def test_cache_sized_once_per_request(model, monkeypatch):
    """Growing the latent cache copies every layer's positions: a request sizes it before
    prefill, so no step of its decode pays for a copy."""
    model.reset()
    grown = []
    real = type(model.cache)._grow
    monkeypatch.setattr(type(model.cache), "_grow", lambda self, a, new: grown.append(new) or real(self, a, new))
    g = model.generate("def add(a, b):", max_tokens=100)
    assert len(g.token_ids) > 70    # a decode long enough to have grown the cache twice
    assert len(grown) == 2 and grown[0] == grown[1] >= g.prompt_tokens + 100   # once, both arrays
