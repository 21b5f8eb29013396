/* herd's CPU decode attention over the paged KV cache (fp32).

   One query token per sequence; its visible keys are the positions j of its window (block
   phys[b, j / bs], offset j % bs) where mask[b, j] is set. Keys and values are read in place
   from the cache, never gathered into a padded copy; each pass over a token's keys serves every
   query head (GQA: a KV head's keys are read once for its query heads). Softmax in fp32 with a
   vectorized exp.

   Work items are (sequence, split of its window), all heads at once, so that each item reads
   its tokens' keys and values in memory order (a token's KV heads are adjacent in the cache;
   reading one head's keys at a time was latency-bound when the cache was cold, as it is after
   a layer's weights have streamed through). With fewer sequences than the threads have work
   for, each window is cut into splits whose partial softmax states (max, sum, weighted values)
   are combined afterwards, as flash-decoding does on GPUs.

   attention_body.h holds the kernel; it is included once per cache element type: float32, and
   bfloat16 (each key and value widens exactly to float32; the query and the output are float32
   in both, the caller converts them). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint16_t u16x __attribute__((vector_size(32)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }
static inline v16 splat(float x) { return (v16){0} + x; }

static inline float hsum(v16 v) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

/* where(sel, a, b) lane by lane, sel from a vector comparison (all bits set or clear) */
static inline v16 blend(i16v sel, v16 a, v16 b) {
    i16v ia, ib;
    memcpy(&ia, &a, sizeof a);
    memcpy(&ib, &b, sizeof b);
    ia = (ia & sel) | (ib & ~sel);
    memcpy(&a, &ia, sizeof a);
    return a;
}

/* e^x for x <= 0 (softmax arguments), 0 where x is -inf: x = n ln2 + r with |r| <= ln2 / 2,
   e^r by its degree-6 Taylor polynomial (relative error below 2e-7), 2^n into the exponent. */
static inline v16 vexp(v16 x) {
    const i16v live = x > splat(-INFINITY);
    x = blend(x < splat(-87.0f), splat(-87.0f), x);
    const v16 magic = splat(12582912.0f);  /* 1.5 * 2^23: adding it rounds to an integer */
    v16 n = (x * 1.44269504f + magic) - magic;
    v16 r = x - n * 0.693145752f - n * 1.42860677e-6f;
    v16 p = splat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    i16v e = (__builtin_convertvector(n, i16v) + 127) << 23;
    v16 two_n;
    memcpy(&two_n, &e, sizeof e);
    return blend(live, p * two_n, splat(0.f));
}

/* a bfloat16 is the upper half of a float32 */
static inline v16 ld_bf16(const uint16_t *p) {
    u16x h;
    memcpy(&h, p, sizeof h);
    i16v u = __builtin_convertvector(h, i16v) << 16;
    v16 v;
    memcpy(&v, &u, sizeof v);
    return v;
}
static inline v16 ld_f32(const float *p) { return ld(p); }

#define MAX_H 64    /* query heads */
#define MAX_D 256

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

#define T float
#define SUF f32
#include "attention_body.h"
#undef T
#undef SUF

#define T uint16_t
#define SUF bf16
#include "attention_body.h"
#undef T
#undef SUF
