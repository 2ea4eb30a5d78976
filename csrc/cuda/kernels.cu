/* The CUDA kernels of lite: quantized matmul (weights decoded in registers, never a float copy),
 * rmsnorm, rope, softmax, silu-mul, absorbed MLA attention, router (softmax + top-K) and the
 * fused routed + shared expert FFN. Everything accumulates in float32; activations stay float32
 * (no activation quantization), so results match the numpy reference to float rounding.
 *
 * Matmul layout: one warp per weight row, lanes striding over 32-weight chunks (each lane decodes
 * a whole chunk: a Q4_0/Q8_0 block, or a 32-weight slice of a Q4_K/Q6_K super-block) and dotting
 * it with TT token rows at once (TT = 1 for decode, 8 for batches), then a warp reduction.
 * Float weight types (F32/F16/BF16) stride lanes over single weights instead (coalesced, any
 * row length). Shape legend as in lite_cuda.h. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <string.h>

#include "internal.cuh"

#define WARPS 4          /* warps (weight rows) per matmul block */
#define TILE 8           /* tokens per warp in the batched matmul */
#define MLA_NT 128       /* threads per (token, head) in attention */
#define MLA_CH 128       /* positions per online-softmax chunk */
#define MAX_GRID_Y 65535

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14, T_BF16 = 30 };

static int type_block(int type, int64_t *block, int64_t *size) {
  switch (type) {
    case T_F32: *block = 1; *size = 4; return 1;
    case T_F16: case T_BF16: *block = 1; *size = 2; return 1;
    case T_Q8_0: *block = 32; *size = 34; return 1;
    case T_Q4_0: *block = 32; *size = 18; return 1;
    case T_Q4_K: *block = 256; *size = 144; return 1;
    case T_Q6_K: *block = 256; *size = 210; return 1;
    default: return 0;
  }
}

/* Validate (type, cols) and give the row size in bytes. */
static int check_row(const char *fn, int type, int64_t cols, int64_t *row_bytes) {
  int64_t block, size;
  LC_REQUIRE(type_block(type, &block, &size), LITE_CUDA_ERR_TYPE, "unsupported block type %d", type);
  LC_REQUIRE(cols > 0, LITE_CUDA_ERR_ARG, "row length must be > 0");
  LC_REQUIRE(cols % block == 0, LITE_CUDA_ERR_BLOCK, "%s: row length %lld is not a multiple of %lld", fn,
             (long long)cols, (long long)block);
  /* Quantized rows are decoded in chunks of 32 weights. */
  *row_bytes = cols / block * size;
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_row_bytes(int64_t *out, int type, int64_t cols) {
  lc_clear();
  LC_REQUIRE(out, LITE_CUDA_ERR_NULL, "out is NULL");
  return check_row(__func__, type, cols, out);
}

/* ---- the device layout of Q4_0 / Q8_0 --------------------------------------------------------- */
/* Thread g moves block g (row g / nb, chunk g % nb): quants to the row's front, scale to its end. */
__global__ void k_repack(uint8_t *__restrict__ dst, const uint8_t *__restrict__ src, int64_t n_blocks, int64_t nb,
                         int qbytes) {
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= n_blocks) return;
  const int64_t row = g / nb, c = g % nb, bs = qbytes + 2;
  const uint8_t *b = src + g * bs;
  uint8_t *r = dst + row * nb * bs;
  r[nb * qbytes + 2 * c] = b[0];
  r[nb * qbytes + 2 * c + 1] = b[1];
  for (int i = 0; i < qbytes; i++) r[c * qbytes + i] = b[2 + i];
}

LC_API int lite_cuda_repack(uint8_t *dst, const uint8_t *src, int64_t nbytes, int type, int64_t cols, void *stream) {
  lc_clear();
  int64_t rb = 0;
  int rc = check_row(__func__, type, cols, &rb);
  if (rc) return rc;
  LC_REQUIRE(nbytes >= 0 && nbytes % rb == 0, LITE_CUDA_ERR_SIZE, "%lld bytes are not whole rows of %lld",
             (long long)nbytes, (long long)rb);
  if (nbytes == 0) return LITE_CUDA_OK;
  LC_REQUIRE(dst && src, LITE_CUDA_ERR_NULL, "NULL buffer");
  LC_REQUIRE(dst + nbytes <= src || src + nbytes <= dst, LITE_CUDA_ERR_ARG, "source and destination overlap");
  if (type != T_Q4_0 && type != T_Q8_0) {
    LC_CK(cudaMemcpyAsync(dst, src, (size_t)nbytes, cudaMemcpyDeviceToDevice, lc_stream(stream)));
    return LITE_CUDA_OK;
  }
  const int64_t nb = cols / 32, n_blocks = nbytes / rb * nb;
  LC_REQUIRE((n_blocks + 255) / 256 < (1ll << 31), LITE_CUDA_ERR_ARG, "too many blocks");
  k_repack<<<(unsigned)((n_blocks + 255) / 256), 256, 0, lc_stream(stream)>>>(dst, src, n_blocks, nb,
                                                                             type == T_Q4_0 ? 16 : 32);
  LC_LAUNCHED("repack");
  return LITE_CUDA_OK;
}

/* ---- device helpers --------------------------------------------------------------------------- */
__device__ __forceinline__ float f16_at(const uint8_t *p) {   /* p: 2-byte aligned */
  return __half2float(__ushort_as_half(__ldg((const unsigned short *)p)));
}

/* 8 bytes at p (2-byte aligned) as two little-endian words, in as few loads as p's alignment
 * allows (rows of the repacked layout are 8-byte aligned when cols is a multiple of 128). */
