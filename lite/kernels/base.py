"""The Backend protocol: the small op set every compute backend implements (reference numpy,
Numba, C, CUDA), plus the weight handles kernels receive. Fused ops (a residual add with the next
norm, routing, a whole attention sublayer) are optional: their compositions of the core ops
(composed.py) define them and serve any backend without its own; the C backend's own ones replace
~20 calls per decode layer with 3, since Python's cost per call dominates at one token. The C and
CUDA backends also have `prepare_layers`/`decode_layers` (optional, no composition): one decode
step through every `DecodeLayer` in one call, which the model uses when nothing needs the layers'
insides and every expert has a fixed address (on CUDA also only when every weight fits the
VRAM budget).

Shape legend: T tokens, S cached positions, D hidden, H heads, C kv_lora_rank, R rope dims,
K experts per token, F expert width, N rows (output features) of a weight.

All activations are C-contiguous float32. Weights arrive as `QTensor`: raw ggml block bytes,
exactly as stored in the GGUF file (usually a zero-copy view of the memory map).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Protocol

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import BackendError

QType = GGMLQuantizationType


@dataclass(frozen=True)
class QTensor:
    """A weight in ggml block format.

    `shape` is the logical numpy shape (last axis = row length in weights); `data` is uint8 of
    shape `(*shape[:-1], row_bytes)`. A 3-D expert tensor `[E, N, cols]` yields per-expert views
    with `expert(e)`.
    """

    name: str
    qtype: QType
    shape: tuple[int, ...]
    data: np.ndarray

    def __post_init__(self) -> None:
        block, size = GGML_QUANT_SIZES[self.qtype]
        cols = self.shape[-1]
        if cols % block:
            raise BackendError(f"tensor {self.name}: row length {cols} is not a multiple of the "
                               f"{self.qtype.name} block size {block}")
        want = (*self.shape[:-1], cols // block * size)
        if self.data.dtype != np.uint8 or tuple(self.data.shape) != want:
            raise BackendError(f"tensor {self.name}: expected uint8 data of shape {want} for "
                               f"{self.qtype.name} {self.shape}, got {self.data.dtype} {self.data.shape}")

    @property
    def row_bytes(self) -> int:
        return self.data.shape[-1]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def expert(self, e: int) -> "QTensor":
        return QTensor(f"{self.name}[{e}]", self.qtype, self.shape[1:], self.data[e])

    @staticmethod
    def from_float(name: str, a: np.ndarray) -> "QTensor":
        """Wrap a float32 array as an F32 QTensor (tests, small resident tensors)."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        return QTensor(name, QType.F32, a.shape, a.view(np.uint8).reshape(*a.shape[:-1], -1))


class MLPLayout(NamedTuple):
    """A validated MLP as native kernels take it: the byte addresses of gate, up and down, their
    block types and byte sizes, the width F, and the hidden size D it was checked against."""

    gate: int
    up: int
    down: int
    types: tuple[int, int, int]
    nbytes: tuple[int, int, int]
    width: int
    d: int


@dataclass(frozen=True)
class FFNWeights:
    """One SiLU-gated MLP: `down(silu(gate(x)) * up(x))`. gate/up `[F, D]`, down `[D, F]`."""

    gate: QTensor
    up: QTensor
    down: QTensor

    def layout(self, op: str, d: int) -> MLPLayout:
        """This MLP checked for hidden size `d` (errors name `op`). The object is immutable, so the
        result is cached on it: a decode step asks once per expert per layer, and a cache on the
        object dies with it (the pager hands out new objects for every call)."""
        lay = self.__dict__.get("_layout")
        if lay is not None and lay.d == d:
            return lay
        g = self.gate
        width = g.shape[0] if isinstance(g, QTensor) and len(g.shape) == 2 else None
        check_weight(f"{op} gate", g, None, d)
        check_weight(f"{op} up", self.up, width, d)
        check_weight(f"{op} down", self.down, d, width)
        parts = (g, self.up, self.down)
        lay = MLPLayout(*(w.data.ctypes.data for w in parts), tuple(int(w.qtype) for w in parts),
                        tuple(w.data.nbytes for w in parts), width, d)
        object.__setattr__(self, "_layout", lay)    # frozen: the one sanctioned way to cache
        return lay

    def __getstate__(self) -> dict:
        # A cached layout holds this process's addresses: never let a copy carry it elsewhere.
        return {k: v for k, v in self.__dict__.items() if k != "_layout"}


