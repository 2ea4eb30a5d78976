/* A decode step through every layer in one call: the per-layer ops in the order the model makes
 * them, without a return to Python between them. Each return cost ~0.2 ms: the kernels have
 * streamed tens of MB through the caches, and the interpreter's code and objects come back from
 * memory (Python's own work per token, 2 ms with warm caches, took 16 ms between real kernels).
 * The whole step is one parallel region: its ~15 phases a layer meet at lite_team barriers, where
 * separate regions cost a sleeping worker's wake-up each (~10-15 µs, ~200 a token). */
#include "internal.h"

/* Scratch: a [D], h [D], probs [E], weights [k], then one region the ops take in turn. */
typedef struct { int64_t a, h, probs, wts, region, total; } layers_layout;

static int plan(layers_layout *P, const lite_layer *layers, int64_t n_layer, int64_t dim, int64_t n_head,
                int64_t n_nope, int64_t r_dim, int64_t c_dim, int64_t v_dim, int64_t q_rank, int64_t k) {
    if (!layers) return LITE_ERR_NULL;
    if (n_layer <= 0 || dim <= 0 || k < 0 || k > LITE_LAYERS_MAX_K) return LITE_ERR_ARG;
    int64_t region = 0, max_exp = 1;
    for (int64_t i = 0; i < n_layer; i++) {
        const lite_layer *L = &layers[i];
        if (!L->attn_types || !L->types || !L->ffn) return LITE_ERR_NULL;
        if (L->n_exp < 0 || L->n_exp + 1 > MOE_MAX_ENTRIES || (L->router ? L->n_exp < k || L->n_exp == 0 : L->n_exp != 0) ||
            (!L->router && !L->has_always))
            return LITE_ERR_ARG;
        int64_t need, max_ffn = 1;
        int rc = lite_mla_step_scratch_bytes(&need, L->attn_types, 1, dim, n_head, n_nope, r_dim, c_dim, v_dim,
                                             q_rank);
        if (rc) return rc;
        if (need > region) region = need;
        if (L->router) {
            rc = lite_matmul_scratch_bytes(&need, L->router_type, 1, dim);
            if (rc) return rc;
            if (need > region) region = need;
            if (L->n_exp > max_exp) max_exp = L->n_exp;
        }
        for (int64_t e = 0; e < L->n_exp + (L->has_always != 0); e++)
            if (L->ffn[e] > max_ffn) max_ffn = L->ffn[e];
        rc = lite_moe_scratch_bytes(&need, 1, dim, L->router ? k : 0, max_ffn);
        if (rc) return rc;
        if (need > region) region = need;
    }
    P->a = 0;
    P->h = align64(dim * 4);
    P->probs = P->h + align64(dim * 4);
    P->wts = P->probs + align64(max_exp * 4);
    P->region = P->wts + align64(k * 4 + 4);
    P->total = P->region + region + 64;    /* + 64: alignment slack */
    return LITE_OK;
}

int lite_layers_scratch_bytes(int64_t *out, const lite_layer *layers, int64_t n_layer, int64_t dim, int64_t n_head,
                              int64_t n_nope, int64_t r_dim, int64_t c_dim, int64_t v_dim, int64_t q_rank,
                              int64_t k) {
    if (!out) return LITE_ERR_NULL;
    layers_layout P;
    int rc = plan(&P, layers, n_layer, dim, n_head, n_nope, r_dim, c_dim, v_dim, q_rank, k);
    if (!rc) *out = P.total;
    return rc;
}

