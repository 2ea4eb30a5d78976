/* Library state: ABI version, ISA dispatch (scalar / AVX2 / AVX-512), prefetch target, thread count,
 * type table. */
#include "internal.h"
#ifdef _OPENMP
#include <omp.h>
#endif

int lite_abi_version(void) { return LITE_ABI_VERSION; }

static kernel_table g_tables[4];
static int g_ready = 0;
static int g_isa = -1;
static int g_threads = 1;
int lite_prefetch_l2 = 0;

static int cpu_isa(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#ifdef LITE_HAVE_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
#ifdef LITE_HAVE_AVX512VBMI
        if (__builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni")) return LITE_ISA_AVX512_VBMI;
#endif
        return LITE_ISA_AVX512;
    }
#endif
#ifdef LITE_HAVE_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return LITE_ISA_AVX2;  /* every AVX2 CPU also has F16C */
#endif
#endif
    return LITE_ISA_SCALAR;
}

static void init(void) {
    if (g_ready) return;
    lite_kernels_scalar(&g_tables[0]);
    g_tables[1] = g_tables[0];
#ifdef LITE_HAVE_AVX2
    lite_kernels_avx2(&g_tables[1]);
#endif
    g_tables[2] = g_tables[1];
#ifdef LITE_HAVE_AVX512
    lite_kernels_avx512(&g_tables[2]);
#endif
    g_tables[3] = g_tables[1];
#ifdef LITE_HAVE_AVX512VBMI
    lite_kernels_avx512_vbmi(&g_tables[3]);
#endif
    g_isa = cpu_isa();
#if defined(__x86_64__) || defined(__i386__)
    lite_prefetch_l2 = __builtin_cpu_is("amd");
#endif
#ifdef _OPENMP
    g_threads = omp_get_max_threads();
#endif
    g_ready = 1;
}

int lite_cpu_isa(void) { init(); return cpu_isa(); }
int lite_get_isa(void) { init(); return g_isa; }

int lite_set_isa(int level) {
    init();
    if (level < LITE_ISA_SCALAR || level > LITE_ISA_AVX512_VBMI) return LITE_ERR_ARG;
    if (level > cpu_isa()) return LITE_ERR_ISA;
    g_isa = level;
    return LITE_OK;
}

int lite_get_prefetch(void) { init(); return lite_prefetch_l2 ? LITE_PREFETCH_L2 : LITE_PREFETCH_L1; }

int lite_set_prefetch(int target) {
    init();
    if (target != LITE_PREFETCH_L1 && target != LITE_PREFETCH_L2) return LITE_ERR_ARG;
    lite_prefetch_l2 = target == LITE_PREFETCH_L2;
    return LITE_OK;
}

const kernel_table *lite_active_kernels(void) { init(); return &g_tables[g_isa]; }

int lite_set_threads(int n) {
    init();
    if (n < 1 || n > 1024) return LITE_ERR_ARG;
    g_threads = n;
    return LITE_OK;
}

int lite_get_threads(void) { init(); return g_threads; }
int lite_num_threads(void) { init(); return g_threads; }

int lite_kind_of(int type) {
    switch (type) {
    case LITE_TYPE_Q4_0: return K_Q4_0;
    case LITE_TYPE_Q8_0: return K_Q8_0;
    case LITE_TYPE_Q4_K: return K_Q4_K;
    case LITE_TYPE_Q6_K: return K_Q6_K;
    case LITE_TYPE_F32: return K_F32;
    case LITE_TYPE_F16: return K_F16;
    case LITE_TYPE_BF16: return K_BF16;
    default: return -1;
    }
}

int64_t lite_row_bytes_of(int type, int64_t cols) {
    int64_t blk, sz;
    switch (type) {
    case LITE_TYPE_Q4_0: blk = QK; sz = Q4_0_BYTES; break;
    case LITE_TYPE_Q8_0: blk = QK; sz = Q8_0_BYTES; break;
    case LITE_TYPE_Q4_K: blk = QKK; sz = Q4_K_BYTES; break;
    case LITE_TYPE_Q6_K: blk = QKK; sz = Q6_K_BYTES; break;
    case LITE_TYPE_F32: blk = 1; sz = 4; break;
    case LITE_TYPE_F16: case LITE_TYPE_BF16: blk = 1; sz = 2; break;
    default: return -1;
    }
    if (cols <= 0 || cols % blk) return -1;
    return cols / blk * sz;
}

int lite_row_bytes(int64_t *out, int type, int64_t cols) {
    if (!out) return LITE_ERR_NULL;
    if (lite_kind_of(type) < 0) return LITE_ERR_TYPE;
    if (cols <= 0) return LITE_ERR_ARG;
    int64_t rb = lite_row_bytes_of(type, cols);
    if (rb < 0) return LITE_ERR_BLOCK;
    *out = rb;
    return LITE_OK;
}
