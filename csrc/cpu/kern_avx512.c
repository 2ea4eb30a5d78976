/* AVX-512 (F/BW/VL + VNNI) kernels. Entries left unset keep the AVX2 kernels.
 * VNNI's dpbusd multiplies unsigned bytes by signed bytes and adds each four products into an
 * int32 lane in one instruction, where AVX2 needs maddubs, an int16 add and madd; with 16 lanes
 * one vector holds 16 rows' weights. The Q4_0, Q4_K and Q6_K prefill kernels form the integer
 * sums the AVX2 kernels form and take the same float steps in the same order, so they return
 * the AVX2 results bit for bit; Q8_0's prefill, the one-token Q4_0 kernel and MLA attention sum
 * in another order and agree to float rounding. */
#include <immintrin.h>
#include "internal.h"
#include "kern_x86.h"

/* The AVX2 kernels of the kinds replaced here: the rows-in-lanes kernels take rows in groups of
 * 8, those here in groups of 16, and a last group of 8 goes to the AVX2 kernel. */
static rows8_fn avx2_rows8[K_COUNT];

/* ---- Q4_0 / Q8_0, rows in the lanes ----------------------------------------------------------- */
/* As the AVX2 rows-in-lanes kernel: a chunk of blocks of 16 rows is repacked so that vector v of a
 * block holds four weights of each row as unsigned bytes, each dpbusd broadcasts four activation
 * bytes from memory, and each weight vector feeds NT tokens. Q4_0's nibbles go in as they are and
 * their +8 offset comes off in float through the activation sums s[b] = 8 d sum(q), as in AVX2, so the
 * results are AVX2's bit for bit. Q8_0's signed weights go in plus 128 (dpbusd has no signed x
 * signed form, and AVX-512 no byte sign op for AVX2's |w| x sign(y, w)); the 128 sum(q) comes off
 * as 16 s[b], exact, but the product with d now rounds a larger sum, so Q8_0 differs from AVX2 in
 * the last bits. (Sums reach 32 * 255 * 127 < 2^24: exact in float.) */
#define R16_CHUNK 32
#define R16_NT 4

/* 16 bytes at src of each of 16 rows ws apart as 4-byte groups, g[j] holding bytes 4j..4j+3 of row
 * e in 32-bit element e: the AVX2 8-row transposes of rows 0..7 and 8..15, joined. */
INLINE void r16_lane_transpose(__m512i *g, const uint8_t *src, int64_t ws) {
    __m256i lo[4], hi[4];
    r8_lane_transpose(lo, src, ws);
    r8_lane_transpose(hi, src + 8 * ws, ws);
    for (int j = 0; j < 4; j++) g[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo[j]), hi[j], 1);
}

/* The fp16 words at byte 0 of 16 rows ws apart, as floats in row order: the first group of their
 * lane transpose (the other three are dead code). A gather took ~20 cycles a block on Zen 4, 6%
 * of a 256-token prefill; these loads and unpacks made the prefill 1.027x. */
INLINE __m512 r16_scales(const uint8_t *p, int64_t ws) {
    __m512i g[4];
    r16_lane_transpose(g, p, ws);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g[0]));
}

/* Word permutes whose indices are made once (word_index) and used many times (permute_words):
 * with VBMI one byte permute, one micro-op where the word permute takes two. */
#ifdef __AVX512VBMI__
INLINE __m512i word_index(__m512i i) {   /* word w: bytes 2w, 2w + 1 */
    return _mm512_add_epi16(_mm512_mullo_epi16(i, _mm512_set1_epi16(0x0202)), _mm512_set1_epi16(0x0100));
}
INLINE __m512i permute_words(__m512i i, __m512i v) { return _mm512_permutexvar_epi8(i, v); }
#else
INLINE __m512i word_index(__m512i i) { return i; }
INLINE __m512i permute_words(__m512i i, __m512i v) { return _mm512_permutexvar_epi16(i, v); }
#endif

/* Each byte's high nibble, shifted down: with GFNI (level 3) one affine byte transform, whose
 * bit matrix's row i (byte 7 - i) picks bit 4 + i, where a shift and a mask take two. */
INLINE __m512i high_nibbles(__m512i v) {
#ifdef __GFNI__
    return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0);
#else
    return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15));
#endif
}

/* Blocks [b0, b0 + n) of rows w[0..15] -> dst (8 vectors a block) and their scales -> dws[16 n].
 * Q4_0: vector 2j the low nibbles of quant bytes 4j..4j+3 of each row, 2j+1 their high nibbles.
 * Q8_0: vector v weights 4v..4v+3 of each row, plus 128. */
INLINE void r16_repack(const int KIND, __m512i *dst, float *dws, const uint8_t *w, int64_t ws, int64_t b0, int n) {
    const int64_t bs = KIND == K_Q4_0 ? Q4_0_BYTES : Q8_0_BYTES;
    const __m512i m4 = _mm512_set1_epi8(15), bias = _mm512_set1_epi8(-128);
    for (int k = 0; k < n; k++) {
        const uint8_t *blk = w + (b0 + k) * bs;
        _mm512_store_ps(dws + 16 * k, r16_scales(blk, ws));
        __m512i g[8];
        r16_lane_transpose(g, blk + 2, ws);
        if (KIND == K_Q8_0) {
            r16_lane_transpose(g + 4, blk + 18, ws);
            for (int v = 0; v < 8; v++) dst[8 * k + v] = _mm512_xor_si512(g[v], bias);
            continue;
        }
        for (int j = 0; j < 4; j++) {
            dst[8 * k + 2 * j] = _mm512_and_si512(g[j], m4);
            dst[8 * k + 2 * j + 1] = high_nibbles(g[j]);
        }
    }
}

/* acc + dpbusd(w, the four bytes at p in every lane), the broadcast folded into dpbusd's memory
 * operand. GCC keeps a broadcast that feeds two dpbusd (G = 2) in a register, one more
 * instruction for every two; folded, one-thread products at 256 tokens ran 1.058x (Q4_0) and
 * 1.105x (Q4_K) as fast, and the 27-layer prefill 1.044x. */
INLINE __m512i dpbusd_bcst(__m512i acc, __m512i w, const uint8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const uint8_t(*)[4])p));
    return acc;
}

/* 16 rows of NT tokens' results: stored for a row group's first chunk of blocks, added after. */
INLINE void r16_store(const int NT, float *out, int64_t ldo, const __m512 *acc, int first) {
    for (int t = 0; t < NT; t++) {
        float *o = out + t * ldo;
        _mm512_storeu_ps(o, first ? acc[t] : _mm512_add_ps(_mm512_loadu_ps(o), acc[t]));
    }
}

/* NT tokens over the repacked blocks [b0, b0 + n) of G groups of 16 rows (group g's vectors at
 * rep + g * 8 * R16_CHUNK): out[t*ldo + r..r+16G], set for the first chunk and added to after. */
