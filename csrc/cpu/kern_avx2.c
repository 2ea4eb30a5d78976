/* AVX2 + FMA + F16C kernels (this file alone is compiled with -mavx2 -mfma -mf16c and is only
 * called after a run-time CPU check).
 * Integer dot products follow the maddubs recipe: |w| (unsigned) x sign(y, w) (signed) ->
 * 16-bit pair sums -> madd with ones -> 32-bit lanes -> one FMA per block with d_w * d_x. */
#include <immintrin.h>
#include "internal.h"
#include "kern_x86.h"

/* ---- Q4_0 / Q8_0 ------------------------------------------------------------------------------- */
/* One kernel serves a lone token (decode: many rows streamed one after another) and tiles of up to
 * 4 tokens (prefill), row by row. Per block and token the work is maddubs, madd, convert and one
 * FMA; what used to dominate was the scale: a scalar fp16 conversion, multiply and broadcast per
 * block. Instead 8 blocks' weight scales are converted as one vector, multiplied by the token's 8
 * activation scales, and each block's product taken by an in-lane permute (one token, Q4_0, from
 * L3 on one core: 8.7 -> 12.2 GB/s). Q4_0 nibbles go into maddubs unsigned; their +8 offset is
 * taken off per 8 blocks in float from the activation sums s[b] = 8 * d * sum(q) of the A8 layout.
 * Rows are read start to end with a software prefetch MV_PREFETCH (MV_PREFETCH_DENSE for Q8_0 and
 * Q6_K) bytes ahead: a 4-row tile's short interleaved streams reached only 5.1 GB/s from RAM on
 * one core, against 9.4-10.5 streamed. */

/* Block weights as maddubs takes them. Q4_0: one broadcast load and a per-lane shift give the
 * low and high nibbles of the block. Q8_0: the raw signed bytes (see q8_dot). */
INLINE __m256i q8_unpack(const int KIND, const uint8_t *blk) {
    if (KIND == K_Q4_0) {
        __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 2)));
        return _mm256_and_si256(_mm256_srlv_epi32(q, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                _mm256_set1_epi8(15));
    }
    return _mm256_loadu_si256((const __m256i *)(blk + 2));
}

/* Integer dot of unpacked block weights with an activation block, as 8 int32 lanes. Q8_0 uses
 * the sign trick: |w| (unsigned) x sign(y, w) (signed). */
INLINE __m256i q8_dot(const int KIND, __m256i wv, const uint8_t *y) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i yv = _mm256_loadu_si256((const __m256i *)y);
    if (KIND == K_Q4_0) return _mm256_madd_epi16(_mm256_maddubs_epi16(wv, yv), ones);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(yv, wv)), ones);
}

/* Lane j (0..3) of each 128-bit half, broadcast across the half. */
INLINE __m256 lane(__m256 v, const int j) {
    switch (j) {
    case 0: return _mm256_permute_ps(v, 0x00);
    case 1: return _mm256_permute_ps(v, 0x55);
    case 2: return _mm256_permute_ps(v, 0xaa);
    default: return _mm256_permute_ps(v, 0xff);
    }
}

/* A lone token's Q4_0 activations for `pair_group`: in each whole group of 8 blocks, pair k
 * (0..3) is the first halves of blocks k and k + 4, then their second halves (64 bytes); the
 * blocks after the last whole group keep their order. Built once per call of the streaming
 * kernel, it serves its MV_ROWS rows. */
static void pair_activations(uint8_t *pq, const uint8_t *a, int64_t nb) {
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8)
        for (int k = 0; k < 4; k++) {
            __m256i ya = _mm256_loadu_si256((const __m256i *)(a + (b + k) * QK));
            __m256i yb = _mm256_loadu_si256((const __m256i *)(a + (b + k + 4) * QK));
            _mm256_store_si256((__m256i *)(pq + b * QK + 64 * k), _mm256_permute2x128_si256(ya, yb, 0x20));
            _mm256_store_si256((__m256i *)(pq + b * QK + 64 * k + 32), _mm256_permute2x128_si256(ya, yb, 0x31));
        }
    memcpy(pq + b * QK, a + b * QK, (size_t)((nb - b) * QK));
}

/* 8 Q4_0 blocks of one row and a lone token, two blocks per register: blocks k and k + 4 load
 * as the two halves, one AND gives both blocks' low nibbles and a shift and AND their high ones,
 * matching the paired activations, so the two maddubs sums add in 16 bits (|sum| <= 2 * 2 * 15
 * * 128) before one madd, convert and FMA, whose scale vector (d_k in the low half, d_k+4 in
 * the high) is a plain in-lane broadcast of the 8 blocks' scales. Against one block per
 * register, this drops the broadcast load, a third of the madd/convert/FMA/permute work and the
 * half-swaps of the scales: one core, 1408 x 2048 from L3, 13.8 -> 17.1-17.7 GB/s. */
INLINE void pair_group(const uint8_t *g, const uint8_t *pq, __m256 dw, __m256 *acc, __m256 *acc1) {
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int k = 0; k < 4; k++) {
        __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(g + k * Q4_0_BYTES + 2))),
                                            _mm_loadu_si128((const __m128i *)(g + (k + 4) * Q4_0_BYTES + 2)), 1);
        __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(pq + 64 * k))),
                                       _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(pq + 64 * k + 32))));
        __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
        if (k & 1) *acc1 = _mm256_fmadd_ps(p, lane(dw, k), *acc1);
        else *acc = _mm256_fmadd_ps(p, lane(dw, k), *acc);
    }
}

/* G (8 or 4) consecutive blocks of one row, starting at block b, into acc[t] for NT tokens (one
 * token alternates acc[0] / acc1 to hide the FMA latency). pq: a lone Q4_0 token's paired
 * activations (`pair_activations`), or NULL. */
INLINE void q8_group(const int KIND, const int NT, const int G, const int L2, const uint8_t *g, int64_t b,
                     const uint8_t *a, int64_t as, const uint8_t *pq, const float *const *dy, const float *const *sy,
                     __m256 *acc, __m256 *acc1) {
    const int64_t s = KIND == K_Q4_0 ? Q4_0_BYTES : Q8_0_BYTES;
    prefetch_block(L2, g, G * s, KIND == K_Q8_0 ? MV_PREFETCH_DENSE : MV_PREFETCH);
    __m128i h = G == 8 ? _mm_setr_epi16(rd16(g), rd16(g + s), rd16(g + 2 * s), rd16(g + 3 * s), rd16(g + 4 * s),
                                        rd16(g + 5 * s), rd16(g + 6 * s), rd16(g + 7 * s))
                       : _mm_setr_epi16(rd16(g), rd16(g + s), rd16(g + 2 * s), rd16(g + 3 * s), 0, 0, 0, 0);
    __m256 dw = _mm256_cvtph_ps(h);
#define LOAD_G(p) (G == 8 ? _mm256_loadu_ps(p) : _mm256_zextps128_ps256(_mm_loadu_ps(p)))
    if (KIND == K_Q4_0) {
        for (int t = 0; t < NT; t++) acc[t] = _mm256_fnmadd_ps(dw, LOAD_G(sy[t] + b), acc[t]);
        if (NT == 1 && G == 8 && pq) {
            pair_group(g, pq + b * QK, _mm256_mul_ps(dw, LOAD_G(dy[0] + b)), acc, acc1);
            return;
        }
    }
    for (int half = 0; half < G / 4; half++) {
        __m256 sc[4];
        for (int t = 0; t < NT; t++) {
            __m256 d = _mm256_mul_ps(dw, LOAD_G(dy[t] + b));
            sc[t] = half ? _mm256_permute2f128_ps(d, d, 0x11) : _mm256_permute2f128_ps(d, d, 0x00);
        }
        for (int j = 0; j < 4; j++) {
            int64_t k = 4 * half + j;
            __m256i wv = q8_unpack(KIND, g + k * s);
            for (int t = 0; t < NT; t++) {
                __m256 p = _mm256_cvtepi32_ps(q8_dot(KIND, wv, a + t * as + (b + k) * QK));
                if (NT == 1 && (j & 1)) *acc1 = _mm256_fmadd_ps(p, lane(sc[t], j), *acc1);
                else acc[t] = _mm256_fmadd_ps(p, lane(sc[t], j), acc[t]);
            }
        }
    }
#undef LOAD_G
}

