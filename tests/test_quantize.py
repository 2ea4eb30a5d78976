"""The quantizer (`lite quantize`): every preset on both fixtures loads in lite with weights that
dequantize exactly as gguf.quants reads the written blocks; the reference forward on quantized
weights equals the one on their F32 re-export; GGUF input (float, Q8_0, legacy attn_kv_b) is
re-quantized to the same bytes as the HF path; llama.cpp's deepseek2 keys and shapes; the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

import lite
from lite.kernels.dequant import dequantize
from lite.weights.gguf_file import open_model_file
from quant.convert import convert
from quant.presets import PRESETS, choose_type, resolve

FIXTURES = ("lite-tiny", "v2-tiny-yarn")


def _reader_tensors(path: Path) -> dict[str, tuple[QT, tuple[int, ...], np.ndarray]]:
    """Tensors as gguf's own reader sees them: (type, numpy shape, raw bytes [..., row_bytes])."""
    out = {}
    for t in GGUFReader(path).tensors:
        qt = QT(int(t.tensor_type))
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        block, size = GGML_QUANT_SIZES[qt]
        out[t.name] = (qt, shape, np.array(t.data).view(np.uint8).reshape(*shape[:-1], shape[-1] // block * size))
    return out


def _meta(path: Path) -> dict:
    return open_model_file(path).meta


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", FIXTURES)
def test_preset_loads_and_dequantizes_exactly(converted, name, preset):
    path = converted(name, preset)
    mf = open_model_file(path)
    ref = _reader_tensors(path)
    table = resolve(preset, {})
    assert set(mf.tensors) == set(ref)
    for tname, t in mf.tensors.items():
        qt, shape, raw = ref[tname]
        assert t.qtype == qt == choose_type(tname, shape, table), tname
        assert t.shape == shape
        assert np.array_equal(np.asarray(t.data), raw), tname
        want = quants.dequantize(raw, qt).astype(np.float32)
        got = dequantize(t.data, t.qtype)
        assert got.shape == want.shape and np.array_equal(got, want), tname
        if tname.endswith(("_norm.weight", "ffn_gate_inp.weight")):
            assert qt == QT.F32
    assert open(path, "rb").read(4) == b"GGUF"
    assert all(off % 4096 == 0 for off in mf.data_offsets.values())


@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m", "q8_0", "bf16"])
@pytest.mark.parametrize("name", FIXTURES)
def test_reference_forward_equals_f32_reexport(converted, reference_outputs, tmp_path, name, preset):
    """GGUF(preset) → F32 through the GGUF-input path holds exactly the dequantized weights, and the
    float32 reference forward gives the same logits on both files."""
    q = converted(name, preset)
    f = tmp_path / "reexport-f32.gguf"
    convert(q, f, "f32", progress=False)
    qa, fa = open_model_file(q), open_model_file(f)
    for tname, t in qa.tensors.items():
        assert fa.tensors[tname].qtype == QT.F32
        assert np.array_equal(np.asarray(fa.tensors[tname].data).view(np.float32), dequantize(t.data, t.qtype)), tname
    ids = reference_outputs(name)[0]["input_ids"][0]
    lq = lite.load(q, backend="reference").logits(ids)
    lf = lite.load(f, backend="reference").logits(ids)
    assert np.abs(lq - lf).max() <= 1e-4
    if preset in ("q8_0", "bf16"):   # loose agreement with the fixture's float32 logits
        err = np.abs(lq - reference_outputs(name)[0]["logits"][0])
        assert np.median(err.max(axis=1)) < 0.5


@pytest.mark.parametrize("name", FIXTURES)
def test_gguf_requantization_matches_hf_path_byte_for_byte(converted, tmp_path, name):
    out = tmp_path / "from-gguf-q8_0.gguf"
    convert(converted(name, "f32"), out, "q8_0", progress=False)
    assert out.read_bytes() == converted(name, "q8_0").read_bytes()
    # F16 and BF16 sources are exact in float32: re-exporting them to F32 is lossless
    for src in ("f16", "bf16"):
        back = tmp_path / f"{src}-f32.gguf"
        convert(converted(name, src), back, "f32", progress=False)
        a, b = open_model_file(converted(name, src)), open_model_file(back)
        for tname, t in a.tensors.items():
            assert np.array_equal(dequantize(t.data, t.qtype), np.asarray(b.tensors[tname].data).view(np.float32))


def _write_legacy(src: Path, dst: Path) -> None:
    """A copy of an F32 file with attn_k_b/attn_v_b merged back into the legacy attn_kv_b."""
    mf = open_model_file(src)
    c = mf.config
    r = GGUFReader(src)
    w = GGUFWriter(dst, "deepseek2")
    for key, fld in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.alignment":
            w.add_custom_alignment(int(fld.parts[fld.data[0]][0]))
            continue
        sub = fld.types[1] if fld.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, fld.contents(), fld.types[0], sub_type=sub)
    for name, t in mf.tensors.items():
        if name.endswith("attn_v_b.weight"):
            continue
        if name.endswith("attn_k_b.weight"):
            p = name[:-len("attn_k_b.weight")]
            k_b = np.asarray(t.data).view(np.float32).reshape(c.n_head, c.kv_lora_rank, c.qk_nope)
            v_b = np.asarray(mf.tensors[p + "attn_v_b.weight"].data).view(np.float32)
            kv = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, c.kv_lora_rank)
            w.add_tensor(p + "attn_kv_b.weight", np.ascontiguousarray(kv))
            continue
        w.add_tensor(name, np.asarray(t.data).view(np.float32).reshape(t.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_legacy_kv_b_input_is_written_split(converted, tmp_path):
    name = "lite-tiny"
    legacy = tmp_path / "legacy.gguf"
    _write_legacy(converted(name, "f32"), legacy)
    assert not open_model_file(legacy).split_kv_b
    out = tmp_path / "split.gguf"
    convert(legacy, out, "q4_0", progress=False)
    mf = open_model_file(out)
    assert mf.split_kv_b and "blk.0.attn_kv_b.weight" not in mf.tensors
    assert out.read_bytes() == converted(name, "q4_0").read_bytes()


def test_gguf_input_copies_tokenizer_metadata(converted, tmp_path):
    src = tmp_path / "with-tokenizer.gguf"
    _write_legacy(converted("lite-tiny", "f32"), src)   # any GGUF writer path will do
    r = GGUFReader(src)
    w = GGUFWriter(tmp_path / "tok.gguf", "deepseek2")
    for key, fld in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.alignment":
            w.add_custom_alignment(4096)
            continue
        sub = fld.types[1] if fld.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, fld.contents(), fld.types[0], sub_type=sub)
    tokens = [f"t{i}" for i in range(512)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-llm")
    w.add_token_list(tokens)
    w.add_token_types([1] * 512)
    w.add_token_merges(["t 1", "t 2"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=QT(int(t.tensor_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "tok-q8_0.gguf"
    convert(tmp_path / "tok.gguf", out, "q8_0", progress=False)
    a, b = _meta(tmp_path / "tok.gguf"), _meta(out)
    for key in a:
        if key.startswith("tokenizer."):
            assert b[key] == a[key], key
    types = {f.name: (f.types[0], f.types[-1]) for f in GGUFReader(out).fields.values()}
    assert types["tokenizer.ggml.token_type"] == (GGUFValueType.ARRAY, GGUFValueType.INT32)
    assert types["tokenizer.ggml.tokens"] == (GGUFValueType.ARRAY, GGUFValueType.STRING)
    assert types["tokenizer.ggml.bos_token_id"][0] == GGUFValueType.UINT32
    assert types["tokenizer.ggml.add_bos_token"][0] == GGUFValueType.BOOL
    assert b["general.file_type"] == 7


def test_quantized_gguf_input_is_refused(converted, tmp_path):
    with pytest.raises(lite.UnsupportedError, match="is Q4_0"):
        convert(converted("lite-tiny", "q4_0"), tmp_path / "x.gguf", "q8_0", progress=False)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("name", FIXTURES)
def test_llama_cpp_deepseek2_keys(converted, fixture_dir, name):
    import json
    path = converted(name, "q4_0")
    hf = json.loads((fixture_dir(name) / "config.json").read_text())
    H, C, N, R, V = (hf["num_attention_heads"], hf["kv_lora_rank"], hf["qk_nope_head_dim"],
                     hf["qk_rope_head_dim"], hf["v_head_dim"])
    fields = GGUFReader(path).fields
    m = _meta(path)
    a = "deepseek2."
    assert m["general.architecture"] == "deepseek2"
    assert m["general.alignment"] == 4096
    assert m[a + "attention.head_count"] == H
    assert m[a + "attention.head_count_kv"] == 1
    assert m[a + "attention.key_length"] == C + R
    assert m[a + "attention.value_length"] == C
    assert m[a + "attention.key_length_mla"] == N + R
    assert m[a + "attention.value_length_mla"] == V
    assert m[a + "attention.kv_lora_rank"] == C
    assert m[a + "attention.q_lora_rank"] == (hf["q_lora_rank"] or 0)   # present even when 0
    assert m[a + "rope.dimension_count"] == R
    assert m[a + "leading_dense_block_count"] == hf["first_k_dense_replace"]
    assert m[a + "expert_count"] == hf["n_routed_experts"]
    assert m[a + "expert_used_count"] == hf["num_experts_per_tok"]
    assert m[a + "expert_shared_count"] == hf["n_shared_experts"]
    assert m[a + "expert_feed_forward_length"] == hf["moe_intermediate_size"]
    assert m[a + "expert_gating_func"] == 1
    for key in ("attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
                "attention.key_length_mla", "attention.value_length_mla", "attention.q_lora_rank",
                "attention.kv_lora_rank", "block_count", "expert_count", "leading_dense_block_count"):
        assert fields[a + key].types == [GGUFValueType.UINT32], key
    assert fields[a + "expert_weights_scale"].types == [GGUFValueType.FLOAT32]
    assert fields[a + "expert_weights_norm"].types == [GGUFValueType.BOOL]
    rs = hf["rope_scaling"]
    if rs:
        assert m[a + "rope.scaling.type"] == "yarn"
        assert m[a + "rope.scaling.factor"] == pytest.approx(rs["factor"])
        assert m[a + "rope.scaling.original_context_length"] == rs["original_max_position_embeddings"]
        assert m[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * rs["mscale_all_dim"])
    else:
        assert a + "rope.scaling.type" not in m
    ref = _reader_tensors(path)
    for i in range(hf["num_hidden_layers"]):
        p = f"blk.{i}."
        # numpy shapes; ggml ne is the reverse: attn_k_b ne {N, C, H}, attn_v_b ne {C, V, H}
        assert ref[p + "attn_k_b.weight"][1] == (H, C, N)
        assert ref[p + "attn_v_b.weight"][1] == (H, V, C)
        assert p + "attn_kv_b.weight" not in ref
        if i >= hf["first_k_dense_replace"]:
            assert ref[p + "ffn_gate_inp.weight"][0] == QT.F32
            assert ref[p + "ffn_gate_exps.weight"][0] == QT.Q4_0
            assert ref[p + "ffn_down_exps.weight"][1] == (hf["n_routed_experts"], hf["hidden_size"],
                                                         hf["moe_intermediate_size"])


def test_report_and_cli_streams(converted, fixture_dir, tmp_path, capsys):
    """The per-class report is right (bytes, bits/weight, relative error recomputed from the files),
    goes to stdout; progress and the 'wrote' line go to stderr."""
    from lite.cli import main
    from quant.presets import tensor_class
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(fixture_dir("lite-tiny")), str(out), "--preset", "q4_0"]) == 0
    so, se = capsys.readouterr()
    assert "rel.err" in so and "experts" in so and "wrote" not in so
    assert "wrote" in se and "MiB" in se and "ETA" in se
    rows = {ln.split()[0]: ln.split() for ln in so.splitlines()[1:]}
    f32, q = open_model_file(converted("lite-tiny", "f32")), open_model_file(out)
    sums: dict[str, list[float]] = {}
    for tname, t in q.tensors.items():
        cls = tensor_class(tname) or "norms+routers"
        a = np.asarray(f32.tensors[tname].data).view(np.float32).astype(np.float64)
        d = dequantize(t.data, t.qtype).astype(np.float64) - a
        s = sums.setdefault(cls, [0, 0, 0, 0])
        s[0] += t.data.nbytes
        s[1] += a.size
        s[2] += (d * d).sum()
        s[3] += (a * a).sum()
    for cls, (nbytes, n, e2, r2) in sums.items():
        row = rows[cls]
        assert int(row[2].replace(",", "")) == n
        assert float(row[3]) == pytest.approx(nbytes / 2**20, abs=0.006)
        assert float(row[4]) == pytest.approx(8 * nbytes / n, abs=1e-3)
        assert float(row[5]) == pytest.approx((e2 / r2) ** 0.5 if cls != "norms+routers" else 0.0, rel=2e-3, abs=1e-9)
    assert rows["experts"][1] == "Q4_0" and float(rows["experts"][4]) == 4.5


def test_large_tensors_are_streamed_in_pieces(converted, fixture_dir, tmp_path, monkeypatch):
    """No piece quantized at once exceeds PIECE_ELEMENTS weights (one expert here), from either
    source, and chunking does not change a byte of the output."""
    import quant.convert as qc
    monkeypatch.setattr(qc, "PIECE_ELEMENTS", 2048)
    seen = []
    orig = qc.encode

    def spy(a, qtype, tensor, weights=None):
        seen.append(a.size)
        return orig(a, qtype, tensor, weights)
    monkeypatch.setattr(qc, "encode", spy)
    for src in (fixture_dir("lite-tiny"), converted("lite-tiny", "f32")):
        out = tmp_path / "chunked.gguf"
        qc.convert(src, out, "q8_0", progress=False, force=True)
        assert out.read_bytes() == converted("lite-tiny", "q8_0").read_bytes()
    assert max(seen) <= 2048