INLINE void r16_tokens(const int KIND, const int G, const int NT, float *out, int64_t ldo, const __m512i *rep,
                       const float *dws, const uint8_t *a, int64_t as, int64_t nb, int64_t b0, int n, r8_prefetch *pf) {
    __m512 acc[2][R16_NT];
    for (int g = 0; g < G; g++)
        for (int t = 0; t < NT; t++) acc[g][t] = _mm512_setzero_ps();
    for (int k = 0; k < n; k++) {
        __m512i s[2][R16_NT];
        r8_prefetch_step(pf);
        for (int g = 0; g < G; g++)
            for (int t = 0; t < NT; t++) s[g][t] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int v = 0; v < 8; v++) {
            const int off = KIND == K_Q4_0 ? (v & 1) * 16 + 4 * (v >> 1) : 4 * v;
            __m512i wv[2];
            for (int g = 0; g < G; g++) wv[g] = _mm512_load_si512(rep + g * 8 * R16_CHUNK + 8 * k + v);
            for (int t = 0; t < NT; t++)
                for (int g = 0; g < G; g++) s[g][t] = dpbusd_bcst(s[g][t], wv[g], a + t * as + (b0 + k) * QK + off);
        }
        for (int t = 0; t < NT; t++) {
            const float *dy = (const float *)(a + t * as + nb * QK);
            const float off = KIND == K_Q4_0 ? 1.0f : 16.0f;   /* Q8_0: 128 sum(q) = 16 s */
            __m512 d = _mm512_set1_ps(dy[b0 + k]), c = _mm512_set1_ps(dy[nb + b0 + k] * off);
            for (int g = 0; g < G; g++) {
                __m512 x = _mm512_fmsub_ps(_mm512_cvtepi32_ps(s[g][t]), d, c);
                acc[g][t] = _mm512_fmadd_ps(x, _mm512_load_ps(dws + g * 16 * R16_CHUNK + 16 * k), acc[g][t]);
            }
        }
    }
    for (int g = 0; g < G; g++) r16_store(NT, out + 16 * g, ldo, acc[g], b0 == 0);
}

/* Rows [r, r + 16G), a chunk of blocks at a time, R16_NT tokens a pass. */
INLINE void r16_rows(const int KIND, const int G, float *out, int64_t ldo, const uint8_t *w, int64_t ws, int64_t r,
                     int64_t nr, const uint8_t *a, int64_t as, int64_t n_tok, int64_t nb, const lite_rows_ahead *ahead) {
    _Alignas(64) __m512i rep[2 * 8 * R16_CHUNK];
    _Alignas(64) float dws[2 * 16 * R16_CHUNK];
    for (int64_t b0 = 0; b0 < nb; b0 += R16_CHUNK) {
        int n = (int)(nb - b0 < R16_CHUNK ? nb - b0 : R16_CHUNK);
        for (int g = 0; g < G; g++)
            r16_repack(KIND, rep + g * 8 * R16_CHUNK, dws + g * 16 * R16_CHUNK, w + (r + 16 * g) * ws, ws, b0, n);
        r8_prefetch pf = r8_next_chunk(w, ws, r, nr, 16 * G, b0, R16_CHUNK, nb, KIND == K_Q4_0 ? Q4_0_BYTES : Q8_0_BYTES,
                                       n_tok, R16_NT, n, ahead);
        int64_t t = 0;
        for (; t + R16_NT <= n_tok; t += R16_NT)
            r16_tokens(KIND, G, R16_NT, out + t * ldo + r, ldo, rep, dws, a + t * as, as, nb, b0, n, &pf);
        switch (n_tok - t) {
        case 3: r16_tokens(KIND, G, 3, out + t * ldo + r, ldo, rep, dws, a + t * as, as, nb, b0, n, &pf); break;
        case 2: r16_tokens(KIND, G, 2, out + t * ldo + r, ldo, rep, dws, a + t * as, as, nb, b0, n, &pf); break;
        case 1: r16_tokens(KIND, G, 1, out + t * ldo + r, ldo, rep, dws, a + t * as, as, nb, b0, n, &pf); break;
        }
    }
}

/* ---- Q4_K / Q6_K, rows in the lanes ---------------------------------------------------------- */
/* The AVX2 K-quant kernels' scheme (kern_avx2.c) with 16 rows a vector: the two 8-row repacks of
 * the AVX2 kernel are joined, a sub-block's (Q4_K) or half sub-block's (Q6_K) integer dot is one
 * dpbusd per four weights (the AVX2 kernel's maddubs sums, exact in int16 there, are the same
 * integers), then the same int32 scaling, corrections and float steps: AVX2's results bit for bit. */
#define K16_CHUNK 4
#define K16_REP (8 * 8 * K16_CHUNK)     /* vectors of a group's chunk */
#define K16_SC (16 * 16 * K16_CHUNK)    /* scales: (super-block, sub-block or half) x 16 rows */
#define K16_MN (8 * 16 * K16_CHUNK)
#define K16_D (16 * K16_CHUNK)

/* Super-blocks [b0, b0 + n) of rows w[0..15], as `r8_repack_q4k` / `r8_repack_q6k` lay out 8 rows,
 * with rows 8..15 in the upper halves of the vectors and the scale arrays' second 8 of each 16. */
INLINE void k16_repack(const int KIND, __m512i *dst, int32_t *sc, int32_t *mn, float *dd, float *dm, const uint8_t *w,
                       int64_t ws, int64_t b0, int n) {
    _Alignas(32) __m256i half[2][K16_REP];
    _Alignas(32) int32_t hs[2][K16_SC / 2], hm[2][K16_MN / 2];
    _Alignas(32) float hd[2][K16_D / 2], hdm[2][K16_D / 2];
    for (int i = 0; i < 2; i++) {
        if (KIND == K_Q4_K) r8_repack_q4k(half[i], hs[i], hm[i], hd[i], hdm[i], w + 8 * i * ws, ws, b0, n);
        else r8_repack_q6k(half[i], hs[i], hd[i], w + 8 * i * ws, ws, b0, n);
    }
    for (int v = 0; v < 64 * n; v++) dst[v] = _mm512_inserti64x4(_mm512_castsi256_si512(half[0][v]), half[1][v], 1);
    const int nsc = (KIND == K_Q4_K ? 8 : 16) * n;
    for (int e = 0; e < nsc; e++)
        for (int i = 0; i < 2; i++) memcpy(sc + 16 * e + 8 * i, hs[i] + 8 * e, 32);
    for (int k = 0; k < n; k++)
        for (int i = 0; i < 2; i++) {
            memcpy(dd + 16 * k + 8 * i, hd[i] + 8 * k, 32);
            if (KIND == K_Q4_K) {
                memcpy(dm + 16 * k + 8 * i, hdm[i] + 8 * k, 32);
                for (int j = 0; j < 8; j++) memcpy(mn + 16 * (8 * k + j) + 8 * i, hm[i] + 8 * (8 * k + j), 32);
            }
        }
}

