"""GGUF tokenizer metadata from a Hugging Face checkpoint's tokenizer files.

`tokenizer_metadata(hf_dir)` returns the `tokenizer.*` key/values that llama.cpp's converter
writes for DeepSeek-V2 / DeepSeek-Coder-V2 (byte-level BPE, `tokenizer.ggml.model = "gpt2"`), so
the quantizer can add them to the output GGUF and `lite.tokenizer.Tokenizer.from_metadata` (or
llama.cpp) can rebuild the exact tokenizer from them.

Choices, matching the reference vocab files in shared/vocab:
- token types: NORMAL for the BPE vocabulary; added tokens are CONTROL when tokenizer.json marks
  them `special` and USER_DEFINED otherwise; ids nobody defines (up to config.json's vocab_size,
  the embedding's row count) become "[PAD{id}]" entries of type UNUSED.
- `tokenizer.ggml.pre` is decided by behaviour, not by name: the checkpoint's own pre-tokenizer
  and each pre-tokenizer lite implements split a probe text, and the first identical one wins.
  DeepSeek-V2 / Coder-V2 / LLM split letters with explicit cased-letter classes
  (`deepseek-llm`); DeepSeek-Coder v1 splits with `\\p{L}`/`\\p{P}` and single digits
  (`deepseek-coder`). llama.cpp hashes token ids of a check text for the same purpose.
- merges, special token ids, add_bos/add_eos and the chat template come from
  `gguf.SpecialVocab`, the same reader llama.cpp's converter uses (tokenizer.json,
  tokenizer_config.json, config.json).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import Keys, SpecialVocab, TokenType

from lite.errors import FormatError, UnsupportedError
from lite.tokenizer import SUPPORTED_PRE, build_pre_tokenizer

_K = Keys.Tokenizer

_SPECIAL_ID_KEYS = {
    "bos": _K.BOS_ID, "eos": _K.EOS_ID, "unk": _K.UNK_ID, "sep": _K.SEP_ID, "pad": _K.PAD_ID,
    "mask": _K.MASK_ID, "eot": _K.EOT_ID, "eom": _K.EOM_ID,
}
_ADD_KEYS = {"bos": _K.ADD_BOS, "eos": _K.ADD_EOS, "sep": _K.ADD_SEP}

# Exercises every split the candidate pre-tokenizers disagree on: cased and uncased letters,
# accents, Cyrillic/Greek/Khmer, CJK and Hangul, full-width and ASCII punctuation and symbols,
# digit runs, emoji, tabs, newlines and trailing spaces.
PROBE_TEXT = (
    "Hello, World! It's 2024: x=3.14159; y_val += 42 * (a-b) / c?\n"
    "  def f(ξ, λ):\r\n\treturn ξ**2 + λ  # Ünïcödé naïve café Straße\n"
    "нещо на Български Ωμέγα ᏣᎳᎩ កាន់តែពិសេស ١٢٣ ½ ⅷ\n"
    "我想在apple工作1314151天～，“引号”。 한국어 텍스트 ｆｕｌｌｗｉｄｔｈ！\n"
    "🚀 (emoji) 😶‍🌫️ ✅ $100 & <tag> `code` ~tilde^ |pipe| @at #hash %mod {}[]   \n\n   "
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def _vocab_size_from_config(hf_dir: Path) -> int | None:
    config = hf_dir / "config.json"
    if not config.is_file():
        return None
    n = _read_json(config).get("vocab_size")
    return n if isinstance(n, int) and n > 0 else None


def _tokens_and_types(tok_json: dict[str, Any], path: Path,
                      min_size: int | None) -> tuple[list[str], list[int]]:
    model = tok_json.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise UnsupportedError(f"{path}: model.type = {kind!r}; only BPE tokenizers are supported")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise FormatError(f"{path}: model.vocab must be an object of token -> id")
    by_id: dict[int, tuple[str, int]] = {}
    for text, i in vocab.items():
        if not isinstance(i, int) or i < 0:
            raise FormatError(f"{path}: model.vocab[{text!r}] = {i!r} is not a token id")
        by_id[i] = (text, int(TokenType.NORMAL))
    added = tok_json.get("added_tokens") or []
    if not isinstance(added, list):
        raise FormatError(f"{path}: added_tokens must be a list")
    for entry in added:
        i, text = entry.get("id"), entry.get("content")
        if not isinstance(i, int) or i < 0 or not isinstance(text, str):
            raise FormatError(f"{path}: malformed added_tokens entry {entry!r}")
        kind = TokenType.CONTROL if entry.get("special") else TokenType.USER_DEFINED
        by_id[i] = (text, int(kind))
    n = max(by_id, default=-1) + 1
    if min_size is not None:
        n = max(n, min_size)
    tokens, types = [], []
    for i in range(n):
        text, kind = by_id.get(i, (f"[PAD{i}]", int(TokenType.UNUSED)))
        tokens.append(text)
        types.append(kind)
    return tokens, types


def detect_pre(tokenizer_json: Path) -> str:
    """The `tokenizer.ggml.pre` name whose splits equal the checkpoint's pre-tokenizer's."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise FormatError(f"{tokenizer_json}: cannot load with `tokenizers`: {e}") from e
    if hf.pre_tokenizer is None:
        raise UnsupportedError(f"{tokenizer_json}: has no pre_tokenizer; not a byte-level BPE vocab")
    want = [piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(PROBE_TEXT)]
    for name in SUPPORTED_PRE:
        got = [piece for piece, _ in build_pre_tokenizer(name).pre_tokenize_str(PROBE_TEXT)]
        if got == want:
            return name
    raise UnsupportedError(f"{tokenizer_json}: pre_tokenizer splits text unlike any supported "
                           f"pre-tokenizer ({', '.join(SUPPORTED_PRE)})")


