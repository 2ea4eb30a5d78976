/* Shared by the CUDA translation units: error recording and the CHECK macros. */
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "lite_cuda.h"
}

#define LC_API extern "C" __attribute__((visibility("default")))

/* Record a failure (per thread) and return its code. */
int lc_fail(int code, const char *where, const char *fmt, ...);
/* Turn a CUDA error into LITE_CUDA_ERR_CUDA / _NODEV / _NOMEM with the runtime's message. */
int lc_cuda_fail(cudaError_t e, const char *what, const char *file, int line);
/* Reset the per-thread error state at the start of a call. */
void lc_clear(void);

#define LC_CK(call)                                                            \
  do {                                                                         \
    cudaError_t lc_e_ = (call);                                                \
    if (lc_e_ != cudaSuccess) return lc_cuda_fail(lc_e_, #call, __FILE__, __LINE__); \
  } while (0)

/* After a kernel launch: launch-configuration errors surface here (execution errors later). */
#define LC_LAUNCHED(name) LC_CK(cudaPeekAtLastError())

#define LC_REQUIRE(cond, code, ...)                                            \
  do {                                                                         \
    if (!(cond)) return lc_fail((code), __func__, __VA_ARGS__);                \
  } while (0)

static inline cudaStream_t lc_stream(void *s) { return (cudaStream_t)s; }