INLINE void k16_tokens(const int KIND, const int G, const int NT, float *out, int64_t ldo, const __m512i *rep,
                       const int32_t *sc, const int32_t *mn, const float *dd, const float *dm, const uint8_t *a,
                       int64_t as, int64_t nb, int64_t b0, int n, r8_prefetch *pf) {
    __m512 acc[2][R16_NT];
    for (int g = 0; g < G; g++)
        for (int t = 0; t < NT; t++) acc[g][t] = _mm512_setzero_ps();
    for (int k = 0; k < n; k++) {
        const int64_t b = b0 + k;
        __m512i isum[2][R16_NT], corr[2][R16_NT];
        r8_prefetch_step(pf);
        for (int g = 0; g < G; g++)
            for (int t = 0; t < NT; t++) isum[g][t] = corr[g][t] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++) {
            const __m512i *wj = rep + 8 * (8 * k + j);
            const uint8_t *yj = a + b * QKK + 32 * j;
            const int16_t *bs = (const int16_t *)(a + nb * QKK) + b * 16 + 2 * j;
            /* Q4_K: one segment of 8 vectors; Q6_K: two of 4 (the halves) */
            const int NSEG = KIND == K_Q4_K ? 1 : 2, VS = 8 / NSEG;
            for (int h = 0; h < NSEG; h++) {
                __m512i s32[2][R16_NT];
                for (int g = 0; g < G; g++)
                    for (int t = 0; t < NT; t++) s32[g][t] = _mm512_setzero_si512();
#pragma GCC unroll 8
                for (int u = 0; u < VS; u++) {
                    const int v = h * VS + u;
                    __m512i wv[2];
                    for (int g = 0; g < G; g++) wv[g] = _mm512_load_si512(wj + g * K16_REP + v);
                    for (int t = 0; t < NT; t++)
                        for (int g = 0; g < G; g++) s32[g][t] = dpbusd_bcst(s32[g][t], wv[g], yj + t * as + 4 * v);
                }
                for (int t = 0; t < NT; t++)
                    for (int g = 0; g < G; g++) {
                        const int32_t *sg = sc + g * K16_SC;
                        if (KIND == K_Q4_K) {
                            const __m512i pair = _mm512_set1_epi32(bs[t * as / 2] + bs[t * as / 2 + 1]);
                            const __m512i s = _mm512_load_si512(sg + (8 * k + j) * 16);
                            const __m512i m = _mm512_load_si512(mn + g * K16_MN + (8 * k + j) * 16);
                            isum[g][t] = _mm512_add_epi32(isum[g][t], _mm512_mullo_epi32(s32[g][t], s));
                            corr[g][t] = _mm512_add_epi32(corr[g][t], _mm512_mullo_epi32(m, pair));
                        } else {
                            const __m512i sh = _mm512_load_si512(sg + (16 * k + 2 * j + h) * 16);
                            isum[g][t] = _mm512_add_epi32(isum[g][t], _mm512_mullo_epi32(s32[g][t], sh));
                            const __m512i bh = _mm512_set1_epi32(bs[t * as / 2 + h]);
                            corr[g][t] = _mm512_add_epi32(corr[g][t], _mm512_mullo_epi32(sh, bh));
                        }
                    }
            }
        }
        for (int t = 0; t < NT; t++) {
            const __m512 dx = _mm512_set1_ps(((const float *)(a + t * as + nb * (QKK + 32)))[b]);
            for (int g = 0; g < G; g++) {
                const __m512 d = _mm512_load_ps(dd + g * K16_D + 16 * k);
                if (KIND == K_Q4_K) {
                    acc[g][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g][t]), _mm512_mul_ps(d, dx), acc[g][t]);
                    acc[g][t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(corr[g][t]),
                                                 _mm512_mul_ps(_mm512_load_ps(dm + g * K16_D + 16 * k), dx), acc[g][t]);
                } else {
                    __m512i q = _mm512_sub_epi32(isum[g][t], _mm512_slli_epi32(corr[g][t], 5));
                    acc[g][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(d, dx), acc[g][t]);
                }
            }
        }
    }
    for (int g = 0; g < G; g++) r16_store(NT, out + 16 * g, ldo, acc[g], b0 == 0);
}

/* Rows [r, r + 16G), K16_CHUNK super-blocks repacked at a time, R16_NT tokens a pass. */
INLINE void k16_rows(const int KIND, const int G, float *out, int64_t ldo, const uint8_t *w, int64_t ws, int64_t r,
                     int64_t nr, const uint8_t *a, int64_t as, int64_t n_tok, int64_t nb, const lite_rows_ahead *ahead) {
    const int64_t bs = KIND == K_Q4_K ? Q4_K_BYTES : Q6_K_BYTES;
    _Alignas(64) __m512i rep[2 * K16_REP];
    _Alignas(64) int32_t sc[2 * K16_SC], mn[2 * K16_MN];
    _Alignas(64) float dd[2 * K16_D], dm[2 * K16_D];
    for (int64_t b0 = 0; b0 < nb; b0 += K16_CHUNK) {
        int n = (int)(nb - b0 < K16_CHUNK ? nb - b0 : K16_CHUNK);
        for (int g = 0; g < G; g++)
            k16_repack(KIND, rep + g * K16_REP, sc + g * K16_SC, mn + g * K16_MN, dd + g * K16_D, dm + g * K16_D,
                       w + (r + 16 * g) * ws, ws, b0, n);
        r8_prefetch pf = r8_next_chunk(w, ws, r, nr, 16 * G, b0, K16_CHUNK, nb, bs, n_tok, R16_NT, n, ahead);
        int64_t t = 0;
        for (; t + R16_NT <= n_tok; t += R16_NT)
            k16_tokens(KIND, G, R16_NT, out + t * ldo + r, ldo, rep, sc, mn, dd, dm, a + t * as, as, nb, b0, n, &pf);
        switch (n_tok - t) {
        case 3: k16_tokens(KIND, G, 3, out + t * ldo + r, ldo, rep, sc, mn, dd, dm, a + t * as, as, nb, b0, n, &pf); break;
        case 2: k16_tokens(KIND, G, 2, out + t * ldo + r, ldo, rep, sc, mn, dd, dm, a + t * as, as, nb, b0, n, &pf); break;
        case 1: k16_tokens(KIND, G, 1, out + t * ldo + r, ldo, rep, sc, mn, dd, dm, a + t * as, as, nb, b0, n, &pf); break;
        }
    }
}

