/* herd's CPU GEMM for decode-sized batches: grouped by expert, or dense (one expert).

   out[r, :] = a[r, :] @ W_e^T for the rows r of each expert e (rows offs[e-1] .. offs[e], the
   layout of torch._grouped_mm), with W_e the logical [N, K] weight stored K-major: element (n, k)
   at w + e * lde + k * ldk + n. The work is cut into panels of output columns of each touched
   expert, shared out among the threads (narrower panels when there are few, so every thread has
   some). At a few rows the work is reading the weights, so a panel's first pass streams them:
   KS weight rows per step (KS runs of contiguous values) added into accumulators that stay in
   L1. That pass leaves the panel's weights (at most 1 MiB) in L2, and the rows after the first MR
   reread them from there in register tiles, where arithmetic is the limit. An expert with
   STRIP_MIN rows or more (K up to STRIP_MAX_K) goes through strips instead: 8 rows x 48 columns
   over the whole K in registers, whose first rows' pass prefetches the next strip's weights, so
   reading memory and arithmetic overlap. Rows past offs[E-1] are not written.

   gemm_body.h holds the kernels; it is included once per element type: float32, and bfloat16
   (activations, weights and output; each value widens exactly to float32, the sums are float32
   and round to nearest-even bfloat16 once, at the end, as torch's bf16 GEMMs do).

   Built at first use with the system C compiler (-O3 -march=native -fopenmp); the vector type is
   GCC's generic 16-float vector, which the compiler lowers to the machine's widest SIMD. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

#define NW 512  /* output columns per panel: MR x NW accumulators (12 KiB) stay in L1 */
#define KS 8    /* weight rows per step: 8 streams, and accumulators touched once per 8 rows */
#define MR 6    /* token rows per pass over a panel's weights */
#define STRIP_MIN 5       /* rows of one expert from which strips beat the panel + tiles */
#define STRIP_MAX_K 1024  /* two strips' weights (48 x K each) stay well inside L2 */

/* Whether an expert's rows go through strips (gemm_body.h) rather than a panel and tiles. */
static inline int use_strips(int64_t rows, int64_t K) { return rows >= STRIP_MIN && K <= STRIP_MAX_K; }

static inline v16 load16_f32(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16_f32(float *p, v16 v) { memcpy(p, &v, sizeof v); }
static inline float get_f32(const float *p) { return *p; }

/* a bfloat16 is the upper half of a float32 */
static inline v16 load16_bf16(const uint16_t *p) {
    u16x16 h;
    memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    v16 v;
    memcpy(&v, &u, sizeof v);
    return v;
}
static inline void store16_bf16(uint16_t *p, v16 v) {
    u32x16 u;
    memcpy(&u, &v, sizeof u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  /* round to nearest, ties to even */
    u16x16 h = __builtin_convertvector(u, u16x16);
    memcpy(p, &h, sizeof h);
}
static inline float get_bf16(const uint16_t *p) {
    uint32_t u = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

#define T float
#define SUF f32
#include "gemm_body.h"
#undef T
#undef SUF

#define T uint16_t
#define SUF bf16
#include "gemm_body.h"
#undef T
#undef SUF
