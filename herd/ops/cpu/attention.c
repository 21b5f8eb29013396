/* herd's CPU decode attention over the paged KV cache (fp32).

   One query token per sequence; its visible keys are the positions j of its window (block
   phys[b, j / bs], offset j % bs) where mask[b, j] is set. Keys and values are read in place
   from the cache, never gathered into a padded copy; every query head of a KV head shares one
   pass over that head's keys (GQA). Softmax in two passes over a per-task score buffer, in fp32.
   Work is shared out per (sequence, KV head). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

static inline float dot(const float *a, const float *b, int64_t D) {
    v16 s = {0};
    for (int64_t d = 0; d < D; d += 16) s += ld(a + d) * ld(b + d);
    float r = 0.f;
    for (int i = 0; i < 16; i++) r += s[i];
    return r;
}

/* q [B, H, D] (row stride ldq per sequence), caches with strides (block, token, head) and
   contiguous head dims, phys [B, W] int64, mask [B, W * bs] bytes, out [B, H, D] contiguous.
   Returns 0, or -1 for D % 16 != 0, H % Hkv != 0 or no memory. */
int herd_paged_decode_f32(const float *q, int64_t ldq, const float *k_cache, const float *v_cache,
                          int64_t sb, int64_t st_, int64_t sh, const int64_t *phys,
                          const uint8_t *mask, float *out, int64_t B, int64_t H, int64_t Hkv,
                          int64_t D, int64_t W, int64_t bs, float scale, int num_threads) {
    if (D % 16 != 0 || Hkv <= 0 || H % Hkv != 0 || num_threads < 1) return -1;
    const int64_t G = H / Hkv, L = W * bs;
    int failed = 0;
    #pragma omp parallel num_threads(num_threads)
    {
        float *score = malloc(sizeof(float) * (size_t)(G * (L > 0 ? L : 1)));
        float *acc = malloc(sizeof(float) * (size_t)(G * D));
        if (!score || !acc) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (!score || !acc) continue;
            const int64_t b = task / Hkv, h = task % Hkv;
            const float *qb = q + b * ldq + h * G * D;
            const uint8_t *mb = mask + b * L;
            const int64_t *pb = phys + b * W;
            float mx[G];
            for (int64_t g = 0; g < G; g++) mx[g] = -INFINITY;
            for (int64_t j = 0; j < L; j++) {
                if (!mb[j]) continue;
                const float *kj = k_cache + pb[j / bs] * sb + (j % bs) * st_ + h * sh;
                for (int64_t g = 0; g < G; g++) {
                    float s = dot(qb + g * D, kj, D) * scale;
                    score[g * L + j] = s;
                    if (s > mx[g]) mx[g] = s;
                }
            }
            float sum[G];
            for (int64_t g = 0; g < G; g++) sum[g] = 0.f;
            memset(acc, 0, sizeof(float) * (size_t)(G * D));
            for (int64_t j = 0; j < L; j++) {
                if (!mb[j]) continue;
                const float *vj = v_cache + pb[j / bs] * sb + (j % bs) * st_ + h * sh;
                for (int64_t g = 0; g < G; g++) {
                    float p = expf(score[g * L + j] - mx[g]);
                    sum[g] += p;
                    float *ag = acc + g * D;
                    for (int64_t d = 0; d < D; d += 16) st(ag + d, ld(ag + d) + ld(vj + d) * p);
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float *o = out + (b * H + h * G + g) * D;
                float inv = sum[g] > 0.f ? 1.f / sum[g] : 0.f;
                for (int64_t d = 0; d < D; d++) o[d] = acc[g * D + d] * inv;
            }
        }
        free(score);
        free(acc);
    }
    return failed ? -1 : 0;
}