/* ---- rows-in-lanes entry points ----------------------------------------------------------- */
/* 32-row passes, a 16-row one, and a last 8 rows to the AVX2 kernel. */
INLINE void rows16(const int KIND, float *out, int64_t ldo, const uint8_t *w, int64_t ws, int64_t nr,
                   const uint8_t *a, int64_t as, int64_t n_tok, int64_t cols, const lite_rows_ahead *ahead) {
    const int q8 = KIND == K_Q4_0 || KIND == K_Q8_0;
    const int64_t nb = cols / (q8 ? QK : QKK);
    int64_t r = 0;
    for (; r + 32 <= nr; r += 32) {
        if (q8) r16_rows(KIND, 2, out, ldo, w, ws, r, nr, a, as, n_tok, nb, ahead);
        else k16_rows(KIND, 2, out, ldo, w, ws, r, nr, a, as, n_tok, nb, ahead);
    }
    if (r + 16 <= nr) {
        if (q8) r16_rows(KIND, 1, out, ldo, w, ws, r, nr, a, as, n_tok, nb, ahead);
        else k16_rows(KIND, 1, out, ldo, w, ws, r, nr, a, as, n_tok, nb, ahead);
        r += 16;
    }
    if (r < nr) avx2_rows8[KIND](out + r, ldo, w + r * ws, ws, nr - r, a, as, n_tok, cols, ahead);
}

#define DEF_ROWS16(NAME, KIND)                                                                     \
    static void NAME(float *out, int64_t ldo, const uint8_t *w, int64_t ws, int64_t nr, const uint8_t *a, \
                     int64_t as, int64_t n_tok, int64_t cols, const lite_rows_ahead *ahead) {    \
        rows16(KIND, out, ldo, w, ws, nr, a, as, n_tok, cols, ahead);                             \
    }
DEF_ROWS16(rows8_q4_0, K_Q4_0)
DEF_ROWS16(rows8_q8_0, K_Q8_0)
DEF_ROWS16(rows8_q4_k, K_Q4_K)
DEF_ROWS16(rows8_q6_k, K_Q6_K)

/* ---- Q4_0, one token ------------------------------------------------------------------------- */
/* Decode streams each row once; per 4 blocks (72 bytes) one two-source permute lays their quant
 * bytes one block to a 128-bit lane and another their fp16 scales over each lane's four elements,
 * two dpbusd (low and high nibbles) give each lane's sums, and one fmsub takes the +8 offset off
 * each block before its scale multiplies it in: about 13 micro-ops where the AVX2 kernel spends
 * about 35. Two cores' worth of this kernel reads about 40 GB/s from L2 on a 2-core Xeon, near
 * what its memory gives, so each micro-op shows. Built with VBMI and GFNI (level 3): the byte
 * permutes take fewer micro-ops than the word permutes (1.03x decode), and one affine byte
 * transform moves the high nibbles down where a shift and a mask took two (1.05x one thread from
 * L2). The fmsub saves the separate sum of offsets. The activations are laid out to match once
 * per call. */

/* Transposing reductions, where one horizontal sum a vector takes about 2.5x the micro-ops:
 * quad_sums gives, in each 128-bit lane L, the sums of lane L's four elements of a, b, c and d. */
INLINE __m512 quad_sums(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xee));
}

/* The sums of the 16 lanes of v[0..15], in that order (MLA's score tiles). */
INLINE __m512 sum16x16(const __m512 *v) {
    __m512 q0 = quad_sums(v[0], v[1], v[2], v[3]), q1 = quad_sums(v[4], v[5], v[6], v[7]);
    __m512 q2 = quad_sums(v[8], v[9], v[10], v[11]), q3 = quad_sums(v[12], v[13], v[14], v[15]);
    /* lanes 0 + 1 and 2 + 3 of each: v[0..3], v[4..7] (from q0, q1), then v[8..15] */
    __m512 h0 = _mm512_add_ps(_mm512_shuffle_f32x4(q0, q1, 0x88), _mm512_shuffle_f32x4(q0, q1, 0xdd));
    __m512 h1 = _mm512_add_ps(_mm512_shuffle_f32x4(q2, q3, 0x88), _mm512_shuffle_f32x4(q2, q3, 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(h0, h1, 0x88), _mm512_shuffle_f32x4(h0, h1, 0xdd));
}

/* The sums of the 16 lanes of a, b, c and d, in that order (a row of few blocks, as MLA's k_b
 * rows with four, feels the reduction). */
INLINE __m128 sum4x16(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 v = quad_sums(a, b, c, d);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* A lone token's A8 activations as `mv_q4_0` reads them: per 4 blocks, 64 bytes holding the first
 * 16 bytes of each block (one block to a 128-bit lane), 64 their last 16; each block's scale d
 * over its lane's four elements; and s (the +8 offset's sum) in its lane's first element only, so
 * that the lanes' total takes it once. Blocks past the last whole 4 keep their order. */
typedef struct { uint8_t *q; float *d, *s; } q4_0_token;

static void q4_0_token_prep(q4_0_token *p, const uint8_t *a, int64_t nb) {
    const float *d = (const float *)(a + nb * QK), *s = d + nb;
    const __m512i first = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13), last = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        __m512i lo = _mm512_loadu_si512(a + b * QK), hi = _mm512_loadu_si512(a + b * QK + 64);
        _mm512_store_si512(p->q + b * QK, _mm512_permutex2var_epi64(lo, first, hi));
        _mm512_store_si512(p->q + b * QK + 64, _mm512_permutex2var_epi64(lo, last, hi));
        __m512 dv = _mm512_castps128_ps512(_mm_loadu_ps(d + b)), sv = _mm512_castps128_ps512(_mm_loadu_ps(s + b));
        _mm512_store_ps(p->d + 4 * b, _mm512_permutexvar_ps(spread, dv));
        _mm512_store_ps(p->s + 4 * b, _mm512_maskz_permutexvar_ps(0x1111, spread, sv));
    }
    memcpy(p->q + b * QK, a + b * QK, (size_t)((nb - b) * QK));
    memcpy(p->d + 4 * b, d + b, (size_t)(nb - b) * 4);
    memcpy(p->s + 4 * b, s + b, (size_t)(nb - b) * 4);
}

/* Rows r + s*gap (s < S) for r < nr, S in lockstep sharing each step's activation loads; one
 * stream (S = 1) is mv_q4_0, four are mv4_q4_0, and a row's steps are the same either way. */
