"""GGUF metadata as plain Python values (`{key: str | int | float | bool | list}`), without
touching tensor data: for tools that only need the tokenizer or hyperparameters."""
from __future__ import annotations

import mmap
import os
from typing import Any

from .errors import LiteError
from .weights.gguf_header import parse_header


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                return parse_header(view, str(path)).metadata
            finally:
                view.release()
    except (OSError, ValueError) as e:
        raise LiteError(f"{path}: cannot read ({e})") from None
