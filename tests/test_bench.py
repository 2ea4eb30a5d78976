"""`lite bench` on a tiny synthetic model (benchmarks/make_synthetic.py --tiny): the JSON object
has every field, with sane values; the table prints; active bytes follow the model's tensors."""
from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _make_synthetic():
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "benchmarks" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    ms = _make_synthetic()
    path = tmp_path_factory.mktemp("synthetic") / "tiny-q4_0.gguf"
    ms.make_synthetic(path, layers=2, preset="q4_0", tiny=True, quiet=True)
    return path


def test_synthetic_model_loads_and_routes(tiny_model):
    import lite
    from lite.model.moe import route
    m = lite.load(tiny_model, n_ctx=32)
    c = m.config
    assert (c.d_model, c.n_layer, c.n_expert, c.n_dense_lead, c.yarn_factor) == (256, 2, 8, 1, 40.0)
    assert m.file.tensors["blk.1.ffn_gate_exps.weight"].qtype.name == "Q4_0"
    assert m.file.tensors["blk.1.attn_q.weight"].qtype.name == "Q8_0"
    logits = m.logits(np.arange(8))
    assert np.all(np.isfinite(logits)) and logits.std() > 0
    # Routing differs between tokens (the router has structure, inputs differ).
    h = np.random.default_rng(0).standard_normal((16, c.d_model)).astype(np.float32)
    probs = m.backend.softmax(m.backend.matmul(h, m.file.tensors["blk.1.ffn_gate_inp.weight"]))
    ids, _ = route(c, probs)
    assert len({tuple(sorted(r)) for r in ids.tolist()}) > 4


def test_synthetic_k_quants(tmp_path):
    """--preset q4_k_m writes Q4_K and Q6_K blocks whose weights have the intended scale: the
    dequantized expert and shared weights have an RMS near WEIGHT_RMS, and the model runs."""
    import lite
    from lite.kernels.dequant import dequantize
    ms = _make_synthetic()
    path = ms.make_synthetic(tmp_path / "tiny-q4_k_m.gguf", layers=2, preset="q4_k_m", tiny=True, quiet=True)
    m = lite.load(path, n_ctx=32)
    for name, want in (("blk.1.ffn_gate_exps.weight", "Q4_K"), ("blk.1.ffn_up_shexp.weight", "Q6_K")):
        t = m.file.tensors[name]
        assert t.qtype.name == want
        w = dequantize(np.ascontiguousarray(t.data).reshape(-1, t.data.shape[-1]), t.qtype)
        assert 0.5 * ms.WEIGHT_RMS < float(np.sqrt(np.mean(w.astype(np.float64) ** 2))) < 2 * ms.WEIGHT_RMS
        assert abs(float(w.mean())) < 0.2 * ms.WEIGHT_RMS
    logits = m.logits(np.arange(8))
    assert np.all(np.isfinite(logits)) and logits.std() > 0


def test_synthetic_class_overrides(tmp_path):
    """Per-class types override the preset as `lite quantize --attn …` does: llama.cpp's Q4_0
    recipe (every matrix Q4_0 but the output, Q6_K where its rows allow) has centred weights and
    routing that reaches every expert; an unknown type is refused by name."""
    import lite
    ms = _make_synthetic()
    over = {"shared": "q4_0", "attn": "q4_0", "embed": "q4_0", "output": "q6_k"}
    path = ms.make_synthetic(tmp_path / "tiny-q4_0-all.gguf", layers=2, preset="q4_0", tiny=True, quiet=True,
                             overrides=over)
    m = lite.load(path, n_ctx=64)
    types = {n: t.qtype.name for n, t in m.file.tensors.items()}
    assert types["blk.1.ffn_up_shexp.weight"] == types["blk.0.attn_output.weight"] == "Q4_0"
    assert types["token_embd.weight"] == types["blk.1.ffn_down_exps.weight"] == "Q4_0"
    assert types["output.weight"] in ("Q6_K", "Q8_0")    # Q8_0: the fallback where rows are not 256-long
    assert np.all(np.isfinite(m.logits(np.arange(8))))
    # Q4_0's (q - 8) has mean -0.5: the blocks' random signs keep the weights centred, so that
    # routing still varies with every matrix at Q4_0.
    from lite.kernels.dequant import dequantize
    t = m.file.tensors["blk.1.attn_output.weight"]
    w = dequantize(np.ascontiguousarray(t.data), t.qtype).astype(np.float64)
    assert abs(w.mean()) < 0.02 * np.sqrt(np.mean(w ** 2))
    from lite.trace import RoutingTrace
    trace = RoutingTrace()
    m.record_routing(trace)
    m.logits(np.arange(64))
    assert len({int(e) for layer, ids in trace.records if layer == 1 for e in ids.ravel()}) == m.config.n_expert
    with pytest.raises(lite.LiteError, match="--attn q5_1"):
        ms.make_synthetic(tmp_path / "bad.gguf", layers=1, tiny=True, quiet=True, overrides={"attn": "q5_1"})


