/* Pieces shared by the x86 SIMD kernel files (AVX2, AVX-512): inlined into each, so each is
 * compiled with its own file's target flags. */
#ifndef LITE_KERN_X86_H
#define LITE_KERN_X86_H

#include <immintrin.h>
#include "internal.h"

#define INLINE static inline __attribute__((always_inline))

/* How far ahead (bytes) the one-token kernels prefetch the row they stream. 1 KiB was best on a
 * Zen 3; on a 2-core Xeon (AVX-512) 4 KiB streamed Q4_0 at 12-14.8 GB/s against 9.4-11.7 (2
 * threads from DRAM) and decoded the recipe file in 95-104 against 127-135 ms a token. Once the
 * kernels read four streams in fewer micro-ops, 1.5-3 KiB decoded 1.02-1.04x faster than 4 KiB
 * there (alternating in one process; 6 and 8 KiB 0.99x and 0.94x), the AVX2 kernels alike. On a
 * Zen 4, Q8_0 and Q6_K rows streamed 1.02-1.17x as fast with 1 KiB (2 threads from DRAM, 100-170 MB
 * matrices, alternating in one process: the 172 MB Q6_K output matrix 49.7 against 42.6 GB/s,
 * 34.3 against 33.2), where Q4_0 kept 3 KiB (39.0 against 36.7 with 1 KiB) and Q4_K moved either
 * way with the sitting. */
#define MV_PREFETCH 3072
#define MV_PREFETCH_DENSE 1024   /* Q8_0 and Q6_K */

INLINE float fp16(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }

/* One line ahead into L2 (L2 != 0) or L1. The hint is part of the instruction, so the one-token
 * kernels take L2 as a constant and are built once for each target (WITH_PREFETCH); MLA's
 * prefetch, a line per 16-32 positions, tests it as it goes. */
INLINE void prefetch_line(const int L2, const char *p) {
    if (L2) _mm_prefetch(p, _MM_HINT_T2);
    else _mm_prefetch(p, _MM_HINT_T0);
}

/* The one-token kernels' prefetch: every line of the `bytes` at blk, `ahead` bytes ahead. */
INLINE void prefetch_block(const int L2, const uint8_t *blk, int64_t bytes, int64_t ahead) {
    for (int64_t o = 0; o < bytes; o += 64) prefetch_line(L2, (const char *)blk + ahead + o);
}

/* F(L2, ...) for the prefetch target in use (lite_set_prefetch). */
#define WITH_PREFETCH(F, ...) (lite_prefetch_l2 ? F(1, __VA_ARGS__) : F(0, __VA_ARGS__))

/* A kind's one- and four-stream one-token kernels (mv_fn, mv4_fn) from its body over S streams,
 * each with the body built for both prefetch targets. */
#define DEF_MV_STREAMS(MV, MV4, BODY)                                                              \
    static void MV(float *out, const uint8_t *w, int64_t ws, int64_t nr, const uint8_t *a, int64_t cols) { \
        WITH_PREFETCH(BODY, 1, out, w, ws, nr, a, cols, 0);                                        \
    }                                                                                              \
    static void MV4(float *out, const uint8_t *w, int64_t ws, int64_t nr, const uint8_t *a, int64_t cols, \
                    int64_t gap) {                                                                 \
        WITH_PREFETCH(BODY, 4, out, w, ws, nr, a, cols, gap);                                      \
    }

/* The next chunk's weights (`len` bytes from byte `off` of `rows` rows `ws` apart), prefetched a few
 * lines at each block of the token passes over the current chunk, so that its repack finds them
 * in cache instead of waiting on memory. Spread out, the reads hide behind the arithmetic; a
 * burst would fill the core's miss buffers and stall it (as in the MLA kernel). Into L2, not L1:
 * a chunk of 32 rows (18 KB of Q4_0) landing in a 32 KB L1 evicted the 16-row kernels' repacked
 * chunk (32 KB) while the token passes read it; a 256-token prefill ran 1.02-1.065x as fast
 * (AVX2's 8-row kernels: the same). */
typedef struct { const char *line, *end; const uint8_t *w; int64_t ws, off, len, per; int i, rows; } r8_prefetch;

/* The chunk after blocks [b0, b0 + chunk) of rows [r, r + rows): the same rows' next blocks, else
 * the next row group's first, else the first blocks of the rows ahead of this call (a new panel's
 * first repack waited on memory: prefetching it from the panel before made a 256-token prefill
 * 1.03-1.08x as fast). Spread over the passes of nt tokens and their n blocks each: issued a pass
 * at a time, 16 rows of Q6_K took ~40 lines at once, past the core's ~24 outstanding misses
 * (2 threads from DRAM: 0.9x the 8-row kernel; 1.0-1.04x spread, Q4_K 1.09-1.26x, Q4_0
 * 1.05-1.1x). */
