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

#define LITE_ABI_VERSION 5

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
#define LITE_ISA_AVX512_VBMI 3  /* the same kernels built with VBMI and GFNI (Ice Lake and later) */

/* Where the one-token kernels and the MLA decode kernel prefetch the weights and cache they
 * stream (lite_set_prefetch): the core's first-level cache, or its second. */
#define LITE_PREFETCH_L1 0
#define LITE_PREFETCH_L2 1

/* Size of one activation block produced by lite_quantize_q8_k: float d, int8 qs[256], int16 bsums[16]. */
#define LITE_Q8_K_BYTES 292

int lite_abi_version(void);

/* Best level this CPU and build support, the level in use, and a switch (for tests/benchmarks). */
int lite_cpu_isa(void);
int lite_get_isa(void);
int lite_set_isa(int level);

/* The prefetch target in use, and a switch (for tests/benchmarks; results are the same bits
 * either way). The default is L2 on AMD CPUs and L1 elsewhere: on a Zen 4, prefetching the
 * streams into L1 decoded 1.11-1.14x slower than into L2 (and 1.04-1.05x slower than no
 * prefetch at all), while on an AVX-512 Xeon L2 was 0.95x as fast as L1. */
int lite_get_prefetch(void);
int lite_set_prefetch(int target);

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

/* Memory-bandwidth probe: read n_bytes of buf (each thread a share, as 8 interleaved streams) and
 * store the XOR of its 64-bit words in *out (so the reads cannot be skipped). n_bytes must be a
 * multiple of 8. */
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
 * Tokens are grouped by entry so each expert's weights are read once per call. Each token's terms
 * add into zero in the order shared, then k ascending, each term rounded before it adds. */
int lite_moe_scratch_bytes(int64_t *out, int64_t n_tok, int64_t dim, int64_t k, int64_t max_ffn);
int lite_moe(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t dim,
             const int32_t *slot, const float *weight, int64_t k,
             int64_t n_exp, const uint8_t **gate, const uint8_t **up, const uint8_t **down,
             const int32_t *types, const int64_t *nbytes, const int64_t *ffn, int64_t shared,
             uint8_t *scratch, int64_t scratch_bytes);

/* Fused decode-step ops (csrc/cpu/fused.c): one call each for a run of the ops above, with their
 * exact results. */

/* x [T, D] += delta [T, D] in place (delta may be NULL: no add), then out [T, D] = rmsnorm(x)
 * as lite_rmsnorm_f32: a residual add and the next norm. */
int lite_add_rmsnorm_f32(float *out, float *x, const float *delta, const float *w, int64_t n_rows, int64_t dim,
                         float eps);

/* MoE routing of T tokens from router logits [T, E]: probs [T, E] = lite_softmax_f32(logits), then
 * per token the k experts of highest probability (ties to the lower id) into ids [T, k], best
 * first; with n_group > 1 only experts in the topk_group groups of best top expert compete (the
 * others count 0). weights [T, k] = their probabilities, divided by (their sum + 1e-20) when
 * `norm` and k > 1, times `scale`. E <= 1024 and divisible by n_group; 0 <= k <= E. */
int lite_route(int32_t *ids, float *weights, float *probs, const float *logits, int64_t n_tok, int64_t n_exp,
               int64_t k, int64_t n_group, int64_t topk_group, int norm, float scale);

/* MLA inputs for T tokens at positions start..start+T-1 from the projections q [T, H, N+R] and
 * kv [T, C+R]: q_nope [T, H, N] = q[..., :N], q_pe [T, H, R] = rope(q[..., N:]); cache rows
 * start+t of ckv [cache_rows, C] = rmsnorm(kv[t, :C], norm_w, eps) and of kpe [cache_rows, R] =
 * rope(kv[t, C:]), rope by cos/sin [T, R/2]. */
int lite_mla_prep(float *q_nope, float *q_pe, float *ckv, float *kpe, int64_t cache_rows, const float *q,
                  const float *kv, const float *norm_w, const float *cos_t, const float *sin_t, int64_t n_tok,
                  int64_t n_head, int64_t n_nope, int64_t c_dim, int64_t r_dim, int64_t start, float eps);

/* A whole attention sublayer for T tokens at positions start..start+T-1: x [T, D] += delta (in
 * place; delta may be NULL), then out [T, D] = MLA attention of h = rmsnorm(x, norm, norm_eps),
 * exactly as the calls it makes in order: lite_add_rmsnorm_f32, q = h . q^T (or, with q_rank
 * Q > 0, rmsnorm(h . q_a^T, q_a_norm, eps) . q_b^T), kv = h . kv_a^T, lite_mla_prep (into the caches
 * ckv [cache_rows, C], kpe [cache_rows, R]), lite_matmul_heads by k_b, lite_mla_attention over
 * positions 0..start+T-1, lite_matmul_heads by v_b, and the output projection.
 * Weights w[6] with byte sizes w_bytes[6] and types[6]: q [H*(N+R), D] (or q_a [Q, D]), q_b
 * [H*(N+R), Q] (NULL when Q = 0), kv_a [C+R, D], k_b [H, C, N], v_b [H, V, C], out [D, H*V].
 * Scratch as lite_mla_step_scratch_bytes says. */
