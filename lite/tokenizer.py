"""Text <-> token ids for DeepSeek GGUF models, plus chat templates and fill-in-the-middle prompts.

The vocabulary comes from GGUF metadata (`tokenizer.ggml.*`), the same fields llama.cpp reads.
Encoding is byte-level BPE run by the Hugging Face `tokenizers` library, with the pre-tokenizer
splits named by `tokenizer.ggml.pre`; ids match llama.cpp (and the original HF tokenizer) exactly.
Decoding is done here, byte by byte, so that a streaming detokenizer can hold back partial UTF-8.

Token types follow llama.cpp: NORMAL tokens are byte-level BPE pieces; CONTROL (and UNKNOWN)
tokens are matched in text only when `parse_special` is true; USER_DEFINED tokens are always
matched in text and decode to their literal text; UNUSED tokens decode to nothing.
"""
from __future__ import annotations

import codecs
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from gguf import Keys, TokenType

from lite.errors import FormatError, LiteError, UnsupportedError

_K = Keys.Tokenizer

# --- pre-tokenizer splits ---------------------------------------------------------------------
# Each pattern isolates its matches; text between matches stays as its own piece, and the next
# pattern splits every piece again. These are the splits of DeepSeek's own tokenizer.json files
# (and of llama.cpp's `deepseek-llm` / `deepseek-coder` pre-tokenizer types).


def _char_class(ranges: Iterable[tuple[int, int]]) -> str:
    parts = []
    for lo, hi in ranges:
        parts.append(chr(lo) if lo == hi else f"{chr(lo)}-{chr(hi)}")
    return "[" + "".join(parts) + "]"


# Cased letters (upper/lower/title case blocks), which DeepSeek-LLM groups into words; other
# scripts fall through to byte-level BPE on the remaining pieces.
_LLM_LETTERS = _char_class([
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA),
    (0x1BC, 0x1BF), (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377),
    (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C),
    (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
    (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF),
    (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D),
    (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B),
    (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE),
    (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC),
    (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113),
    (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128),
    (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149),
    (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE),
    (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787),
    (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A),
    (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943),
])
# ASCII punctuation and symbols, their full-width forms, curly quotes, CJK space/comma/stop.
_LLM_PUNCT = _char_class([
    (0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F),
    (0x3000, 0x3002),
])
# CJK ideographs and Hangul are kept apart from everything else (then BPE'd as runs).
_CJK = _char_class([(0x4E00, 0x9FA5), (0x0800, 0x4E00), (0xAC00, 0xD7FF)])

PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "deepseek-llm": (
        "[\r\n]",
        r"\s?" + _LLM_LETTERS + "+",
        r"\s?" + _LLM_PUNCT + "+",
        r"\s+$",
        _CJK + "+",
        r"\p{N}+",
    ),
    # The coder vocabulary uses Unicode categories instead, and single digits.
    "deepseek-coder": (
        "[\r\n]",
        r"\s?\p{L}+",
        r"\s?\p{P}+",
        _CJK + "+",
        r"\p{N}",
    ),
}
# `gpt2` is the plain GPT-2 pre-tokenizer (ByteLevel's built-in regex); handy for small test vocabs.
SUPPORTED_PRE = tuple(PRE_TOKENIZER_SPLITS) + ("gpt2",)


def build_pre_tokenizer(pre: str) -> Any:
    """The `tokenizers` pre-tokenizer (splits, then bytes -> byte-level characters) for a
    `tokenizer.ggml.pre` name."""
    from tokenizers import Regex, pre_tokenizers

    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre not in PRE_TOKENIZER_SPLITS:
        raise UnsupportedError(
            f"GGUF metadata '{_K.PRE}' = {pre!r} is not supported (known: {', '.join(SUPPORTED_PRE)})")
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_CHAR_TO_BYTE = {c: b for b, c in _byte_to_char().items()}


# --- metadata validation ----------------------------------------------------------------------

