/* Pieces shared by the x86 SIMD kernel files (AVX2, AVX-512): inlined into each, so each is
 * compiled with its own file's target flags. */
#ifndef LITE_KERN_X86_H
#define LITE_KERN_X86_H

#include <immintrin.h>
#include "internal.h"

#define INLINE static inline __attribute__((always_inline))

INLINE float fp16(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }

/* The next chunk's weights (`len` bytes from byte `off` of `rows` rows `ws` apart), prefetched a few
 * lines at each block of the token passes over the current chunk, so that its repack finds them
 * in cache instead of waiting on memory. Spread out, the reads hide behind the arithmetic; a
 * burst would fill the core's miss buffers and stall it (as in the MLA kernel). */
typedef struct { const char *line, *end; const uint8_t *w; int64_t ws, off, len, per; int i, rows; } r8_prefetch;

/* The chunk after blocks [b0, b0 + chunk) of rows [r, r + rows): the same rows' next blocks, else
 * the next row group's first; nothing past this call's rows. Spread over the passes of nt tokens
 * and their n blocks each: issued a pass at a time, 16 rows of Q6_K took ~40 lines at once,
 * past the core's ~24 outstanding misses (2 threads from DRAM: 0.9x the 8-row kernel; 1.0-1.04x
 * spread, Q4_K 1.09-1.26x, Q4_0 1.05-1.1x). */
INLINE r8_prefetch r8_next_chunk(const uint8_t *w, int64_t ws, int64_t r, int64_t nr, int rows, int64_t b0,
                                 int64_t chunk, int64_t nb, int64_t bs, int64_t n_tok, int nt, int n) {
    r8_prefetch p = {NULL, NULL, NULL, ws, 0, 0, 0, rows, rows};
    if (b0 + chunk < nb) {
        p.w = w + r * ws;
        p.off = (b0 + chunk) * bs;
        p.len = (nb - b0 - chunk < chunk ? nb - b0 - chunk : chunk) * bs;
    } else if (r + rows < nr) {
        p.w = w + (r + rows) * ws;
        p.rows = nr - r - rows < rows ? (int)(nr - r - rows) : rows;
        p.len = (nb < chunk ? nb : chunk) * bs;
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
        _mm_prefetch(p->line, _MM_HINT_T0);
        p->line += 64;
    }
}

#endif