@dataclass(frozen=True)
class MLAWeights:
    """One layer's attention sublayer weights. Shapes: norm `[D]` (its input norm); q `[H·(N+R), D]`
    (direct query) or the q-LoRA q_a `[Q, D]`, q_a_norm `[Q]`, q_b `[H·(N+R), Q]`; kv_a `[C+R, D]`,
    kv_a_norm `[C]`; k_b (W_UK) `[H, C, N]`, v_b (W_UV) `[H, V, C]`, out `[D, H·V]`."""

    norm: np.ndarray
    q: QTensor | None
    q_a: QTensor | None
    q_a_norm: np.ndarray | None
    q_b: QTensor | None
    kv_a: QTensor
    kv_a_norm: np.ndarray
    k_b: QTensor
    v_b: QTensor
    out: QTensor


@dataclass(frozen=True, eq=False)
class DecodeLayer:
    """One whole layer for `decode_layers`: attention weights, the FFN norm, and either a router
    `[E, D]` with every routed expert by id (`experts[e]`, fixed for the model's lifetime) or no
    router and no experts (a dense layer); `always` is the shared experts' or the dense MLP."""

    attn: MLAWeights
    ffn_norm: np.ndarray
    router: QTensor | None
    experts: tuple[FFNWeights, ...]
    always: FFNWeights | None


