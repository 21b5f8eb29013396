/* The GEMM kernels for one element type T (float or bf16 bits), named with suffix SUF: included
   by gemm.c once per type. Arithmetic is float32 in both. */
#define FN(name) CAT(name, SUF)
#define LOAD16 FN(load16)
#define STORE16 FN(store16)
#define GET FN(get)

/* acc[m, 0:nw] = sum_k a[m, k] * w[k, 0:nw] for ROWS token rows (nw % 16 == 0). */
#define PANEL(ROWS)                                                                           \
static void FN(panel_##ROWS)(const T *a, int64_t lda, const T *w, int64_t ldk,               \
                             T *out, int64_t ldo, int64_t K, int64_t nw) {                    \
    float acc[ROWS][NW] __attribute__((aligned(64)));                                         \
    memset(acc, 0, sizeof acc);                                                               \
    int64_t k = 0;                                                                            \
    for (; k + KS <= K; k += KS) {                                                            \
        float x[ROWS][KS];                                                                    \
        _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                               \
            _Pragma("GCC unroll 8") for (int j = 0; j < KS; j++) x[m][j] = GET(a + m * lda + k + j); \
        const T *wk = w + k * ldk;                                                            \
        for (int64_t n = 0; n < nw; n += 16) {                                                \
            v16 v[KS];                                                                        \
            _Pragma("GCC unroll 8") for (int j = 0; j < KS; j++) v[j] = LOAD16(wk + j * ldk + n); \
            _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++) {                         \
                v16 s = load16_f32(&acc[m][n]);                                               \
                _Pragma("GCC unroll 8") for (int j = 0; j < KS; j++) s += v[j] * x[m][j];    \
                store16_f32(&acc[m][n], s);                                                   \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    for (; k < K; k++) {                                                                      \
        const T *wk = w + k * ldk;                                                            \
        for (int64_t n = 0; n < nw; n += 16) {                                                \
            v16 v0 = LOAD16(wk + n);                                                          \
            _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                           \
                store16_f32(&acc[m][n], load16_f32(&acc[m][n]) + v0 * GET(a + m * lda + k));  \
        }                                                                                     \
    }                                                                                         \
    for (int m = 0; m < ROWS; m++)                                                            \
        for (int64_t n = 0; n < nw; n += 16) STORE16(out + m * ldo + n, load16_f32(&acc[m][n])); \
}

PANEL(1) PANEL(2) PANEL(3) PANEL(4) PANEL(5) PANEL(6)

/* Register tile for the rows after a panel's first pass, when the panel's weights are in L2 and
   arithmetic, not reading them, is the limit: out[m, 0:16*NV] for ROWS rows over the whole K,
   accumulators in registers (ROWS x NV of them). */
#define TILE(ROWS, NV)                                                                        \
static void FN(tile_##ROWS##_##NV)(const T *a, int64_t lda, const T *w, int64_t ldk,         \
                                   T *out, int64_t ldo, int64_t K) {                          \
    v16 acc[ROWS][NV];                                                                        \
    _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                                   \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[m][v] = (v16){0};           \
    for (int64_t k = 0; k < K; k++) {                                                         \
        const T *wk = w + k * ldk;                                                            \
        v16 wv[NV];                                                                           \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) wv[v] = LOAD16(wk + 16 * v);    \
        _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++) {                             \
            float x = GET(a + m * lda + k);                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[m][v] += wv[v] * x;     \
        }                                                                                     \
    }                                                                                         \
    _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                                   \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) STORE16(out + m * ldo + 16 * v, acc[m][v]); \
}

#define TILES_OF(ROWS) TILE(ROWS, 1) TILE(ROWS, 4)
TILES_OF(1) TILES_OF(2) TILES_OF(3) TILES_OF(4) TILES_OF(5) TILES_OF(6)
static void (*const FN(TILES)[MR][2])(const T *, int64_t, const T *, int64_t, T *, int64_t, int64_t) = {
    {FN(tile_1_1), FN(tile_1_4)}, {FN(tile_2_1), FN(tile_2_4)}, {FN(tile_3_1), FN(tile_3_4)},
    {FN(tile_4_1), FN(tile_4_4)}, {FN(tile_5_1), FN(tile_5_4)}, {FN(tile_6_1), FN(tile_6_4)}};