__device__ __forceinline__ void load8(const uint8_t *p, unsigned &a, unsigned &b) {
  if (((uintptr_t)p & 7) == 0) {
    const uint2 v = __ldg((const uint2 *)p);
    a = v.x, b = v.y;
  } else if (((uintptr_t)p & 3) == 0) {
    a = __ldg((const unsigned *)p), b = __ldg((const unsigned *)p + 1);
  } else {
    const unsigned short *q = (const unsigned short *)p;
    a = __ldg(q) | ((unsigned)__ldg(q + 1) << 16), b = __ldg(q + 2) | ((unsigned)__ldg(q + 3) << 16);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/* Sum (or max) over the block; every thread gets the result. */
template <bool MAX>
__device__ float block_reduce(float v) {
  __shared__ float red[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads(); /* red may still be read by a previous call */
  if (lane == 0) red[w] = v;
  __syncthreads();
  if (w == 0) {
    v = lane < nw ? red[lane] : (MAX ? -INFINITY : 0.f);
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

/* One float weight of a float-typed row. */
__device__ __forceinline__ float float_weight(int type, const uint8_t *row, int64_t i) {
  if (type == T_F32) return __ldg((const float *)row + i);
  unsigned short u = __ldg((const unsigned short *)row + i);
  if (type == T_F16) return __half2float(__ushort_as_half(u));
  return __uint_as_float((unsigned)u << 16); /* BF16 */
}

/* Q4_0 and Q8_0 rows on the device are repacked (lite_cuda_repack): the nb blocks' quants first
 * (16 or 32 bytes each), then their nb fp16 scales - the same bytes per row, but a thread's quants
 * are one aligned run that a warp reads coalesced. Other types keep the file's layout. */

/* Decode weights 32c .. 32c+31 of a quantized row of nb chunks into v (same float32 operations
 * as lite/kernels/dequant.py). */
__device__ __forceinline__ void decode32(int type, const uint8_t *__restrict__ row, int64_t c, int64_t nb,
                                         float v[32]) {
  switch (type) {
    case T_Q4_0: {
      const float d = f16_at(row + nb * 16 + c * 2);
      const unsigned short *q = (const unsigned short *)(row + c * 16);
#pragma unroll
      for (int i = 0; i < 8; i++) {
        unsigned short u = __ldg(q + i);
        v[2 * i] = d * (float)((int)(u & 0xF) - 8);
        v[2 * i + 1] = d * (float)((int)((u >> 8) & 0xF) - 8);
        v[2 * i + 16] = d * (float)((int)((u >> 4) & 0xF) - 8);
        v[2 * i + 17] = d * (float)((int)(u >> 12) - 8);
      }
      break;
    }
    case T_Q8_0: {
      const float d = f16_at(row + nb * 32 + c * 2);
      const unsigned short *q = (const unsigned short *)(row + c * 32);
#pragma unroll
      for (int i = 0; i < 16; i++) {
        unsigned short u = __ldg(q + i);
        v[2 * i] = d * (float)(signed char)(u & 0xFF);
        v[2 * i + 1] = d * (float)(signed char)(u >> 8);
      }
      break;
    }
    case T_Q4_K: {
      const uint8_t *sb = row + (c >> 3) * 144;
      const int j = (int)(c & 7);
      const float d = f16_at(sb), dmin = f16_at(sb + 2);
      const uint8_t *s = sb + 4;
      int sc, mn;
      if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
      } else {
        sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
      }
      const float scale = d * (float)sc, offset = dmin * (float)mn;
      const uint4 *q = (const uint4 *)(sb + 16 + (j >> 1) * 32); /* 16-byte aligned: 144 = 9 * 16 */
      const int shift = (j & 1) * 4;
#pragma unroll
      for (int h = 0; h < 2; h++) {
        uint4 u = __ldg(q + h);
        unsigned w4[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 16; i++)
          v[h * 16 + i] = scale * (float)((w4[i >> 2] >> (8 * (i & 3) + shift)) & 0xF) - offset;
      }
      break;
    }
    case T_Q6_K: {
      const uint8_t *sb = row + (c >> 3) * 210;
      const int j = (int)(c & 7), h = j >> 2, cc = j & 3;
      const uint8_t *ql = sb + h * 64 + (cc & 1) * 32;
      const uint8_t *qh = sb + 128 + h * 32;
      const int lshift = (cc >> 1) * 4, hshift = 2 * cc;
      const float d = f16_at(sb + 208);
      const float s0 = d * (float)(signed char)sb[192 + 2 * j], s1 = d * (float)(signed char)sb[193 + 2 * j];
#pragma unroll
      for (int i = 0; i < 32; i++) {
        int q = ((__ldg(ql + i) >> lshift) & 0xF) | (((__ldg(qh + i) >> hshift) & 3) << 4);
        v[i] = (i < 16 ? s0 : s1) * (float)(q - 32);
      }
      break;
    }
    default:
#pragma unroll
      for (int i = 0; i < 32; i++) v[i] = 0.f;
  }
}

/* acc[t] += <row, xs[t]> over this lane's share of the row (t < nt); reduce across the warp after. */
template <int TT>
__device__ __forceinline__ void dot_tile(float acc[TT], const uint8_t *__restrict__ row, int type, int64_t cols,
                                         const float *const xs[TT], int nt, int lane) {
  if (type == T_F32 || type == T_F16 || type == T_BF16) {
    for (int64_t i = lane; i < cols; i += 32) {
      const float w = float_weight(type, row, i);
#pragma unroll
      for (int t = 0; t < TT; t++)
        if (t < nt) acc[t] += w * __ldg(xs[t] + i);
    }
    return;
  }
  const int64_t nch = cols >> 5;
  for (int64_t c = lane; c < nch; c += 32) {
    float v[32];
    decode32(type, row, c, nch, v);
#pragma unroll
    for (int t = 0; t < TT; t++) {
      if (t < nt) {
        const float4 *xp = (const float4 *)(xs[t] + c * 32);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
          const float4 a = __ldg(xp + i);
          s += v[4 * i] * a.x + v[4 * i + 1] * a.y + v[4 * i + 2] * a.z + v[4 * i + 3] * a.w;
        }
        acc[t] += s;
      }
    }
  }
}

/* ---- one token: a block of MV_THREADS threads per weight row ----------------------------------- */
/* A warp per row leaves each lane two or three 32-weight chunks of a 2048-wide row, decoded one
 * after the other: too few loads in flight to stream the weights. Here a whole block splits the
 * row into 16-weight units (half a chunk), one or two per thread, and each thread works on
 * MV_ROWS rows at once (the experts of moe_decode: one row each). For a quantized matvec,
 * g_matvec = 0 selects the warp tiles instead (lite_cuda_set_matvec). */
#define MV_THREADS 128
#define MV_ROWS 2
static int g_matvec = 1;

/* <weights 16u .. 16u+15 of `row`, x[16u ..]>: unit u is half hh of 32-weight chunk c. */
__device__ __forceinline__ float dot16(int type, const uint8_t *__restrict__ row, int64_t u, int64_t nb,
                                       const float *__restrict__ x) {
  const int64_t c = u >> 1;
  const int hh = (int)(u & 1);
  float s = 0.f;
  switch (type) {
    case T_Q4_0: { /* byte i of a block's 16 holds weight i (low nibble) and i + 16 (high) */
      unsigned w[2];
      load8(row + c * 16 + hh * 8, w[0], w[1]);
      const float4 *lo = (const float4 *)(x + c * 32 + hh * 8), *hi = (const float4 *)(x + c * 32 + 16 + hh * 8);
      const float4 l0 = __ldg(lo), l1 = __ldg(lo + 1), h0 = __ldg(hi), h1 = __ldg(hi + 1);
      const float xl[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
      const float xh[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
      for (int k = 0; k < 8; k++) {
        const unsigned byte = (w[k >> 2] >> (8 * (k & 3))) & 0xFF;
        s += (float)((int)(byte & 0xF) - 8) * xl[k] + (float)((int)(byte >> 4) - 8) * xh[k];
      }
      return f16_at(row + nb * 16 + c * 2) * s;
    }
    case T_Q8_0: {
      unsigned w[4];
      load8(row + c * 32 + hh * 16, w[0], w[1]);
      load8(row + c * 32 + hh * 16 + 8, w[2], w[3]);
      const float4 *xp = (const float4 *)(x + c * 32 + hh * 16);
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const float4 a = __ldg(xp + i);
        const unsigned v = w[i];
        s += (float)(signed char)(v & 0xFF) * a.x + (float)(signed char)((v >> 8) & 0xFF) * a.y +
             (float)(signed char)((v >> 16) & 0xFF) * a.z + (float)(signed char)(v >> 24) * a.w;
      }
      return f16_at(row + nb * 32 + c * 2) * s;
    }
    case T_Q4_K: {
      const uint8_t *sb = row + (c >> 3) * 144;
      const int j = (int)(c & 7);
      const uint8_t *sc6 = sb + 4;
      int sc, mn;
      if (j < 4) {
        sc = sc6[j] & 63;
        mn = sc6[j + 4] & 63;
      } else {
        sc = (sc6[j + 4] & 0xF) | ((sc6[j - 4] >> 6) << 4);
        mn = (sc6[j + 4] >> 4) | ((sc6[j] >> 6) << 4);
      }
      const uint4 qv = __ldg((const uint4 *)(sb + 16 + (j >> 1) * 32 + hh * 16));
      const unsigned w4[4] = {qv.x, qv.y, qv.z, qv.w};
      const int shift = (j & 1) * 4;
      const float4 *xp = (const float4 *)(x + c * 32 + hh * 16);
      float sx = 0.f;
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const float4 a = __ldg(xp + i);
        const unsigned v = w4[i] >> shift;
        s += (float)(v & 0xF) * a.x + (float)((v >> 8) & 0xF) * a.y + (float)((v >> 16) & 0xF) * a.z +
             (float)((v >> 24) & 0xF) * a.w;
        sx += a.x + a.y + a.z + a.w;
      }
      return f16_at(sb) * (float)sc * s - f16_at(sb + 2) * (float)mn * sx;
    }
    case T_Q6_K: {
      const uint8_t *sb = row + (c >> 3) * 210;
      const int j = (int)(c & 7), h = j >> 2, cc = j & 3;
      const unsigned short *ql = (const unsigned short *)(sb + h * 64 + (cc & 1) * 32 + hh * 16);
      const unsigned short *qh = (const unsigned short *)(sb + 128 + h * 32 + hh * 16);
      const int lshift = (cc >> 1) * 4, hshift = 2 * cc;
      const float4 *xp = (const float4 *)(x + c * 32 + hh * 16);
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const float4 a = __ldg(xp + i);
        const unsigned l0 = __ldg(ql + 2 * i), l1 = __ldg(ql + 2 * i + 1);
        const unsigned g0 = __ldg(qh + 2 * i), g1 = __ldg(qh + 2 * i + 1);
        const unsigned lo = l0 | (l1 << 16), hi = g0 | (g1 << 16);
        float q[4];
#pragma unroll
        for (int k = 0; k < 4; k++)
          q[k] = (float)((int)(((lo >> (8 * k + lshift)) & 0xF) | (((hi >> (8 * k + hshift)) & 3) << 4)) - 32);
        s += q[0] * a.x + q[1] * a.y + q[2] * a.z + q[3] * a.w;
      }
      return f16_at(sb + 208) * (float)(signed char)sb[192 + 2 * j + hh] * s;
    }
    default: { /* float types: 16 consecutive weights */
#pragma unroll
      for (int i = 0; i < 16; i++) s += float_weight(type, row, u * 16 + i) * __ldg(x + u * 16 + i);
      return s;
    }
  }
}

/* This thread's share of <row, x> when a block of MV_THREADS threads splits the row (the units,
 * then for float rows the < 16 weights past the last whole unit). */
__device__ __forceinline__ float row_part(int type, const uint8_t *__restrict__ row, int64_t cols,
                                          const float *__restrict__ x) {
  float s = 0.f;
  const int64_t nu = cols >> 4;
  for (int64_t u = threadIdx.x; u < nu; u += MV_THREADS) s += dot16(type, row, u, cols >> 5, x);
  if (type == T_F32 || type == T_F16 || type == T_BF16)
    for (int64_t i = nu * 16 + threadIdx.x; i < cols; i += MV_THREADS) s += float_weight(type, row, i) * __ldg(x + i);
  return s;
}

/* Block sums of acc[0..N-1], valid in thread 0 (once per kernel: the shared array is not reused). */
template <int N>
__device__ __forceinline__ void block_sums(float acc[N]) {
  __shared__ float red[N][MV_THREADS / 32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < N; r++) acc[r] = warp_sum(acc[r]);
  if (lane == 0)
#pragma unroll
    for (int r = 0; r < N; r++) red[r][w] = acc[r];
  __syncthreads();
  if (threadIdx.x == 0)
#pragma unroll
    for (int r = 0; r < N; r++) {
      float t = 0.f;
      for (int i = 0; i < MV_THREADS / 32; i++) t += red[r][i];
      acc[r] = t;
    }
}

/* out[z * out_hs + r] = <row r of head z's weight, x + z * x_hs> for MV_ROWS rows per block. */
__global__ void __launch_bounds__(MV_THREADS)
k_matvec(float *__restrict__ out, int64_t out_hs, const float *__restrict__ x, int64_t x_hs, int64_t cols,
         const uint8_t *__restrict__ w, int64_t head_bytes, int64_t row_bytes, int type, int64_t n_rows) {
  const int64_t r0 = (int64_t)blockIdx.x * MV_ROWS;
  x += blockIdx.z * x_hs;
  out += blockIdx.z * out_hs;
  w += blockIdx.z * head_bytes;
  const int64_t nu = cols >> 4;
  const int nr = (int)min((int64_t)MV_ROWS, n_rows - r0);
  float acc[MV_ROWS];
#pragma unroll
  for (int r = 0; r < MV_ROWS; r++) acc[r] = 0.f;
  for (int64_t u = threadIdx.x; u < nu; u += MV_THREADS)
#pragma unroll
    for (int r = 0; r < MV_ROWS; r++)
      if (r < nr) acc[r] += dot16(type, w + (r0 + r) * row_bytes, u, cols >> 5, x);
  block_sums<MV_ROWS>(acc);
  if (threadIdx.x == 0)
    for (int r = 0; r < nr; r++) out[r0 + r] = acc[r];
}

LC_API int lite_cuda_set_matvec(int variant) {
  lc_clear();
  LC_REQUIRE(variant == 0 || variant == 1, LITE_CUDA_ERR_ARG, "matvec variant must be 0 or 1, got %d", variant);
  g_matvec = variant;
  return LITE_CUDA_OK;
}

/* ---- matmul ----------------------------------------------------------------------------------- */
/* grid (row blocks, token tiles, heads): head z multiplies its own weight w + z * head_bytes by its
 * input x + z * x_hs and writes out + z * out_hs (a plain matmul is one head). */
template <int TT>
__global__ void __launch_bounds__(WARPS * 32)
k_matmul(float *__restrict__ out, int64_t out_hs, const float *__restrict__ x, int64_t x_hs, int64_t n_tok,
         int64_t cols, const uint8_t *__restrict__ w, int64_t head_bytes, int64_t row_bytes, int type,
         int64_t n_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int64_t t0 = (int64_t)blockIdx.y * TT;
  if (row >= n_rows || t0 >= n_tok) return;
  x += blockIdx.z * x_hs;
  out += blockIdx.z * out_hs;
  w += blockIdx.z * head_bytes;
  const int nt = (int)min((int64_t)TT, n_tok - t0);
  const float *xs[TT];
#pragma unroll
  for (int t = 0; t < TT; t++) xs[t] = x + (t0 + (t < nt ? t : 0)) * cols;
  float acc[TT];
#pragma unroll
  for (int t = 0; t < TT; t++) acc[t] = 0.f;
  dot_tile<TT>(acc, w + row * row_bytes, type, cols, xs, nt, lane);
#pragma unroll
  for (int t = 0; t < TT; t++) {
    const float s = warp_sum(acc[t]);
    if (lane == 0 && t < nt) out[(t0 + t) * n_rows + row] = s;
  }
}

LC_API int lite_cuda_matmul_heads(float *out, int64_t out_len, int64_t out_hs, const float *x, int64_t x_hs,
                                  int64_t n_tok, int64_t cols, const uint8_t *w, int64_t w_bytes, int type,
                                  int64_t n_rows, int64_t n_head, void *stream) {
  lc_clear();
  int64_t rb = 0;
  int rc = check_row(__func__, type, cols, &rb);
  if (rc) return rc;
  LC_REQUIRE(n_tok >= 0 && n_rows > 0 && n_head > 0 && n_head <= MAX_GRID_Y, LITE_CUDA_ERR_ARG,
             "bad sizes T=%lld N=%lld H=%lld", (long long)n_tok, (long long)n_rows, (long long)n_head);
  if (n_tok == 0) return LITE_CUDA_OK;
  LC_REQUIRE(out && x && w, LITE_CUDA_ERR_NULL, "NULL buffer");
  /* float4 loads of x: every head's rows must start 16-byte aligned */
  const bool quantized = !(type == T_F32 || type == T_F16 || type == T_BF16);
  LC_REQUIRE(!quantized || (((uintptr_t)x & 15) == 0 && x_hs % 4 == 0), LITE_CUDA_ERR_ARG,
             "input of a quantized weight must be 16-byte aligned with a head stride (%lld) a multiple of 4",
             (long long)x_hs);
  LC_REQUIRE(n_head == 1 || (x_hs >= n_tok * cols && out_hs >= n_tok * n_rows), LITE_CUDA_ERR_ARG,
             "head strides %lld / %lld overlap the heads' %lld x %lld inputs / outputs", (long long)x_hs,
             (long long)out_hs, (long long)n_tok, (long long)cols);
  const int64_t head_bytes = n_rows * rb;
  LC_REQUIRE(w_bytes >= n_head * head_bytes, LITE_CUDA_ERR_SIZE, "weight holds %lld bytes, needs %lld",
             (long long)w_bytes, (long long)(n_head * head_bytes));
  LC_REQUIRE(out_len >= (n_head - 1) * out_hs + n_tok * n_rows, LITE_CUDA_ERR_SIZE,
             "output holds %lld floats, needs %lld", (long long)out_len,
             (long long)((n_head - 1) * out_hs + n_tok * n_rows));
  if (n_tok == 1 && g_matvec && quantized) {
    LC_REQUIRE((n_rows + MV_ROWS - 1) / MV_ROWS < (1ll << 31), LITE_CUDA_ERR_ARG, "too many rows");
    k_matvec<<<dim3((unsigned)((n_rows + MV_ROWS - 1) / MV_ROWS), 1, (unsigned)n_head), MV_THREADS, 0,
               lc_stream(stream)>>>(out, out_hs, x, x_hs, cols, w, head_bytes, rb, type, n_rows);
    LC_LAUNCHED("matvec");
    return LITE_CUDA_OK;
  }
  const int tt = n_tok == 1 ? 1 : TILE;
  const int64_t gy = (n_tok + tt - 1) / tt, gx = (n_rows + WARPS - 1) / WARPS;
  LC_REQUIRE(gy <= MAX_GRID_Y && gx < (1ll << 31), LITE_CUDA_ERR_ARG, "too many tokens or rows");
  dim3 grid((unsigned)gx, (unsigned)gy, (unsigned)n_head);
  if (tt == 1)
    k_matmul<1><<<grid, WARPS * 32, 0, lc_stream(stream)>>>(out, out_hs, x, x_hs, n_tok, cols, w, head_bytes, rb,
                                                            type, n_rows);
  else
    k_matmul<TILE><<<grid, WARPS * 32, 0, lc_stream(stream)>>>(out, out_hs, x, x_hs, n_tok, cols, w, head_bytes,
                                                               rb, type, n_rows);
  LC_LAUNCHED("matmul");
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_matmul(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t cols,
                            const uint8_t *w, int64_t w_bytes, int type, int64_t n_rows, void *stream) {
  return lite_cuda_matmul_heads(out, out_len, 0, x, 0, n_tok, cols, w, w_bytes, type, n_rows, 1, stream);
}

/* ---- small float ops -------------------------------------------------------------------------- */
/* x += delta (when given, in place: each thread adds the elements it then reads), then
 * out = w * x / sqrt(mean(x^2) + eps) per row. */
__global__ void k_rmsnorm(float *out, float *x, const float *delta, const float *w, int64_t dim, float eps) {
  float *xr = x + blockIdx.x * dim;
  float *o = out + blockIdx.x * dim;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = xr[i];
    if (delta) xr[i] = v = v + delta[blockIdx.x * dim + i];
    ss += v * v;
  }
  ss = block_reduce<false>(ss);
  const float den = sqrtf(ss / (float)dim + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = w[i] * (xr[i] / den);
}

LC_API int lite_cuda_add_rmsnorm_f32(float *out, float *x, const float *delta, const float *w, int64_t n_rows,
                                     int64_t dim, float eps, void *stream) {
  lc_clear();
  LC_REQUIRE(n_rows >= 0 && dim > 0 && eps >= 0.f && n_rows < (1ll << 31), LITE_CUDA_ERR_ARG, "bad sizes or eps");
  if (n_rows == 0) return LITE_CUDA_OK;
  LC_REQUIRE(out && x && w, LITE_CUDA_ERR_NULL, "NULL buffer");
  k_rmsnorm<<<(unsigned)n_rows, 256, 0, lc_stream(stream)>>>(out, x, delta, w, dim, eps);
  LC_LAUNCHED("rmsnorm");
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_rmsnorm_f32(float *out, const float *x, const float *w, int64_t n_rows, int64_t dim,
                                 float eps, void *stream) {
  /* without a delta the kernel never writes x */
  return lite_cuda_add_rmsnorm_f32(out, (float *)x, NULL, w, n_rows, dim, eps, stream);
}

/* Row (t, h) of x starts at x + (t * n_head + h) * xs, of out at out + (t * n_head + h) * os. */
__global__ void k_rope(float *out, int64_t os, const float *x, int64_t xs, const float *cs, const float *sn,
                       int64_t n, int64_t n_head, int64_t half) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  const int64_t i = idx % half, th = idx / half, t = th / n_head;
  const float *xr = x + th * xs + 2 * i;
  float *o = out + th * os + 2 * i;
  const float c = cs[t * half + i], s = sn[t * half + i], e = xr[0], od = xr[1];
  o[0] = e * c - od * s;
  o[1] = e * s + od * c;
}

LC_API int lite_cuda_rope_rows(float *out, int64_t out_stride, const float *x, int64_t x_stride, const float *cos_t,
                               const float *sin_t, int64_t n_tok, int64_t n_head, int64_t dim, void *stream) {
  lc_clear();
  LC_REQUIRE(n_tok >= 0 && n_head >= 0 && dim >= 0 && dim % 2 == 0 && out_stride >= dim && x_stride >= dim,
             LITE_CUDA_ERR_ARG, "bad sizes or strides");
  const int64_t n = n_tok * n_head * (dim / 2);
  if (n == 0) return LITE_CUDA_OK;
  LC_REQUIRE(out && x && cos_t && sin_t, LITE_CUDA_ERR_NULL, "NULL buffer");
  LC_REQUIRE((n + 255) / 256 < (1ll << 31), LITE_CUDA_ERR_ARG, "too many rows");
  k_rope<<<(unsigned)((n + 255) / 256), 256, 0, lc_stream(stream)>>>(out, out_stride, x, x_stride, cos_t, sin_t, n,
                                                                    n_head, dim / 2);
  LC_LAUNCHED("rope");
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_rope_f32(float *out, const float *x, const float *cos_t, const float *sin_t,
                              int64_t n_tok, int64_t n_head, int64_t dim, void *stream) {
  return lite_cuda_rope_rows(out, dim, x, dim, cos_t, sin_t, n_tok, n_head, dim, stream);
}

__global__ void k_softmax(float *out, const float *x, int64_t n) {
  const float *xr = x + blockIdx.x * n;
  float *o = out + blockIdx.x * n;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
  m = block_reduce<true>(m);
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += expf(xr[i] - m);
  s = block_reduce<false>(s);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) o[i] = expf(xr[i] - m) / s;
}

LC_API int lite_cuda_softmax_f32(float *out, const float *x, int64_t n_rows, int64_t n, void *stream) {
  lc_clear();
  LC_REQUIRE(n_rows >= 0 && n > 0 && n_rows < (1ll << 31), LITE_CUDA_ERR_ARG, "bad sizes");
  if (n_rows == 0) return LITE_CUDA_OK;
  LC_REQUIRE(out && x, LITE_CUDA_ERR_NULL, "NULL buffer");
  k_softmax<<<(unsigned)n_rows, 256, 0, lc_stream(stream)>>>(out, x, n);
  LC_LAUNCHED("softmax");
  return LITE_CUDA_OK;
}

__device__ __forceinline__ float silu_mul1(float g, float u) { return g / (1.f + expf(-g)) * u; }

__global__ void k_silu_mul(float *out, const float *g, const float *u, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = silu_mul1(g[i], u[i]);
}

LC_API int lite_cuda_silu_mul_f32(float *out, const float *g, const float *u, int64_t n, void *stream) {
  lc_clear();
  LC_REQUIRE(n >= 0, LITE_CUDA_ERR_ARG, "n < 0");
  if (n == 0) return LITE_CUDA_OK;
  LC_REQUIRE(out && g && u, LITE_CUDA_ERR_NULL, "NULL buffer");
  k_silu_mul<<<(unsigned)((n + 255) / 256), 256, 0, lc_stream(stream)>>>(out, g, u, n);
  LC_LAUNCHED("silu_mul");
  return LITE_CUDA_OK;
}

/* ---- MLA attention ---------------------------------------------------------------------------- */
/* Grid (T*H, splits): block (th, sp) attends over positions [sp * span, min(n_see, (sp + 1) * span))
 * of what token t sees, with an online softmax over chunks of MLA_CH positions; each thread owns
 * latent channels tid, tid + MLA_NT, ... With one split it writes the output; with several (a
 * decode step has only H blocks otherwise) it writes its partial (max, sum, acc[C]) to
 * part[(sp * T*H + th) * (C + 2)] for k_mla_combine. */
__global__ void __launch_bounds__(MLA_NT)
k_mla(float *out, float *part, const float *q_lat, const float *q_pe, const float *ckv, const float *kpe,
      int64_t n_head, int64_t C, int64_t R, int64_t start, float scale, int64_t span) {
  extern __shared__ float sm[];
  float *q = sm, *p = sm + C + R;
  const int64_t th = blockIdx.x, t = th / n_head;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int64_t i = tid; i < C; i += MLA_NT) q[i] = q_lat[th * C + i];
  for (int64_t i = tid; i < R; i += MLA_NT) q[C + i] = q_pe[th * R + i];
  __syncthreads();
  const int64_t n_see = start + t + 1;
  const int64_t s_beg = (int64_t)blockIdx.y * span, s_end = min(n_see, s_beg + span);
  float acc[LITE_CUDA_MLA_MAX_C / MLA_NT];
#pragma unroll
  for (int i = 0; i < LITE_CUDA_MLA_MAX_C / MLA_NT; i++) acc[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int64_t s0 = s_beg; s0 < s_end; s0 += MLA_CH) {
    const int n = (int)min((int64_t)MLA_CH, s_end - s0);
    for (int j = warp; j < n; j += MLA_NT / 32) {
      const float *kr = ckv + (s0 + j) * C, *pr = kpe + (s0 + j) * R;
      float d = 0.f;
      for (int64_t i = lane; i < C; i += 32) d += q[i] * kr[i];
      for (int64_t i = lane; i < R; i += 32) d += q[C + i] * pr[i];
      d = warp_sum(d);
      if (lane == 0) p[j] = d * scale;
    }
    __syncthreads();
    const float cm = block_reduce<true>(tid < n ? p[tid] : -INFINITY);
    const float mn = fmaxf(m, cm), corr = expf(m - mn);
    const float e = tid < n ? expf(p[tid] - mn) : 0.f;
    __syncthreads();
    if (tid < n) p[tid] = e;
    l = l * corr + block_reduce<false>(e); /* block_reduce syncs: p is visible after it */
#pragma unroll
    for (int i = 0; i < LITE_CUDA_MLA_MAX_C / MLA_NT; i++) {
      const int64_t c = tid + (int64_t)i * MLA_NT;
      if (c < C) {
        float a = acc[i] * corr;
        for (int j = 0; j < n; j++) a += p[j] * ckv[(s0 + j) * C + c];
        acc[i] = a;
      }
    }
    m = mn;
    __syncthreads();
  }
  if (gridDim.y == 1) {
#pragma unroll
    for (int i = 0; i < LITE_CUDA_MLA_MAX_C / MLA_NT; i++) {
      const int64_t c = tid + (int64_t)i * MLA_NT;
      if (c < C) out[th * C + c] = acc[i] / l;
    }
    return;
  }
  float *pp = part + ((int64_t)blockIdx.y * gridDim.x + th) * (C + 2);
  if (tid == 0) pp[0] = m, pp[1] = l;
#pragma unroll
  for (int i = 0; i < LITE_CUDA_MLA_MAX_C / MLA_NT; i++) {
    const int64_t c = tid + (int64_t)i * MLA_NT;
    if (c < C) pp[2 + c] = acc[i];
  }
}

/* out[th] = the splits' partials merged: rescaled to the overall max; an empty split has max
 * -inf and sum 0, and split 0 is never empty, so the overall max is finite. */
__global__ void k_mla_combine(float *out, const float *part, int64_t n_th, int64_t C, int splits) {
  const int64_t th = blockIdx.x;
  float mx = -INFINITY, l = 0.f;
  for (int sp = 0; sp < splits; sp++) mx = fmaxf(mx, part[(sp * n_th + th) * (C + 2)]);
  for (int sp = 0; sp < splits; sp++) {
    const float *pp = part + (sp * n_th + th) * (C + 2);
    l += pp[1] * expf(pp[0] - mx);
  }
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float a = 0.f;
    for (int sp = 0; sp < splits; sp++) {
      const float *pp = part + (sp * n_th + th) * (C + 2);
      a += pp[2 + c] * expf(pp[0] - mx);
    }
    out[th * C + c] = a / l;
  }
}

#define MLA_MIN_SPAN 32      /* positions per split at least */
#define MLA_TARGET_BLOCKS 2048

/* Positions per split and the number of splits for T*H blocks over up to n_see positions. */
static void mla_splits(int64_t n_th, int64_t n_see, int64_t *span, int64_t *splits) {
  int64_t want = MLA_TARGET_BLOCKS / (n_th > 0 ? n_th : 1);
  if (want < 1) want = 1;
  int64_t sp = (n_see + want - 1) / want;
  if (sp < MLA_MIN_SPAN) sp = MLA_MIN_SPAN;
  *span = sp;
  *splits = (n_see + sp - 1) / sp;
}

LC_API int lite_cuda_mla_scratch_floats(int64_t *out, int64_t n_tok, int64_t n_head, int64_t c_dim, int64_t start) {
  lc_clear();
  LC_REQUIRE(out, LITE_CUDA_ERR_NULL, "out is NULL");
  LC_REQUIRE(n_tok >= 0 && n_head > 0 && c_dim > 0 && start >= 0, LITE_CUDA_ERR_ARG, "bad sizes");
  int64_t span, splits;
  mla_splits(n_tok * n_head, start + n_tok, &span, &splits);
  *out = splits > 1 ? splits * n_tok * n_head * (c_dim + 2) : 0;
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_mla_attention(float *out, const float *q_lat, const float *q_pe, const float *ckv,
                                   const float *kpe, int64_t n_tok, int64_t n_head, int64_t c_dim,
                                   int64_t r_dim, int64_t n_pos, int64_t start, float scale, float *d_scratch,
                                   int64_t scratch_floats, void *stream) {
  lc_clear();
  LC_REQUIRE(n_tok >= 0 && n_head > 0 && c_dim > 0 && r_dim >= 0 && start >= 0 && scratch_floats >= 0,
             LITE_CUDA_ERR_ARG, "bad sizes");
  LC_REQUIRE(c_dim + r_dim <= LITE_CUDA_MLA_MAX_C, LITE_CUDA_ERR_ARG, "C + R = %lld exceeds %d",
             (long long)(c_dim + r_dim), LITE_CUDA_MLA_MAX_C);
  LC_REQUIRE(n_pos >= start + n_tok, LITE_CUDA_ERR_SIZE, "cache holds %lld positions, needs start + T = %lld",
             (long long)n_pos, (long long)(start + n_tok));
  if (n_tok == 0) return LITE_CUDA_OK;
  LC_REQUIRE(out && q_lat && ckv && (r_dim == 0 || (q_pe && kpe)), LITE_CUDA_ERR_NULL, "NULL buffer");
  const int64_t n_th = n_tok * n_head;
  LC_REQUIRE(n_th < (1ll << 31), LITE_CUDA_ERR_ARG, "too many (token, head) pairs");
  int64_t span, splits;
  mla_splits(n_th, start + n_tok, &span, &splits);
  /* Fewer splits when the scratch holds fewer partials (none: one split, no scratch). */
  const int64_t fit = d_scratch ? scratch_floats / (n_th * (c_dim + 2)) : 1;
  if (splits > fit) {
    splits = fit > 1 ? fit : 1;
    span = (start + n_tok + splits - 1) / splits;
  }
  LC_REQUIRE(splits <= MAX_GRID_Y, LITE_CUDA_ERR_ARG, "too many splits");
  const size_t shm = (size_t)(c_dim + r_dim + MLA_CH) * sizeof(float);
  k_mla<<<dim3((unsigned)n_th, (unsigned)splits), MLA_NT, shm, lc_stream(stream)>>>(
      out, d_scratch, q_lat, q_pe, ckv, kpe, n_head, c_dim, r_dim, start, scale, span);
  LC_LAUNCHED("mla_attention");
  if (splits > 1) {
    k_mla_combine<<<(unsigned)n_th, MLA_NT, 0, lc_stream(stream)>>>(out, d_scratch, n_th, c_dim, (int)splits);
    LC_LAUNCHED("mla_attention combine");
  }
  return LITE_CUDA_OK;
}

/* ---- router ----------------------------------------------------------------------------------- */
/* One block per token: softmax in parallel, then group limiting and top-K by repeated argmax in
 * one thread (E <= 1024, K <= 64: a few thousand comparisons). */
__global__ void k_route(int32_t *ids, float *wts, float *probs, const float *logits, int E, int K, int G, int TG,
                        int norm, float scale) {
  extern __shared__ float sm[];
  float *pr = sm, *sc = sm + E, *gs = sm + 2 * E;
  const int64_t t = blockIdx.x;
  const float *l = logits + t * E;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < E; i += blockDim.x) m = fmaxf(m, l[i]);
  m = block_reduce<true>(m);
  float s = 0.f;
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    const float e = expf(l[i] - m);
    pr[i] = e;
    s += e;
  }
  s = block_reduce<false>(s);
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    pr[i] = pr[i] / s;
    probs[t * E + i] = pr[i];
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (G > 1) {
    const int per = E / G;
    for (int g = 0; g < G; g++) {
      float b = pr[g * per];
      for (int i = 1; i < per; i++) b = fmaxf(b, pr[g * per + i]);
      gs[g] = b;
    }
    for (int i = 0; i < E; i++) sc[i] = 0.f;
    for (int k = 0; k < TG && k < G; k++) {
      int best = 0;
      for (int g = 1; g < G; g++)
        if (gs[g] > gs[best]) best = g;
      for (int i = 0; i < per; i++) sc[best * per + i] = pr[best * per + i];
      gs[best] = -INFINITY;
    }
  } else {
    for (int i = 0; i < E; i++) sc[i] = pr[i];
  }
  float sum = 0.f;
  for (int k = 0; k < K; k++) {
    int best = -1;
    for (int i = 0; i < E; i++)
      if (sc[i] >= 0.f && (best < 0 || sc[i] > sc[best])) best = i;
    sc[best] = -1.f;
    ids[t * K + k] = best;
    wts[t * K + k] = pr[best];
    sum += pr[best];
  }
  for (int k = 0; k < K; k++) {
    float w = wts[t * K + k];
    if (norm && K > 1) w = w / (sum + 1e-20f);
    wts[t * K + k] = w * scale;
  }
}

