/* Fused ops for the decode step: each replaces a run of small calls, and the numpy work between
 * them, with one call (Python's cost per call is large next to a T=1 row op). Each computes
 * exactly what the separate ops compute — by calling them, or by the same float operations in
 * the same order — so results are bit-identical with the unfused path. */
#include "internal.h"

#define ROUTE_MAX_EXPERTS 1024

int lite_add_rmsnorm_f32(float *out, float *x, const float *delta, const float *w, int64_t n_rows, int64_t dim,
                         float eps) {
    if (!out || !x || !w) return LITE_ERR_NULL;
    if (n_rows < 0 || dim <= 0 || !(eps >= 0.0f)) return LITE_ERR_ARG;
    if (delta)
        for (int64_t i = 0; i < n_rows * dim; i++) x[i] += delta[i];
    return lite_rmsnorm_f32(out, x, w, n_rows, dim, eps);
}

/* numpy's float32 add.reduce of a contiguous row (identity 0 plus its pairwise summation:
 * sequential below 8 terms, else 8 accumulators per block of up to 128, halves above). */
static float pairwise_sum(const float *a, int64_t n) {
    if (n < 8) {
        float r = 0.0f;
        for (int64_t i = 0; i < n; i++) r += a[i];
        return r;
    }
    if (n <= 128) {
        float r[8];
        int64_t i;
        for (int j = 0; j < 8; j++) r[j] = a[j];
        for (i = 8; i < n - n % 8; i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* The k best of s[0..n) not yet taken, best first, into ids (marking them taken): numpy's stable
 * argsort of -s — descending, ties to the lower index, NaN after every number. */
static void pick(int32_t *ids, uint8_t *taken, const float *s, int64_t n, int64_t k) {
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t i = 0; i < n; i++) {
            if (taken[i]) continue;
            if (best < 0 || (isnan(s[best]) && !isnan(s[i])) || s[i] > s[best]) best = i;
        }
        taken[best] = 1;
        ids[j] = (int32_t)best;
    }
}

/* One token's routing from its probabilities p[n_exp] (see lite.h, lite_route). */
static void route_row(int32_t *ids, float *wt, const float *p, int64_t n_exp, int64_t k, int64_t n_group,
                      int64_t topk_group, int norm, float scale) {
    float s[ROUTE_MAX_EXPERTS];
    uint8_t taken[ROUTE_MAX_EXPERTS];
    memcpy(s, p, sizeof(float) * n_exp);
    if (n_group > 1) {
        /* Group-limited: experts outside the best topk_group groups (a group scored by its best
         * expert, NaN propagating like numpy's max) score 0. */
        int64_t per = n_exp / n_group;
        float gs[ROUTE_MAX_EXPERTS];
        int32_t keep[ROUTE_MAX_EXPERTS];
        for (int64_t g = 0; g < n_group; g++) {
            float m = p[g * per];
            for (int64_t i = 1; i < per; i++) {
                float v = p[g * per + i];
                if (isnan(v) || v > m) m = isnan(m) ? m : v;
            }
            gs[g] = m;
        }
        memset(taken, 0, (size_t)n_group);
        pick(keep, taken, gs, n_group, topk_group);
        for (int64_t g = 0; g < n_group; g++)
            if (!taken[g])
                for (int64_t i = 0; i < per; i++) s[g * per + i] = 0.0f;
    }
    memset(taken, 0, (size_t)n_exp);
    pick(ids, taken, s, n_exp, k);
    float w[ROUTE_MAX_EXPERTS];
    for (int64_t j = 0; j < k; j++) w[j] = p[ids[j]];
    if (norm && k > 1) {
        float den = pairwise_sum(w, k) + 1e-20f;
        for (int64_t j = 0; j < k; j++) w[j] = w[j] / den;
    }
    for (int64_t j = 0; j < k; j++) wt[j] = w[j] * scale;
}

static int route_args_ok(int64_t n_exp, int64_t k, int64_t n_group, int64_t topk_group, float scale) {
    return n_exp > 0 && n_exp <= ROUTE_MAX_EXPERTS && k >= 0 && k <= n_exp && n_group > 0 && n_exp % n_group == 0 &&
           topk_group > 0 && topk_group <= n_group && isfinite(scale);
}

int lite_route(int32_t *ids, float *weights, float *probs, const float *logits, int64_t n_tok, int64_t n_exp,
               int64_t k, int64_t n_group, int64_t topk_group, int norm, float scale) {
    if (!ids || !weights || !probs || !logits) return LITE_ERR_NULL;
    if (n_tok < 0 || !route_args_ok(n_exp, k, n_group, topk_group, scale)) return LITE_ERR_ARG;
    if (n_tok == 0) return LITE_OK;
    int rc = lite_softmax_f32(probs, logits, n_tok, n_exp);
    if (rc) return rc;
    for (int64_t t = 0; t < n_tok; t++)
        route_row(ids + t * k, weights + t * k, probs + t * n_exp, n_exp, k, n_group, topk_group, norm, scale);
    return LITE_OK;
}

int lite_mla_prep(float *q_nope, float *q_pe, float *ckv, float *kpe, int64_t cache_rows, const float *q,
                  const float *kv, const float *norm_w, const float *cos_t, const float *sin_t, int64_t n_tok,
                  int64_t n_head, int64_t n_nope, int64_t c_dim, int64_t r_dim, int64_t start, float eps) {
    if (!q_nope || !q_pe || !ckv || !kpe || !q || !kv || !norm_w || !cos_t || !sin_t) return LITE_ERR_NULL;
    if (n_tok < 0 || n_head <= 0 || n_nope < 0 || c_dim <= 0 || r_dim <= 0 || r_dim % 2 || start < 0 ||
        !(eps >= 0.0f))
        return LITE_ERR_ARG;
    if (cache_rows < start + n_tok) return LITE_ERR_SIZE;
    const int64_t qw = n_nope + r_dim, half = r_dim / 2;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < n_head; h++) {
            const float *qr = q + (t * n_head + h) * qw;
            memcpy(q_nope + (t * n_head + h) * n_nope, qr, sizeof(float) * n_nope);
            rope_pairs(q_pe + (t * n_head + h) * r_dim, qr + n_nope, c, s, half);
        }
        const float *kr = kv + t * (c_dim + r_dim);
        int rc = lite_rmsnorm_f32(ckv + (start + t) * c_dim, kr, norm_w, 1, c_dim, eps);
        if (rc) return rc;
        rope_pairs(kpe + (start + t) * r_dim, kr + c_dim, c, s, half);
    }
    return LITE_OK;
}

