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
typedef struct { int64_t arow, xg, act, act2, g, u, idx, wt, ord, tq, total; } moe_layout;

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
    L.ord = L.wt + align64(n_assign * 4);                 /* each token's assignments in term order */
    L.tq = L.ord + align64(n_assign * 4);                 /* each token quantized, per class: 2 x T rows */
    L.total = L.tq + align64(2 * n_tok * L.arow) + 64;    /* + 64: alignment slack */
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

/* The entry e whose range [first[e], first[e+1]) holds `it` (an assignment or a work item). */
static int64_t entry_of(const int64_t *first, int64_t n_exp, int64_t it) {
    int64_t lo = 0, hi = n_exp;
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (first[mid] <= it) lo = mid; else hi = mid;
    }
    return lo;
}

/* Phase 1a of lite_moe: zero the output, and quantize each token once for each activation class
 * a gate or up reads (a token has K + 1 assignments). Part `part` of `parts` equal shares, by
 * static division, one to each of the region's threads. */
static void quantize_tokens(const lite_moe_run *M, int part, int parts) {
    const int64_t dim = M->dim, n_out = M->n_tok * dim, arow = M->arow;
    const int64_t o0 = n_out * part / parts, o1 = n_out * (part + 1) / parts;
    memset(M->out + o0, 0, sizeof(float) * (o1 - o0));
    const int64_t t0 = M->n_tok * part / parts, t1 = M->n_tok * (part + 1) / parts;
    for (int c = 0; c < 2; c++)
        if (M->classes & (1 << c))
            lite_quant_of(c ? K_Q4_K : K_Q4_0)(M->tq + (c * M->n_tok + t0) * arow, arow, M->x + t0 * dim, t1 - t0,
                                               dim);
}

/* Phase 1b: each assignment's input row, quantized for gate (and for up when up needs another
 * activation class), or as floats where a gate or up takes floats. Shared as `quantize_tokens`. */
static void gather(const lite_moe_run *M, int part, int parts) {
    const int64_t dim = M->dim, arow = M->arow;
    const int64_t a0 = M->n_assign * part / parts, a1 = M->n_assign * (part + 1) / parts;
    for (int64_t a = a0; a < a1; a++) {
        const int64_t e = entry_of(M->off, M->n_exp, a), t = M->idx[a];
        const int cg = lite_act_class(M->kg[e]), cu = lite_act_class(M->ku[e]);
        if (cg == 2 || cu == 2) memcpy(M->xg + a * dim, M->x + t * dim, sizeof(float) * dim);
        if (cg < 2) memcpy(M->act + a * arow, M->tq + (cg * M->n_tok + t) * arow, arow);
        if (cu < 2 && cu != cg) memcpy(M->act2 + a * arow, M->tq + (cu * M->n_tok + t) * arow, arow);
    }
}

/* Phase 5: scale each assignment's output y and add it into out, each token's terms in its order:
 * shared first, then slot by slot. Part `part` of `parts`, split by tokens, so that each thread
 * reads whole rows of y in turn (by 64-column chunks over every token, the rows' scattered pieces
 * waited on memory), or a lone token's row by column ranges a cache line apart. */
static void scatter(const lite_moe_run *M, int part, int parts) {
    const int64_t dim = M->dim, n_per = M->n_per, by_tok = M->n_tok >= parts;
    const int64_t t0 = by_tok ? M->n_tok * part / parts : 0, t1 = by_tok ? M->n_tok * (part + 1) / parts : M->n_tok;
    const int64_t c0 = by_tok ? 0 : dim * part / parts & ~(int64_t)15;
    const int64_t c1 = by_tok || part + 1 == parts ? dim : dim * (part + 1) / parts & ~(int64_t)15;
    for (int64_t t = t0; t < t1; t++) {
        float *o = M->out + t * dim;
        for (int64_t i = 0; i < n_per; i++) {
            const int64_t a = M->ord[t * n_per + i];
            const float *ya = M->y + a * dim;
            const float wa = M->wt[a];
            for (int64_t c = c0; c < c1; c++) o[c] += wa * ya[c];
        }
    }
}

