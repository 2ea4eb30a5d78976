"""Compute backends. `get_backend()` picks `LITE_BACKEND` if set, else the best available
(cuda → c → numba → reference)."""
from __future__ import annotations

import importlib
import os
import sys

from ..errors import LiteError
from .base import Backend, FFNWeights, QTensor

# name → (module, class). Modules are imported lazily: numba and cffi cost start-up time.
_BACKENDS = {
    "cuda": ("lite.kernels.cuda", "CudaBackend"),
    "c": ("lite.kernels.c", "CBackend"),
    "numba": ("lite.kernels.numba_backend", "NumbaBackend"),
    "reference": ("lite.kernels.reference", "ReferenceBackend"),
}
_cache: dict[str, Backend] = {}
_unavailable: dict[str, str] = {}
# Backends whose absence is worth a word: a missing or stale C library is a broken install,
# while no CUDA on a machine without a GPU is normal.
_ANNOUNCE = ("c",)


def _make(name: str) -> Backend:
    if name not in _cache:
        module, cls = _BACKENDS[name]
        _cache[name] = getattr(importlib.import_module(module), cls)()
    return _cache[name]


def available_backends() -> list[str]:
    """Names of the backends that load on this machine, best first."""
    names = []
    for name in _BACKENDS:
        if name in _unavailable:
            continue
        try:
            _make(name)
        except (ImportError, LiteError, OSError) as e:
            _unavailable[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
            if name in _ANNOUNCE:
                print(f"lite: the {name} backend is unavailable ({_unavailable[name]}); falling back",
                      file=sys.stderr)
            continue
        names.append(name)
    return names


def get_backend(name: str | None = None, vram_budget: str | int | None = None) -> Backend:
    """The backend called `name`, or `LITE_BACKEND`, or the best available. `vram_budget` ("6GB",
    bytes) bounds the GPU memory the cuda backend gives weights; a backend made with one is the
    caller's own, not the shared instance."""
    name = name or os.environ.get("LITE_BACKEND") or None
    if vram_budget is not None:
        return _cuda_with_budget(name or available_backends()[0], vram_budget)
    if name is None:
        return _make(available_backends()[0])
    if name not in _BACKENDS:
        raise LiteError(f"unknown backend {name!r}: choose one of {', '.join(_BACKENDS)}")
    try:
        return _make(name)
    except (ImportError, OSError) as e:
        raise LiteError(f"backend {name!r} is not available here: {e}") from e


def _cuda_with_budget(name: str, vram_budget: str | int) -> Backend:
    from ..weights.pager import parse_size
    if name != "cuda":
        raise LiteError(f"a VRAM budget needs the cuda backend, but this run uses {name!r}")
    try:
        budget = parse_size(vram_budget)
    except LiteError:
        raise LiteError(f"vram budget {vram_budget!r}: expected a size such as 6GB, 512MiB or a byte count") from None
    try:
        from .cuda import CudaBackend
    except (ImportError, OSError) as e:
        raise LiteError(f"backend 'cuda' is not available here: {e}") from e
    return CudaBackend(vram_budget=budget)


__all__ = ["Backend", "FFNWeights", "QTensor", "available_backends", "get_backend"]
