/* Matmul driver: quantize the activations once, then threads share panels of rows (for one
 * token, runs of 16 rows, four at a time from the matrix's quarters where a four-stream kernel
 * exists); within a panel each 4-token tile of activations passes over its rows. */
#include "internal.h"
#ifdef _OPENMP
#include <omp.h>
#endif

int64_t lite_act_stride(int kind, int64_t cols) {
    switch (kind) {
    case K_Q4_0: case K_Q8_0: return a8_stride(cols);
    case K_Q4_K: case K_Q6_K: return a8k_stride(cols);
    default: return cols * 4;
    }
}

/* Rows [0, nr) of w times one activation row: the ISA's streaming kernel when it has one for
 * this kind and size, else 4-row tiles. */
static void rows_one_token(float *out, const uint8_t *w, int64_t row_bytes, int64_t nr, int kind,
                           const uint8_t *act, int64_t cols) {
    const kernel_table *kt = lite_active_kernels();
    if (kt->mv[kind] && cols <= MV_MAX_COLS) {
        kt->mv[kind](out, w, row_bytes, nr, act, cols);
        return;
    }
    for (int64_t r = 0; r < nr; r += TILE_R)
        kt->tile[kind](out + r, 0, w + r * row_bytes, row_bytes, (int)(nr - r < TILE_R ? nr - r : TILE_R),
                       act, 0, 1, cols);
}

/* Rows [0, nr) of a weight panel (nr <= PANEL_R) times n_tok > 1 activation rows. Whole groups
 * of 8 rows go to the ISA's rows-in-lanes kernel where it has one for the kind; the rest in
 * tiles, token tiles outer and row tiles inner: one tile's activations stay in L1 while the
 * panel's rows come from L2, however many tokens there are (the 256- and 1024-token prefills
 * measured the same as the former row-tile-outer order in 64-token chunks). */
static void gemm_panel(float *out, int64_t ldo, const uint8_t *w, int64_t row_bytes, int64_t nr, int kind,
                       const uint8_t *act, int64_t astride, int64_t n_tok, int64_t cols, const lite_rows_ahead *ahead) {
    const kernel_table *kt = lite_active_kernels();
    int64_t r8 = kt->rows8[kind] ? nr & ~(int64_t)7 : 0;
    if (r8) {
        kt->rows8[kind](out, ldo, w, row_bytes, r8, act, astride, n_tok, cols, ahead);
        out += r8, w += r8 * row_bytes, nr -= r8;
    }
    tile_fn f = kt->tile[kind];
    for (int64_t t = 0; t < n_tok && nr > 0; t += TILE_T) {
        int nt = (int)(n_tok - t < TILE_T ? n_tok - t : TILE_T);
        for (int64_t r = 0; r < nr; r += TILE_R)
            f(out + t * ldo + r, ldo, w + r * row_bytes, row_bytes, (int)(nr - r < TILE_R ? nr - r : TILE_R),
              act + t * astride, astride, nt, cols);
    }
}

/* Rows per quarter of a one-token product taken four at a time (0: none); the rows past 4 such
 * quarters are left to single runs. */
static int64_t mv_quarter(int kind, int64_t n_rows, int64_t cols) {
    return lite_active_kernels()->mv4[kind] && cols <= MV_MAX_COLS ? n_rows / (4 * MV_ROWS) * MV_ROWS : 0;
}

/* Rows per multi-token item: PANEL_R, or a quarter of a product too small for four panels, in
 * whole groups of 8 (the rows-in-lanes kernels' unit): a 64-expert router's 64 F32 rows over 256
 * tokens were one item, one thread's work while the other waited (1.7 ms a layer). */
static int64_t panel_rows(int64_t n_rows) {
    if (n_rows >= 4 * PANEL_R) return PANEL_R;
    const int64_t p = (n_rows / 4 + 7) & ~(int64_t)7;
    return p > 8 ? p : 8;
}

int64_t lite_product_items(int kind, int64_t n_rows, int64_t n_tok, int64_t cols) {
    if (n_tok != 1) return (n_rows + panel_rows(n_rows) - 1) / panel_rows(n_rows);
    int64_t q = mv_quarter(kind, n_rows, cols);
    return q / MV_ROWS + (n_rows - 4 * q + MV_ROWS - 1) / MV_ROWS;
}

lite_rows_ahead lite_product_item_rows(const uint8_t *w, int64_t row_bytes, int64_t n_rows, int64_t item) {
    const int64_t p = panel_rows(n_rows), r0 = item * p;
    return (lite_rows_ahead){w + r0 * row_bytes, row_bytes, n_rows - r0 < p ? n_rows - r0 : p};
}