/* One entry's weights (types[3], nbytes[3] of gate, up, down; width f): known types, rows of
 * whole blocks, enough bytes. */
static int entry_ok(const int32_t *types, const int64_t *nbytes, int64_t f, int64_t dim) {
    if (f <= 0 || f > (1 << 22)) return LITE_ERR_ARG;
    for (int j = 0; j < 3; j++)
        if (lite_kind_of(types[j]) < 0) return LITE_ERR_TYPE;
    int64_t rg = lite_row_bytes_of(types[0], dim), ru = lite_row_bytes_of(types[1], dim);
    int64_t rd = lite_row_bytes_of(types[2], f);
    if (rg < 0 || ru < 0 || rd < 0) return LITE_ERR_BLOCK;
    if (nbytes[0] / rg < f || nbytes[1] / ru < f || nbytes[2] / rd < dim) return LITE_ERR_SIZE;
    return LITE_OK;
}

int lite_moe_plan(lite_moe_run *M, float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t dim,
                  const int32_t *slot, const float *weight, int64_t k, int64_t n_exp, const uint8_t **gate,
                  const uint8_t **up, const uint8_t **down, const int32_t *types, const int64_t *nbytes,
                  const int64_t *ffn, int64_t shared, uint8_t *scratch, int64_t scratch_bytes) {
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
        int rc = entry_ok(types + 3 * e, nbytes + 3 * e, ffn[e], dim);
        if (rc) return rc;
        if (ffn[e] > max_ffn) max_ffn = ffn[e];
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
    M->out = out, M->x = x, M->n_tok = n_tok, M->dim = dim, M->n_exp = n_exp, M->max_ffn = max_ffn;
    M->gate = gate, M->up = up, M->down = down, M->types = types, M->ffn = ffn;
    M->xg = (float *)(base + L.xg), M->g = (float *)(base + L.g), M->u = (float *)(base + L.u);
    M->y = M->xg;
    M->act = base + L.act, M->act2 = base + L.act2, M->arow = L.arow;
    M->idx = (int32_t *)(base + L.idx);
    M->wt = (float *)(base + L.wt);
    M->ord = (int32_t *)(base + L.ord);
    M->tq = base + L.tq;
    M->n_per = k + (shared >= 0);

    /* Counting sort of assignments by entry (the shared entry gets every token, weight 1). */
    int64_t *off = M->off;
    memset(off, 0, sizeof(int64_t) * (n_exp + 1));
    for (int64_t i = 0; i < n_tok * k; i++) off[slot[i] + 1]++;
    if (shared >= 0) off[shared + 1] += n_tok;
    for (int64_t e = 0; e < n_exp; e++) off[e + 1] += off[e];
    {
        int64_t fill[MOE_MAX_ENTRIES];
        memcpy(fill, off, sizeof(int64_t) * n_exp);
        int32_t *ord = M->ord;
        for (int64_t t = 0; t < n_tok; t++) {
            if (shared >= 0) {
                *ord++ = (int32_t)fill[shared];
                M->idx[fill[shared]] = (int32_t)t;
                M->wt[fill[shared]++] = 1.0f;
            }
            for (int64_t j = 0; j < k; j++) {
                int32_t e = slot[t * k + j];
                *ord++ = (int32_t)fill[e];
                M->idx[fill[e]] = (int32_t)t;
                M->wt[fill[e]++] = weight[t * k + j];
            }
        }
    }
    M->n_assign = off[n_exp];

    /* Work items of the two matmul phases: every entry's product items (gate and up together,
     * then down), numbered consecutively so one work-sharing loop covers all experts with a
     * single barrier. iu[e] / idn[e]: first item of entry e; ng[e]: how many of its gate/up
     * items are gate's. */
    M->iu[0] = M->idn[0] = 0;
    M->classes = 0;
    for (int64_t e = 0; e < n_exp; e++) {
        int64_t n = off[e + 1] - off[e];
        M->kg[e] = lite_kind_of(types[3 * e]);
        M->ku[e] = lite_kind_of(types[3 * e + 1]);
        M->kd[e] = lite_kind_of(types[3 * e + 2]);
        for (int j = 0; j < 2 && n; j++) {
            const int c = lite_act_class(j ? M->ku[e] : M->kg[e]);
            if (c < 2) M->classes |= 1 << c;
        }
        M->ng[e] = n ? lite_product_items(M->kg[e], ffn[e], n, dim) : 0;
        M->iu[e + 1] = M->iu[e] + (n ? M->ng[e] + lite_product_items(M->ku[e], ffn[e], n, dim) : 0);
        M->idn[e + 1] = M->idn[e] + (n ? lite_product_items(M->kd[e], dim, n, ffn[e]) : 0);
    }
    return LITE_OK;
}

