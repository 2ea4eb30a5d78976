"""The public Python API.

    m = lite.load("model.gguf")              # Model
    m.logits(ids)                             # float32 [T, vocab], every position
    m.generate("def fib(n):", max_tokens=64)  # Generation: text, token_ids, finish_reason, timings
    for piece in m.stream(prompt): ...        # Piece(text, token_id, logprob)
    m.chat([{"role": "user", "content": "..."}], stream=False)
    m.complete_fim(prefix, suffix)
    m.tokenize(text) / m.detokenize(ids) / m.stats / m.close()
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Mapping, Sequence

import numpy as np

from . import generate as _gen
from .errors import LiteError
from .generate import Generation, Piece
from .kernels import Backend, get_backend
from .model.cache import ContextOverflow, LatentCache
from .model.config import ModelConfig
from .model.deepseek2 import DeepSeek2, Observer
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .trace import RoutingTrace
from .weights.gguf_file import ModelFile, open_model_file
from .weights.pager import ExpertPager, parse_size
from .weights.policy import DEFAULT_POLICY
from .weights.store import ExpertSource, MappedExperts

DEFAULT_N_CTX = 4096
Prompt = str | Sequence[int]


class Stream:
    """Iterate for `Piece`s; afterwards `.result` holds the `Generation`. The model is claimed
    when iteration starts and released when it ends (or the iterator is closed), so a Stream
    that is never iterated holds nothing."""

    def __init__(self, start: Callable[[], Generator[Piece, None, Generation]], busy: threading.Lock,
                 name: str) -> None:
        self._start, self._busy, self._name = start, busy, name
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[Piece]:
        if not self._busy.acquire(blocking=False):
            raise LiteError(f"{self._name}: a generation is already running on this model; "
                            f"wait for it or load a second Model")
        try:
            gen = self._start()
            try:
                self.result = yield from gen
            finally:
                gen.close()
        finally:
            self._busy.release()

    def collect(self) -> Generation:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Model:
    """A loaded model with one persistent sequence cache (reused across requests that share a
    prefix). One generation at a time: a second concurrent one is refused with a LiteError."""

    def __init__(self, mf: ModelFile, backend: Backend, n_ctx: int, experts: ExpertSource) -> None:
        self.file = mf
        self.path: Path = mf.path
        self.config: ModelConfig = mf.config
        self.name: str = mf.config.name
        self.backend = backend
        self.n_ctx = n_ctx
        self.experts = experts
        self._net = DeepSeek2(mf, backend, experts)
        self.cache = self.new_cache()
        self._busy = threading.Lock()
        self._tokenizer: Tokenizer | None = None

    # -- tokens --

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer.ggml.tokens" in self.file.meta

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if not self.has_tokenizer:
                raise LiteError(f"{self.path}: the model file has no tokenizer; pass token ids instead of text")
            self._tokenizer = Tokenizer.from_metadata(self.file.meta)
        return self._tokenizer

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        tok = self.tokenizer
        return tok.encode(text, add_bos=tok.add_bos_token if add_bos is None else add_bos, parse_special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        ids = [int(t) for t in prompt]
        if any(not 0 <= t < self.config.vocab_size for t in ids):
            raise LiteError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        return ids

    # -- raw forward --

    def new_cache(self) -> LatentCache:
        c = self.config
        return LatentCache(c.n_layer, c.kv_lora_rank, c.qk_rope, self.n_ctx)

    def _ids(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise LiteError("token_ids must be a non-empty 1-D sequence of integers")
        return ids.astype(np.int64)

    def logits(self, token_ids: Sequence[int] | np.ndarray, observe: Observer | None = None) -> np.ndarray:
        """Float32 logits `[T, vocab]` for every position of a fresh sequence (cache untouched)."""
        return self._net.forward(self._ids(token_ids), self.new_cache(), 0, observe)

    def forward(self, token_ids: Sequence[int] | np.ndarray, cache: LatentCache, all_logits: bool = False,
                cancel: threading.Event | None = None) -> np.ndarray:
        """Extend `cache` with `token_ids` and return the logits (last position unless all_logits).
        A step of several tokens raises `Cancelled`, with `cache` unchanged, once `cancel` is set
        (checked before each layer)."""
        return self._net.forward(self._ids(token_ids), cache, cache.length, all_logits=all_logits, cancel=cancel)

    # -- generation --

    def stream(self, prompt: Prompt, max_tokens: int = 256, *, stop: Sequence[str] | str = (),
               cancel: threading.Event | None = None, **sampling: Any) -> Stream:
        """Stream a completion of `prompt` (text or token ids). Sampling keywords: temperature,
        top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty, seed."""
        params = SamplingParams(**sampling)
        ids = self._prompt_ids(prompt)
        stops = [stop] if isinstance(stop, str) else list(stop)
        return Stream(lambda: _gen.run(self, ids, max_tokens, params, stops, cancel), self._busy, self.name)

    def generate(self, prompt: Prompt, max_tokens: int = 256, **kwargs: Any) -> Generation:
        """Complete `prompt` (text or token ids); greedy unless temperature > 0."""
        return self.stream(prompt, max_tokens, **kwargs).collect()

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], max_tokens: int = 0,
                    drop_oldest: bool = False) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template. With
        `drop_oldest`, the oldest non-system turns are dropped until `max_tokens` more fit."""
        msgs = list(messages)
        while True:
            ids = self.tokenize(self.tokenizer.apply_chat_template(msgs), add_bos=False)
            if len(ids) + max_tokens < self.n_ctx or not drop_oldest:
                return ids
            droppable = [i for i, m in enumerate(msgs) if m.get("role") != "system"]
            if len(droppable) <= 1:
                raise ContextOverflow(f"the last message alone ({len(ids)} tokens) does not fit the "
                                      f"context of {self.n_ctx} with room for {max_tokens} new tokens")
            del msgs[droppable[0]]

    def chat(self, messages: Sequence[Mapping[str, Any]], max_tokens: int = 512, *, stream: bool = False,
             drop_oldest: bool = False, **kwargs: Any) -> Generation | Stream:
        s = self.stream(self.chat_prompt(messages, max_tokens, drop_oldest), max_tokens, **kwargs)
        return s if stream else s.collect()

    def complete_fim(self, prefix: str, suffix: str, max_tokens: int = 128, *, stream: bool = False,
                     **kwargs: Any) -> Generation | Stream:
        """Fill-in-the-middle: the code between `prefix` and `suffix`."""
        ids = self.tokenize(self.tokenizer.fim_prompt(prefix, suffix), add_bos=False)
        s = self.stream(ids, max_tokens, **kwargs)
        return s if stream else s.collect()

    # -- state --

    @property
    def stats(self) -> dict[str, Any]:
        """Backend, context use and, with a RAM budget, the expert cache: hits, misses, prefetch
        hits, bytes read from disk, seconds stalled on reads, resident bytes and the budget."""
        out: dict[str, Any] = {"backend": self.backend.name, "n_ctx": self.n_ctx,
                               "context_used": self.cache.length, "kv_cache_bytes": self.cache.nbytes,
                               "file_bytes": self.file.file_size, "expert_mode": "mmap"}
        if isinstance(self.experts, ExpertPager):
            p = self.experts
            st = p.stats
            out.update(expert_mode="budget", expert_policy=p.policy_name, expert_hits=st.hits,
                       expert_misses=st.misses, expert_prefetch_issued=st.prefetch_issued,
                       expert_prefetch_hits=st.prefetch_hits, bytes_read=st.bytes_read,
                       io_stall_s=st.stall_s, expert_slots=p.n_slots,
                       expert_hit_rate=st.hits / max(1, st.hits + st.misses),
                       prefetch_accuracy=st.predicted_right / st.predicted if st.predicted else None,
                       resident_bytes=p.resident_bytes + p.pool_bytes, ram_budget_bytes=p.budget)
        gpu = getattr(self.backend, "gpu_stats", None)
        if gpu is not None:
            out["gpu"] = gpu()
        return out

    def record_routing(self, trace: "RoutingTrace | None") -> None:
        """Record every MoE layer's routing into `trace` (None stops recording)."""
        self._net.route_hook = trace.hook if trace is not None else None

    def reset(self) -> None:
        """Forget the cached sequence."""
        self.cache = self.new_cache()

    def close(self) -> None:
        """Release the expert pool, file descriptors and the cache; the Model is unusable after."""
        self.experts.close()
        self.cache = self.new_cache()
        self._net = None  # type: ignore[assignment]


