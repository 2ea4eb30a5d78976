/* Matmul driver: quantize the activations once, then threads share panels of rows (runs of 16
 * rows for one token); within a panel each 4-token tile of activations passes over its rows. */
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

void lite_gemm_quantize(uint8_t *act, int64_t astride, int kind, const float *x, int64_t n_tok, int64_t cols) {
    if (!lite_is_quant(kind)) return;
    quant_fn q = lite_quant_of(kind);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tok; t++) q(act + t * astride, astride, x + t * cols, 1, cols);
}

void lite_rows_one_token(float *out, const uint8_t *w, int64_t row_bytes, int64_t nr, int kind,
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

/* Whole groups of 8 rows go to the ISA's rows-in-lanes kernel where it has one for the kind;
 * the rest in tiles, token tiles outer and row tiles inner: one tile's activations stay in L1
 * while the panel's rows come from L2, however many tokens there are (the 256- and 1024-token
 * prefills measured the same as the former row-tile-outer order in 64-token chunks). */
void lite_gemm_panel(float *out, int64_t ldo, const uint8_t *w, int64_t row_bytes, int64_t nr, int kind,
                     const uint8_t *act, int64_t astride, int64_t n_tok, int64_t cols) {
    if (n_tok == 1) {
        lite_rows_one_token(out, w, row_bytes, nr, kind, act, cols);
        return;
    }
    const kernel_table *kt = lite_active_kernels();
    int64_t r8 = kt->rows8[kind] ? nr & ~(int64_t)7 : 0;
    if (r8) {
        kt->rows8[kind](out, ldo, w, row_bytes, r8, act, astride, n_tok, cols);
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

void lite_gemm_compute_ld(float *out, int64_t ldo, const uint8_t *w, int64_t row_bytes, int64_t n_rows,
                          int kind, const uint8_t *act, int64_t astride, int64_t n_tok, int64_t cols) {
    int64_t rows = n_tok == 1 ? MV_ROWS : PANEL_R;
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < n_rows; r0 += rows)
        lite_gemm_panel(out + r0, ldo, w + r0 * row_bytes, row_bytes, n_rows - r0 < rows ? n_rows - r0 : rows,
                        kind, act, astride, n_tok, cols);
}

void lite_gemm_compute(float *out, const uint8_t *w, int64_t row_bytes, int64_t n_rows, int kind,
                       const uint8_t *act, int64_t astride, int64_t n_tok, int64_t cols) {
    lite_gemm_compute_ld(out, n_rows, w, row_bytes, n_rows, kind, act, astride, n_tok, cols);
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

int lite_matmul(float *out, int64_t out_len, const float *x, int64_t n_tok, int64_t cols,
                const uint8_t *w, int64_t w_bytes, int type, int64_t n_rows,
                uint8_t *scratch, int64_t scratch_bytes) {
    if (!out || !x || !w) return LITE_ERR_NULL;
    int kind = lite_kind_of(type);
    if (kind < 0) return LITE_ERR_TYPE;
    if (n_tok < 0 || cols <= 0 || n_rows <= 0 || out_len < 0 || w_bytes < 0 || scratch_bytes < 0)
        return LITE_ERR_ARG;
    int64_t rb = lite_row_bytes_of(type, cols);
    if (rb < 0) return LITE_ERR_BLOCK;
    if (w_bytes / rb < n_rows) return LITE_ERR_SIZE;
    if (n_tok && out_len / n_tok < n_rows) return LITE_ERR_SIZE;
    if (n_tok == 0) return LITE_OK;
    int64_t astride = lite_act_stride(kind, cols);
    if (lite_is_quant(kind)) {
        if (!scratch) return LITE_ERR_NULL;
        if (scratch_bytes / astride < n_tok || ((uintptr_t)scratch & 3)) return LITE_ERR_SIZE;
    }
    const uint8_t *act = lite_is_quant(kind) ? scratch : (const uint8_t *)x;
    int64_t n_rt = (n_rows + TILE_R - 1) / TILE_R;
    int nth = lite_num_threads();
    if (nth > n_rt) nth = (int)n_rt;
    /* A lone token's activations are quantized before the threads start: a work-sharing loop of
     * one item would cost a barrier (~8 µs with sleeping workers) for ~1 µs of work. */
    int serial_quant = n_tok == 1;
    if (serial_quant) lite_gemm_quantize(scratch, astride, kind, x, n_tok, cols);
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        if (!serial_quant) lite_gemm_quantize(scratch, astride, kind, x, n_tok, cols);
        lite_gemm_compute(out, w, rb, n_rows, kind, act, astride, n_tok, cols);
    }
    return LITE_OK;
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
    /* Work items: (head, run of rows): streaming runs for a lone token, else panels. */
    int64_t ldo = n_head * n_rows, rows = n_tok == 1 ? MV_ROWS : PANEL_R, n_runs = (n_rows + rows - 1) / rows;
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
            int64_t h = it / n_runs, r0 = (it % n_runs) * rows;
            lite_gemm_panel(out + h * n_rows + r0, ldo, w + (h * n_rows + r0) * rb, rb,
                            n_rows - r0 < rows ? n_rows - r0 : rows, kind,
                            quant ? scratch + h * n_tok * astride : (const uint8_t *)(x + h * cols), tstride,
                            n_tok, cols);
        }
    }
    return LITE_OK;
}

/* ---- bandwidth probe -------------------------------------------------------------------------- */

int lite_read_bytes(uint64_t *out, const uint8_t *buf, int64_t n_bytes) {
    if (!out || !buf) return LITE_ERR_NULL;
    if (n_bytes < 0 || n_bytes % 8) return LITE_ERR_ARG;
    const int64_t chunk = 32768;
    read_fn f = lite_active_kernels()->read_xor;
    uint64_t acc = 0;
    int nth = lite_num_threads();
#pragma omp parallel for schedule(static) reduction(^ : acc) num_threads(nth) if (nth > 1)
    for (int64_t c = 0; c < (n_bytes + chunk - 1) / chunk; c++)
        acc ^= f(buf + c * chunk, n_bytes - c * chunk < chunk ? n_bytes - c * chunk : chunk);
    *out = acc;
    return LITE_OK;
}