int lite_mla_step_scratch_bytes(int64_t *out, const int32_t *types, int64_t n_tok, int64_t dim, int64_t n_head,
                                int64_t n_nope, int64_t r_dim, int64_t c_dim, int64_t v_dim, int64_t q_rank);
int lite_mla_step(float *out, int64_t out_len, float *x, const float *delta, const float *norm, float norm_eps,
                  int64_t n_tok, int64_t dim, const uint8_t **w, const int64_t *w_bytes, const int32_t *types,
                  const float *q_a_norm, const float *kv_norm, int64_t n_head, int64_t n_nope, int64_t r_dim,
                  int64_t c_dim, int64_t v_dim, int64_t q_rank, float *ckv, float *kpe, int64_t cache_rows,
                  const float *cos_t, const float *sin_t, int64_t start, float scale, float eps, uint8_t *scratch,
                  int64_t scratch_bytes);

/* The FFN sublayer's input for T tokens: x [T, D] += delta and h [T, D] = its norm as
 * lite_add_rmsnorm_f32, then lite_route of the router logits h . router^T (router [E, D] of type
 * `type`, scratch as lite_matmul_scratch_bytes(type, T, D)) into ids, weights and probs. */
int lite_norm_route(float *h, float *x, const float *delta, const float *norm, float eps, int64_t n_tok, int64_t dim,
                    const uint8_t *router, int64_t router_bytes, int type, int64_t n_exp, int32_t *ids, float *weights,
                    float *probs, int64_t k, int64_t n_group, int64_t topk_group, int renorm, float scale,
                    uint8_t *scratch, int64_t scratch_bytes);

/* ---- a decode step through every layer (csrc/cpu/layers.c) ---------------------------------- */

/* One layer as lite_layers takes it. Attention: the weights, norms and dims of lite_mla_step, and
 * the layer's caches ckv [cache_rows, C] / kpe [cache_rows, R]. FFN: its norm, then either a
 * router [n_exp, D] (type router_type, router_bytes long) over n_exp routed experts, or
 * router = NULL for a dense layer (n_exp = 0). The expert table has n_exp + 1 entries as
 * lite_moe takes them: the routed experts by id, then the always-on MLP (shared experts or the
 * dense MLP), whose pointers are NULL when has_always is 0. */
typedef struct {
    const uint8_t **attn_w;
    const int64_t *attn_bytes;
    const int32_t *attn_types;
    const float *attn_norm;
    const float *q_a_norm;
    const float *kv_norm;
    float *ckv;
    float *kpe;
    const float *ffn_norm;
    const uint8_t *router;
    int64_t router_bytes;
    int32_t router_type;
    int32_t has_always;
    int64_t n_exp;
    const uint8_t **gate;
    const uint8_t **up;
    const uint8_t **down;
    const int32_t *types;
    const int64_t *nbytes;
    const int64_t *ffn;
} lite_layer;

#define LITE_LAYERS_MAX_K 64

/* One token through n_layer layers, with the results of the per-layer calls it makes in order:
 * lite_mla_step (x += the previous layer's FFN output, none before the first), then
 * lite_norm_route (or lite_add_rmsnorm_f32 for a dense layer) with eps norm_eps, then lite_moe
 * over the always-on MLP first and the routed experts in slot order. x [D] is the residual stream,
 * updated in place; delta [D] receives the last layer's FFN output (not added to x); ids
 * [n_layer, k] the experts each layer routed to (-1 for dense layers). Rope tables cos/sin
 * [R/2] for position `start`; scale, eps as lite_mla_step; routing as lite_route, k <=
 * LITE_LAYERS_MAX_K. Scratch as lite_layers_scratch_bytes says for the same layers. */
int lite_layers_scratch_bytes(int64_t *out, const lite_layer *layers, int64_t n_layer, int64_t dim, int64_t n_head,
                              int64_t n_nope, int64_t r_dim, int64_t c_dim, int64_t v_dim, int64_t q_rank,
                              int64_t k);
int lite_layers(float *x, float *delta, int64_t dim, const lite_layer *layers, int64_t n_layer, int64_t n_head,
                int64_t n_nope, int64_t r_dim, int64_t c_dim, int64_t v_dim, int64_t q_rank, int64_t cache_rows,
                const float *cos_t, const float *sin_t, int64_t start, float scale, float eps, float norm_eps,
                int64_t k, int64_t n_group, int64_t topk_group, int renorm, float route_scale, int32_t *ids,
                uint8_t *scratch, int64_t scratch_bytes);

#endif
