"""The bundled demo model in lite/demo/ (made by tools/train_demo.py): files, architecture,
tokenizer, size, and lite's logits against the transformers reference stored with it.

No torch here: the checkpoint is read with json, numpy, `tokenizers` and the safetensors header.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

DEMO = Path(os.environ.get("LITE_DEMO_DIR", Path(__file__).resolve().parent.parent / "lite" / "demo"))
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "reference.npz", "heldout.txt", "train_log.json")
MAX_BYTES = 25 * 1000 * 1000
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
SPECIALS = (BOS, EOS, "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", "<｜pad｜>")

CODE_SAMPLES = [
    "def reverse_string(s):\n    return s[::-1]\n",
    "class A(object):\n\tdef __init__(self, x=12345):\n\t\tself.x = x  # ünïcödé, 你好\n\n\n",
    "    if n % 2 == 0 and (a != b or c >= d):\n        print(f\"{n!r:>10}\")\r\n   ",
    "x = [1, 2.5e-3, 0xFF, 'é', b'\\x00', None]  \n",
]


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((DEMO / "config.json").read_text())


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


@pytest.fixture(scope="module")
def tensors() -> dict:
    return safetensors_header(DEMO / "model.safetensors")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(DEMO / "tokenizer.json"))


def test_files_exist():
    missing = [f for f in FILES if not (DEMO / f).is_file()]
    assert not missing, f"missing in {DEMO}: {missing}"


def test_checkpoint_size():
    assert (DEMO / "model.safetensors").stat().st_size <= MAX_BYTES


def test_config_architecture(config):
    c = config
    assert c["model_type"] == "deepseek_v2" and c["architectures"] == ["DeepseekV2ForCausalLM"]
    assert c["q_lora_rank"] is None                      # Lite shape: direct q_proj
    assert c["first_k_dense_replace"] == 1 and c["moe_layer_freq"] == 1
    assert c["num_hidden_layers"] >= 2
    assert 8 <= c["n_routed_experts"] <= 16 and c["num_experts_per_tok"] == 2
    assert 1 <= c["n_shared_experts"] <= 2
    assert c["topk_method"] == "greedy" and c["scoring_func"] == "softmax"
    assert c["norm_topk_prob"] is False and c["routed_scaling_factor"] == 1.0
    assert c["tie_word_embeddings"] is False
    assert c["aux_loss_alpha"] > 0
    rs = c["rope_scaling"]
    assert rs["type"] == "yarn" and rs["factor"] > 1
    assert rs["mscale"] == rs["mscale_all_dim"]          # cos/sin multiplier exactly 1
    assert "rope_theta" in c and "head_dim" not in c and "rope_parameters" not in c
    assert 4096 <= c["vocab_size"] <= 8192


def expected_shapes(c: dict) -> dict[str, list[int]]:
    D, H = c["hidden_size"], c["num_attention_heads"]
    dn, dr, dv, C = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    F, Fd, E = c["moe_intermediate_size"], c["intermediate_size"], c["n_routed_experts"]
    out = {"model.embed_tokens.weight": [c["vocab_size"], D], "model.norm.weight": [D],
           "lm_head.weight": [c["vocab_size"], D]}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": [D], p + "post_attention_layernorm.weight": [D],
            p + "self_attn.q_proj.weight": [H * (dn + dr), D],
            p + "self_attn.kv_a_proj_with_mqa.weight": [C + dr, D],
            p + "self_attn.kv_a_layernorm.weight": [C],
            p + "self_attn.kv_b_proj.weight": [H * (dn + dv), C],
            p + "self_attn.o_proj.weight": [D, H * dv],
        })
        if i < c["first_k_dense_replace"]:
            out.update({p + "mlp.gate_proj.weight": [Fd, D], p + "mlp.up_proj.weight": [Fd, D],
                        p + "mlp.down_proj.weight": [D, Fd]})
            continue
        out[p + "mlp.gate.weight"] = [E, D]
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            out.update({q + "gate_proj.weight": [F, D], q + "up_proj.weight": [F, D],
                        q + "down_proj.weight": [D, F]})
        S = F * c["n_shared_experts"]
        out.update({p + "mlp.shared_experts.gate_proj.weight": [S, D],
                    p + "mlp.shared_experts.up_proj.weight": [S, D],
                    p + "mlp.shared_experts.down_proj.weight": [D, S]})
    return out


def test_tensor_names_and_shapes(config, tensors):
    want = expected_shapes(config)
    assert set(tensors) == set(want)
    for name, shape in want.items():
        assert tensors[name]["shape"] == shape, name
        assert tensors[name]["dtype"] in ("BF16", "F32"), name


def test_quantizable_widths(config, tensors):
    """Every matrix's row length (Linear input width) takes 32-blocks; experts' take 256-blocks."""
    for name, t in tensors.items():
        if len(t["shape"]) == 2 and "layernorm" not in name:
            assert t["shape"][1] % 32 == 0, name
    for name, t in tensors.items():
        if ".mlp.experts." in name:
            assert t["shape"][1] % 256 == 0, name


def test_tokenizer_vocab_and_specials(config, tokenizer):
    assert tokenizer.get_vocab_size() == config["vocab_size"]
    ids = [tokenizer.token_to_id(t) for t in SPECIALS]
    assert None not in ids and len(set(ids)) == len(ids)
    assert ids[0] == config["bos_token_id"] and ids[1] == config["eos_token_id"]
    tc = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and tc["bos_token"] == BOS and tc["eos_token"] == EOS


@pytest.mark.parametrize("text", CODE_SAMPLES)
def test_tokenizer_round_trips_code(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    with_bos = tokenizer.encode(text).ids
    assert with_bos[0] == tokenizer.token_to_id(BOS) and with_bos[1:] == ids


def test_tokenizer_digits_and_specials(tokenizer):
    assert len(tokenizer.encode("1234567890", add_special_tokens=False).ids) == 10
    ids = tokenizer.encode(f"{BOS}User: hi\n\nAssistant: ok{EOS}", add_special_tokens=False).ids
    assert ids[0] == tokenizer.token_to_id(BOS) and ids[-1] == tokenizer.token_to_id(EOS)


def test_pre_tokenizer_is_deepseek_llm(tokenizer):
    """The splits are llama.cpp's `deepseek-llm` ones, which lite rebuilds from GGUF metadata."""
    from lite.tokenizer import build_pre_tokenizer
    probe = "Hello, World! x=3.14159; y_val += 42\n\tdef f(ξ):  # café 12345 你好 ！\n  "
    ours = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str(probe)]
    ref = [p for p, _ in build_pre_tokenizer("deepseek-llm").pre_tokenize_str(probe)]
    assert ours == ref