/* One work item of a phase: lite_product_item's arguments. */
typedef struct {
    float *out;
    const uint8_t *w, *act;
    int64_t ldo, rb, n_rows, astride, n_tok, cols, item;
    int kind;
} moe_item;

/* Phase 2: one gate or up item of an entry, over all of the entry's tokens. */
static moe_item gate_up_item(const lite_moe_run *M, int64_t it) {
    const int64_t e = entry_of(M->iu, M->n_exp, it), j = it - M->iu[e], dim = M->dim;
    const int is_up = j >= M->ng[e];
    const int kind = is_up ? M->ku[e] : M->kg[e], cls = lite_act_class(kind);
    const int64_t rb = lite_row_bytes_of(M->types[3 * e + is_up], dim), at = M->off[e];
    const uint8_t *a0;
    int64_t as;
    if (cls == 2) { a0 = (const uint8_t *)(M->xg + at * dim); as = dim * 4; }
    else { a0 = (is_up && cls != lite_act_class(M->kg[e]) ? M->act2 : M->act) + at * M->arow; as = M->arow; }
    return (moe_item){(is_up ? M->u : M->g) + at * M->max_ffn, is_up ? M->up[e] : M->gate[e], a0, M->max_ffn, rb,
                      M->ffn[e], as, M->off[e + 1] - at, dim, is_up ? j - M->ng[e] : j, kind};
}

/* Phase 4: one down item of an entry -> y (the gathered inputs' space). */
static moe_item down_item(const lite_moe_run *M, int64_t it) {
    const int64_t e = entry_of(M->idn, M->n_exp, it), f = M->ffn[e], at = M->off[e];
    const int kind = M->kd[e];
    const int64_t rb = lite_row_bytes_of(M->types[3 * e + 2], f);
    const int flt = lite_act_class(kind) == 2;
    const uint8_t *a0 = flt ? (const uint8_t *)(M->g + at * M->max_ffn) : M->act + at * M->arow;
    return (moe_item){M->y + at * M->dim, M->down[e], a0, M->dim, rb, M->dim, flt ? M->max_ffn * 4 : M->arow,
                      M->off[e + 1] - at, f, it - M->idn[e], kind};
}

static void run_item(const moe_item *c, const lite_rows_ahead *ahead) {
    lite_product_item(c->out, c->ldo, c->w, c->rb, c->n_rows, c->kind, c->act, c->astride, c->n_tok, c->cols, c->item,
                      ahead);
}