def _require(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise FormatError(f"GGUF metadata has no '{key}'")
    return meta[key]


def _str_list(meta: Mapping[str, Any], key: str) -> list[str]:
    value = _require(meta, key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"GGUF metadata '{key}' must be an array of strings")
    return value


def _opt_id(meta: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_vocab:
        raise FormatError(f"GGUF metadata '{key}' = {value!r} is not a token id below {n_vocab}")
    return value


def _opt_bool(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        raise FormatError(f"GGUF metadata '{key}' = {value!r} must be a bool")
    return value


# --- tokenizer --------------------------------------------------------------------------------

class Tokenizer:
    """Byte-level BPE tokenizer of a GGUF model (encode, decode, special tokens, chat template)."""

    def __init__(
        self,
        tokens: list[str],
        token_types: list[int],
        merges: list[str],
        pre: str,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        from tokenizers import AddedToken, models
        from tokenizers import Tokenizer as HFTokenizer

        pre_tokenizer = build_pre_tokenizer(pre)   # fails fast on an unknown name
        if len(token_types) != len(tokens):
            raise FormatError(f"GGUF metadata '{_K.TOKEN_TYPE}' has {len(token_types)} entries, "
                              f"'{_K.LIST}' has {len(tokens)}")
        pairs = []
        for i, m in enumerate(merges):
            a, sep, b = m.partition(" ")
            if not sep or not a or not b or " " in b:
                raise FormatError(f"GGUF metadata '{_K.MERGES}'[{i}] = {m!r} is not 'left right'")
            pairs.append((a, b))

        self.tokens = tokens
        self.token_types = token_types
        self.pre = pre
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos_token = add_bos_token
        # A token string may repeat (e.g. padding entries); the first id wins, as in llama.cpp.
        self._ids: dict[str, int] = {}
        for i, t in enumerate(tokens):
            self._ids.setdefault(t, i)

        try:
            hf = HFTokenizer(models.BPE(vocab=dict(self._ids), merges=pairs, fuse_unk=False))
        except Exception as e:  # `tokenizers` raises bare Exceptions, e.g. a merge's result not in vocab
            raise FormatError(f"GGUF metadata '{_K.MERGES}' does not fit '{_K.LIST}': {e}") from e
        hf.pre_tokenizer = pre_tokenizer
        special = [t for t, ty in zip(tokens, token_types)
                   if ty in (TokenType.CONTROL, TokenType.UNKNOWN)]
        user = [t for t, ty in zip(tokens, token_types) if ty == TokenType.USER_DEFINED]
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        self._hf = hf
        # `encode_special_tokens` is a mutable flag on the shared HF object: guard the toggle.
        self._lock = threading.Lock()
        self._bytes: list[bytes | None] = [None] * len(tokens)
        self.chat_template = ChatTemplate(
            chat_template if chat_template is not None else DEEPSEEK_CODER_V2_TEMPLATE,
            bos_token=self.token_text(bos_id), eos_token=self.token_text(eos_id),
            source=_K.CHAT_TEMPLATE if chat_template is not None else "built-in DeepSeek template")

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF key/values (see `lite.gguf_meta.read_metadata`)."""
        model = _require(meta, _K.MODEL)
        if model != "gpt2":
            raise UnsupportedError(f"GGUF metadata '{_K.MODEL}' = {model!r}: only 'gpt2' "
                                   "(byte-level BPE) vocabularies are supported")
        pre = _require(meta, _K.PRE)
        if not isinstance(pre, str):
            raise FormatError(f"GGUF metadata '{_K.PRE}' must be a string")
        tokens = _str_list(meta, _K.LIST)
        merges = _str_list(meta, _K.MERGES)
        types = meta.get(_K.TOKEN_TYPE, [int(TokenType.NORMAL)] * len(tokens))
        if not isinstance(types, list) or not all(isinstance(t, int) and 1 <= t <= 6 for t in types):
            raise FormatError(f"GGUF metadata '{_K.TOKEN_TYPE}' must be an array of token types 1..6")
        template = meta.get(_K.CHAT_TEMPLATE)
        if template is not None and not isinstance(template, str):
            raise FormatError(f"GGUF metadata '{_K.CHAT_TEMPLATE}' must be a string")
        return cls(
            tokens, types, merges, pre,
            bos_id=_opt_id(meta, _K.BOS_ID, len(tokens)),
            eos_id=_opt_id(meta, _K.EOS_ID, len(tokens)),
            add_bos_token=_opt_bool(meta, _K.ADD_BOS, False),
            chat_template=template,
        )

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """Build from the metadata of a GGUF file (weights are not touched)."""
        from lite.gguf_meta import read_metadata

        return cls.from_metadata(read_metadata(path))

    # -- vocabulary --

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int | None:
        """Id of a token given its vocabulary string (e.g. '<｜fim▁hole｜>'), or None."""
        return self._ids.get(token)

    def is_special(self, token_id: int) -> bool:
        """True for control/unknown tokens (BOS, EOS...), which `decode(skip_special=True)` drops."""
        return self.token_types[token_id] in (TokenType.CONTROL, TokenType.UNKNOWN)

    def token_text(self, token_id: int | None) -> str:
        """The vocabulary string of a token ('' for None)."""
        return "" if token_id is None else self.tokens[token_id]

    def token_to_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; may be part of a UTF-8 character."""
        if not 0 <= token_id < len(self.tokens):
            raise LiteError(f"token id {token_id} is outside the vocabulary (size {len(self.tokens)})")
        cached = self._bytes[token_id]
        if cached is None:
            cached = self._piece_bytes(token_id)
            self._bytes[token_id] = cached
        return cached

    def _piece_bytes(self, token_id: int) -> bytes:
        text, ty = self.tokens[token_id], self.token_types[token_id]
        if ty == TokenType.UNUSED:
            return b""
        if ty != TokenType.NORMAL:
            return text.encode("utf-8")
        out = bytearray()
        for ch in text:
            b = _CHAR_TO_BYTE.get(ch)
            # Not a byte-level character: the piece is literal text (llama.cpp does the same).
            out += ch.encode("utf-8") if b is None else bytes((b,))
        return bytes(out)

    # -- encode / decode --

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; control tokens written in the text count only with parse_special."""
        if not isinstance(text, str):
            raise LiteError(f"encode expects str, got {type(text).__name__}")
        with self._lock:
            self._hf.encode_special_tokens = not parse_special
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise FormatError(f"add_bos requested but GGUF metadata has no '{_K.BOS_ID}'")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of a token sequence; invalid UTF-8 becomes U+FFFD."""
        data = b"".join(self.token_to_bytes(int(i)) for i in ids
                        if not (skip_special and self.is_special(int(i))))
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    # -- prompts --

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render a conversation to prompt text (which already holds BOS: encode without add_bos)."""
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                         **kwargs)

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """Fill-in-the-middle prompt text (with BOS); the model generates the hole's content."""
        for tok in (FIM_BEGIN, FIM_HOLE, FIM_END):
            if tok not in self._ids:
                raise UnsupportedError(f"vocabulary ('{_K.LIST}') has no fill-in-the-middle token {tok!r}")
        return f"{self.token_text(self.bos_id)}{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}"


class StreamDecoder:
    """Turns generated ids into text incrementally without ever splitting a UTF-8 character.

    Bytes that cannot start or continue a valid character come out as U+FFFD as soon as that is
    certain; an incomplete tail is held until more bytes arrive or `flush()` replaces it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self._skip_special and self._tok.is_special(token_id):
            return ""
        return self._utf8.decode(self._tok.token_to_bytes(token_id))

    def flush(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


# --- chat templates ---------------------------------------------------------------------------

BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"

# Used when the GGUF carries no `tokenizer.chat_template`. DeepSeek-Coder-V2's format: BOS, any
# system text + blank line, "User: ...\n\n", "Assistant: ...<EOS>", and the prompt "Assistant:"
# (no trailing space: the model emits the space as part of its first token).
DEEPSEEK_CODER_V2_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown message role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class _TemplateRaised(Exception):
    """Carries a template's own `raise_exception(...)` message out of jinja."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's templates expect non-ASCII kept as is (jinja's built-in tojson escapes HTML instead).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A jinja2 chat template rendered the way transformers' `apply_chat_template` renders it:
    sandboxed, trim_blocks + lstrip_blocks, loop controls, `raise_exception`, `strftime_now`,
    a non-escaping `tojson`, and the variables messages / bos_token / eos_token /
    add_generation_prompt (plus any extra keyword such as `tools`)."""

    def __init__(self, template: str, bos_token: str = BOS_TEXT, eos_token: str = EOS_TEXT,
                 source: str = _K.CHAT_TEMPLATE) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source
        self.text = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._compiled = env.from_string(template)
        except jinja2.TemplateError as e:
            raise FormatError(f"chat template ({source}) does not compile: {e}") from e

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        import jinja2

        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise LiteError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise LiteError(f"chat message {i} must be a mapping with a string 'role'")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs,
                     "messages": [dict(m) for m in messages],
                     "add_generation_prompt": add_generation_prompt}
        try:
            return self._compiled.render(**variables)
        except _TemplateRaised as e:
            raise LiteError(f"chat template ({self.source}) rejected the messages: {e}") from e
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise LiteError(f"chat template ({self.source}) failed to render: "
                            f"{type(e).__name__}: {e}") from e