LC_API int lite_cuda_route(int32_t *ids, float *weights, float *probs, const float *logits, int64_t n_tok,
                           int64_t n_exp, int64_t k, int64_t n_group, int64_t topk_group, int norm, float scale,
                           void *stream) {
  lc_clear();
  LC_REQUIRE(n_tok >= 0 && n_exp > 0 && n_exp <= LITE_CUDA_ROUTE_MAX_E && k >= 0 && k <= n_exp &&
                 k <= LITE_CUDA_ROUTE_MAX_K && n_tok < (1ll << 31),
             LITE_CUDA_ERR_ARG, "bad sizes T=%lld E=%lld K=%lld", (long long)n_tok, (long long)n_exp, (long long)k);
  const int64_t g = n_group > 1 ? n_group : 1;
  LC_REQUIRE(n_exp % g == 0 && (g == 1 || (topk_group >= 1 && topk_group <= g)),
             LITE_CUDA_ERR_ARG, "bad grouping: %lld experts, %lld groups, top %lld groups, K=%lld", (long long)n_exp,
             (long long)n_group, (long long)topk_group, (long long)k);
  if (n_tok == 0) return LITE_CUDA_OK;
  LC_REQUIRE(ids && weights && probs && logits, LITE_CUDA_ERR_NULL, "NULL buffer");
  const size_t shm = (size_t)(2 * n_exp + g) * sizeof(float);
  k_route<<<(unsigned)n_tok, 128, shm, lc_stream(stream)>>>(ids, weights, probs, logits, (int)n_exp, (int)k, (int)g,
                                                            (int)topk_group, norm, scale);
  LC_LAUNCHED("route");
  return LITE_CUDA_OK;
}

