/* Float ops: rmsnorm, rope (interleaved pairs), softmax, silu*mul, and absorbed MLA attention in
 * latent space (online softmax over chunks of positions, heads grouped so that each chunk of the
 * latent cache is read once per group of heads). */
#include "internal.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MLA_MAX_C 1024     /* latent dims supported (DeepSeek-V2: 512) */
#define MLA_HEAD_GROUP 8   /* heads sharing one pass over the cache */
#define MLA_CHUNK 64       /* positions per online-softmax step */

int lite_rmsnorm_f32(float *out, const float *x, const float *w, int64_t n_rows, int64_t dim, float eps) {
    if (!out || !x || !w) return LITE_ERR_NULL;
    if (n_rows < 0 || dim <= 0 || !(eps >= 0.0f)) return LITE_ERR_ARG;
#pragma omp parallel for num_threads(lite_num_threads()) if (n_rows > 1)
    for (int64_t t = 0; t < n_rows; t++) {
        const float *xr = x + t * dim;
        float *yr = out + t * dim;
        double ss = 0.0;
        for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = 1.0f / sqrtf((float)(ss / (double)dim) + eps);
        for (int64_t i = 0; i < dim; i++) yr[i] = w[i] * (xr[i] * inv);
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
            const float *c = cos_t + t * half, *s = sin_t + t * half;
            for (int64_t i = 0; i < half; i++) {
                float e = xr[2 * i], o = xr[2 * i + 1];
                yr[2 * i] = e * c[i] - o * s[i];
                yr[2 * i + 1] = e * s[i] + o * c[i];
            }
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
    for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    return LITE_OK;
}

static inline float dotf(const float *a, const float *b, int64_t n) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
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
    /* Head groups: as large as possible while still giving every thread work. */
    int64_t per_tok = (nth + n_tok - 1) / n_tok;   /* groups wanted per token */
    int64_t hg = (n_head + per_tok - 1) / per_tok;
    if (hg > MLA_HEAD_GROUP) hg = MLA_HEAD_GROUP;
    if (hg < 1) hg = 1;
    int64_t n_grp = (n_head + hg - 1) / hg;
    int64_t n_items = n_tok * n_grp;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth) if (nth > 1 && n_items > 1)
    for (int64_t it = 0; it < n_items; it++) {
        int64_t t = it / n_grp, h0 = (it % n_grp) * hg;
        int64_t h1 = h0 + hg < n_head ? h0 + hg : n_head;
        int64_t n_vis = start + t + 1;
        float acc[MLA_HEAD_GROUP][MLA_MAX_C];
        float m[MLA_HEAD_GROUP], l[MLA_HEAD_GROUP], p[MLA_CHUNK];
        for (int64_t h = h0; h < h1; h++) {
            m[h - h0] = -INFINITY;
            l[h - h0] = 0.0f;
            memset(acc[h - h0], 0, sizeof(float) * c_dim);
        }
        for (int64_t s0 = 0; s0 < n_vis; s0 += MLA_CHUNK) {
            int64_t ns = n_vis - s0 < MLA_CHUNK ? n_vis - s0 : MLA_CHUNK;
            for (int64_t h = h0; h < h1; h++) {
                const float *ql = q_lat + (t * n_head + h) * c_dim;
                const float *qp = r_dim ? q_pe + (t * n_head + h) * r_dim : NULL;
                float mc = -INFINITY;
                for (int64_t s = 0; s < ns; s++) {
                    float v = dotf(ql, ckv + (s0 + s) * c_dim, c_dim);
                    if (r_dim) v += dotf(qp, kpe + (s0 + s) * r_dim, r_dim);
                    v *= scale;
                    p[s] = v;
                    mc = v > mc ? v : mc;
                }
                int g = (int)(h - h0);
                float mn = mc > m[g] ? mc : m[g];
                float alpha = expf(m[g] - mn);
                float sum = 0.0f;
                for (int64_t s = 0; s < ns; s++) {
                    p[s] = expf(p[s] - mn);
                    sum += p[s];
                }
                l[g] = l[g] * alpha + sum;
                m[g] = mn;
                float *a = acc[g];
                if (alpha != 1.0f)
                    for (int64_t c = 0; c < c_dim; c++) a[c] *= alpha;
                for (int64_t s = 0; s < ns; s++) {
                    const float *kv = ckv + (s0 + s) * c_dim;
                    float ps = p[s];
                    for (int64_t c = 0; c < c_dim; c++) a[c] += ps * kv[c];
                }
            }
        }
        for (int64_t h = h0; h < h1; h++) {
            float inv = 1.0f / l[h - h0];
            float *o = out + (t * n_head + h) * c_dim;
            for (int64_t c = 0; c < c_dim; c++) o[c] = acc[h - h0][c] * inv;
        }
    }
    return LITE_OK;
}