static void (*const FN(PANELS)[MR])(const T *, int64_t, const T *, int64_t, T *, int64_t, int64_t, int64_t) = {
    FN(panel_1), FN(panel_2), FN(panel_3), FN(panel_4), FN(panel_5), FN(panel_6)};

/* Returns 0, or -1 when N is not a multiple of 16 or memory runs out. */
int FN(herd_grouped_gemm)(const T *a, int64_t lda, const T *w, int64_t lde, int64_t ldk,
                          T *out, int64_t ldo, const int32_t *offs, int64_t E, int64_t N,
                          int64_t K, int num_threads) {
    if (N % 16 != 0 || num_threads < 1) return -1;
    int64_t touched = 0;
    for (int64_t e = 0; e < E; e++) touched += offs[e] > (e ? offs[e - 1] : 0);
    /* panel width: NW, or narrower so that there are at least 4 panels per thread */
    int64_t per_expert = (4 * num_threads + touched - 1) / (touched ? touched : 1);
    int64_t nw = (N + per_expert - 1) / per_expert;
    nw = (nw + 15) / 16 * 16;
    if (nw > NW) nw = NW;
    int64_t l2 = (int64_t)(1048576 / sizeof(T)) / (K > 0 ? K : 1) / 16 * 16;  /* nw x K weights <= 1 MiB */
    if (nw > l2) nw = l2 > 16 ? l2 : 16;
    const int64_t T_ = (N + nw - 1) / nw;
    int64_t *items = malloc(sizeof(int64_t) * (size_t)(touched * T_ > 0 ? touched * T_ : 1));
    if (!items) return -1;
    int64_t n_items = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t lo = e ? offs[e - 1] : 0;
        if (offs[e] > lo)
            for (int64_t t = 0; t < T_; t++) items[n_items++] = e * T_ + t;
    }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t i = 0; i < n_items; i++) {
        int64_t e = items[i] / T_, n0 = (items[i] % T_) * nw;
        int64_t width = N - n0 < nw ? N - n0 : nw;
        int64_t lo = e ? offs[e - 1] : 0, hi = offs[e];
        const T *wp = w + e * lde + n0;
        /* first pass: the panel streams its weights from memory into L2 ... */
        int rows = hi - lo < MR ? (int)(hi - lo) : MR;
        FN(PANELS)[rows - 1](a + lo * lda, lda, wp, ldk, out + lo * ldo + n0, ldo, K, width);
        /* ... later rows reread them from there in register tiles */
        for (int64_t m = lo + rows; m < hi; m += MR) {
            int r = hi - m < MR ? (int)(hi - m) : MR;
            for (int64_t n = 0; n < width;) {
                int wide = n + 64 <= width;
                FN(TILES)[r - 1][wide](a + m * lda, lda, wp + n, ldk, out + m * ldo + n0 + n, ldo, K);
                n += wide ? 64 : 16;
            }
        }
    }
    free(items);
    return 0;
}

/* Dense: out[M, N] = a[M, K] @ W^T, W [N, K] K-major (element (n, k) at w + k * ldk + n). */
int FN(herd_linear)(const T *a, int64_t lda, const T *w, int64_t ldk, T *out, int64_t ldo,
                    int64_t M, int64_t N, int64_t K, int num_threads) {
    const int32_t offs[1] = {(int32_t)M};
    return FN(herd_grouped_gemm)(a, lda, w, 0, ldk, out, ldo, offs, 1, N, K, num_threads);
}

#undef PANEL
#undef TILE
#undef TILES_OF
#undef FN
#undef LOAD16
#undef STORE16
#undef GET
