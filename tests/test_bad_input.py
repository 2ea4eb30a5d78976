"""Bad input gets a clear LiteError that names the problem, from the loader, the converter and
the CLI; the converter never leaves a partial output."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lite
from conftest import VOCAB, require
from gguf_edit import rewrite_gguf
from quant.convert import convert_checkpoint


def test_truncated_gguf(converted, tmp_path):
    data = converted("lite-tiny").read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 100):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(lite.LiteError, match=str(p)):
            lite.load(p)


def test_other_architecture():
    vocab = require(VOCAB / "ggml-vocab-deepseek-coder.gguf")
    with pytest.raises(lite.UnsupportedError, match="'llama'"):
        lite.load(vocab)


def test_missing_and_misshaped_tensors(converted, tmp_path):
    src = converted("lite-tiny")
    missing = rewrite_gguf(src, tmp_path / "missing.gguf", drop={"blk.1.attn_kv_a_mqa.weight"})
    with pytest.raises(lite.FormatError, match=r"blk\.1\.attn_kv_a_mqa\.weight is missing"):
        lite.load(missing)
    bad = rewrite_gguf(src, tmp_path / "shape.gguf", replace={"blk.0.attn_output.weight": np.zeros((3, 64))})
    with pytest.raises(lite.FormatError, match=r"blk\.0\.attn_output\.weight has shape \(3, 64\), expected"):
        lite.load(bad)
    extra = rewrite_gguf(src, tmp_path / "extra.gguf", replace={})
    assert lite.load(extra).config.n_layer == 3   # a faithful copy still loads


def test_missing_metadata_and_bad_values(converted, tmp_path):
    src = converted("lite-tiny")
    p = rewrite_gguf(src, tmp_path / "gating.gguf", meta={"deepseek2.expert_gating_func": 2})
    with pytest.raises(lite.UnsupportedError, match="expert_gating_func"):
        lite.load(p)


@pytest.fixture
def hf_copy(fixture_dir, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(fixture_dir("lite-tiny"), dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_hf_missing_shard(hf_copy, tmp_path):
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                        "model.norm.weight": "model.safetensors"}}))
    with pytest.raises(lite.LiteError, match="model-00002-of-00002.safetensors.*missing"):
        convert_checkpoint(hf_copy, tmp_path / "o.gguf", progress=False)


def test_hf_unknown_and_missing_tensor(hf_copy, tmp_path):
    w = load_file(hf_copy / "model.safetensors")
    w["model.layers.0.self_attn.rotary_extra.weight"] = np.zeros(4, np.float32)
    save_file(w, hf_copy / "model.safetensors")
    with pytest.raises(lite.FormatError, match="unknown tensor model.layers.0.self_attn.rotary_extra.weight"):
        convert_checkpoint(hf_copy, tmp_path / "o.gguf", progress=False)
    del w["model.layers.0.self_attn.rotary_extra.weight"], w["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(w, hf_copy / "model.safetensors")
    with pytest.raises(lite.FormatError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight is missing"):
        convert_checkpoint(hf_copy, tmp_path / "o.gguf", progress=False)
    assert not (tmp_path / "o.gguf").exists()


def test_hf_unknown_architecture(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lite.UnsupportedError, match="model_type 'llama' is not DeepSeek-V2"):
        convert_checkpoint(hf_copy, tmp_path / "o.gguf", progress=False)
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("key,value", [("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")])
def test_unsupported_routing(hf_copy, tmp_path, key, value):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg[key] = value
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lite.UnsupportedError, match=f"{key} '{value}'"):
        convert_checkpoint(hf_copy, tmp_path / "o.gguf", progress=False)


def test_nan_weight_leaves_no_partial_file(hf_copy, tmp_path):
    w = load_file(hf_copy / "model.safetensors")
    w["model.layers.1.mlp.experts.3.down_proj.weight"][0, 0] = np.nan
    save_file(w, hf_copy / "model.safetensors")
    out = tmp_path / "o.gguf"
    with pytest.raises(lite.FormatError, match=r"experts\.3\.down_proj\.weight contains NaN"):
        convert_checkpoint(hf_copy, out, progress=False)
    assert list(tmp_path.glob("*o.gguf*")) == []


def test_truncated_safetensors(hf_copy, tmp_path):
    p = hf_copy / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(lite.FormatError, match="truncated"):
        convert_checkpoint(hf_copy, tmp_path / "o.gguf", progress=False)


def test_overwrite_needs_force(hf_copy, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(lite.LiteError, match="--force"):
        convert_checkpoint(hf_copy, out, "f32", progress=False)
    assert out.read_bytes() == b"precious"
    convert_checkpoint(hf_copy, out, "f32", force=True, progress=False)
    assert lite.load(out).config.n_layer == 3


def test_interrupted_write_removes_temporary(hf_copy, tmp_path, monkeypatch):
    import quant.gguf_out as go
    calls = {"n": 0}
    real = go._pad

    def failing_pad(f):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        real(f)
    monkeypatch.setattr(go, "_pad", failing_pad)
    with pytest.raises(OSError):
        convert_checkpoint(hf_copy, tmp_path / "o.gguf", progress=False)
    assert list(tmp_path.glob("*.gguf*")) == []


def test_cli_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    r = subprocess.run([sys.executable, "-m", "lite.cli", "info", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and str(bad) in r.stderr
    r = subprocess.run([sys.executable, "-m", "lite.cli", "info", str(tmp_path / "none.gguf")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no such model file" in r.stderr


def test_vram_budget_needs_the_cuda_backend(converted):
    """A VRAM budget with a CPU backend, or a malformed one, is refused before anything loads."""
    from lite.kernels import available_backends
    path = converted("lite-tiny", "q8_0")
    with pytest.raises(lite.LiteError, match="needs the cuda backend.*'c'"):
        lite.load(path, backend="c", vram_budget="1GB")
    if "cuda" in available_backends():
        with pytest.raises(lite.LiteError, match="vram budget 'lots'"):
            lite.load(path, backend="cuda", vram_budget="lots")
    else:
        with pytest.raises(lite.LiteError, match="cuda.*not available"):
            lite.load(path, backend="cuda", vram_budget="1GB")
    r = subprocess.run([sys.executable, "-m", "lite.cli", "run", str(path), "-p", "hi", "--backend", "numba",
                        "--vram-budget", "2GB"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "needs the cuda backend" in r.stderr
