"""Quantization quality on the bundled demo model (learned weights): `lite quantize` the demo
checkpoint at each preset and measure `lite perplexity` on the held-out standard-library files
the model never saw (lite/demo/heldout.txt). Prints perplexity, its increase over F32, file
size and bits per weight.

    python benchmarks/bench_quality.py [--presets f32 q8_0 q4_0 q4_k_m q4_0+experts=q4_k] [--ctx 512]

A preset may carry per-class overrides after `+` (`q4_k_m+embed=q8_0,output=q8_0`), to tell
which tensor class a difference comes from.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import sysconfig
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lite.perplexity import run as perplexity_run  # noqa: E402
from quant.convert import convert  # noqa: E402

DEMO = ROOT / "lite" / "demo"


def heldout_text(dest: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = [n for n in (DEMO / "heldout.txt").read_text().split() if n]
    dest.write_text("\n\n".join((stdlib / n).read_text(encoding="utf-8", errors="replace") for n in names))
    return dest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["f32", "q8_0", "q4_0", "q4_k_m"])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = heldout_text(Path(tmp) / "heldout.py")
        for preset in args.presets:
            name, _, extra = preset.partition("+")
            overrides = dict(kv.split("=", 1) for kv in extra.split(",") if kv)
            out = Path(tmp) / f"demo-{preset.replace('+', '_').replace(',', '_')}.gguf"
            with redirect_stdout(io.StringIO()):      # the per-class report; the table below says enough
                convert(DEMO, out, name, overrides, progress=False)
            print(f"{preset}: measuring perplexity", file=sys.stderr)
            with redirect_stdout(io.StringIO()):
                r = perplexity_run(out, text, ctx=args.ctx, backend=args.backend)
            rows.append((preset, r["perplexity"], r["n_tokens"], os.path.getsize(out)))
    base = dict((p, ppl) for p, ppl, _, _ in rows).get("f32")
    print(f"held-out files: {len((DEMO / 'heldout.txt').read_text().split())}, {rows[0][2]} tokens scored, ctx {args.ctx}")
    width = max(8, *(len(p) for p, *_ in rows))
    print(f"{'preset':<{width}} {'perplexity':>10} {'vs f32':>8} {'file MiB':>9}")
    for preset, ppl, _, size in rows:
        delta = f"{(ppl / base - 1):+.2%}" if base else "n/a"
        print(f"{preset:<{width}} {ppl:>10.4f} {delta:>8} {size / 2**20:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
