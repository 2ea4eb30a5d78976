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

import math
import os
import threading
import weakref
from functools import partial
from itertools import chain
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import BackendError
from .native import open_library
from .base import (DecodeLayer, FFNWeights, MLAWeights, MLPLayout, QTensor, QType, check_add_rmsnorm,
                   check_decode_layers, check_f32, check_heads_fit, check_heads_weight, check_mla, check_mla_prep,
                   check_norm, check_residual, check_residual_add, check_rmsnorm, check_rope, check_route,
                   check_route_args, check_weight, mla_dims)

ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx512vbmi"}
PREFETCH_TARGETS = {"l1": 0, "l2": 1}     # LITE_PREFETCH_L1, LITE_PREFETCH_L2
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
        return (cols // 32 * 40 + 63) & ~63
    if qtype in (QType.Q4_K, QType.Q6_K):
        return (cols // 256 * 292 + 63) & ~63
    return 0


class CBackend:
    """Backend protocol on the C library. One instance may be shared; scratch is per thread."""

    name = "c"
    moe_slot_order = True

    def __init__(self, threads: int | None = None) -> None:
        self.ffi, self.lib = _ffi, _lib
        n = threads or int(os.environ.get("LITE_THREADS") or 0) or os.cpu_count() or 1
        self.set_threads(n)
        if os.environ.get("LITE_ISA"):
            self._cap_isa(os.environ["LITE_ISA"])
        if os.environ.get("LITE_PREFETCH"):
            self.set_prefetch(os.environ["LITE_PREFETCH"])
        self._local = threading.local()
        # Validated weights, keyed by id(QTensor) (a weak reference tells a reused id from a hit):
        # (ref, what `_weight` returns).
        self._ptrs: dict[int, tuple] = {}
        self._moe_need: dict[tuple[int, int, int, int], int] = {}   # lite_moe_scratch_bytes memo
        # A float[] view of a float32 array: ~40 per layer, so no Python frame of our own.
        self._f = partial(self.ffi.from_buffer, self.ffi.typeof("float[]"))

    # ---- controls (tests, benchmarks) ------------------------------------------------------
    def set_threads(self, n: int) -> None:
        self._check(self.lib.lite_set_threads(int(n)), "set_threads", f"n={n}")

    @property
    def threads(self) -> int:
        return int(self.lib.lite_get_threads())

    def isa_levels(self) -> list[int]:
        """Instruction-set levels this CPU and build support (0 scalar, 1 AVX2, 2 AVX-512, 3 the
        AVX-512 kernels with VBMI and GFNI)."""
        return list(range(int(self.lib.lite_cpu_isa()) + 1))

    def set_isa(self, level: int) -> None:
        self._check(self.lib.lite_set_isa(int(level)), "set_isa", f"level={level}")

    def _cap_isa(self, name: str) -> None:
        """`LITE_ISA=scalar|avx2|avx512|avx512vbmi`: run that instruction set's kernels
        (comparisons, or a machine whose wide vectors slow its clock) instead of the best this CPU
        has."""
        levels = {v: k for k, v in ISA_NAMES.items()}
        if name not in levels:
            raise BackendError(f"LITE_ISA={name!r}: expected one of {', '.join(levels)}")
        if levels[name] not in self.isa_levels():
            raise BackendError(f"LITE_ISA={name}: this CPU or build goes up to {ISA_NAMES[self.isa_levels()[-1]]}")
        self.set_isa(levels[name])

    @property
    def isa(self) -> str:
        return ISA_NAMES[int(self.lib.lite_get_isa())]

    def set_prefetch(self, target: str) -> None:
        """`l1` or `l2` (also `LITE_PREFETCH`): the cache the decode kernels prefetch the weights
        and the latent cache into. The default is the better of the two as measured on the CPU
        family (l2 on AMD, l1 elsewhere); results are the same bits either way."""
        if target not in PREFETCH_TARGETS:
            raise BackendError(f"LITE_PREFETCH={target!r}: expected one of {', '.join(PREFETCH_TARGETS)}")
        self._check(self.lib.lite_set_prefetch(PREFETCH_TARGETS[target]), "set_prefetch", f"target={target}")

    @property
    def prefetch(self) -> str:
        return {v: k for k, v in PREFETCH_TARGETS.items()}[int(self.lib.lite_get_prefetch())]

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _check(rc: int, op: str, what: str = "") -> None:
        if rc != 0:
            raise BackendError(f"{op}: the C library refused the call ({_STATUS.get(rc, rc)})"
                               + (f": {what}" if what else ""))

    def _scratch(self, nbytes: int) -> tuple:
        """(64-byte aligned pointer, size, owning array): this thread's scratch of at least nbytes
        (grown, never shrunk). One thread-local lookup: each costs microseconds with cold caches."""
        got = getattr(self._local, "scratch", None)
        if got is None or got[1] < nbytes:
            buf = np.empty(max(nbytes, 1 << 16) + 64, dtype=np.uint8)
            off = (-buf.ctypes.data) % 64
            got = self._local.scratch = (self.ffi.from_buffer("uint8_t[]", buf) + off, buf.nbytes - 64, buf)
        return got

    def _weight(self, op: str, w: QTensor, rows: int | None, cols: int | None,
                validate: Callable[[str, QTensor, int | None, int | None], None] = check_weight) -> tuple:
        """Validate a weight (`rows` against its first axis, `cols` its last, when given); return
        (cffi pointer to its bytes, activation bytes per token, byte size, type code). Cached per
        QTensor (frozen, and weights are long-lived); a dead entry's id may be reused, which the
        weak reference detects. The caller keeps `w` alive for the duration of the call."""
        hit = self._ptrs.get(id(w))
        if (hit is not None and hit[0]() is w and (rows is None or w.shape[0] == rows)
                and (cols is None or w.shape[-1] == cols)):
            return hit[1]
        validate(op, w, rows, cols)
        if len(self._ptrs) > 4096:
            self._ptrs.clear()
        got = (self.ffi.cast("const uint8_t *", w.data.ctypes.data), _act_stride(w.qtype, w.shape[-1]),
               w.data.nbytes, int(w.qtype))
        # A weak reference: the cache must not keep a closed model's map or expert pool alive.
        self._ptrs[id(w)] = (weakref.ref(w), got)
        return got

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
        wp, stride, nbytes, qtype = self._weight("matmul", w, None, cols)
        n = w.shape[0]
        out = np.empty((t, n), np.float32)
        if t == 0:
            return out
        sp, sn, _ = self._scratch(t * stride)
        rc = self.lib.lite_matmul(self._f(out), out.size, self._f(x), t, cols, wp, nbytes, qtype, n, sp, sn)
        if rc:
            self._check(rc, "matmul", f"weight {w.name} {w.qtype.name} {w.shape}, input {x.shape}")
        return out

    def matmul_heads(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        """x `[T, H, cols]` times each head's own weight `w[h]` `[N, cols]` (w `[H, N, cols]`) →
        `[T, H, N]`, all heads in one call (MLA's W_UK and W_UV)."""
        x = check_f32("matmul_heads input", x, 3)
        t, h, cols = x.shape
        check_heads_fit(x, w)
        n = w.shape[1]
        wp, stride, nbytes, qtype = self._weight("matmul_heads", w, None, cols, check_heads_weight)
        out = np.empty((t, h, n), np.float32)
        if t == 0:
            return out
        sp, sn, _ = self._scratch(t * h * stride)
        rc = self.lib.lite_matmul_heads(self._f(out), out.size, self._f(x), t, h, cols, wp, nbytes, qtype, n,
                                        sp, sn)
        if rc:
            self._check(rc, "matmul_heads", f"weight {w.name} {w.qtype.name} {w.shape}, input {x.shape}")
        return out

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        x, w = check_rmsnorm(x, w, eps)
        out = np.empty(x.shape, np.float32)
        if x.size:
            rc = self.lib.lite_rmsnorm_f32(self._f(out), self._f(x), self._f(w), x.shape[0], x.shape[1], float(eps))
            if rc:
                self._check(rc, "rmsnorm")
        return out

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        x, cos, sin = check_rope(x, cos, sin)
        t, h, r = x.shape
        out = np.empty(x.shape, np.float32)
        if x.size:
            rc = self.lib.lite_rope_f32(self._f(out), self._f(x), self._f(cos), self._f(sin), t, h, r)
            if rc:
                self._check(rc, "rope")
        return out

    def softmax(self, x: np.ndarray) -> np.ndarray:
        x = check_f32("softmax input", x, 2)
        out = np.empty(x.shape, np.float32)
        if x.size:
            rc = self.lib.lite_softmax_f32(self._f(out), self._f(x), x.shape[0], x.shape[1])
            if rc:
                self._check(rc, "softmax")
        return out

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        if not isinstance(g, np.ndarray) or not isinstance(u, np.ndarray) or g.shape != u.shape:
            raise BackendError(f"silu_mul: shapes {getattr(g, 'shape', g)} and {getattr(u, 'shape', u)} differ")
        g, u = check_f32("silu_mul gate", g, g.ndim), check_f32("silu_mul up", u, u.ndim)
        out = np.empty(g.shape, np.float32)
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
        out = np.empty(q_lat.shape, np.float32)
        if t == 0:
            return out
        null = self.ffi.NULL
        rc = self.lib.lite_mla_attention(self._f(out), self._f(q_lat), self._f(q_pe) if r else null,
                                         self._f(ckv), self._f(kpe) if r else null, t, h, c, r, s, start,
                                         float(scale))
        if rc:
            self._check(rc, "mla_attention")
        return out

    def add_rmsnorm(self, x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float) -> np.ndarray:
        x, delta, w = check_add_rmsnorm(x, delta, w, eps)
        out = np.empty(x.shape, np.float32)
        if x.size:
            f = self._f
            rc = self.lib.lite_add_rmsnorm_f32(f(out), f(x), self.ffi.NULL if delta is None else f(delta), f(w),
                                               x.shape[0], x.shape[1], float(eps))
            if rc:
                self._check(rc, "add_rmsnorm")
        return out

    def route(self, logits: np.ndarray, k: int, n_group: int = 1, topk_group: int = 1, norm: bool = False,
              scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits = check_route(logits, k, n_group, topk_group, scale)
        t, e = logits.shape
        ids, w, probs = np.empty((t, k), np.int32), np.empty((t, k), np.float32), np.empty((t, e), np.float32)
        if t:
            rc = self.lib.lite_route(self.ffi.from_buffer("int32_t[]", ids), self._f(w), self._f(probs),
                                     self._f(logits), t, e, k, n_group, topk_group, bool(norm), float(scale))
            if rc:
                self._check(rc, "route", f"T={t} E={e} K={k} groups={n_group}/{topk_group}")
        return ids, w, probs

    def norm_route(self, x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float, router: QTensor,
                   k: int, n_group: int = 1, topk_group: int = 1, norm: bool = False,
                   scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        x, delta, w = check_add_rmsnorm(x, delta, w, eps)
        t, d = x.shape
        wp, stride, nbytes, qtype = self._weight("norm_route", router, None, d)
        e = router.shape[0]
        check_route_args("norm_route", e, k, n_group, topk_group, scale)
        h, probs = np.empty((t, d), np.float32), np.empty((t, e), np.float32)
        ids, wt = np.empty((t, k), np.int32), np.empty((t, k), np.float32)
        if t:
            f = self._f
            sp, sn, _ = self._scratch(t * stride)
            rc = self.lib.lite_norm_route(f(h), f(x), self.ffi.NULL if delta is None else f(delta), f(w), float(eps),
                                          t, d, wp, nbytes, qtype, e, self.ffi.from_buffer("int32_t[]", ids), f(wt),
                                          f(probs), k, n_group, topk_group, bool(norm), float(scale), sp, sn)
            if rc:
                self._check(rc, "norm_route", f"router {router.name} {router.shape}, input {x.shape}, K={k}")
        return h, ids, wt, probs

    def mla_prep(self, q: np.ndarray, kv: np.ndarray, norm: np.ndarray, eps: float, cos: np.ndarray,
                 sin: np.ndarray, ckv: np.ndarray, kpe: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        q, kv, norm, cos, sin, ckv, kpe, start = check_mla_prep(q, kv, norm, eps, cos, sin, ckv, kpe, start)
        t, h, qw = q.shape
        c, r = ckv.shape[1], kpe.shape[1]
        q_nope, q_pe = np.empty((t, h, qw - r), np.float32), np.empty((t, h, r), np.float32)
        if t:
            f = self._f
            rc = self.lib.lite_mla_prep(f(q_nope), f(q_pe), f(ckv), f(kpe), ckv.shape[0], f(q), f(kv), f(norm), f(cos),
                                        f(sin), t, h, qw - r, c, r, start, float(eps))
            if rc:
                self._check(rc, "mla_prep", f"q {q.shape} kv {kv.shape} start {start}")
        return q_nope, q_pe

    def mla_step(self, x: np.ndarray, delta: np.ndarray | None, w: MLAWeights, ckv: np.ndarray, kpe: np.ndarray,
                 cos: np.ndarray, sin: np.ndarray, start: int, scale: float, eps: float,
                 norm_eps: float) -> np.ndarray:
        x, delta = check_residual_add("mla_step", x, delta)
        t, d = x.shape
        p = self._mla_pack(w, d)
        ckv, kpe = check_residual(ckv, "mla_step ckv cache"), check_residual(kpe, "mla_step kpe cache")
        cos, sin = check_f32("mla_step cos", cos, 2), check_f32("mla_step sin", sin, 2)
        if (ckv.shape[1] != p.c or kpe.shape != (ckv.shape[0], p.r) or cos.shape != (t, p.r // 2)
                or sin.shape != cos.shape or not isinstance(start, (int, np.integer)) or isinstance(start, bool)
                or not 0 <= start <= ckv.shape[0] - t or not math.isfinite(scale) or not eps >= 0
                or not norm_eps >= 0):
            raise BackendError(f"mla_step: input {x.shape}, caches {ckv.shape}/{kpe.shape}, tables {cos.shape}/"
                               f"{sin.shape}, start {start!r}, scale {scale!r}, eps {eps!r}/{norm_eps!r} do not "
                               f"fit the weights (C={p.c}, R={p.r})")
        out = np.empty((t, d), np.float32)
        if t == 0:
            return out
        need = p.need.get(t)
        if need is None:
            box = self.ffi.new("int64_t *")
            self._check(self.lib.lite_mla_step_scratch_bytes(box, p.types, t, d, *p.dims), "mla_step", "scratch size")
            need = p.need[t] = int(box[0])
        sp, sn, _ = self._scratch(need)
        f = self._f
        rc = self.lib.lite_mla_step(f(out), out.size, f(x), self.ffi.NULL if delta is None else f(delta), p.norm,
                                    float(norm_eps), t, d, p.ptrs, p.nbytes, p.types, p.q_a_norm, p.kv_norm, *p.dims,
                                    f(ckv), f(kpe), ckv.shape[0], f(cos), f(sin), int(start), float(scale),
                                    float(eps), sp, sn)
        if rc:
            self._check(rc, "mla_step", f"input {x.shape} start {start}")
        return out

    def _mla_pack(self, w: MLAWeights, d: int) -> "_MLAPack":
        """`w` validated for hidden size d and packed for lite_mla_step; cached per object (weights
        are long-lived and frozen) like `_weight`."""
        hit = self._ptrs.get(id(w))
        if hit is not None and hit[0]() is w and hit[1].d == d:
            return hit[1]
        if not isinstance(w, MLAWeights):
            raise BackendError(f"mla_step: weights must be MLAWeights, got {type(w).__name__}")
        pack = _MLAPack.build(self.ffi, w, d)
        if len(self._ptrs) > 4096:
            self._ptrs.clear()
        self._ptrs[id(w)] = (weakref.ref(w), pack)
        return pack

    # ---- a decode step through every layer (optional op: the model runs the per-layer ops where
    # a backend lacks it) ----------------------------------------------------------------------
    def prepare_layers(self, layers: Sequence[DecodeLayer], d: int, k: int) -> "_LayersPack":
        """`layers` validated for hidden size d and K routed experts per token, packed for
        `decode_layers`. The pack holds addresses only: its owner keeps the weights alive."""
        if not layers or not all(isinstance(L, DecodeLayer) for L in layers):
            raise BackendError("prepare_layers: expected a non-empty sequence of DecodeLayer")
        if not 0 <= k <= self.lib.LITE_LAYERS_MAX_K:
            raise BackendError(f"prepare_layers: K={k} outside 0..{self.lib.LITE_LAYERS_MAX_K}")
        return _LayersPack(self, layers, d, k)

    def decode_layers(self, x: np.ndarray, pack: "_LayersPack", caches: Sequence[tuple[np.ndarray, np.ndarray]],
                      cos: np.ndarray, sin: np.ndarray, start: int, scale: float, eps: float, norm_eps: float,
                      n_group: int = 1, topk_group: int = 1, norm: bool = False,
                      route_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """One token through every layer of `pack` in one C call, with the results of the calls
        the model makes per layer (mla_step; norm_route, or add_rmsnorm for a dense layer; moe
        with the always-on MLP first): x `[1, D]` is updated in place up to the last layer's FFN
        output, which is returned `[1, D]` with the routed ids `[L, K]` (-1 for dense layers).
        caches[i] is layer i's (ckv `[S, C]`, kpe `[S, R]`) storage, written at `start`."""
        if not isinstance(pack, _LayersPack) or pack.owner is not self:
            raise BackendError("decode_layers: pack must come from this backend's prepare_layers")
        n, h, nn, r, c, v, q = pack.n, *pack.dims
        x, cos, sin, rows, caches = check_decode_layers(
            x, caches, cos, sin, start, scale, eps, norm_eps, n_group, topk_group, route_scale, n_layer=n, d=pack.d,
            dims=pack.dims, k=pack.k, n_exps=pack.n_exps)
        arr, f = pack.arr, self._f
        for i, (ckv, kpe) in enumerate(caches):
            arr[i].ckv, arr[i].kpe = f(ckv), f(kpe)
        delta = np.empty_like(x)
        ids = np.empty((n, pack.k), np.int32)
        sp, sn, _ = self._scratch(pack.need)
        rc = self.lib.lite_layers(f(x), f(delta), pack.d, arr, n, h, nn, r, c, v, q, rows, f(cos), f(sin),
                                  int(start), float(scale), float(eps), float(norm_eps), pack.k, n_group, topk_group,
                                  bool(norm), float(route_scale), self.ffi.from_buffer("int32_t[]", ids), sp, sn)
        if rc:
            self._check(rc, "decode_layers", f"{n} layers, start {start}")
        return delta, ids

    def moe(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            experts: Mapping[int, FFNWeights], shared: FFNWeights | None) -> np.ndarray:
        x = check_f32("moe input", x, 2)
        t, d = x.shape
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise BackendError(f"moe: ids must be an integer array [T, K], got "
                               f"{getattr(ids, 'dtype', type(ids).__name__)} {getattr(ids, 'shape', '')}")
        weights = check_f32("moe weights", weights, 2)
        if ids.shape != weights.shape or ids.shape[0] != t:
            raise BackendError(f"moe: ids {ids.shape} / weights {weights.shape} do not fit input {x.shape}")
        k = ids.shape[1]
        # The table: the shared MLP, then the distinct routed ids in order of first appearance
        # (the kernel adds each token's terms shared first, then slot by slot, whatever the
        # order); `slots` index it per (token, k). Python dicts beat np.unique by far at decode
        # sizes.
        table: list[MLPLayout] = []
        shared_idx = -1
        if shared is not None:
            if not isinstance(shared, FFNWeights):
                raise BackendError(f"moe: shared must be FFNWeights, got {type(shared).__name__}")
            shared_idx = 0
            table.append(shared.layout("moe shared", d))
        slots: Iterable[int] = ()
        if k:
            flat = ids.ravel().tolist()
            uniq = dict.fromkeys(flat)
            get = getattr(experts, "get", None)
            for e in uniq:
                f = get(e) if get is not None else None
                if f is None:
                    raise BackendError(f"moe: expert {e} was routed to but not supplied")
                if not isinstance(f, FFNWeights):
                    raise BackendError(f"moe: expert {e} must be FFNWeights, got {type(f).__name__}")
                table.append(f.layout(f"moe expert {e}", d))
            slots = map(dict(zip(uniq, range(len(table) - len(uniq), len(table)))).__getitem__, flat)
        n = len(table)
        if n > MOE_MAX_ENTRIES:
            raise BackendError(f"moe: {n} experts in one call exceed the C kernel's limit {MOE_MAX_ENTRIES}")
        out = np.zeros((t, d), np.float32)
        if t == 0 or n == 0:
            return out
        ffi = self.ffi
        # Two arrays carry the table: int64 gate[n], up[n], down[n] (addresses), nbytes[n][3],
        # widths[n]; int32 types[n][3], then the slots [T][K]. Built without comprehensions,
        # whose code runs cold after every kernel.
        gate, up, down, types, nbytes, widths, _ = zip(*table)
        i64 = ffi.new("int64_t[]", [*gate, *up, *down, *chain.from_iterable(nbytes), *widths])
        i32 = ffi.new("int32_t[]", [*chain.from_iterable(types), *slots])
        ptrs = ffi.cast("const uint8_t **", i64)
        key = (t, d, k, max(widths))
        need = self._moe_need.get(key)
        if need is None:
            box = ffi.new("int64_t *")
            self._check(self.lib.lite_moe_scratch_bytes(box, *key), "moe", "scratch size")
            if len(self._moe_need) > 4096:
                self._moe_need.clear()
            need = self._moe_need[key] = int(box[0])
        sp, sn, _ = self._scratch(need)
        rc = self.lib.lite_moe(self._f(out), out.size, self._f(x), t, d, i32 + 3 * n if k else ffi.NULL,
                               self._f(weights) if k else ffi.NULL, k, n, ptrs, ptrs + n, ptrs + 2 * n,
                               i32, i64 + 3 * n, i64 + 6 * n, shared_idx, sp, sn)
        if rc:
            self._check(rc, "moe", f"T={t} D={d} K={k} experts={n}")
        return out


class _LayersPack:
    """Layers as lite_layers takes them: one lite_layer struct per layer (cache pointers are set
    per call), pointing into arrays this object keeps, and the scratch size."""

    def __init__(self, be: CBackend, layers: Sequence[DecodeLayer], d: int, k: int) -> None:
        op, ffi = "decode_layers", be.ffi
        self.owner, self.n, self.d, self.k = be, len(layers), d, k
        self.arr = ffi.new("lite_layer[]", self.n)
        self._keep: list = []
        dims = None
        n_exps = []
        for i, L in enumerate(layers):
            mla = be._mla_pack(L.attn, d)
            if dims not in (None, mla.dims):
                raise BackendError(f"{op}: layer {i} attention dims {mla.dims} differ from layer 0's {dims}")
            dims = mla.dims
            self._keep.append(mla)     # its arrays must outlive the backend's cache of packs
            s = self.arr[i]
            s.attn_w, s.attn_bytes, s.attn_types = mla.ptrs, mla.nbytes, mla.types
            s.attn_norm, s.q_a_norm, s.kv_norm = mla.norm, mla.q_a_norm, mla.kv_norm
            s.ffn_norm = ffi.cast("const float *", check_norm(op, f"layer {i} ffn_norm", L.ffn_norm, d).ctypes.data)
            if (L.router is None) != (len(L.experts) == 0) or (L.router is None and L.always is None):
                raise BackendError(f"{op}: layer {i} needs a router with its experts, or neither and a dense MLP")
            if L.router is not None:
                wp, _, nbytes, qtype = be._weight(op, L.router, len(L.experts), d)
                s.router, s.router_bytes, s.router_type = wp, nbytes, qtype
                n_exps.append(len(L.experts))
                if len(L.experts) < k or len(L.experts) + 1 > MOE_MAX_ENTRIES:
                    raise BackendError(f"{op}: layer {i} has {len(L.experts)} experts for K={k}")
            table = [f.layout(f"{op} layer {i} expert {e}", d) for e, f in enumerate(L.experts)]
            table.append(L.always.layout(f"{op} layer {i} always-on MLP", d) if L.always is not None
                         else MLPLayout(0, 0, 0, (0, 0, 0), (0, 0, 0), 0, d))
            gate, up, down, types, nbytes, widths, _ = zip(*table)
            ptrs = ffi.new("const uint8_t *[]", [ffi.cast("const uint8_t *", a) for a in (*gate, *up, *down)])
            i64 = ffi.new("int64_t[]", [*chain.from_iterable(nbytes), *widths])
            i32 = ffi.new("int32_t[]", list(chain.from_iterable(types)))
            self._keep += [ptrs, i64, i32]
            m = len(table)
            s.has_always, s.n_exp = L.always is not None, m - 1
            s.gate, s.up, s.down = ptrs, ptrs + m, ptrs + 2 * m
            s.types, s.nbytes, s.ffn = i32, i64, i64 + 3 * m
        self.dims: tuple[int, ...] = dims
        self.n_exps = sorted(set(n_exps)) or [max(k, 1)]
        box = ffi.new("int64_t *")
        be._check(be.lib.lite_layers_scratch_bytes(box, self.arr, self.n, d, *dims, k), op, "scratch size")
        self.need = int(box[0])


class _MLAPack:
    """One layer's attention weights as lite_mla_step takes them: pointer, byte size and type
    arrays in the order q (or q_a), q_b, kv_a, k_b, v_b, out; the input, q_a and kv_a norms; the
    dims (H, N, R, C, V, Q); scratch bytes by token count. Holds addresses only, never the arrays
    (the cache must not keep a closed model's map alive); valid while the MLAWeights lives."""

    def __init__(self, ffi, parts: list[QTensor | None], norms: tuple[np.ndarray, np.ndarray | None, np.ndarray],
                 dims: tuple[int, ...], d: int) -> None:
        self.d, self.dims = d, dims
        self.r, self.c = dims[2], dims[3]
        self.ptrs = ffi.new("const uint8_t *[]",
                            [ffi.NULL if w is None else ffi.cast("const uint8_t *", w.data.ctypes.data) for w in parts])
        self.nbytes = ffi.new("int64_t[]", [0 if w is None else w.data.nbytes for w in parts])
        self.types = ffi.new("int32_t[]", [0 if w is None else int(w.qtype) for w in parts])
        self.norm, self.q_a_norm, self.kv_norm = (ffi.NULL if a is None else ffi.cast("const float *", a.ctypes.data)
                                                  for a in norms)
        self.need: dict[int, int] = {}

    @staticmethod
    def build(ffi, w: MLAWeights, d: int) -> "_MLAPack":
        op = "mla_step"
        h, n, r, c, v, q = dims = mla_dims(op, w, d)
        if c > MLA_MAX_C:
            raise BackendError(f"{op}: latent size {c} exceeds the C kernel's limit {MLA_MAX_C}")
        norms = (check_norm(op, "norm", w.norm, d), check_norm(op, "q_a_norm", w.q_a_norm, q) if q else None,
                 check_norm(op, "kv_a_norm", w.kv_a_norm, c))
        first = w.q if w.q is not None else w.q_a
        return _MLAPack(ffi, [first, w.q_b if q else None, w.kv_a, w.k_b, w.v_b, w.out], norms, dims, d)


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
