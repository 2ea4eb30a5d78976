/* Float ops: rmsnorm, rope (interleaved pairs), softmax, silu*mul, and absorbed MLA attention in
 * latent space (the driver: heads are grouped and the groups shared between threads; the ISA's
 * kernel runs one group). */
#include "internal.h"
#ifdef _OPENMP
#include <omp.h>
#endif


int lite_rmsnorm_f32(float *out, const float *x, const float *w, int64_t n_rows, int64_t dim, float eps) {
    if (!out || !x || !w) return LITE_ERR_NULL;
    if (n_rows < 0 || dim <= 0 || !(eps >= 0.0f)) return LITE_ERR_ARG;
#pragma omp parallel for num_threads(lite_num_threads()) if (n_rows > 1)
    for (int64_t t = 0; t < n_rows; t++) {
        const float *xr = x + t * dim;
        float *yr = out + t * dim;
        /* Eight partial sums: one chain of dependent double adds took ~4 µs a 2048-wide row,
         * three rows a decode layer. */
        double part[8] = {0.0};
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8)
            for (int j = 0; j < 8; j++) part[j] += (double)xr[i + j] * xr[i + j];
        double ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        for (; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = 1.0f / sqrtf((float)(ss / (double)dim) + eps);
        for (i = 0; i < dim; i++) yr[i] = w[i] * (xr[i] * inv);
    }
    return LITE_OK;
}

int lite_rope_f32(float *out, const float *x, const float *cos_t, const float *sin_t,
                  int64_t n_tok, int64_t n_head, int64_t dim) {
    if (!out || !x || !cos_t || !sin_t) return LITE_ERR_NULL;
    if (n_tok < 0 || n_head <= 0 || dim <= 0 || dim % 2) return LITE_ERR_ARG;
    int64_t half = dim / 2;
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t h = 0; h < n_head; h++) {
            const float *xr = x + (t * n_head + h) * dim;
            float *yr = out + (t * n_head + h) * dim;
            rope_pairs(yr, xr, cos_t + t * half, sin_t + t * half, half);
        }
    return LITE_OK;
}

int lite_softmax_f32(float *out, const float *x, int64_t n_rows, int64_t n) {
    if (!out || !x) return LITE_ERR_NULL;
    if (n_rows < 0 || n <= 0) return LITE_ERR_ARG;
    for (int64_t t = 0; t < n_rows; t++) {
        const float *xr = x + t * n;
        float *yr = out + t * n;
        float m = xr[0];
        for (int64_t i = 1; i < n; i++) m = xr[i] > m ? xr[i] : m;
        float s = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            yr[i] = expf(xr[i] - m);
            s += yr[i];
        }
        float inv = 1.0f / s;
        for (int64_t i = 0; i < n; i++) yr[i] *= inv;
    }
    return LITE_OK;
}

int lite_silu_mul_f32(float *out, const float *g, const float *u, int64_t n) {
    if (!out || !g || !u) return LITE_ERR_NULL;
    if (n < 0) return LITE_ERR_ARG;
    lite_active_kernels()->silu_mul(out, g, u, n);
    return LITE_OK;
}

int lite_mla_attention(float *out, const float *q_lat, const float *q_pe, const float *ckv,
                       const float *kpe, int64_t n_tok, int64_t n_head, int64_t c_dim, int64_t r_dim,
                       int64_t n_pos, int64_t start, float scale) {
    if (!out || !q_lat || !ckv || ((!q_pe || !kpe) && r_dim > 0)) return LITE_ERR_NULL;
    if (n_tok < 0 || n_head <= 0 || c_dim <= 0 || r_dim < 0 || start < 0 || n_pos < 0) return LITE_ERR_ARG;
    if (c_dim > MLA_MAX_C) return LITE_ERR_ARG;
    if (n_pos < start + n_tok) return LITE_ERR_SIZE;
    if (n_tok == 0) return LITE_OK;
    int nth = lite_num_threads();
    int64_t hg = lite_mla_head_group(n_head, n_tok, nth);
    int64_t n_grp = (n_head + hg - 1) / hg;
    int64_t n_items = n_tok * n_grp;
    mla_fn f = lite_active_kernels()->mla;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth) if (nth > 1 && n_items > 1)
    for (int64_t it = 0; it < n_items; it++) {
        int64_t t = it / n_grp, h0 = (it % n_grp) * hg;
        int nh = (int)(h0 + hg < n_head ? hg : n_head - h0);
        f(out + (t * n_head + h0) * c_dim, q_lat + (t * n_head + h0) * c_dim,
          r_dim ? q_pe + (t * n_head + h0) * r_dim : NULL, ckv, kpe, start + t + 1, nh, c_dim, r_dim, scale);
    }
    return LITE_OK;
}
