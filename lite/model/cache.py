"""The compressed MLA cache: per layer and position, the normalised latent `c_kv` [C] and the roped
shared key `k_pe` [R] — 576 floats per token per layer for Coder-V2 instead of 16·(192+128).
Storage grows geometrically up to `n_ctx`, so a long context costs memory only when used."""
from __future__ import annotations

import numpy as np

from ..errors import LiteError


class ContextOverflow(LiteError):
    """A request needs more positions than the cache's n_ctx."""


class LatentCache:
    def __init__(self, n_layer: int, kv_lora_rank: int, rope_dims: int, n_ctx: int) -> None:
        self.n_layer, self.C, self.R, self.n_ctx = n_layer, kv_lora_rank, rope_dims, n_ctx
        self.length = 0          # positions filled in every layer
        self.token_ids: list[int] = []   # the tokens whose states are cached (for prefix reuse)
        # Separate arrays so each layer's [0, end) slice is contiguous: no copy per decode step.
        self._ckv = np.zeros((n_layer, 0, kv_lora_rank), np.float32)
        self._kpe = np.zeros((n_layer, 0, rope_dims), np.float32)

    @property
    def nbytes(self) -> int:
        return int(self._ckv.nbytes + self._kpe.nbytes)

    def reserve(self, end: int) -> None:
        if end > self.n_ctx:
            raise ContextOverflow(f"the sequence needs {end} positions but the context holds {self.n_ctx} "
                                  f"(load with a larger n_ctx, or shorten the prompt)")
        cap = self._ckv.shape[1]
        if end > cap:
            new = min(self.n_ctx, max(end, 2 * cap, 64))
            self._ckv, self._kpe = (self._grow(a, new) for a in (self._ckv, self._kpe))

    def _grow(self, a: np.ndarray, new: int) -> np.ndarray:
        grown = np.zeros((self.n_layer, new, a.shape[2]), np.float32)
        grown[:, :a.shape[1]] = a
        return grown

    def write(self, layer: int, start: int, ckv: np.ndarray, kpe: np.ndarray) -> None:
        """Store T positions from `start`: ckv `[T, C]`, kpe `[T, R]`."""
        t = ckv.shape[0]
        self._ckv[layer, start:start + t] = ckv
        self._kpe[layer, start:start + t] = kpe

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's whole storage, `[capacity, C]` latents and `[capacity, R]` rope keys, for
        kernels that write new positions in place (capacity ≥ what `reserve` asked for)."""
        return self._ckv[layer], self._kpe[layer]

    def truncate(self, length: int) -> None:
        """Forget positions ≥ length (they will be overwritten)."""
        self.length = min(self.length, length)
        del self.token_ids[self.length:]
