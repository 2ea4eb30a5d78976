/* Internal declarations shared by the CPU kernel files (not part of the ABI).
 *
 * Activation layouts used inside matmul (one row per token, `stride` bytes apart, 64-byte aligned):
 *   A8  (for Q4_0 / Q8_0 weights): int8 qs[nb*32], then float d[nb]   (d already rounded to fp16),
 *       then float s[nb] = 8 * d * sum(qs of the block): Q4_0's +8 nibble offset, taken off in float
 *       (the 8 is exact, so any product with it rounds as if it were applied last)
 *   A8K (for Q4_K / Q6_K weights): int8 qs[nb*256], int16 bsums[nb*16], float d[nb]
 * Float weights (F32/F16/BF16) take float activations directly.
 */
#ifndef LITE_INTERNAL_H
#define LITE_INTERNAL_H

#include <stdint.h>
#include <stdatomic.h>
#include <string.h>
#include <math.h>
#include "lite.h"

#define QK 32
#define QKK 256
#define Q4_0_BYTES 18
#define Q8_0_BYTES 34
#define Q4_K_BYTES 144
#define Q6_K_BYTES 210
#define Q8_K_BYTES 292

/* Largest tile a kernel is asked to compute: rows x tokens. */
#define TILE_R 4
#define TILE_T 4

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE binary16 <-> binary32, round-to-nearest-even, portable (same results as F16C / numpy). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
    return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00 : 0x7c00);
    if (x >= 0x477ff000u) return sign | 0x7c00;
    if (x < 0x38800000u) {
        float a = bits_f32(x) + 0.5f;
        return sign | (uint16_t)(f32_bits(a) - 0x3f000000u);
    }
    x += 0xc8000fffu + ((x >> 13) & 1);
    return sign | (uint16_t)(x >> 13);
}

/* Rope on one row of 2 * half values, interleaved pairs (x[2i], x[2i+1]) rotated by (c[i], s[i]). */
static inline void rope_pairs(float *y, const float *x, const float *c, const float *s, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float e = x[2 * i], o = x[2 * i + 1];
        y[2 * i] = e * c[i] - o * s[i];
        y[2 * i + 1] = e * s[i] + o * c[i];
    }
}

static inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* Q4_K: unpack 6-bit scale/min j (0..7) from the 12 scale bytes. */
static inline void q4k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* n rounded up to a multiple of 64: offsets of scratch regions, each cache-line aligned. */
static inline int64_t align64(int64_t n) { return (n + 63) & ~(int64_t)63; }

/* Entries (experts, plus a shared MLP) one lite_moe call takes. */
#define MOE_MAX_ENTRIES 1024

/* Byte sizes of the activation rows. */
static inline int64_t a8_stride(int64_t cols) { return ((cols / QK) * (QK + 8) + 63) & ~(int64_t)63; }
/* Fills s[] of an A8 row whose qs[] and d[] are written. */
static inline void a8_fill_sums(uint8_t *row, int64_t nb) {
    const int8_t *qs = (const int8_t *)row;
    const float *d = (const float *)(row + nb * QK);
    float *s = (float *)(row + nb * (QK + 4));
    for (int64_t b = 0; b < nb; b++) {
        int sum = 0;
        for (int i = 0; i < QK; i++) sum += qs[b * QK + i];
        s[b] = 8.0f * (d[b] * (float)sum);
    }
}
static inline int64_t a8k_stride(int64_t cols) { return ((cols / QKK) * (QKK + 32 + 4) + 63) & ~(int64_t)63; }

/* Tile kernel: out[t*ldo + r] = dot(weight row r, activation row t) for r < nr, t < nt.
 * w: first weight row, wstride bytes between rows; a: first activation row, astride bytes apart.
 * cols: row length in weights. nr <= TILE_R, nt <= TILE_T. */
typedef void (*tile_fn)(float *out, int64_t ldo, const uint8_t *w, int64_t wstride, int nr,
                        const uint8_t *a, int64_t astride, int nt, int64_t cols);
/* Streaming matrix-vector kernel (one token): out[r] = dot(weight row r, activation row a) for
 * r < nr, each row read start to end before the next. NULL where an ISA has none: the 4-row tiles
 * serve instead. cols <= MV_MAX_COLS (the kernels keep per-block values on the stack). */