/* Items [0, n) of phase 2 or 4, every thread calling. A decode's items cost alike and go out by
 * lite_share, which keeps long runs of rows per thread for the streams (dynamic runs of 2 or 4
 * items decoded 0.92-0.97x as fast) and balances the end: guided gave the first thread half the
 * items in one piece, that thread streamed ~20% slower here, and the other waited ~80 µs a layer
 * at the down phase's end (with the products' lite_share, decode 1.057x). A prefill's items cost
 * in proportion to their entry's tokens, which differ by 10x and more where routing is skewed:
 * guided left one thread alone with the costliest, and items taken one at a time made the
 * 27-layer prefill's MoE 1.4-1.5x faster. A thread takes its next item before it runs the
 * current one, whose last chunk then prefetches the next one's first weights (1.03-1.08x a
 * 256-token prefill; repacking 0.40 -> 0.23 s a thread). */
static void run_phase(const lite_moe_run *M, lite_team *t, _Atomic int64_t *taken, int64_t n,
                      moe_item (*item)(const lite_moe_run *, int64_t)) {
    if (M->n_tok == 1) {
        lite_share s;
        int64_t a, b;
        lite_share_begin(&s, t, n);
        while (lite_share_next(&s, &a, &b))
            for (int64_t it = a; it < b; it++) {
                const moe_item c = item(M, it);
                run_item(&c, NULL);
            }
        return;
    }
    int64_t it = atomic_fetch_add_explicit(taken, 1, memory_order_relaxed);
    while (it < n) {
        const int64_t next = atomic_fetch_add_explicit(taken, 1, memory_order_relaxed);
        const moe_item c = item(M, it);
        lite_rows_ahead ahead = {NULL, 0, 0};
        if (next < n) {
            const moe_item d = item(M, next);
            ahead = lite_product_item_rows(d.w, d.rb, d.n_rows, d.item);
        }
        run_item(&c, &ahead);
        it = next;
    }
}

void lite_moe_team(lite_moe_run *M, lite_team *t) {
#ifdef _OPENMP
    const int me = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int me = 0, nth = 1;
#endif
    if (me == 0) {   /* seen by all after the next sync, as the plan may run more than once */
        atomic_store_explicit(&M->taken[0], 0, memory_order_relaxed);
        atomic_store_explicit(&M->taken[1], 0, memory_order_relaxed);
    }
    quantize_tokens(M, me, nth);
    lite_team_sync(t);
    gather(M, me, nth);
    lite_team_sync(t);
    run_phase(M, t, &M->taken[0], M->iu[M->n_exp], gate_up_item);
    lite_team_sync(t);
    /* 3: hidden = silu(gate) * up, quantized for down. */
    const kernel_table *kt = lite_active_kernels();
#pragma omp for schedule(static) nowait
    for (int64_t a = 0; a < M->n_assign; a++) {
        const int64_t e = entry_of(M->off, M->n_exp, a);
        float *ga = M->g + a * M->max_ffn;
        kt->silu_mul(ga, ga, M->u + a * M->max_ffn, M->ffn[e]);
        if (lite_is_quant(M->kd[e])) lite_quant_of(M->kd[e])(M->act + a * M->arow, M->arow, ga, 1, M->ffn[e]);
    }
    lite_team_sync(t);
    run_phase(M, t, &M->taken[1], M->idn[M->n_exp], down_item);
    lite_team_sync(t);
    scatter(M, me, nth);
}

int lite_moe(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t dim,
             const int32_t *slot, const float *weight, int64_t k,
             int64_t n_exp, const uint8_t **gate, const uint8_t **up, const uint8_t **down,
             const int32_t *types, const int64_t *nbytes, const int64_t *ffn, int64_t shared,
             uint8_t *scratch, int64_t scratch_bytes) {
    lite_moe_run M;
    int rc = lite_moe_plan(&M, out, out_len, x, n_tok, dim, slot, weight, k, n_exp, gate, up, down, types, nbytes,
                           ffn, shared, scratch, scratch_bytes);
    if (rc || n_tok == 0) return rc;
    lite_team team;
    lite_team_init(&team, n_tok == 1);
    int nth = lite_num_threads();
#pragma omp parallel num_threads(nth) if (nth > 1)
    lite_moe_team(&M, &team);
    return LITE_OK;
}
