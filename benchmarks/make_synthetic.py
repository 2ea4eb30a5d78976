"""A random-weight `deepseek2` GGUF with the real dimensions of DeepSeek-Coder-V2-Lite (default)
or DeepSeek-Coder-V2 (`--full`), and any number of layers: the input of `lite bench` and of the
kernel work when the real checkpoint is not at hand.

    python benchmarks/make_synthetic.py --layers 27 --preset q4_0 --out /tmp/lite-q4_0.gguf
    python benchmarks/make_synthetic.py --layers 4 --full --preset q8_0 --out /tmp/v2-4.gguf
    # llama.cpp's Q4_0 recipe (every matrix Q4_0 but the output, Q6_K): 1.44 GB read per token
    python benchmarks/make_synthetic.py --preset q4_0 --shared q4_0 --attn q4_0 --embed q4_0 \
        --output q6_k --out /tmp/lite-q4_0-all.gguf

Quantized blocks are written directly — random quants (and, for K-quants, random sub-block
scales) with fp16 scales chosen so that the weights have an RMS of about 0.03 (`WEIGHT_RMS`) —
never through float32, so a 27-layer Lite file (~9.5 GB at q4_0) is bound by the disk. Presets
q4_0, q8_0 and q4_k_m (Q4_K / Q6_K, with quant's fallbacks where a row is not whole
super-blocks). The bytes come from a pool of random data sliced at random offsets; scales vary
±25% block to block (and Q4_0's take a random sign, which centres its weights). Norms are F32
ones; routers are F32 Gaussian with logit std ≈ 2 on a normalised hidden state, so routing
varies from token to token. The
tensor layout is llama.cpp's current one (attn_k_b `[H, C, N]`, attn_v_b `[H, V, C]`); types per
tensor class come from quant's presets (overridden per class as `lite quantize` takes them);
metadata from quant's HF-config mapping.

`--vocab FILE` copies the `tokenizer.*` keys of a vocabulary GGUF (such as llama.cpp's
`ggml-vocab-deepseek-llm.gguf`, the 102400 tokens of Coder-V2), so that tools which insist on a
tokenizer — llama.cpp's `llama-bench` — run the same file, and text prompts tokenize.
`--tiny` shrinks every dimension (for tests): same code path, a file of a few MB.
Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT, Keys

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lite.errors import LiteError  # noqa: E402
from lite.gguf_meta import read_metadata  # noqa: E402
from lite.model.config import ARCH, ModelConfig  # noqa: E402
from lite.model.tensors import expected_shapes  # noqa: E402
from quant.convert import typed_value  # noqa: E402
from quant.gguf_out import PlannedTensor, write_gguf  # noqa: E402
from quant.hf_config import gguf_metadata  # noqa: E402
from quant.presets import CLASSES, choose_type, resolve  # noqa: E402

WEIGHT_RMS = 0.03
ROUTER_LOGIT_STD = 2.0
CHUNK_BYTES = 16 << 20
POOL_BYTES = 64 << 20
FILE_TYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15}

# Hugging Face config.json fields of the two real models (random weights, real shapes).
_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
LITE = {
    "model_type": "deepseek_v2", "hidden_size": 2048, "num_attention_heads": 16, "q_lora_rank": None,
    "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "vocab_size": 102400, "max_position_embeddings": 163840, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    "topk_method": "greedy", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": _YARN,
    "num_hidden_layers": 27,
}
FULL = {
    **LITE, "hidden_size": 5120, "num_attention_heads": 128, "q_lora_rank": 1536,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160,
    "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0,
    "num_hidden_layers": 60,
}
TINY = {
    **LITE, "hidden_size": 256, "num_attention_heads": 4, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32, "v_head_dim": 32, "vocab_size": 1024, "intermediate_size": 512,
    "moe_intermediate_size": 128, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "num_hidden_layers": 2,
}


def hf_config(layers: int | None, full: bool = False, tiny: bool = False) -> dict[str, Any]:
    hf = dict(TINY if tiny else FULL if full else LITE)
    if layers is not None:
        hf["num_hidden_layers"] = layers
    return hf


class BlockMaker:
    """Random ggml blocks straight from a pool of random bytes."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, POOL_BYTES, dtype=np.uint8)
        # ±25% around 1: multiplied by each type's base scale.
        self.jitter = self.rng.uniform(0.75, 1.25, 1 << 16).astype(np.float32)

    def _bytes(self, n: int) -> np.ndarray:
        """n random bytes (n ≤ POOL_BYTES): a pool slice at a random offset."""
        start = int(self.rng.integers(0, POOL_BYTES - n + 1))
        return self.pool[start:start + n]

    def _scales(self, n: int, base: float) -> np.ndarray:
        start = int(self.rng.integers(0, len(self.jitter)))
        j = np.resize(np.roll(self.jitter, -start), n)
        return (j * np.float32(base)).astype(np.float16)

    def blocks(self, qtype: QT, n_weights: int) -> np.ndarray:
        block, size = GGML_QUANT_SIZES[qtype]
        nb = n_weights // block
        out = np.empty((nb, size), np.uint8)
        flat = out.reshape(-1)
        done = 0
        while done < flat.size:                  # the pool is smaller than a big tensor piece
            n = min(flat.size - done, POOL_BYTES)
            flat[done:done + n] = self._bytes(n)
            done += n
        if qtype == QT.Q4_0:
            # (q - 8)·d with q uniform 0..15: RMS of (q - 8) is √21.5, but its mean is -0.5. With
            # d > 0 in every block each matrix would carry a common component along the all-ones
            # direction, which piles up layer after layer until every token routes to the same few
            # experts; a random sign per block cancels it.
            d = self._scales(nb, WEIGHT_RMS / 21.5 ** 0.5)
            d[self.rng.random(nb) < 0.5] *= -1
            out[:, :2] = d.view(np.uint8).reshape(nb, 2)
        elif qtype == QT.Q8_0:   # q uniform -128..127: RMS ≈ 73.9
            out[:, :2] = self._scales(nb, WEIGHT_RMS / 73.9).view(np.uint8).reshape(nb, 2)
        elif qtype == QT.Q4_K:
            # d·sc·q - dmin·mn with sc, mn uniform 0..63 (the random scale bytes) and q 0..15:
            # dmin = 7.5·d centres the weights, whose RMS is then ≈ 252.8·d.
            d = self._scales(nb, WEIGHT_RMS / 252.8)
            out[:, :2] = d.view(np.uint8).reshape(nb, 2)
            out[:, 2:4] = (d.astype(np.float32) * 7.5).astype(np.float16).view(np.uint8).reshape(nb, 2)
        elif qtype == QT.Q6_K:   # d·sc·(q - 32), sc int8 (RMS ≈ 73.9), q 0..63 (RMS of q - 32 ≈ 17.9)
            out[:, 208:210] = self._scales(nb, WEIGHT_RMS / (73.9 * 17.9)).view(np.uint8).reshape(nb, 2)
        else:
            raise ValueError(f"make_synthetic writes Q4_0 / Q8_0 / Q4_K / Q6_K blocks, not {qtype.name}")
        return out

    def router(self, rows: int, cols: int) -> np.ndarray:
        return (self.rng.standard_normal((rows, cols), dtype=np.float32)
                * np.float32(ROUTER_LOGIT_STD / cols ** 0.5))