INLINE void mv_q4_0_streams(const int L2, const int S, float *out, const uint8_t *w, int64_t ws, int64_t nr,
                            const uint8_t *a, int64_t cols, int64_t gap) {
    const int64_t nb = cols / QK, nq = nb & ~(int64_t)3;
    _Alignas(64) uint8_t pq[MV_MAX_COLS];
    _Alignas(64) float pd[MV_MAX_COLS / QK * 4], ps[MV_MAX_COLS / QK * 4];
    q4_0_token y = {pq, pd, ps};
    q4_0_token_prep(&y, a, nb);
#ifdef __AVX512VBMI__
    /* byte 18L + 2 + e: quant byte e of block L; bytes 18L, 18L + 1: its scale (4 times per lane) */
    const __m512i quants = _mm512_set_epi32(0x47464544, 0x43424140, 0x3f3e3d3c, 0x3b3a3938, 0x35343332, 0x31302f2e,
                                            0x2d2c2b2a, 0x29282726, 0x23222120, 0x1f1e1d1c, 0x1b1a1918, 0x17161514,
                                            0x11100f0e, 0x0d0c0b0a, 0x09080706, 0x05040302);
    const __m512i scales = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x37363736, 0x37363736, 0x25242524, 0x25242524,
                                            0x13121312, 0x13121312, 0x01000100, 0x01000100);
#define Q4_0_PERMUTE(lo, idx, hi) _mm512_permutex2var_epi8(lo, idx, hi)
#define Q4_0_SCALES(idx, lo) _mm512_permutexvar_epi8(idx, lo)
#else
    /* word 1 + 9L + e: quant word e of block L; word 9L: block L's scale (4 times per lane) */
    const __m512i quants = _mm512_setr_epi32(0x00020001, 0x00040003, 0x00060005, 0x00080007, 0x000b000a, 0x000d000c,
                                             0x000f000e, 0x00110010, 0x00140013, 0x00160015, 0x00180017, 0x001a0019,
                                             0x001d001c, 0x001f001e, 0x00210020, 0x00230022);
    const __m512i scales = _mm512_setr_epi32(0, 0, 0x00090009, 0x00090009, 0x00120012, 0x00120012, 0x001b001b,
                                             0x001b001b, 0, 0, 0, 0, 0, 0, 0, 0);
#define Q4_0_PERMUTE(lo, idx, hi) _mm512_permutex2var_epi16(lo, idx, hi)
#define Q4_0_SCALES(idx, lo) _mm512_permutexvar_epi16(idx, lo)
#endif
    const __m512i m4 = _mm512_set1_epi8(15);
    /* Block quads alternate between two accumulators (a shorter dependency chain); the loop
     * takes them in pairs so that both stay in registers, where choosing one by the block's index
     * kept them on the stack (a load and a store each step). The empty asm keeps lo in a register:
     * GCC would otherwise read it again as the scales' permute operand, a second load that most
     * often splits a cache line (1.07x one thread from L2). */
#define Q4_0_STEP(ACC, b)                                                                          \
    {                                                                                              \
        const __m512i x0 = _mm512_load_si512(pq + (b) * QK), x1 = _mm512_load_si512(pq + (b) * QK + 64); \
        const __m512 xd = _mm512_load_ps(pd + 4 * (b)), xs = _mm512_load_ps(ps + 4 * (b));         \
        for (int s = 0; s < S; s++) {                                                              \
            const uint8_t *g = w + (r + s * gap) * ws + (b) * Q4_0_BYTES;                          \
            prefetch_block(L2, g, 4 * Q4_0_BYTES, MV_PREFETCH);                                    \
            __m512i lo = _mm512_loadu_si512(g), hi = _mm512_maskz_loadu_epi8(0xff, g + 64);        \
            __asm__("" : "+v"(lo));                                                                \
            __m512i q = Q4_0_PERMUTE(lo, quants, hi);                                              \
            __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(Q4_0_SCALES(scales, lo)));          \
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(q, m4), x0); \
            dot = _mm512_dpbusd_epi32(dot, high_nibbles(q), x1);                                 \
            ACC[s] = _mm512_fmadd_ps(_mm512_fmsub_ps(_mm512_cvtepi32_ps(dot), xd, xs), dw, ACC[s]);  \
        }                                                                                          \
    }
    for (int64_t r = 0; r < nr; r++) {
        __m512 acc0[4], acc1[4];
        for (int s = 0; s < S; s++) acc0[s] = acc1[s] = _mm512_setzero_ps();
        int64_t b = 0;
        for (; b + 8 <= nq; b += 8) {
            Q4_0_STEP(acc0, b)
            Q4_0_STEP(acc1, b + 4)
        }
        if (b < nq) Q4_0_STEP(acc0, b)
#undef Q4_0_STEP
#undef Q4_0_PERMUTE
#undef Q4_0_SCALES
        float sums[4];
        {   /* the streams' lane sums at once (lanes of absent streams are zero) */
            const __m512 z = _mm512_setzero_ps();
            _mm_storeu_ps(sums, sum4x16(_mm512_add_ps(acc0[0], acc1[0]), S > 1 ? _mm512_add_ps(acc0[1], acc1[1]) : z,
                                        S > 2 ? _mm512_add_ps(acc0[2], acc1[2]) : z,
                                        S > 3 ? _mm512_add_ps(acc0[3], acc1[3]) : z));
        }
        for (int s = 0; s < S; s++) {
            const uint8_t *row = w + (r + s * gap) * ws;
            float tail = 0.0f;
            for (int64_t b = nq; b < nb; b++) {
                const uint8_t *blk = row + b * Q4_0_BYTES;
                __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
                __m128i dot = _mm_dpbusd_epi32(_mm_setzero_si128(), _mm_and_si128(q, _mm512_castsi512_si128(m4)),
                                               _mm_loadu_si128((const __m128i *)(pq + b * QK)));
                dot = _mm_dpbusd_epi32(dot, _mm_and_si128(_mm_srli_epi16(q, 4), _mm512_castsi512_si128(m4)),
                                       _mm_loadu_si128((const __m128i *)(pq + b * QK + 16)));
                const int32_t *v = (const int32_t *)&dot;
                float dw = fp16(blk);
                tail += dw * (pd[4 * nq + (b - nq)] * (float)(v[0] + v[1] + v[2] + v[3]) - ps[4 * nq + (b - nq)]);
            }
            out[r + s * gap] = sums[s] + tail;
        }
    }
}

DEF_MV_STREAMS(mv_q4_0, mv4_q4_0, mv_q4_0_streams)

/* ---- Q4_K, one token -------------------------------------------------------------------------- */
/* The AVX2 kernel's integer steps at twice the width: one 64-byte load holds two 32-byte chunks
 * of a block, so one AND (low nibbles: sub-blocks 4h and 4h + 2) and one shift and AND (high:
 * 4h + 1 and 4h + 3) feed maddubs against the activations laid out to match once per call, and
 * vpdpwssd applies each sub-block's scale (spread over its 16 lanes by one word permute) as it
 * adds. Two such halves make a block's 16 int32 sums; the mins term is the AVX2 kernel's. Per
 * block about half the AVX2 kernel's instructions, whose Q4_K one-token rows were bound by
 * arithmetic (four streams gained them nothing). Sums as the AVX2 kernel's; the float lanes
 * differ, so results agree to float rounding. Level 3 spreads the scales with byte permutes and
 * takes the high nibbles with GFNI: 1.08-1.09x one thread from L2, the same bits. */

