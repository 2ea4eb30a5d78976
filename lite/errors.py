"""The one exception hierarchy of lite: every user-facing failure is a LiteError whose message
names the file, tensor or field involved and what was expected."""


class LiteError(Exception):
    """Base class of every error lite raises on purpose."""


class FormatError(LiteError):
    """A model file (GGUF, safetensors, config.json) is malformed or does not match its config."""


class UnsupportedError(LiteError):
    """A valid file uses a feature lite does not implement (architecture, block type, routing)."""


class BackendError(LiteError):
    """A compute backend rejected its inputs or failed."""


class Cancelled(LiteError):
    """A forward step stopped between layers because its cancel event was set; the cache holds
    what it held before the step."""
