"""Device-side speed of the CUDA kernels alone, against the GPU's copy bandwidth: the quantized
matvec (decode) and matmul (prefill) at DeepSeek-Coder-V2-Lite shapes, the fused expert FFN of one
decode token and MLA attention over a cached context. Timed with CUDA events around repeated
launches (median of several batches); weights rotate among enough copies to exceed the L2 cache,
so each launch reads them from device memory.

    python benchmarks/gpu_kernels.py            # results to stdout, one line per case
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lite.kernels import cuda  # noqa: E402
from lite.kernels.base import QType  # noqa: E402

ffi, lib = cuda._ffi, cuda._lib
ROTATE_BYTES = 256 << 20            # several times any L2


def _check(rc: int, what: str) -> None:
    cuda._check(rc, what)


def timed(launch, n: int, stream) -> float:
    """Median seconds per launch over 5 batches of n launches (after one warm-up batch)."""
    start, end = cuda.Event(), cuda.Event()
    ms = ffi.new("float *")
    out = []
    for b in range(6):
        start.record(stream)
        for i in range(n):
            launch(i)
        end.record(stream)
        _check(lib.lite_cuda_event_sync(end.handle), "event sync")
        _check(lib.lite_cuda_event_elapsed(ms, start.handle, end.handle), "elapsed")
        if b:
            out.append(ms[0] / 1e3 / n)
    return statistics.median(out)


def copy_bandwidth(stream) -> float:
    """Device-to-device copy, bytes read plus written per second."""
    n = 1 << 30
    a, b = cuda.DeviceBuffer(n), cuda.DeviceBuffer(n)
    s = timed(lambda i: _check(lib.lite_cuda_memcpy_d2d(b.ptr, a.ptr, n, stream.handle), "d2d"), 5, stream)
    a.free(), b.free()
    return 2 * n / s


def weights(qtype: QType, rows: int, cols: int) -> tuple[list[cuda.DeviceBuffer], int]:
    rb = ffi.new("int64_t *")
    _check(lib.lite_cuda_row_bytes(rb, int(qtype), cols), "row bytes")
    nbytes = rows * rb[0]
    copies = max(1, ROTATE_BYTES // nbytes)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, nbytes, dtype=np.uint8)    # any bytes: only the speed is read
    bufs = []
    for _ in range(copies):
        b = cuda.DeviceBuffer(nbytes)
        b.upload(raw)
        bufs.append(b)
    _check(lib.lite_cuda_device_sync(), "sync")             # uploads ran on the default stream
    return bufs, nbytes


def bench_matmul(stream, qtype: QType, rows: int, cols: int, n_tok: int, peak: float) -> None:
    bufs, nbytes = weights(qtype, rows, cols)
    x = cuda.DeviceBuffer(n_tok * cols * 4)
    x.upload(np.random.default_rng(1).standard_normal((n_tok, cols), dtype=np.float32))
    out = cuda.DeviceBuffer(n_tok * rows * 4)
    _check(lib.lite_cuda_device_sync(), "sync")

    def launch(i: int) -> None:
        _check(lib.lite_cuda_matmul(out.typed(), n_tok * rows, x.typed(), n_tok, cols,
                                    ffi.cast("const uint8_t *", bufs[i % len(bufs)].ptr), nbytes, int(qtype),
                                    rows, stream.handle), "matmul")
    s = timed(launch, 20, stream)
    gbs = nbytes / s / 1e9
    print(f"matmul {qtype.name:5} {rows}x{cols} T={n_tok:<4} {s * 1e6:9.1f} us  {gbs:7.1f} GB/s weights "
          f"({gbs * 1e9 / peak:.0%} of copy)  {2 * rows * cols * n_tok / s / 1e12:6.2f} TFLOP/s")
    for b in bufs + [x, out]:
        b.free()


def bench_mla(be: cuda.CudaBackend, n_pos: int, n_tok: int = 1, heads: int = 16, c: int = 512, r: int = 64) -> None:
    stream = be._stream
    rng = np.random.default_rng(2)
    bufs = {}
    for name, shape in (("ql", (n_tok, heads, c)), ("qp", (n_tok, heads, r)), ("ckv", (n_pos, c)),
                        ("kpe", (n_pos, r)), ("out", (n_tok, heads, c))):
        bufs[name] = cuda.DeviceBuffer(int(np.prod(shape)) * 4)
        bufs[name].upload(rng.standard_normal(shape, dtype=np.float32))
    _check(lib.lite_cuda_device_sync(), "sync")
    start = n_pos - n_tok
    scr, nf = be._mla_scratch(n_tok, heads, c, start)

    def launch(i: int) -> None:
        _check(lib.lite_cuda_mla_attention(bufs["out"].typed(), bufs["ql"].typed(), bufs["qp"].typed(),
                                           bufs["ckv"].typed(), bufs["kpe"].typed(), n_tok, heads, c, r, n_pos,
                                           start, 0.1, scr, nf, stream.handle), "mla")
    s = timed(launch, 10, stream)
    cache = n_pos * (c + r) * 4
    print(f"mla    T={n_tok} S={n_pos:<6} H={heads}     {s * 1e6:9.1f} us  {cache / s / 1e9:7.1f} GB/s of cache "
          f"(x27 layers: {27 * s * 1e3:.2f} ms per token)")
    for b in bufs.values():
        b.free()


def main() -> None:
    be = cuda.CudaBackend()
    st = be._stream
    print(f"device {be.props['name']}, {be.props['multiprocessors']} SMs", flush=True)
    peak = copy_bandwidth(st)
    print(f"copy   device-to-device {peak / 1e9:.0f} GB/s (read + write)", flush=True)
    for variant, name in ((0, "a warp per row"), (1, "a block per row")):
        _check(lib.lite_cuda_set_matvec(variant), "set_matvec")
        print(f"one token, {name}:", flush=True)
        for qt in (QType.Q4_0, QType.Q8_0, QType.Q4_K, QType.Q6_K):
            bench_matmul(st, qt, 10944, 2048, 1, peak)      # dense-layer FFN width
        bench_matmul(st, QType.Q4_0, 102400, 2048, 1, peak)  # output projection
        bench_matmul(st, QType.Q4_0, 1408, 2048, 1, peak)    # one expert's gate
    _check(lib.lite_cuda_set_matvec(1), "set_matvec")
    for t in (8, 128):
        bench_matmul(st, QType.Q4_0, 10944, 2048, t, peak)
        bench_matmul(st, QType.Q8_0, 10944, 2048, t, peak)
    for s in (512, 4096, 16384):
        bench_mla(be, s)
    bench_mla(be, 512, n_tok=128)


if __name__ == "__main__":
    main()
