/* Activation quantization to 8-bit blocks: the scalar definition (bit-exact with gguf.quants
 * Q8_0: d = amax/127, q = roundf(x/d) via the reciprocal) and the public block writers. */
#include "internal.h"

static inline float quant_block(int8_t *q, const float *x, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    float d = amax / 127.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < n; i++) q[i] = (int8_t)roundf(x[i] * id);
    return d;
}

void lite_quant_a8_scalar(uint8_t *a, int64_t astride, const float *x, int64_t n_rows, int64_t cols) {
    int64_t nb = cols / QK;
    for (int64_t t = 0; t < n_rows; t++) {
        int8_t *qs = (int8_t *)(a + t * astride);
        float *d = (float *)(a + t * astride + nb * QK);
        const float *xr = x + t * cols;
        for (int64_t b = 0; b < nb; b++)
            d[b] = f16_to_f32(f32_to_f16(quant_block(qs + b * QK, xr + b * QK, QK)));
        a8_fill_sums(a + t * astride, nb);
    }
}

void lite_quant_a8k_scalar(uint8_t *a, int64_t astride, const float *x, int64_t n_rows, int64_t cols) {
    int64_t nb = cols / QKK;
    for (int64_t t = 0; t < n_rows; t++) {
        int8_t *qs = (int8_t *)(a + t * astride);
        int16_t *bs = (int16_t *)(a + t * astride + nb * QKK);
        float *d = (float *)(a + t * astride + nb * (QKK + 32));
        const float *xr = x + t * cols;
        for (int64_t b = 0; b < nb; b++) {
            d[b] = quant_block(qs + b * QKK, xr + b * QKK, QKK);
            for (int g = 0; g < 16; g++) {
                int s = 0;
                for (int i = 0; i < 16; i++) s += qs[b * QKK + g * 16 + i];
                bs[b * 16 + g] = (int16_t)s;
            }
        }
    }
}

static int check_q(uint8_t *out, int64_t out_bytes, const float *x, int64_t n_rows, int64_t cols,
                   int64_t blk, int64_t bytes) {
    if (!out || !x) return LITE_ERR_NULL;
    if (n_rows < 0 || cols <= 0 || out_bytes < 0) return LITE_ERR_ARG;
    if (cols % blk) return LITE_ERR_BLOCK;
    if (n_rows > INT64_MAX / cols || out_bytes / bytes < n_rows * (cols / blk)) return LITE_ERR_SIZE;
    return LITE_OK;
}

/* The public writers run the active ISA's quantizer on chunks of CHUNK columns through a stack
 * buffer, so every ISA's quantizer is testable bit for bit against the ggml layout. */
#define CHUNK 1024

int lite_quantize_q8_0(uint8_t *out, int64_t out_bytes, const float *x, int64_t n_rows, int64_t cols) {
    int rc = check_q(out, out_bytes, x, n_rows, cols, QK, Q8_0_BYTES);
    if (rc) return rc;
    const kernel_table *kt = lite_active_kernels();
    _Alignas(64) uint8_t buf[CHUNK + CHUNK / QK * 8 + 64];
    for (int64_t r = 0; r < n_rows; r++) {
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            int64_t n = cols - c0 < CHUNK ? cols - c0 : CHUNK, nb = n / QK;
            kt->quant_a8(buf, sizeof buf, x + r * cols + c0, 1, n);
            const float *d = (const float *)(buf + nb * QK);
            uint8_t *o = out + (r * cols + c0) / QK * Q8_0_BYTES;
            for (int64_t b = 0; b < nb; b++) {
                uint16_t h = f32_to_f16(d[b]);
                memcpy(o + b * Q8_0_BYTES, &h, 2);
                memcpy(o + b * Q8_0_BYTES + 2, buf + b * QK, QK);
            }
        }
    }
    return LITE_OK;
}

int lite_quantize_q8_k(uint8_t *out, int64_t out_bytes, const float *x, int64_t n_rows, int64_t cols) {
    int rc = check_q(out, out_bytes, x, n_rows, cols, QKK, Q8_K_BYTES);
    if (rc) return rc;
    const kernel_table *kt = lite_active_kernels();
    _Alignas(64) uint8_t buf[CHUNK + CHUNK / QKK * 36 + 64];
    for (int64_t r = 0; r < n_rows; r++) {
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            int64_t n = cols - c0 < CHUNK ? cols - c0 : CHUNK, nb = n / QKK;
            kt->quant_a8k(buf, sizeof buf, x + r * cols + c0, 1, n);
            const int16_t *bs = (const int16_t *)(buf + nb * QKK);
            const float *d = (const float *)(buf + nb * (QKK + 32));
            uint8_t *o = out + (r * cols + c0) / QKK * Q8_K_BYTES;
            for (int64_t b = 0; b < nb; b++) {
                memcpy(o + b * Q8_K_BYTES, &d[b], 4);
                memcpy(o + b * Q8_K_BYTES + 4, buf + b * QKK, QKK);
                memcpy(o + b * Q8_K_BYTES + 4 + QKK, bs + b * 16, 32);
            }
        }
    }
    return LITE_OK;
}
