"""Kernel benchmark for the C backend on Coder-V2-Lite-sized matrices.

Decode (T=1): matvec GB/s of weight bytes streamed; prefill (T=256): GFLOP/s (2·T·N·cols).
Median of 5 runs after a warm-up. Each decode measurement cycles through enough copies of the
matrix (≥ 256 MB in all) that the weights come from RAM, not cache. Also a bandwidth probe:
numpy copy and sum of a 1 GB buffer.

    python benchmarks/bench_kernels.py [--threads N] [--isa scalar|avx2|avx512|avx512vbmi] [--types Q4_0,Q8_0]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import gguf.quants as gq

from lite.kernels.base import QTensor, QType
from lite.kernels.c import ISA_NAMES, CBackend

SHAPES = [("expert gate/up", 1408, 2048), ("expert down", 2048, 1408), ("attn q", 3072, 2048),
          ("attn out", 2048, 2048)]
TYPES = {"Q4_0": QType.Q4_0, "Q8_0": QType.Q8_0, "Q4_K": QType.Q4_K, "Q6_K": QType.Q6_K,
         "F16": QType.F16, "BF16": QType.BF16, "F32": QType.F32}
BLOCK = {QType.Q4_K: 144, QType.Q6_K: 210}


def weight(qtype: QType, n: int, cols: int, rng) -> QTensor | None:
    if qtype in BLOCK:
        if cols % 256:
            return None
        data = rng.integers(0, 256, (n, cols // 256, BLOCK[qtype]), dtype=np.uint8)
        d = np.full((n, cols // 256), 0.001, np.float16).view(np.uint8).reshape(n, -1, 2)
        data[..., 0:2] = d
        if qtype == QType.Q4_K:
            data[..., 2:4] = d
        else:
            data[..., 208:210] = d
        return QTensor("w", qtype, (n, cols), data.reshape(n, -1))
    w = rng.standard_normal((n, cols)).astype(np.float32)
    if qtype == QType.F32:
        return QTensor.from_float("w", w)
    return QTensor("w", qtype, (n, cols), np.asarray(gq.quantize(w, qtype)).view(np.uint8).reshape(n, -1))


def median_time(fn, runs: int = 5) -> float:
    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bandwidth_probe() -> tuple[float, float]:
    a = np.ones(1 << 28, np.float32)   # 1 GiB
    b = np.empty_like(a)
    t_copy = median_time(lambda: np.copyto(b, a), 3)
    t_read = median_time(lambda: a.sum(), 3)
    return 2 * a.nbytes / t_copy / 1e9, a.nbytes / t_read / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--isa", default=None, choices=list(ISA_NAMES.values()))
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q6_K,F16,BF16,F32")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--no-probe", action="store_true")
    args = ap.parse_args()
    cb = CBackend(threads=args.threads)
    if args.isa:
        cb.set_isa({v: k for k, v in ISA_NAMES.items()}[args.isa])
    rng = np.random.default_rng(0)
    print(f"C backend: isa={cb.isa} threads={cb.threads}")
    if not args.no_probe:
        copy_gbs, read_gbs = bandwidth_probe()
        print(f"bandwidth probe (numpy, 1 GiB): copy {copy_gbs:.1f} GB/s (read+write), sum {read_gbs:.1f} GB/s")
    print(f"{'type':6} {'matrix':16} {'N x cols':>11} {'decode us':>10} {'GB/s':>7} "
          f"{'prefill ms':>10} {'GFLOP/s':>8}")
    for tname in args.types.split(","):
        qtype = TYPES[tname]
        for label, n, cols in SHAPES:
            w = weight(qtype, n, cols, rng)
            if w is None:
                continue
            copies = max(1, (256 << 20) // w.nbytes)
            ws = [w] + [QTensor("w", qtype, w.shape, w.data.copy()) for _ in range(copies - 1)]
            x1 = rng.standard_normal((1, cols)).astype(np.float32)
            state = {"i": 0}

            def decode():
                for ww in ws:
                    cb.matmul(x1, ww)

            t_dec = median_time(decode) / len(ws)
            xp = rng.standard_normal((args.prefill, cols)).astype(np.float32)
            t_pre = median_time(lambda: cb.matmul(xp, w))
            gflops = 2 * args.prefill * n * cols / t_pre / 1e9
            print(f"{tname:6} {label:16} {n:5}x{cols:<5} {t_dec * 1e6:10.1f} {w.nbytes / t_dec / 1e9:7.1f} "
                  f"{t_pre * 1e3:10.2f} {gflops:8.1f}")
            del ws, state


if __name__ == "__main__":
    main()
