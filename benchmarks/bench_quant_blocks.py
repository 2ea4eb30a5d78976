"""Throughput of the block quantizers in `quant.blocks` (million weights per second).

Quantizes one synthetic expert-sized matrix (default 1408×2048: one DeepSeek-Coder-V2-Lite
`ffn_gate_exps` slice, rows of 2048 so the K-quants apply) with every supported type. Each type
runs once to warm up (numba compile / cache load), then `--repeats` timed runs; the median is
reported, with the relative reconstruction error. Table on stdout, progress on stderr.

    python benchmarks/bench_quant_blocks.py [--rows 1408] [--cols 2048] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gguf import GGMLQuantizationType as QT  # noqa: E402

from quant import blocks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1408)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    a = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    n = a.size
    import numba

    print(f"matrix {args.rows}x{args.cols} float32, numba threads {numba.get_num_threads()}, "
          f"median of {args.repeats}", file=sys.stderr)
    results = []
    for qt in blocks.SUPPORTED_TYPES:
        t0 = time.perf_counter()
        q = blocks.quantize(a, qt)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            q = blocks.quantize(a, qt)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        err = blocks.rel_error(a, q, qt)
        results.append((qt.name, blocks.bits_per_weight(qt), med, n / med / 1e6, err))
        print(f"  {qt.name}: warm-up {warm:.2f}s, median {med * 1e3:.1f} ms", file=sys.stderr)

    print(f"{'type':<6} {'bits/w':>7} {'median ms':>10} {'Mweights/s':>11} {'rel err':>9}")
    for name, bpw, med, mws, err in results:
        print(f"{name:<6} {bpw:>7.4f} {med * 1e3:>10.1f} {mws:>11.1f} {err:>9.5f}")


if __name__ == "__main__":
    main()