INLINE r8_prefetch r8_next_chunk(const uint8_t *w, int64_t ws, int64_t r, int64_t nr, int rows, int64_t b0,
                                 int64_t chunk, int64_t nb, int64_t bs, int64_t n_tok, int nt, int n,
                                 const lite_rows_ahead *ahead) {
    r8_prefetch p = {NULL, NULL, NULL, ws, 0, 0, 0, rows, rows};
    const int64_t first = (nb < chunk ? nb : chunk) * bs;   /* a row's first chunk, in bytes */
    if (b0 + chunk < nb) {
        p.w = w + r * ws;
        p.off = (b0 + chunk) * bs;
        p.len = (nb - b0 - chunk < chunk ? nb - b0 - chunk : chunk) * bs;
    } else if (r + rows < nr) {
        p.w = w + (r + rows) * ws;
        p.rows = nr - r - rows < rows ? (int)(nr - r - rows) : rows;
        p.len = first;
    } else if (ahead && ahead->w && ahead->n_rows > 0) {
        /* its kind may differ from this call's: a chunk of ours, within its first row */
        p.w = ahead->w;
        p.ws = ahead->row_bytes;
        p.rows = ahead->n_rows < rows ? (int)ahead->n_rows : rows;
        p.len = first < ahead->row_bytes ? first : ahead->row_bytes;
    } else {
        return p;
    }
    int64_t lines = p.rows * (p.len / 64 + 2), steps = (n_tok + nt - 1) / nt * n;
    p.per = (lines + steps - 1) / steps;
    p.i = -1;
    return p;
}

INLINE void r8_prefetch_step(r8_prefetch *p) {
    for (int64_t n = p->per; n > 0; n--) {
        if (p->line >= p->end) {
            if (++p->i >= p->rows) return;
            const char *a = (const char *)p->w + p->i * p->ws + p->off;
            p->line = (const char *)((uintptr_t)a & ~(uintptr_t)63);
            p->end = a + p->len;
        }
        _mm_prefetch(p->line, _MM_HINT_T1);
        p->line += 64;
    }
}

/* A Q4_K block's 6-bit sub-block scales and mins as 8 16-bit lanes each. The 12 bytes at blk + 4
 * are three words: sub-blocks 0-3 in the low six bits of words 0 (scales) and 1 (mins); 4-7 in
 * word 2's nibbles plus the top two bits of words 0 and 1. */
INLINE void q4_k_scales_mins(const uint8_t *blk, __m128i *sc, __m128i *mn) {
    uint32_t w0, w1, w2;
    memcpy(&w0, blk + 4, 4);
    memcpy(&w1, blk + 8, 4);
    memcpy(&w2, blk + 12, 4);
    const uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | (((w0 >> 6) & 0x03030303u) << 4);
    const uint32_t mn_hi = ((w2 >> 4) & 0x0f0f0f0fu) | (((w1 >> 6) & 0x03030303u) << 4);
    *sc = _mm_cvtepu8_epi16(_mm_setr_epi32((int)(w0 & 0x3f3f3f3fu), (int)sc_hi, 0, 0));
    *mn = _mm_cvtepu8_epi16(_mm_setr_epi32((int)(w1 & 0x3f3f3f3fu), (int)mn_hi, 0, 0));
}

/* A Q4_K block's mins term (before dmin and the activations' scale): mins times the activation
 * sums over each sub-block (from the A8K sums of 16, bs16), in 4 lanes. */
INLINE __m128 q4_k_mins(__m128i mn, const int16_t *bs16) {
    const __m128i pairs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bs16), _mm_loadu_si128((const __m128i *)(bs16 + 8)));
    return _mm_cvtepi32_ps(_mm_madd_epi16(mn, pairs));
}

INLINE float hsum4(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float hsum8(__m256 v) { return hsum4(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))); }

/* e^x for x <= 0 (softmax after the max is subtracted): 2^n * p(r), r = x - n ln2 in
 * [-ln2/2, ln2/2], p a degree-6 Taylor polynomial (relative error ~2e-7); below -87 it is 0. */