/* out[t * ldo + r + k * gap] = dot(weight row r + k * gap, activation row t) for r < nr, t < NT,
 * k < S: S streams in lockstep group by group (see mv4_fn; S > 1 only for a lone token). A row's
 * steps are the same for any S. */
INLINE void q8_rows(const int KIND, const int NT, const int S, const int L2, float *out, int64_t ldo, const uint8_t *w,
                    int64_t ws, int64_t nr, const uint8_t *a, int64_t as, const uint8_t *pq, int64_t cols, int64_t gap) {
    const int64_t nb = cols / QK, s = KIND == K_Q4_0 ? Q4_0_BYTES : Q8_0_BYTES;
    const float *dy[4], *sy[4];
    for (int t = 0; t < NT; t++) {
        dy[t] = (const float *)(a + t * as + nb * QK);
        sy[t] = dy[t] + nb;
    }
    for (int64_t r = 0; r < nr; r++) {
        __m256 acc[4][4], acc1[4];
        for (int k = 0; k < S; k++) {
            acc1[k] = _mm256_setzero_ps();
            for (int t = 0; t < NT; t++) acc[k][t] = _mm256_setzero_ps();
        }
        int64_t b = 0;
        for (; b + 8 <= nb; b += 8)
            for (int k = 0; k < S; k++)
                q8_group(KIND, NT, 8, L2, w + (r + k * gap) * ws + b * s, b, a, as, pq, dy, sy, acc[k], &acc1[k]);
        if (b + 4 <= nb) {
            for (int k = 0; k < S; k++)
                q8_group(KIND, NT, 4, L2, w + (r + k * gap) * ws + b * s, b, a, as, pq, dy, sy, acc[k], &acc1[k]);
            b += 4;
        }
        for (int k = 0; k < S; k++) {
            const uint8_t *row = w + (r + k * gap) * ws;
            float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t bt = b; bt < nb; bt++) {
                const uint8_t *blk = row + bt * s;
                __m256i wv = q8_unpack(KIND, blk);
                float dw = fp16(blk);
                for (int t = 0; t < NT; t++) {
                    __m256 p = _mm256_cvtepi32_ps(q8_dot(KIND, wv, a + t * as + bt * QK));
                    acc[k][t] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * dy[t][bt]), acc[k][t]);
                    if (KIND == K_Q4_0) tail[t] += dw * sy[t][bt];
                }
            }
            acc[k][0] = _mm256_add_ps(acc[k][0], acc1[k]);
            for (int t = 0; t < NT; t++) out[t * ldo + r + k * gap] = hsum8(acc[k][t]) - tail[t];
        }
    }
}

/* The tile kernel (1-4 tokens) and the one- and four-stream one-token kernels of a kind. */
#define DEF_Q8_KERNELS(TILE, MV, MV4, KIND)                                                         \
    static void TILE(float *out, int64_t ldo, const uint8_t *w, int64_t ws, int nr, const uint8_t *a, \
                     int64_t as, int nt, int64_t cols) {                                            \
        switch (nt) {                                                                               \
        case 4: q8_rows(KIND, 4, 1, 0, out, ldo, w, ws, nr, a, as, NULL, cols, 0); break;           \
        case 3: q8_rows(KIND, 3, 1, 0, out, ldo, w, ws, nr, a, as, NULL, cols, 0); break;           \
        case 2: q8_rows(KIND, 2, 1, 0, out, ldo, w, ws, nr, a, as, NULL, cols, 0); break;           \
        default: q8_rows(KIND, 1, 1, 0, out, ldo, w, ws, nr, a, as, NULL, cols, 0); break;          \
        }                                                                                           \
    }                                                                                               \
    INLINE void MV##_streams(const int L2, const int S, float *out, const uint8_t *w, int64_t ws, int64_t nr, \
                             const uint8_t *a, int64_t cols, int64_t gap) {                         \
        if (KIND == K_Q4_0) {                                                                       \
            _Alignas(32) uint8_t pq[MV_MAX_COLS];                                                   \
            pair_activations(pq, a, cols / QK);                                                     \
            q8_rows(KIND, 1, S, L2, out, 0, w, ws, nr, a, 0, pq, cols, gap);                        \
        } else                                                                                      \
            q8_rows(KIND, 1, S, L2, out, 0, w, ws, nr, a, 0, NULL, cols, gap);                      \
    }                                                                                               \
    DEF_MV_STREAMS(MV, MV4, MV##_streams)

DEF_Q8_KERNELS(tile_q4_0, mv_q4_0, mv4_q4_0, K_Q4_0)
DEF_Q8_KERNELS(tile_q8_0, mv_q8_0, mv4_q8_0, K_Q8_0)

/* Q4_0 / Q8_0 for many tokens, rows in the lanes: 8 rows' blocks are repacked (a chunk of blocks
 * at a time, into L1) so that each vector of a block holds four weights of each row as bytes.
 * The four matching activation bytes broadcast to every lane then give, per maddubs, two products
 * per row, and one convert and FMA per block and token serve all 8 rows, with no permutes or
 * horizontal sums. Q4_0 nibbles go in unsigned; their +8 offset comes off in float through the
 * activation sums s[b]. One core, 1408 x 2048 Q4_0, 24-256 tokens: 1.41-1.47x the 4 x 4 tiles;
 * then two row groups and four tokens a pass (`r8_tokens`): 1.35-1.5x that, Q8_0 1.2-1.25x. */
#define R8_CHUNK 32

/* Blocks [b0, b0 + n) of rows w[0..7] → dst (8 vectors a block) and their scales → dws[8 n].
 * Q8_0: vector v holds weights 4v..4v+3 of each row (an 8 x 8 transpose of 4-byte groups).
 * Q4_0: vector 2j holds the low nibbles of quant bytes 4j..4j+3 (weights 4j..4j+3) of each row,
 * vector 2j+1 their high nibbles (weights 16+4j..16+4j+3); two rows' 16 quant bytes share a
 * register (`r8_lane_transpose`). */
INLINE void r8_repack(const int KIND, __m256i *dst, float *dws, const uint8_t *w, int64_t ws, int64_t b0, int n) {
    const int64_t bs = KIND == K_Q4_0 ? Q4_0_BYTES : Q8_0_BYTES;
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int k = 0; k < n; k++) {
        const uint8_t *blk = w + (b0 + k) * bs;
        for (int i = 0; i < 8; i++) dws[8 * k + i] = fp16(blk + i * ws);
        if (KIND == K_Q8_0) {
            __m256i r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(blk + i * ws + 2));
            r8_transpose(r, dst + 8 * k);
            continue;
        }
        __m256i g[4];
        r8_lane_transpose(g, blk + 2, ws);
        for (int j = 0; j < 4; j++) {
            dst[8 * k + 2 * j] = _mm256_and_si256(g[j], m4);
            dst[8 * k + 2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(g[j], 4), m4);
        }
    }
}

