"""Open a `deepseek2` GGUF: memory-map it with the `gguf` reader (zero-copy), parse the config
once, and validate every tensor's name, type and shape against it. All failures are LiteErrors
that name the file and the tensor or field."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError, LiteError, UnsupportedError
from ..gguf_meta import read_metadata
from ..kernels.base import QTensor
from ..kernels.dequant import SUPPORTED
from ..model.config import ModelConfig
from ..model.tensors import expected_shapes


@dataclass
class ModelFile:
    path: Path
    meta: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, QTensor]
    split_kv_b: bool          # current llama.cpp layout (attn_k_b/attn_v_b) vs legacy attn_kv_b
    data_offsets: dict[str, int]  # absolute file offset of each tensor's data (for the pager)
    file_size: int


def open_reader(path: Path) -> GGUFReader:
    """The gguf reader on `path`, with every parse failure turned into a FormatError."""
    if not path.is_file():
        raise LiteError(f"{path}: no such model file")
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError,
            UnicodeDecodeError, NotImplementedError, AssertionError, OSError) as e:
        raise FormatError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def _qtensor(path: Path, t: Any) -> QTensor:
    try:
        qtype = GGMLQuantizationType(int(t.tensor_type))
    except ValueError:
        raise FormatError(f"{path}: tensor {t.name} has unknown ggml type {int(t.tensor_type)}") from None
    if qtype not in SUPPORTED:
        raise UnsupportedError(f"{path}: tensor {t.name} has block type {qtype.name}; lite reads "
                               f"{', '.join(q.name for q in SUPPORTED)}")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    block, size = GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block:
        raise FormatError(f"{path}: tensor {t.name} shape {shape} is not a whole number of {qtype.name} blocks")
    data = t.data.view("uint8").reshape(*shape[:-1], shape[-1] // block * size)
    return QTensor(t.name, qtype, shape, data)


def open_model_file(path: str | os.PathLike[str]) -> ModelFile:
    path = Path(path)
    reader = open_reader(path)
    meta = read_metadata(reader)
    cfg = ModelConfig.from_metadata(meta, str(path))
    tensors: dict[str, QTensor] = {}
    offsets: dict[str, int] = {}
    for t in reader.tensors:
        if t.name in tensors:
            raise FormatError(f"{path}: tensor {t.name} appears twice")
        try:
            tensors[t.name] = _qtensor(path, t)
        except LiteError:
            raise
        except Exception as e:  # a reshape of a truncated data region, etc.
            raise FormatError(f"{path}: tensor {t.name} data is invalid or truncated ({e})") from None
        offsets[t.name] = int(t.data_offset)
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
    return ModelFile(path, meta, cfg, tensors, split, offsets, path.stat().st_size)
