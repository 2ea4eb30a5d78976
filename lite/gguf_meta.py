"""GGUF metadata as plain Python values: `{key: str | int | float | bool | list}`.

The `gguf` reader exposes fields as raw numpy parts; everything above the reader (config,
tokenizer, chat template) wants ordinary values, converted once here.
"""
from __future__ import annotations

from typing import Any

from gguf import GGUFReader, GGUFValueType


def field_value(field: Any) -> Any:
    """Convert one `ReaderField` to a Python value (arrays become lists)."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        sub = types[1] if len(types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if types[0] == GGUFValueType.BOOL else value


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value fields of an open GGUF, header fields (`GGUF.*`) excluded."""
    return {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