/* 8 rows of NT tokens' results: stored for a row group's first chunk of blocks, added after. */
INLINE void r8_store(const int NT, float *out, int64_t ldo, const __m256 *acc, int first) {
    for (int t = 0; t < NT; t++) {
        float *o = out + t * ldo;
        _mm256_storeu_ps(o, first ? acc[t] : _mm256_add_ps(_mm256_loadu_ps(o), acc[t]));
    }
}

/* NT tokens over the repacked blocks [b0, b0 + n) of G groups of 8 rows (group g's vectors at
 * rep + g * 8 * R8_CHUNK), out[t*ldo + r..r+8G], set for the first chunk of blocks and added to
 * after. Every activation broadcast serves G maddubs and every weight vector NT: with one group
 * and two tokens a maddubs cost 1.5 loads, and the two vector load ports were the limit. Q4_0:
 * a block's eight maddubs sums add in 16 bits (|sum| <= 8 * 2 * 15 * 127 < 2^15). Q8_0 uses the
 * sign trick (|w| times sign(y, w)), whose pair sums reach 2 * 127 * 127 and so widen at once. */
INLINE void r8_tokens(const int KIND, const int G, const int NT, float *out, int64_t ldo, const __m256i *rep,
                      const float *dws, const uint8_t *a, int64_t as, int64_t nb, int64_t b0, int n, r8_prefetch *pf) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][4];
    for (int g = 0; g < G; g++)
        for (int t = 0; t < NT; t++) acc[g][t] = _mm256_setzero_ps();
    for (int k = 0; k < n; k++) {
        __m256i s[2][4];
        r8_prefetch_step(pf);
#pragma GCC unroll 8
        for (int v = 0; v < 8; v++) {
            const int off = KIND == K_Q4_0 ? (v & 1) * 16 + 4 * (v >> 1) : 4 * v;
            __m256i wv[2], aw[2];
            for (int g = 0; g < G; g++) {
                wv[g] = _mm256_load_si256(rep + g * 8 * R8_CHUNK + 8 * k + v);
                aw[g] = KIND == K_Q8_0 ? _mm256_sign_epi8(wv[g], wv[g]) : wv[g];
            }
            for (int t = 0; t < NT; t++) {
                int32_t q;
                memcpy(&q, a + t * as + (b0 + k) * QK + off, 4);
                __m256i y = _mm256_set1_epi32(q);
                for (int g = 0; g < G; g++) {
                    if (KIND == K_Q4_0) {
                        __m256i p = _mm256_maddubs_epi16(wv[g], y);
                        s[g][t] = v ? _mm256_add_epi16(s[g][t], p) : p;
                    } else {
                        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[g], _mm256_sign_epi8(y, wv[g])), ones);
                        s[g][t] = v ? _mm256_add_epi32(s[g][t], p) : p;
                    }
                    /* keeps GCC from reassociating the sums into a tree of spilled products */
                    __asm__("" : "+x"(s[g][t]));
                }
            }
        }
        for (int t = 0; t < NT; t++) {
            const float *dy = (const float *)(a + t * as + nb * QK);
            __m256 d = _mm256_set1_ps(dy[b0 + k]), c = _mm256_set1_ps(dy[nb + b0 + k]);
            for (int g = 0; g < G; g++) {
                __m256 p = _mm256_cvtepi32_ps(KIND == K_Q4_0 ? _mm256_madd_epi16(s[g][t], ones) : s[g][t]);
                __m256 x = KIND == K_Q4_0 ? _mm256_fmsub_ps(p, d, c) : _mm256_mul_ps(p, d);
                acc[g][t] = _mm256_fmadd_ps(x, _mm256_load_ps(dws + g * 8 * R8_CHUNK + 8 * k), acc[g][t]);
            }
        }
    }
    for (int g = 0; g < G; g++) r8_store(NT, out + 8 * g, ldo, acc[g], b0 == 0);
}

/* Tokens a pass of the rows-in-lanes kernels: four keep 8 int16 sums (two groups) in registers. */
#define R8_NT 4

/* Rows [r, r + 8G) of the rows-in-lanes kernels, a chunk of blocks at a time. */
INLINE void r8_rows(const int KIND, const int G, float *out, int64_t ldo, const uint8_t *w, int64_t ws, int64_t r,
                    int64_t nr, const uint8_t *a, int64_t as, int64_t n_tok, int64_t nb, const lite_rows_ahead *ahead) {
    const int64_t bs = KIND == K_Q4_0 ? Q4_0_BYTES : Q8_0_BYTES;
    _Alignas(32) __m256i rep[2 * 8 * R8_CHUNK];
    _Alignas(32) float dws[2 * 8 * R8_CHUNK];
    for (int64_t b0 = 0; b0 < nb; b0 += R8_CHUNK) {
        int n = (int)(nb - b0 < R8_CHUNK ? nb - b0 : R8_CHUNK);
        for (int g = 0; g < G; g++)
            r8_repack(KIND, rep + g * 8 * R8_CHUNK, dws + g * 8 * R8_CHUNK, w + (r + 8 * g) * ws, ws, b0, n);
        r8_prefetch pf = r8_next_chunk(w, ws, r, nr, 8 * G, b0, R8_CHUNK, nb, bs, n_tok, R8_NT, n, ahead);
        int64_t t = 0;
        for (; t + R8_NT <= n_tok; t += R8_NT) {
            r8_tokens(KIND, G, R8_NT, out + t * ldo + r, ldo, rep, dws, a + t * as, as, nb, b0, n, &pf);
        }
        switch (n_tok - t) {
        case 3: r8_tokens(KIND, G, 3, out + t * ldo + r, ldo, rep, dws, a + t * as, as, nb, b0, n, &pf); break;
        case 2: r8_tokens(KIND, G, 2, out + t * ldo + r, ldo, rep, dws, a + t * as, as, nb, b0, n, &pf); break;
        case 1: r8_tokens(KIND, G, 1, out + t * ldo + r, ldo, rep, dws, a + t * as, as, nb, b0, n, &pf); break;
        }
    }
}

/* ---- Q4_K ------------------------------------------------------------------------------------ */

/* K-quants with the rows in the lanes. Q4_K: sub-block j of a super-block is 32 unsigned
 * nibbles (the low or high halves of 32 bytes), so it repacks and dots as a Q4_0 block does.
 * Each row's sub-block sum is scaled by its 6-bit scale in int32 and its mins come off through
 * the Q8_K activation's 16-weight sums, both exact as in the tiles; then one convert and FMA per
 * super-block and token. R8K_CHUNK super-blocks are repacked at a time (8 KB a group of 8 rows). */