/* ---- a whole attention sublayer ------------------------------------------------------------------ */

/* The weights of lite_mla_step, in order: q (or q_a), q_b, kv_a, k_b, v_b, out. */
enum { MW_Q, MW_QB, MW_KVA, MW_KB, MW_VB, MW_OUT, MW_COUNT };

typedef struct { int64_t h, q_a, q_an, q, kv, q_nope, q_pe, q_lat, o_lat, o, act, total; } mla_layout;

/* Scratch regions (64-byte aligned): each intermediate, then the largest activation scratch of the
 * step's matmuls. Fails on a bad type or shape (codes as lite_matmul_scratch_bytes). */
static int mla_plan(mla_layout *L, const int32_t *types, int64_t n_tok, int64_t dim, int64_t n_head, int64_t n_nope,
                    int64_t r_dim, int64_t c_dim, int64_t v_dim, int64_t q_rank) {
    if (n_tok < 0 || dim <= 0 || n_head <= 0 || n_nope <= 0 || r_dim <= 0 || r_dim % 2 || c_dim <= 0 ||
        c_dim > MLA_MAX_C || v_dim <= 0 || q_rank < 0 || n_tok > (1 << 24) || n_head > (1 << 16) ||
        dim > (1 << 20) || n_nope > (1 << 16) || r_dim > (1 << 16) || v_dim > (1 << 16) || q_rank > (1 << 20))
        return LITE_ERR_ARG;
    const int64_t hq = n_head * (n_nope + r_dim);
    int64_t need[MW_COUNT] = {0};
    int rc = lite_matmul_scratch_bytes(&need[MW_Q], types[MW_Q], n_tok, dim);
    if (!rc && q_rank) rc = lite_matmul_scratch_bytes(&need[MW_QB], types[MW_QB], n_tok, q_rank);
    if (!rc) rc = lite_matmul_scratch_bytes(&need[MW_KVA], types[MW_KVA], n_tok, dim);
    if (!rc) rc = lite_matmul_heads_scratch_bytes(&need[MW_KB], types[MW_KB], n_tok, n_head, n_nope);
    if (!rc) rc = lite_matmul_heads_scratch_bytes(&need[MW_VB], types[MW_VB], n_tok, n_head, c_dim);
    if (!rc) rc = lite_matmul_scratch_bytes(&need[MW_OUT], types[MW_OUT], n_tok, n_head * v_dim);
    if (rc) return rc;
    int64_t act = n_tok == 1 ? need[MW_KB] + need[MW_VB] : 0;   /* both at once in heads_team */
    for (int i = 0; i < MW_COUNT; i++) act = need[i] > act ? need[i] : act;
    L->h = 0;
    L->q_a = L->h + align64(4 * n_tok * dim);
    L->q_an = L->q_a + align64(4 * n_tok * q_rank);
    L->q = L->q_an + align64(4 * n_tok * q_rank);
    L->kv = L->q + align64(4 * n_tok * hq);
    L->q_nope = L->kv + align64(4 * n_tok * (c_dim + r_dim));
    L->q_pe = L->q_nope + align64(4 * n_tok * n_head * n_nope);
    L->q_lat = L->q_pe + align64(4 * n_tok * n_head * r_dim);
    L->o_lat = L->q_lat + align64(4 * n_tok * n_head * c_dim);
    L->o = L->o_lat + align64(4 * n_tok * n_head * c_dim);
    L->act = L->o + align64(4 * n_tok * n_head * v_dim);
    L->total = L->act + act + 64;                     /* + 64: alignment slack */
    return LITE_OK;
}