INLINE __m256 exp_neg(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* The next chunk's cache lines (latent rows, then rope keys), one line per step of the passes
 * over the current chunk. Spread over all the passes, the reads overlap the arithmetic; issued
 * within one pass, they filled the core's miss buffers and stalled it until memory answered
 * (the kernel ran at half its in-cache speed with the cache in DRAM). */
typedef struct { const char *p, *end, *p2, *end2; int l2; } mla_prefetch;

INLINE void mla_prefetch_step(mla_prefetch *pf) {
    if (pf->p < pf->end) {
        prefetch_line(pf->l2, pf->p);
        pf->p += 64;
    } else if (pf->p2 < pf->end2) {
        prefetch_line(pf->l2, pf->p2);
        pf->p2 += 64;
    }
}

/* One chunk's step of the online softmax for nh heads: p[g * pld + s] (s < ns) holds head g's
 * scores and becomes exp(score - new max); m, l (running max and sum) are updated and alpha[g]
 * is the factor that rescales what was accumulated before the chunk. */
INLINE void mla_softmax_chunk(float *p, int64_t pld, int nh, int64_t ns, float *m, float *l, float *alpha) {
    for (int g = 0; g < nh; g++) {
        float *pg = p + g * pld, mc = -INFINITY;
        for (int64_t s = 0; s < ns; s++) mc = pg[s] > mc ? pg[s] : mc;
        float mn = mc > m[g] ? mc : m[g];
        alpha[g] = expf(m[g] - mn);
        __m256 vm = _mm256_set1_ps(mn), vs = _mm256_setzero_ps();
        int64_t s = 0;
        for (; s + 8 <= ns; s += 8) {
            __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(pg + s), vm));
            _mm256_storeu_ps(pg + s, e);
            vs = _mm256_add_ps(vs, e);
        }
        float sum = hsum8(vs);
        for (; s < ns; s++) {
            pg[s] = expf(pg[s] - mn);
            sum += pg[s];
        }
        l[g] = l[g] * alpha[g] + sum;
        m[g] = mn;
    }
}

/* ---- rows-in-lanes repacks (8 rows a 256-bit vector; AVX-512 joins two) ---- */

