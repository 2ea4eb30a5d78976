/* lite CUDA ABI: the one header cffi reads (ABI mode) for liblite_cuda.so, so it holds only plain
 * declarations and integer #defines. Same conventions as csrc/include/lite.h: `lite_cuda_`
 * prefix, outputs first, sizes as int64_t, an int status return (LITE_CUDA_OK = 0, negative =
 * error; lite_cuda_last_error gives the message of the last failure on the calling thread), no
 * allocation inside kernels: callers pass scratch sized by the matching *_scratch_bytes function.
 *
 * Pointers named d_* / out / x are DEVICE pointers (from lite_cuda_malloc); h_* are host pointers.
 * `stream` is a handle from lite_cuda_stream_create, or NULL for the legacy default stream. Every
 * kernel call is asynchronous on its stream; memcpy_d2h and the *_sync calls wait.
 *
 * Shape legend: T tokens, S cached positions, D hidden, H heads, C latent dims, R rope dims,
 * N weight rows, F expert width, E experts, K experts per token. Float arrays are C-contiguous
 * float32. Weights are ggml block bytes as in the GGUF file, dequantized in registers; Q4_0 and
 * Q8_0 weights must first be put in the device layout by lite_cuda_repack (same size).
 */
#ifndef LITE_CUDA_H
#define LITE_CUDA_H
#include <stdint.h>

#define LITE_CUDA_ABI_VERSION 3

#define LITE_CUDA_OK 0
#define LITE_CUDA_ERR_ARG -1      /* a size, count, index or option is invalid */
#define LITE_CUDA_ERR_TYPE -2     /* unsupported block type code */
#define LITE_CUDA_ERR_NULL -3     /* a required pointer is NULL */
#define LITE_CUDA_ERR_SIZE -4     /* a buffer is shorter than the shapes require */
#define LITE_CUDA_ERR_BLOCK -5    /* a row length is not a multiple of the type's block size */
#define LITE_CUDA_ERR_CUDA -7     /* a CUDA runtime call failed (see lite_cuda_last_error) */
#define LITE_CUDA_ERR_NODEV -8    /* no CUDA device or no driver */
#define LITE_CUDA_ERR_NOMEM -9    /* device (or pinned host) memory exhausted */

/* Weight type codes: ggml's numbering (gguf.constants.GGMLQuantizationType). */
#define LITE_CUDA_TYPE_F32 0
#define LITE_CUDA_TYPE_F16 1
#define LITE_CUDA_TYPE_Q4_0 2
#define LITE_CUDA_TYPE_Q8_0 8
#define LITE_CUDA_TYPE_Q4_K 12
#define LITE_CUDA_TYPE_Q6_K 14
#define LITE_CUDA_TYPE_BF16 30

/* Kernel limits. */
#define LITE_CUDA_MLA_MAX_C 1024   /* latent dims (plus rope dims) per head in mla_attention */
#define LITE_CUDA_ROUTE_MAX_E 1024 /* experts in route */
#define LITE_CUDA_ROUTE_MAX_K 64   /* experts per token in route */

int lite_cuda_abi_version(void);

/* Message of the last failure on this thread (NUL-terminated, truncated to n bytes); returns
 * the status code of that failure (0 when none). */
int lite_cuda_last_error(char *buf, int64_t n);

/* ---- devices ---------------------------------------------------------------------------------- */
/* Number of usable devices. No driver or no device: *count = 0 and LITE_CUDA_ERR_NODEV (never a
 * crash: the CUDA runtime is linked statically and opens libcuda.so lazily). */
int lite_cuda_device_count(int *count);
int lite_cuda_set_device(int device);
int lite_cuda_get_device(int *device);
/* Properties of `device`: name (NUL-terminated into name_len bytes), total and free memory in
 * bytes, compute capability, multiprocessor count. */
int lite_cuda_device_props(char *name, int64_t name_len, int64_t *total_mem, int64_t *free_mem,
                           int *cc_major, int *cc_minor, int *sm_count, int device);
int lite_cuda_device_sync(void);

/* ---- memory --------------------------------------------------------------------------------- */
int lite_cuda_malloc(void **d_out, int64_t nbytes);
int lite_cuda_free(void *d_ptr);                      /* NULL is a no-op */
int lite_cuda_memset(void *d_dst, int value, int64_t nbytes, void *stream);
int lite_cuda_memcpy_h2d(void *d_dst, const void *h_src, int64_t nbytes);
int lite_cuda_memcpy_d2h(void *h_dst, const void *d_src, int64_t nbytes);
int lite_cuda_memcpy_d2d(void *d_dst, const void *d_src, int64_t nbytes, void *stream);
/* Asynchronous copies: truly asynchronous only from/to pinned host memory (host_alloc or
 * host_register); from pageable memory they return once the source has been staged. */
