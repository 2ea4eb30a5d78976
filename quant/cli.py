"""`lite quantize SRC OUT.gguf [--preset …] [--experts TYPE …]` (arguments parsed by lite.cli).

SRC is a Hugging Face checkpoint directory or a GGUF file (F32/F16/BF16/Q8_0 tensors). The
report goes to stdout, progress and the final "wrote" line to stderr."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from .convert import ClassReport, convert
from .presets import CLASSES

CLASS_ORDER = ("experts", "shared", "attn", "embed", "output", "norms+routers")


def run(args: argparse.Namespace) -> int:
    overrides = {cls: getattr(args, cls, None) for cls in CLASSES}
    report = convert(args.src, args.out, args.preset, overrides, force=args.force, progress=True)
    print_report(report, args.out)
    return 0


def print_report(report: dict[str, ClassReport], out: Path, file: TextIO | None = None) -> None:
    """Per tensor class: block types, parameters, bytes, bits per weight and the relative
    reconstruction error RMS(dequantized − original) / RMS(original)."""
    file = file or sys.stdout
    total_params = sum(r.params for r in report.values())
    total_bytes = sum(r.nbytes for r in report.values())
    print(f"{'class':<14} {'types':<16} {'params':>15} {'MiB':>10} {'bits/w':>7} {'rel.err':>9}", file=file)
    for cls in sorted(report, key=lambda c: CLASS_ORDER.index(c) if c in CLASS_ORDER else len(CLASS_ORDER)):
        r = report[cls]
        print(f"{cls:<14} {','.join(sorted(r.qtypes)):<16} {r.params:>15,} {r.nbytes / 2**20:>10.2f} "
              f"{r.bits_per_weight:>7.3f} {r.rel_error:>9.2e}", file=file)
    bpw = 8 * total_bytes / total_params if total_params else 0.0
    print(f"{'tensors':<14} {'':<16} {total_params:>15,} {total_bytes / 2**20:>10.2f} {bpw:>7.3f}", file=file)
    size = Path(out).stat().st_size
    print(f"{'file':<14} {'':<16} {'':>15} {size / 2**20:>10.2f} {8 * size / total_params if total_params else 0:>7.3f}",
          file=file)
    print(f"wrote {out} ({size:,} bytes)", file=sys.stderr)
