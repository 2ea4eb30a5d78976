/* What a Q4_0 prefill kernel's float epilogue costs the integer dot products on this CPU.
 *
 *     cc -O2 -march=native benchmarks/vnni_epilogue.c -o /tmp/vnni_epilogue && /tmp/vnni_epilogue
 *
 * The rows-in-lanes kernel (csrc/cpu/kern_avx512.c) does, per 16 rows, token and 32-weight block,
 * 8 dpbusd and then converts the block's integer sums and applies two scales: a cvt, an fmsub
 * (activation scale, offset) and an fmadd (weight scale). Each line below times 8 independent
 * dpbusd chains plus one kind of extra work per 8 dpbusd, on one thread. Where the extra ops
 * compete with dpbusd for execution ports, their cost adds to the dot products' and caps the
 * kernel below VNNI peak whatever its scheduling. On a 2-core Zen 4 (512-bit ops on 256-bit
 * units) the epilogue left the dots 0.83-0.84 of their throughput alone, and the kernel's token
 * pass ran at ~94% of that rate; on an Emerald Rapids Xeon the same kernel prefilled 3.4x
 * llama.cpp where Zen 4 gives 2.1-2.3x. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

enum { DOTS_ONLY, CVT_ADD, CVT_FMA, EPILOGUE, N_MODES };
static const char *NAMES[N_MODES] = {
    "8 dpbusd", "+ 2 x (cvt, add)", "+ cvt, fmadd", "+ cvt, fmsub, fmadd (the kernel's epilogue)"};

static double run(int mode, long n) {
    __m512i s[8];
    __m512 acc[2];
    for (int i = 0; i < 8; i++) s[i] = _mm512_set1_epi32(i);
    for (int i = 0; i < 2; i++) acc[i] = _mm512_setzero_ps();
    __m512i w = _mm512_set1_epi8(3), y = _mm512_set1_epi8(5);
    const __m512 d = _mm512_set1_ps(1.0001f), c = _mm512_set1_ps(0.5f);
    double t0 = now();
    for (long i = 0; i < n; i++) {
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) s[j] = _mm512_dpbusd_epi32(s[j], w, y);
        switch (mode) {
        case CVT_ADD:
            for (int j = 0; j < 2; j++) acc[j] = _mm512_add_ps(_mm512_cvtepi32_ps(s[j]), acc[j]);
            break;
        case CVT_FMA:
            acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[0]), d, acc[0]);
            break;
        case EPILOGUE:
            acc[0] = _mm512_fmadd_ps(_mm512_fmsub_ps(_mm512_cvtepi32_ps(s[0]), d, c), d, acc[0]);
            break;
        }
        __asm__ volatile("" : "+v"(w));   /* keeps the loop from being folded */
    }
    double t = now() - t0;
    int keep = 0;
    for (int i = 0; i < 8; i++) keep += _mm512_reduce_add_epi32(s[i]);
    keep += (int)(_mm512_reduce_add_ps(acc[0]) + _mm512_reduce_add_ps(acc[1]));
    __asm__ volatile("" : : "r"(keep));
    return t / n * 1e9;
}

int main(void) {
    const long n = 50 * 1000 * 1000;
    double base = 0;
    for (int mode = 0; mode < N_MODES; mode++) {
        double best = 1e30;
        for (int r = 0; r < 3; r++) {
            double t = run(mode, n);
            if (t < best) best = t;
        }
        if (mode == DOTS_ONLY) base = best;
        printf("%-46s %6.3f ns per 8 dpbusd  dot throughput %.2f of dots alone\n", NAMES[mode], best, base / best);
    }
    return 0;
}