/* ---- mixture of experts ----------------------------------------------------------------------- */
/* One table entry per expert of the call (the layout is shared by host and device). Pairs
 * (token, entry) are grouped by entry: entry e owns pairs p0 .. p1-1. */
struct Entry {
  const uint8_t *w[3];
  int64_t rb[3];
  int32_t type[3];
  int32_t pad;
  int64_t ffn, p0, p1;
};

static inline int64_t align256(int64_t n) { return (n + 255) & ~(int64_t)255; }
static inline int64_t hstride(int64_t max_ffn) { return (max_ffn + 31) & ~(int64_t)31; }

struct MoeLayout {
  int64_t ent, pair_tok, pair_w, tok_pairs, table, cursor, h, y, host, dev;
};

static MoeLayout moe_layout(int64_t T, int64_t D, int64_t K, int64_t max_ffn, int64_t n_exp) {
  MoeLayout L;
  const int64_t P = T * (K + 1);
  L.ent = 0;
  L.pair_tok = L.ent + align256(n_exp * (int64_t)sizeof(Entry));
  L.pair_w = L.pair_tok + align256(P * 4);
  L.tok_pairs = L.pair_w + align256(P * 4);
  L.table = L.tok_pairs + align256(P * 4);
  L.cursor = L.table;
  L.host = L.cursor + align256(n_exp * 8);
  L.h = L.table;
  L.y = L.h + align256(P * hstride(max_ffn) * 4);
  L.dev = L.y + align256(P * D * 4);
  return L;
}

