"""The `lite` command. Subcommands that need `quant` or `tui` import them lazily."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import LiteError

# Tensor classes a quantization preset assigns types to (kept in step with quant.presets.CLASSES).
QUANT_CLASSES = ("experts", "shared", "attn", "embed", "output")


def _info(args: argparse.Namespace) -> int:
    from .weights.gguf_file import open_model_file
    mf = open_model_file(args.model)
    c = mf.config
    print(f"file          {mf.path} ({mf.file_size / 2**30:.2f} GiB)")
    print("architecture  deepseek2 (DeepSeek-V2 / DeepSeek-Coder-V2), "
          f"tensor layout: {'attn_k_b/attn_v_b' if mf.split_kv_b else 'attn_kv_b (legacy)'}")
    for k, v in vars(c).items():
        print(f"{k:<22}{v}")
    print(f"{'softmax_scale':<22}{c.softmax_scale:.6g}")
    by_type: Counter[str] = Counter()
    count: Counter[str] = Counter()
    params: Counter[str] = Counter()
    for t in mf.tensors.values():
        by_type[t.qtype.name] += t.nbytes
        count[t.qtype.name] += 1
        params[t.qtype.name] += int(np.prod(t.shape))
    print(f"\n{'type':<6} {'tensors':>8} {'params':>16} {'MiB':>10} {'bits/w':>7}")
    for name in sorted(by_type, key=lambda n: -by_type[n]):
        print(f"{name:<6} {count[name]:>8} {params[name]:>16,} {by_type[name] / 2**20:>10.2f} "
              f"{8 * by_type[name] / params[name]:>7.3f}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from quant.cli import run
    return run(args)


def _run(args: argparse.Namespace) -> int:
    from . import load
    m = load(args.model, backend=args.backend)
    ids = [int(t) for t in args.ids.split(",")]
    g = m.generate(ids, max_tokens=args.max_tokens)
    print(",".join(str(t) for t in g.token_ids))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lite", description="Run DeepSeek-Coder-V2 GGUF models locally.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="print a GGUF model's architecture, hyperparameters and tensor types")
    s.add_argument("model")
    s.set_defaults(func=_info)
    s = sub.add_parser("quantize", help="convert a Hugging Face checkpoint to GGUF")
    s.add_argument("src", type=Path, help="Hugging Face checkpoint directory")
    s.add_argument("out", type=Path, help="output GGUF file")
    s.add_argument("--preset", default="q4_0", help="f32, f16, bf16, q8_0, q4_0, q4_k_m (default q4_0)")
    for cls in QUANT_CLASSES:
        s.add_argument(f"--{cls}", metavar="TYPE", help=f"override the type of the {cls} tensors")
    s.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    s.set_defaults(func=_quantize)
    s = sub.add_parser("run", help="generate a greedy continuation of token ids")
    s.add_argument("model")
    s.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    s.add_argument("-n", "--max-tokens", type=int, default=16)
    s.add_argument("--backend", default=None)
    s.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LiteError as e:
        print(f"lite: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"lite: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
