/* Portable scalar kernels: the baseline every SIMD path is compared against. */
#include "internal.h"

static float dot_q4_0(const uint8_t *w, const uint8_t *a, int64_t cols) {
    int64_t nb = cols / QK;
    const int8_t *qa = (const int8_t *)a;
    const float *da = (const float *)(a + nb * QK);
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * Q4_0_BYTES;
        const int8_t *y = qa + b * QK;
        int s = 0;
        for (int j = 0; j < 16; j++) {
            s += ((blk[2 + j] & 15) - 8) * y[j];
            s += ((blk[2 + j] >> 4) - 8) * y[j + 16];
        }
        sum += f16_to_f32(rd16(blk)) * da[b] * (float)s;
    }
    return sum;
}

static float dot_q8_0(const uint8_t *w, const uint8_t *a, int64_t cols) {
    int64_t nb = cols / QK;
    const int8_t *qa = (const int8_t *)a;
    const float *da = (const float *)(a + nb * QK);
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * Q8_0_BYTES;
        const int8_t *q = (const int8_t *)(blk + 2), *y = qa + b * QK;
        int s = 0;
        for (int j = 0; j < QK; j++) s += q[j] * y[j];
        sum += f16_to_f32(rd16(blk)) * da[b] * (float)s;
    }
    return sum;
}

static float dot_q4_k(const uint8_t *w, const uint8_t *a, int64_t cols) {
    int64_t nb = cols / QKK;
    const int8_t *qa = (const int8_t *)a;
    const int16_t *bs = (const int16_t *)(a + nb * QKK);
    const float *da = (const float *)(a + nb * (QKK + 32));
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * Q4_K_BYTES;
        const uint8_t *qs = blk + 16;
        const int8_t *y = qa + b * QKK;
        int isum = 0, msum = 0;
        for (int j = 0; j < 8; j++) {
            int sc, mn;
            q4k_scale_min(blk + 4, j, &sc, &mn);
            int shift = 4 * (j & 1), s = 0;
            const uint8_t *q = qs + (j / 2) * 32;
            for (int l = 0; l < 32; l++) s += ((q[l] >> shift) & 15) * y[j * 32 + l];
            isum += sc * s;
            msum += mn * (bs[b * 16 + 2 * j] + bs[b * 16 + 2 * j + 1]);
        }
        sum += da[b] * (f16_to_f32(rd16(blk)) * (float)isum - f16_to_f32(rd16(blk + 2)) * (float)msum);
    }
    return sum;
}

static float dot_q6_k(const uint8_t *w, const uint8_t *a, int64_t cols) {
    int64_t nb = cols / QKK;
    const int8_t *qa = (const int8_t *)a;
    const float *da = (const float *)(a + nb * (QKK + 32));
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * Q6_K_BYTES;
        const uint8_t *ql = blk, *qh = blk + 128;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const int8_t *y = qa + b * QKK;
        int isum = 0;
        for (int h = 0; h < 2; h++)
            for (int g = 0; g < 4; g++) {
                int s0 = 0, s1 = 0;
                for (int l = 0; l < 32; l++) {
                    int lo = ql[h * 64 + (g & 1) * 32 + l];
                    lo = g >= 2 ? lo >> 4 : lo & 15;
                    int q = (lo | (((qh[h * 32 + l] >> (2 * g)) & 3) << 4)) - 32;
                    int p = q * y[h * 128 + g * 32 + l];
                    if (l < 16) s0 += p; else s1 += p;
                }
                int si = h * 8 + g * 2;
                isum += sc[si] * s0 + sc[si + 1] * s1;
            }
        sum += f16_to_f32(rd16(blk + 208)) * da[b] * (float)isum;
    }
    return sum;
}

static float dot_f32(const uint8_t *w, const uint8_t *a, int64_t cols) {
    const float *x = (const float *)a;
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8)
        for (int k = 0; k < 8; k++) {
            float wv;
            memcpy(&wv, w + 4 * (i + k), 4);
            s[k] += wv * x[i + k];
        }
    for (; i < cols; i++) {
        float wv;
        memcpy(&wv, w + 4 * i, 4);
        s[0] += wv * x[i];
    }
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