int lite_mla_step_scratch_bytes(int64_t *out, const int32_t *types, int64_t n_tok, int64_t dim, int64_t n_head,
                                int64_t n_nope, int64_t r_dim, int64_t c_dim, int64_t v_dim, int64_t q_rank) {
    if (!out || !types) return LITE_ERR_NULL;
    mla_layout L;
    int rc = mla_plan(&L, types, n_tok, dim, n_head, n_nope, r_dim, c_dim, v_dim, q_rank);
    if (!rc) *out = L.total;
    return rc;
}

/* Head h's product for one token as lite_matmul_heads computes it: its activation row quantized
 * into act (float weights read x itself), then its product items. */
static void head_product(float *out, const float *x, const uint8_t *w, int64_t rb, int64_t n_rows, int kind,
                         int64_t cols, uint8_t *act) {
    const uint8_t *a = (const uint8_t *)x;
    if (lite_is_quant(kind)) {
        lite_quant_of(kind)(act, lite_act_stride(kind, cols), x, 1, cols);
        a = act;
    }
    int64_t n_items = lite_product_items(kind, n_rows, 1, cols);
    for (int64_t it = 0; it < n_items; it++) lite_product_item(out, 0, w, rb, n_rows, kind, a, 0, 1, cols, it, NULL);
}