typedef void (*mv_fn)(float *out, const uint8_t *w, int64_t wstride, int64_t nr, const uint8_t *a, int64_t cols);
/* The same over four runs of nr rows, gap rows apart (out likewise), read in lockstep: a core that
 * streams four places at once keeps more lines in flight than one stream's prefetchers do (two
 * threads reading 4 interleaved streams each: 1.3-1.5x the bandwidth of one stream each on an
 * AVX-512 Xeon). Each row's result is bit for bit the mv kernel's. NULL where an ISA has none. */
typedef void (*mv4_fn)(float *out, const uint8_t *w, int64_t wstride, int64_t nr, const uint8_t *a, int64_t cols,
                       int64_t gap);
/* The rows a thread multiplies after the current call, where its caller knows them (else NULL):
 * n_rows rows row_bytes apart from w. */
typedef struct { const uint8_t *w; int64_t row_bytes, n_rows; } lite_rows_ahead;
/* Many-token kernel over whole groups of 8 rows: out[t*ldo + r] = dot(weight row r, activation
 * row t) for r < nr (a multiple of 8), t < n_tok. Its chunks prefetch the next chunk's weights,
 * and its last chunk the first of `ahead`'s. NULL where an ISA has none: tiles serve. */
typedef void (*rows8_fn)(float *out, int64_t ldo, const uint8_t *w, int64_t wstride, int64_t nr, const uint8_t *a,
                         int64_t astride, int64_t n_tok, int64_t cols, const lite_rows_ahead *ahead);
#define MV_MAX_COLS 32768
/* Rows per work item when one token streams through a matrix: long enough runs for the prefetch,
 * short enough to share rows evenly between threads. */
#define MV_ROWS 16
/* Absorbed MLA attention of nh <= MLA_HEAD_GROUP heads of one query over cache positions
 * [0, n_vis): out [nh, C] = softmax((ql . ckv^T + qp . kpe^T) * scale) . ckv, with ql [nh, C],
 * qp [nh, R], ckv [n_vis, C], kpe [n_vis, R]; an online softmax over chunks of MLA_CHUNK
 * positions, so each chunk of the cache is read once for all nh heads. */
typedef void (*mla_fn)(float *out, const float *ql, const float *qp, const float *ckv, const float *kpe,
                       int64_t n_vis, int nh, int64_t c_dim, int64_t r_dim, float scale);
#define MLA_MAX_C 1024     /* latent dims supported (DeepSeek-V2: 512) */
#define MLA_HEAD_GROUP 8
#define MLA_CHUNK 48       /* positions per online-softmax step: 16 triples of rows for the 4x3 score tiles */
/* out[i] = silu(g[i]) * u[i] for i < n (out may be g). */
typedef void (*silu_fn)(float *out, const float *g, const float *u, int64_t n);
/* XOR of the n (a multiple of 8) bytes at p as 64-bit words: the bandwidth probe's read, with the
 * widest loads an ISA has (scalar 64-bit loads read 12-15% slower from DRAM on an AVX-512 Xeon). */
typedef uint64_t (*read_fn)(const uint8_t *p, int64_t n);
/* Quantize n_rows float rows of length cols into an activation layout (A8 or A8K). */
typedef void (*quant_fn)(uint8_t *a, int64_t astride, const float *x, int64_t n_rows, int64_t cols);

enum { K_Q4_0, K_Q8_0, K_Q4_K, K_Q6_K, K_F32, K_F16, K_BF16, K_COUNT };

typedef struct {
    tile_fn tile[K_COUNT];
    mv_fn mv[K_COUNT];
    mv4_fn mv4[K_COUNT];
    rows8_fn rows8[K_COUNT];
    mla_fn mla;
    silu_fn silu_mul;
    quant_fn quant_a8;
    quant_fn quant_a8k;
    read_fn read_xor;
} kernel_table;

void lite_kernels_scalar(kernel_table *t);
void lite_kernels_avx2(kernel_table *t);
void lite_kernels_avx512(kernel_table *t);
void lite_kernels_avx512_vbmi(kernel_table *t);   /* kern_avx512.c built with VBMI */