int lite_layers(float *x, float *delta, int64_t dim, const lite_layer *layers, int64_t n_layer, int64_t n_head,
                int64_t n_nope, int64_t r_dim, int64_t c_dim, int64_t v_dim, int64_t q_rank, int64_t cache_rows,
                const float *cos_t, const float *sin_t, int64_t start, float scale, float eps, float norm_eps,
                int64_t k, int64_t n_group, int64_t topk_group, int renorm, float route_scale, int32_t *ids,
                uint8_t *scratch, int64_t scratch_bytes) {
    if (!x || !delta || !ids || !scratch) return LITE_ERR_NULL;
    layers_layout P;
    int rc = plan(&P, layers, n_layer, dim, n_head, n_nope, r_dim, c_dim, v_dim, q_rank, k);
    if (rc) return rc;
    if (scratch_bytes < P.total) return LITE_ERR_SIZE;
    uint8_t *base = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *a = (float *)(base + P.a), *h = (float *)(base + P.h), *probs = (float *)(base + P.probs);
    float *wts = (float *)(base + P.wts);
    uint8_t *region = base + P.region;
    const int64_t region_bytes = P.total - 64 - P.region;
    /* The table lite_moe gets, as the Python backend builds it: the always-on MLP first, then
     * the routed ids in order of first appearance; slot[j] indexes it. */
    const uint8_t *g[LITE_LAYERS_MAX_K + 1], *u[LITE_LAYERS_MAX_K + 1], *d[LITE_LAYERS_MAX_K + 1];
    int32_t types[3 * (LITE_LAYERS_MAX_K + 1)], slot[LITE_LAYERS_MAX_K], eid[LITE_LAYERS_MAX_K + 1];
    int64_t nbytes[3 * (LITE_LAYERS_MAX_K + 1)], ffn[LITE_LAYERS_MAX_K + 1];
    /* Each phase's plan is made (and checked) by the first thread and read by all after a
     * barrier; a failed check stops every thread at the same point. */
    lite_mla_call M;
    lite_products R;
    lite_moe_run E;
    lite_team team;
    lite_team_init(&team, 1);
    int nth = lite_num_threads();
#pragma omp parallel num_threads(nth) if (nth > 1)
    for (int64_t i = 0; i < n_layer; i++) {
        const lite_layer *L = &layers[i];
        int32_t *lid = ids + i * k;
#pragma omp master
        {
            M = (lite_mla_call){.out = a, .out_len = dim, .x = x, .delta = i ? delta : NULL, .norm = L->attn_norm,
                                .norm_eps = norm_eps, .n_tok = 1, .dim = dim, .w = L->attn_w, .w_bytes = L->attn_bytes,
                                .types = L->attn_types, .q_a_norm = L->q_a_norm, .kv_norm = L->kv_norm,
                                .n_head = n_head, .n_nope = n_nope, .r_dim = r_dim, .c_dim = c_dim, .v_dim = v_dim,
                                .q_rank = q_rank, .ckv = L->ckv, .kpe = L->kpe, .cache_rows = cache_rows,
                                .cos_t = cos_t, .sin_t = sin_t, .start = start, .scale = scale, .eps = eps,
                                .scratch = region, .scratch_bytes = region_bytes};
            rc = lite_mla_plan(&M);
        }
        lite_team_sync(&team);
        if (rc) break;
        lite_mla_decode_team(&M, &team);
#pragma omp master
        {
            rc = lite_add_rmsnorm_f32(h, x, a, L->ffn_norm, 1, dim, norm_eps);
            if (!rc && L->router)
                rc = lite_route_plan(&R, probs, h, dim, L->router, L->router_bytes, L->router_type, L->n_exp, k,
                                     n_group, topk_group, route_scale, region, region_bytes);
        }
        lite_team_sync(&team);
        if (rc) break;
        if (L->router) lite_products_team(&R, h, &team);
#pragma omp master
        {
            int64_t kl = 0;
            if (L->router) {
                rc = lite_route(lid, wts, probs, probs, 1, L->n_exp, k, n_group, topk_group, renorm, route_scale);
                kl = k;
            } else {
                for (int64_t j = 0; j < k; j++) lid[j] = -1;
            }
            int64_t n = 0;
            if (L->has_always) {
                g[0] = L->gate[L->n_exp], u[0] = L->up[L->n_exp], d[0] = L->down[L->n_exp];
                memcpy(types, L->types + 3 * L->n_exp, 3 * sizeof(int32_t));
                memcpy(nbytes, L->nbytes + 3 * L->n_exp, 3 * sizeof(int64_t));
                ffn[0] = L->ffn[L->n_exp];
                n = 1;
            }
            const int64_t first = n;
            for (int64_t j = 0; j < kl; j++) {
                int32_t e = lid[j];
                int64_t at = first;
                while (at < n && eid[at] != e) at++;   /* K is small: a scan beats a map */
                if (at == n) {
                    eid[n] = e;
                    g[n] = L->gate[e], u[n] = L->up[e], d[n] = L->down[e];
                    memcpy(types + 3 * n, L->types + 3 * e, 3 * sizeof(int32_t));
                    memcpy(nbytes + 3 * n, L->nbytes + 3 * e, 3 * sizeof(int64_t));
                    ffn[n++] = L->ffn[e];
                }
                slot[j] = (int32_t)at;
            }
            if (!rc)
                rc = lite_moe_plan(&E, delta, dim, h, 1, dim, kl ? slot : NULL, kl ? wts : NULL, kl, n, g, u, d, types,
                                   nbytes, ffn, L->has_always ? 0 : -1, region, region_bytes);
        }
        lite_team_sync(&team);
        if (rc) break;
        lite_moe_team(&E, &team);
    }
    return rc;
}