int lite_mla_plan(lite_mla_call *M) {
    if (!M->out || !M->x || !M->norm || !M->w || !M->w_bytes || !M->types || !M->kv_norm || !M->ckv || !M->kpe ||
        !M->cos_t || !M->sin_t || !M->scratch)
        return LITE_ERR_NULL;
    if (M->q_rank && (!M->q_a_norm || !M->w[MW_QB])) return LITE_ERR_NULL;
    const int64_t n_tok = M->n_tok, n_head = M->n_head, n_nope = M->n_nope, r_dim = M->r_dim, c_dim = M->c_dim;
    const int64_t v_dim = M->v_dim, q_rank = M->q_rank, dim = M->dim;
    mla_layout L;
    int rc = mla_plan(&L, M->types, n_tok, dim, n_head, n_nope, r_dim, c_dim, v_dim, q_rank);
    if (rc) return rc;
    if (M->out_len < 0 || M->start < 0 || !(M->eps >= 0.0f) || !(M->norm_eps >= 0.0f) || !isfinite(M->scale))
        return LITE_ERR_ARG;
    if (M->scratch_bytes < L.total || (n_tok && M->out_len / n_tok < dim) || M->cache_rows < M->start + n_tok)
        return LITE_ERR_SIZE;
    uint8_t *base = (uint8_t *)(((uintptr_t)M->scratch + 63) & ~(uintptr_t)63);
    M->h = (float *)(base + L.h), M->q_a = (float *)(base + L.q_a), M->q_an = (float *)(base + L.q_an);
    M->q = (float *)(base + L.q), M->kv = (float *)(base + L.kv), M->q_nope = (float *)(base + L.q_nope);
    M->q_pe = (float *)(base + L.q_pe), M->q_lat = (float *)(base + L.q_lat), M->o_lat = (float *)(base + L.o_lat);
    M->o = (float *)(base + L.o), M->act = base + L.act, M->act_bytes = L.total - 64 - L.act;
    /* The products, as lite_mla_decode_team (one token) or lite_mla_step (several) runs them. */
    const int64_t hq = n_head * (n_nope + r_dim), an = M->act_bytes;
    const uint8_t *const *w = M->w;
    const int64_t *wb = M->w_bytes;
    const int32_t *ty = M->types;
    {   /* q (or q_a) and kv_a read the same h */
        float *const o2[2] = {q_rank ? M->q_a : M->q, M->kv};
        const int64_t rows2[2] = {q_rank ? q_rank : hq, c_dim + r_dim};
        const int64_t len2[2] = {n_tok * rows2[0], n_tok * rows2[1]};
        const uint8_t *const w2[2] = {w[MW_Q], w[MW_KVA]};
        const int64_t b2[2] = {wb[MW_Q], wb[MW_KVA]};
        const int32_t t2[2] = {ty[MW_Q], ty[MW_KVA]};
        rc = lite_products_plan_split(M->first, &M->n_first, 2, o2, len2, M->h, n_tok, dim, w2, b2, t2, rows2, M->act,
                                      an);
        if (rc) return rc;
    }
    if (q_rank) {
        const int64_t lqb = n_tok * hq;
        rc = lite_products_plan(&M->qb, 1, &M->q, &lqb, M->q_an, n_tok, q_rank, &w[MW_QB], &wb[MW_QB], &ty[MW_QB],
                                &hq, M->act, an);
        if (rc) return rc;
    }
    rc = lite_products_plan(&M->out_p, 1, &M->out, &M->out_len, M->o, n_tok, n_head * v_dim, &w[MW_OUT], &wb[MW_OUT],
                            &ty[MW_OUT], &M->dim, M->act, an);
    if (rc || n_tok != 1) return rc;
    /* One token: the heads as lite_mla_decode_team runs them. */
    M->kk = lite_kind_of(ty[MW_KB]), M->kvk = lite_kind_of(ty[MW_VB]);
    if (M->kk < 0 || M->kvk < 0) return LITE_ERR_TYPE;
    M->rbk = lite_row_bytes_of(ty[MW_KB], n_nope), M->rbv = lite_row_bytes_of(ty[MW_VB], c_dim);
    if (M->rbk < 0 || M->rbv < 0) return LITE_ERR_BLOCK;
    if (wb[MW_KB] / M->rbk / n_head < c_dim || wb[MW_VB] / M->rbv / n_head < v_dim) return LITE_ERR_SIZE;
    M->sk = lite_is_quant(M->kk) ? lite_act_stride(M->kk, n_nope) : 0;
    M->sv = lite_is_quant(M->kvk) ? lite_act_stride(M->kvk, c_dim) : 0;
    if (an / n_head < M->sk + M->sv) return LITE_ERR_SIZE;
    M->hg = lite_mla_head_group(n_head, 1, lite_num_threads());
    return LITE_OK;
}