/* A lone token's A8K quants as mv_q4_k_streams reads them: per 128 weights, the activations of
 * the low-nibble sub-blocks (bytes 0-31 and 64-95) as 64 bytes, then of the high ones. */
static void q4_k_token_prep(uint8_t *yp, const uint8_t *a, int64_t nb) {
    const __m512i lo = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11), hi = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
    for (int64_t i = 0; i < nb * QKK; i += 128) {
        __m512i x0 = _mm512_loadu_si512(a + i), x1 = _mm512_loadu_si512(a + i + 64);
        _mm512_store_si512(yp + i, _mm512_permutex2var_epi64(x0, lo, x1));
        _mm512_store_si512(yp + i + 64, _mm512_permutex2var_epi64(x0, hi, x1));
    }
}

/* Rows r + s*gap (s < S) for r < nr, the S streams in lockstep block by block (see mv4_fn). */
INLINE void mv_q4_k_streams(const int L2, const int S, float *out, const uint8_t *w, int64_t ws, int64_t nr,
                            const uint8_t *a, int64_t cols, int64_t gap) {
    const int64_t nb = cols / QKK;
    const int16_t *bs = (const int16_t *)(a + nb * QKK);
    const float *dx = (const float *)(a + nb * (QKK + 32));
    _Alignas(64) uint8_t yp[MV_MAX_COLS];
    q4_k_token_prep(yp, a, nb);
    const __m512i m4 = _mm512_set1_epi8(15);
    /* word lanes 0-15 take scale j, 16-31 scale j + 2, for j = 0, 1, 4, 5 */
    const __m512i s0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x00020002, 0x00020002, 0x00020002, 0x00020002,
                                         0x00020002, 0x00020002, 0x00020002, 0x00020002);
    const __m512i one = _mm512_set1_epi16(1), four = _mm512_set1_epi16(4);
    const __m512i sidx[4] = {word_index(s0), word_index(_mm512_add_epi16(s0, one)),
                             word_index(_mm512_add_epi16(s0, four)),
                             word_index(_mm512_add_epi16(s0, _mm512_add_epi16(four, one)))};
    for (int64_t r = 0; r < nr; r++) {
        __m512 acc[4];
        __m128 macc[4];
        for (int s = 0; s < S; s++) {
            acc[s] = _mm512_setzero_ps();
            macc[s] = _mm_setzero_ps();
        }
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *y = yp + b * QKK;
            for (int s = 0; s < S; s++) {
                const uint8_t *blk = w + (r + s * gap) * ws + b * Q4_K_BYTES;
                prefetch_block(L2, blk, Q4_K_BYTES, MV_PREFETCH);
                __m128i sc, mn;
                q4_k_scales_mins(blk, &sc, &mn);
                const __m512i scv = _mm512_broadcast_i32x4(sc);
                __m512i isum = _mm512_setzero_si512();
                for (int h = 0; h < 2; h++) {
                    const __m512i v = _mm512_loadu_si512(blk + 16 + 64 * h);
                    const __m512i plo = _mm512_maddubs_epi16(_mm512_and_si512(v, m4), _mm512_load_si512(y + 128 * h));
                    const __m512i phi = _mm512_maddubs_epi16(high_nibbles(v), _mm512_load_si512(y + 128 * h + 64));
                    isum = _mm512_dpwssd_epi32(isum, plo, permute_words(sidx[2 * h], scv));
                    isum = _mm512_dpwssd_epi32(isum, phi, permute_words(sidx[2 * h + 1], scv));
                }
                acc[s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(fp16(blk) * dx[b]), acc[s]);
                macc[s] = _mm_fmadd_ps(q4_k_mins(mn, bs + 16 * b), _mm_set1_ps(fp16(blk + 2) * dx[b]), macc[s]);
            }
        }
        for (int s = 0; s < S; s++) out[r + s * gap] = _mm512_reduce_add_ps(acc[s]) - hsum4(macc[s]);
    }
}

DEF_MV_STREAMS(mv_q4_k, mv4_q4_k, mv_q4_k_streams)

/* ---- Q6_K, one token -------------------------------------------------------------------------- */
/* The AVX2 kernel's integer steps, a half block (128 weights) at a time: one 64-byte load of the
 * low bits gives weights 0-63 (AND) and 64-127 (shift, AND) of the half, the high bits of both
 * come from its 32 bytes broadcast to both 256-bit lanes and shifted per lane (vpsrlvw), and
 * vpdpwssd applies each 16 weights' scale (spread by one word permute). The -32 offset is the
 * AVX2 kernel's. About half its instructions a block; sums as its, float lanes other, so results
 * agree with it to float rounding. Level 3 spreads the scales and takes the high nibbles as
 * Q4_K's does: 1.075x one thread from L2, the same bits. */
INLINE void mv_q6_k_streams(const int L2, const int S, float *out, const uint8_t *w, int64_t ws, int64_t nr,
                            const uint8_t *a, int64_t cols, int64_t gap) {
    const int64_t nb = cols / QKK;
    const int16_t *bs = (const int16_t *)(a + nb * QKK);
    const float *dx = (const float *)(a + nb * (QKK + 32));
    const __m512i m4 = _mm512_set1_epi8(15), m3 = _mm512_set1_epi8(3);
    /* high bits of weights 0-31 | 32-63 of a half (shifts 0 | 2), and of 64-95 | 96-127 (4 | 6) */
    const __m512i sh_a = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i sh_b = _mm512_add_epi16(sh_a, _mm512_set1_epi16(4));
    /* word lanes 8k..8k+7 take scale 8h + k (k < 4) for weights 0-63 of half h, 8h + 4 + k for 64-127 */
    const __m512i sidx = _mm512_setr_epi32(0, 0, 0, 0, 0x00010001, 0x00010001, 0x00010001, 0x00010001, 0x00020002,
                                           0x00020002, 0x00020002, 0x00020002, 0x00030003, 0x00030003, 0x00030003,
                                           0x00030003);
    const __m512i spread[4] = {word_index(sidx), word_index(_mm512_add_epi16(sidx, _mm512_set1_epi16(4))),
                               word_index(_mm512_add_epi16(sidx, _mm512_set1_epi16(8))),
                               word_index(_mm512_add_epi16(sidx, _mm512_set1_epi16(12)))};
    for (int64_t r = 0; r < nr; r++) {
        __m512 acc[4];
        for (int s = 0; s < S; s++) acc[s] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *y = a + b * QKK;
            for (int s = 0; s < S; s++) {
                const uint8_t *blk = w + (r + s * gap) * ws + b * Q6_K_BYTES;
                prefetch_block(L2, blk, Q6_K_BYTES, MV_PREFETCH_DENSE);
                const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
                const __m512i scz = _mm512_castsi256_si512(sc16);
                /* the -32 offset: 32 * sum_i sc_i * bsum_i, in the low 8 lanes */
                const __m256i bsv = _mm256_loadu_si256((const __m256i *)(bs + 16 * b));
                const __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsv), 5);
                __m512i isum = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(off));
                for (int h = 0; h < 2; h++) {
                    const __m512i l = _mm512_loadu_si512(blk + 64 * h);
                    const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h)));
                    const __m512i qa = _mm512_or_si512(_mm512_and_si512(l, m4),
                                                       _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hb, sh_a), m3), 4));
                    const __m512i qb = _mm512_or_si512(high_nibbles(l),
                                                       _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hb, sh_b), m3), 4));
                    isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(qa, _mm512_loadu_si512(y + 128 * h)),
                                               permute_words(spread[2 * h], scz));
                    isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(qb, _mm512_loadu_si512(y + 128 * h + 64)),
                                               permute_words(spread[2 * h + 1], scz));
                }
                acc[s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(fp16(blk + 208) * dx[b]), acc[s]);
            }
        }
        for (int s = 0; s < S; s++) out[r + s * gap] = _mm512_reduce_add_ps(acc[s]);
    }
}

