/* lite C ABI: the one header cffi reads (ABI mode), so it holds only plain declarations.
 * Conventions: `lite_` prefix, outputs first, sizes as int64_t, an int status return
 * (0 = ok, negative = error, see lite_status_*), no allocation inside kernels. */

#define LITE_ABI_VERSION 1

#define LITE_OK 0
#define LITE_ERR_ARG -1      /* a size, stride or offset is invalid */
#define LITE_ERR_TYPE -2     /* unsupported block type */

int lite_abi_version(void);

/* out[t, i] = w[i] * x[t, i] / sqrt(mean_i(x[t, :]^2) + eps) for t < n_rows, i < dim */
int lite_rmsnorm_f32(float *out, const float *x, const float *w, int64_t n_rows, int64_t dim, float eps);
