/* herd's CPU GEMM for decode-sized batches: grouped by expert, or dense (one expert).

   out[r, :] = a[r, :] @ W_e^T for the rows r of each expert e (rows offs[e-1] .. offs[e], the
   layout of torch._grouped_mm), with W_e the logical [N, K] weight stored K-major: element (n, k)
   at w + e * lde + k * ldk + n. The work is cut into panels of output columns of each touched
   expert, shared out among the threads (narrower panels when there are few, so every thread has
   some). At a few rows the work is reading the weights, so a panel's first pass streams them:
   KS weight rows per step (KS runs of contiguous floats) added into accumulators that stay in
   L1. That pass leaves the panel's weights (at most 1 MiB) in L2, and the rows after the first MR
   reread them from there in register tiles, where arithmetic is the limit. Rows past offs[E-1]
   are not written.

   Built at first use with the system C compiler (-O3 -march=native -fopenmp); the vector type is
   GCC's generic 16-float vector, which the compiler lowers to the machine's widest SIMD. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

#define NW 512  /* output columns per panel: MR x NW accumulators (12 KiB) stay in L1 */
#define KS 8    /* weight rows per step: 8 streams, and accumulators touched once per 8 rows */
#define MR 6    /* token rows per pass over a panel's weights */

/* acc[m, 0:nw] = sum_k a[m, k] * w[k, 0:nw] for ROWS token rows (nw % 16 == 0). */
#define PANEL(ROWS)                                                                           \
static void panel_##ROWS(const float *a, int64_t lda, const float *w, int64_t ldk,           \
                         float *out, int64_t ldo, int64_t K, int64_t nw) {                    \
    float acc[ROWS][NW] __attribute__((aligned(64)));                                         \
    memset(acc, 0, sizeof acc);                                                               \
    int64_t k = 0;                                                                            \
    for (; k + KS <= K; k += KS) {                                                            \
        float x[ROWS][KS];                                                                    \
        _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                               \
            _Pragma("GCC unroll 8") for (int j = 0; j < KS; j++) x[m][j] = a[m * lda + k + j]; \
        const float *wk = w + k * ldk;                                                        \
        for (int64_t n = 0; n < nw; n += 16) {                                                \
            v16 v[KS];                                                                        \
            _Pragma("GCC unroll 8") for (int j = 0; j < KS; j++) v[j] = load16(wk + j * ldk + n); \
            _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++) {                         \
                v16 s = load16(&acc[m][n]);                                                   \
                _Pragma("GCC unroll 8") for (int j = 0; j < KS; j++) s += v[j] * x[m][j];    \
                store16(&acc[m][n], s);                                                       \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    for (; k < K; k++) {                                                                      \
        const float *wk = w + k * ldk;                                                        \
        for (int64_t n = 0; n < nw; n += 16) {                                                \
            v16 v0 = load16(wk + n);                                                          \
            _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                           \
                store16(&acc[m][n], load16(&acc[m][n]) + v0 * a[m * lda + k]);                \
        }                                                                                     \
    }                                                                                         \
    for (int m = 0; m < ROWS; m++) memcpy(out + m * ldo, acc[m], sizeof(float) * nw);         \
}

PANEL(1) PANEL(2) PANEL(3) PANEL(4) PANEL(5) PANEL(6)

/* Register tile for the rows after a panel's first pass, when the panel's weights are in L2 and
   arithmetic, not reading them, is the limit: out[m, 0:16*NV] for ROWS rows over the whole K,
   accumulators in registers (ROWS x NV of them). */
#define TILE(ROWS, NV)                                                                        \
static void tile_##ROWS##_##NV(const float *a, int64_t lda, const float *w, int64_t ldk,     \
                               float *out, int64_t ldo, int64_t K) {                          \
    v16 acc[ROWS][NV];                                                                        \
    _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                                   \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[m][v] = (v16){0};           \
    for (int64_t k = 0; k < K; k++) {                                                         \
        const float *wk = w + k * ldk;                                                        \
        v16 wv[NV];                                                                           \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) wv[v] = load16(wk + 16 * v);    \
        _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++) {                             \
            float x = a[m * lda + k];                                                         \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[m][v] += wv[v] * x;     \
        }                                                                                     \
    }                                                                                         \
    _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                                   \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) store16(out + m * ldo + 16 * v, acc[m][v]); \
}

