"""The token loop: reuse the cached prefix, prefill the rest in chunks, decode token by token,
and stop on EOS, a stop string, max tokens, the context limit or cancellation. Yields `Piece`s
(text that is safe to show: whole UTF-8 characters, never part of a stop string) and finally
returns the `Generation`."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generator, Sequence

from .errors import Cancelled, LiteError
from .model.cache import ContextOverflow, LatentCache
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from .api import Model

# Tokens a prefill step takes at once: each step reads every expert its tokens route to, so larger
# steps read the weights fewer times and repack them for more tokens at a time (a 2048-token
# prompt on the 27-layer Lite file: 1.12x faster at 512, 1.23x at 1024, 1.19x at 2048 than at
# 256; the same logits). Cancellation is checked between layers, not only between steps.
PREFILL_CHUNK = 1024
PENALTY_WINDOW = 64   # prompt tokens that count for the repetition penalty, as llama.cpp's repeat_last_n


@dataclass
class Piece:
    text: str
    token_id: int | None = None
    logprob: float | None = None


@dataclass
class Generation:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"      # stop | length | cancelled
    prompt_tokens: int = 0
    cached_tokens: int = 0             # prompt tokens whose states were reused from the last request
    logprobs: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def reuse_prefix(cache: LatentCache, prompt: Sequence[int]) -> int:
    """Keep the longest cached prefix of `prompt` (at least one prompt token is always recomputed,
    so there are logits to sample from) and return its length."""
    n = 0
    limit = min(len(cache.token_ids), len(prompt) - 1)
    while n < limit and cache.token_ids[n] == prompt[n]:
        n += 1
    cache.truncate(n)
    return n


class _StopScanner:
    """Holds back text that might be the start of a stop string; reports when one completes."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False


def run(model: "Model", prompt: Sequence[int], max_tokens: int, sampling: SamplingParams,
        stop: Sequence[str] = (), cancel: threading.Event | None = None) -> Generator[Piece, None, Generation]:
    if max_tokens < 0:
        raise LiteError(f"max_tokens must be ≥ 0, got {max_tokens}")
    if len(prompt) == 0:
        raise LiteError("the prompt is empty")
    if len(prompt) >= model.n_ctx:
        raise ContextOverflow(f"the prompt has {len(prompt)} tokens but the context holds {model.n_ctx}")
    cache = model.cache
    t0 = time.perf_counter()
    gen = Generation(prompt_tokens=len(prompt))
    gen.cached_tokens = reuse_prefix(cache, prompt)
    # Storage for the whole request now: growing the cache mid-generation copies every layer's
    # positions, a stall of seconds at long contexts, where a user sees it.
    cache.reserve(min(model.n_ctx, len(prompt) + max_tokens))
    sampler = Sampler(sampling)
    tok = model.tokenizer if (stop or model.has_tokenizer) else None
    decoder = tok.stream_decoder() if tok is not None else None
    scanner = _StopScanner(stop)
    eos = model.config.eos_id if model.config.eos_id is not None else (tok.eos_id if tok else None)

    def cancelled() -> bool:
        return cancel is not None and cancel.is_set()

    pos = gen.cached_tokens
    logits = None
    while pos < len(prompt):
        chunk = prompt[pos:pos + PREFILL_CHUNK]
        try:
            logits = model.forward(chunk, cache, cancel=cancel)
        except Cancelled:
            gen.finish_reason = "cancelled"
            return _finish(gen, t0, t0)
        cache.token_ids.extend(int(t) for t in chunk)
        pos += len(chunk)
    t_first = time.perf_counter()
    history = list(prompt[-PENALTY_WINDOW:])
    gen.finish_reason = "length"
    hit = False
    while len(gen.token_ids) < max_tokens:
        if cancelled():
            gen.finish_reason = "cancelled"
            break
        token, logprob = sampler.sample(logits[-1], history)
        if token == eos:
            gen.finish_reason = "stop"
            break
        gen.token_ids.append(token)
        gen.logprobs.append(logprob)
        history.append(token)
        # Every token yields a piece (its text may be empty while a UTF-8 character or a
        # possible stop string is held back), so streamed logprobs cover every token.
        text, hit = scanner.feed(decoder.push(token)) if decoder is not None else ("", False)
        gen.text += text
        yield Piece(text, token, logprob)
        if hit:
            gen.finish_reason = "stop"
            break
        if len(gen.token_ids) == max_tokens:
            break
        if cache.length + 1 > model.n_ctx:
            gen.finish_reason = "length"
            break
        logits = model.forward([token], cache)
        cache.token_ids.append(token)
    if decoder is not None and not hit:   # after a stop string, what was held back is dropped
        text, _ = scanner.feed(decoder.flush())
        text += scanner.pending
        if text:
            gen.text += text
            yield Piece(text)
    return _finish(gen, t0, t_first)


def _finish(gen: Generation, t0: float, t_first: float) -> Generation:
    t_end = time.perf_counter()
    n = len(gen.token_ids)
    gen.timings = {
        "prompt_s": t_first - t0,
        "prompt_tok_s": (gen.prompt_tokens - gen.cached_tokens) / (t_first - t0) if t_first > t0 else 0.0,
        "decode_s": t_end - t_first,
        "decode_tok_s": (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0,
        "total_s": t_end - t0,
    }
    return gen