void lite_product_item(float *out, int64_t ldo, const uint8_t *w, int64_t row_bytes, int64_t n_rows, int kind,
                       const uint8_t *act, int64_t astride, int64_t n_tok, int64_t cols, int64_t item,
                       const lite_rows_ahead *ahead) {
    if (n_tok != 1) {
        const lite_rows_ahead p = lite_product_item_rows(w, row_bytes, n_rows, item);
        const int64_t r0 = item * panel_rows(n_rows);
        gemm_panel(out + r0, ldo, p.w, row_bytes, p.n_rows, kind, act, astride, n_tok, cols, ahead);
        return;
    }
    int64_t q = mv_quarter(kind, n_rows, cols), n4 = q / MV_ROWS;
    if (item < n4) {
        int64_t r0 = item * MV_ROWS;
        lite_active_kernels()->mv4[kind](out + r0, w + r0 * row_bytes, row_bytes, MV_ROWS, act, cols, q);
        return;
    }
    int64_t r0 = 4 * q + (item - n4) * MV_ROWS;
    rows_one_token(out + r0, w + r0 * row_bytes, row_bytes, n_rows - r0 < MV_ROWS ? n_rows - r0 : MV_ROWS, kind,
                   act, cols);
}

int lite_matmul_scratch_bytes(int64_t *out, int type, int64_t n_tok, int64_t cols) {
    if (!out) return LITE_ERR_NULL;
    int kind = lite_kind_of(type);
    if (kind < 0) return LITE_ERR_TYPE;
    if (n_tok < 0 || cols <= 0) return LITE_ERR_ARG;
    if (lite_row_bytes_of(type, cols) < 0) return LITE_ERR_BLOCK;
    *out = lite_is_quant(kind) ? n_tok * lite_act_stride(kind, cols) : 0;
    return LITE_OK;
}

/* Checks one product of lite_matmul_many and gives its kind and row bytes. */
static int product_args(float *out, int64_t out_len, const uint8_t *w, int64_t w_bytes, int type, int64_t n_rows,
                        int64_t n_tok, int64_t cols, int *kind, int64_t *rb) {
    if (!out || !w) return LITE_ERR_NULL;
    *kind = lite_kind_of(type);
    if (*kind < 0) return LITE_ERR_TYPE;
    if (n_rows <= 0 || out_len < 0 || w_bytes < 0) return LITE_ERR_ARG;
    *rb = lite_row_bytes_of(type, cols);
    if (*rb < 0) return LITE_ERR_BLOCK;
    if (w_bytes / *rb < n_rows) return LITE_ERR_SIZE;
    if (n_tok && out_len / n_tok < n_rows) return LITE_ERR_SIZE;
    return LITE_OK;
}

int lite_products_plan(lite_products *P, int n, float *const *out, const int64_t *out_len, const float *x,
                       int64_t n_tok, int64_t cols, const uint8_t *const *w, const int64_t *w_bytes,
                       const int32_t *type, const int64_t *n_rows, uint8_t *scratch, int64_t scratch_bytes) {
    if (!out || !out_len || !x || !w || !w_bytes || !type || !n_rows) return LITE_ERR_NULL;
    if (n < 1 || n > LITE_MATMUL_MANY_MAX || n_tok < 0 || cols <= 0 || scratch_bytes < 0) return LITE_ERR_ARG;
    for (int i = 0; i < n; i++) {
        int rc = product_args(out[i], out_len[i], w[i], w_bytes[i], type[i], n_rows[i], n_tok, cols, &P->kind[i],
                              &P->rb[i]);
        if (rc) return rc;
        P->out[i] = out[i], P->w[i] = w[i], P->n_rows[i] = n_rows[i];
    }
    for (int i = 1; i < n; i++)
        if (lite_act_class(P->kind[i]) != lite_act_class(P->kind[0])) return LITE_PRODUCTS_MIXED;
    P->n = n, P->n_tok = n_tok, P->cols = cols;
    P->astride = lite_act_stride(P->kind[0], cols);
    P->act = (const uint8_t *)x;
    if (lite_is_quant(P->kind[0]) && n_tok) {
        if (!scratch) return LITE_ERR_NULL;
        if (scratch_bytes / P->astride < n_tok || ((uintptr_t)scratch & 3)) return LITE_ERR_SIZE;
        P->act = scratch;
    }
    P->first[0] = 0;
    for (int i = 0; i < n; i++) P->first[i + 1] = P->first[i] + lite_product_items(P->kind[i], n_rows[i], n_tok, cols);
    return LITE_OK;
}