LC_API int lite_cuda_moe_scratch_bytes(int64_t *d_bytes, int64_t *h_bytes, int64_t n_tok, int64_t dim, int64_t k,
                                       int64_t max_ffn, int64_t n_exp) {
  lc_clear();
  LC_REQUIRE(d_bytes && h_bytes, LITE_CUDA_ERR_NULL, "NULL output");
  LC_REQUIRE(n_tok >= 0 && dim > 0 && k >= 0 && max_ffn > 0 && n_exp > 0, LITE_CUDA_ERR_ARG, "bad sizes");
  MoeLayout L = moe_layout(n_tok, dim, k, max_ffn, n_exp);
  *d_bytes = L.dev;
  *h_bytes = L.host;
  return LITE_CUDA_OK;
}

/* h[p, f] = silu(gate_f . x[tok p]) * (up_f . x[tok p]) for every entry (grid.z) and pair tile. */
template <int TT>
__global__ void __launch_bounds__(WARPS * 32)
k_moe_gate_up(const Entry *__restrict__ ent, const float *__restrict__ x, int64_t D,
              const int32_t *__restrict__ pair_tok, float *__restrict__ h, int64_t hs) {
  const Entry &E = ent[blockIdx.z];
  const int lane = threadIdx.x & 31;
  const int64_t f = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int64_t p0 = E.p0 + (int64_t)blockIdx.y * TT;
  if (f >= E.ffn || p0 >= E.p1) return;
  const int nt = (int)min((int64_t)TT, E.p1 - p0);
  const float *xs[TT];
#pragma unroll
  for (int t = 0; t < TT; t++) xs[t] = x + (int64_t)pair_tok[p0 + (t < nt ? t : 0)] * D;
  float g[TT], u[TT];
#pragma unroll
  for (int t = 0; t < TT; t++) g[t] = u[t] = 0.f;
  dot_tile<TT>(g, E.w[0] + f * E.rb[0], E.type[0], D, xs, nt, lane);
  dot_tile<TT>(u, E.w[1] + f * E.rb[1], E.type[1], D, xs, nt, lane);
#pragma unroll
  for (int t = 0; t < TT; t++) {
    const float gs = warp_sum(g[t]), us = warp_sum(u[t]);
    if (lane == 0 && t < nt) h[(p0 + t) * hs + f] = silu_mul1(gs, us);
  }
}

