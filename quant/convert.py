"""A Hugging Face DeepSeek-V2 checkpoint, or a `deepseek2` GGUF, → GGUF in llama.cpp's current
layout: experts stacked into 3-D `ffn_*_exps` `[E, rows, cols]`, `kv_b_proj` (or a legacy
`attn_kv_b` `[H·(N+V), C]`) split into `attn_k_b` `[H, C, N]` and `attn_v_b` `[H, V, C]`.

Tensors are read, quantized and written one piece at a time — an expert at a time for `*_exps`,
row chunks of at most `PIECE_ELEMENTS` weights for large 2-D tensors (embeddings, output) — so
peak memory is a few pieces whatever the model's size. Only scalars are kept for the report."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGUFValueType
from gguf.constants import GGMLQuantizationType as QT, Keys

from lite import FormatError, LiteError, UnsupportedError
from lite.kernels.dequant import dequantize
from lite.model.config import ARCH, ModelConfig
from lite.model.tensors import expected_shapes, is_expert_tensor

from .checkpoint import Checkpoint
from .encode import encode, relative_error
from .gguf_out import PlannedTensor, write_gguf
from .hf_config import gguf_metadata
from .presets import choose_type, resolve, tensor_class

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "bf16": 32}
# Largest piece quantized at once (float32 weights): 4 Mi weights = 16 MiB.
PIECE_ELEMENTS = 1 << 22
# Block types a GGUF source may hold to be re-quantized (lossless or near-lossless); tensors of
# other types lite reads (Q4_0, Q4_K, Q6_K) can only be exported to F32.
GGUF_INPUT_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0)
# Keys never copied from a GGUF source (the writer sets them, or they describe the old file).
_NOT_COPIED = {Keys.General.ARCHITECTURE, Keys.General.ALIGNMENT, Keys.General.FILE_TYPE,
               Keys.General.QUANTIZATION_VERSION}

Meta = dict[str, tuple[Any, GGUFValueType]]


@dataclass
class ClassReport:
    qtypes: set[str] = field(default_factory=set)
    params: int = 0
    nbytes: int = 0
    err2: float = 0.0
    ref2: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.params if self.params else 0.0

    @property
    def rel_error(self) -> float:
        """RMS reconstruction error / RMS weight over the whole class."""
        return (self.err2 / self.ref2) ** 0.5 if self.ref2 else 0.0


# --- sources: float32 pieces of each output tensor, in row-major order -------------------------

def _row_chunks(n_rows: int, row_len: int) -> Iterator[tuple[int, int]]:
    step = max(1, PIECE_ELEMENTS // max(1, row_len))
    for r in range(0, n_rows, step):
        yield r, min(n_rows, r + step)


def _split_kv_b(a: np.ndarray, cfg: ModelConfig, want_k: bool, where: str) -> np.ndarray:
    """`kv_b` `[H·(N+V), C]` → `attn_k_b` `[H, C, N]` (transposed per head) or `attn_v_b` `[H, V, C]`."""
    H, N, V, C = cfg.n_head, cfg.qk_nope, cfg.v_head, cfg.kv_lora_rank
    if a.shape != (H * (N + V), C):
        raise FormatError(f"{where} has shape {a.shape}, expected {(H * (N + V), C)}")
    kv = a.reshape(H, N + V, C)
    return np.ascontiguousarray(kv[:, :N, :].transpose(0, 2, 1) if want_k else kv[:, N:, :])


class HFSource:
    """A Hugging Face checkpoint directory."""

    def __init__(self, src_dir: Path) -> None:
        self.path = src_dir
        self.ck = Checkpoint(src_dir)
        meta = gguf_metadata(self.ck.config, str(src_dir / "config.json"))
        meta[Keys.General.NAME] = (str(self.ck.config.get("_name_or_path") or src_dir.name), GGUFValueType.STRING)
        meta.update(_tokenizer_metadata(src_dir))
        self.meta: Meta = meta
        self.cfg = ModelConfig.from_metadata({Keys.General.ARCHITECTURE: ARCH, **{k: v for k, (v, _) in meta.items()}},
                                             str(src_dir))
        self.sources = _hf_sources(self.cfg)
        used = {n for names in self.sources.values() for n in names}
        unknown = sorted(n for n in self.ck.names() if n not in used and not n.endswith(IGNORED_SUFFIXES))
        if unknown:
            raise FormatError(f"{src_dir}: unknown tensor {unknown[0]} (not part of a DeepSeek-V2 model with this config)")

    def check(self, name: str, shape: tuple[int, ...], qtype: QT) -> None:
        """Raise, naming the tensor, before anything is written."""
        names = self.sources[name]
        for n in names:
            self.ck.shape(n)
        if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            return  # checked when split
        want = shape[1:] if len(names) > 1 else shape
        for n in names:
            if self.ck.shape(n) != want:
                raise FormatError(f"{self.path}: tensor {n} has shape {self.ck.shape(n)}, expected {want}")

    def pieces(self, name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        names = self.sources[name]
        if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            yield _split_kv_b(self.ck.read(names[0]), self.cfg, "attn_k_b" in name, f"{self.path}: tensor {names[0]}")
        elif len(names) > 1:           # experts: one expert at a time
            for n in names:
                yield self.ck.read(n)
        elif len(shape) == 1:
            yield self.ck.read(names[0])
        else:
            for r0, r1 in _row_chunks(shape[0], int(np.prod(shape[1:]))):
                yield self.ck.read_rows(names[0], r0, r1)

    def close(self) -> None:
        self.ck.close()


class GGUFSource:
    """A `deepseek2` GGUF (either kv_b layout), validated by lite's loader. F32/F16/BF16/Q8_0
    tensors can be re-quantized to any type; other types lite reads only exported to F32. Data is
    read with `pread`, not through the loader's map, whose touched pages would stay resident."""

    def __init__(self, path: Path) -> None:
        from lite.weights.gguf_file import open_model_file
        self.path = path
        self.mf = open_model_file(path)
        self.cfg = self.mf.config
        self.meta: Meta = {k: typed_value(v, k) for k, v in self.mf.meta.items() if k not in _NOT_COPIED}
        self.fd = os.open(path, os.O_RDONLY)

    def check(self, name: str, shape: tuple[int, ...], qtype: QT) -> None:
        """open_model_file validated every tensor against the metadata; here: a tensor already in a
        4-bit/6-bit block type may only be dequantized (to F32), never quantized a second time."""
        if name.endswith(("attn_k_b.weight", "attn_v_b.weight")) and not self.mf.split_kv_b:
            name = name.rsplit(".", 2)[0] + ".attn_kv_b.weight"
        t = self.mf.tensors[name]
        if t.qtype not in GGUF_INPUT_TYPES and qtype != QT.F32:
            raise UnsupportedError(f"{self.path}: tensor {name} is {t.qtype.name}; re-quantizing reads "
                                   f"{', '.join(q.name for q in GGUF_INPUT_TYPES)} tensors (any type can be "
                                   f"exported to --preset f32); start from a float/Q8_0 file or the HF checkpoint")

    def _read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows start:stop of a tensor's first axis (all of it by default), dequantized to float32."""
        t = self.mf.tensors[name]
        byte_shape = t.data.shape          # (*shape[:-1], row_bytes)
        n_rows = byte_shape[0] if len(byte_shape) > 1 else 1
        start, stop = start or 0, n_rows if stop is None else stop
        row_bytes = int(np.prod(byte_shape[1:], dtype=np.int64)) if len(byte_shape) > 1 else byte_shape[0]
        raw = np.empty(((stop - start) * row_bytes,), np.uint8)
        if os.preadv(self.fd, [memoryview(raw)], self.mf.data_offsets[name] + start * row_bytes) != raw.size:
            raise FormatError(f"{self.path}: tensor {name} lies beyond the end of the file (truncated?)")
        a = dequantize(raw.reshape((stop - start, *byte_shape[1:]) if len(byte_shape) > 1 else byte_shape), t.qtype)
        if not np.isfinite(a).all():
            raise FormatError(f"{self.path}: tensor {name} contains NaN or Inf")
        return a

    def pieces(self, name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        if name.endswith(("attn_k_b.weight", "attn_v_b.weight")) and not self.mf.split_kv_b:
            legacy = name.rsplit(".", 2)[0] + ".attn_kv_b.weight"
            yield _split_kv_b(self._read(legacy), self.cfg, "attn_k_b" in name, f"{self.path}: tensor {legacy}")
        elif is_expert_tensor(name):
            for e in range(shape[0]):
                yield self._read(name, e, e + 1)[0]
        elif len(shape) == 1:
            yield self._read(name)
        else:
            for r0, r1 in _row_chunks(shape[0], int(np.prod(shape[1:]))):
                yield self._read(name, r0, r1)

    def close(self) -> None:
        os.close(self.fd)


def _hf_sources(cfg: ModelConfig) -> dict[str, list[str]]:
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


def _tokenizer_metadata(src_dir: Path) -> Meta:
    from .tokenizer_meta import tokenizer_metadata  # optional: checkpoints may ship no tokenizer
    meta = tokenizer_metadata(src_dir) or {}
    return {k: typed_value(v, k) for k, v in meta.items()}


def typed_value(v: Any, key: str = "") -> tuple[Any, GGUFValueType]:
    """A plain metadata value with the GGUF type llama.cpp's converter gives it."""
    if isinstance(v, bool):
        return v, GGUFValueType.BOOL
    if isinstance(v, int):
        if 0 <= v < 2**32:
            return v, GGUFValueType.UINT32
        return v, (GGUFValueType.INT32 if -2**31 <= v < 0 else GGUFValueType.INT64)
    if isinstance(v, float):
        return v, GGUFValueType.FLOAT32
    if isinstance(v, str):
        return v, GGUFValueType.STRING
    if isinstance(v, (list, tuple)):
        v = list(v)
        if v and all(isinstance(x, str) for x in v):
            sub = GGUFValueType.STRING
        elif v and all(isinstance(x, bool) for x in v):
            sub = GGUFValueType.BOOL
        elif any(isinstance(x, float) for x in v):
            sub = GGUFValueType.FLOAT32
        else:
            sub = GGUFValueType.INT32   # token types and other id lists
        return (v, sub), GGUFValueType.ARRAY
    raise FormatError(f"metadata {key or 'value'} of type {type(v).__name__} cannot be written")


# --- conversion ---------------------------------------------------------------------------------

def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def convert(src: Path, out: Path, preset: str = "f32", overrides: dict[str, str | None] | None = None,
            force: bool = False, progress: bool = True) -> dict[str, ClassReport]:
    """Convert SRC (HF checkpoint directory or GGUF file) and return the per-class report
    (types, parameters, bytes, reconstruction error)."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise LiteError(f"{src}: no such checkpoint directory or GGUF file")
    if src.is_file() and not is_gguf(src):
        raise FormatError(f"{src}: not a GGUF file (bad magic number) nor a checkpoint directory")
    if src.is_file() and out.exists() and src.resolve() == out.resolve():
        raise LiteError(f"{out}: the output would overwrite the input")
    table = resolve(preset, overrides or {})
    source: HFSource | GGUFSource = GGUFSource(src) if src.is_file() else HFSource(src)
    try:
        meta = dict(source.meta)
        meta[Keys.General.FILE_TYPE] = (FILE_TYPES[preset], GGUFValueType.UINT32)
        meta[Keys.General.QUANTIZATION_VERSION] = (2, GGUFValueType.UINT32)
        meta = dict(sorted(meta.items()))   # one order whatever the source: same input, same bytes
        report: dict[str, ClassReport] = {}
        plan = []
        for name, shape in expected_shapes(source.cfg).items():
            source.check(name, shape, choose_type(name, shape, table))
            plan.append(_plan(source, name, shape, table, report))
        bar = _Progress(sum(t.nbytes for t in plan)) if progress else None
        write_gguf(out, meta, plan, force=force, on_chunk=bar.update if bar else None)
        if bar:
            bar.done()
    finally:
        source.close()
    return report


def convert_checkpoint(src_dir: Path, out: Path, preset: str = "f32", overrides: dict[str, str | None] | None = None,
                       force: bool = False, progress: bool = True) -> dict[str, ClassReport]:
    """Kept for callers of the HF-only entry point; `convert` takes a GGUF file too."""
    return convert(src_dir, out, preset, overrides, force=force, progress=progress)


def _plan(source: HFSource | GGUFSource, name: str, shape: tuple[int, ...], table: dict,
          report: dict[str, ClassReport]) -> PlannedTensor:
    qtype = choose_type(name, shape, table)
    cls = tensor_class(name) or "norms+routers"
    rep = report.setdefault(cls, ClassReport())
    rep.qtypes.add(qtype.name)
    rep.params += int(np.prod(shape))

    def chunks() -> Iterator[np.ndarray]:
        for a in source.pieces(name, shape):
            q = encode(a, qtype, tensor=name)
            if qtype != QT.F32:
                e2, r2 = relative_error(a, q, qtype)
                rep.err2 += e2
                rep.ref2 += r2
            rep.nbytes += q.nbytes
            del a
            yield q

    return PlannedTensor(name, shape, qtype, chunks)


class _Progress:
    """One status line on stderr: tensor, bytes written of the total, rate, ETA."""

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