void lite_products_quantize(const lite_products *P, const float *x) {
    if (lite_is_quant(P->kind[0])) lite_quant_of(P->kind[0])((uint8_t *)P->act, P->astride, x, P->n_tok, P->cols);
}

/* The activations of P's tokens, shared between the region's threads a row at a time. */
static void quantize_shared(const lite_products *P, const float *x) {
    if (!lite_is_quant(P->kind[0])) return;
    quant_fn q = lite_quant_of(P->kind[0]);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < P->n_tok; t++)
        q((uint8_t *)P->act + t * P->astride, P->astride, x + t * P->cols, 1, P->cols);
}

static void products_item(const lite_products *P, int64_t it) {
    int i = 0;
    while (P->first[i + 1] <= it) i++;
    lite_product_item(P->out[i], P->n_rows[i], P->w[i], P->rb[i], P->n_rows[i], P->kind[i], P->act, P->astride,
                      P->n_tok, P->cols, it - P->first[i], NULL);
}

void lite_products_run(const lite_products *P, lite_team *t) {
    lite_share s;
    int64_t a, b;
    lite_share_begin(&s, t, P->first[P->n]);
    while (lite_share_next(&s, &a, &b))
        for (int64_t it = a; it < b; it++) products_item(P, it);
}

void lite_products_team(const lite_products *P, const float *x, lite_team *t) {
#pragma omp master
    lite_products_quantize(P, x);
    lite_team_sync(t);
    lite_products_run(P, t);
    lite_team_sync(t);
}

int lite_products_plan_split(lite_products *sets, int *n_sets, int n, float *const *out, const int64_t *out_len,
                             const float *x, int64_t n_tok, int64_t cols, const uint8_t *const *w,
                             const int64_t *w_bytes, const int32_t *type, const int64_t *n_rows, uint8_t *scratch,
                             int64_t scratch_bytes) {
    *n_sets = 1;
    int rc = lite_products_plan(sets, n, out, out_len, x, n_tok, cols, w, w_bytes, type, n_rows, scratch,
                                scratch_bytes);
    if (rc != LITE_PRODUCTS_MIXED) return rc;
    for (int j = 0; j < n; j++) {   /* activation layouts differ: one set each */
        rc = lite_products_plan(sets + j, 1, out + j, out_len + j, x, n_tok, cols, w + j, w_bytes + j, type + j,
                                n_rows + j, scratch, scratch_bytes);
        if (rc) return rc;
    }
    *n_sets = n;
    return LITE_OK;
}

void lite_products_region(const lite_products *P, const float *x) {
    if (P->n_tok == 0) return;
    int nth = lite_num_threads();
    if (nth > P->first[P->n]) nth = (int)P->first[P->n];
    /* A lone token's activations are quantized before the threads start: a work-sharing loop of
     * one item would cost a barrier (~8 µs with sleeping workers) for ~1 µs of work. */
    int serial_quant = P->n_tok == 1;
    if (serial_quant) lite_products_quantize(P, x);
    /* The items go out by lite_share, as in a decode step's team: with static portions the
     * 102400-row output matrix took 1.01-1.17x as long, and a 256-token prefill's projections
     * 1.026x (alternating in one process). */
    lite_team team;
    lite_team_init(&team, 0);
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        if (!serial_quant) quantize_shared(P, x);
        lite_products_run(P, &team);
    }
}

int lite_matmul_many(int n, float *const *out, const int64_t *out_len, const float *x, int64_t n_tok, int64_t cols,
                     const uint8_t *const *w, const int64_t *w_bytes, const int32_t *type, const int64_t *n_rows,
                     uint8_t *scratch, int64_t scratch_bytes) {
    lite_products sets[LITE_MATMUL_MANY_MAX];
    int n_sets;
    int rc = lite_products_plan_split(sets, &n_sets, n, out, out_len, x, n_tok, cols, w, w_bytes, type, n_rows,
                                      scratch, scratch_bytes);
    if (rc) return rc;
    for (int i = 0; i < n_sets; i++) lite_products_region(&sets[i], x);
    return LITE_OK;
}

int lite_matmul(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t cols,
                const uint8_t *w, int64_t w_bytes, int type, int64_t n_rows,
                uint8_t *scratch, int64_t scratch_bytes) {
    int32_t t = type;
    return lite_matmul_many(1, &out, &out_len, x, n_tok, cols, &w, &w_bytes, &t, &n_rows, scratch, scratch_bytes);
}

/* ---- all heads in one call ------------------------------------------------------------------- */