/* y[p, d] = weight[p] * (down_d . h[p]) */
template <int TT>
__global__ void __launch_bounds__(WARPS * 32)
k_moe_down(const Entry *__restrict__ ent, const float *__restrict__ h, int64_t hs, int64_t D,
           const float *__restrict__ pair_w, float *__restrict__ y) {
  const Entry &E = ent[blockIdx.z];
  const int lane = threadIdx.x & 31;
  const int64_t d = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int64_t p0 = E.p0 + (int64_t)blockIdx.y * TT;
  if (d >= D || p0 >= E.p1) return;
  const int nt = (int)min((int64_t)TT, E.p1 - p0);
  const float *xs[TT];
#pragma unroll
  for (int t = 0; t < TT; t++) xs[t] = h + (p0 + (t < nt ? t : 0)) * hs;
  float acc[TT];
#pragma unroll
  for (int t = 0; t < TT; t++) acc[t] = 0.f;
  dot_tile<TT>(acc, E.w[2] + d * E.rb[2], E.type[2], E.ffn, xs, nt, lane);
#pragma unroll
  for (int t = 0; t < TT; t++) {
    const float s = warp_sum(acc[t]);
    if (lane == 0 && t < nt) y[(p0 + t) * D + d] = s * pair_w[p0 + t];
  }
}

