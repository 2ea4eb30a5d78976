/* Mixture of experts for T tokens in one call: tokens are grouped by expert-table entry (a
 * counting sort), then each entry runs gate/up -> silu*mul -> down on its gathered tokens, so its
 * weights stream from memory once per call; results are scaled and scattered back. One OpenMP
 * region covers the whole layer; the matmul helpers share work inside it. */
#include "internal.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MOE_MAX_ENTRIES 1024

static int64_t align64(int64_t n) { return (n + 63) & ~(int64_t)63; }

/* Per-row activation bytes enough for any type and a row of up to `cols` weights. */
static int64_t act_row_max(int64_t cols) {
    int64_t c = (cols + QKK - 1) / QKK * QKK;
    int64_t a = a8_stride(c), b = a8k_stride(c);
    return a > b ? a : b;
}

typedef struct { int64_t tok, act, g, u, y, idx, wt, total; } moe_layout;

static moe_layout layout(int64_t n_tok, int64_t dim, int64_t k, int64_t max_ffn) {
    moe_layout L;
    int64_t n_assign = n_tok * (k + 1);
    int64_t amax = act_row_max(dim > max_ffn ? dim : max_ffn);
    L.tok = 0;                                           /* gathered x: T x D floats */
    L.act = L.tok + align64(n_tok * dim * 4);            /* quantized activations */
    L.g = L.act + align64(n_tok * amax);                 /* gate / hidden: T x F */
    L.u = L.g + align64(n_tok * max_ffn * 4);            /* up: T x F */
    L.y = L.u + align64(n_tok * max_ffn * 4);            /* down output: T x D */
    L.idx = L.y + align64(n_tok * dim * 4);              /* token index per assignment */
    L.wt = L.idx + align64(n_assign * 4);                /* weight per assignment */
    L.total = L.wt + align64(n_assign * 4) + 64;         /* + 64: alignment slack */
    return L;
}

int lite_moe_scratch_bytes(int64_t *out, int64_t n_tok, int64_t dim, int64_t k, int64_t max_ffn) {
    if (!out) return LITE_ERR_NULL;
    if (n_tok < 0 || dim <= 0 || k < 0 || max_ffn <= 0 || n_tok > (1 << 24) || dim > (1 << 20) ||
        max_ffn > (1 << 22) || k > 1024)
        return LITE_ERR_ARG;
    *out = layout(n_tok, dim, k, max_ffn).total;
    return LITE_OK;
}

static int act_class(int kind) { return (kind == K_Q4_0 || kind == K_Q8_0) ? 0 : (kind <= K_Q6_K ? 1 : 2); }