#define R8K_CHUNK 4

/* NT tokens over the repacked super-blocks [b0, b0 + n) of G groups of 8 rows (group g's arrays
 * at g * the chunk's size: vectors rep + g * RK_REP, scales sc + g * RK_SC, mins mn + g * RK_MN,
 * d/dmin dd/dm + g * RK_D): out[t*ldo + r..r+8G], set for the first chunk and added to after.
 * As in `r8_tokens`, each activation broadcast serves G maddubs and each weight vector NT. A
 * sub-block's integer dot is scaled by its 6-bit (Q4_K) or two 8-bit (Q6_K, halves of 16)
 * scales in int32; corr gathers what comes off through the activation's 16-weight sums: Q4_K's
 * mins, Q6_K's 32 * scale offsets. Q4_K's eight maddubs sums add in 16 bits (as Q4_0's); Q6_K's
 * quants reach 63, so its sums widen every two. */
#define RK_REP (8 * 8 * R8K_CHUNK)
#define RK_SC (16 * 8 * R8K_CHUNK)
#define RK_MN (8 * 8 * R8K_CHUNK)
#define RK_D (8 * R8K_CHUNK)
INLINE void kq_tokens(const int KIND, const int G, const int NT, float *out, int64_t ldo, const __m256i *rep,
                      const int32_t *sc, const int32_t *mn, const float *dd, const float *dm, const uint8_t *a,
                      int64_t as, int64_t nb, int64_t b0, int n, r8_prefetch *pf) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][4];
    for (int g = 0; g < G; g++)
        for (int t = 0; t < NT; t++) acc[g][t] = _mm256_setzero_ps();
    for (int k = 0; k < n; k++) {
        const int64_t b = b0 + k;
        __m256i isum[2][4], corr[2][4];
        r8_prefetch_step(pf);
        for (int g = 0; g < G; g++)
            for (int t = 0; t < NT; t++) isum[g][t] = corr[g][t] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256i *wj = rep + 8 * (8 * k + j);
            const uint8_t *yj = a + b * QKK + 32 * j;
            const int16_t *bs = (const int16_t *)(a + nb * QKK) + b * 16 + 2 * j;
            /* Q4_K: one segment of 8 vectors; Q6_K: two of 4 (the halves), in pairs */
            const int NSEG = KIND == K_Q4_K ? 1 : 2, VS = 8 / NSEG;
            for (int h = 0; h < NSEG; h++) {
                __m256i s16[2][4], s32[2][4];
#pragma GCC unroll 8
                for (int u = 0; u < VS; u++) {
                    const int v = h * VS + u;
                    __m256i wv[2];
                    for (int g = 0; g < G; g++) wv[g] = _mm256_load_si256(wj + g * RK_REP + v);
                    for (int t = 0; t < NT; t++) {
                        int32_t q;
                        memcpy(&q, yj + t * as + 4 * v, 4);
                        __m256i y = _mm256_set1_epi32(q);
                        for (int g = 0; g < G; g++) {
                            __m256i p = _mm256_maddubs_epi16(wv[g], y);
                            if (KIND == K_Q4_K) {
                                s16[g][t] = u ? _mm256_add_epi16(s16[g][t], p) : p;
                                /* keeps GCC from reassociating the sums into a tree of spilled products */
                                __asm__("" : "+x"(s16[g][t]));
                            } else if (!(u & 1)) {
                                s16[g][t] = p;
                            } else {
                                p = _mm256_madd_epi16(_mm256_add_epi16(s16[g][t], p), ones);
                                s32[g][t] = u > 1 ? _mm256_add_epi32(s32[g][t], p) : p;
                                __asm__("" : "+x"(s32[g][t]));
                            }
                        }
                    }
                }
                for (int t = 0; t < NT; t++)
                    for (int g = 0; g < G; g++) {
                        const int32_t *sg = sc + g * RK_SC;
                        if (KIND == K_Q4_K) {
                            const __m256i dot = _mm256_madd_epi16(s16[g][t], ones);
                            const __m256i pair = _mm256_set1_epi32(bs[t * as / 2] + bs[t * as / 2 + 1]);
                            const __m256i s = _mm256_load_si256((const __m256i *)(sg + (8 * k + j) * 8));
                            const __m256i m = _mm256_load_si256((const __m256i *)(mn + g * RK_MN + (8 * k + j) * 8));
                            isum[g][t] = _mm256_add_epi32(isum[g][t], _mm256_mullo_epi32(dot, s));
                            corr[g][t] = _mm256_add_epi32(corr[g][t], _mm256_mullo_epi32(m, pair));
                        } else {
                            const __m256i sh = _mm256_load_si256((const __m256i *)(sg + (16 * k + 2 * j + h) * 8));
                            isum[g][t] = _mm256_add_epi32(isum[g][t], _mm256_mullo_epi32(s32[g][t], sh));
                            const __m256i bh = _mm256_set1_epi32(bs[t * as / 2 + h]);
                            corr[g][t] = _mm256_add_epi32(corr[g][t], _mm256_mullo_epi32(sh, bh));
                        }
                    }
            }
        }
        for (int t = 0; t < NT; t++) {
            const __m256 dx = _mm256_set1_ps(((const float *)(a + t * as + nb * (QKK + 32)))[b]);
            for (int g = 0; g < G; g++) {
                const __m256 d = _mm256_load_ps(dd + g * RK_D + 8 * k);
                if (KIND == K_Q4_K) {
                    acc[g][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[g][t]), _mm256_mul_ps(d, dx), acc[g][t]);
                    acc[g][t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(corr[g][t]),
                                                 _mm256_mul_ps(_mm256_load_ps(dm + g * RK_D + 8 * k), dx), acc[g][t]);
                } else {
                    __m256i q = _mm256_sub_epi32(isum[g][t], _mm256_slli_epi32(corr[g][t], 5));
                    acc[g][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_mul_ps(d, dx), acc[g][t]);
                }
            }
        }
    }
    for (int g = 0; g < G; g++) r8_store(NT, out + 8 * g, ldo, acc[g], b0 == 0);
}

/* Rows [r, r + 8G) of the K-quant rows-in-lanes kernels, R8K_CHUNK super-blocks repacked at a
 * time, R8_NT tokens a pass (for Q6_K too, whose half sums then spill: 1.1x two tokens). */
