"""Write a GGUF incrementally: header, metadata and tensor infos first, then each tensor's blocks
streamed in chunks (an expert at a time), aligned as `general.alignment` says. The file is built
under a temporary name beside OUT and renamed only when complete, so OUT is never half-written."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lite import LiteError
from lite.model.config import ARCH

ALIGNMENT = 4096


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]                 # logical numpy shape
    qtype: GGMLQuantizationType
    chunks: Callable[[], Iterator[np.ndarray]]   # raw block bytes whose concatenation is the tensor

    @property
    def byte_shape(self) -> tuple[int, ...]:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block * size)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape, dtype=np.int64))


def _pad(f: Any) -> None:
    pos = f.tell()
    f.write(b"\0" * (-pos % ALIGNMENT))


def write_gguf(out: Path, metadata: dict[str, tuple[Any, GGUFValueType]], tensors: list[PlannedTensor],
               force: bool = False, on_chunk: Callable[[PlannedTensor, int], None] | None = None) -> None:
    """Write `tensors` (in order) with `metadata` to `out` atomically."""
    out = Path(out)
    if out.exists() and not force:
        raise LiteError(f"{out} already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise LiteError(f"{out.parent}: output directory does not exist")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = GGUFWriter(None, ARCH)
    writer.add_custom_alignment(ALIGNMENT)
    for key, (value, vtype) in metadata.items():
        sub = None
        if vtype == GGUFValueType.ARRAY:
            value, sub = value
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in tensors:
        writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        f = writer.fout[0]
        for t in tensors:
            _pad(f)
            written = 0
            for chunk in t.chunks():
                chunk = np.ascontiguousarray(chunk)
                f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                written += chunk.nbytes
                if on_chunk is not None:
                    on_chunk(t, chunk.nbytes)
            if written != t.nbytes:
                raise LiteError(f"internal: tensor {t.name} produced {written} bytes, planned {t.nbytes}")
        _pad(f)
        f.flush()
        os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