/* 8 x 8 transpose of 32-bit groups: d[v] = group v of every row r[0..7]. */
INLINE void r8_transpose(const __m256i *r, __m256i *d) {
    __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    d[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    d[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    d[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    d[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    d[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    d[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    d[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    d[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

/* 16 bytes at src of each of 8 rows ws apart, two rows to a register (rows i and i + 4), as 4-byte
 * groups transposed within 128-bit lanes: g[j] holds bytes 4j..4j+3 of row i in 32-bit element i
 * (8 shuffles, against 24 for the full 8 x 8 transpose). */
INLINE void r8_lane_transpose(__m256i *g, const uint8_t *src, int64_t ws) {
    __m256i r[4];
    for (int i = 0; i < 4; i++)
        r[i] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(src + i * ws))),
                                       _mm_loadu_si128((const __m128i *)(src + (i + 4) * ws)), 1);
    __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    g[0] = _mm256_unpacklo_epi64(t0, t2);
    g[1] = _mm256_unpackhi_epi64(t0, t2);
    g[2] = _mm256_unpacklo_epi64(t1, t3);
    g[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* Super-blocks [b0, b0 + n) of rows w[0..7]: dst (8 vectors per sub-block, vector v holding
 * weights 4v..4v+3 of each row), and per super-block k and sub-block j the 8 rows' scales
 * sc[(8k + j) * 8 + row] and mins mn[...], d dd[8k + row] and dmin dm[8k + row]. Sub-blocks 2i
 * and 2i+1 are the low and high nibbles of the same 32 bytes; two rows' 16-byte halves share a
 * register and transpose as Q4_0's do (`r8_lane_transpose`). */
INLINE void r8_repack_q4k(__m256i *dst, int32_t *sc, int32_t *mn, float *dd, float *dm, const uint8_t *w,
                          int64_t ws, int64_t b0, int n) {
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int k = 0; k < n; k++) {
        const uint8_t *blk = w + (b0 + k) * Q4_K_BYTES;
        for (int i = 0; i < 8; i++) {
            dd[8 * k + i] = fp16(blk + i * ws);
            dm[8 * k + i] = fp16(blk + i * ws + 2);
            for (int j = 0; j < 8; j++)
                q4k_scale_min(blk + i * ws + 4, j, &sc[(8 * k + j) * 8 + i], &mn[(8 * k + j) * 8 + i]);
        }
        for (int q = 0; q < 8; q++) {               /* 16-byte piece q: pair q/2, half q%2 */
            __m256i g[4];
            r8_lane_transpose(g, blk + 16 + 16 * q, ws);
            __m256i *lo = dst + 8 * (8 * k + 2 * (q >> 1)) + 4 * (q & 1), *hi = lo + 8;
            for (int j = 0; j < 4; j++) {
                lo[j] = _mm256_and_si256(g[j], m4);
                hi[j] = _mm256_and_si256(_mm256_srli_epi16(g[j], 4), m4);
            }
        }
    }
}

/* Q6_K the same way: sub-block j's 32 six-bit quants (low nibbles from ql, two high bits from qh)
 * repack as one block; its two halves have their own int8 scales, so the dot keeps them apart
 * and, the quants reaching 63, widens every two groups. The -32 offset comes off through the
 * activation's 16-weight sums, exact as in the tiles. */
INLINE void r8_repack_q6k(__m256i *dst, int32_t *sc, float *dd, const uint8_t *w, int64_t ws, int64_t b0, int n) {
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    for (int k = 0; k < n; k++) {
        const uint8_t *blk[8];
        for (int i = 0; i < 8; i++) {
            blk[i] = w + i * ws + (b0 + k) * Q6_K_BYTES;
            dd[8 * k + i] = fp16(blk[i] + 208);
            for (int h = 0; h < 16; h++) sc[(16 * k + h) * 8 + i] = (int8_t)blk[i][192 + h];
        }
        for (int j = 0; j < 8; j++) {
            const int h = j >> 2, cc = j & 3;
            __m256i r[8];
            for (int i = 0; i < 8; i++) {
                __m256i l = _mm256_loadu_si256((const __m256i *)(blk[i] + h * 64 + (cc & 1) * 32));
                __m256i hb = _mm256_loadu_si256((const __m256i *)(blk[i] + 128 + h * 32));
                __m256i lo = _mm256_and_si256(cc >> 1 ? _mm256_srli_epi16(l, 4) : l, m4);
                __m256i hi = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * cc)), m3);
                r[i] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
            }
            r8_transpose(r, dst + 8 * (8 * k + j));
        }
    }
}

/* An ISA's two MLA steps over one chunk: scores of nh <= GH heads (p[g * pld + s], already times
 * the softmax scale), and the weighted sums acc[g * MLA_MAX_C + c] = acc * alpha[g] + sum_s
 * p[g * pld + s] * kc[s * c_dim + c] of nh <= GH heads. */
typedef void (*mla_scores_fn)(int nh, float *p, int64_t pld, const float *ql, const float *qp, const float *kc,
                              const float *kp, int64_t ns, int64_t c_dim, int64_t r_dim, float scale, mla_prefetch *pf);
typedef void (*mla_accumulate_fn)(int nh, float *acc, const float *alpha, const float *p, int64_t pld,
                                  const float *kc, int64_t ns, int64_t c_dim, mla_prefetch *pf);

/* The chunk loop of an mla_fn around an ISA's two steps (inlined, so the steps are direct calls),
 * which take GH heads at a time: per chunk of MLA_CHUNK positions, the scores of all heads, the
 * online softmax, the weighted sums, with the next chunk prefetched a line per step of the passes
 * over this one. */
INLINE void mla_heads_by(const int GH, mla_scores_fn scores, mla_accumulate_fn accumulate, float *out, const float *ql,
                         const float *qp, const float *ckv, const float *kpe, int64_t n_vis, int nh, int64_t c_dim,
                         int64_t r_dim, float scale) {
    _Alignas(64) float acc[MLA_HEAD_GROUP * MLA_MAX_C];
    _Alignas(64) float p[MLA_HEAD_GROUP][MLA_CHUNK];
    float m[MLA_HEAD_GROUP], l[MLA_HEAD_GROUP], alpha[MLA_HEAD_GROUP];
    for (int g = 0; g < nh; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        memset(acc + g * MLA_MAX_C, 0, sizeof(float) * c_dim);
    }
    for (int64_t s0 = 0; s0 < n_vis; s0 += MLA_CHUNK) {
        int64_t ns = n_vis - s0 < MLA_CHUNK ? n_vis - s0 : MLA_CHUNK;
        const float *kc = ckv + s0 * c_dim, *kp = r_dim ? kpe + s0 * r_dim : NULL;
        int64_t nn = n_vis - s0 - ns < MLA_CHUNK ? n_vis - s0 - ns : MLA_CHUNK;   /* next chunk */
        mla_prefetch pf = {(const char *)(kc + ns * c_dim), (const char *)(kc + (ns + nn) * c_dim),
                           kp ? (const char *)(kp + ns * r_dim) : NULL, kp ? (const char *)(kp + (ns + nn) * r_dim) : NULL,
                           lite_prefetch_l2};
        for (int g = 0; g < nh; g += GH)
            scores(nh - g < GH ? nh - g : GH, &p[g][0], MLA_CHUNK, ql + g * c_dim, qp + g * r_dim, kc, kp, ns, c_dim,
                   r_dim, scale, &pf);
        mla_softmax_chunk(&p[0][0], MLA_CHUNK, nh, ns, m, l, alpha);
        for (int g = 0; g < nh; g += GH)
            accumulate(nh - g < GH ? nh - g : GH, acc + g * MLA_MAX_C, alpha + g, &p[g][0], MLA_CHUNK, kc, ns, c_dim, &pf);
    }
    for (int g = 0; g < nh; g++) {
        __m256 inv = _mm256_set1_ps(1.0f / l[g]);
        for (int64_t c = 0; c < c_dim; c += 8)
            _mm256_storeu_ps(out + g * c_dim + c, _mm256_mul_ps(_mm256_loadu_ps(acc + g * MLA_MAX_C + c), inv));
    }
}

#endif
