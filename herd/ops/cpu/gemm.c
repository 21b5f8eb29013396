/* herd's CPU GEMM for decode-sized batches: grouped by expert, or dense (one expert).

   out[r, :] = a[r, :] @ W_e^T for the rows r of each expert e (rows offs[e-1] .. offs[e], the
   layout of torch._grouped_mm), with W_e the logical [N, K] weight stored K-major: element (n, k)
   at w + e * lde + k * ldk + n. The work is cut into panels of output columns of each touched
   expert, shared out among the threads (narrower panels when there are few, so every thread has
   some). At a few rows the work is reading the weights, so a panel's first pass streams them:
   KS weight rows per step (KS runs of contiguous values) added into accumulators that stay in
   L1. That pass leaves the panel's weights (at most PANEL_MAX_BYTES, or the L2 size where that
   is smaller) in L2, and the rows after the first MR reread them from there in register tiles,
   where arithmetic is the limit. An expert with STRIP_MIN rows or more (K up to STRIP_MAX_K) goes
   through strips instead: SR rows x SV vectors of columns over the whole K in registers, whose
   first rows' pass prefetches the next strip's weights, so reading memory and arithmetic overlap.
   Where no expert has more than MR rows (decode: one row for a dense linear, a few per expert),
   the work is split along K instead (use_kchunks): a K-range of the weight over all N columns is
   one contiguous block of K-major storage, so each work item is a single stream from memory,
   where the panels read runs of a few hundred bytes to 2 KiB at the row stride (1.1-1.7x the
   panels' GB/s at one row; docs/benchmarks.md). Each item sums into a partial sum of its own,
   kept in L1 (KCHUNK_ACC floats: N wider than that is cut into column panels), and the partial
   sums are added in K order at the end, so a result depends on the thread count only through
   float32 summation order.
   Rows past offs[E-1] are not written.

   gemm_body.h holds the kernels; it is included once per element type: float32, and bfloat16
   (activations, weights and output; each value widens exactly to float32, the sums are float32
   and round to nearest-even bfloat16 once, at the end, as torch's bf16 GEMMs do).

   Built at first use with the system C compiler (-O3 -march=native -fopenmp). The vector type is
   as wide as the machine's registers (VL floats: 16 with AVX-512, else 8) and the register tiles
   are sized to the register file (32 or 16 vectors): a GCC vector wider than the hardware's is
   split into pieces that do not stay in registers, which made every tile spill (5 GFLOP/s on an
   AVX2 machine instead of ~60). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__AVX512F__)
#define VL 16   /* floats per vector register */
#define SR 8    /* strip: 8 rows x 3 vectors (48 columns): 24 accumulators + 3 weights of 32 registers */
#define SV 3
#define TV 4    /* wide tile: MR rows x 4 vectors (64 columns): 24 accumulators + 4 weights */
#else
#define VL 8
#define SR 6    /* strip: 6 rows x 2 vectors (16 columns): 12 accumulators + 2 weights of 16 registers */
#define SV 2
#define TV 2    /* wide tile: MR rows x 2 vectors (16 columns): 12 accumulators + 2 weights */
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint16_t u16v __attribute__((vector_size(VL * 2)));
typedef uint32_t u32v __attribute__((vector_size(VL * 4)));

#define NW 512  /* output columns per panel: MR x NW accumulators (12 KiB) stay in L1 */
#define KS 8    /* weight rows per step: 8 streams, and accumulators touched once per 8 rows */
#define MR 6    /* token rows per pass over a panel's weights */
#define STRIP_MIN 5       /* rows of one expert from which strips beat the panel + tiles */
#define STRIP_MAX_K 2048  /* two strips' weights (SV * VL x K each: <= 768 KiB in fp32 with AVX-512) stay inside L2 */
#define PANEL_MAX_BYTES 1048576  /* a panel's weights, reread from L2 by the rows after its first pass */

#define KCHUNK_ACC 6144   /* floats of one split-K partial sum (rows x N): 24 KiB, inside L1 */
#define KCHUNK_MIN_K 32   /* K rows of the smallest split-K chunk */

/* Whether the GEMM goes through split-K chunks: every expert's rows fit one pass (MR). */
static inline int use_kchunks(int64_t most, int64_t K) { return most > 0 && most <= MR && K >= 2 * KCHUNK_MIN_K; }

/* Whether an expert's rows go through strips (gemm_body.h) rather than a panel and tiles. */
static inline int use_strips(int64_t rows, int64_t K) { return rows >= STRIP_MIN && K <= STRIP_MAX_K; }

/* Bytes of a panel's weights: PANEL_MAX_BYTES, less where this CPU's L2 is smaller. Asked once
   (sysconf may run cpuid, which traps to the hypervisor in a VM) and kept: every thread that
   races here stores the same value. */