/* Nonzero: the one-token and MLA decode kernels prefetch into L2, else into L1 (lite_set_prefetch). */
extern int lite_prefetch_l2;

/* Currently selected table (set by lite_set_isa). */
const kernel_table *lite_active_kernels(void);

/* Whether a kind's products read quantized activations (else the float input itself). */
static inline int lite_is_quant(int kind) { return kind <= K_Q6_K; }
/* The activation quantizer of a quantized kind: A8 for Q4_0/Q8_0, A8K for the K-quants. */
static inline quant_fn lite_quant_of(int kind) {
    const kernel_table *kt = lite_active_kernels();
    return kind == K_Q4_0 || kind == K_Q8_0 ? kt->quant_a8 : kt->quant_a8k;
}

/* Scalar quantizers, shared by every ISA as the bit-exact definition. */
void lite_quant_a8_scalar(uint8_t *a, int64_t astride, const float *x, int64_t n_rows, int64_t cols);
void lite_quant_a8k_scalar(uint8_t *a, int64_t astride, const float *x, int64_t n_rows, int64_t cols);

void lite_silu_mul_scalar(float *out, const float *g, const float *u, int64_t n);
void lite_mla_heads_scalar(float *out, const float *ql, const float *qp, const float *ckv, const float *kpe,
                           int64_t n_vis, int nh, int64_t c_dim, int64_t r_dim, float scale);

/* Kernel class for a ggml type code, or -1. */
int lite_kind_of(int type);
/* Bytes per row for a type code and row length, or -1 when cols is not a multiple of the block. */
int64_t lite_row_bytes_of(int type, int64_t cols);

/* Activation layout a kind's products read: 0 A8 (Q4_0, Q8_0), 1 A8K (K-quants), 2 the float
 * input itself. */
static inline int lite_act_class(int kind) { return (kind == K_Q4_0 || kind == K_Q8_0) ? 0 : (kind <= K_Q6_K ? 1 : 2); }
/* lite_matmul of one input with n <= LITE_MATMUL_MANY_MAX weights (out[i]: [n_tok, n_rows[i]]), in
 * one parallel region with the input quantized once where their activation layouts agree (else
 * one call each): an MLA step's q (or q_a) and kv_a read the same normed input, and a lone
 * token's second call cost another region start (~10-15 µs with sleeping workers). Results are
 * lite_matmul's, bit for bit. */
#define LITE_MATMUL_MANY_MAX 4
int lite_matmul_many(int n, float *const *out, const int64_t *out_len, const float *x, int64_t n_tok, int64_t cols,
                     const uint8_t *const *w, const int64_t *w_bytes, const int32_t *type, const int64_t *n_rows,
                     uint8_t *scratch, int64_t scratch_bytes);
/* Rows per panel, the unit of work of a multi-token product: 64 rows of a 2048-wide Q4_0 or
 * Q8_0 matrix (72-136 KiB) stay in L2 while each 4-token tile of activations passes over them. */
#define PANEL_R 64
/* Work items of one product, rows [0, n_rows) of w times n_tok activation rows, for callers that
 * share them between threads (each item single-threaded): panels of PANEL_R rows for many tokens
 * (quarters of a product with fewer than 4 * PANEL_R rows); for one token runs of MV_ROWS rows,
 * each item taking a run at each quarter of the matrix at once where the ISA has a four-stream
 * kernel for the kind (the rows a quarter's items leave over are runs of their own). Items may
 * go to threads in any grouping; a caller that knows which item a thread takes next passes its
 * rows (lite_product_item_rows) as `ahead`, else NULL. */
int64_t lite_product_items(int kind, int64_t n_rows, int64_t n_tok, int64_t cols);
void lite_product_item(float *out, int64_t ldo, const uint8_t *w, int64_t row_bytes, int64_t n_rows, int kind,
                       const uint8_t *act, int64_t astride, int64_t n_tok, int64_t cols, int64_t item,
                       const lite_rows_ahead *ahead);
/* The weight rows of a multi-token product's item. */
lite_rows_ahead lite_product_item_rows(const uint8_t *w, int64_t row_bytes, int64_t n_rows, int64_t item);
/* Scratch bytes for the activations of n_tok rows (0 for float weights). */
int64_t lite_act_stride(int kind, int64_t cols);

