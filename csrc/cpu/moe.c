/* Mixture of experts for T tokens in one call: tokens are grouped by expert-table entry (a
 * counting sort), then each entry runs gate/up -> silu*mul -> down on its gathered tokens, so its
 * weights stream from memory once per call; results are scaled and scattered back. One OpenMP
 * region covers the whole layer; the matmul helpers share work inside it. */
#include "internal.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Per-row activation bytes enough for any type and a row of up to `cols` weights. */
static int64_t act_row_max(int64_t cols) {
    int64_t c = (cols + QKK - 1) / QKK * QKK;
    int64_t a = a8_stride(c), b = a8k_stride(c);
    return a > b ? a : b;
}

/* Scratch regions, one row per assignment (a (token, entry) pair; at most T*(K+1) with a shared
 * entry). `y` reuses `xg`: the gathered inputs are dead once gate/up are done. */
typedef struct { int64_t arow, xg, act, act2, g, u, idx, wt, total; } moe_layout;

static moe_layout layout(int64_t n_tok, int64_t dim, int64_t k, int64_t max_ffn) {
    moe_layout L;
    int64_t n_assign = n_tok * (k + 1);
    L.arow = act_row_max(dim > max_ffn ? dim : max_ffn);  /* quantized row stride, any type */
    L.xg = 0;                                             /* gathered x (later y): A x D floats */
    L.act = L.xg + align64(n_assign * dim * 4);           /* gate activations, later down's */
    L.act2 = L.act + align64(n_assign * L.arow);          /* up activations when their class differs */
    L.g = L.act2 + align64(n_assign * L.arow);            /* gate -> hidden: A x F_max */
    L.u = L.g + align64(n_assign * max_ffn * 4);          /* up: A x F_max */
    L.idx = L.u + align64(n_assign * max_ffn * 4);        /* token of each assignment */
    L.wt = L.idx + align64(n_assign * 4);                 /* weight of each assignment */
    L.total = L.wt + align64(n_assign * 4) + 64;          /* + 64: alignment slack */
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

/* Phase 1 of lite_moe: zero the output; gather each assignment's input row and quantize it for
 * gate (and for up when up needs another activation class). Work-shared inside a parallel
 * region, whole on the calling thread outside one. */
static void gather(float *out, const float *x, int64_t n_tok, int64_t dim, int64_t n_assign, const int64_t *off,
                   const int32_t *idx, const int *kg, const int *ku, float *xg, uint8_t *act, uint8_t *act2,
                   int64_t arow) {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n_tok * dim; i++) out[i] = 0.0f;
#pragma omp for schedule(static)
    for (int64_t a = 0; a < n_assign; a++) {
        int64_t e = 0;
        while (off[e + 1] <= a) e++;
        float *xa = xg + a * dim;
        memcpy(xa, x + (int64_t)idx[a] * dim, sizeof(float) * dim);
        int cg = lite_act_class(kg[e]), cu = lite_act_class(ku[e]);
        if (cg < 2) lite_quant_of(kg[e])(act + a * arow, arow, xa, 1, dim);
        if (cu < 2 && cu != cg) lite_quant_of(ku[e])(act2 + a * arow, arow, xa, 1, dim);
    }
}

/* Phase 5: scale each assignment's output y and add it into out, by column ranges (no two threads
 * share an element), assignments in entry order. Shared or not, as `gather`. */
static void scatter(float *out, int64_t dim, int64_t n_assign, const int32_t *idx, const float *wt, const float *y) {
#pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < dim; c0 += 64) {
        int64_t c1 = c0 + 64 < dim ? c0 + 64 : dim;
        for (int64_t a = 0; a < n_assign; a++) {
            float *o = out + (int64_t)idx[a] * dim;
            const float *ya = y + a * dim;
            float wa = wt[a];
            for (int64_t c = c0; c < c1; c++) o[c] += wa * ya[c];
        }
    }
}

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
    float *xg = (float *)(base + L.xg), *g = (float *)(base + L.g), *u = (float *)(base + L.u);
    float *y = xg;
    uint8_t *act = base + L.act, *act2 = base + L.act2;
    const int64_t arow = L.arow;
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
    const int64_t n_assign = off[n_exp];

    /* Work items of the two matmul phases: every entry's product items (gate and up together,
     * then down), numbered consecutively so one work-sharing loop covers all experts with a
     * single barrier. iu[e] / idn[e]: first item of entry e; ng[e]: how many of its gate/up
     * items are gate's. */
    int64_t iu[MOE_MAX_ENTRIES + 1], idn[MOE_MAX_ENTRIES + 1], ng[MOE_MAX_ENTRIES];
    int kg[MOE_MAX_ENTRIES], ku[MOE_MAX_ENTRIES], kd[MOE_MAX_ENTRIES];
    iu[0] = idn[0] = 0;
    for (int64_t e = 0; e < n_exp; e++) {
        int64_t n = off[e + 1] - off[e];
        kg[e] = lite_kind_of(types[3 * e]);
        ku[e] = lite_kind_of(types[3 * e + 1]);
        kd[e] = lite_kind_of(types[3 * e + 2]);
        ng[e] = n ? lite_product_items(kg[e], ffn[e], n, dim) : 0;
        iu[e + 1] = iu[e] + (n ? ng[e] + lite_product_items(ku[e], ffn[e], n, dim) : 0);
        idn[e + 1] = idn[e] + (n ? lite_product_items(kd[e], dim, n, ffn[e]) : 0);
    }
    const kernel_table *kt = lite_active_kernels();

    int nth = lite_num_threads();