INLINE void kq_rows(const int KIND, const int G, float *out, int64_t ldo, const uint8_t *w, int64_t ws, int64_t r,
                    int64_t nr, const uint8_t *a, int64_t as, int64_t n_tok, int64_t nb, const lite_rows_ahead *ahead) {
    const int NT = R8_NT;
    const int64_t bs = KIND == K_Q4_K ? Q4_K_BYTES : Q6_K_BYTES;
    _Alignas(32) __m256i rep[2 * RK_REP];
    _Alignas(32) int32_t sc[2 * RK_SC], mn[2 * RK_MN];
    _Alignas(32) float dd[2 * RK_D], dm[2 * RK_D];
    for (int64_t b0 = 0; b0 < nb; b0 += R8K_CHUNK) {
        int n = (int)(nb - b0 < R8K_CHUNK ? nb - b0 : R8K_CHUNK);
        for (int g = 0; g < G; g++) {
            const uint8_t *wg = w + (r + 8 * g) * ws;
            if (KIND == K_Q4_K)
                r8_repack_q4k(rep + g * RK_REP, sc + g * RK_SC, mn + g * RK_MN, dd + g * RK_D, dm + g * RK_D, wg, ws, b0, n);
            else r8_repack_q6k(rep + g * RK_REP, sc + g * RK_SC, dd + g * RK_D, wg, ws, b0, n);
        }
        r8_prefetch pf = r8_next_chunk(w, ws, r, nr, 8 * G, b0, R8K_CHUNK, nb, bs, n_tok, NT, n, ahead);
        int64_t t = 0;
        for (; t + NT <= n_tok; t += NT) {
            kq_tokens(KIND, G, NT, out + t * ldo + r, ldo, rep, sc, mn, dd, dm, a + t * as, as, nb, b0, n, &pf);
        }
        switch (n_tok - t) {
        case 3: kq_tokens(KIND, G, 3, out + t * ldo + r, ldo, rep, sc, mn, dd, dm, a + t * as, as, nb, b0, n, &pf); break;
        case 2: kq_tokens(KIND, G, 2, out + t * ldo + r, ldo, rep, sc, mn, dd, dm, a + t * as, as, nb, b0, n, &pf); break;
        case 1: kq_tokens(KIND, G, 1, out + t * ldo + r, ldo, rep, sc, mn, dd, dm, a + t * as, as, nb, b0, n, &pf); break;
        }
    }
}

/* The rows-in-lanes kernels of every kind: 16 rows (two groups of 8) at a time, a last group of
 * 8 alone. */
INLINE void rows_in_lanes(const int KIND, float *out, int64_t ldo, const uint8_t *w, int64_t ws, int64_t nr,
                          const uint8_t *a, int64_t as, int64_t n_tok, int64_t cols, const lite_rows_ahead *ahead) {
    const int q8 = KIND == K_Q4_0 || KIND == K_Q8_0;
    const int64_t nb = cols / (q8 ? QK : QKK);
    int64_t r = 0;
    for (; r + 16 <= nr; r += 16) {
        if (q8) r8_rows(KIND, 2, out, ldo, w, ws, r, nr, a, as, n_tok, nb, ahead);
        else kq_rows(KIND, 2, out, ldo, w, ws, r, nr, a, as, n_tok, nb, ahead);
    }
    if (r < nr) {
        if (q8) r8_rows(KIND, 1, out, ldo, w, ws, r, nr, a, as, n_tok, nb, ahead);
        else kq_rows(KIND, 1, out, ldo, w, ws, r, nr, a, as, n_tok, nb, ahead);
    }
}

#define DEF_ROWS8(NAME, KIND)                                                                      \
    static void NAME(float *out, int64_t ldo, const uint8_t *w, int64_t ws, int64_t nr, const uint8_t *a, \
                     int64_t as, int64_t n_tok, int64_t cols, const lite_rows_ahead *ahead) {    \
        rows_in_lanes(KIND, out, ldo, w, ws, nr, a, as, n_tok, cols, ahead);                      \
    }
DEF_ROWS8(rows8_q4_0, K_Q4_0)
DEF_ROWS8(rows8_q8_0, K_Q8_0)
DEF_ROWS8(rows8_q4_k, K_Q4_K)
DEF_ROWS8(rows8_q6_k, K_Q6_K)

/* One token through K-quant rows, a super-block at a time, rows streamed start to end with the
 * Q4_0 kernels' prefetch. The tiles decode a super-block's scales one sub-block at a time in
 * scalar code and broadcast each; here they are taken apart as words (Q4_K) or widened at once
 * (Q6_K) and each sub-block's scale picked by an in-lane shuffle, and the mins (Q4_K) or the
 * -32 offset (Q6_K) come off with one madd against the activation's 16-weight sums. */

/* int16 element j of each 128-bit half of v (which holds 8 per half), in every lane of that half:
 * the shuffle control, constant where j is. */
INLINE __m256i pick16(const int lo, const int hi) {
    return _mm256_setr_epi8(2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo,
                            2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * hi,
                            2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi,
                            2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1);
}

INLINE void mv_q4_k_rows(const int L2, float *out, const uint8_t *w, int64_t ws, int64_t nr, const uint8_t *a,
                         int64_t cols) {
    const int64_t nb = cols / QKK;
    const int16_t *bs = (const int16_t *)(a + nb * QKK);
    const float *dx = (const float *)(a + nb * (QKK + 32));
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int64_t r = 0; r < nr; r++) {
        const uint8_t *row = w + r * ws;
        __m256 acc = _mm256_setzero_ps();
        __m128 macc = _mm_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * Q4_K_BYTES;
            const uint8_t *y = a + b * QKK;
            prefetch_block(L2, blk, Q4_K_BYTES, MV_PREFETCH);
            __m128i sc, mn;
            q4_k_scales_mins(blk, &sc, &mn);
            const __m256i scv = _mm256_broadcastsi128_si256(sc);
            __m256i isum = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * c));
                const __m256i plo = _mm256_maddubs_epi16(_mm256_and_si256(v, m4),
                                                         _mm256_loadu_si256((const __m256i *)(y + 64 * c)));
                const __m256i phi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                                                         _mm256_loadu_si256((const __m256i *)(y + 64 * c + 32)));
                const __m256i slo = _mm256_shuffle_epi8(scv, pick16(2 * c, 2 * c));
                const __m256i shi = _mm256_shuffle_epi8(scv, pick16(2 * c + 1, 2 * c + 1));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(plo, slo));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(phi, shi));
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(fp16(blk) * dx[b]), acc);
            macc = _mm_fmadd_ps(q4_k_mins(mn, bs + 16 * b), _mm_set1_ps(fp16(blk + 2) * dx[b]), macc);
        }
        out[r] = hsum8(acc) - hsum4(macc);
    }
}

static void mv_q4_k(float *out, const uint8_t *w, int64_t ws, int64_t nr, const uint8_t *a, int64_t cols) {
    WITH_PREFETCH(mv_q4_k_rows, out, w, ws, nr, a, cols);
}

/* One Q6_K block of a row times the A8K activations y (its bs16 sums, scale dxb) into acc. */
INLINE __m256 q6_k_block(const int L2, __m256 acc, const uint8_t *blk, const uint8_t *y, const int16_t *bs16,
                         float dxb) {
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    prefetch_block(L2, blk, Q6_K_BYTES, MV_PREFETCH_DENSE);
    /* the 16 int8 scales widened; halves [0..7] and [8..15] each in both 128-bit lanes */
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
    const __m256i sa = _mm256_permute2x128_si256(sc16, sc16, 0x00);
    const __m256i sb = _mm256_permute2x128_si256(sc16, sc16, 0x11);
    /* the -32 offset: 32 * sum_i sc_i * bsum_i */
    const __m256i bsv = _mm256_loadu_si256((const __m256i *)bs16);
    __m256i isum = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsv), 5));
    for (int h = 0; h < 2; h++) {
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + h * 64));
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + h * 64 + 32));
        const __m256i hb = _mm256_loadu_si256((const __m256i *)(blk + 128 + h * 32));
        const __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                               _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                               _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
        for (int g = 0; g < 4; g++) {
            const int j = 4 * h + g;   /* sub-block: scales 2j (weights 0-15) and 2j + 1 */
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * g), m3);
            const __m256i q = _mm256_or_si256(lo[g], _mm256_slli_epi16(hi, 4));
            const __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(y + 32 * j)));
            const __m256i sv = _mm256_shuffle_epi8(h ? sb : sa, pick16(2 * g, 2 * g + 1));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, sv));
        }
    }
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(fp16(blk + 208) * dxb), acc);
}

