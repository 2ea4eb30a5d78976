"""Test helper: copy a GGUF with tensors dropped, replaced or metadata changed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType



def field_value(field: Any) -> Any:
    """A gguf ReaderField as a Python value (arrays become lists)."""
    types = field.types
    if types[0] == GGUFValueType.ARRAY:
        if types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if types[0] == GGUFValueType.BOOL else value


def rewrite_gguf(src: Path, dst: Path, drop: set[str] = frozenset(), replace: dict[str, np.ndarray] | None = None,
                 meta: dict[str, Any] | None = None, arch: str | None = None) -> Path:
    r = GGUFReader(src)
    arch_name = arch or field_value(r.fields["general.architecture"])
    w = GGUFWriter(dst, arch_name)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field_value(f)
        if meta and key in meta:
            value = meta[key]
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
        if key == "general.alignment":
            w.add_custom_alignment(value)
            continue
        w.add_key_value(key, value, f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name in drop:
            continue
        if replace and t.name in replace:
            w.add_tensor(t.name, replace[t.name].astype(np.float32))
            continue
        qtype = GGMLQuantizationType(int(t.tensor_type))
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        block, size = GGML_QUANT_SIZES[qtype]
        raw = np.array(t.data).view(np.uint8).reshape(*shape[:-1], shape[-1] // block * size)
        w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
