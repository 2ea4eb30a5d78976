"""Hugging Face DeepSeek-V2 checkpoint → GGUF in llama.cpp's current `deepseek2` layout: experts
stacked into 3-D `ffn_*_exps`, `kv_b_proj` split into `attn_k_b` (per head, transposed) and
`attn_v_b`. Tensors are read, quantized and written one at a time (experts one expert at a
time), so memory stays flat whatever the model's size."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGUFValueType
from gguf.constants import GGMLQuantizationType as QT, Keys

from lite import FormatError
from lite.model.config import ARCH, ModelConfig
from lite.model.tensors import expected_shapes

from .checkpoint import Checkpoint
from .encode import encode, relative_error
from .gguf_out import PlannedTensor, write_gguf
from .hf_config import gguf_metadata
from .presets import choose_type, resolve, tensor_class

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "bf16": 32}


def _hf_sources(cfg: ModelConfig) -> dict[str, Callable[[Checkpoint], list[str]]]:
    """GGUF name → the HF tensor names it is built from (in the order they are stacked)."""
    src: dict[str, list[str]] = {"token_embd.weight": ["model.embed_tokens.weight"],
                                 "output_norm.weight": ["model.norm.weight"], "output.weight": ["lm_head.weight"]}
    simple = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj",
              "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
              "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
              "attn_k_b": "self_attn.kv_b_proj", "attn_v_b": "self_attn.kv_b_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
              "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
              "ffn_down_shexp": "mlp.shared_experts.down_proj"}
    for name in expected_shapes(cfg):
        if not name.startswith("blk."):
            continue
        _, i, short, _ = name.split(".")
        p = f"model.layers.{i}."
        if short.endswith("_exps"):
            proj = short[len("ffn_"):-len("_exps")] + "_proj"
            src[name] = [f"{p}mlp.experts.{e}.{proj}.weight" for e in range(cfg.n_expert)]
        else:
            src[name] = [f"{p}{simple[short]}.weight"]
    return src


@dataclass
class ClassReport:
    qtypes: set[str] = field(default_factory=set)
    params: int = 0
    nbytes: int = 0
    err2: float = 0.0
    ref2: float = 0.0


def convert_checkpoint(src_dir: Path, out: Path, preset: str = "f32", overrides: dict[str, str | None] | None = None,
                       force: bool = False, progress: bool = True) -> dict[str, ClassReport]:
    """Convert and return the per-class report (types, parameters, bytes, reconstruction error)."""
    ck = Checkpoint(src_dir)
    table = resolve(preset, overrides or {})
    meta = gguf_metadata(ck.config, str(src_dir / "config.json"))
    meta[Keys.General.NAME] = (str(ck.config.get("_name_or_path") or src_dir.name), GGUFValueType.STRING)
    meta[Keys.General.FILE_TYPE] = (FILE_TYPES[preset], GGUFValueType.UINT32)
    meta.update(_tokenizer_metadata(src_dir))
    cfg = ModelConfig.from_metadata({Keys.General.ARCHITECTURE: ARCH, **{k: v for k, (v, _) in meta.items()}},
                                    str(src_dir))
    sources = _hf_sources(cfg)
    used = {n for names in sources.values() for n in names}
    unknown = sorted(n for n in ck.names() if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        raise FormatError(f"{src_dir}: unknown tensor {unknown[0]} (not part of a DeepSeek-V2 model with this config)")
    report: dict[str, ClassReport] = {}
    plan = [_plan(ck, cfg, name, shape, sources[name], table, report)
            for name, shape in expected_shapes(cfg).items()]
    bar = _Progress(sum(t.nbytes for t in plan)) if progress else None
    try:
        write_gguf(out, meta, plan, force=force, on_chunk=bar.update if bar else None)
    finally:
        ck.close()
    if bar:
        bar.done()
    return report


def _tokenizer_metadata(src_dir: Path) -> dict:
    from .tokenizer_meta import tokenizer_metadata  # optional: checkpoints may ship no tokenizer
    meta = tokenizer_metadata(src_dir) or {}
    return {k: _typed(v) for k, v in meta.items()}


def _typed(v):
    if isinstance(v, bool):
        return v, GGUFValueType.BOOL
    if isinstance(v, int):
        return v, GGUFValueType.UINT32
    if isinstance(v, float):
        return v, GGUFValueType.FLOAT32
    if isinstance(v, str):
        return v, GGUFValueType.STRING
    if isinstance(v, list):
        sub = GGUFValueType.STRING if v and isinstance(v[0], str) else GGUFValueType.INT32
        return (v, sub), GGUFValueType.ARRAY
    raise FormatError(f"tokenizer metadata value of type {type(v).__name__} cannot be written")


def _plan(ck: Checkpoint, cfg: ModelConfig, name: str, shape: tuple[int, ...], hf_names: list[str],
          table: dict, report: dict[str, ClassReport]) -> PlannedTensor:
    for n in hf_names:
        ck.shape(n)  # raises FormatError naming a missing tensor before anything is written
    qtype = choose_type(name, shape, table)
    H, N, V, C = cfg.n_head, cfg.qk_nope, cfg.v_head, cfg.kv_lora_rank

    def load(hf_name: str, want: tuple[int, ...]) -> np.ndarray:
        a = ck.read(hf_name)
        if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            if a.shape != (H * (N + V), C):
                raise FormatError(f"{ck.dir}: tensor {hf_name} has shape {a.shape}, expected {(H * (N + V), C)}")
            kv = a.reshape(H, N + V, C)
            a = kv[:, :N, :].transpose(0, 2, 1) if "attn_k_b" in name else kv[:, N:, :]
        if a.shape != want:
            raise FormatError(f"{ck.dir}: tensor {hf_name} has shape {a.shape}, expected {want}")
        return np.ascontiguousarray(a)

    cls = tensor_class(name) or "norms+routers"
    rep = report.setdefault(cls, ClassReport())
    rep.qtypes.add(qtype.name)
    rep.params += int(np.prod(shape))

    def chunks() -> Iterator[np.ndarray]:
        part = shape[1:] if len(hf_names) > 1 else shape
        for n in hf_names:
            a = load(n, part)
            q = encode(a, qtype, tensor=name)
            if qtype != QT.F32:
                e2, r2 = relative_error(a, q, qtype)
                rep.err2 += e2
                rep.ref2 += r2
            rep.nbytes += q.nbytes
            yield q

    return PlannedTensor(name, shape, qtype, chunks)


class _Progress:
    """One status line on stderr: tensor, bytes done, rate, ETA."""

    def __init__(self, total: int) -> None:
        self.total, self.done_bytes, self.t0, self.last = total, 0, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, t: PlannedTensor, n: int) -> None:
        self.done_bytes += n
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 2.0) and self.done_bytes < self.total:
            return
        self.last = now
        el = now - self.t0
        rate = self.done_bytes / el if el > 0 else 0.0
        eta = (self.total - self.done_bytes) / rate if rate > 0 else 0.0
        line = (f"{t.name:<28} {self.done_bytes / 2**20:9.1f}/{self.total / 2**20:.1f} MiB "
                f"{rate / 2**20:7.1f} MiB/s  ETA {eta:5.0f}s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)