/* Rows r + s*gap (s < S) for r < nr, the S streams in lockstep block by block (see mv4_fn); each
 * row's steps are the same for any S. */
INLINE void mv_q6_k_streams(const int L2, const int S, float *out, const uint8_t *w, int64_t ws, int64_t nr,
                            const uint8_t *a, int64_t cols, int64_t gap) {
    const int64_t nb = cols / QKK;
    const int16_t *bs = (const int16_t *)(a + nb * QKK);
    const float *dx = (const float *)(a + nb * (QKK + 32));
    for (int64_t r = 0; r < nr; r++) {
        __m256 acc[4];
        for (int s = 0; s < S; s++) acc[s] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++)
            for (int s = 0; s < S; s++)
                acc[s] = q6_k_block(L2, acc[s], w + (r + s * gap) * ws + b * Q6_K_BYTES, a + b * QKK, bs + 16 * b,
                                    dx[b]);
        for (int s = 0; s < S; s++) out[r + s * gap] = hsum8(acc[s]);
    }
}

DEF_MV_STREAMS(mv_q6_k, mv4_q6_k, mv_q6_k_streams)

INLINE void q4k_fixed(const int NR, const int NT, float *out, int64_t ldo, const uint8_t *w,
                      int64_t wstride, const uint8_t *a, int64_t astride, int64_t nb) {
    __m256 acc[4][4];
    float mins[4][4];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) { acc[r][t] = _mm256_setzero_ps(); mins[r][t] = 0.0f; }
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int64_t b = 0; b < nb; b++) {
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = w + r * wstride + b * Q4_K_BYTES;
            int sc[8], mn[8];
            for (int j = 0; j < 8; j++) q4k_scale_min(blk + 4, j, &sc[j], &mn[j]);
            float d = fp16(blk), dmin = fp16(blk + 2);
            __m256i q[8];
            for (int c = 0; c < 4; c++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * c));
                q[2 * c] = _mm256_and_si256(v, m4);
                q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            for (int t = 0; t < NT; t++) {
                const uint8_t *ar = a + t * astride;
                const int8_t *y = (const int8_t *)ar + b * QKK;
                const int16_t *bs = (const int16_t *)(ar + nb * QKK) + b * 16;
                float dx = ((const float *)(ar + nb * (QKK + 32)))[b];
                __m256i isum = _mm256_setzero_si256();
                int msum = 0;
                for (int j = 0; j < 8; j++) {
                    __m256i p = _mm256_maddubs_epi16(q[j], _mm256_loadu_si256((const __m256i *)(y + 32 * j)));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, _mm256_set1_epi16((short)sc[j])));
                    msum += mn[j] * (bs[2 * j] + bs[2 * j + 1]);
                }
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * dx), acc[r][t]);
                mins[r][t] += dmin * dx * (float)msum;
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) out[t * ldo + r] = hsum8(acc[r][t]) - mins[r][t];
}

/* ---- Q6_K ------------------------------------------------------------------------------------ */

INLINE void q6k_fixed(const int NR, const int NT, float *out, int64_t ldo, const uint8_t *w,
                      int64_t wstride, const uint8_t *a, int64_t astride, int64_t nb) {
    __m256 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < nb; b++) {
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = w + r * wstride + b * Q6_K_BYTES;
            const int8_t *sc = (const int8_t *)(blk + 192);
            float d = fp16(blk + 208);
            __m256i q[8], scv[8];
            for (int h = 0; h < 2; h++) {
                __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + h * 64));
                __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + h * 64 + 32));
                __m256i hb = _mm256_loadu_si256((const __m256i *)(blk + 128 + h * 32));
                __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                                 _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                 _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
                for (int g = 0; g < 4; g++) {
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * g), m3);
                    q[h * 4 + g] = _mm256_or_si256(lo[g], _mm256_slli_epi16(hi, 4));
                    int si = h * 8 + g * 2;
                    scv[h * 4 + g] = _mm256_setr_m128i(_mm_set1_epi16(sc[si]), _mm_set1_epi16(sc[si + 1]));
                }
            }
            for (int t = 0; t < NT; t++) {
                const uint8_t *ar = a + t * astride;
                const int8_t *y = (const int8_t *)ar + b * QKK;
                const int16_t *bs = (const int16_t *)(ar + nb * QKK) + b * 16;
                float dx = ((const float *)(ar + nb * (QKK + 32)))[b];
                __m256i isum = _mm256_setzero_si256();
                for (int j = 0; j < 8; j++) {
                    __m256i p = _mm256_maddubs_epi16(q[j], _mm256_loadu_si256((const __m256i *)(y + 32 * j)));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, scv[j]));
                }
                int corr = 0;
                for (int i = 0; i < 16; i++) corr += sc[i] * bs[i];
                isum = _mm256_sub_epi32(isum, _mm256_setr_epi32(32 * corr, 0, 0, 0, 0, 0, 0, 0));
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * dx), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) out[t * ldo + r] = hsum8(acc[r][t]);
}

/* Rows one at a time, each over the tile's tokens in runs of up to 4: FIXED(1, NT, ...) with NT a
 * compile-time constant. LEN: what FIXED takes as the row length (blocks or weights). */
#define EACH_ROW_OVER_TOKENS(FIXED, LEN)                                                            \
    for (int t0 = 0; t0 < nt; t0 += 4) {                                                            \
        const uint8_t *at = a + t0 * astride;                                                       \
        float *ot = out + t0 * ldo;                                                                 \
        for (int r = 0; r < nr; r++) {                                                              \
            const uint8_t *wr = w + r * wstride;                                                    \
            switch (nt - t0) {                                                                      \
            case 1: FIXED(1, 1, ot + r, ldo, wr, wstride, at, astride, LEN); break;                 \
            case 2: FIXED(1, 2, ot + r, ldo, wr, wstride, at, astride, LEN); break;                 \
            case 3: FIXED(1, 3, ot + r, ldo, wr, wstride, at, astride, LEN); break;                 \
            default: FIXED(1, 4, ot + r, ldo, wr, wstride, at, astride, LEN); break;                \
            }                                                                                       \
        }                                                                                           \
    }

#define DEF_K_TILE(NAME, FIXED)                                                                    \
    static void NAME(float *out, int64_t ldo, const uint8_t *w, int64_t wstride, int nr,           \
                     const uint8_t *a, int64_t astride, int nt, int64_t cols) {                    \
        int64_t nb = cols / QKK;                                                                    \
        /* Each row unpacked once per block for up to 4 tokens (the unpack costs more than a dot). */ \
        EACH_ROW_OVER_TOKENS(FIXED, nb)                                                             \
    }