int lite_cuda_memcpy_h2d_async(void *d_dst, const void *h_src, int64_t nbytes, void *stream);
int lite_cuda_memcpy_d2h_async(void *h_dst, const void *d_src, int64_t nbytes, void *stream);
/* Pinned host memory: allocate, or pin an existing range (e.g. the expert pager's slot pool). */
int lite_cuda_host_alloc(void **h_out, int64_t nbytes);
int lite_cuda_host_free(void *h_ptr);
int lite_cuda_host_register(void *h_ptr, int64_t nbytes);
int lite_cuda_host_unregister(void *h_ptr);

/* ---- streams and events --------------------------------------------------------------------- */
int lite_cuda_stream_create(void **out);             /* non-blocking w.r.t. the default stream */
int lite_cuda_stream_destroy(void *stream);
int lite_cuda_stream_sync(void *stream);
int lite_cuda_event_create(void **out);
int lite_cuda_event_destroy(void *event);
int lite_cuda_event_record(void *event, void *stream);
int lite_cuda_stream_wait_event(void *stream, void *event);  /* stream waits for event */
int lite_cuda_event_sync(void *event);
/* Milliseconds between two recorded (and completed) events. */
int lite_cuda_event_elapsed(float *ms, void *start, void *end);

/* ---- kernels ---------------------------------------------------------------------------------- */
/* dst (device) = the rows of src (device, nbytes of rows of `cols` weights of `type`) in the layout
 * the kernels read: for Q4_0 / Q8_0 each row's quants first (16 / 32 bytes a block), then its fp16
 * scales, so a warp reads quants coalesced; other types are copied as they are. dst and src must
 * not overlap. Asynchronous on `stream`. */
int lite_cuda_repack(uint8_t *dst, const uint8_t *src, int64_t nbytes, int type, int64_t cols, void *stream);

/* The one-token matvec of quantized weights: 1 = a block of threads per weight row (default), 0 =
 * a warp per row (the many-token kernel's). Process-wide; for measuring and testing both. */
int lite_cuda_set_matvec(int variant);

/* Bytes of one row of `cols` weights of type `type`. */
int lite_cuda_row_bytes(int64_t *out, int type, int64_t cols);

/* out [T, N] = x [T, cols] . W^T for W [N, cols] of `type` (w_bytes = N * row bytes). A warp per
 * weight row; T = 1 is a matvec, T > 1 reuses each decoded block for a tile of 8 tokens. */
int lite_cuda_matmul(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t cols,
                     const uint8_t *w, int64_t w_bytes, int type, int64_t n_rows, void *stream);

/* Per head h < n_head: out + h * out_hs [T, N] = (x + h * x_hs) [T, cols] . W_h^T, for W [H, N, cols]
 * (w_bytes >= H * N * row bytes); one launch for all heads. A quantized weight needs x 16-byte
 * aligned and x_hs a multiple of 4 (its blocks are read as float4). */
int lite_cuda_matmul_heads(float *out, int64_t out_len, int64_t out_hs, const float *x, int64_t x_hs,
                           int64_t n_tok, int64_t cols, const uint8_t *w, int64_t w_bytes, int type,
                           int64_t n_rows, int64_t n_head, void *stream);

/* out [T, D] = w * x / sqrt(mean(x^2) + eps) per row. */
int lite_cuda_rmsnorm_f32(float *out, const float *x, const float *w, int64_t n_rows, int64_t dim,
                          float eps, void *stream);
/* x += delta (in place; delta may be NULL), then out = rmsnorm(x) as above. */
int lite_cuda_add_rmsnorm_f32(float *out, float *x, const float *delta, const float *w, int64_t n_rows,
                              int64_t dim, float eps, void *stream);
/* out [T, H, R] = interleaved-pair rotation of x [T, H, R] by cos/sin [T, R/2]. */
int lite_cuda_rope_f32(float *out, const float *x, const float *cos_t, const float *sin_t,
                       int64_t n_tok, int64_t n_head, int64_t dim, void *stream);
/* The same with row strides: row (t, h) of x at x + (t * H + h) * x_stride, of out likewise
 * (e.g. the rope part of each head's query, in place). */
int lite_cuda_rope_rows(float *out, int64_t out_stride, const float *x, int64_t x_stride, const float *cos_t,
                        const float *sin_t, int64_t n_tok, int64_t n_head, int64_t dim, void *stream);
/* Row-wise softmax of x [T, N] (max subtracted). */
int lite_cuda_softmax_f32(float *out, const float *x, int64_t n_rows, int64_t n, void *stream);
/* out = silu(g) * u, n elements. */
int lite_cuda_silu_mul_f32(float *out, const float *g, const float *u, int64_t n, void *stream);

