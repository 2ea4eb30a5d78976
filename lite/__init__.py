"""lite: a local, quantized runtime for DeepSeek-Coder-V2 (MoE + MLA) from one GGUF file.

    import lite
    m = lite.load("model.gguf")
    m.logits([100000, 1, 2])          # float32 [T, vocab]
"""
from .errors import BackendError, Cancelled, FormatError, LiteError, UnsupportedError
from .api import Model, Stream, load
from .generate import Generation, Piece

__all__ = ["BackendError", "Cancelled", "FormatError", "Generation", "LiteError", "Model", "Piece", "Stream",
           "UnsupportedError", "load"]