DEF_K_TILE(tile_q4_k, q4k_fixed)
DEF_K_TILE(tile_q6_k, q6k_fixed)

/* ---- float weights ---------------------------------------------------------------------------- */

INLINE __m256 load_f32(const uint8_t *p) { return _mm256_loadu_ps((const float *)p); }
INLINE __m256 load_f16(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
INLINE __m256 load_bf16(const uint8_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
INLINE float sc_f32(const uint8_t *p) { float v; memcpy(&v, p, 4); return v; }
INLINE float sc_f16(const uint8_t *p) { return fp16(p); }
INLINE float sc_bf16(const uint8_t *p) { return bf16_to_f32(rd16(p)); }

#define DEF_F_TILE(NAME, LOAD, SCAL, ES)                                                           \
    INLINE void NAME##_fixed(const int NR, const int NT, float *out, int64_t ldo, const uint8_t *w, \
                             int64_t wstride, const uint8_t *a, int64_t astride, int64_t cols) {   \
        __m256 acc[4][4];                                                                           \
        for (int r = 0; r < NR; r++)                                                                \
            for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();                           \
        int64_t i = 0;                                                                              \
        for (; i + 8 <= cols; i += 8)                                                               \
            for (int r = 0; r < NR; r++) {                                                          \
                __m256 wv = LOAD(w + r * wstride + i * ES);                                         \
                for (int t = 0; t < NT; t++)                                                        \
                    acc[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps((const float *)(a + t * astride) + i), acc[r][t]); \
            }                                                                                       \
        for (int r = 0; r < NR; r++)                                                                \
            for (int t = 0; t < NT; t++) {                                                          \
                float s = hsum8(acc[r][t]);                                                         \
                for (int64_t j = i; j < cols; j++)                                                  \
                    s += SCAL(w + r * wstride + j * ES) * ((const float *)(a + t * astride))[j];    \
                out[t * ldo + r] = s;                                                               \
            }                                                                                       \
    }                                                                                               \
    static void NAME(float *out, int64_t ldo, const uint8_t *w, int64_t wstride, int nr,           \
                     const uint8_t *a, int64_t astride, int nt, int64_t cols) {                    \
        if (nt == 1 && nr == 4) { NAME##_fixed(4, 1, out, ldo, w, wstride, a, astride, cols); return; } \
        EACH_ROW_OVER_TOKENS(NAME##_fixed, cols)                                                    \
    }

DEF_F_TILE(tile_f32, load_f32, sc_f32, 4)
DEF_F_TILE(tile_f16, load_f16, sc_f16, 2)
DEF_F_TILE(tile_bf16, load_bf16, sc_bf16, 2)

/* ---- activation quantization (bit-exact with the scalar definition) --------------------------- */

/* Quantize n floats (multiple of 32) with one scale; returns d (not fp16-rounded). */
INLINE float quant_run(int8_t *q, const float *x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    float amax = _mm_cvtss_f32(m);
    float d = amax / 127.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m256 vid = _mm256_set1_ps(id), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < n; i += 32) {
        __m256i v[4];
        for (int k = 0; k < 4; k++) {
            __m256 s = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), vid);
            __m256 ab = _mm256_andnot_ps(sign, s);
            __m256 fl = _mm256_floor_ps(ab);
            __m256 rr = _mm256_add_ps(fl, _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(ab, fl), half, _CMP_GE_OQ), one));
            v[k] = _mm256_cvttps_epi32(_mm256_or_ps(rr, _mm256_and_ps(s, sign)));
        }
        __m256i p01 = _mm256_packs_epi32(v[0], v[1]), p23 = _mm256_packs_epi32(v[2], v[3]);
        __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
        _mm256_storeu_si256((__m256i *)(q + i), p);
    }
    return d;
}

static void quant_a8(uint8_t *a, int64_t astride, const float *x, int64_t n_rows, int64_t cols) {
    int64_t nb = cols / QK;
    for (int64_t t = 0; t < n_rows; t++) {
        int8_t *qs = (int8_t *)(a + t * astride);
        float *d = (float *)(a + t * astride + nb * QK);
        for (int64_t b = 0; b < nb; b++) {
            float v = quant_run(qs + b * QK, x + t * cols + b * QK, QK);
            d[b] = _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
        }
        a8_fill_sums(a + t * astride, nb);
    }
}

static void quant_a8k(uint8_t *a, int64_t astride, const float *x, int64_t n_rows, int64_t cols) {
    int64_t nb = cols / QKK;
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int64_t t = 0; t < n_rows; t++) {
        int8_t *qs = (int8_t *)(a + t * astride);
        int16_t *bs = (int16_t *)(a + t * astride + nb * QKK);
        float *d = (float *)(a + t * astride + nb * (QKK + 32));
        for (int64_t b = 0; b < nb; b++) {
            d[b] = quant_run(qs + b * QKK, x + t * cols + b * QKK, QKK);
            for (int j = 0; j < 8; j++) {
                /* 32 int8 -> two sums of 16 */
                __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(qs + b * QKK + 32 * j))), ones16);
                __m128i lo = _mm256_castsi256_si128(s), hi = _mm256_extracti128_si256(s, 1);
                lo = _mm_hadd_epi32(lo, lo);
                hi = _mm_hadd_epi32(hi, hi);
                bs[b * 16 + 2 * j] = (int16_t)(_mm_cvtsi128_si32(lo) + _mm_extract_epi32(lo, 1));
                bs[b * 16 + 2 * j + 1] = (int16_t)(_mm_cvtsi128_si32(hi) + _mm_extract_epi32(hi, 1));
            }
        }
    }
}

/* silu(g) * u, eight at a time: the sigmoid from e = e^-|g| (<= 1, so exp_neg serves) as 1 / (1 + e)
 * for g >= 0 and e / (1 + e) below. glibc's scalar expf took ~5.5 ns a call here, and a 256-token
 * prefill makes 2.9 million of them per MoE layer. */
static void silu_mul(float *out, const float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 e = exp_neg(_mm256_or_ps(x, sign));
        __m256 num = _mm256_blendv_ps(one, e, x);   /* x's sign bit picks e */
        __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_loadu_ps(u + i)));
    }
    lite_silu_mul_scalar(out + i, g + i, u + i, n - i);
}

/* ---- MLA attention ---------------------------------------------------------------------------- */

/* Scores of NH heads x NS positions: dot products over the latent and the rope parts, each pair
 * in its own accumulator, every cache row loaded once for the NH heads. 4 x 3 fills the 16
 * registers (12 sums, 3 cache rows, a query) with 7 loads per 12 FMAs. */
