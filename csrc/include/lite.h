/* lite C ABI: the one header cffi reads (ABI mode), so it holds only plain declarations and
 * integer #defines. Conventions: `lite_` prefix, outputs first, sizes as int64_t, an int status
 * return (LITE_OK = 0, negative = error), no allocation inside kernels: callers pass scratch
 * buffers sized by the matching *_scratch_bytes function. Every buffer comes with its length in
 * bytes or elements so that the library can refuse instead of reading out of bounds.
 *
 * Shape legend: T tokens, S cached positions, D hidden, H heads, C latent dims, R rope dims,
 * N weight rows, F expert width. All float arrays are C-contiguous float32.
 */
#ifndef LITE_H
#define LITE_H
#include <stdint.h>

#define LITE_ABI_VERSION 3

#define LITE_OK 0
#define LITE_ERR_ARG -1      /* a size, count, index or option is invalid */
#define LITE_ERR_TYPE -2     /* unsupported block type code */
#define LITE_ERR_NULL -3     /* a required pointer is NULL */
#define LITE_ERR_SIZE -4     /* a buffer is shorter than the shapes require */
#define LITE_ERR_BLOCK -5    /* a row length is not a multiple of the type's block size */
#define LITE_ERR_ISA -6      /* the requested instruction set is not supported by this CPU/build */

/* Weight type codes: ggml's numbering (gguf.constants.GGMLQuantizationType). */
#define LITE_TYPE_F32 0
#define LITE_TYPE_F16 1
#define LITE_TYPE_Q4_0 2
#define LITE_TYPE_Q8_0 8
#define LITE_TYPE_Q4_K 12
#define LITE_TYPE_Q6_K 14
#define LITE_TYPE_BF16 30

/* Instruction-set levels for lite_set_isa. */
#define LITE_ISA_SCALAR 0
#define LITE_ISA_AVX2 1      /* AVX2 + FMA + F16C */
#define LITE_ISA_AVX512 2    /* AVX-512 F/BW/VL + VNNI */

/* Size of one activation block produced by lite_quantize_q8_k: float d, int8 qs[256], int16 bsums[16]. */
#define LITE_Q8_K_BYTES 292

int lite_abi_version(void);

/* Best level this CPU and build support, the level in use, and a switch (for tests/benchmarks). */
int lite_cpu_isa(void);
int lite_get_isa(void);
int lite_set_isa(int level);

/* OpenMP threads used by every kernel (n >= 1). */
int lite_set_threads(int n);
int lite_get_threads(void);

/* Bytes of one row of `cols` weights of type `type`. */
int lite_row_bytes(int64_t *out, int type, int64_t cols);

/* Activation quantization, ggml Q8_0 blocks (fp16 d, int8 qs[32]; bit-exact with ggml/gguf):
 * x [n_rows, cols] -> out (n_rows*cols/32*34 bytes). */
int lite_quantize_q8_0(uint8_t *out, int64_t out_bytes, const float *x, int64_t n_rows, int64_t cols);
/* 256-blocks (float d = amax/127, q = round(x/d), bsums = sums of 16): out n_rows*cols/256*292 bytes. */
int lite_quantize_q8_k(uint8_t *out, int64_t out_bytes, const float *x, int64_t n_rows, int64_t cols);

/* out [T, N] = x [T, cols] . W^T for W [N, cols] of type `type` (w_bytes = N * row bytes).
 * Quantized types quantize x into `scratch` first (lite_matmul_scratch_bytes tells how much). */
int lite_matmul_scratch_bytes(int64_t *out, int type, int64_t n_tok, int64_t cols);
int lite_matmul(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t cols,
                const uint8_t *w, int64_t w_bytes, int type, int64_t n_rows,
                uint8_t *scratch, int64_t scratch_bytes);

/* Per-head matmul, all heads in one call: out [T, H, N] = x [T, H, cols] . W_h^T for every head h,
 * W [H, N, cols] of type `type` (w_bytes = H * N * row bytes; head h's rows start at h * N * row
 * bytes). Scratch as lite_matmul_heads_scratch_bytes says (the activations of T*H rows). */
int lite_matmul_heads_scratch_bytes(int64_t *out, int type, int64_t n_tok, int64_t n_head, int64_t cols);
int lite_matmul_heads(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t n_head,
                      int64_t cols, const uint8_t *w, int64_t w_bytes, int type, int64_t n_rows,
                      uint8_t *scratch, int64_t scratch_bytes);

/* Memory-bandwidth probe: read n_bytes of buf (threads across chunks) and store the XOR of its
 * 64-bit words in *out (so the reads cannot be skipped). n_bytes must be a multiple of 8. */
int lite_read_bytes(uint64_t *out, const uint8_t *buf, int64_t n_bytes);

/* out [T, D] = w * x / sqrt(mean(x^2) + eps) per row. */
int lite_rmsnorm_f32(float *out, const float *x, const float *w, int64_t n_rows, int64_t dim, float eps);

/* out [T, H, R] = interleaved-pair rotation of x [T, H, R] by cos/sin [T, R/2]. */
int lite_rope_f32(float *out, const float *x, const float *cos_t, const float *sin_t,
                  int64_t n_tok, int64_t n_head, int64_t dim);

/* Row-wise softmax of x [T, N] (max subtracted). */
int lite_softmax_f32(float *out, const float *x, int64_t n_rows, int64_t n);

/* out = silu(g) * u, n elements. */
int lite_silu_mul_f32(float *out, const float *g, const float *u, int64_t n);

/* Absorbed MLA attention in latent space: out [T, H, C] =
 * softmax((q_lat . ckv^T + q_pe . kpe^T) * scale, causal: query t sees positions 0..start+t) . ckv
 * q_lat [T, H, C], q_pe [T, H, R], ckv [S, C], kpe [S, R]; requires S >= start + T. */
int lite_mla_attention(float *out, const float *q_lat, const float *q_pe, const float *ckv,
                       const float *kpe, int64_t n_tok, int64_t n_head, int64_t c_dim, int64_t r_dim,
                       int64_t n_pos, int64_t start, float scale);

/* Mixture of experts for T tokens in one call.
 * The expert table has n_exp entries; entry e has gate [F_e, D], up [F_e, D], down [D, F_e] block
 * data at gate[e], up[e], down[e] with type codes types[3e+0..2] and byte lengths nbytes[3e+0..2].
 * slot [T, K] indexes the table (0 <= slot < n_exp) and weight [T, K] scales each expert's output.
 * `shared` is an entry index run for every token with weight 1 (a shared expert, or a dense MLP
 * with K = 0), or -1 for none. out [T, D] = sum_k weight[t,k] * FFN_slot[t,k](x[t]) + FFN_shared(x[t]).
 * Tokens are grouped by entry so each expert's weights are read once per call. */
int lite_moe_scratch_bytes(int64_t *out, int64_t n_tok, int64_t dim, int64_t k, int64_t max_ffn);
int lite_moe(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t dim,
             const int32_t *slot, const float *weight, int64_t k,
             int64_t n_exp, const uint8_t **gate, const uint8_t **up, const uint8_t **down,
             const int32_t *types, const int64_t *nbytes, const int64_t *ffn, int64_t shared,
             uint8_t *scratch, int64_t scratch_bytes);

#endif