/* Absorbed MLA attention in latent space (cache on device): out [T, H, C] =
 * softmax((q_lat . ckv^T + q_pe . kpe^T) * scale, causal: query t sees positions 0..start+t) . ckv
 * q_lat [T, H, C], q_pe [T, H, R], ckv [S, C], kpe [S, R]; requires S >= start + T,
 * C + R <= LITE_CUDA_MLA_MAX_C. Online softmax over chunks of positions; the positions are split
 * among several blocks per (token, head) when d_scratch (device) holds their partials:
 * lite_cuda_mla_scratch_floats gives the floats for the full split (0: none helps); with less (or
 * NULL) fewer splits run. */
int lite_cuda_mla_scratch_floats(int64_t *out, int64_t n_tok, int64_t n_head, int64_t c_dim, int64_t start);
int lite_cuda_mla_attention(float *out, const float *q_lat, const float *q_pe, const float *ckv,
                            const float *kpe, int64_t n_tok, int64_t n_head, int64_t c_dim,
                            int64_t r_dim, int64_t n_pos, int64_t start, float scale, float *d_scratch,
                            int64_t scratch_floats, void *stream);

/* Router on device: probs [T, E] = softmax(logits [T, E]); ids int32 [T, K] and weights [T, K]
 * = top-K of probs (ties to the lower id), restricted to the best `topk_group` of `n_group`
 * groups (group score: its best expert) when n_group > 1; weights renormalised to sum 1 when
 * `norm` (and K > 1), then multiplied by `scale`. Same semantics as lite/model/moe.py:route. */
int lite_cuda_route(int32_t *ids, float *weights, float *probs, const float *logits, int64_t n_tok,
                    int64_t n_exp, int64_t k, int64_t n_group, int64_t topk_group, int norm,
                    float scale, void *stream);

/* Mixture of experts for T tokens in one call (routed and shared experts fused: three launches).
 * The expert table has n_exp entries; entry e has gate [F_e, D], up [F_e, D], down [D, F_e] block
 * data at DEVICE pointers h_gate[e], h_up[e], h_down[e] (the pointer arrays themselves are host
 * arrays), type codes h_types[3e+0..2], byte lengths h_nbytes[3e+0..2], width h_ffn[e].
 * h_slot [T, K] (host) indexes the table (-1: no expert in that slot, e.g. one run elsewhere)
 * and h_weight [T, K] (host) scales each expert's output.
 * `shared` is an entry run for every token with weight 1 (a shared expert, or a dense MLP with
 * K = 0), or -1. out [T, D] = sum_k weight[t,k] * FFN_slot[t,k](x[t]) + FFN_shared(x[t]), summed
 * per token in a fixed order (shared, then k ascending): deterministic, no atomics.
 * Scratch: d_scratch (device) and h_scratch (host, pinned or not) of the sizes
 * lite_cuda_moe_scratch_bytes reports; h_scratch must stay untouched until the stream has
 * passed this call when it is pinned. */
int lite_cuda_moe_scratch_bytes(int64_t *d_bytes, int64_t *h_bytes, int64_t n_tok, int64_t dim,
                                int64_t k, int64_t max_ffn, int64_t n_exp);
int lite_cuda_moe(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t dim,
                  const int32_t *h_slot, const float *h_weight, int64_t k,
                  int64_t n_exp, const uint8_t **h_gate, const uint8_t **h_up, const uint8_t **h_down,
                  const int32_t *h_types, const int64_t *h_nbytes, const int64_t *h_ffn, int64_t shared,
                  uint8_t *d_scratch, int64_t d_bytes, uint8_t *h_scratch, int64_t h_bytes, void *stream);

/* One expert of a device-resident table: gate [F, D], up [F, D], down [D, F] at device pointers. */
typedef struct {
  const uint8_t *w[3];
  int64_t row_bytes[3];
  int32_t type[3];
  int32_t ffn;
} lite_cuda_expert;

/* One token's experts with its routing already on the device (decode without a host round trip):
 * out [D] = FFN_always(x) + sum_k weights[k] * FFN_table[ids[k]](x), summed in that order.
 * table: DEVICE array of n_entries experts (checked by the caller when it was built); ids [K]
 * and weights [K]: DEVICE arrays (an id outside 0..n_entries-1 is skipped); `always` indexes
 * the table (a shared expert or a dense MLP) or is -1; max_ffn bounds every entry's F.
 * d_scratch: (K + 1) * round_up(max_ffn, 32) floats. */
int lite_cuda_moe_decode(float *out, const float *x, int64_t dim, const int32_t *ids, const float *weights,
                         int64_t k, const lite_cuda_expert *table, int64_t n_entries, int64_t always,
                         int64_t max_ffn, float *d_scratch, int64_t scratch_floats, void *stream);

#endif
