"""The `lite` command. Subcommands that need `quant` or `tui` import them lazily."""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import LiteError

# Tensor classes a quantization preset assigns types to (kept in step with quant.presets.CLASSES).
QUANT_CLASSES = ("experts", "shared", "attn", "embed", "output")
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_PRESET = "q8_0"


def demo_model_path() -> Path:
    """The bundled demo model as GGUF, converted from `lite/demo/` with `lite quantize` on first use
    into the user's cache directory (XDG)."""
    if not (DEMO_DIR / "config.json").is_file():
        raise LiteError(f"the bundled demo model is missing ({DEMO_DIR}); pass a MODEL path")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lite"
    stamp = int((DEMO_DIR / "model.safetensors").stat().st_mtime)
    out = cache / f"demo-{DEMO_PRESET}-{stamp}.gguf"
    if not out.is_file():
        from quant.convert import convert_checkpoint
        cache.mkdir(parents=True, exist_ok=True)
        print(f"lite: converting the bundled demo model to {out}", file=sys.stderr)
        convert_checkpoint(DEMO_DIR, out, DEMO_PRESET, progress=True)
    return out


def _model_arg(args: argparse.Namespace) -> Path:
    return Path(args.model) if args.model else demo_model_path()


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


def _sampling(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}


def _run(args: argparse.Namespace) -> int:
    from . import load
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    m = load(_model_arg(args), backend=args.backend, ram_budget=args.ram_budget, n_ctx=args.ctx,
             vram_budget=args.vram_budget)
    if args.chat:
        stream = m.chat([{"role": "user", "content": prompt}], args.max_tokens, stream=True, **_sampling(args))
    else:
        stream = m.stream(prompt, args.max_tokens, **_sampling(args))
    for piece in stream:
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = stream.result
    print(f"[{r.finish_reason}; {r.prompt_tokens} prompt tokens at {r.timings['prompt_tok_s']:.1f} tok/s, "
          f"{r.completion_tokens} generated at {r.timings['decode_tok_s']:.1f} tok/s]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    import tui
    return tui.main(str(_model_arg(args)), backend=args.backend, ram_budget=args.ram_budget,
                    vram_budget=args.vram_budget,
                    temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, n_ctx=args.ctx,
                    seed=args.seed)


def _serve(args: argparse.Namespace) -> int:
    from .server import serve
    serve(str(_model_arg(args)), host=args.host, port=args.port, backend=args.backend, n_ctx=args.ctx,
          ram_budget=args.ram_budget, vram_budget=args.vram_budget, model_id=args.model_id, api_key=args.api_key,
          log_level=args.log_level)
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    from .perplexity import run
    run(str(_model_arg(args)), args.text, args.ctx, args.backend, args.stride, args.chunks)
    return 0


def _add_load_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--backend", default=None, help="reference, numba, c or cuda (default: best available)")
    s.add_argument("--ram-budget", default=None, help="RAM for weights, e.g. 6GB (default: no limit)")
    s.add_argument("--vram-budget", default=None,
                   help="GPU memory for weights with the cuda backend, e.g. 6GB (default: what is free)")
    s.add_argument("--ctx", type=int, default=None, help="context length (default: the model's, capped at 4096)")


def _add_sampling_flags(s: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    s.add_argument("-n", "--max-tokens", type=int, default=max_tokens)
    s.add_argument("--temperature", type=float, default=temperature)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lite", description="Run DeepSeek-Coder-V2 GGUF models locally.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("chat", help="terminal chat UI (the bundled demo model when MODEL is omitted)")
    s.add_argument("model", nargs="?")
    _add_load_flags(s)
    _add_sampling_flags(s, 512, 0.3)
    s.set_defaults(func=_chat)

    s = sub.add_parser("run", help="complete a prompt, streaming to stdout")
    s.add_argument("model", nargs="?")
    s.add_argument("-p", "--prompt", required=True, help="prompt text, or - to read stdin")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_load_flags(s)
    _add_sampling_flags(s, 256, 0.0)
    s.set_defaults(func=_run)

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    s.add_argument("model", nargs="?")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--model-id", default=None, help="model name reported by /v1/models (default: the file's stem)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_load_flags(s)
    s.set_defaults(func=_serve)

    s = sub.add_parser("bench", help="prefill/decode speed, load time, peak RSS, the decode roofline "
                                     "and expert-pager statistics")
    from . import bench
    bench.add_arguments(s)
    s.set_defaults(func=bench.main)

    s = sub.add_parser("perplexity", help="perplexity of a model on a text file")
    s.add_argument("model", nargs="?")
    s.add_argument("--file", dest="text", required=True, help="text file to score")
    s.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    s.add_argument("--stride", type=int, default=None)
    s.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    s.add_argument("--backend", default=None)
    s.set_defaults(func=_perplexity)

    s = sub.add_parser("info", help="print a GGUF model's architecture, hyperparameters and tensor types")
    s.add_argument("model")
    s.set_defaults(func=_info)

    s = sub.add_parser("quantize", help="convert a Hugging Face checkpoint or GGUF to GGUF")
    s.add_argument("src", type=Path, help="Hugging Face checkpoint directory or GGUF file "
                                          "(F32/F16/BF16/Q8_0; other types only to --preset f32)")
    s.add_argument("out", type=Path, help="output GGUF file")
    s.add_argument("--preset", default="q4_0", help="f32, f16, bf16, q8_0, q4_0, q4_k_m (default q4_0)")
    for cls in QUANT_CLASSES:
        s.add_argument(f"--{cls}", metavar="TYPE", help=f"override the type of the {cls} tensors")
    s.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    s.set_defaults(func=_quantize)
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
