/* AVX-512 (F/BW/VL + VNNI) kernels. Entries left unset keep the AVX2 kernels. */
#include <immintrin.h>
#include "internal.h"

void lite_kernels_avx512(kernel_table *t) { (void)t; }
