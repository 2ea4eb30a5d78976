"""Read a Hugging Face DeepSeek-V2 checkpoint directory lazily: config.json plus one or many
safetensors shards (`model.safetensors.index.json`). Headers are parsed and checked up front;
a tensor's bytes are read only when asked for, one tensor at a time."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lite import FormatError, LiteError

_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2), "F64": (np.float64, 8)}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int   # absolute file offsets
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one shard's header against the file's real size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise FormatError(f"{path}: safetensors header length {n} exceeds the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise LiteError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            b, e = int(b), int(e)
        except (TypeError, KeyError, ValueError) as err:
            raise FormatError(f"{path}: tensor {name}: malformed header entry ({err})") from None
        if dtype not in _DTYPES:
            raise FormatError(f"{path}: tensor {name}: dtype {dtype} is not supported (F32, F16, BF16, F64)")
        if any(d < 0 for d in shape):
            raise FormatError(f"{path}: tensor {name}: negative dimension in {shape}")
        want = int(np.prod(shape, dtype=np.float64)) * _DTYPES[dtype][1]
        if not 0 <= b <= e or e - b != want or base + e > size:
            raise FormatError(f"{path}: tensor {name}: data range {b}..{e} does not hold {dtype} {shape} "
                              f"inside a file of {size} bytes (truncated?)")
        out[name] = TensorEntry(path, dtype, shape, base + b, base + e)
    return out


class Checkpoint:
    """A HF checkpoint directory: `config`, tensor `names()`, `shape(name)`, `read(name)` → float32."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise LiteError(f"{self.dir}: not a Hugging Face checkpoint directory (no config.json)")
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{cfg_path}: invalid JSON ({e})") from None
        self.entries: dict[str, TensorEntry] = {}
        for shard in self._shards():
            for name, entry in read_safetensors_header(shard).items():
                if name in self.entries:
                    raise FormatError(f"{shard}: tensor {name} is also in {self.entries[name].shard.name}")
                self.entries[name] = entry
        self._files: dict[Path, BinaryIO] = {}

    def _shards(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
                raise FormatError(f"{index}: malformed shard index ({e})") from None
            missing = [n for n in names if not (self.dir / n).is_file()]
            if missing:
                raise LiteError(f"{self.dir}: shard {missing[0]} listed in {index.name} is missing")
            return [self.dir / n for n in names]
        shards = sorted(self.dir.glob("*.safetensors"))
        if not shards:
            raise LiteError(f"{self.dir}: no .safetensors files")
        return shards

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise FormatError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array; NaN or Inf is an error naming the tensor."""
        shape = self._entry(name).shape
        return self.read_rows(name, 0, shape[0] if shape else 1)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of the tensor's first axis as a new float32 array (a 0-D tensor is
        one row). Only those bytes are read, so a large tensor can be streamed in row chunks."""
        e = self._entry(name)
        n_rows = e.shape[0] if e.shape else 1
        if not 0 <= start <= stop <= n_rows:
            raise LiteError(f"{e.shard}: tensor {name}: rows {start}:{stop} out of range 0:{n_rows}")
        if e.shard not in self._files:
            self._files[e.shard] = open(e.shard, "rb")
        f = self._files[e.shard]
        np_dtype, itemsize = _DTYPES[e.dtype]
        row_shape = e.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * itemsize
        raw = np.empty((stop - start, *row_shape) if e.shape else (), dtype=np_dtype)
        f.seek(e.begin + start * row_bytes)
        if f.readinto(memoryview(raw.reshape(-1).view(np.uint8))) != (stop - start) * row_bytes:
            raise FormatError(f"{e.shard}: tensor {name} lies beyond the end of the file (truncated?)")
        if e.dtype == "BF16":
            a = np.empty(raw.shape, np.float32)
            np.left_shift(raw, 16, out=a.view(np.uint32), dtype=np.uint32)
        else:
            a = raw.astype(np.float32)
        del raw
        if not np.isfinite(a).all():
            raise FormatError(f"{e.shard}: tensor {name} contains NaN or Inf")
        return a

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
