"""lite.tokenizer against llama.cpp's reference tokenizations of the DeepSeek vocabularies, plus
round trips, special tokens, streaming detokenization, metadata errors, and the HF -> GGUF
tokenizer metadata of quant.tokenizer_meta."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import VOCAB, require

from lite.errors import LiteError
from lite.tokenizer import BOS_TEXT, EOS_TEXT, FIM_BEGIN, FIM_END, FIM_HOLE, Tokenizer

SEP = "\n__ggml_vocab_test__\n"


def vocab_path(name: str) -> Path:
    return require(VOCAB / f"ggml-vocab-{name}.gguf")


_meta_cache: dict[str, dict] = {}
_cache: dict[str, Tokenizer] = {}


def load_meta(name: str) -> dict:
    # Building the 100k-entry vocabulary costs a little: read each file once per session.
    if name not in _meta_cache:
        from lite.gguf_meta import read_metadata

        _meta_cache[name] = read_metadata(vocab_path(name))
    return _meta_cache[name]


def load(name: str) -> Tokenizer:
    if name not in _cache:
        _cache[name] = Tokenizer.from_metadata(load_meta(name))
    return _cache[name]


@pytest.fixture(scope="module", params=["deepseek-coder", "deepseek-llm"])
def vocab(request):
    return request.param, load(request.param)


def read_cases(path: Path) -> list[tuple[str, list[int]]]:
    """Pairs (input, ids) the way llama.cpp's test-tokenizer-0 reads `.inp` / `.out`: inputs are
    separated by SEP (newline included on both sides, so an input may itself start or end with
    newlines, and the file ends with a separator); the i-th output line holds the ids."""
    raw = path.with_name(path.name + ".inp").read_bytes().decode("utf-8")
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(inputs) == len(lines), "input and output files have different numbers of tests"
    return [(s, [int(t) for t in line.split()]) for s, line in zip(inputs, lines)]


# --- reference vocabularies ---

@pytest.mark.parametrize("name", ["deepseek-coder", "deepseek-llm"])
def test_llama_cpp_reference_cases(name):
    tok = load(name)
    cases = read_cases(vocab_path(name))
    assert len(cases) == 46
    # llama.cpp tokenizes these with add_special=false, parse_special=false.
    bad = [(s, tok.encode(s, parse_special=False), ids) for s, ids in cases
           if tok.encode(s, parse_special=False) != ids]
    assert not bad, bad[:3]
    for s, ids in cases:
        assert tok.decode(ids) == s


def test_vocab_fields(vocab):
    name, tok = vocab
    if name == "deepseek-llm":
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (102400, 100000, 100001)
    else:
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32256, 32013, 32014)
    assert tok.add_bos_token is True
    assert tok.pre == name
    assert tok.id_of(BOS_TEXT) == tok.bos_id and tok.id_of(EOS_TEXT) == tok.eos_id
    assert tok.id_of("no such token at all") is None
    assert tok.token_to_bytes(tok.id_of("Ġ")) == b" "
    assert tok.token_to_bytes(tok.id_of("Ċ")) == b"\n"


ROUND_TRIP = [
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet v: Vec<u8> = (0..=255).collect();\n\tprintln!(\"{:?}\", &v[..4]);\n}\n",
    "#include <cstdio>\nint main(){ printf(\"%d\\n\", 1<<3); return 0; }",
    "const f = async (x) => { await x?.y ?? 0; }; // arrow `template ${x}`",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "main = mapM_ print [x | x <- [1..10], odd x]",
    "emoji 🦙🚀😶‍🌫️ ✅ 👩🏽‍💻 flags 🇯🇵",
    "中文：我想在apple工作。日本語のテキスト、한국어 텍스트",
    "  leading, trailing and\tmixed   whitespace \r\n\n\n   ",
    "accents: naïve café Straße Ωμέγα нещо ١٢٣ ½ õ÷Áýÿ",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(vocab, text):
    _, tok = vocab
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_add_bos(vocab):
    _, tok = vocab
    assert tok.encode("x = 1", add_bos=True) == [tok.bos_id, *tok.encode("x = 1")]
    assert tok.encode("", add_bos=True) == [tok.bos_id]


def test_special_tokens_single_ids(vocab):
    _, tok = vocab
    text = f"{BOS_TEXT}User: hi{EOS_TEXT}"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "User: hi"
    # Without parse_special a control token written in the text is just text.
    plain = tok.encode(BOS_TEXT, parse_special=False)
    assert tok.bos_id not in plain and len(plain) > 1
    assert tok.decode(plain) == BOS_TEXT


def test_fim_tokens_are_single_ids():
    tok = load("deepseek-coder")
    for t in (FIM_BEGIN, FIM_HOLE, FIM_END):
        assert tok.encode(t) == [tok.id_of(t)]
        # User-defined tokens are matched even without parse_special (llama.cpp does the same).
        assert tok.encode(t, parse_special=False) == [tok.id_of(t)]
    prompt = tok.fim_prompt("def add(a, b):\n", "\n    return c\n")
    ids = tok.encode(prompt)
    assert ids[:2] == [tok.bos_id, tok.id_of(FIM_BEGIN)]
    assert ids[-1] == tok.id_of(FIM_END) and tok.id_of(FIM_HOLE) in ids


# --- streaming detokenizer ---

def test_stream_decoder_never_splits_characters(vocab):
    _, tok = vocab
    text = "héllo 🦙 世界 👩🏽‍💻 done"
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Feed the llama's four bytes as four byte tokens: nothing comes out until the last one.
    byte_ids = [_byte_token(tok, b) for b in "🦙".encode()]
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in byte_ids] == ["", "", "", "🦙"]


_byte_maps: dict[int, dict[int, int]] = {}


def _byte_token(tok: Tokenizer, b: int) -> int:
    """The ordinary BPE token that stands for the single byte `b`."""
    if id(tok) not in _byte_maps:
        _byte_maps[id(tok)] = {
            tok.token_to_bytes(i)[0]: i for i in range(tok.vocab_size)
            if tok.token_types[i] == 1 and len(tok.token_to_bytes(i)) == 1}
    return _byte_maps[id(tok)][b]


def test_stream_decoder_invalid_utf8():
    tok = load("deepseek-coder")
    lead = _byte_token(tok, 0xE4)        # starts a 3-byte character
    cont = _byte_token(tok, 0xB8)        # a lone continuation byte
    space = tok.id_of("Ġ")
    dec = tok.stream_decoder()
    assert dec.push(lead) == ""          # held: it may still become a character
    assert dec.flush() == "\ufffd"       # never completed
    dec = tok.stream_decoder()
    assert dec.push(lead) == ""
    assert dec.push(space) == "\ufffd "  # the space proves the lead byte invalid
    assert dec.push(cont) == "\ufffd"    # invalid at once, nothing to wait for
    assert dec.flush() == ""
    assert tok.decode([lead, space, cont]) == "\ufffd \ufffd"


def test_stream_decoder_skip_special(vocab):
    _, tok = vocab
    dec = tok.stream_decoder(skip_special=True)
    out = "".join(dec.push(i) for i in [tok.bos_id, *tok.encode("ok"), tok.eos_id]) + dec.flush()
    assert out == "ok"


# --- metadata errors (tiny synthetic vocabulary) ---

def tiny_meta(pre: str = "deepseek-llm") -> dict:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + [BOS_TEXT, EOS_TEXT, FIM_HOLE]
    types = [1] * (len(tokens) - 3) + [3, 3, 4]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": len(tokens) - 3, "tokenizer.ggml.eos_token_id": len(tokens) - 2,
        "tokenizer.ggml.add_bos_token": True,
    }


def test_tiny_vocab_encodes_with_merges():
    tok = Tokenizer.from_metadata(tiny_meta())
    ids = tok.encode("hello")
    assert ids == [tok.id_of("hello")]
    assert tok.decode(tok.encode("hello wide world", add_bos=True)) == BOS_TEXT + "hello wide world"


def test_from_gguf_file(tmp_path):
    import gguf

    meta = tiny_meta()
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf(str(path))
    assert tok.encode("hello", add_bos=True) == [tok.bos_id, tok.id_of("hello")]
    with pytest.raises(LiteError, match="no-such-file"):
        Tokenizer.from_gguf(str(tmp_path / "no-such-file.gguf"))


@pytest.mark.parametrize("mutate, field", [
    (lambda m: m.pop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens"),
    (lambda m: m.pop("tokenizer.ggml.merges"), "tokenizer.ggml.merges"),
    (lambda m: m.pop("tokenizer.ggml.model"), "tokenizer.ggml.model"),
    (lambda m: m.pop("tokenizer.ggml.pre"), "tokenizer.ggml.pre"),
    (lambda m: m.update({"tokenizer.ggml.model": "llama"}), "tokenizer.ggml.model"),
    (lambda m: m.update({"tokenizer.ggml.pre": "qwen2"}), "tokenizer.ggml.pre"),
    (lambda m: m.update({"tokenizer.ggml.tokens": [1, 2, 3]}), "tokenizer.ggml.tokens"),
    (lambda m: m.update({"tokenizer.ggml.merges": ["abc"]}), "tokenizer.ggml.merges"),
    (lambda m: m.update({"tokenizer.ggml.merges": ["x y"]}), "tokenizer.ggml.merges"),
    (lambda m: m["tokenizer.ggml.token_type"].pop(), "tokenizer.ggml.token_type"),
    (lambda m: m.update({"tokenizer.ggml.token_type": ["x"] * 262}), "tokenizer.ggml.token_type"),
    (lambda m: m.update({"tokenizer.ggml.bos_token_id": 10**6}), "tokenizer.ggml.bos_token_id"),
    (lambda m: m.update({"tokenizer.ggml.eos_token_id": "2"}), "tokenizer.ggml.eos_token_id"),
    (lambda m: m.update({"tokenizer.ggml.add_bos_token": 1}), "tokenizer.ggml.add_bos_token"),
    (lambda m: m.update({"tokenizer.chat_template": "{% if %}"}), "tokenizer.chat_template"),
])
def test_bad_metadata_names_field(mutate, field):
    meta = tiny_meta()
    mutate(meta)
    with pytest.raises(LiteError, match=field.replace(".", r"\.")):
        Tokenizer.from_metadata(meta)


def test_missing_bos_only_fails_when_needed():
    meta = tiny_meta()
    del meta["tokenizer.ggml.bos_token_id"]
    tok = Tokenizer.from_metadata(meta)
    assert tok.bos_id is None and tok.encode("hello") == [tok.id_of("hello")]
    with pytest.raises(LiteError, match="bos_token_id"):
        tok.encode("hello", add_bos=True)
    with pytest.raises(LiteError, match="outside the vocabulary"):
        tok.token_to_bytes(tok.vocab_size)


# --- quant.tokenizer_meta: HF checkpoint files -> GGUF metadata -> lite Tokenizer ---

CODE = [
    "def greet(name):\n    print(f'Hello, {name}!')\n    return len(name) * 42\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product 3.14159",
    "class Stack<T> { private items: T[] = []; push(x: T) { this.items.push(x); } }",
    "let mut total: u64 = 0;\nwhile total < 1_000_000 { total += 12345; }\n",
    "  indented\twith\ttabs and trailing   \n\n",
    "中文注释 # コメント — naïve café 🚀",
]


def _pre_tokenizer_for(kind: str):
    from tokenizers import pre_tokenizers

    from lite.tokenizer import build_pre_tokenizer

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return build_pre_tokenizer(kind)


def make_hf_checkpoint(tmp_path: Path, kind: str, vocab_size: int | None = None):
    """Train a small byte-level BPE with DeepSeek's special tokens and save it the way a Hugging
    Face checkpoint ships it (tokenizer.json, tokenizer_config.json, config.json)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = _pre_tokenizer_for(kind)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[BOS_TEXT, EOS_TEXT],
                                  initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(CODE * 3 + ["the quick brown fox jumps over the lazy dog"] * 5, trainer)
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in (FIM_HOLE, FIM_BEGIN, FIM_END)])
    hf.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": BOS_TEXT, "special": True},
        "eos_token": {"__type": "AddedToken", "content": EOS_TEXT, "special": True},
        "pad_token": {"__type": "AddedToken", "content": EOS_TEXT, "special": True},
        "chat_template": template,
    }), encoding="utf-8")
    if vocab_size is not None:
        (tmp_path / "config.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return hf, template


@pytest.mark.parametrize("kind", ["deepseek-llm", "deepseek-coder", "gpt2"])
def test_quant_tokenizer_metadata_round_trip(tmp_path, kind):
    from quant.tokenizer_meta import tokenizer_metadata

    hf, template = make_hf_checkpoint(tmp_path, kind, vocab_size=640)
    meta = tokenizer_metadata(tmp_path)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == kind
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 640          # padded to config.json's vocab_size
    n_hf = hf.get_vocab_size()
    assert tokens[n_hf:] == [f"[PAD{i}]" for i in range(n_hf, 640)] and set(types[n_hf:]) == {5}
    bos, eos = hf.token_to_id(BOS_TEXT), hf.token_to_id(EOS_TEXT)
    assert meta["tokenizer.ggml.bos_token_id"] == bos and types[bos] == 3
    assert meta["tokenizer.ggml.eos_token_id"] == eos and types[eos] == 3
    assert meta["tokenizer.ggml.padding_token_id"] == eos
    assert types[hf.token_to_id(FIM_HOLE)] == 4
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == template
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in meta["tokenizer.ggml.merges"])

    tok = Tokenizer.from_metadata(meta)
    for text in CODE + [f"{FIM_BEGIN}x = {FIM_HOLE}\n{FIM_END}", BOS_TEXT + "hi" + EOS_TEXT]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text)) == text


def test_quant_metadata_shapes_match_reference_gguf(tmp_path):
    """Same keys and value shapes as the converter-written reference vocabulary."""
    from quant.tokenizer_meta import tokenizer_metadata

    ref = load_meta("deepseek-coder")
    make_hf_checkpoint(tmp_path, "deepseek-coder")
    meta = tokenizer_metadata(tmp_path)
    ref_keys = {k for k in ref if k.startswith("tokenizer.")}
    assert ref_keys <= set(meta), ref_keys - set(meta)
    for key in ref_keys:
        value, want = meta[key], ref[key]
        assert type(value) is type(want), key
        if isinstance(want, list):
            assert type(value[0]) is type(want[0]), key


def test_quant_metadata_absent_or_unsupported(tmp_path):
    from quant.tokenizer_meta import tokenizer_metadata

    assert tokenizer_metadata(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(LiteError, match="tokenizer.json"):
        tokenizer_metadata(tmp_path)