class Backend(Protocol):
    """What model code may call. Every method validates its inputs and raises BackendError."""

    name: str

    def matmul(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        """x `[T, cols]` → `[T, N]` = x · Wᵀ for a 2-D weight `[N, cols]` of any supported type."""
        ...

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        """x `[T, D]`, w `[D]` → `w * x / sqrt(mean(x²) + eps)` per row."""
        ...

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x `[T, H, R]`, cos/sin `[T, R/2]` → interleaved-pair rotation of (x[2i], x[2i+1])."""
        ...

    def softmax(self, x: np.ndarray) -> np.ndarray:
        """Row-wise softmax of `[T, N]`, computed in float32 with the max subtracted."""
        ...

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        """`silu(g) * u`, elementwise, same shapes."""
        ...

    def mla_attention(self, q_lat: np.ndarray, q_pe: np.ndarray, ckv: np.ndarray, kpe: np.ndarray,
                      scale: float, start: int) -> np.ndarray:
        """Absorbed MLA attention in latent space.

        q_lat `[T, H, C]` (no-rope query already multiplied by W_UK), q_pe `[T, H, R]` (roped),
        ckv `[S, C]`, kpe `[S, R]` (roped) for cache positions 0..S-1. Query t sits at absolute
        position start+t and attends causally to positions 0..start+t (requires S ≥ start+T).
        Returns `[T, H, C]` = softmax((q_lat·ckvᵀ + q_pe·kpeᵀ)·scale) · ckv.
        """
        ...

    def moe(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            experts: Mapping[int, FFNWeights], shared: FFNWeights | None) -> np.ndarray:
        """x `[T, D]`, ids int32 `[T, K]`, weights float32 `[T, K]` →
        `Σ_k weights[t,k] · expert_{ids[t,k]}(x[t]) + shared(x[t])` (shared omitted when None).
        `experts` maps every id present in `ids` to its weights. K may be 0 (a dense MLP passed
        as `shared`). Implementations group tokens by expert so each expert is read once. For one
        token the terms are added in the order shared, then k ascending (decode in moe.ffn relies
        on it to match the canonical partition bit for bit); a backend that does so for every
        token, each term rounded before it adds, sets `moe_slot_order = True` (prefill then hands
        a layer's tokens over in one call). A row's result does not depend on the other rows of
        the call (prefill hands a layer's pairs over in one call or chunk by chunk). A backend
        that copies the weights it is given into device memory for each call sets
        `moe_streams_weights = True`: callers then pass a few experts a call."""
        ...

    # Fused ops: optional; `composed.fused(be, name)` gives the backend's own, else the composition.

    def add_rmsnorm(self, x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float) -> np.ndarray:
        """x += delta in place (x C-contiguous float32 `[T, D]`; no add when delta is None), then
        `rmsnorm(x, w, eps)`: a residual add and the next norm."""
        ...

    def route(self, logits: np.ndarray, k: int, n_group: int = 1, topk_group: int = 1, norm: bool = False,
              scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Router logits `[T, E]` → (ids int32 `[T, K]`, weights `[T, K]`, probs `[T, E]`):
        `composed.topk_route` of `softmax(logits)`."""
        ...

    def norm_route(self, x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float, router: QTensor,
                   k: int, n_group: int = 1, topk_group: int = 1, norm: bool = False,
                   scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The FFN sublayer's input: (h, ids, weights, probs) with h = `add_rmsnorm(x, delta, w,
        eps)` and the rest `route(matmul(h, router), k, ...)`."""
        ...

    def mla_prep(self, q: np.ndarray, kv: np.ndarray, norm: np.ndarray, eps: float, cos: np.ndarray,
                 sin: np.ndarray, ckv: np.ndarray, kpe: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """MLA's inputs from the projections q `[T, H, N+R]` and kv `[T, C+R]`: writes cache rows
        start.. of ckv `[S, C]` (rmsnorm of kv's latents) and kpe `[S, R]` (roped kv rope dims) in
        place; returns (q_nope `[T, H, N]`, roped q_pe `[T, H, R]`)."""
        ...

    def mla_step(self, x: np.ndarray, delta: np.ndarray | None, w: MLAWeights, ckv: np.ndarray, kpe: np.ndarray,
                 cos: np.ndarray, sin: np.ndarray, start: int, scale: float, eps: float,
                 norm_eps: float) -> np.ndarray:
        """A whole attention sublayer at positions start..: x `[T, D]` += delta as `add_rmsnorm`
        (norm w.norm, norm_eps), then the attention output `[T, D]` of the normalised x; the
        layer's cache `ckv` `[S, C]` / `kpe` `[S, R]` updated in place (latent norms use eps)."""
        ...


_F32 = np.dtype(np.float32)
ROUTE_MAX_E = 1024     # experts a router may have (the C and CUDA kernels' limit)


def check_f32(name: str, a: np.ndarray, ndim: int) -> np.ndarray:
    """Validate an activation argument before it reaches a kernel (a few times per kernel call:
    float32 arrays almost always carry numpy's one float32 dtype, so identity decides first)."""
    if not isinstance(a, np.ndarray) or (a.dtype is not _F32 and a.dtype != _F32) or a.ndim != ndim:
        got = f"{a.dtype} with {a.ndim} dims" if isinstance(a, np.ndarray) else type(a).__name__
        raise BackendError(f"{name}: expected a float32 array with {ndim} dims, got {got}")
    return np.ascontiguousarray(a)


class MLAArgs(NamedTuple):
    """`mla_attention`'s inputs, validated once for every backend (a NamedTuple: built on every
    call, several times cheaper than a frozen dataclass)."""

    q_lat: np.ndarray
    q_pe: np.ndarray
    ckv: np.ndarray
    kpe: np.ndarray
    start: int
    scale: float

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """(T, H, C, R, S)."""
        t, h, c = self.q_lat.shape
        return t, h, c, self.q_pe.shape[2], self.ckv.shape[0]


def check_mla(q_lat: np.ndarray, q_pe: np.ndarray, ckv: np.ndarray, kpe: np.ndarray, scale: float,
              start: int) -> MLAArgs:
    q_lat, q_pe = check_f32("mla q_lat", q_lat, 3), check_f32("mla q_pe", q_pe, 3)
    ckv, kpe = check_f32("mla ckv", ckv, 2), check_f32("mla kpe", kpe, 2)
    if not isinstance(start, (int, np.integer)) or isinstance(start, bool):
        raise BackendError(f"mla_attention: start must be an integer, got {start!r}")
    if not math.isfinite(scale):
        raise BackendError(f"mla_attention: scale must be finite, got {scale!r}")
    t, h, c = q_lat.shape
    s = ckv.shape[0]
    if (q_pe.shape[:2] != (t, h) or ckv.shape[1] != c or kpe.shape != (s, q_pe.shape[2]) or start < 0
            or s < start + t or h == 0 or c == 0):
        raise BackendError(f"mla_attention: inconsistent shapes q_lat {q_lat.shape} q_pe {q_pe.shape} "
                           f"ckv {ckv.shape} kpe {kpe.shape} start {start}")
    return MLAArgs(q_lat, q_pe, ckv, kpe, int(start), float(scale))


def check_weight(op: str, w: QTensor, rows: int | None, cols: int | None) -> None:
    """Validate a 2-D weight before its bytes reach native code: type, shape (against `rows` /
    `cols` when given), whole blocks per row, and a C-contiguous buffer of exactly the right size."""
    from .dequant import SUPPORTED
    if not isinstance(w, QTensor):
        raise BackendError(f"{op}: weight must be a QTensor, got {type(w).__name__}")
    if w.qtype not in SUPPORTED:
        raise BackendError(f"{op}: weight {w.name} has unsupported type {QType(w.qtype).name} "
                           f"(supported: {', '.join(t.name for t in SUPPORTED)})")
    if len(w.shape) != 2:
        raise BackendError(f"{op}: weight {w.name} must be 2-D, got shape {w.shape}")
    n, c = w.shape
    if (rows is not None and n != rows) or (cols is not None and c != cols):
        raise BackendError(f"{op}: weight {w.name} has shape {w.shape}, expected "
                           f"[{rows if rows is not None else 'N'}, {cols if cols is not None else 'cols'}]")
    block, size = GGML_QUANT_SIZES[w.qtype]
    if c % block:
        raise BackendError(f"{op}: weight {w.name} row length {c} is not a multiple of the "
                           f"{w.qtype.name} block size {block}")
    d = w.data
    if not isinstance(d, np.ndarray) or d.dtype != np.uint8 or not d.flags.c_contiguous:
        raise BackendError(f"{op}: weight {w.name} data must be C-contiguous uint8")
    if d.nbytes != n * (c // block * size):
        raise BackendError(f"{op}: weight {w.name} data holds {d.nbytes} bytes, {w.qtype.name} "
                           f"{w.shape} needs {n * (c // block * size)}")


def check_norm(op: str, name: str, a: np.ndarray, n: int) -> np.ndarray:
    """A norm weight native code reads in place (its address is kept): C-contiguous float32 `[n]`."""
    if not isinstance(a, np.ndarray) or a.dtype != _F32 or a.shape != (n,) or not a.flags.c_contiguous:
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise BackendError(f"{op}: {name} must be a C-contiguous float32 array [{n}], got {got}")
    return a


def check_heads_weight(op: str, w: QTensor, rows: int | None = None, cols: int | None = None) -> None:
    """A per-head weight `[H, N, cols]`, checked as the 2-D `[H*N, cols]` weight it is byte for byte
    (`cols` against its last axis when given; `rows` is unused: the head count is the caller's)."""
    if not isinstance(w, QTensor) or len(w.shape) != 3:
        raise BackendError(f"{op}: {getattr(w, 'name', w)} must be a 3-D QTensor [H, rows, cols]")
    data = w.data
    if not isinstance(data, np.ndarray) or not data.flags.c_contiguous:
        raise BackendError(f"{op}: weight {w.name} data must be C-contiguous uint8")
    h, n, c = w.shape
    check_weight(op, QTensor(w.name, w.qtype, (h * n, c), data.reshape(h * n, -1)), h * n, cols)


def mla_dims(op: str, w: MLAWeights, d: int) -> tuple[int, int, int, int, int, int]:
    """One layer's attention weights checked against each other and hidden size d, for the native
    whole-layer ops: (H, N, R, C, V, Q), Q = 0 without a q-LoRA."""
    for part in (w.k_b, w.v_b):
        check_heads_weight(op, part)
    h, c, n = w.k_b.shape
    if w.v_b.shape[0] != h or w.v_b.shape[2] != c:
        raise BackendError(f"{op}: v_b {w.v_b.shape} does not fit k_b {w.k_b.shape} (want [{h}, V, {c}])")
    v = w.v_b.shape[1]
    check_weight(op, w.kv_a, None, d)
    r = w.kv_a.shape[0] - c
    if r <= 0 or r % 2:
        raise BackendError(f"{op}: kv_a {w.kv_a.shape} leaves {r} rope dims for C={c} (want a positive even count)")
    hq = h * (n + r)
    if w.q is not None:
        check_weight(op, w.q, hq, d)
        q = 0
    else:
        check_weight(op, w.q_a, None, d)
        q = w.q_a.shape[0]
        check_weight(op, w.q_b, hq, q)
    check_weight(op, w.out, d, h * v)
    return h, n, r, c, v, q


def check_heads_fit(x: np.ndarray, w: QTensor) -> None:
    """matmul_heads: the input `[T, H, cols]` (already a checked float32 array) must fit the
    per-head weight `[H, N, cols]`."""
    _, h, cols = x.shape
    shape = getattr(w, "shape", None)
    if not isinstance(w, QTensor) or len(shape) != 3 or shape[0] != h or shape[2] != cols:
        raise BackendError(f"matmul_heads: input [T, {h}, {cols}] does not fit weight {getattr(w, 'name', w)} "
                           f"{shape} (want [{h}, N, {cols}])")


def check_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """`rmsnorm`'s inputs validated once for every backend: x `[T, D]`, w `[D]`, eps ≥ 0."""
    x, w = check_f32("rmsnorm input", x, 2), check_f32("rmsnorm weight", w, 1)
    if w.shape != (x.shape[1],):
        raise BackendError(f"rmsnorm: weight shape {w.shape} does not match hidden size {x.shape[1]}")
    if not math.isfinite(eps) or eps < 0:      # math, not numpy: ~30x cheaper on a scalar
        raise BackendError(f"rmsnorm: eps must be a finite non-negative number, got {eps!r}")
    return x, w


def check_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`rope`'s inputs validated once for every backend: x `[T, H, R]`, tables `[T, R/2]`."""
    x = check_f32("rope input", x, 3)
    cos, sin = check_f32("rope cos", cos, 2), check_f32("rope sin", sin, 2)
    t, _, r = x.shape
    if r % 2 or cos.shape != (t, r // 2) or sin.shape != (t, r // 2):
        raise BackendError(f"rope: tables {cos.shape}/{sin.shape} do not fit input {x.shape}")
    return x, cos, sin


def check_residual(x: np.ndarray, name: str) -> np.ndarray:
    """An array an op updates in place: float32, 2-D, C-contiguous and writeable (never copied)."""
    if (not isinstance(x, np.ndarray) or x.dtype != _F32 or x.ndim != 2 or not x.flags.c_contiguous
            or not x.flags.writeable):
        got = f"{x.dtype} {x.shape} {x.flags.c_contiguous=} {x.flags.writeable=}" if isinstance(x, np.ndarray) \
            else type(x).__name__
        raise BackendError(f"{name}: expected a writeable C-contiguous float32 array with 2 dims, got {got}")
    return x


def check_residual_add(op: str, x: np.ndarray, delta: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """x `[T, D]` to be updated in place by delta `[T, D]` (or None)."""
    x = check_residual(x, f"{op} input")
    if delta is not None:
        delta = check_f32(f"{op} delta", delta, 2)
        if delta.shape != x.shape:
            raise BackendError(f"{op}: delta {delta.shape} does not match input {x.shape}")
    return x, delta


def check_add_rmsnorm(x: np.ndarray, delta: np.ndarray | None, w: np.ndarray,
                      eps: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """`add_rmsnorm`'s inputs validated once for every backend."""
    x, delta = check_residual_add("add_rmsnorm", x, delta)
    _, w = check_rmsnorm(x, w, eps)
    return x, delta, w


def check_route_args(op: str, e: int, k: int, n_group: int, topk_group: int, scale: float) -> None:
    """Routing options for E experts (in n_group equal groups), validated once for every backend."""
    if not 0 < e <= ROUTE_MAX_E or not 0 <= k <= e:
        raise BackendError(f"{op}: E={e}, K={k} outside 1..{ROUTE_MAX_E} / 0..E")
    if n_group < 1 or e % n_group or not 1 <= topk_group <= n_group:
        raise BackendError(f"{op}: {e} experts do not split into {n_group} groups (top {topk_group})")
    if not math.isfinite(scale):
        raise BackendError(f"{op}: scale must be finite, got {scale!r}")


def check_decode_layers(x: np.ndarray, caches, cos: np.ndarray, sin: np.ndarray, start: int, scale: float,
                        eps: float, norm_eps: float, n_group: int, topk_group: int, route_scale: float, *,
                        n_layer: int, d: int, dims: tuple[int, ...], k: int,
                        n_exps: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, list]:
    """`decode_layers`' inputs validated once for the native backends, against a pack of n_layer
    layers of hidden size d, attention dims (H, N, R, C, V, Q), K and the routers' expert counts:
    x `[1, D]` (updated in place), rope tables `[1, R/2]`, start within the caches' rows, and each
    layer's (ckv `[S, C]`, kpe `[S, R]`). Returns (x, cos, sin, S, caches)."""
    x = check_residual(x, "decode_layers input")
    r, c = dims[2], dims[3]
    if x.shape != (1, d) or len(caches) != n_layer:
        raise BackendError(f"decode_layers: input {x.shape} and {len(caches)} caches do not fit "
                           f"{n_layer} layers of D={d}")
    cos, sin = check_f32("decode_layers cos", cos, 2), check_f32("decode_layers sin", sin, 2)
    for e in n_exps:
        check_route_args("decode_layers", e, k, n_group, topk_group, route_scale)
    rows = caches[0][0].shape[0] if caches and isinstance(caches[0][0], np.ndarray) else -1
    if (cos.shape != (1, r // 2) or sin.shape != cos.shape or not isinstance(start, (int, np.integer))
            or isinstance(start, bool) or not 0 <= start < rows or not math.isfinite(scale) or not eps >= 0
            or not norm_eps >= 0):
        raise BackendError(f"decode_layers: tables {cos.shape}/{sin.shape}, start {start!r} (cache rows "
                           f"{rows}), scale {scale!r}, eps {eps!r}/{norm_eps!r} do not fit (R={r})")
    checked = []
    for i, (ckv, kpe) in enumerate(caches):
        ckv, kpe = check_residual(ckv, "decode_layers ckv cache"), check_residual(kpe, "decode_layers kpe cache")
        if ckv.shape != (rows, c) or kpe.shape != (rows, r):
            raise BackendError(f"decode_layers: layer {i} caches {ckv.shape}/{kpe.shape}, want [{rows}, {c}]"
                               f"/[{rows}, {r}]")
        checked.append((ckv, kpe))
    return x, cos, sin, rows, checked


def check_route(logits: np.ndarray, k: int, n_group: int, topk_group: int, scale: float) -> np.ndarray:
    """`route`'s inputs validated once for every backend."""
    logits = check_f32("route logits", logits, 2)
    check_route_args("route", logits.shape[1], k, n_group, topk_group, scale)
    return logits


def check_mla_prep(q: np.ndarray, kv: np.ndarray, norm: np.ndarray, eps: float, cos: np.ndarray, sin: np.ndarray,
                   ckv: np.ndarray, kpe: np.ndarray, start: int) -> tuple:
    """`mla_prep`'s inputs validated once for every backend: (q, kv, norm, cos, sin, ckv, kpe, start)
    with the caches unchanged (they are written in place) and the rest contiguous."""
    q, kv = check_f32("mla_prep q", q, 3), check_f32("mla_prep kv", kv, 2)
    ckv, kpe = check_residual(ckv, "mla_prep ckv cache"), check_residual(kpe, "mla_prep kpe cache")
    _, norm = check_rmsnorm(kv[:, :ckv.shape[1]], norm, eps)
    cos, sin = check_f32("mla_prep cos", cos, 2), check_f32("mla_prep sin", sin, 2)
    if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or start < 0:
        raise BackendError(f"mla_prep: start must be a non-negative integer, got {start!r}")
    t, _, qw = q.shape
    c, r = ckv.shape[1], kpe.shape[1]
    if (r == 0 or r % 2 or qw < r or kv.shape != (t, c + r) or cos.shape != (t, r // 2) or sin.shape != cos.shape
            or kpe.shape[0] != ckv.shape[0] or ckv.shape[0] < start + t):
        raise BackendError(f"mla_prep: inconsistent shapes q {q.shape} kv {kv.shape} cos {cos.shape} "
                           f"sin {sin.shape} caches {ckv.shape}/{kpe.shape} start {start}")
    return q, kv, norm, cos, sin, ckv, kpe, int(start)
