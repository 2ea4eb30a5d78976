#include <math.h>
#include <stdint.h>
#include "lite.h"

int lite_abi_version(void) { return LITE_ABI_VERSION; }

int lite_rmsnorm_f32(float *out, const float *x, const float *w, int64_t n_rows, int64_t dim, float eps) {
    if (!out || !x || !w || n_rows < 0 || dim <= 0) return LITE_ERR_ARG;
    for (int64_t t = 0; t < n_rows; t++) {
        const float *xr = x + t * dim;
        float *yr = out + t * dim;
        double ss = 0.0;
        for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = 1.0f / sqrtf((float)(ss / (double)dim) + eps);
        for (int64_t i = 0; i < dim; i++) yr[i] = w[i] * (xr[i] * inv);
    }
    return LITE_OK;
}
