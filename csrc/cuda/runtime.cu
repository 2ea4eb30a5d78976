/* Device, memory, stream and event management for liblite_cuda, and the error channel. The CUDA
 * runtime is linked statically and loads the driver (libcuda.so) on first use, so this library
 * opens on machines without a GPU; every entry point reports "no device" instead of crashing. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.cuh"

static thread_local char g_msg[512];
static thread_local int g_code;

void lc_clear(void) {
  g_msg[0] = 0;
  g_code = 0;
}

int lc_fail(int code, const char *where, const char *fmt, ...) {
  int n = snprintf(g_msg, sizeof g_msg, "%s: ", where);
  if (n < 0 || n >= (int)sizeof g_msg) n = 0;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_msg + n, sizeof g_msg - n, fmt, ap);
  va_end(ap);
  g_code = code;
  return code;
}

int lc_cuda_fail(cudaError_t e, const char *what, const char *file, int line) {
  int code = LITE_CUDA_ERR_CUDA;
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInitializationError
#if CUDART_VERSION >= 12000
      || e == cudaErrorCallRequiresNewerDriver
#endif
  )
    code = LITE_CUDA_ERR_NODEV;
  else if (e == cudaErrorMemoryAllocation)
    code = LITE_CUDA_ERR_NOMEM;
  const char *base = strrchr(file, '/');
  snprintf(g_msg, sizeof g_msg, "%s (%s) in %s at %s:%d", cudaGetErrorString(e), cudaGetErrorName(e),
           what, base ? base + 1 : file, line);
  g_code = code;
  cudaGetLastError(); /* clear a sticky-free error so the next call starts clean */
  return code;
}

LC_API int lite_cuda_abi_version(void) { return LITE_CUDA_ABI_VERSION; }

LC_API int lite_cuda_last_error(char *buf, int64_t n) {
  if (buf && n > 0) {
    strncpy(buf, g_msg, (size_t)n - 1);
    buf[n - 1] = 0;
  }
  return g_code;
}

