"""Open a `deepseek2` GGUF: memory-map it (tensors are zero-copy views), parse the header and the
config once, and validate every tensor's name, type, shape and extent against it. All failures are LiteErrors
that name the file and the tensor or field."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError, LiteError, UnsupportedError
from ..kernels.base import QTensor
from ..kernels.dequant import SUPPORTED
from ..model.config import ModelConfig
from ..model.tensors import expected_shapes
from .gguf_header import TensorInfo, parse_header


@dataclass
class ModelFile:
    path: Path
    meta: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, QTensor]
    split_kv_b: bool          # current llama.cpp layout (attn_k_b/attn_v_b) vs legacy attn_kv_b
    data_offsets: dict[str, int]  # absolute file offset of each tensor's data (for the pager)
    file_size: int
    mapping: np.memmap            # the whole file, read-only
    identity: tuple[int, int]     # (inode, size) when opened

    def check_unchanged(self) -> None:
        """Raise LiteError if the file was truncated or replaced since it was opened: touching a
        truncated mapping would kill the process with SIGBUS, so this runs before every forward."""
        try:
            st = os.stat(self.path)
        except OSError:
            raise LiteError(f"{self.path}: the model file disappeared while open") from None
        if (st.st_ino, st.st_size) != self.identity:
            raise LiteError(f"{self.path}: the model file was truncated or replaced while open")


def _map(path: Path) -> np.memmap:
    if not path.is_file():
        raise LiteError(f"{path}: no such model file")
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise LiteError(f"{path}: cannot map ({e})") from None


def _qtensor(path: Path, mm: np.memmap, t: TensorInfo) -> QTensor:
    try:
        qtype = GGMLQuantizationType(t.ggml_type)
    except ValueError:
        raise FormatError(f"{path}: tensor {t.name} has unknown ggml type {t.ggml_type}") from None
    if qtype not in SUPPORTED:
        raise UnsupportedError(f"{path}: tensor {t.name} has block type {qtype.name}; lite reads "
                               f"{', '.join(q.name for q in SUPPORTED)}")
    block, size = GGML_QUANT_SIZES[qtype]
    if any(d <= 0 for d in t.shape) or t.shape[-1] % block:
        raise FormatError(f"{path}: tensor {t.name} shape {t.shape} is not a whole number of {qtype.name} blocks")
    byte_shape = (*t.shape[:-1], t.shape[-1] // block * size)
    nbytes = int(np.prod(byte_shape, dtype=np.float64))
    if t.offset + nbytes > len(mm):
        raise FormatError(f"{path}: tensor {t.name} data ({nbytes} bytes at offset {t.offset}) runs past the "
                          f"end of the file ({len(mm)} bytes): truncated?")
    return QTensor(t.name, qtype, t.shape, mm[t.offset:t.offset + nbytes].reshape(byte_shape))


def open_model_file(path: str | os.PathLike[str]) -> ModelFile:
    path = Path(path)
    mm = _map(path)
    header = parse_header(memoryview(mm), str(path))
    meta = header.metadata
    cfg = ModelConfig.from_metadata(meta, str(path))
    tensors: dict[str, QTensor] = {}
    offsets: dict[str, int] = {}
    for t in header.tensors:
        if t.name in tensors:
            raise FormatError(f"{path}: tensor {t.name} appears twice")
        tensors[t.name] = _qtensor(path, mm, t)
        offsets[t.name] = t.offset
    if cfg.vocab_size == 0 and "token_embd.weight" in tensors:
        cfg = dataclasses.replace(cfg, vocab_size=tensors["token_embd.weight"].shape[0])
    split = "blk.0.attn_kv_b.weight" not in tensors
    want = expected_shapes(cfg, split_kv_b=split)
    for name, shape in want.items():
        if name not in tensors:
            raise FormatError(f"{path}: tensor {name} is missing (expected shape {shape})")
        if tensors[name].shape != shape:
            raise FormatError(f"{path}: tensor {name} has shape {tensors[name].shape}, expected {shape} "
                              f"from the model's metadata")
    extra = sorted(set(tensors) - set(want) - {"rope_freqs.weight"})
    if extra:
        raise FormatError(f"{path}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name in want:
        if name.endswith("_norm.weight") and tensors[name].qtype != GGMLQuantizationType.F32:
            raise FormatError(f"{path}: norm tensor {name} must be F32, got {tensors[name].qtype.name}")
    st = path.stat()
    return ModelFile(path, meta, cfg, tensors, split, offsets, len(mm), mm, (st.st_ino, st.st_size))