int lite_moe(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t dim,
             const int32_t *slot, const float *weight, int64_t k,
             int64_t n_exp, const uint8_t **gate, const uint8_t **up, const uint8_t **down,
             const int32_t *types, const int64_t *nbytes, const int64_t *ffn, int64_t shared,
             uint8_t *scratch, int64_t scratch_bytes) {
    if (!out || !x || !scratch) return LITE_ERR_NULL;
    if (n_tok < 0 || dim <= 0 || k < 0 || n_exp < 0 || n_exp > MOE_MAX_ENTRIES || shared < -1 ||
        shared >= n_exp || out_len < 0 || scratch_bytes < 0)
        return LITE_ERR_ARG;
    if (k > 0 && n_tok > 0 && (!slot || !weight)) return LITE_ERR_NULL;
    if (n_exp > 0 && (!gate || !up || !down || !types || !nbytes || !ffn)) return LITE_ERR_NULL;
    if (n_tok && out_len / n_tok < dim) return LITE_ERR_SIZE;
    int64_t max_ffn = 1;
    for (int64_t e = 0; e < n_exp; e++) {
        if (!gate[e] || !up[e] || !down[e]) return LITE_ERR_NULL;
        int64_t f = ffn[e];
        if (f <= 0 || f > (1 << 22)) return LITE_ERR_ARG;
        for (int j = 0; j < 3; j++)
            if (lite_kind_of(types[3 * e + j]) < 0) return LITE_ERR_TYPE;
        int64_t rg = lite_row_bytes_of(types[3 * e], dim), ru = lite_row_bytes_of(types[3 * e + 1], dim);
        int64_t rd = lite_row_bytes_of(types[3 * e + 2], f);
        if (rg < 0 || ru < 0 || rd < 0) return LITE_ERR_BLOCK;
        if (nbytes[3 * e] / rg < f || nbytes[3 * e + 1] / ru < f || nbytes[3 * e + 2] / rd < dim)
            return LITE_ERR_SIZE;
        if (f > max_ffn) max_ffn = f;
    }
    for (int64_t i = 0; i < n_tok * k; i++)
        if (slot[i] < 0 || slot[i] >= n_exp) return LITE_ERR_ARG;
    int64_t need;
    int rc = lite_moe_scratch_bytes(&need, n_tok, dim, k, max_ffn);
    if (rc) return rc;
    if (scratch_bytes < need) return LITE_ERR_SIZE;
    if (n_tok == 0) return LITE_OK;

    uint8_t *base = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    moe_layout L = layout(n_tok, dim, k, max_ffn);
    float *xg = (float *)(base + L.tok), *g = (float *)(base + L.g), *u = (float *)(base + L.u);
    float *y = (float *)(base + L.y);
    uint8_t *act = base + L.act;
    int32_t *idx = (int32_t *)(base + L.idx);
    float *wt = (float *)(base + L.wt);

    /* Counting sort of assignments by entry (the shared entry gets every token, weight 1). */
    int64_t off[MOE_MAX_ENTRIES + 1];
    memset(off, 0, sizeof(int64_t) * (n_exp + 1));
    for (int64_t i = 0; i < n_tok * k; i++) off[slot[i] + 1]++;
    if (shared >= 0) off[shared + 1] += n_tok;
    for (int64_t e = 0; e < n_exp; e++) off[e + 1] += off[e];
    {
        int64_t fill[MOE_MAX_ENTRIES];
        memcpy(fill, off, sizeof(int64_t) * n_exp);
        for (int64_t t = 0; t < n_tok; t++) {
            if (shared >= 0) {
                idx[fill[shared]] = (int32_t)t;
                wt[fill[shared]++] = 1.0f;
            }
            for (int64_t j = 0; j < k; j++) {
                int32_t e = slot[t * k + j];
                idx[fill[e]] = (int32_t)t;
                wt[fill[e]++] = weight[t * k + j];
            }
        }
    }

    int nth = lite_num_threads();
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_tok * dim; i++) out[i] = 0.0f;
        for (int64_t e = 0; e < n_exp; e++) {
            int64_t n = off[e + 1] - off[e];
            if (n == 0) continue;
            const int32_t *ti = idx + off[e];
            const float *tw = wt + off[e];
            int64_t f = ffn[e];
            int kg = lite_kind_of(types[3 * e]), ku = lite_kind_of(types[3 * e + 1]);
            int kd = lite_kind_of(types[3 * e + 2]);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n; i++) memcpy(xg + i * dim, x + (int64_t)ti[i] * dim, sizeof(float) * dim);
            int64_t sg = lite_act_stride(kg, dim), su = lite_act_stride(ku, dim);
            lite_gemm_quantize(act, sg, kg, xg, n, dim);
            lite_gemm_compute(g, gate[e], lite_row_bytes_of(types[3 * e], dim), f, kg,
                              act_class(kg) == 2 ? (const uint8_t *)xg : act, sg, n, dim);
            if (act_class(ku) != act_class(kg)) {
#pragma omp barrier
                lite_gemm_quantize(act, su, ku, xg, n, dim);
            }
            lite_gemm_compute(u, up[e], lite_row_bytes_of(types[3 * e + 1], dim), f, ku,
                              act_class(ku) == 2 ? (const uint8_t *)xg : act, su, n, dim);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n * f; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
            int64_t sd = lite_act_stride(kd, f);
            lite_gemm_quantize(act, sd, kd, g, n, f);
            lite_gemm_compute(y, down[e], lite_row_bytes_of(types[3 * e + 2], f), dim, kd,
                              act_class(kd) == 2 ? (const uint8_t *)g : act, sd, n, f);
            /* Scatter by column ranges: no two threads touch the same output element. */
#pragma omp for schedule(static)
            for (int64_t c0 = 0; c0 < dim; c0 += 64) {
                int64_t c1 = c0 + 64 < dim ? c0 + 64 : dim;
                for (int64_t i = 0; i < n; i++) {
                    float *o = out + (int64_t)ti[i] * dim;
                    const float *yi = y + i * dim;
                    float wi = tw[i];
                    for (int64_t c = c0; c < c1; c++) o[c] += wi * yi[c];
                }
            }
        }
    }
    return LITE_OK;
}
