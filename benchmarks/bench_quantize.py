"""Quantizer benchmark: peak memory and throughput of `lite quantize` on synthetic checkpoints of
the real DeepSeek-Coder-V2-Lite dimensions (benchmarks/make_synthetic_hf.py), at several layer
counts and presets. Memory must not grow with the model: the converter streams tensor pieces.

    python benchmarks/bench_quantize.py --layers 2 8 --presets q4_0 q8_0
    python benchmarks/bench_quantize.py --layers 2 --presets q4_k_m

Each run is a fresh child process (`python -m lite.cli quantize SRC OUT --preset P`); its peak
RSS comes from `os.wait4` (the child's own rusage, not the maximum over earlier children).
Checkpoints and outputs go under --work (default: a temporary directory) and are deleted
afterwards unless --keep. Prints one line per run and the quantizer's report.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def quantize(src: Path, out: Path, preset: str) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of one `lite quantize` child."""
    cmd = [sys.executable, "-m", "lite.cli", "quantize", str(src), str(out), "--preset", preset, "--force"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=se)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        dt = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    if p.returncode:
        raise SystemExit(f"quantize failed ({p.returncode}):\n{stderr[-2000:]}")
    return dt, usage.ru_maxrss * 1024, stdout


def params_of(report: str) -> int:
    for line in report.splitlines():
        if line.startswith("tensors"):
            return int(line.split()[1].replace(",", ""))
    raise SystemExit("no 'tensors' line in the quantize report")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--presets", nargs="+", default=["q4_0", "q8_0"])
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    ap.add_argument("--quiet", action="store_true", help="do not print the per-class reports")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lite-bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    print(f"scratch {work} ({free / 2**30:.1f} GiB free), python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs", flush=True)
    rows = []
    try:
        for n in args.layers:
            src = work / f"synth-{n}"
            if not (src / "model.safetensors.index.json").exists():
                subprocess.run([sys.executable, str(HERE / "make_synthetic_hf.py"), "--layers", str(n),
                                "--out", str(src)], check=True, stderr=subprocess.DEVNULL)
            src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            for preset in args.presets:
                out = work / f"synth-{n}-{preset}.gguf"
                dt, rss, report = quantize(src, out, preset)
                params = params_of(report)
                size = out.stat().st_size
                rows.append((n, preset, params, src_bytes, size, dt, rss))
                print(f"layers {n:2d}  {preset:<7} {params / 1e6:8.1f} M params  in {src_bytes / 2**30:5.2f} GiB "
                      f"-> out {size / 2**30:5.2f} GiB  {dt:7.1f} s  {params / dt / 1e6:6.1f} M params/s  "
                      f"peak RSS {rss / 2**20:7.0f} MiB", flush=True)
                if not args.quiet:
                    print("    " + report.rstrip().replace("\n", "\n    "), flush=True)
                if not args.keep:
                    out.unlink()
            if not args.keep:
                shutil.rmtree(src)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    by_preset: dict[str, list[tuple]] = {}
    for r in rows:
        by_preset.setdefault(r[1], []).append(r)
    for preset, rs in by_preset.items():
        if len(rs) > 1:
            lo, hi = min(rs, key=lambda r: r[0]), max(rs, key=lambda r: r[0])
            print(f"{preset}: peak RSS {lo[0]} layers {lo[6] / 2**20:.0f} MiB, {hi[0]} layers {hi[6] / 2**20:.0f} MiB "
                  f"({100 * (hi[6] / lo[6] - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
