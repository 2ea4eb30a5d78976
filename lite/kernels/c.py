"""The C backend: the CPU kernels of csrc/ (scalar, AVX2, AVX-512/VNNI, chosen at run time),
opened with cffi in ABI mode.

The library is looked up in `LITE_LIB`, then `<p>/_native/liblite_cpu.so` for p in `lite.__path__`;
its declarations come from the `lite.h` installed beside it (or csrc/include/lite.h in a source
checkout). A missing library, an ABI version mismatch or a missing symbol (stale build) raises
ImportError with a one-line reason, so `get_backend` can fall back.

Shapes follow base.py: T tokens, S cached positions, D hidden, H heads, C latent dims, R rope
dims, K experts per token, F expert width, N weight rows. Every argument is validated here before
C sees it (C validates again and returns a status code, turned into BackendError).
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Mapping

import numpy as np

from ..errors import BackendError
from .native import open_library
from .base import FFNWeights, QTensor, QType, check_f32, check_mla, check_rmsnorm, check_rope, check_weight

ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}
_STATUS = {-1: "invalid argument", -2: "unsupported block type", -3: "NULL pointer",
           -4: "buffer too small for the shapes", -5: "row length not a multiple of the block size",
           -6: "instruction set not supported"}
MLA_MAX_C = 1024
MOE_MAX_ENTRIES = 1024


def _load():
    # Idle OpenMP workers sleep instead of spinning: a decode step is a few hundred short parallel
    # regions, and on a machine whose cores are also busy with other work, spinning workers
    # (GOMP's default) were measured 3-5x slower than sleeping ones. Set before libgomp loads;
    # an explicit OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")

    return open_library("lite", "LITE_LIB", "liblite_cpu.so", "run `pip install --no-build-isolation -e .`",
                        "lite.h", "csrc/include")


_ffi, _lib, LIB_PATH = _load()


def _act_stride(qtype: QType, cols: int) -> int:
    """Bytes per token of quantized activations (csrc/cpu/internal.h: a8_stride, a8k_stride)."""
    if qtype in (QType.Q4_0, QType.Q8_0):
        return (cols // 32 * 36 + 63) & ~63
    if qtype in (QType.Q4_K, QType.Q6_K):
        return (cols // 256 * 292 + 63) & ~63
    return 0


class CBackend:
    """Backend protocol on the C library. One instance may be shared; scratch is per thread."""

    name = "c"

    def __init__(self, threads: int | None = None) -> None:
        self.ffi, self.lib = _ffi, _lib
        n = threads or int(os.environ.get("LITE_THREADS") or 0) or os.cpu_count() or 1
        self.set_threads(n)
        self._local = threading.local()
        self._ptrs: dict[int, tuple[np.ndarray, object]] = {}

    # ---- controls (tests, benchmarks) ------------------------------------------------------
    def set_threads(self, n: int) -> None:
        self._check(self.lib.lite_set_threads(int(n)), "set_threads", f"n={n}")

    @property
    def threads(self) -> int:
        return int(self.lib.lite_get_threads())

    def isa_levels(self) -> list[int]:
        """Instruction-set levels this CPU and build support (0 scalar, 1 AVX2, 2 AVX-512)."""
        return list(range(int(self.lib.lite_cpu_isa()) + 1))

    def set_isa(self, level: int) -> None:
        self._check(self.lib.lite_set_isa(int(level)), "set_isa", f"level={level}")

    @property
    def isa(self) -> str:
        return ISA_NAMES[int(self.lib.lite_get_isa())]

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _check(rc: int, op: str, what: str = "") -> None:
        if rc != 0:
            raise BackendError(f"{op}: the C library refused the call ({_STATUS.get(rc, rc)})"
                               + (f": {what}" if what else ""))

    def _f(self, a: np.ndarray):
        return self.ffi.from_buffer("float[]", a)

    def _scratch(self, nbytes: int):
        """A 64-byte aligned per-thread scratch pointer of at least nbytes (grown, never shrunk)."""
        loc = self._local
        if getattr(loc, "size", -1) < nbytes:
            buf = np.empty(max(nbytes, 1 << 16) + 64, dtype=np.uint8)
            off = (-buf.ctypes.data) % 64
            loc.buf, loc.size = buf, buf.nbytes - 64
            loc.ptr = self.ffi.from_buffer("uint8_t[]", buf) + off
        return loc.ptr, loc.size

    def _weight(self, op: str, w: QTensor, rows: int | None, cols: int | None):
        """Validate a weight and return a cffi pointer to its bytes. Validation and pointer are
        cached per data array (weights are long-lived); a dead entry's id may be reused, which
        the weak reference detects. The caller keeps `w` alive for the duration of the call."""
        data = getattr(w, "data", None)
        hit = self._ptrs.get(id(data))
        if (hit is not None and hit[0]() is data and hit[1] == w.qtype and hit[2] == w.shape
                and (rows is None or w.shape[0] == rows) and (cols is None or w.shape[1] == cols)):
            return self.ffi.cast("const uint8_t *", data.ctypes.data)
        check_weight(op, w, rows, cols)
        if len(self._ptrs) > 4096:
            self._ptrs.clear()
        # A weak reference: the cache must not keep a closed model's map or expert pool alive.
        self._ptrs[id(data)] = (weakref.ref(data), w.qtype, w.shape)
        return self.ffi.cast("const uint8_t *", data.ctypes.data)


    # ---- ops ------------------------------------------------------------------------------------
    def quantize_q8_0(self, x: np.ndarray) -> np.ndarray:
        """x `[T, cols]` → ggml Q8_0 blocks uint8 `[T, cols/32*34]` (bit-exact with gguf.quants)."""
        x = check_f32("quantize_q8_0 input", x, 2)
        if x.shape[1] % 32 or x.shape[1] == 0:
            raise BackendError(f"quantize_q8_0: row length {x.shape[1]} is not a multiple of 32")
        out = np.empty((x.shape[0], x.shape[1] // 32 * 34), np.uint8)
        self._check(self.lib.lite_quantize_q8_0(self.ffi.from_buffer("uint8_t[]", out), out.nbytes,
                                                self._f(x), x.shape[0], x.shape[1]), "quantize_q8_0")
        return out

    def quantize_q8_k(self, x: np.ndarray) -> np.ndarray:
        """x `[T, cols]` → 256-blocks (float32 d, int8 qs[256], int16 bsums[16]) uint8 `[T, cols/256*292]`."""
        x = check_f32("quantize_q8_k input", x, 2)
        if x.shape[1] % 256 or x.shape[1] == 0:
            raise BackendError(f"quantize_q8_k: row length {x.shape[1]} is not a multiple of 256")
        out = np.empty((x.shape[0], x.shape[1] // 256 * 292), np.uint8)
        self._check(self.lib.lite_quantize_q8_k(self.ffi.from_buffer("uint8_t[]", out), out.nbytes,
                                                self._f(x), x.shape[0], x.shape[1]), "quantize_q8_k")
        return out

    def matmul(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        x = check_f32("matmul input", x, 2)
        t, cols = x.shape
        wp = self._weight("matmul", w, None, cols)
        n = w.shape[0]
        out = np.empty((t, n), np.float32)
        if t == 0:
            return out
        sp, sn = self._scratch(t * _act_stride(w.qtype, cols))
        rc = self.lib.lite_matmul(self._f(out), out.size, self._f(x), t, cols, wp, w.data.nbytes,
                                  int(w.qtype), n, sp, sn)
        if rc:
            self._check(rc, "matmul", f"weight {w.name} {w.qtype.name} {w.shape}, input {x.shape}")
        return out

    def matmul_heads(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        """x `[T, H, cols]` times each head's own weight `w[h]` `[N, cols]` (w `[H, N, cols]`) →
        `[T, H, N]`, all heads in one call (MLA's W_UK and W_UV)."""
        x = check_f32("matmul_heads input", x, 3)
        t, h, cols = x.shape
        if not isinstance(w, QTensor) or len(w.shape) != 3 or w.shape[0] != h or w.shape[2] != cols:
            raise BackendError(f"matmul_heads: weight {getattr(w, 'name', w)} of shape {getattr(w, 'shape', '?')} "
                               f"does not fit input {x.shape} (want [{h}, N, {cols}])")
        n = w.shape[1]
        data = w.data
        hit = self._ptrs.get(id(data))
        if not (hit is not None and hit[0]() is data and hit[1] == w.qtype and hit[2] == w.shape):
            # Validate as the 2-D [H*N, cols] weight it is byte for byte, then cache under the 3-D shape.
            if not isinstance(data, np.ndarray) or not data.flags.c_contiguous:
                raise BackendError(f"matmul_heads: weight {w.name} data must be C-contiguous uint8")
            check_weight("matmul_heads", QTensor(w.name, w.qtype, (h * n, cols), data.reshape(h * n, -1)),
                               h * n, cols)
            if len(self._ptrs) > 4096:
                self._ptrs.clear()
            self._ptrs[id(data)] = (weakref.ref(data), w.qtype, w.shape)
        wp = self.ffi.cast("const uint8_t *", data.ctypes.data)
        out = np.empty((t, h, n), np.float32)
        if t == 0:
            return out
        sp, sn = self._scratch(t * h * _act_stride(w.qtype, cols))
        rc = self.lib.lite_matmul_heads(self._f(out), out.size, self._f(x), t, h, cols, wp, w.data.nbytes,
                                        int(w.qtype), n, sp, sn)
        if rc:
            self._check(rc, "matmul_heads", f"weight {w.name} {w.qtype.name} {w.shape}, input {x.shape}")
        return out

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        x, w = check_rmsnorm(x, w, eps)
        out = np.empty_like(x)
        if x.size:
            self._check(self.lib.lite_rmsnorm_f32(self._f(out), self._f(x), self._f(w), x.shape[0],
                                                  x.shape[1], float(eps)), "rmsnorm")
        return out

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        x, cos, sin = check_rope(x, cos, sin)
        t, h, r = x.shape
        out = np.empty_like(x)
        if x.size:
            self._check(self.lib.lite_rope_f32(self._f(out), self._f(x), self._f(cos), self._f(sin), t, h, r), "rope")
        return out

    def softmax(self, x: np.ndarray) -> np.ndarray:
        x = check_f32("softmax input", x, 2)
        out = np.empty_like(x)
        if x.size:
            self._check(self.lib.lite_softmax_f32(self._f(out), self._f(x), x.shape[0], x.shape[1]), "softmax")
        return out

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        if not isinstance(g, np.ndarray) or not isinstance(u, np.ndarray) or g.shape != u.shape:
            raise BackendError(f"silu_mul: shapes {getattr(g, 'shape', g)} and {getattr(u, 'shape', u)} differ")
        g, u = check_f32("silu_mul gate", g, g.ndim), check_f32("silu_mul up", u, u.ndim)
        out = np.empty_like(g)
        if g.size:
            self._check(self.lib.lite_silu_mul_f32(self._f(out), self._f(g), self._f(u), g.size), "silu_mul")
        return out

    def mla_attention(self, q_lat: np.ndarray, q_pe: np.ndarray, ckv: np.ndarray, kpe: np.ndarray,
                      scale: float, start: int) -> np.ndarray:
        a = check_mla(q_lat, q_pe, ckv, kpe, scale, start)
        q_lat, q_pe, ckv, kpe, start = a.q_lat, a.q_pe, a.ckv, a.kpe, a.start
        t, h, c, r, s = a.dims
        if c > MLA_MAX_C:
            raise BackendError(f"mla_attention: latent size {c} exceeds the C kernel's limit {MLA_MAX_C}")
        out = np.empty_like(q_lat)
        if t == 0:
            return out
        null = self.ffi.NULL
        rc = self.lib.lite_mla_attention(self._f(out), self._f(q_lat), self._f(q_pe) if r else null,
                                         self._f(ckv), self._f(kpe) if r else null, t, h, c, r, s, start,
                                         float(scale))
        self._check(rc, "mla_attention")
        return out

    def moe(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            experts: Mapping[int, FFNWeights], shared: FFNWeights | None) -> np.ndarray:
        x = check_f32("moe input", x, 2)
        t, d = x.shape
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise BackendError(f"moe: ids must be an integer array [T, K], got "
                               f"{getattr(ids, 'dtype', type(ids).__name__)} {getattr(ids, 'shape', '')}")
        weights = check_f32("moe weights", weights, 2)
        if ids.shape != weights.shape or ids.shape[0] != t:
            raise BackendError(f"moe: ids {ids.shape} / weights {weights.shape} do not fit input {x.shape}")
        k = ids.shape[1]
        uniq, inv = np.unique(ids, return_inverse=True)
        table: list[FFNWeights] = []
        for e in uniq.tolist():
            ffn = experts.get(int(e)) if hasattr(experts, "get") else None
            if ffn is None:
                raise BackendError(f"moe: expert {int(e)} was routed to but not supplied")
            table.append(ffn)
        shared_idx = -1
        if shared is not None:
            shared_idx = len(table)
            table.append(shared)
        n = len(table)
        if n > MOE_MAX_ENTRIES:
            raise BackendError(f"moe: {n} experts in one call exceed the C kernel's limit {MOE_MAX_ENTRIES}")
        out = np.zeros((t, d), np.float32)
        if t == 0 or n == 0:
            return out
        ffi = self.ffi
        gp, up, dp = ffi.new("const uint8_t *[]", n), ffi.new("const uint8_t *[]", n), ffi.new("const uint8_t *[]", n)
        types = np.empty(3 * n, np.int32)
        nbytes = np.empty(3 * n, np.int64)
        widths = np.empty(n, np.int64)
        for i, f in enumerate(table):
            label = "shared" if i == shared_idx else f"expert {int(uniq[i])}"
            if not isinstance(f, FFNWeights):
                raise BackendError(f"moe: {label} must be FFNWeights, got {type(f).__name__}")
            width = f.gate.shape[0] if isinstance(f.gate, QTensor) and len(f.gate.shape) == 2 else None
            gp[i] = self._weight(f"moe {label} gate", f.gate, None, d)
            up[i] = self._weight(f"moe {label} up", f.up, width, d)
            dp[i] = self._weight(f"moe {label} down", f.down, d, width)
            types[3 * i:3 * i + 3] = (int(f.gate.qtype), int(f.up.qtype), int(f.down.qtype))
            nbytes[3 * i:3 * i + 3] = (f.gate.data.nbytes, f.up.data.nbytes, f.down.data.nbytes)
            widths[i] = width
        slots = np.ascontiguousarray(inv.reshape(t, k), dtype=np.int32)
        need = ffi.new("int64_t *")
        self._check(self.lib.lite_moe_scratch_bytes(need, t, d, k, int(widths.max())), "moe", "scratch size")
        sp, sn = self._scratch(int(need[0]))
        rc = self.lib.lite_moe(self._f(out), out.size, self._f(x), t, d,
                               ffi.from_buffer("int32_t[]", slots), self._f(weights) if k else ffi.NULL, k,
                               n, gp, up, dp, ffi.from_buffer("int32_t[]", types),
                               ffi.from_buffer("int64_t[]", nbytes), ffi.from_buffer("int64_t[]", widths),
                               shared_idx, sp, sn)
        self._check(rc, "moe", f"T={t} D={d} K={k} experts={n}")
        return out


def read_bytes(buf: np.ndarray, threads: int | None = None) -> int:
    """Read every byte of `buf` (C-contiguous, size a multiple of 8) with the library's threads —
    the memory-bandwidth probe of `lite bench`. Returns the XOR of its 64-bit words."""
    if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous or buf.nbytes % 8:
        raise BackendError("read_bytes: buffer must be a C-contiguous array of a multiple of 8 bytes")
    old = int(_lib.lite_get_threads())
    if threads:
        _lib.lite_set_threads(int(threads))
    try:
        res = _ffi.new("uint64_t *")
        rc = _lib.lite_read_bytes(res, _ffi.from_buffer("uint8_t[]", buf.reshape(-1).view(np.uint8)), buf.nbytes)
    finally:
        _lib.lite_set_threads(old)
    if rc:
        raise BackendError(f"read_bytes: the C library refused the call ({_STATUS.get(rc, rc)})")
    return int(res[0])