INLINE void mla_scores(const int NH, const int NS, float *p, int64_t pld, const float *ql, const float *qp,
                       const float *ckv, const float *kpe, int64_t c_dim, int64_t r_dim, float scale, mla_prefetch *pf) {
    __m256 acc[4][4];
    for (int h = 0; h < NH; h++)
        for (int s = 0; s < NS; s++) acc[h][s] = _mm256_setzero_ps();
    for (int64_t c = 0; c < c_dim; c += 8) {
        __m256 k[4];
        if (c % 16 == 0) mla_prefetch_step(pf);
        for (int s = 0; s < NS; s++) k[s] = _mm256_loadu_ps(ckv + s * c_dim + c);
        for (int h = 0; h < NH; h++) {
            __m256 q = _mm256_loadu_ps(ql + h * c_dim + c);
            for (int s = 0; s < NS; s++) acc[h][s] = _mm256_fmadd_ps(q, k[s], acc[h][s]);
        }
    }
    for (int64_t c = 0; c < r_dim; c += 8) {
        __m256 k[4];
        for (int s = 0; s < NS; s++) k[s] = _mm256_loadu_ps(kpe + s * r_dim + c);
        for (int h = 0; h < NH; h++) {
            __m256 q = _mm256_loadu_ps(qp + h * r_dim + c);
            for (int s = 0; s < NS; s++) acc[h][s] = _mm256_fmadd_ps(q, k[s], acc[h][s]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int s = 0; s < NS; s++) p[h * pld + s] = hsum8(acc[h][s]) * scale;
}

/* acc[h][c, c + 8 NV) = acc[h] * alpha[h] + sum_s p[h][s] * ckv[s] for NH heads, the block held in
 * registers across the chunk's positions (4 heads x 24 dims: 12 sums, 3 cache loads and 4
 * broadcasts per 12 FMAs). */
INLINE void mla_accumulate_block(const int NH, const int NV, float *acc, const float *alpha, const float *p,
                                 int64_t pld, const float *ckv, int64_t ns, int64_t c_dim, int64_t c, mla_prefetch *pf) {
    __m256 a[4][3];
    for (int h = 0; h < NH; h++) {
        __m256 al = _mm256_set1_ps(alpha[h]);
        for (int v = 0; v < NV; v++) a[h][v] = _mm256_mul_ps(_mm256_loadu_ps(acc + h * MLA_MAX_C + c + 8 * v), al);
    }
    for (int64_t s = 0; s < ns; s++) {
        __m256 k[3];
        if (s % 2 == 0) mla_prefetch_step(pf);
        for (int v = 0; v < NV; v++) k[v] = _mm256_loadu_ps(ckv + s * c_dim + c + 8 * v);
        for (int h = 0; h < NH; h++) {
            __m256 ps = _mm256_broadcast_ss(p + h * pld + s);
            for (int v = 0; v < NV; v++) a[h][v] = _mm256_fmadd_ps(ps, k[v], a[h][v]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(acc + h * MLA_MAX_C + c + 8 * v, a[h][v]);
}

INLINE void mla_accumulate(const int NH, float *acc, const float *alpha, const float *p, int64_t pld,
                           const float *ckv, int64_t ns, int64_t c_dim, mla_prefetch *pf) {
    int64_t c = 0;
    for (; c + 24 <= c_dim; c += 24) mla_accumulate_block(NH, 3, acc, alpha, p, pld, ckv, ns, c_dim, c, pf);
    for (; c < c_dim; c += 8) mla_accumulate_block(NH, 1, acc, alpha, p, pld, ckv, ns, c_dim, c, pf);
}

/* Scores of nh <= 4 heads over a chunk's ns positions, three at a time. */
INLINE void mla_scores_group(int nh, float *p, int64_t pld, const float *ql, const float *qp, const float *kc,
                             const float *kp, int64_t ns, int64_t c_dim, int64_t r_dim, float scale, mla_prefetch *pf) {
    int64_t s = 0;
#define SCORES(NH, NS) mla_scores(NH, NS, p + s, pld, ql, qp, kc + s * c_dim, kp + s * r_dim, c_dim, r_dim, scale, pf)
    switch (nh) {
    case 4: for (; s + 3 <= ns; s += 3) SCORES(4, 3); for (; s < ns; s++) SCORES(4, 1); break;
    case 3: for (; s + 3 <= ns; s += 3) SCORES(3, 3); for (; s < ns; s++) SCORES(3, 1); break;
    case 2: for (; s + 3 <= ns; s += 3) SCORES(2, 3); for (; s < ns; s++) SCORES(2, 1); break;
    default: for (; s + 3 <= ns; s += 3) SCORES(1, 3); for (; s < ns; s++) SCORES(1, 1); break;
    }
#undef SCORES
}

/* The weighted sums of nh <= 4 heads (4 together, or 1). */
INLINE void mla_accumulate_group(int nh, float *acc, const float *alpha, const float *p, int64_t pld,
                                 const float *kc, int64_t ns, int64_t c_dim, mla_prefetch *pf) {
    if (nh == 4) mla_accumulate(4, acc, alpha, p, pld, kc, ns, c_dim, pf);
    else
        for (int g = 0; g < nh; g++) mla_accumulate(1, acc + g * MLA_MAX_C, alpha + g, p + g * pld, pld, kc, ns, c_dim, pf);
}

/* The same result as lite_mla_heads_scalar (to float rounding), vectorised; latent and rope
 * sizes must be multiples of 16 and 8, else the scalar kernel runs. */
static void mla_heads(float *out, const float *ql, const float *qp, const float *ckv, const float *kpe,
                      int64_t n_vis, int nh, int64_t c_dim, int64_t r_dim, float scale) {
    if (c_dim % 16 || r_dim % 8) {
        lite_mla_heads_scalar(out, ql, qp, ckv, kpe, n_vis, nh, c_dim, r_dim, scale);
        return;
    }
    mla_heads_by(4, mla_scores_group, mla_accumulate_group, out, ql, qp, ckv, kpe, n_vis, nh, c_dim, r_dim, scale);
}

static uint64_t read_xor(const uint8_t *p, int64_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
    }
    uint64_t w[4], acc;
    _mm256_storeu_si256((__m256i *)w, _mm256_xor_si256(a0, a1));
    acc = w[0] ^ w[1] ^ w[2] ^ w[3];
    for (; i < n; i += 8) {
        memcpy(w, p + i, 8);
        acc ^= w[0];
    }
    return acc;
}

void lite_kernels_avx2(kernel_table *t) {
    t->tile[K_Q4_0] = tile_q4_0;
    t->tile[K_Q8_0] = tile_q8_0;
    t->tile[K_Q4_K] = tile_q4_k;
    t->tile[K_Q6_K] = tile_q6_k;
    t->tile[K_F32] = tile_f32;
    t->tile[K_F16] = tile_f16;
    t->tile[K_BF16] = tile_bf16;
    t->mla = mla_heads;
    t->silu_mul = silu_mul;
    t->mv[K_Q4_0] = mv_q4_0;
    t->mv[K_Q8_0] = mv_q8_0;
    t->mv4[K_Q4_0] = mv4_q4_0;
    t->mv4[K_Q8_0] = mv4_q8_0;
    t->mv[K_Q4_K] = mv_q4_k;
    t->mv[K_Q6_K] = mv_q6_k;
    t->mv4[K_Q6_K] = mv4_q6_k;
    t->rows8[K_Q4_0] = rows8_q4_0;
    t->rows8[K_Q8_0] = rows8_q8_0;
    t->rows8[K_Q4_K] = rows8_q4_k;
    t->rows8[K_Q6_K] = rows8_q6_k;
    t->quant_a8 = quant_a8;
    t->quant_a8k = quant_a8k;
    t->read_xor = read_xor;
}