#define TILES_OF(ROWS) TILE(ROWS, 1) TILE(ROWS, 4)
TILES_OF(1) TILES_OF(2) TILES_OF(3) TILES_OF(4) TILES_OF(5) TILES_OF(6)
typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, float *, int64_t, int64_t);
static const tile_fn TILES[MR][2] = {{tile_1_1, tile_1_4}, {tile_2_1, tile_2_4}, {tile_3_1, tile_3_4},
                                     {tile_4_1, tile_4_4}, {tile_5_1, tile_5_4}, {tile_6_1, tile_6_4}};

typedef void (*panel_fn)(const float *, int64_t, const float *, int64_t, float *, int64_t, int64_t, int64_t);
static const panel_fn PANELS[MR] = {panel_1, panel_2, panel_3, panel_4, panel_5, panel_6};

/* Returns 0, or -1 when N is not a multiple of 16 or memory runs out. */
int herd_grouped_gemm_f32(const float *a, int64_t lda, const float *w, int64_t lde, int64_t ldk,
                          float *out, int64_t ldo, const int32_t *offs, int64_t E, int64_t N,
                          int64_t K, int num_threads) {
    if (N % 16 != 0 || num_threads < 1) return -1;
    int64_t touched = 0;
    for (int64_t e = 0; e < E; e++) touched += offs[e] > (e ? offs[e - 1] : 0);
    /* panel width: NW, or narrower so that there are at least 4 panels per thread */
    int64_t per_expert = (4 * num_threads + touched - 1) / (touched ? touched : 1);
    int64_t nw = (N + per_expert - 1) / per_expert;
    nw = (nw + 15) / 16 * 16;
    if (nw > NW) nw = NW;
    int64_t l2 = (262144 / (K > 0 ? K : 1)) / 16 * 16;  /* a panel's weights (nw x K floats) <= 1 MiB */
    if (nw > l2) nw = l2 > 16 ? l2 : 16;
    const int64_t T = (N + nw - 1) / nw;
    int64_t *items = malloc(sizeof(int64_t) * (size_t)(touched * T > 0 ? touched * T : 1));
    if (!items) return -1;
    int64_t n_items = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t lo = e ? offs[e - 1] : 0;
        if (offs[e] > lo)
            for (int64_t t = 0; t < T; t++) items[n_items++] = e * T + t;
    }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t i = 0; i < n_items; i++) {
        int64_t e = items[i] / T, n0 = (items[i] % T) * nw;
        int64_t width = N - n0 < nw ? N - n0 : nw;
        int64_t lo = e ? offs[e - 1] : 0, hi = offs[e];
        const float *wp = w + e * lde + n0;
        /* first pass: the panel streams its weights from memory into L2 ... */
        int rows = hi - lo < MR ? (int)(hi - lo) : MR;
        PANELS[rows - 1](a + lo * lda, lda, wp, ldk, out + lo * ldo + n0, ldo, K, width);
        /* ... later rows reread them from there in register tiles */
        for (int64_t m = lo + rows; m < hi; m += MR) {
            int r = hi - m < MR ? (int)(hi - m) : MR;
            for (int64_t n = 0; n < width;) {
                int wide = n + 64 <= width;
                TILES[r - 1][wide](a + m * lda, lda, wp + n, ldk, out + m * ldo + n0 + n, ldo, K);
                n += wide ? 64 : 16;
            }
        }
    }
    free(items);
    return 0;
}

/* Dense: out[M, N] = a[M, K] @ W^T, W [N, K] K-major (element (n, k) at w + k * ldk + n). */
int herd_linear_f32(const float *a, int64_t lda, const float *w, int64_t ldk, float *out, int64_t ldo,
                    int64_t M, int64_t N, int64_t K, int num_threads) {
    const int32_t offs[1] = {(int32_t)M};
    return herd_grouped_gemm_f32(a, lda, w, 0, ldk, out, ldo, offs, 1, N, K, num_threads);
}