/* out[t, d] = sum over t's pairs, in table order (shared first, then slot k ascending). */
__global__ void k_moe_combine(float *out, const float *y, const int32_t *tok_pairs, int64_t T, int64_t D, int64_t KP) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= T * D) return;
  const int64_t t = i / D, d = i % D;
  float s = 0.f;
  for (int64_t j = 0; j < KP; j++) {
    const int32_t p = tok_pairs[t * KP + j];
    if (p >= 0) s += y[(int64_t)p * D + d];
  }
  out[i] = s;
}

LC_API int lite_cuda_moe(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t dim,
                         const int32_t *h_slot, const float *h_weight, int64_t k,
                         int64_t n_exp, const uint8_t **h_gate, const uint8_t **h_up, const uint8_t **h_down,
                         const int32_t *h_types, const int64_t *h_nbytes, const int64_t *h_ffn, int64_t shared,
                         uint8_t *d_scratch, int64_t d_bytes, uint8_t *h_scratch, int64_t h_bytes, void *stream) {
  lc_clear();
  LC_REQUIRE(n_tok >= 0 && dim > 0 && k >= 0 && n_exp > 0 && shared >= -1 && shared < n_exp, LITE_CUDA_ERR_ARG,
             "bad sizes T=%lld D=%lld K=%lld entries=%lld shared=%lld", (long long)n_tok, (long long)dim,
             (long long)k, (long long)n_exp, (long long)shared);
  LC_REQUIRE(h_gate && h_up && h_down && h_types && h_nbytes && h_ffn, LITE_CUDA_ERR_NULL, "NULL expert table");
  if (n_tok == 0) return LITE_CUDA_OK;
  LC_REQUIRE(out && x && d_scratch && h_scratch && (k == 0 || (h_slot && h_weight)), LITE_CUDA_ERR_NULL,
             "NULL buffer");
  LC_REQUIRE(out_len >= n_tok * dim, LITE_CUDA_ERR_SIZE, "output too small");
  int64_t max_ffn = 0;
  for (int64_t e = 0; e < n_exp; e++) max_ffn = h_ffn[e] > max_ffn ? h_ffn[e] : max_ffn;
  LC_REQUIRE(max_ffn > 0, LITE_CUDA_ERR_ARG, "expert widths must be > 0");
  const MoeLayout L = moe_layout(n_tok, dim, k, max_ffn, n_exp);
  LC_REQUIRE(d_bytes >= L.dev && h_bytes >= L.host, LITE_CUDA_ERR_SIZE, "scratch too small (device %lld < %lld "
             "or host %lld < %lld)", (long long)d_bytes, (long long)L.dev, (long long)h_bytes, (long long)L.host);
  Entry *ent = (Entry *)(h_scratch + L.ent);
  int32_t *pair_tok = (int32_t *)(h_scratch + L.pair_tok);
  float *pair_w = (float *)(h_scratch + L.pair_w);
  int32_t *tok_pairs = (int32_t *)(h_scratch + L.tok_pairs);
  int64_t *cursor = (int64_t *)(h_scratch + L.cursor);
  memset(ent, 0, (size_t)n_exp * sizeof(Entry));
  for (int64_t e = 0; e < n_exp; e++) {
    const int64_t f = h_ffn[e];
    LC_REQUIRE(f > 0 && h_gate[e] && h_up[e] && h_down[e], LITE_CUDA_ERR_ARG, "entry %lld: bad width or NULL weight",
               (long long)e);
    const int64_t rows[3] = {f, f, dim}, cols[3] = {dim, dim, f};
    const uint8_t *ptr[3] = {h_gate[e], h_up[e], h_down[e]};
    for (int j = 0; j < 3; j++) {
      int64_t rb = 0;
      int rc = check_row(__func__, h_types[3 * e + j], cols[j], &rb);
      if (rc) return rc;
      LC_REQUIRE(h_nbytes[3 * e + j] >= rows[j] * rb, LITE_CUDA_ERR_SIZE,
                 "entry %lld part %d holds %lld bytes, needs %lld", (long long)e, j,
                 (long long)h_nbytes[3 * e + j], (long long)(rows[j] * rb));
      ent[e].w[j] = ptr[j];
      ent[e].rb[j] = rb;
      ent[e].type[j] = h_types[3 * e + j];
    }
    ent[e].ffn = f;
    cursor[e] = 0;
  }
  /* Count pairs per entry, then lay them out entry by entry. */
  for (int64_t i = 0; i < n_tok * k; i++) {
    LC_REQUIRE(h_slot[i] >= -1 && h_slot[i] < n_exp, LITE_CUDA_ERR_ARG, "slot %lld = %d is out of range",
               (long long)i, h_slot[i]);
    if (h_slot[i] >= 0) cursor[h_slot[i]]++;
  }
  if (shared >= 0) cursor[shared] += n_tok;
  int64_t p = 0, max_pairs = 0;
  for (int64_t e = 0; e < n_exp; e++) {
    ent[e].p0 = ent[e].p1 = p;
    p += cursor[e];
    max_pairs = cursor[e] > max_pairs ? cursor[e] : max_pairs;
  }
  const int64_t KP = k + 1;
  for (int64_t t = 0; t < n_tok; t++) {
    int32_t *tp = tok_pairs + t * KP;
    if (shared >= 0) {
      const int64_t q = ent[shared].p1++;
      pair_tok[q] = (int32_t)t;
      pair_w[q] = 1.f;
      tp[0] = (int32_t)q;
    } else {
      tp[0] = -1;
    }
    for (int64_t j = 0; j < k; j++) {
      const int64_t e = h_slot[t * k + j];
      if (e < 0) {
        tp[1 + j] = -1;
        continue;
      }
      const int64_t q = ent[e].p1++;
      pair_tok[q] = (int32_t)t;
      pair_w[q] = h_weight[t * k + j];
      tp[1 + j] = (int32_t)q;
    }
  }
  if (p == 0) return lite_cuda_memset(out, 0, n_tok * dim * 4, stream);
  cudaStream_t st = lc_stream(stream);
  LC_CK(cudaMemcpyAsync(d_scratch, h_scratch, (size_t)L.table, cudaMemcpyHostToDevice, st));
  const Entry *d_ent = (const Entry *)(d_scratch + L.ent);
  const int32_t *d_pair_tok = (const int32_t *)(d_scratch + L.pair_tok);
  const float *d_pair_w = (const float *)(d_scratch + L.pair_w);
  const int32_t *d_tok_pairs = (const int32_t *)(d_scratch + L.tok_pairs);
  float *d_h = (float *)(d_scratch + L.h), *d_y = (float *)(d_scratch + L.y);
  const int64_t hs = hstride(max_ffn);
  const int tt = max_pairs == 1 ? 1 : TILE;
  const int64_t gy = (max_pairs + tt - 1) / tt;
  LC_REQUIRE(gy <= MAX_GRID_Y && n_exp <= MAX_GRID_Y, LITE_CUDA_ERR_ARG, "too many tokens or experts in one call");
  dim3 g1((unsigned)((max_ffn + WARPS - 1) / WARPS), (unsigned)gy, (unsigned)n_exp);
  dim3 g2((unsigned)((dim + WARPS - 1) / WARPS), (unsigned)gy, (unsigned)n_exp);
  if (tt == 1) {
    k_moe_gate_up<1><<<g1, WARPS * 32, 0, st>>>(d_ent, x, dim, d_pair_tok, d_h, hs);
    LC_LAUNCHED("moe gate/up");
    k_moe_down<1><<<g2, WARPS * 32, 0, st>>>(d_ent, d_h, hs, dim, d_pair_w, d_y);
  } else {
    k_moe_gate_up<TILE><<<g1, WARPS * 32, 0, st>>>(d_ent, x, dim, d_pair_tok, d_h, hs);
    LC_LAUNCHED("moe gate/up");
    k_moe_down<TILE><<<g2, WARPS * 32, 0, st>>>(d_ent, d_h, hs, dim, d_pair_w, d_y);
  }
  LC_LAUNCHED("moe down");
  const int64_t n = n_tok * dim;
  k_moe_combine<<<(unsigned)((n + 255) / 256), 256, 0, st>>>(out, d_y, d_tok_pairs, n_tok, dim, KP);
  LC_LAUNCHED("moe combine");
  return LITE_CUDA_OK;
}

