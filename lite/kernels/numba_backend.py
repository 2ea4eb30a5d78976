"""The Numba backend: the pure-Python fallback CPU backend, compiled with `numba.njit`
(`parallel=True`, `cache=True`; threads across output rows, heads or expert rows).

Every op has the meaning of `reference.py`, with one choice of numerics the C backend makes too:
a product of one or two tokens with quantized weights (decode's, the bulk of its bytes) quantizes
the activations to 8-bit blocks (ggml's Q8_0 for Q4_0 and Q8_0; for the K-quants 256-blocks as
C's Q8_K) and sums integer products, with one `vpdpbusd` per 64 weights where numba compiles for
AVX-512 VNNI. Against the float32 loops it replaced (weights dequantized in registers times
float32 x): one thread, Q4_0 1408×2048 from L2, 8.4 → 14.5 GB/s; decode of a Q4_0 file 1.16x,
and 1.09x more with a 2 KiB prefetch; of a q4_k_m file 1.27x for Q4_K and Q6_K (alternating in
one process). Written as plain int32 loops an earlier try took 1.4x the float loops' time, which
is why the integer path is written as explicit vectors. Every other product (float weights; more
tokens) dequantizes weights block by block in registers and multiplies them into float32
activations, so it agrees with the reference to float32 rounding (only the order of additions
differs). For T > 2
tokens a tile of 8 weight rows is decoded once into a thread-local float buffer and reused for
every token (4 rows per pass over x).

Threads: `set_threads(n)` → `numba.set_num_threads`; kernels parallelise over chunks of output
rows (matmul, MoE), (head, chunk of rows) pairs (matmul_heads), (token, 8-head group) pairs
(attention) or tokens (row ops); calls with little work (a small matmul, the row ops of one
decode token) run on the calling thread. Numba's threading layers are not re-entrant from
several Python threads at once: call from one thread.

This module validates every input (dtype, rank, shapes, byte counts, expert ids) and raises
`BackendError` naming the op and argument before any kernel runs; the kernels in
`numba_kernels.py` assume valid inputs.

Shape legend: T tokens, S cached positions, D hidden, H heads, C kv_lora_rank, R rope dims,
K experts per token, F expert width, N rows of a weight.
"""
from __future__ import annotations

import os
from typing import Mapping

import numba
import numpy as np
from gguf.constants import GGML_QUANT_SIZES

from ..errors import BackendError
from . import composed
from . import numba_kernels as nk
from .base import FFNWeights, QTensor, QType, check_f32, check_heads_fit, check_mla, check_rmsnorm, check_rope

# Without TBB, numba's threading layer is OpenMP (libgomp), loaded when numba starts its thread
# pool (the first parallel kernel or set_num_threads), so this still comes in time. Idle workers
# must sleep, not spin: a decode step opens ~270 short parallel regions, and on a machine whose
# cores are busy with other work, spinning workers made a region cost ~8 ms instead of ~20 µs
# (measured on two shared cores; the C backend chose the same). An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

SUPPORTED = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_K, QType.Q6_K)


def set_threads(n: int) -> None:
    """Use `n` threads in every kernel (1 ≤ n ≤ numba.config.NUMBA_NUM_THREADS)."""
    top = numba.config.NUMBA_NUM_THREADS
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= top:
        raise BackendError(f"numba set_threads: n must be an integer in 1..{top}, got {n!r}")
    numba.set_num_threads(int(n))


def get_threads() -> int:
    return numba.get_num_threads()


