"""`lite quantize SRC OUT.gguf [--preset …] [--experts TYPE …]` (arguments parsed by lite.cli)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .convert import ClassReport, convert_checkpoint
from .presets import CLASSES


def run(args: argparse.Namespace) -> int:
    overrides = {cls: getattr(args, cls) for cls in CLASSES}
    report = convert_checkpoint(args.src, args.out, args.preset, overrides, force=args.force,
                                progress=True)
    print_report(report, args.out)
    return 0


def print_report(report: dict[str, ClassReport], out: Path) -> None:
    total_params = sum(r.params for r in report.values())
    total_bytes = sum(r.nbytes for r in report.values())
    print(f"{'class':<14} {'types':<14} {'params':>14} {'MiB':>10} {'bits/w':>7} {'rel.err':>9}")
    for cls, r in sorted(report.items()):
        err = (r.err2 / r.ref2) ** 0.5 if r.ref2 else 0.0
        bpw = 8 * r.nbytes / r.params if r.params else 0.0
        print(f"{cls:<14} {','.join(sorted(r.qtypes)):<14} {r.params:>14,} {r.nbytes / 2**20:>10.2f} "
              f"{bpw:>7.3f} {err:>9.2e}")
    size = out.stat().st_size
    print(f"{'total':<14} {'':<14} {total_params:>14,} {size / 2**20:>10.2f} {8 * total_bytes / total_params:>7.3f}")
    print(f"wrote {out} ({size:,} bytes)", file=sys.stderr)