/* One token's k_b product, attention and v_b product: every step of a head needs only that
 * head's results, so each thread takes whole head groups (those of lite_mla_attention) through
 * all three. The same kernels on the same rows as the separate calls. */
static void heads_team(const lite_mla_call *M) {
    const int64_t n_head = M->n_head, n_nope = M->n_nope, c_dim = M->c_dim, v_dim = M->v_dim, hg = M->hg;
    const int64_t n_grp = (n_head + hg - 1) / hg;
    mla_fn f = lite_active_kernels()->mla;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t g = 0; g < n_grp; g++) {
        int64_t h0 = g * hg, h1 = h0 + hg < n_head ? h0 + hg : n_head;
        for (int64_t h = h0; h < h1; h++)
            head_product(M->q_lat + h * c_dim, M->q_nope + h * n_nope, M->w[MW_KB] + h * c_dim * M->rbk, M->rbk,
                         c_dim, M->kk, n_nope, M->act + h * M->sk);
        f(M->o_lat + h0 * c_dim, M->q_lat + h0 * c_dim, M->q_pe + h0 * M->r_dim, M->ckv, M->kpe, M->start + 1,
          (int)(h1 - h0), c_dim, M->r_dim, M->scale);
        for (int64_t h = h0; h < h1; h++)
            head_product(M->o + h * v_dim, M->o_lat + h * c_dim, M->w[MW_VB] + h * v_dim * M->rbv, M->rbv, v_dim,
                         M->kvk, c_dim, M->act + n_head * M->sk + h * M->sv);
    }
}

void lite_mla_decode_team(const lite_mla_call *M, lite_team *t) {
#pragma omp master
    (void)lite_add_rmsnorm_f32(M->h, M->x, M->delta, M->norm, 1, M->dim, M->norm_eps);
    for (int i = 0; i < M->n_first; i++) lite_products_team(&M->first[i], M->h, t);
    if (M->q_rank) {
#pragma omp master
        (void)lite_rmsnorm_f32(M->q_an, M->q_a, M->q_a_norm, 1, M->q_rank, M->eps);
        lite_products_team(&M->qb, M->q_an, t);
    }
#pragma omp master
    (void)lite_mla_prep(M->q_nope, M->q_pe, M->ckv, M->kpe, M->cache_rows, M->q, M->kv, M->kv_norm, M->cos_t,
                        M->sin_t, 1, M->n_head, M->n_nope, M->c_dim, M->r_dim, M->start, M->eps);
    lite_team_sync(t);
    heads_team(M);
    lite_team_sync(t);
    lite_products_team(&M->out_p, M->o, t);
}

