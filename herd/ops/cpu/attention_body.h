/* The paged decode kernel for one cache element type T (float or bf16 bits), named with suffix
   SUF: included by attention.c once per type. Arithmetic is float32 in both. */
#define FN(name) CAT(name, SUF)
#define LDKV FN(ld)

/* Keys j0 .. j1 of one sequence, every head: the softmax state of each query head, unnormalized
   (m[hq] the max score, l[hq] the sum of e^(s - m), acc[hq] the weighted sum of values). A token's
   keys (values) of all KV heads are adjacent in the cache, so the pass over the window reads
   memory in order. */
static void FN(attend)(const float *qb, const T *k_cache, const T *v_cache, int64_t sb, int64_t st_,
                   int64_t sh, const int64_t *pb, const uint8_t *mb, int64_t H, int64_t Hkv, int64_t D,
                   int64_t bs, float scale, int64_t j0, int64_t j1, float *score, float *m, float *l,
                   float *acc) {
    const int64_t n = j1 - j0, n16 = (n + 15) / 16 * 16, G = H / Hkv;
    for (int64_t hq = 0; hq < H; hq++) m[hq] = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        const int64_t j = j0 + i;
        if (!mb[j]) {
            for (int64_t hq = 0; hq < H; hq++) score[hq * n16 + i] = -INFINITY;
            continue;
        }
        const T *kt = k_cache + pb[j / bs] * sb + (j % bs) * st_;
        for (int64_t hq = 0; hq < H; hq++) {
            const float *qg = qb + hq * D;
            const T *kj = kt + (hq / G) * sh;
            v16 s = ld(qg) * LDKV(kj);
            for (int64_t d = 16; d < D; d += 16) s += ld(qg + d) * LDKV(kj + d);
            const float x = hsum(s) * scale;
            score[hq * n16 + i] = x;
            if (x > m[hq]) m[hq] = x;
        }
    }
    for (int64_t hq = 0; hq < H; hq++) {
        float *sg = score + hq * n16;
        for (int64_t i = n; i < n16; i++) sg[i] = -INFINITY;
        v16 sum = {0};
        const v16 mx = splat(m[hq] == -INFINITY ? 0.f : m[hq]);
        for (int64_t i = 0; i < n16; i += 16) {
            v16 p = vexp(ld(sg + i) - mx);
            st(sg + i, p);
            sum += p;
        }
        l[hq] = hsum(sum);
    }
    memset(acc, 0, sizeof(float) * (size_t)(H * D));
    for (int64_t i = 0; i < n; i++) {
        const int64_t j = j0 + i;
        if (!mb[j]) continue;
        const T *vt = v_cache + pb[j / bs] * sb + (j % bs) * st_;
        for (int64_t hq = 0; hq < H; hq++) {
            const v16 p = splat(score[hq * n16 + i]);
            const T *vj = vt + (hq / G) * sh;
            float *ag = acc + hq * D;
            for (int64_t d = 0; d < D; d += 16) st(ag + d, ld(ag + d) + LDKV(vj + d) * p);
        }
    }
}

/* q [B, H, D] (row stride ldq per sequence), caches with strides (block, token, head) and
   contiguous head dims, phys [B, W] int64, mask [B, W * bs] bytes, out [B, H, D] contiguous.
   Returns 0, or -1 for D % 16 != 0, D > 256, H % Hkv != 0, more than 64 query heads or no
   memory. */
int FN(herd_paged_decode)(const float *q, int64_t ldq, const T *k_cache, const T *v_cache,
                          int64_t sb, int64_t st_, int64_t sh, const int64_t *phys,
                          const uint8_t *mask, float *out, int64_t B, int64_t H, int64_t Hkv,
                          int64_t D, int64_t W, int64_t bs, float scale, int num_threads) {
    if (D % 16 != 0 || D > MAX_D || Hkv <= 0 || H % Hkv != 0 || H > MAX_H || num_threads < 1) return -1;
    const int64_t L = W * bs;
    /* splits of at least 32 keys, enough of them for 4 items per thread */
    int64_t splits = (4 * num_threads + B - 1) / B;
    const int64_t max_splits = (L + 31) / 32;
    if (splits > max_splits) splits = max_splits;
    if (splits < 1) splits = 1;
    const int64_t span = ((L + splits - 1) / splits + 15) / 16 * 16;
    splits = span > 0 ? (L + span - 1) / span : 1;  /* rounding span up may leave fewer */
    const int64_t items = B * splits, part = H * (D + 2);
    float *parts = splits > 1 ? malloc(sizeof(float) * (size_t)(items * part)) : NULL;
    if (splits > 1 && !parts) return -1;
    int failed = 0;
    #pragma omp parallel num_threads(num_threads)
    {
        float *score = malloc(sizeof(float) * (size_t)(H * (span + 16)));
        float *local = splits > 1 ? NULL : malloc(sizeof(float) * (size_t)part);
        if (!score || (splits == 1 && !local)) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!score || (splits == 1 && !local)) continue;
            const int64_t b = it / splits, c = it % splits;
            const int64_t j0 = c * span, j1 = j0 + span < L ? j0 + span : L;
            float *p = splits > 1 ? parts + it * part : local;
            float *m = p, *l = p + H, *acc = p + 2 * H;
            FN(attend)(q + b * ldq, k_cache, v_cache, sb, st_, sh, phys + b * W, mask + b * L, H, Hkv, D, bs, scale,
                   j0, j1, score, m, l, acc);
            if (splits == 1)
                for (int64_t hq = 0; hq < H; hq++) {
                    float *o = out + (b * H + hq) * D;
                    const v16 inv = splat(l[hq] > 0.f ? 1.f / l[hq] : 0.f);
                    for (int64_t d = 0; d < D; d += 16) st(o + d, ld(acc + hq * D + d) * inv);
                }
        }
        if (splits > 1 && score) {
            #pragma omp for schedule(static)
            for (int64_t row = 0; row < B * H; row++) {
                const int64_t b = row / H, hq = row % H;
                float mx = -INFINITY;
                for (int64_t c = 0; c < splits; c++) {
                    const float mc = parts[(b * splits + c) * part + hq];
                    if (mc > mx) mx = mc;
                }
                v16 accv[MAX_D / 16];
                for (int64_t d = 0; d < D / 16; d++) accv[d] = (v16){0};
                float lsum = 0.f;
                for (int64_t c = 0; c < splits; c++) {
                    const float *p = parts + (b * splits + c) * part;
                    if (p[hq] == -INFINITY) continue;   /* a split with no visible key */
                    const float w = expf(p[hq] - mx);
                    lsum += w * p[H + hq];
                    for (int64_t d = 0; d < D / 16; d++) accv[d] += ld(p + 2 * H + hq * D + 16 * d) * w;
                }
                float *o = out + row * D;
                const v16 inv = splat(lsum > 0.f ? 1.f / lsum : 0.f);
                for (int64_t d = 0; d < D / 16; d++) st(o + 16 * d, accv[d] * inv);
            }
        }
        free(score);
        free(local);
    }
    free(parts);
    return failed ? -1 : 0;
}

#undef FN
#undef LDKV