def plan_tensors(cfg: ModelConfig, preset: str, seed: int = 0,
                 overrides: dict[str, str | None] | None = None) -> list[PlannedTensor]:
    table = resolve(preset, overrides or {})
    maker = BlockMaker(seed)
    plan = []
    for name, shape in expected_shapes(cfg, split_kv_b=True).items():
        qtype = choose_type(name, shape, table)
        plan.append(PlannedTensor(name, shape, qtype, _chunks(maker, name, shape, qtype)))
    return plan


def _chunks(maker: BlockMaker, name: str, shape: tuple[int, ...], qtype: QT) -> Callable[[], Iterator[np.ndarray]]:
    def gen() -> Iterator[np.ndarray]:
        if qtype == QT.F32:
            if len(shape) == 1:
                yield np.ones(shape, np.float32).view(np.uint8)
            else:        # the router
                yield maker.router(*shape).view(np.uint8)
            return
        cols = shape[-1]
        if len(shape) == 3:                       # one expert (or head) at a time
            for _ in range(shape[0]):
                yield maker.blocks(qtype, shape[1] * cols)
            return
        rows = shape[0]
        row_bytes = cols // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]
        step = max(1, CHUNK_BYTES // row_bytes)
        for r in range(0, rows, step):
            yield maker.blocks(qtype, min(step, rows - r) * cols)
    return gen


class _Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.t0 = self.last = time.perf_counter()

    def update(self, t: PlannedTensor, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.quiet or (now - self.last < 1.0 and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        print(f"\rmake_synthetic: {self.done / 2**30:6.2f} / {self.total / 2**30:.2f} GiB "
              f"({rate / 2**20:5.0f} MiB/s, {eta:4.0f} s left) {t.name:<32}", end="", file=sys.stderr, flush=True)


def vocab_metadata(path: str | Path, vocab_size: int) -> dict[str, tuple[Any, GGUFValueType]]:
    """The typed `tokenizer.*` key/values of the GGUF at `path`, which must list `vocab_size` tokens."""
    meta = {k: v for k, v in read_metadata(path).items() if k.startswith("tokenizer.")}
    n = len(meta.get("tokenizer.ggml.tokens", ()))
    if n != vocab_size:
        raise LiteError(f"{path}: tokenizer.ggml.tokens lists {n} tokens; the model's vocabulary has {vocab_size}")
    return {k: typed_value(v, k) for k, v in meta.items()}


def make_synthetic(out: str | Path, layers: int | None = None, full: bool = False, preset: str = "q4_0",
                   tiny: bool = False, seed: int = 0, force: bool = True, quiet: bool = False,
                   overrides: dict[str, str | None] | None = None, vocab: str | Path | None = None) -> Path:
    """Write the synthetic GGUF to `out` and return its path. `overrides`: tensor class → type,
    as `lite quantize --attn q4_0 …` takes them; `vocab`: a GGUF whose tokenizer to copy."""
    if preset not in FILE_TYPES:
        raise ValueError(f"preset must be one of {', '.join(FILE_TYPES)}, got {preset!r}")
    hf = hf_config(layers, full, tiny)
    if hf["num_hidden_layers"] < 1:
        raise ValueError("--layers must be at least 1")
    label = "tiny" if tiny else ("Coder-V2" if full else "Coder-V2-Lite")
    meta = gguf_metadata(hf, "synthetic")
    meta[Keys.General.NAME] = (f"synthetic {label} {hf['num_hidden_layers']}L {preset}", GGUFValueType.STRING)
    meta[Keys.General.FILE_TYPE] = (FILE_TYPES[preset], GGUFValueType.UINT32)
    meta[Keys.General.QUANTIZATION_VERSION] = (2, GGUFValueType.UINT32)
    meta["tokenizer.ggml.bos_token_id"] = (100000 if not tiny else 0, GGUFValueType.UINT32)
    meta["tokenizer.ggml.eos_token_id"] = (100001 if not tiny else 1, GGUFValueType.UINT32)
    if vocab is not None:
        meta.update(vocab_metadata(vocab, hf["vocab_size"]))
    cfg = ModelConfig.from_metadata({Keys.General.ARCHITECTURE: ARCH, **{k: v for k, (v, _) in meta.items()}},
                                    "synthetic")
    plan = plan_tensors(cfg, preset, seed, overrides)
    total = sum(t.nbytes for t in plan)
    bar = _Progress(total, quiet)
    t0 = time.perf_counter()
    if not quiet:
        print(f"make_synthetic: {label}, {cfg.n_layer} layers, {preset}, {len(plan)} tensors, "
              f"{total / 2**30:.2f} GiB -> {out}", file=sys.stderr)
    write_gguf(Path(out), meta, plan, force=force, on_chunk=bar.update)
    if not quiet:
        print(f"\nmake_synthetic: wrote {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return Path(out)


def validate(path: Path, backend: str | None = None, n_tokens: int = 4) -> np.ndarray:
    """Load with lite and run a short forward; raises unless the logits are finite."""
    import lite
    m = lite.load(path, backend=backend, n_ctx=64)
    ids = np.random.default_rng(1).integers(0, m.config.vocab_size, n_tokens)
    logits = m.logits(ids)
    if not np.all(np.isfinite(logits)):
        raise RuntimeError(f"{path}: the forward pass gave non-finite logits")
    return logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="layer count (default: the real model's, 27 / 60)")
    ap.add_argument("--full", action="store_true", help="DeepSeek-Coder-V2 dims instead of -Lite")
    ap.add_argument("--tiny", action="store_true", help="tiny dims (tests)")
    ap.add_argument("--preset", default="q4_0", choices=sorted(FILE_TYPES))
    for cls in CLASSES:
        ap.add_argument(f"--{cls}", metavar="TYPE", help=f"override the preset's type of the {cls} tensors")
    ap.add_argument("--vocab", type=Path, help="copy the tokenizer of this vocabulary GGUF")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--no-validate", action="store_true", help="skip loading the file and one forward")
    args = ap.parse_args(argv)
    path = make_synthetic(args.out, args.layers, args.full, args.preset, args.tiny, args.seed,
                          overrides={cls: getattr(args, cls) for cls in CLASSES}, vocab=args.vocab)
    if not args.no_validate:
        t0 = time.perf_counter()
        logits = validate(path)
        print(f"make_synthetic: validated: lite.load + 4-token forward in {time.perf_counter() - t0:.1f} s, "
              f"logits finite, std {logits.std():.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