int lite_mla_step(float *out, int64_t out_len, float *x, const float *delta, const float *norm, float norm_eps,
                  int64_t n_tok, int64_t dim, const uint8_t **w, const int64_t *w_bytes, const int32_t *types,
                  const float *q_a_norm, const float *kv_norm, int64_t n_head, int64_t n_nope, int64_t r_dim,
                  int64_t c_dim, int64_t v_dim, int64_t q_rank, float *ckv, float *kpe, int64_t cache_rows,
                  const float *cos_t, const float *sin_t, int64_t start, float scale, float eps, uint8_t *scratch,
                  int64_t scratch_bytes) {
    lite_mla_call M = {.out = out, .out_len = out_len, .x = x, .delta = delta, .norm = norm, .norm_eps = norm_eps,
                       .n_tok = n_tok, .dim = dim, .w = w, .w_bytes = w_bytes, .types = types, .q_a_norm = q_a_norm,
                       .kv_norm = kv_norm, .n_head = n_head, .n_nope = n_nope, .r_dim = r_dim, .c_dim = c_dim,
                       .v_dim = v_dim, .q_rank = q_rank, .ckv = ckv, .kpe = kpe, .cache_rows = cache_rows,
                       .cos_t = cos_t, .sin_t = sin_t, .start = start, .scale = scale, .eps = eps,
                       .scratch = scratch, .scratch_bytes = scratch_bytes};
    int rc = lite_mla_plan(&M);
    if (rc || n_tok == 0) return rc;
    if (n_tok == 1) {
        lite_team team;
        lite_team_init(&team, 1);
#pragma omp parallel num_threads(lite_num_threads()) if (lite_num_threads() > 1)
        lite_mla_decode_team(&M, &team);
        return LITE_OK;
    }
    /* The unfused path's calls in its order: the same products (q or q_a and kv_a as one set,
     * planned above) and ops, with the same arguments. */
    const int64_t an = M.act_bytes;
    uint8_t *act = M.act;
    rc = lite_add_rmsnorm_f32(M.h, x, delta, norm, n_tok, dim, norm_eps);
    if (rc) return rc;
    for (int i = 0; i < M.n_first; i++) lite_products_region(&M.first[i], M.h);
    if (q_rank) {
        rc = lite_rmsnorm_f32(M.q_an, M.q_a, q_a_norm, n_tok, q_rank, eps);
        if (!rc) lite_products_region(&M.qb, M.q_an);
    }
    if (!rc)
        rc = lite_mla_prep(M.q_nope, M.q_pe, ckv, kpe, cache_rows, M.q, M.kv, kv_norm, cos_t, sin_t, n_tok, n_head,
                           n_nope, c_dim, r_dim, start, eps);
    if (!rc)
        rc = lite_matmul_heads(M.q_lat, n_tok * n_head * c_dim, M.q_nope, n_tok, n_head, n_nope, w[MW_KB],
                               w_bytes[MW_KB], types[MW_KB], c_dim, act, an);
    if (!rc)
        rc = lite_mla_attention(M.o_lat, M.q_lat, M.q_pe, ckv, kpe, n_tok, n_head, c_dim, r_dim, start + n_tok, start,
                                scale);
    if (!rc)
        rc = lite_matmul_heads(M.o, n_tok * n_head * v_dim, M.o_lat, n_tok, n_head, c_dim, w[MW_VB], w_bytes[MW_VB],
                               types[MW_VB], v_dim, act, an);
    if (!rc) lite_products_region(&M.out_p, M.o);
    return rc;
}

/* ---- the FFN sublayer's input: residual add, norm, router ------------------------------------ */

int lite_route_plan(lite_products *P, float *probs, const float *h, int64_t dim, const uint8_t *router,
                    int64_t router_bytes, int type, int64_t n_exp, int64_t k, int64_t n_group, int64_t topk_group,
                    float scale, uint8_t *scratch, int64_t scratch_bytes) {
    if (!probs) return LITE_ERR_NULL;
    if (dim <= 0 || !route_args_ok(n_exp, k, n_group, topk_group, scale)) return LITE_ERR_ARG;
    const int32_t t = type;
    return lite_products_plan(P, 1, &probs, &n_exp, h, 1, dim, &router, &router_bytes, &t, &n_exp, scratch,
                              scratch_bytes);
}

int lite_norm_route(float *h, float *x, const float *delta, const float *norm, float eps, int64_t n_tok, int64_t dim,
                    const uint8_t *router, int64_t router_bytes, int type, int64_t n_exp, int32_t *ids, float *weights,
                    float *probs, int64_t k, int64_t n_group, int64_t topk_group, int renorm, float scale,
                    uint8_t *scratch, int64_t scratch_bytes) {
    if (!h || !x || !norm || !router || !ids || !weights || !probs) return LITE_ERR_NULL;
    if (n_tok < 0 || dim <= 0 || !route_args_ok(n_exp, k, n_group, topk_group, scale)) return LITE_ERR_ARG;
    if (n_tok == 0) return LITE_OK;
    int rc = lite_add_rmsnorm_f32(h, x, delta, norm, n_tok, dim, eps);
    if (!rc)
        rc = lite_matmul(probs, n_tok * n_exp, h, n_tok, dim, router, router_bytes, type, n_exp, scratch,
                         scratch_bytes);
    /* The logits are softmaxed in place (each element is read before it is written). */
    if (!rc) rc = lite_route(ids, weights, probs, probs, n_tok, n_exp, k, n_group, topk_group, renorm, scale);
    return rc;
}