#ifdef _OPENMP
    /* An entry's work items cost in proportion to its tokens, and a prefill's entries differ by
     * 10x and more where routing is skewed: guided scheduling (half of the items to the first
     * thread, then halving) left one thread alone with the costliest, and items taken one at a
     * time made the 27-layer prefill's MoE 1.4-1.5x faster. A decode's items cost alike, and
     * guided keeps long runs of rows per thread for the streams. */
    omp_set_schedule(n_tok > 1 ? omp_sched_dynamic : omp_sched_guided, n_tok > 1 ? 1 : 0);
#endif
    /* A lone token's gather and weighted sum run on this thread before and after the parallel
     * region: a few µs of work each, where sharing them cost a barrier each (~8 µs with sleeping
     * workers). The same operations in the same order either way. */
    const int serial_ends = n_tok == 1;
    if (serial_ends) gather(out, x, n_tok, dim, n_assign, off, idx, kg, ku, xg, act, act2, arow);
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        if (!serial_ends) gather(out, x, n_tok, dim, n_assign, off, idx, kg, ku, xg, act, act2, arow);
        /* 2: gate and up panels of every entry, each over all of the entry's tokens. */
#pragma omp for schedule(runtime)
        for (int64_t it = 0; it < iu[n_exp]; it++) {
            int64_t lo = 0, hi = n_exp;                       /* entry e with iu[e] <= it < iu[e+1] */
            while (hi - lo > 1) {
                int64_t mid = (lo + hi) / 2;
                if (iu[mid] <= it) lo = mid; else hi = mid;
            }
            int64_t e = lo, j = it - iu[e];
            int is_up = j >= ng[e];
            int kind = is_up ? ku[e] : kg[e];
            int cls = lite_act_class(kind);
            int64_t rb = lite_row_bytes_of(types[3 * e + is_up], dim);
            const uint8_t *a0;
            int64_t as;
            if (cls == 2) { a0 = (const uint8_t *)(xg + off[e] * dim); as = dim * 4; }
            else { a0 = (is_up && cls != lite_act_class(kg[e]) ? act2 : act) + off[e] * arow; as = arow; }
            lite_product_item((is_up ? u : g) + off[e] * max_ffn, max_ffn, is_up ? up[e] : gate[e], rb, ffn[e], kind,
                              a0, as, off[e + 1] - off[e], dim, is_up ? j - ng[e] : j);
        }
        /* 3: hidden = silu(gate) * up, quantized for down. */
#pragma omp for schedule(static)
        for (int64_t a = 0; a < n_assign; a++) {
            int64_t e = 0;
            while (off[e + 1] <= a) e++;
            int64_t f = ffn[e];
            float *ga = g + a * max_ffn;
            const float *ua = u + a * max_ffn;
            kt->silu_mul(ga, ga, ua, f);
            if (lite_is_quant(kd[e])) lite_quant_of(kd[e])(act + a * arow, arow, ga, 1, f);
        }
        /* 4: down panels of every entry -> y (the gathered inputs' space). */
#pragma omp for schedule(runtime)
        for (int64_t it = 0; it < idn[n_exp]; it++) {
            int64_t lo = 0, hi = n_exp;
            while (hi - lo > 1) {
                int64_t mid = (lo + hi) / 2;
                if (idn[mid] <= it) lo = mid; else hi = mid;
            }
            int64_t e = lo, f = ffn[e];
            int kind = kd[e];
            int64_t rb = lite_row_bytes_of(types[3 * e + 2], f);
            const uint8_t *a0 = lite_act_class(kind) == 2 ? (const uint8_t *)(g + off[e] * max_ffn) : act + off[e] * arow;
            int64_t as = lite_act_class(kind) == 2 ? max_ffn * 4 : arow;
            lite_product_item(y + off[e] * dim, dim, down[e], rb, dim, kind, a0, as, off[e + 1] - off[e], f,
                              it - idn[e]);
        }
        if (!serial_ends) scatter(out, dim, n_assign, idx, wt, y);
    }
    if (serial_ends) scatter(out, dim, n_assign, idx, wt, y);
    return LITE_OK;
}
