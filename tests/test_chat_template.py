"""Chat templates (built-in DeepSeek-Coder-V2 format and GGUF `tokenizer.chat_template` rendered like
transformers' apply_chat_template) and fill-in-the-middle prompts."""
from __future__ import annotations

import pytest

from lite.errors import LiteError
from lite.tokenizer import (BOS_TEXT, DEEPSEEK_CODER_V2_TEMPLATE, EOS_TEXT, FIM_BEGIN, FIM_END,
                            FIM_HOLE, ChatTemplate, Tokenizer)


def make_tokenizer(template: str | None = None, fim: bool = True) -> Tokenizer:
    """A tiny byte-level vocabulary with DeepSeek's special tokens (fast to build)."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["ĠĠ", BOS_TEXT, EOS_TEXT]
    types = [1] * 257 + [3, 3]
    if fim:
        tokens += [FIM_HOLE, FIM_BEGIN, FIM_END]
        types += [4, 4, 4]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["Ġ Ġ"],
        "tokenizer.ggml.bos_token_id": 257, "tokenizer.ggml.eos_token_id": 258,
    }
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return Tokenizer.from_metadata(meta)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tokenizer()


CONVERSATION = [
    {"role": "system", "content": "You are a helpful coder."},
    {"role": "user", "content": "Write hello world in C."},
    {"role": "assistant", "content": "int main(){puts(\"hello\");}"},
    {"role": "user", "content": "Now in Rust."},
]


def test_builtin_template_exact(tok):
    assert tok.chat_template.source.startswith("built-in")
    text = tok.apply_chat_template(CONVERSATION)
    assert text == (
        f"{BOS_TEXT}You are a helpful coder.\n\n"
        "User: Write hello world in C.\n\n"
        f"Assistant: int main(){{puts(\"hello\");}}{EOS_TEXT}"
        "User: Now in Rust.\n\n"
        "Assistant:"
    )


def test_generation_prompt_has_no_trailing_space(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == f"{BOS_TEXT}User: hi\n\nAssistant:"
    assert not text.endswith(" ")
    without = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert without == f"{BOS_TEXT}User: hi\n\n"


def test_no_system_message(tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == \
        f"{BOS_TEXT}User: a\n\nAssistant: b{EOS_TEXT}"


def test_rendered_prompt_encodes_with_single_bos(tok):
    ids = tok.encode(tok.apply_chat_template(CONVERSATION))
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(tok.eos_id) == 1


def test_metadata_template_is_used_hf_style():
    # trim_blocks / lstrip_blocks as in transformers: block tags leave no newlines or indentation.
    template = (
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'user' %}\n"
        "<|user|>{{ message['content'] }}\n"
        "    {% else %}\n"
        "<|bot|>{{ message['content'] }}{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<|bot|>{% endif %}"
    )
    tok = make_tokenizer(template)
    assert tok.chat_template.source == "tokenizer.chat_template"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs) == f"<|user|>hi\n<|bot|>yo{EOS_TEXT}\n<|bot|>"


def test_template_extras_tojson_loopcontrols_kwargs():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}|{{ tools | tojson }}|{{ strftime_now('%Y') | length }}"
    )
    t = ChatTemplate(template, bos_token="<s>")
    out = t.render([{"role": "user", "content": "naïve 中文"}, {"role": "user", "content": "x"}],
                   tools=[{"name": "f"}])
    assert out == '<s>{"role": "user", "content": "naïve 中文"}|[{"name": "f"}]|4'


def test_raise_exception_becomes_lite_error():
    tok = make_tokenizer("{% if messages[0]['role'] != 'user' %}"
                         "{{ raise_exception('first message must be from the user') }}{% endif %}ok")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(LiteError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_builtin_rejects_unknown_role(tok):
    with pytest.raises(LiteError, match="unknown message role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_errors_are_lite_errors():
    with pytest.raises(LiteError, match="tokenizer.chat_template"):
        make_tokenizer("{% for %}")
    t = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(LiteError, match="failed to render"):
        t.render([{"role": "user", "content": "x"}])
    # The sandbox is immutable: templates cannot mutate their inputs or reach Python internals.
    with pytest.raises(LiteError):
        ChatTemplate("{{ messages.append(1) }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(LiteError):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])


@pytest.mark.parametrize("bad", ["hello", [{"content": "no role"}], [["user", "x"]], None])
def test_bad_messages(tok, bad):
    with pytest.raises(LiteError, match="message"):
        tok.apply_chat_template(bad)


def test_builtin_template_text_is_exported():
    assert "Assistant:" in DEEPSEEK_CODER_V2_TEMPLATE


# --- fill in the middle ---

def test_fim_prompt_exact(tok):
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    assert tok.fim_prompt(prefix, suffix) == (
        f"{BOS_TEXT}{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}")
    ids = tok.encode(tok.fim_prompt(prefix, suffix))
    assert ids[:2] == [tok.bos_id, tok.id_of(FIM_BEGIN)]
    assert ids[-1] == tok.id_of(FIM_END)
    assert ids.count(tok.id_of(FIM_HOLE)) == 1
    assert tok.decode(ids) == tok.fim_prompt(prefix, suffix)


def test_fim_needs_fim_tokens():
    with pytest.raises(LiteError, match="fill-in-the-middle"):
        make_tokenizer(fim=False).fim_prompt("a", "b")