def load(path: str | os.PathLike[str], backend: str | None = None, ram_budget: str | int | None = None,
         n_ctx: int | None = None, expert_policy: str = DEFAULT_POLICY, prefetch: bool = True,
         vram_budget: str | int | None = None) -> Model:
    """Open a `deepseek2` GGUF file.

    backend: reference | numba | c | cuda (default: the best available).
    ram_budget: None reads experts through the memory map (the OS decides what stays); a size
    ("6GB", bytes) gives resident tensors plus a fixed pool of expert slots read from disk on
    demand, refused with the minimum if too small. n_ctx: context length (default: the model's,
    capped at 4096). vram_budget (cuda backend only): GPU memory for weights — resident tensors
    first, then a cache of routed experts fed from the memory map or the RAM pager (default: the
    free device memory less a reserve).
    """
    mf = open_model_file(path)
    n = n_ctx if n_ctx is not None else min(mf.config.n_ctx_train, DEFAULT_N_CTX)
    if n <= 0:
        raise LiteError(f"n_ctx must be positive, got {n}")
    be = get_backend(backend, vram_budget=vram_budget)
    if ram_budget is None or not mf.config.is_moe:
        experts: ExpertSource = MappedExperts(mf)
    else:
        experts = ExpertPager(mf, parse_size(ram_budget), policy=expert_policy)
    m = Model(mf, be, n, experts)
    # Next-layer prediction pays off only where a miss costs a disk read: with the memory map,
    # a WILLNEED hint per predicted expert cost ~18 ms/token of syscalls on a warm page cache.
    m._net.prefetch_next = prefetch and isinstance(experts, ExpertPager)
    return m