DEF_MV_STREAMS(mv_q6_k, mv4_q6_k, mv_q6_k_streams)

/* ---- MLA attention --------------------------------------------------------------------------- */
/* The AVX2 kernel's steps with 16-float vectors and twice the registers, 8 heads at a time: score
 * tiles of 8 heads x 2 positions (16 sums, 2 cache rows, a query) and weighted-sum blocks of 8 heads
 * x 32 dims (16 sums, 2 cache loads, 8 broadcasts), so that a chunk's cache rows come from L2 once
 * per step for the 8 heads (4 x 4 tiles of 4 heads read them twice: 27 x 4096 positions, 96-98
 * GFLOP/s with the cache in L3). Fewer heads take 4 x 4 tiles and 4 x 64 blocks. A tile's query
 * vector is loaded once into a register (GCC would fold it into each position's multiply-add, one
 * load per FMA, which left the loop waiting on loads) and its 16 sums come from one transposing
 * reduction: the attention alone 1.15-1.2x (one thread, 1024 cached positions) and 1.17-1.37x
 * (two, 16384); a decode step's heads at 16384 positions 1.07x. */
static mla_fn avx2_mla;

INLINE void mla16_scores(const int NH, const int NS, float *p, int64_t pld, const float *ql, const float *qp,
                         const float *ckv, const float *kpe, int64_t c_dim, int64_t r_dim, float scale, mla_prefetch *pf) {
    __m512 acc[8][4];
    for (int h = 0; h < NH; h++)
        for (int s = 0; s < NS; s++) acc[h][s] = _mm512_setzero_ps();
    for (int64_t c = 0; c < c_dim; c += 16) {
        __m512 k[4];
        if (c % (NH > 4 ? 16 : 32) == 0) mla_prefetch_step(pf);
        for (int s = 0; s < NS; s++) k[s] = _mm512_loadu_ps(ckv + s * c_dim + c);
        for (int h = 0; h < NH; h++) {
            __m512 q = _mm512_loadu_ps(ql + h * c_dim + c);
            if (NS > 1) __asm__("" : "+v"(q));
            for (int s = 0; s < NS; s++) acc[h][s] = _mm512_fmadd_ps(q, k[s], acc[h][s]);
        }
    }
    for (int64_t c = 0; c < r_dim; c += 16) {
        __m512 k[4];
        for (int s = 0; s < NS; s++) k[s] = _mm512_loadu_ps(kpe + s * r_dim + c);
        for (int h = 0; h < NH; h++) {
            __m512 q = _mm512_loadu_ps(qp + h * r_dim + c);
            for (int s = 0; s < NS; s++) acc[h][s] = _mm512_fmadd_ps(q, k[s], acc[h][s]);
        }
    }
    if (NH * NS == 16) {
        __m512 v[16];
        _Alignas(64) float sums[16];
        for (int h = 0; h < NH; h++)
            for (int s = 0; s < NS; s++) v[h * NS + s] = acc[h][s];
        _mm512_store_ps(sums, _mm512_mul_ps(sum16x16(v), _mm512_set1_ps(scale)));
        for (int h = 0; h < NH; h++) memcpy(p + h * pld, sums + h * NS, NS * sizeof(float));
        return;
    }
    for (int h = 0; h < NH; h++)
        for (int s = 0; s < NS; s++) p[h * pld + s] = _mm512_reduce_add_ps(acc[h][s]) * scale;
}

static void mla16_scores_group(int nh, float *p, int64_t pld, const float *ql, const float *qp, const float *kc,
                               const float *kp, int64_t ns, int64_t c_dim, int64_t r_dim, float scale, mla_prefetch *pf) {
    int64_t s = 0;
#define SCORES(NH, NS) mla16_scores(NH, NS, p + s, pld, ql, qp, kc + s * c_dim, kp + s * r_dim, c_dim, r_dim, scale, pf)
    if (nh > 4 && nh < 8) {   /* 4 heads, then the rest */
        mla16_scores_group(4, p, pld, ql, qp, kc, kp, ns, c_dim, r_dim, scale, pf);
        mla16_scores_group(nh - 4, p + 4 * pld, pld, ql + 4 * c_dim, qp + 4 * r_dim, kc, kp, ns, c_dim, r_dim, scale, pf);
        return;
    }
    switch (nh) {
    case 8: for (; s + 2 <= ns; s += 2) SCORES(8, 2); for (; s < ns; s++) SCORES(8, 1); break;
    case 4: for (; s + 4 <= ns; s += 4) SCORES(4, 4); for (; s < ns; s++) SCORES(4, 1); break;
    case 3: for (; s + 4 <= ns; s += 4) SCORES(3, 4); for (; s < ns; s++) SCORES(3, 1); break;
    case 2: for (; s + 4 <= ns; s += 4) SCORES(2, 4); for (; s < ns; s++) SCORES(2, 1); break;
    default: for (; s + 4 <= ns; s += 4) SCORES(1, 4); for (; s < ns; s++) SCORES(1, 1); break;
    }
#undef SCORES
}