/* ---- mixture of experts for one token, routed on the device ----------------------------------- */
/* Slot s of the call: the always-on entry first (when there is one), then routed slot s - has_always;
 * -1 when the id is outside the table (nothing to run). */
__device__ __forceinline__ int moe1_entry(int s, const int32_t *ids, int n_ent, int always) {
  if (always >= 0) {
    if (s == 0) return always;
    s -= 1;
  }
  const int e = ids[s];
  return e >= 0 && e < n_ent ? e : -1;
}

/* h[s, f] = silu(gate_f . x) * (up_f . x) for slot s = blockIdx.y, a block per row f. */
__global__ void __launch_bounds__(MV_THREADS)
k_moe1_gate_up(const lite_cuda_expert *__restrict__ tab, int n_ent, const int32_t *__restrict__ ids, int always,
                 const float *__restrict__ x, int64_t D, float *__restrict__ h, int64_t hs) {
  const int e = moe1_entry((int)blockIdx.y, ids, n_ent, always);
  if (e < 0) return;
  const lite_cuda_expert &E = tab[e];
  const int64_t f = blockIdx.x;
  if (f >= E.ffn) return;
  float acc[2] = {row_part(E.type[0], E.w[0] + f * E.row_bytes[0], D, x),
                  row_part(E.type[1], E.w[1] + f * E.row_bytes[1], D, x)};
  block_sums<2>(acc);
  if (threadIdx.x == 0) h[blockIdx.y * hs + f] = silu_mul1(acc[0], acc[1]);
}

/* out[d] = sum over slots in order of weight_s * (down_d . h[s]), a block per output row d: the
 * sum needs no second pass and its order is fixed. */
__global__ void __launch_bounds__(MV_THREADS)
k_moe1_down(const lite_cuda_expert *__restrict__ tab, int n_ent, const int32_t *__restrict__ ids,
              const float *__restrict__ wts, int n_slot, int always, const float *__restrict__ h, int64_t hs,
              float *__restrict__ out) {
  const int64_t d = blockIdx.x;
  float acc[1] = {0.f};
  for (int s = 0; s < n_slot; s++) {
    const int e = moe1_entry(s, ids, n_ent, always);
    if (e < 0) continue;
    const lite_cuda_expert &E = tab[e];
    const float part = row_part(E.type[2], E.w[2] + d * E.row_bytes[2], E.ffn, h + s * hs);
    acc[0] += (always >= 0 && s == 0) ? part : part * wts[s - (always >= 0)];
  }
  block_sums<1>(acc);
  if (threadIdx.x == 0) out[d] = acc[0];
}

LC_API int lite_cuda_moe_decode(float *out, const float *x, int64_t dim, const int32_t *ids, const float *weights,
                                int64_t k, const lite_cuda_expert *table, int64_t n_entries, int64_t always,
                                int64_t max_ffn, float *d_scratch, int64_t scratch_floats, void *stream) {
  lc_clear();
  LC_REQUIRE(dim > 0 && k >= 0 && k <= LITE_CUDA_ROUTE_MAX_K && n_entries > 0 && n_entries <= MAX_GRID_Y &&
                 always >= -1 && always < n_entries && max_ffn > 0 && (k > 0 || always >= 0),
             LITE_CUDA_ERR_ARG, "bad sizes D=%lld K=%lld entries=%lld always=%lld F=%lld", (long long)dim,
             (long long)k, (long long)n_entries, (long long)always, (long long)max_ffn);
  LC_REQUIRE(out && x && table && d_scratch && (k == 0 || (ids && weights)), LITE_CUDA_ERR_NULL, "NULL buffer");
  const int64_t n_slot = k + (always >= 0), hs = hstride(max_ffn);
  LC_REQUIRE(scratch_floats >= n_slot * hs, LITE_CUDA_ERR_SIZE, "scratch holds %lld floats, needs %lld",
             (long long)scratch_floats, (long long)(n_slot * hs));
  LC_REQUIRE(((uintptr_t)x & 15) == 0 && ((uintptr_t)d_scratch & 15) == 0, LITE_CUDA_ERR_ARG,
             "input and scratch must be 16-byte aligned");
  cudaStream_t st = lc_stream(stream);
  LC_REQUIRE(max_ffn < (1ll << 31) && dim < (1ll << 31), LITE_CUDA_ERR_ARG, "too many rows");
  k_moe1_gate_up<<<dim3((unsigned)max_ffn, (unsigned)n_slot), MV_THREADS, 0, st>>>(
      table, (int)n_entries, ids, (int)always, x, dim, d_scratch, hs);
  LC_LAUNCHED("moe_decode gate/up");
  k_moe1_down<<<(unsigned)dim, MV_THREADS, 0, st>>>(table, (int)n_entries, ids, weights, (int)n_slot, (int)always,
                                                   d_scratch, hs, out);
  LC_LAUNCHED("moe_decode down");
  return LITE_CUDA_OK;
}