def tokenizer_metadata(hf_dir: Path) -> dict[str, Any] | None:
    """GGUF `tokenizer.*` key/values for the checkpoint in `hf_dir`; None without tokenizer.json."""
    hf_dir = Path(hf_dir)
    tok_path = hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        return None
    tok_json = _read_json(tok_path)
    tokens, types = _tokens_and_types(tok_json, tok_path, _vocab_size_from_config(hf_dir))

    meta: dict[str, Any] = {
        _K.MODEL: "gpt2",
        _K.PRE: detect_pre(tok_path),
        _K.LIST: tokens,
        _K.TOKEN_TYPE: types,
    }
    try:
        special = SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens))
    except ValueError as e:
        raise FormatError(f"{hf_dir}: tokenizer files: {e}") from e
    if not special.merges:
        raise FormatError(f"{tok_path}: model.merges is missing or empty")
    meta[_K.MERGES] = list(special.merges)
    for typ, tid in special.special_token_ids.items():
        if typ in _SPECIAL_ID_KEYS:
            meta[_SPECIAL_ID_KEYS[typ]] = int(tid)
    for typ, flag in special.add_special_token.items():
        if typ in _ADD_KEYS:
            meta[_ADD_KEYS[typ]] = bool(flag)
    meta.update(_chat_template_entries(special.chat_template))
    return meta


def _chat_template_entries(template: Any) -> dict[str, Any]:
    """One template → `tokenizer.chat_template`; a named list → the default one there and the
    others under `tokenizer.chat_template.{name}` (as gguf's writer lays them out)."""
    if template is None:
        return {}
    if isinstance(template, str):
        return {_K.CHAT_TEMPLATE: template}
    out: dict[str, Any] = {}
    names = []
    for choice in template:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(choice.get("name", "")))
        text = choice.get("template")
        if not name or not isinstance(text, str):
            continue
        if name == "default":
            out[_K.CHAT_TEMPLATE] = text
        else:
            names.append(name)
            out[_K.CHAT_TEMPLATE_N.format(name=name)] = text
    if names:
        out[_K.CHAT_TEMPLATES] = names
    return out