/* ---- devices ---------------------------------------------------------------------------------- */
LC_API int lite_cuda_device_count(int *count) {
  lc_clear();
  LC_REQUIRE(count, LITE_CUDA_ERR_NULL, "count is NULL");
  *count = 0;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return lc_cuda_fail(e, "cudaGetDeviceCount", __FILE__, __LINE__);
  *count = n;
  if (n == 0) return lc_fail(LITE_CUDA_ERR_NODEV, __func__, "no CUDA device");
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_set_device(int device) {
  lc_clear();
  LC_CK(cudaSetDevice(device));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_get_device(int *device) {
  lc_clear();
  LC_REQUIRE(device, LITE_CUDA_ERR_NULL, "device is NULL");
  LC_CK(cudaGetDevice(device));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_device_props(char *name, int64_t name_len, int64_t *total_mem, int64_t *free_mem,
                                  int *cc_major, int *cc_minor, int *sm_count, int device) {
  lc_clear();
  cudaDeviceProp p;
  LC_CK(cudaGetDeviceProperties(&p, device));
  if (name && name_len > 0) {
    strncpy(name, p.name, (size_t)name_len - 1);
    name[name_len - 1] = 0;
  }
  if (total_mem) *total_mem = (int64_t)p.totalGlobalMem;
  if (cc_major) *cc_major = p.major;
  if (cc_minor) *cc_minor = p.minor;
  if (sm_count) *sm_count = p.multiProcessorCount;
  if (free_mem) {
    int cur = 0;
    LC_CK(cudaGetDevice(&cur));
    size_t fr = 0, tot = 0;
    if (cur != device) LC_CK(cudaSetDevice(device));
    cudaError_t e = cudaMemGetInfo(&fr, &tot);
    if (cur != device) cudaSetDevice(cur);
    if (e != cudaSuccess) return lc_cuda_fail(e, "cudaMemGetInfo", __FILE__, __LINE__);
    *free_mem = (int64_t)fr;
  }
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_device_sync(void) {
  lc_clear();
  LC_CK(cudaDeviceSynchronize());
  return LITE_CUDA_OK;
}

/* ---- memory --------------------------------------------------------------------------------- */
LC_API int lite_cuda_malloc(void **d_out, int64_t nbytes) {
  lc_clear();
  LC_REQUIRE(d_out, LITE_CUDA_ERR_NULL, "output pointer is NULL");
  *d_out = NULL;
  LC_REQUIRE(nbytes > 0, LITE_CUDA_ERR_ARG, "nbytes must be > 0, got %lld", (long long)nbytes);
  LC_CK(cudaMalloc(d_out, (size_t)nbytes));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_free(void *d_ptr) {
  lc_clear();
  if (d_ptr) LC_CK(cudaFree(d_ptr));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_memset(void *d_dst, int value, int64_t nbytes, void *stream) {
  lc_clear();
  LC_REQUIRE(nbytes >= 0, LITE_CUDA_ERR_ARG, "nbytes < 0");
  if (nbytes == 0) return LITE_CUDA_OK;
  LC_REQUIRE(d_dst, LITE_CUDA_ERR_NULL, "destination is NULL");
  LC_CK(cudaMemsetAsync(d_dst, value, (size_t)nbytes, lc_stream(stream)));
  return LITE_CUDA_OK;
}

static int copy(void *dst, const void *src, int64_t nbytes, cudaMemcpyKind kind, int async, void *stream) {
  lc_clear();
  LC_REQUIRE(nbytes >= 0, LITE_CUDA_ERR_ARG, "nbytes < 0");
  if (nbytes == 0) return LITE_CUDA_OK;
  LC_REQUIRE(dst && src, LITE_CUDA_ERR_NULL, "source or destination is NULL");
  if (async)
    LC_CK(cudaMemcpyAsync(dst, src, (size_t)nbytes, kind, lc_stream(stream)));
  else
    LC_CK(cudaMemcpy(dst, src, (size_t)nbytes, kind));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_memcpy_h2d(void *d_dst, const void *h_src, int64_t nbytes) {
  return copy(d_dst, h_src, nbytes, cudaMemcpyHostToDevice, 0, NULL);
}
LC_API int lite_cuda_memcpy_d2h(void *h_dst, const void *d_src, int64_t nbytes) {
  return copy(h_dst, d_src, nbytes, cudaMemcpyDeviceToHost, 0, NULL);
}
LC_API int lite_cuda_memcpy_d2d(void *d_dst, const void *d_src, int64_t nbytes, void *stream) {
  return copy(d_dst, d_src, nbytes, cudaMemcpyDeviceToDevice, 1, stream);
}
LC_API int lite_cuda_memcpy_h2d_async(void *d_dst, const void *h_src, int64_t nbytes, void *stream) {
  return copy(d_dst, h_src, nbytes, cudaMemcpyHostToDevice, 1, stream);
}
LC_API int lite_cuda_memcpy_d2h_async(void *h_dst, const void *d_src, int64_t nbytes, void *stream) {
  return copy(h_dst, d_src, nbytes, cudaMemcpyDeviceToHost, 1, stream);
}

LC_API int lite_cuda_host_alloc(void **h_out, int64_t nbytes) {
  lc_clear();
  LC_REQUIRE(h_out, LITE_CUDA_ERR_NULL, "output pointer is NULL");
  *h_out = NULL;
  LC_REQUIRE(nbytes > 0, LITE_CUDA_ERR_ARG, "nbytes must be > 0");
  LC_CK(cudaHostAlloc(h_out, (size_t)nbytes, cudaHostAllocDefault));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_host_free(void *h_ptr) {
  lc_clear();
  if (h_ptr) LC_CK(cudaFreeHost(h_ptr));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_host_register(void *h_ptr, int64_t nbytes) {
  lc_clear();
  LC_REQUIRE(h_ptr, LITE_CUDA_ERR_NULL, "pointer is NULL");
  LC_REQUIRE(nbytes > 0, LITE_CUDA_ERR_ARG, "nbytes must be > 0");
  LC_CK(cudaHostRegister(h_ptr, (size_t)nbytes, cudaHostRegisterDefault));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_host_unregister(void *h_ptr) {
  lc_clear();
  LC_REQUIRE(h_ptr, LITE_CUDA_ERR_NULL, "pointer is NULL");
  LC_CK(cudaHostUnregister(h_ptr));
  return LITE_CUDA_OK;
}

/* ---- streams and events --------------------------------------------------------------------- */
LC_API int lite_cuda_stream_create(void **out) {
  lc_clear();
  LC_REQUIRE(out, LITE_CUDA_ERR_NULL, "output pointer is NULL");
  cudaStream_t s;
  LC_CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  *out = (void *)s;
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_stream_destroy(void *stream) {
  lc_clear();
  if (stream) LC_CK(cudaStreamDestroy(lc_stream(stream)));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_stream_sync(void *stream) {
  lc_clear();
  LC_CK(cudaStreamSynchronize(lc_stream(stream)));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_event_create(void **out) {
  lc_clear();
  LC_REQUIRE(out, LITE_CUDA_ERR_NULL, "output pointer is NULL");
  cudaEvent_t e;
  LC_CK(cudaEventCreate(&e));
  *out = (void *)e;
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_event_destroy(void *event) {
  lc_clear();
  if (event) LC_CK(cudaEventDestroy((cudaEvent_t)event));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_event_record(void *event, void *stream) {
  lc_clear();
  LC_REQUIRE(event, LITE_CUDA_ERR_NULL, "event is NULL");
  LC_CK(cudaEventRecord((cudaEvent_t)event, lc_stream(stream)));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_stream_wait_event(void *stream, void *event) {
  lc_clear();
  LC_REQUIRE(event, LITE_CUDA_ERR_NULL, "event is NULL");
  LC_CK(cudaStreamWaitEvent(lc_stream(stream), (cudaEvent_t)event, 0));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_event_sync(void *event) {
  lc_clear();
  LC_REQUIRE(event, LITE_CUDA_ERR_NULL, "event is NULL");
  LC_CK(cudaEventSynchronize((cudaEvent_t)event));
  return LITE_CUDA_OK;
}

LC_API int lite_cuda_event_elapsed(float *ms, void *start, void *end) {
  lc_clear();
  LC_REQUIRE(ms && start && end, LITE_CUDA_ERR_NULL, "NULL argument");
  LC_CK(cudaEventElapsedTime(ms, (cudaEvent_t)start, (cudaEvent_t)end));
  return LITE_CUDA_OK;
}