int lite_matmul_heads_scratch_bytes(int64_t *out, int type, int64_t n_tok, int64_t n_head, int64_t cols) {
    if (!out) return LITE_ERR_NULL;
    if (n_head <= 0 || n_tok < 0) return LITE_ERR_ARG;
    if (n_tok > INT64_MAX / n_head) return LITE_ERR_ARG;
    return lite_matmul_scratch_bytes(out, type, n_tok * n_head, cols);
}

int lite_matmul_heads(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t n_head,
                      int64_t cols, const uint8_t *w, int64_t w_bytes, int type, int64_t n_rows,
                      uint8_t *scratch, int64_t scratch_bytes) {
    if (!out || !x || !w) return LITE_ERR_NULL;
    int kind = lite_kind_of(type);
    if (kind < 0) return LITE_ERR_TYPE;
    if (n_tok < 0 || n_head <= 0 || cols <= 0 || n_rows <= 0 || out_len < 0 || w_bytes < 0 ||
        scratch_bytes < 0)
        return LITE_ERR_ARG;
    int64_t rb = lite_row_bytes_of(type, cols);
    if (rb < 0) return LITE_ERR_BLOCK;
    if (w_bytes / rb / n_head < n_rows) return LITE_ERR_SIZE;
    if (n_tok && out_len / n_tok / n_head < n_rows) return LITE_ERR_SIZE;
    if (n_tok == 0) return LITE_OK;
    int quant = lite_is_quant(kind);
    int64_t astride = lite_act_stride(kind, cols);
    if (quant) {
        if (!scratch) return LITE_ERR_NULL;
        if (scratch_bytes / astride / n_head < n_tok || ((uintptr_t)scratch & 3)) return LITE_ERR_SIZE;
    }
    quant_fn q = quant ? lite_quant_of(kind) : NULL;
    /* Activations of head h, token t: quantized rows at scratch + (h*T + t)*astride (each head's
     * tokens contiguous), or the float input itself, rows H*cols apart. */
    int64_t tstride = quant ? astride : n_head * cols * 4;
    /* Work items: (head, one of that head's product items). */
    int64_t ldo = n_head * n_rows, n_runs = lite_product_items(kind, n_rows, n_tok, cols);
    int nth = lite_num_threads();
    if (nth > n_head * n_runs) nth = (int)(n_head * n_runs);
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        if (quant) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n_tok * n_head; i++) {
                int64_t t = i / n_head, h = i % n_head;
                q(scratch + (h * n_tok + t) * astride, astride, x + i * cols, 1, cols);
            }
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < n_head * n_runs; it++) {
            int64_t h = it / n_runs;
            lite_product_item(out + h * n_rows, ldo, w + h * n_rows * rb, rb, n_rows, kind,
                              quant ? scratch + h * n_tok * astride : (const uint8_t *)(x + h * cols), tstride,
                              n_tok, cols, it % n_runs, NULL);
        }
    }
    return LITE_OK;
}

/* ---- bandwidth probe -------------------------------------------------------------------------- */

/* Each thread reads its share as PROBE_STREAMS runs taken PROBE_PIECE bytes at a time from each
 * in turn: with one run a thread, as the probe read before, two threads read 20-33 GB/s on an
 * AVX-512 Xeon where 8 runs a thread read 1.2-1.5x that in the same sitting, which is the rate the
 * four-stream decode kernels get within reach of. */
#define PROBE_STREAMS 8
#define PROBE_PIECE 512

int lite_read_bytes(uint64_t *out, const uint8_t *buf, int64_t n_bytes) {
    if (!out || !buf) return LITE_ERR_NULL;
    if (n_bytes < 0 || n_bytes % 8) return LITE_ERR_ARG;
    read_fn f = lite_active_kernels()->read_xor;
    int nth = lite_num_threads();
    const int64_t n_runs = (int64_t)nth * PROBE_STREAMS, run = n_bytes / PROBE_PIECE / n_runs;  /* pieces a run */
    uint64_t acc = 0;
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1) reduction(^ : acc)
    for (int t = 0; t < nth; t++) {
        const uint8_t *share = buf + (int64_t)t * PROBE_STREAMS * run * PROBE_PIECE;
        for (int64_t i = 0; i < run; i++)
            for (int s = 0; s < PROBE_STREAMS; s++) acc ^= f(share + (s * run + i) * PROBE_PIECE, PROBE_PIECE);
    }
    int64_t done = n_runs * run * PROBE_PIECE;   /* the rest, under a piece a run */
    if (done < n_bytes) acc ^= f(buf + done, n_bytes - done);
    *out = acc;
    return LITE_OK;
}