static float dot_f16(const uint8_t *w, const uint8_t *a, int64_t cols) {
    const float *x = (const float *)a;
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8)
        for (int k = 0; k < 8; k++) s[k] += f16_to_f32(rd16(w + 2 * (i + k))) * x[i + k];
    for (; i < cols; i++) s[0] += f16_to_f32(rd16(w + 2 * i)) * x[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

static float dot_bf16(const uint8_t *w, const uint8_t *a, int64_t cols) {
    const float *x = (const float *)a;
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8)
        for (int k = 0; k < 8; k++) s[k] += bf16_to_f32(rd16(w + 2 * (i + k))) * x[i + k];
    for (; i < cols; i++) s[0] += bf16_to_f32(rd16(w + 2 * i)) * x[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

#define TILE(name, dot)                                                                           \
    static void name(float *out, int64_t ldo, const uint8_t *w, int64_t wstride, int nr,          \
                     const uint8_t *a, int64_t astride, int nt, int64_t cols) {                   \
        for (int t = 0; t < nt; t++)                                                              \
            for (int r = 0; r < nr; r++)                                                          \
                out[t * ldo + r] = dot(w + r * wstride, a + t * astride, cols);                   \
    }

TILE(tile_q4_0, dot_q4_0)
TILE(tile_q8_0, dot_q8_0)
TILE(tile_q4_k, dot_q4_k)
TILE(tile_q6_k, dot_q6_k)
TILE(tile_f32, dot_f32)
TILE(tile_f16, dot_f16)
TILE(tile_bf16, dot_bf16)

/* ---- MLA attention ---------------------------------------------------------------------------- */

static inline float dotf(const float *a, const float *b, int64_t n) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

void lite_mla_heads_scalar(float *out, const float *ql, const float *qp, const float *ckv, const float *kpe,
                           int64_t n_vis, int nh, int64_t c_dim, int64_t r_dim, float scale) {
    float acc[MLA_HEAD_GROUP][MLA_MAX_C];
    float m[MLA_HEAD_GROUP], l[MLA_HEAD_GROUP], p[MLA_CHUNK];
    for (int g = 0; g < nh; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        memset(acc[g], 0, sizeof(float) * c_dim);
    }
    for (int64_t s0 = 0; s0 < n_vis; s0 += MLA_CHUNK) {
        int64_t ns = n_vis - s0 < MLA_CHUNK ? n_vis - s0 : MLA_CHUNK;
        for (int g = 0; g < nh; g++) {
            float mc = -INFINITY;
            for (int64_t s = 0; s < ns; s++) {
                float v = dotf(ql + g * c_dim, ckv + (s0 + s) * c_dim, c_dim);
                if (r_dim) v += dotf(qp + g * r_dim, kpe + (s0 + s) * r_dim, r_dim);
                v *= scale;
                p[s] = v;
                mc = v > mc ? v : mc;
            }
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
    for (int g = 0; g < nh; g++) {
        float inv = 1.0f / l[g];
        for (int64_t c = 0; c < c_dim; c++) out[g * c_dim + c] = acc[g][c] * inv;
    }
}

void lite_silu_mul_scalar(float *out, const float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static uint64_t read_xor(const uint8_t *p, int64_t n) {
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, w[4];
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        memcpy(w, p + i, 32);
        a0 ^= w[0];
        a1 ^= w[1];
        a2 ^= w[2];
        a3 ^= w[3];
    }
    for (; i < n; i += 8) {
        memcpy(w, p + i, 8);
        a0 ^= w[0];
    }
    return a0 ^ a1 ^ a2 ^ a3;
}

void lite_kernels_scalar(kernel_table *t) {
    t->tile[K_Q4_0] = tile_q4_0;
    t->tile[K_Q8_0] = tile_q8_0;
    t->tile[K_Q4_K] = tile_q4_k;
    t->tile[K_Q6_K] = tile_q6_k;
    t->tile[K_F32] = tile_f32;
    t->tile[K_F16] = tile_f16;
    t->tile[K_BF16] = tile_bf16;
    t->mla = lite_mla_heads_scalar;
    t->silu_mul = lite_silu_mul_scalar;
    t->quant_a8 = lite_quant_a8_scalar;
    t->quant_a8k = lite_quant_a8k_scalar;
    t->read_xor = read_xor;
}