def _check_weight(op: str, arg: str, w: QTensor, ndim: int = 2) -> np.ndarray:
    """Validate a QTensor and return its bytes as a C-contiguous uint8 array."""
    if not isinstance(w, QTensor):
        raise BackendError(f"{op}: {arg} must be a QTensor, got {type(w).__name__}")
    if w.qtype not in SUPPORTED:
        raise BackendError(f"{op}: {arg} {w.name} has block type {QType(w.qtype).name}, not supported "
                           f"(supported: {', '.join(t.name for t in SUPPORTED)})")
    if len(w.shape) != ndim:
        raise BackendError(f"{op}: {arg} {w.name} must be {ndim}-D, got shape {w.shape}")
    block, size = GGML_QUANT_SIZES[w.qtype]
    cols = w.shape[-1]
    if cols <= 0 or cols % block:
        raise BackendError(f"{op}: {arg} {w.name} row length {cols} is not a positive multiple of the "
                           f"{w.qtype.name} block size {block}")
    want = (*w.shape[:-1], cols // block * size)
    data = w.data
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or tuple(data.shape) != want:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BackendError(f"{op}: {arg} {w.name} data is truncated or mis-shaped: expected uint8 "
                           f"{want} for {w.qtype.name} {w.shape}, got {got}")
    return np.ascontiguousarray(data)


class NumbaBackend:
    name = "numba"

    set_threads = staticmethod(set_threads)
    get_threads = staticmethod(get_threads)

    # -- matmul --------------------------------------------------------------------------------
    def matmul(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        x = check_f32("matmul input", x, 2)
        data = _check_weight("matmul", "weight", w)
        if x.shape[1] != w.shape[1]:
            raise BackendError(f"matmul: input [T, {x.shape[1]}] does not fit weight {w.name} {w.shape}")
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        if x.shape[0] and w.shape[0]:
            nk.matmul(x, data, int(w.qtype), out, nk.LUT_F16, nk.LUT_BF16, nk.N16)
        return out

    def matmul_heads(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        """x `[T, H, cols]` times each head's own weight `w[h]` `[N, cols]` (w `[H, N, cols]`) →
        `[T, H, N]` in one kernel call (MLA's W_UK and W_UV; one call per head cost a thread-pool
        wake-up per head)."""
        x = check_f32("matmul_heads input", x, 3)
        data = _check_weight("matmul_heads", "weight", w, ndim=3)
        check_heads_fit(x, w)
        t, h, cols = x.shape
        out = np.empty((h, t, w.shape[1]), np.float32)
        if t and w.shape[1]:
            xh = np.ascontiguousarray(x.transpose(1, 0, 2))  # each head's [T, cols] contiguous
            nk.matmul_heads(xh, data, int(w.qtype), out, nk.LUT_F16, nk.LUT_BF16, nk.N16)
        return np.ascontiguousarray(out.transpose(1, 0, 2))

    # -- elementwise / row ops -----------------------------------------------------------------
    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        x, w = check_rmsnorm(x, w, eps)
        out = np.empty_like(x)
        if x.size:
            nk.rmsnorm(x, w, np.float32(eps), out)
        return out

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        x, cos, sin = check_rope(x, cos, sin)
        out = np.empty_like(x)
        if x.size:
            nk.rope(x, cos, sin, out)
        return out

    def softmax(self, x: np.ndarray) -> np.ndarray:
        x = check_f32("softmax input", x, 2)
        if x.shape[1] == 0 and x.shape[0]:
            raise BackendError(f"softmax: rows must not be empty, got shape {x.shape}")
        out = np.empty_like(x)
        if x.size:
            nk.softmax(x, out)
        return out

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        if not isinstance(g, np.ndarray) or not isinstance(u, np.ndarray):
            raise BackendError("silu_mul: g and u must be float32 arrays")
        if g.shape != u.shape:
            raise BackendError(f"silu_mul: shapes {g.shape} and {u.shape} differ")
        g = check_f32("silu_mul g", g, g.ndim)
        u = check_f32("silu_mul u", u, u.ndim)
        out = np.empty_like(g)
        nk.silu_mul(g.reshape(-1), u.reshape(-1), out.reshape(-1))
        return out

    # -- attention -----------------------------------------------------------------------------
    def mla_attention(self, q_lat: np.ndarray, q_pe: np.ndarray, ckv: np.ndarray, kpe: np.ndarray,
                      scale: float, start: int) -> np.ndarray:
        a = check_mla(q_lat, q_pe, ckv, kpe, scale, start)
        q_lat, q_pe, ckv, kpe, start = a.q_lat, a.q_pe, a.ckv, a.kpe, a.start
        out = np.empty_like(q_lat)
        if q_lat.size:
            nk.mla_attention(q_lat, q_pe, ckv, kpe, np.float32(scale), int(start), out)
        return out

    # -- MoE -----------------------------------------------------------------------------------
    def moe(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            experts: Mapping[int, FFNWeights], shared: FFNWeights | None) -> np.ndarray:
        x = check_f32("moe input", x, 2)
        t, d = x.shape
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise BackendError(f"moe: ids must be a 2-D integer array [T, K], got "
                               f"{getattr(ids, 'dtype', type(ids).__name__)} {getattr(ids, 'shape', '')}")
        weights = check_f32("moe weights", weights, 2)
        if ids.shape != weights.shape or ids.shape[0] != t:
            raise BackendError(f"moe: ids {ids.shape} / weights {weights.shape} do not fit input {x.shape}")

        keep: list[np.ndarray] = []  # contiguous copies (if any) must outlive the kernel call
        rows: list[tuple] = []       # (addr×3, row bytes×3, qtype×3, F) per expert in call order

        def add(label: str, ffn: FFNWeights) -> None:
            if not isinstance(ffn, FFNWeights):
                raise BackendError(f"moe: {label} must be FFNWeights, got {type(ffn).__name__}")
            try:
                # Checked once and cached on the object (a decode step passes the same experts
                # every token); the object holds the bytes the addresses point at.
                lay = ffn.layout(f"moe {label}", d)
            except BackendError:    # not C-contiguous (copied below), or refused there by name
                lay = None
            if lay is not None:
                f = lay.width
                rows.append(((lay.gate, lay.up, lay.down), (lay.nbytes[0] // f, lay.nbytes[1] // f, lay.nbytes[2] // d),
                             lay.types, f))
                return
            g = _check_weight("moe", f"{label} gate", ffn.gate)
            u = _check_weight("moe", f"{label} up", ffn.up)
            dn = _check_weight("moe", f"{label} down", ffn.down)
            f = ffn.gate.shape[0]
            if ffn.gate.shape != (f, d) or ffn.up.shape != (f, d) or ffn.down.shape != (d, f):
                raise BackendError(f"moe: {label} shapes gate {ffn.gate.shape} up {ffn.up.shape} down "
                                   f"{ffn.down.shape} do not fit hidden size {d} (want [F, {d}], "
                                   f"[F, {d}], [{d}, F])")
            if f == 0:
                raise BackendError(f"moe: {label} has expert width 0")
            keep.extend((g, u, dn))
            rows.append(((g.ctypes.data, u.ctypes.data, dn.ctypes.data),
                         (g.shape[1], u.shape[1], dn.shape[1]),
                         (int(ffn.gate.qtype), int(ffn.up.qtype), int(ffn.down.qtype)), f))

        # Token lists per expert as plain lists: at decode sizes (one token, K ids) list and dict
        # work is a fraction of numpy's per-call costs (unique, argsort, a mask per expert).
        tok_of: list[int] = []
        wt_of: list[float] = []
        counts: list[int] = []
        if shared is not None:
            add("shared", shared)
            tok_of.extend(range(t))
            wt_of.extend([1.0] * t)
            counts.append(t)
        if ids.size:
            # Experts in order of first appearance (a dict keeps it), so that one token's terms
            # add shared first, then slot by slot (the kernel adds expert by expert in table order).
            kk = ids.shape[1]
            slots: dict[int, list[int]] = {}
            for i, e in enumerate(ids.ravel().tolist()):
                slots.setdefault(e, []).append(i)
            wflat = weights.ravel().tolist()
            for e, where in slots.items():
                if e not in experts:
                    raise BackendError(f"moe: expert {e} was routed to but not supplied")
                add(f"expert {e}", experts[e])
                tok_of.extend(i // kk for i in where)
                wt_of.extend(wflat[i] for i in where)
                counts.append(len(where))
        out = np.zeros_like(x)
        if not rows or t == 0:
            return out
        addrs = np.array([r[0] for r in rows], np.int64)
        rbytes = np.array([r[1] for r in rows], np.int64)
        qts = np.array([r[2] for r in rows], np.int64)
        widths = np.array([r[3] for r in rows], np.int64)
        offs = np.zeros(len(rows) + 1, np.int64)
        offs[1:] = np.cumsum(counts)
        toks, wts = np.array(tok_of, np.int64), np.array(wt_of, np.float32)
        nk.moe(x, addrs, rbytes, qts, widths, offs, toks, wts, nk.LUT_F16, nk.LUT_BF16, nk.N16, out)
        return out

    # -- fused ops: the compositions of the ops above (composed.py) --------------------------------
    add_rmsnorm, route, norm_route = composed.add_rmsnorm, composed.route, composed.norm_route
    mla_prep, mla_step = composed.mla_prep, composed.mla_step
