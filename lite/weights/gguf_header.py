"""A fast, defensive parser of the GGUF header (metadata and tensor infos).

The `gguf` package's reader walks array fields one element at a time (≈11 s for the 102,400
token strings of a DeepSeek vocabulary) and trusts declared counts; this parser reads numeric
arrays in one `frombuffer`, checks every count and length against the bytes that remain, and
turns every inconsistency into a FormatError. Tensor data is then mapped zero-copy by the caller.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType as VT

from ..errors import FormatError

_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
           VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
           VT.FLOAT64: "<d"}
_NUMPY = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4",
          VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.BOOL: "<u1", VT.UINT64: "<u8", VT.INT64: "<i8",
          VT.FLOAT64: "<f8"}
MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]    # numpy order (ggml's ne reversed)
    ggml_type: int
    offset: int               # absolute file offset of the data


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int


class _Cursor:
    def __init__(self, buf: memoryview, source: str) -> None:
        self.buf, self.pos, self.source = buf, 0, source

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(f"{self.source}: truncated or corrupt GGUF header while reading {what} "
                              f"(needs {n} bytes at offset {self.pos}, file has {len(self.buf)})")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.source}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype == VT.STRING:
            return self.string(what)
        if vtype == VT.ARRAY:
            sub = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if sub == VT.STRING:
                self.need(8 * count, what)   # every string needs at least its length prefix
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if sub not in _NUMPY:
                raise FormatError(f"{self.source}: {what} is an array of unsupported type {sub}")
            size = np.dtype(_NUMPY[sub]).itemsize
            self.need(count * size, what)
            a = np.frombuffer(self.buf, _NUMPY[sub], count, self.pos)
            self.pos += count * size
            return [bool(v) for v in a] if sub == VT.BOOL else a.tolist()
        if vtype not in _SCALAR:
            raise FormatError(f"{self.source}: {what} has unknown value type {vtype}")
        return self.scalar(_SCALAR[vtype], what)


def parse_header(buf: memoryview, source: str) -> Header:
    c = _Cursor(buf, source)
    c.need(4, "the magic number")
    if struct.unpack_from("<I", buf, 0)[0] != GGUF_MAGIC:
        raise FormatError(f"{source}: not a GGUF file (bad magic number)")
    c.pos = 4
    version = c.scalar("<I", "the version")
    if version not in (2, 3):
        raise FormatError(f"{source}: GGUF version {version} is not supported (2 or 3)")
    n_tensors = c.scalar("<Q", "the tensor count")
    n_kv = c.scalar("<Q", "the metadata count")
    # Each entry needs well over 8 bytes: a count beyond the file size is corruption, not a loop.
    c.need(8 * (n_tensors + n_kv), "the metadata and tensor tables")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        meta[key] = c.value(c.scalar("<I", f"the type of {key!r}"), f"metadata {key!r}")
    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}")
        n_dims = c.scalar("<I", f"the dimensions of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(f"{source}: tensor {name} has {n_dims} dimensions (1..{MAX_DIMS})")
        ne = [c.scalar("<Q", f"the shape of tensor {name}") for _ in range(n_dims)]
        ggml_type = c.scalar("<I", f"the type of tensor {name}")
        offset = c.scalar("<Q", f"the data offset of tensor {name}")
        infos.append((name, tuple(reversed(ne)), ggml_type, offset))
    align = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise FormatError(f"{source}: general.alignment must be a power of two, got {align!r}")
    data_start = -(-c.pos // align) * align
    tensors = [TensorInfo(n, s, t, data_start + o) for n, s, t, o in infos]
    return Header(version, meta, tensors, data_start)