int lite_num_threads(void);

/* The threads of one parallel region meeting between the phases of a decode step. OpenMP's own
 * barriers sleep at once under OMP_WAIT_POLICY=passive (lite's default: spinning workers slow a
 * machine shared with other work), and each wake costs ~10-15 µs where a decode layer has about
 * ten phases; this barrier spins briefly first (team.c). Initialised before the region; every
 * thread of the region calls lite_team_sync at the same points. */
#define LITE_TEAM_MAX 1024   /* threads a team may have (lite_set_threads' limit) */
typedef struct {
    _Atomic uint32_t arrived, gen, sleepers;
    int timed, n_span;                      /* n_span: spans set up, for lite_num_threads() threads */
    _Atomic uint64_t span[LITE_TEAM_MAX];   /* lite_share: each thread's items left, tagged by phase */
} lite_team;
/* timed: the region is a decode step, whose waits are short unless the machine is busy, and they
 * feed team.c's estimate of that; a prefill's phases wait out each other's imbalance for longer,
 * which says nothing about the machine, so its waits only read the estimate. */
void lite_team_init(lite_team *t, int timed);
void lite_team_sync(lite_team *t);

/* The items [0, n) of one phase of a team's region, shared so that each thread runs long
 * ascending runs and no thread waits long for another: each starts on its own contiguous share,
 * takes it a few items at a time from the front, then takes from the back of the others' shares
 * until every item is taken. Every thread of the region calls lite_share_begin with the same n
 * between the same two lite_team_syncs, then lite_share_next until it returns 0. */
typedef struct { lite_team *t; int64_t n; uint32_t me, nth, tag, victim; } lite_share;
void lite_share_begin(lite_share *s, lite_team *t, int64_t n);
int lite_share_next(lite_share *s, int64_t *a, int64_t *b);

/* Up to LITE_MATMUL_MANY_MAX products of one input, checked and numbered for sharing between a
 * region's threads: lite_products_plan checks the arguments (codes as lite_matmul, or
 * LITE_PRODUCTS_MIXED where the products' activation layouts differ), lite_products_quantize fills the
 * activations on the calling thread, lite_products_run takes this thread's share of the work items
 * without a barrier (by lite_share in team t's region). */
#define LITE_PRODUCTS_MIXED 1
typedef struct {
    int n, kind[LITE_MATMUL_MANY_MAX];
    float *out[LITE_MATMUL_MANY_MAX];
    const uint8_t *w[LITE_MATMUL_MANY_MAX];
    int64_t rb[LITE_MATMUL_MANY_MAX], n_rows[LITE_MATMUL_MANY_MAX], first[LITE_MATMUL_MANY_MAX + 1];
    int64_t n_tok, cols, astride;
    const uint8_t *act;    /* quantized activations (the scratch), or the float input */
} lite_products;
int lite_products_plan(lite_products *P, int n, float *const *out, const int64_t *out_len, const float *x,
                       int64_t n_tok, int64_t cols, const uint8_t *const *w, const int64_t *w_bytes,
                       const int32_t *type, const int64_t *n_rows, uint8_t *scratch, int64_t scratch_bytes);
/* lite_products_plan, split into one set per product where their activation layouts differ:
 * *n_sets sets, 1 or n (codes as lite_products_plan, never LITE_PRODUCTS_MIXED). */
int lite_products_plan_split(lite_products *sets, int *n_sets, int n, float *const *out, const int64_t *out_len,
                             const float *x, int64_t n_tok, int64_t cols, const uint8_t *const *w,
                             const int64_t *w_bytes, const int32_t *type, const int64_t *n_rows, uint8_t *scratch,
                             int64_t scratch_bytes);
void lite_products_quantize(const lite_products *P, const float *x);
void lite_products_run(const lite_products *P, lite_team *t);
/* Outside a region: P computed in one region of its own (lite_matmul_many's work after its checks). */
void lite_products_region(const lite_products *P, const float *x);
/* Inside a region, the calling team computes P: the input quantized by the first thread, then the
 * items shared; returns when every item is done. */
void lite_products_team(const lite_products *P, const float *x, lite_team *t);