static int64_t panel_bytes(void) {
    static int64_t bytes;
    if (!bytes) {
        long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
        bytes = l2 > 0 && l2 < PANEL_MAX_BYTES ? (int64_t)l2 : PANEL_MAX_BYTES;
    }
    return bytes;
}

static inline vf loadv_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void storev_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline float get_f32(const float *p) { return *p; }
static inline void store1_f32(float *p, float x) { *p = x; }

/* a bfloat16 is the upper half of a float32 */
static inline vf loadv_bf16(const uint16_t *p) {
    u16v h;
    memcpy(&h, p, sizeof h);
    u32v u = __builtin_convertvector(h, u32v) << 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}
static inline void storev_bf16(uint16_t *p, vf v) {
    u32v u;
    memcpy(&u, &v, sizeof u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  /* round to nearest, ties to even */
    u16v h = __builtin_convertvector(u, u16v);
    memcpy(p, &h, sizeof h);
}
static inline void store1_bf16(uint16_t *p, float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    *p = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  /* round to nearest, ties to even */
}
static inline float get_bf16(const uint16_t *p) {
    uint32_t u = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
/* bf16 row-major GEMV on the CPU's bf16 dot-product instruction (vdpbf16ps: each fp32 lane adds
   the products of one adjacent pair of bf16 values, exact products, fp32 sums): 32 weights per
   instruction instead of widening 16 at a time. 4 weight rows x 4 token rows of accumulators. */
static inline __attribute__((always_inline)) void gemv_dp_block(
        const int MR_, const uint16_t *a, int64_t lda, const uint16_t *w, int64_t ldw, uint16_t *out,
        int64_t ldo, int64_t n0, int64_t nr, int64_t K) {
    const int64_t kv = K / 32 * 32;
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < MR_; m++) acc[r][m] = _mm512_setzero_ps();
    if (nr == 4) {
        for (int64_t k = 0; k < kv; k += 32) {
            __m512bh x[4];
            for (int m = 0; m < MR_; m++) x[m] = (__m512bh)_mm512_loadu_si512(a + m * lda + k);
            for (int r = 0; r < 4; r++) {
                const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * ldw + k);
                for (int m = 0; m < MR_; m++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, x[m]);
            }
        }
    } else {
        for (int64_t k = 0; k < kv; k += 32)
            for (int r = 0; r < nr; r++) {
                const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * ldw + k);
                for (int m = 0; m < MR_; m++)
                    acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, (__m512bh)_mm512_loadu_si512(a + m * lda + k));
            }
    }
    for (int64_t r = 0; r < nr; r++)
        for (int m = 0; m < MR_; m++) {
            float sum = _mm512_reduce_add_ps(acc[r][m]);
            for (int64_t k = kv; k < K; k++) sum += get_bf16(w + (n0 + r) * ldw + k) * get_bf16(a + m * lda + k);
            store1_bf16(out + m * ldo + n0 + r, sum);
        }
}

static int gemv_rm_bf16_dp(const uint16_t *a, int64_t lda, const uint16_t *w, int64_t ldw, uint16_t *out,
                           int64_t ldo, int64_t M, int64_t N, int64_t K, int num_threads) {
    const int64_t groups = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n0 = g * 4, nr = N - n0 < 4 ? N - n0 : 4;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const uint16_t *am = a + m0 * lda;
            uint16_t *om = out + m0 * ldo;
            switch (M - m0 < 4 ? M - m0 : 4) {   /* constant token-row counts: no wasted products */
                case 1: gemv_dp_block(1, am, lda, w, ldw, om, ldo, n0, nr, K); break;
                case 2: gemv_dp_block(2, am, lda, w, ldw, om, ldo, n0, nr, K); break;
                case 3: gemv_dp_block(3, am, lda, w, ldw, om, ldo, n0, nr, K); break;
                default: gemv_dp_block(4, am, lda, w, ldw, om, ldo, n0, nr, K); break;
            }
        }
    }
    return 0;
}
#define HAVE_BF16_DOT 1
#endif

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

#define T float
#define SUF f32
#define IS_BF16 0
#include "gemm_body.h"
#undef IS_BF16
#undef T
#undef SUF

#define T uint16_t
#define SUF bf16
#define IS_BF16 1
#include "gemm_body.h"
#undef IS_BF16
#undef T
#undef SUF

/* Most token rows herd_gemv_rm_bf16 beats torch's bf16 GEMM at on the measured decode shapes:
   4 with the bf16 dot-product instruction, 1 with the widening loop (docs/benchmarks.md). */
int herd_gemv_rm_bf16_max_rows(void) {
#if defined(HAVE_BF16_DOT)
    return 4;
#else
    return 1;
#endif
}