def test_synthetic_vocab(tmp_path):
    """`--vocab` copies a vocabulary GGUF's `tokenizer.*` keys (what llama.cpp needs to load the
    file) and refuses, naming the file, one whose token count is not the model's."""
    import gguf

    import lite
    from lite.gguf_meta import read_metadata
    def vocab_gguf(name: str, tokens: list[str]) -> Path:
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), "deepseek2")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("deepseek-llm")
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges(["t 1", "t1 0"])
        w.add_bos_token_id(5)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    ms = _make_synthetic()
    tokens = [f"t{i}" for i in range(1024)]            # the tiny model's vocabulary size
    vocab = vocab_gguf("vocab.gguf", tokens)
    path = ms.make_synthetic(tmp_path / "tiny-vocab.gguf", layers=1, tiny=True, quiet=True, vocab=vocab)
    meta = read_metadata(path)
    assert meta["tokenizer.ggml.tokens"] == tokens
    assert meta["tokenizer.ggml.merges"] == ["t 1", "t1 0"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "deepseek-llm"
    assert meta["tokenizer.ggml.bos_token_id"] == 5
    assert np.all(np.isfinite(lite.load(path, n_ctx=16).logits(np.arange(4))))
    small = vocab_gguf("small.gguf", tokens[:1000])
    with pytest.raises(lite.LiteError, match=r"small\.gguf: tokenizer\.ggml\.tokens lists 1000 tokens; "
                                             r"the model's vocabulary has 1024"):
        ms.make_synthetic(tmp_path / "bad.gguf", layers=1, tiny=True, quiet=True, vocab=small)
    assert not (tmp_path / "bad.gguf").exists()


def test_full_dims_metadata():
    """--full gives Coder-V2's config (checked without writing the 60-layer file)."""
    from gguf.constants import Keys
    from lite.model.config import ARCH, ModelConfig
    from quant.hf_config import gguf_metadata
    ms = _make_synthetic()
    meta = gguf_metadata(ms.hf_config(2, full=True), "t")
    c = ModelConfig.from_metadata({Keys.General.ARCHITECTURE: ARCH, **{k: v for k, (v, _) in meta.items()}})
    assert (c.d_model, c.n_head, c.q_lora_rank, c.n_expert, c.n_group, c.topk_group, c.expert_ffn,
            c.ffn_dense, c.expert_weights_scale) == (5120, 128, 1536, 160, 8, 3, 1536, 12288, 16.0)
    lite_meta = gguf_metadata(ms.hf_config(None), "t")
    cl = ModelConfig.from_metadata({Keys.General.ARCHITECTURE: ARCH, **{k: v for k, (v, _) in lite_meta.items()}})
    assert (cl.n_layer, cl.d_model, cl.q_lora_rank, cl.kv_lora_rank, cl.n_expert, cl.n_expert_used,
            cl.n_shared, cl.expert_ffn, cl.ffn_dense, cl.vocab_size) == (27, 2048, 0, 512, 64, 6, 2, 1408, 10944, 102400)
    assert abs(cl.yarn_mscale_all_dim - 0.707) < 1e-6 and cl.yarn_orig_ctx == 4096 and cl.rms_eps == 1e-6


def test_bench_json(tiny_model):
    from lite.bench import active_bytes_per_token, run_bench
    buf = io.StringIO()
    r = run_bench(tiny_model, prompt=12, gen=4, depths=(20,), json_out=True, repeats=2, out=buf,
                  bandwidth_bytes=32 << 20)
    j = json.loads(buf.getvalue())
    assert j == json.loads(json.dumps(r))
    for key in ("prefill_tok_s", "decode_tok_s", "roofline_decode_tok_s", "load_s", "ttft_s", "bandwidth_gbs"):
        assert isinstance(j[key], float) and 0 < j[key] < 1e9, key
    assert j["backend"] in ("c", "numba", "reference", "cuda")
    assert j["peak_rss_bytes"] > 10 << 20
    assert j["ttft_s"] >= 12 / j["prefill_tok_s"] * 0.999
    assert len(j["depths"]) == 1 and j["depths"][0]["depth"] == 20 and j["depths"][0]["decode_tok_s"] > 0
    assert j["roofline_decode_tok_s"] == pytest.approx(j["bandwidth_gbs"] * 1e9 / j["active_bytes_per_token"])
    # one probe after each run's decode; the roofline share is the median of each run's own
    runs = j["bandwidth_gbs_runs"]
    assert len(runs) == 2 and j["bandwidth_gbs"] == pytest.approx(sum(runs) / 2)
    shares = sorted(4 / t / (b * 1e9 / j["active_bytes_per_token"]) for t, b in zip(j["decode_s_runs"], runs))
    assert j["decode_roofline_fraction"] == pytest.approx(sum(shares) / 2)

    import lite
    m = lite.load(tiny_model)
    c, t = m.config, m.file.tensors
    expert_bytes = sum(t[f"blk.1.ffn_{p}_exps.weight"].nbytes for p in ("gate", "up", "down")) // c.n_expert
    everything = sum(x.nbytes for x in t.values())
    routed_all = sum(x.nbytes for n, x in t.items() if n.endswith("_exps.weight"))
    want = (everything - routed_all - t["token_embd.weight"].nbytes + t["token_embd.weight"].row_bytes
            + c.n_expert_used * expert_bytes)
    assert active_bytes_per_token(m) == j["active_bytes_per_token"] == want


@pytest.mark.parametrize("warmup", [True, False])
def test_bench_warms_up_untimed(tiny_model, monkeypatch, warmup):
    """One untimed prompt and two decode steps come first (unless --no-warmup), and the routing
    trace starts after them; then the timed prompts back to back, then each decode after an
    untimed prompt of its own."""
    import lite
    from lite import bench
    calls: list[int] = []
    load = lite.load

    def counting_load(*a, **kw):
        m = load(*a, **kw)
        forward = m.forward
        m.forward = lambda ids, cache, **k: calls.append(len(ids)) or forward(ids, cache, **k)
        rec = m.record_routing
        m.record_routing = lambda r: calls.append(-1) or rec(r)
        return m

    monkeypatch.setattr(lite, "load", counting_load)
    bench.run_bench(tiny_model, prompt=5, gen=3, repeats=1, bandwidth=False, out=io.StringIO(), warmup=warmup)
    timed = [5] + [5, 1, 1, 1]
    assert calls == ([5, 1, 1] if warmup else []) + [-1] + timed


def test_bench_table_and_cli_flags(tiny_model):
    import argparse
    from lite import bench
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    a = p.parse_args([str(tiny_model), "--prompt", "5", "--gen", "2", "--repeats", "1", "--depth", "8",
                      "--no-bandwidth", "--threads", "1", "--no-warmup"])
    assert (a.prompt, a.gen, a.repeats, a.depth, a.threads, a.no_bandwidth, a.json, a.no_warmup) == \
        (5, 2, 1, [8], 1, True, False, True)
    buf = io.StringIO()
    r = bench.run_bench(a.model, prompt=a.prompt, gen=a.gen, repeats=1, depths=(8,), bandwidth=False, out=buf)
    text = buf.getvalue()
    assert "prefill" in text and "decode" in text and "roofline" in text and r["roofline_decode_tok_s"] is None