def test_chat_template_renders_deepseek_format():
    from jinja2 import Template
    tc = json.loads((DEMO / "tokenizer_config.json").read_text())
    t = Template(tc["chat_template"])
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Write a function that reverses a string"}]
    out = t.render(messages=msgs, bos_token=BOS, eos_token=EOS, add_generation_prompt=True)
    assert out == (f"{BOS}User: Hi\n\nAssistant: Yo{EOS}"
                   "User: Write a function that reverses a string\n\nAssistant:")
    assert t.render(messages=msgs[:1], bos_token=BOS, eos_token=EOS) == f"{BOS}User: Hi\n\n"


def test_heldout_list():
    rel = (DEMO / "heldout.txt").read_text().split()
    assert rel and all(r.endswith(".py") and not r.startswith("/") for r in rel)
    assert len(set(rel)) == len(rel)


def test_reference_and_log(config):
    ref = np.load(DEMO / "reference.npz")
    ids, logits = ref["input_ids"], ref["logits"]
    assert ids.dtype == np.int64 and ids.ndim == 2 and ids.shape[1] >= 32
    assert ids.min() >= 0 and ids.max() < config["vocab_size"]
    assert logits.dtype == np.float32 and logits.shape == (*ids.shape, config["vocab_size"])
    assert np.isfinite(logits).all()
    log = json.loads((DEMO / "train_log.json").read_text())
    final = log["final"]
    assert final["heldout_loss_bf16_weights"] < 6.0 and final["train_loss_last50_mean"] < 6.0


# --- lite against the transformers reference ---------------------------------------------------

@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    convert = pytest.importorskip("quant.convert")
    out = tmp_path_factory.mktemp("demo") / "demo-f32.gguf"
    convert.convert_checkpoint(DEMO, out, "f32", progress=False)
    return out


def test_lite_logits_match_reference(demo_gguf):
    lite = pytest.importorskip("lite")
    if not hasattr(lite, "load"):
        pytest.skip("lite.load not available")
    m = lite.load(demo_gguf, backend="reference")
    ref = np.load(DEMO / "reference.npz")
    for b in range(ref["input_ids"].shape[0]):
        got = np.asarray(m.logits(ref["input_ids"][b]))
        # bf16 weights are exact in f32; only summation order differs
        assert np.abs(got - ref["logits"][b]).max() < 2e-3


def test_lite_tokenizer_from_gguf_matches_tokenizer_json(demo_gguf, tokenizer):
    """The converted GGUF's tokenizer metadata rebuilds the same ids and chat prompt."""
    from lite.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(str(demo_gguf))
    for text in CODE_SAMPLES:
        assert list(tok.encode(text, add_bos=True)) == tokenizer.encode(text).ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a function that reverses a string"}])
    assert prompt == f"{BOS}User: Write a function that reverses a string\n\nAssistant:"
    assert list(tok.encode(prompt)) == tokenizer.encode(prompt, add_special_tokens=False).ids
