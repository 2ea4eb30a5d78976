"""The public Python API: `lite.load(path) -> Model`; `Model.logits`, `Model.generate`, `Model.config`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import LiteError
from .kernels import Backend, get_backend
from .model.cache import LatentCache
from .model.config import ModelConfig
from .model.deepseek2 import DeepSeek2, Observer
from .weights.gguf_file import ModelFile, open_model_file
from .weights.store import MappedExperts

DEFAULT_N_CTX = 4096


@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str = "length"
    timings: dict[str, float] = field(default_factory=dict)


class Model:
    """A loaded model. Not thread-safe: one generation at a time per Model."""

    def __init__(self, mf: ModelFile, backend: Backend, n_ctx: int) -> None:
        self.file = mf
        self.path: Path = mf.path
        self.config: ModelConfig = mf.config
        self.backend = backend
        self.n_ctx = n_ctx
        self._net = DeepSeek2(mf, backend, MappedExperts(mf))
        self.cache = self.new_cache()

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

    def forward(self, token_ids: Sequence[int] | np.ndarray, cache: LatentCache, all_logits: bool = False) -> np.ndarray:
        """Extend `cache` with `token_ids` and return the logits (last position unless all_logits)."""
        ids = self._ids(token_ids)
        return self._net.forward(ids, cache, cache.length, all_logits=all_logits)

    def generate(self, prompt_ids: Sequence[int], max_tokens: int = 16, temperature: float = 0.0) -> Generation:
        """Greedy (temperature 0) continuation of `prompt_ids` by prefill + one-token decode steps."""
        if temperature != 0.0:
            raise LiteError("only greedy decoding (temperature=0) is available in this API so far")
        cache = self.new_cache()
        logits = self.forward(prompt_ids, cache)
        out: list[int] = []
        for _ in range(max_tokens):
            tok = int(np.argmax(logits[-1]))
            out.append(tok)
            if tok == self.config.eos_id:
                return Generation(out, "stop")
            if len(out) == max_tokens:
                break
            logits = self.forward([tok], cache)
        return Generation(out, "length")


def load(path: str | os.PathLike[str], backend: str | None = None, ram_budget: str | int | None = None,
         n_ctx: int | None = None) -> Model:
    """Open a `deepseek2` GGUF file. `backend`: reference | numba | c | cuda (default: best available)."""
    if ram_budget is not None:
        raise LiteError("ram_budget is not implemented yet: the expert pager is not built")
    mf = open_model_file(path)
    n = n_ctx if n_ctx is not None else min(mf.config.n_ctx_train, DEFAULT_N_CTX)
    if n <= 0:
        raise LiteError(f"n_ctx must be positive, got {n}")
    return Model(mf, get_backend(backend), n)