/* acc[h][c, c + 16 NV) = acc[h] * alpha[h] + sum_s p[h][s] * ckv[s] for NH heads. */
INLINE void mla16_accumulate_block(const int NH, const int NV, float *acc, const float *alpha, const float *p,
                                   int64_t pld, const float *ckv, int64_t ns, int64_t c_dim, int64_t c, mla_prefetch *pf) {
    __m512 a[8][4];
    for (int h = 0; h < NH; h++) {
        __m512 al = _mm512_set1_ps(alpha[h]);
        for (int v = 0; v < NV; v++) a[h][v] = _mm512_mul_ps(_mm512_loadu_ps(acc + h * MLA_MAX_C + c + 16 * v), al);
    }
    for (int64_t s = 0; s < ns; s++) {
        __m512 k[4];
        if (NH > 4 || s % 2 == 0) mla_prefetch_step(pf);
        for (int v = 0; v < NV; v++) k[v] = _mm512_loadu_ps(ckv + s * c_dim + c + 16 * v);
        for (int h = 0; h < NH; h++) {
            __m512 ps = _mm512_set1_ps(p[h * pld + s]);
            for (int v = 0; v < NV; v++) a[h][v] = _mm512_fmadd_ps(ps, k[v], a[h][v]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(acc + h * MLA_MAX_C + c + 16 * v, a[h][v]);
}

INLINE void mla16_accumulate_group(int nh, float *acc, const float *alpha, const float *p, int64_t pld,
                                   const float *kc, int64_t ns, int64_t c_dim, mla_prefetch *pf) {
    if (nh == 8) {
        int64_t c = 0;
        for (; c + 32 <= c_dim; c += 32) mla16_accumulate_block(8, 2, acc, alpha, p, pld, kc, ns, c_dim, c, pf);
        if (c < c_dim) mla16_accumulate_block(8, 1, acc, alpha, p, pld, kc, ns, c_dim, c, pf);
        return;
    }
    for (int g = 0; g < nh;) {
        const int four = nh - g >= 4;
        int64_t c = 0;
        for (; c + 64 <= c_dim; c += 64)
            if (four) mla16_accumulate_block(4, 4, acc + g * MLA_MAX_C, alpha + g, p + g * pld, pld, kc, ns, c_dim, c, pf);
            else mla16_accumulate_block(1, 4, acc + g * MLA_MAX_C, alpha + g, p + g * pld, pld, kc, ns, c_dim, c, pf);
        for (; c < c_dim; c += 16)
            if (four) mla16_accumulate_block(4, 1, acc + g * MLA_MAX_C, alpha + g, p + g * pld, pld, kc, ns, c_dim, c, pf);
            else mla16_accumulate_block(1, 1, acc + g * MLA_MAX_C, alpha + g, p + g * pld, pld, kc, ns, c_dim, c, pf);
        g += four ? 4 : 1;
    }
}

/* Latent and rope sizes must be multiples of 16, else the AVX2 kernel runs. */
static void mla_heads(float *out, const float *ql, const float *qp, const float *ckv, const float *kpe,
                      int64_t n_vis, int nh, int64_t c_dim, int64_t r_dim, float scale) {
    if (c_dim % 16 || r_dim % 16) {
        avx2_mla(out, ql, qp, ckv, kpe, n_vis, nh, c_dim, r_dim, scale);
        return;
    }
    mla_heads_by(MLA_HEAD_GROUP, mla16_scores_group, mla16_accumulate_group, out, ql, qp, ckv, kpe, n_vis, nh, c_dim, r_dim, scale);
}

/* ---- activation quantization ------------------------------------------------------------------ */
/* The scalar definition's steps a block of 32 at a time in two vectors (bit for bit: roundf as
 * floor(|s|) + (|s| - floor >= 0.5) with s's sign, as the AVX2 kernel), and the block's sum of
 * quants taken from the int32 lanes before they narrow, where the AVX2 kernel adds the bytes up
 * again afterwards (a prefill's MoE quantizes each of its ~1500 pair rows a layer). */
static void quant_a8(uint8_t *a, int64_t astride, const float *x, int64_t n_rows, int64_t cols) {
    const int64_t nb = cols / QK;
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    const __m512i sign = _mm512_set1_epi32(INT32_MIN);
    for (int64_t t = 0; t < n_rows; t++) {
        int8_t *qs = (int8_t *)(a + t * astride);
        float *d = (float *)(a + t * astride + nb * QK), *s = d + nb;
        const float *xr = x + t * cols;
        for (int64_t b = 0; b < nb; b++) {
            const __m512 x0 = _mm512_loadu_ps(xr + b * QK), x1 = _mm512_loadu_ps(xr + b * QK + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
            __m512i sum = _mm512_setzero_si512();
            for (int h = 0; h < 2; h++) {
                const __m512 v = _mm512_mul_ps(h ? x1 : x0, _mm512_set1_ps(id)), ab = _mm512_abs_ps(v);
                const __m512 fl = _mm512_roundscale_ps(ab, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
                const __m512 r = _mm512_mask_add_ps(fl, _mm512_cmp_ps_mask(_mm512_sub_ps(ab, fl), half, _CMP_GE_OQ),
                                                    fl, one);
                const __m512i q = _mm512_cvttps_epi32(_mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_castps_si512(r), _mm512_and_si512(_mm512_castps_si512(v), sign))));
                _mm_storeu_si128((__m128i *)(qs + b * QK + 16 * h), _mm512_cvtsepi32_epi8(q));
                sum = _mm512_add_epi32(sum, q);
            }
            d[b] = _cvtsh_ss(_cvtss_sh(db, _MM_FROUND_TO_NEAREST_INT));
            s[b] = 8.0f * (d[b] * (float)_mm512_reduce_add_epi32(sum));
        }
    }
}

static uint64_t read_xor(const uint8_t *p, int64_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
        a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
    }
    uint64_t w[8], acc = 0;
    _mm512_storeu_si512(w, _mm512_xor_si512(a0, a1));
    for (int k = 0; k < 8; k++) acc ^= w[k];
    for (; i < n; i += 8) {
        memcpy(w, p + i, 8);
        acc ^= w[0];
    }
    return acc;
}

#ifdef __AVX512VBMI__
void lite_kernels_avx512_vbmi(kernel_table *t) {
#else
void lite_kernels_avx512(kernel_table *t) {
#endif
    for (int k = 0; k < K_COUNT; k++) avx2_rows8[k] = t->rows8[k];
    if (avx2_rows8[K_Q4_0]) t->rows8[K_Q4_0] = rows8_q4_0;
    if (avx2_rows8[K_Q8_0]) t->rows8[K_Q8_0] = rows8_q8_0;
    if (avx2_rows8[K_Q4_K]) t->rows8[K_Q4_K] = rows8_q4_k;
    if (avx2_rows8[K_Q6_K]) t->rows8[K_Q6_K] = rows8_q6_k;
    t->mv[K_Q4_0] = mv_q4_0;
    t->mv4[K_Q4_0] = mv4_q4_0;
    t->mv[K_Q4_K] = mv_q4_k;
    t->mv4[K_Q4_K] = mv4_q4_k;
    t->mv[K_Q6_K] = mv_q6_k;
    t->mv4[K_Q6_K] = mv4_q6_k;
    avx2_mla = t->mla;
    t->mla = mla_heads;
    t->read_xor = read_xor;
    t->quant_a8 = quant_a8;
}