/* lite_mla_step's arguments (in its order) and, from lite_mla_plan, its checks' verdict, scratch
 * layout and, for one token, the products and heads as lite_mla_decode_team runs them. */
typedef struct {
    float *out;
    int64_t out_len;
    float *x;
    const float *delta, *norm;
    float norm_eps;
    int64_t n_tok, dim;
    const uint8_t **w;
    const int64_t *w_bytes;
    const int32_t *types;
    const float *q_a_norm, *kv_norm;
    int64_t n_head, n_nope, r_dim, c_dim, v_dim, q_rank;
    float *ckv, *kpe;
    int64_t cache_rows;
    const float *cos_t, *sin_t;
    int64_t start;
    float scale, eps;
    uint8_t *scratch;
    int64_t scratch_bytes;
    /* set by lite_mla_plan */
    float *h, *q_a, *q_an, *q, *kv, *q_nope, *q_pe, *q_lat, *o_lat, *o;
    uint8_t *act;
    int64_t act_bytes;
    int n_first, kk, kvk;                 /* product sets of q/kv_a (two where activations differ) */
    lite_products first[2], qb, out_p;
    int64_t rbk, rbv, sk, sv, hg;         /* k_b / v_b row and activation bytes, heads per item */
} lite_mla_call;
int lite_mla_plan(lite_mla_call *M);
/* Inside a region: one token's attention sublayer (n_tok = 1), every thread calling it. */
void lite_mla_decode_team(const lite_mla_call *M, lite_team *t);

/* lite_norm_route's checks for one token, and its router product planned (out: probs). */
int lite_route_plan(lite_products *P, float *probs, const float *h, int64_t dim, const uint8_t *router,
                    int64_t router_bytes, int type, int64_t n_exp, int64_t k, int64_t n_group, int64_t topk_group,
                    float scale, uint8_t *scratch, int64_t scratch_bytes);

/* lite_moe's call checked and its assignments sorted (lite_moe_plan, codes as lite_moe), for
 * lite_moe_team to run inside a region, every thread calling it. */
typedef struct {
    float *out;
    const float *x;
    int64_t n_tok, dim, n_exp, max_ffn, n_assign, arow;
    const uint8_t **gate, **up, **down;
    const int32_t *types;
    const int64_t *ffn;
    float *xg, *g, *u, *y, *wt;
    uint8_t *act, *act2, *tq;
    int classes;          /* bit c: some gate or up reads activation class c (0: A8, 1: A8K) */
    int32_t *idx, *ord;   /* token of each assignment; token t's n_per assignments in term order */
    int64_t n_per;
    /* off[e]: entry e's first assignment; iu[e] / idn[e]: its first gate-up / down work item;
     * ng[e]: how many of its gate-up items are gate's; kg/ku/kd: its kinds */
    int64_t off[MOE_MAX_ENTRIES + 1], iu[MOE_MAX_ENTRIES + 1], idn[MOE_MAX_ENTRIES + 1], ng[MOE_MAX_ENTRIES];
    int kg[MOE_MAX_ENTRIES], ku[MOE_MAX_ENTRIES], kd[MOE_MAX_ENTRIES];
    _Atomic int64_t taken[2];   /* a prefill's gate-up and down items handed out so far */
} lite_moe_run;
int lite_moe_plan(lite_moe_run *M, float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t dim,
                  const int32_t *slot, const float *weight, int64_t k, int64_t n_exp, const uint8_t **gate,
                  const uint8_t **up, const uint8_t **down, const int32_t *types, const int64_t *nbytes,
                  const int64_t *ffn, int64_t shared, uint8_t *scratch, int64_t scratch_bytes);
void lite_moe_team(lite_moe_run *M, lite_team *t);

/* Heads per work item of MLA attention for n_tok queries on nth threads: as many as possible
 * (up to MLA_HEAD_GROUP) while still giving every thread work. */
static inline int64_t lite_mla_head_group(int64_t n_head, int64_t n_tok, int nth) {
    int64_t per_tok = (nth + n_tok - 1) / n_tok;   /* groups wanted per token */
    int64_t hg = (n_head + per_tok - 1) / per_tok;
    return hg > MLA_HEAD_GROUP ? MLA_HEAD_GROUP : hg < 1 ? 1 : hg;
}

#endif
