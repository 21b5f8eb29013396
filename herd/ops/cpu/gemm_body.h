/* The GEMM kernels for one element type T (float or bf16 bits), named with suffix SUF: included
   by gemm.c once per type. Arithmetic is float32 in both. */
#define FN(name) CAT(name, SUF)
#define LOADV FN(loadv)
#define STOREV FN(storev)
#define GET FN(get)
#define STORE1 FN(store1)

/* part[m, 0:N] = sum over k in [k0, k1) of a[m, k] * w[k, 0:N] for ROWS token rows: a K-range of
   the weight over all its columns, which K-major storage holds as one contiguous block (its
   rows are ldk apart, ldk barely above N), so each work item reads a single stream. */
#define KCHUNK(ROWS)                                                                          \
static void FN(kchunk_##ROWS)(const T *a, int64_t lda, const T *w, int64_t ldk, float *part, \
                              int64_t k0, int64_t k1, int64_t N) {                            \
    memset(part, 0, sizeof(float) * ROWS * (size_t)N);                                        \
    int64_t k = k0;                                                                           \
    for (; k + KS <= k1; k += KS) {                                                           \
        float x[ROWS][KS];                                                                    \
        _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                               \
            _Pragma("GCC unroll 8") for (int j = 0; j < KS; j++) x[m][j] = GET(a + m * lda + k + j); \
        const T *wk = w + k * ldk;                                                            \
        for (int64_t n = 0; n < N; n += VL) {                                                 \
            vf v[KS];                                                                         \
            _Pragma("GCC unroll 8") for (int j = 0; j < KS; j++) v[j] = LOADV(wk + j * ldk + n); \
            _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++) {                         \
                vf s = loadv_f32(part + m * N + n);                                           \
                _Pragma("GCC unroll 8") for (int j = 0; j < KS; j++) s += v[j] * x[m][j];    \
                storev_f32(part + m * N + n, s);                                              \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    for (; k < k1; k++) {                                                                     \
        const T *wk = w + k * ldk;                                                            \
        for (int64_t n = 0; n < N; n += VL) {                                                 \
            vf v0 = LOADV(wk + n);                                                            \
            _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                           \
                storev_f32(part + m * N + n, loadv_f32(part + m * N + n) + v0 * GET(a + m * lda + k)); \
        }                                                                                     \
    }                                                                                         \
}
KCHUNK(1) KCHUNK(2) KCHUNK(3) KCHUNK(4) KCHUNK(5) KCHUNK(6)
static void (*const FN(KCHUNKS)[MR])(const T *, int64_t, const T *, int64_t, float *, int64_t, int64_t, int64_t) = {
    FN(kchunk_1), FN(kchunk_2), FN(kchunk_3), FN(kchunk_4), FN(kchunk_5), FN(kchunk_6)};

/* out[m, 0:nw] = sum_k a[m, k] * w[k, 0:nw] for ROWS token rows (nw % VL == 0): the chunk above
   over the whole K into ROWS x NW accumulators in L1 (12 KiB at MR rows), rounded once into out. */
#define PANEL(ROWS)                                                                           \
static void FN(panel_##ROWS)(const T *a, int64_t lda, const T *w, int64_t ldk,               \
                             T *out, int64_t ldo, int64_t K, int64_t nw) {                    \
    float acc[ROWS * NW] __attribute__((aligned(64)));                                        \
    FN(kchunk_##ROWS)(a, lda, w, ldk, acc, 0, K, nw);                                         \
    for (int m = 0; m < ROWS; m++)                                                            \
        for (int64_t n = 0; n < nw; n += VL) STOREV(out + m * ldo + n, loadv_f32(acc + m * nw + n)); \
}

PANEL(1) PANEL(2) PANEL(3) PANEL(4) PANEL(5) PANEL(6)

/* Register tile for the rows after a panel's first pass, when the panel's weights are in L2 and
   arithmetic, not reading them, is the limit: out[m, 0:VL*NV] for ROWS rows over the whole K,
   accumulators in registers (ROWS x NV of them). */
#define TILE(ROWS, NV)                                                                        \
static void FN(tile_##ROWS##_##NV)(const T *a, int64_t lda, const T *w, int64_t ldk,         \
                                   T *out, int64_t ldo, int64_t K) {                          \
    vf acc[ROWS][NV];                                                                         \
    _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                                   \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[m][v] = (vf){0};            \
    for (int64_t k = 0; k < K; k++) {                                                         \
        const T *wk = w + k * ldk;                                                            \
        vf wv[NV];                                                                            \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) wv[v] = LOADV(wk + VL * v);     \
        _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++) {                             \
            float x = GET(a + m * lda + k);                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[m][v] += wv[v] * x;     \
        }                                                                                     \
    }                                                                                         \
    _Pragma("GCC unroll 8") for (int m = 0; m < ROWS; m++)                                   \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) STOREV(out + m * ldo + VL * v, acc[m][v]); \
}

/* narrow (one vector) and wide (TV vectors) tiles */
#define TILE_(ROWS, NV) TILE(ROWS, NV)  /* expands TV before TILE pastes it into the name */
#define TILES_OF(ROWS) TILE(ROWS, 1) TILE_(ROWS, TV)
TILES_OF(1) TILES_OF(2) TILES_OF(3) TILES_OF(4) TILES_OF(5) TILES_OF(6)
static void (*const FN(TILES)[MR][2])(const T *, int64_t, const T *, int64_t, T *, int64_t, int64_t) = {
    {FN(tile_1_1), FN(CAT(tile_1, TV))}, {FN(tile_2_1), FN(CAT(tile_2, TV))}, {FN(tile_3_1), FN(CAT(tile_3, TV))},
    {FN(tile_4_1), FN(CAT(tile_4, TV))}, {FN(tile_5_1), FN(CAT(tile_5, TV))}, {FN(tile_6_1), FN(CAT(tile_6, TV))}};
static void (*const FN(PANELS)[MR])(const T *, int64_t, const T *, int64_t, T *, int64_t, int64_t, int64_t) = {
    FN(panel_1), FN(panel_2), FN(panel_3), FN(panel_4), FN(panel_5), FN(panel_6)};

/* Strips, for experts / linears with STRIP_MIN rows or more: up to SR rows x VL * NV columns over
   the whole K in registers, the weights read straight from memory by the first SR rows and from
   L2 by the rest, while the first rows' pass also prefetches the next strip's weights (pf), so
   that reading memory and arithmetic overlap instead of taking turns. The prefetch goes to L2
   only (locality 2: prefetcht1): one strip ahead is K x 192 bytes (96 KiB at K = 512), which
   pulled into L1 evicted the token rows and the current strip's weights there; on the Zen 4
   test machine 1.5-2x the GFLOP/s at 8-16 rows from memory (docs/benchmarks.md). */
#define STRIP(NV)                                                                             \
static void FN(strip_##NV)(int rows, const T *a, int64_t lda, const T *w, int64_t ldk,       \
                           T *out, int64_t ldo, int64_t K, const T *pf) {                     \
    vf acc[SR][NV];                                                                           \
    _Pragma("GCC unroll 8") for (int m = 0; m < SR; m++)                                     \
        _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) acc[m][v] = (vf){0};            \
    for (int64_t k = 0; k < K; k++) {                                                         \
        const T *wk = w + k * ldk;                                                            \
        if (pf)                                                                               \
            for (uintptr_t c = (uintptr_t)(pf + k * ldk) & ~(uintptr_t)63;                 \
                 c < (uintptr_t)(pf + k * ldk + VL * NV); c += 64) /* each line of the row */ \
                __builtin_prefetch((const void *)c, 0, 2); /* into L2, not L1: see above */   \
        vf wv[NV];                                                                            \
        _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) wv[v] = LOADV(wk + VL * v);     \
        _Pragma("GCC unroll 8") for (int m = 0; m < SR; m++) {                               \
            if (m < rows) {                                                                   \
                float x = GET(a + m * lda + k);                                               \
                _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) acc[m][v] += wv[v] * x; \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    for (int m = 0; m < rows; m++)                                                            \
        for (int v = 0; v < NV; v++) STOREV(out + m * ldo + VL * v, acc[m][v]);              \
}
STRIP(1) STRIP(2) STRIP(3)  /* strips() uses the first SV of them */
static void (*const FN(STRIPS)[3])(int, const T *, int64_t, const T *, int64_t, T *, int64_t, int64_t,
                                   const T *) = {FN(strip_1), FN(strip_2), FN(strip_3)};

/* Columns n0 .. n0 + width (width % VL == 0) of rows lo .. hi of one expert, in strips of SV * VL
   columns (a narrower one at the end); next: where the following work item's weights start
   (prefetched during the last strip), or NULL. */
static void FN(strips)(const T *a, int64_t lda, const T *wp, int64_t ldk, T *out, int64_t ldo,
                       int64_t lo, int64_t hi, int64_t width, int64_t K, const T *next) {
    for (int64_t n = 0; n < width; n += SV * VL) {
        const int64_t nv = width - n >= SV * VL ? SV : (width - n) / VL;
        const T *pf = n + SV * VL < width ? wp + n + SV * VL : next;
        for (int64_t m = lo; m < hi; m += SR) {
            const int r = hi - m < SR ? (int)(hi - m) : SR;
            FN(STRIPS)[nv - 1](r, a + m * lda, lda, wp + n, ldk, out + m * ldo + n, ldo, K, m == lo ? pf : NULL);
        }
    }
}


/* Split-K (use_kchunks): each touched expert's weight cut into column panels as wide as a partial
   sum in L1 allows (all N where it fits) and K-ranges of them; each (panel, K-range) work item
   streams its block (runs of the panel's width, contiguous where the panel is all of N) into a
   partial sum of its own. Then each panel's partial sums are added in K order and rounded once
   into out. */
static int FN(grouped_kchunks)(const T *a, int64_t lda, const T *w, int64_t lde, int64_t ldk,
                               T *out, int64_t ldo, const int32_t *offs, int64_t E, int64_t N,
                               int64_t K, int64_t touched, int64_t most, int num_threads) {
    int64_t width = KCHUNK_ACC / most / 16 * 16;
    if (width > N) width = N;
    const int64_t panels = (N + width - 1) / width;       /* per expert */
    int64_t chunks = (8 * num_threads + touched * panels - 1) / (touched * panels);   /* per panel */
    int64_t len = (K + chunks - 1) / chunks;
    len = (len + KS - 1) / KS * KS;
    if (len < KCHUNK_MIN_K) len = KCHUNK_MIN_K;
    chunks = (K + len - 1) / len;
    const int64_t n_items = touched * panels * chunks, part = most * width;
    int64_t *experts = malloc(sizeof(int64_t) * (size_t)touched);
    float *parts = malloc(sizeof(float) * (size_t)(n_items * part));
    if (!experts || !parts) { free(experts); free(parts); return -1; }
    for (int64_t e = 0, t = 0; e < E; e++)
        if (offs[e] > (e ? offs[e - 1] : 0)) experts[t++] = e;
    #pragma omp parallel num_threads(num_threads)
    {
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n_items; i++) {       /* i = (expert * panels + panel) * chunks + chunk */
            const int64_t e = experts[i / (panels * chunks)], p = i / chunks % panels, c = i % chunks;
            const int64_t lo = e ? offs[e - 1] : 0, rows = offs[e] - lo;
            const int64_t n0 = p * width, nw = N - n0 < width ? N - n0 : width;
            const int64_t k0 = c * len, k1 = k0 + len < K ? k0 + len : K;
            FN(KCHUNKS)[rows - 1](a + lo * lda, lda, w + e * lde + n0, ldk, parts + i * part, k0, k1, nw);
        }
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < touched * panels; t++) {
            const int64_t e = experts[t / panels], lo = e ? offs[e - 1] : 0, rows = offs[e] - lo;
            const int64_t n0 = t % panels * width, nw = N - n0 < width ? N - n0 : width;
            const float *p0 = parts + t * chunks * part;
            for (int64_t m = 0; m < rows; m++)
                for (int64_t n = 0; n < nw; n += VL) {
                    vf s = loadv_f32(p0 + m * nw + n);
                    for (int64_t c = 1; c < chunks; c++) s += loadv_f32(p0 + c * part + m * nw + n);
                    STOREV(out + (lo + m) * ldo + n0 + n, s);
                }
        }
    }
    free(experts);
    free(parts);
    return 0;
}

/* Returns 0, or -1 when N is not a multiple of 16 or memory runs out. */
int FN(herd_grouped_gemm)(const T *a, int64_t lda, const T *w, int64_t lde, int64_t ldk,
                          T *out, int64_t ldo, const int32_t *offs, int64_t E, int64_t N,
                          int64_t K, int num_threads) {
    if (N % 16 != 0 || num_threads < 1) return -1;
    int64_t touched = 0, most = 0;  /* experts with rows, and the most rows of one */
    for (int64_t e = 0; e < E; e++) {
        const int64_t r = offs[e] - (e ? offs[e - 1] : 0);
        touched += r > 0;
        if (r > most) most = r;
    }
    if (use_kchunks(most, K))
        return FN(grouped_kchunks)(a, lda, w, lde, ldk, out, ldo, offs, E, N, K, touched, most, num_threads);
    /* panel width: NW, or narrower so that there are at least 4 panels per thread */
    int64_t per_expert = (4 * num_threads + touched - 1) / (touched ? touched : 1);
    int64_t nw = (N + per_expert - 1) / per_expert;
    /* whole strips when some expert has rows enough for them, else 16 columns */
    const int64_t q = use_strips(most, K) ? SV * VL : 16;
    nw = (nw + q - 1) / q * q;
    if (nw > NW) nw = NW / q * q;
    int64_t l2 = panel_bytes() / (int64_t)sizeof(T) / (K > 0 ? K : 1) / q * q;  /* nw x K weights in L2 */
    if (nw > l2) nw = l2 > q ? l2 : q;
    if (nw > N) nw = N;
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
        if (use_strips(hi - lo, K)) {
            const T *next = NULL;
            if (i + 1 < n_items) {
                const int64_t e1 = items[i + 1] / T_, n1 = (items[i + 1] % T_) * nw;
                next = w + e1 * lde + n1;
            }
            FN(strips)(a, lda, wp, ldk, out + n0, ldo, lo, hi, width, K, next);
            continue;
        }
        /* first pass: the panel streams its weights from memory into L2 ... */
        int rows = hi - lo < MR ? (int)(hi - lo) : MR;
        FN(PANELS)[rows - 1](a + lo * lda, lda, wp, ldk, out + lo * ldo + n0, ldo, K, width);
        /* ... later rows reread them from there in register tiles */
        for (int64_t m = lo + rows; m < hi; m += MR) {
            int r = hi - m < MR ? (int)(hi - m) : MR;
            for (int64_t n = 0; n < width;) {
                int wide = n + TV * VL <= width;
                FN(TILES)[r - 1][wide](a + m * lda, lda, wp + n, ldk, out + m * ldo + n0 + n, ldo, K);
                n += wide ? TV * VL : VL;
            }
        }
    }
    free(items);
    return 0;
}

/* Row-major weights (the layout F.linear takes; herd keeps bf16 dense linears so): out[M, N] =
   a[M, K] @ W^T with W [N, K], row n at w + n * ldw, for decode-sized M. Each thread streams a
   contiguous range of whole weight rows, GR at a time, and dots each with MB token rows in
   vector accumulators (a's rows stay in L1); horizontal sums at the end of a row group. */
#define GR 4   /* weight rows per step */
#define MB 2   /* token rows per pass over a group's rows (8 accumulators: fits 16 registers) */
int FN(herd_gemv_rm)(const T *a, int64_t lda, const T *w, int64_t ldw, T *out, int64_t ldo,
                     int64_t M, int64_t N, int64_t K, int num_threads) {
    if (num_threads < 1 || M < 1) return -1;
#if IS_BF16 && defined(HAVE_BF16_DOT)
    return gemv_rm_bf16_dp(a, lda, w, ldw, out, ldo, M, N, K, num_threads);
#endif
    const int64_t groups = (N + GR - 1) / GR, kv = K / VL * VL;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n0 = g * GR, nr = N - n0 < GR ? N - n0 : GR;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mr = M - m0 < MB ? M - m0 : MB;
            vf acc[GR][MB];
            for (int r = 0; r < GR; r++)
                for (int m = 0; m < MB; m++) acc[r][m] = (vf){0};
            for (int64_t k = 0; k < kv; k += VL) {
                vf x[MB];
                for (int m = 0; m < MB; m++) x[m] = m < mr ? LOADV(a + (m0 + m) * lda + k) : (vf){0};
                _Pragma("GCC unroll 4") for (int r = 0; r < GR; r++) {
                    if (r < nr) {
                        const vf wv = LOADV(w + (n0 + r) * ldw + k);
                        _Pragma("GCC unroll 2") for (int m = 0; m < MB; m++) acc[r][m] += wv * x[m];
                    }
                }
            }
            for (int64_t r = 0; r < nr; r++)
                for (int64_t m = 0; m < mr; m++) {
                    float sum = 0.f;
                    for (int i = 0; i < VL; i++) sum += acc[r][m][i];
                    for (int64_t k = kv; k < K; k++) sum += GET(w + (n0 + r) * ldw + k) * GET(a + (m0 + m) * lda + k);
                    STORE1(out + (m0 + m) * ldo + n0 + r, sum);
                }
        }
    }
    return 0;
}
#undef GR
#undef MB

/* Dense: out[M, N] = a[M, K] @ W^T, W [N, K] K-major (element (n, k) at w + k * ldk + n). */
int FN(herd_linear)(const T *a, int64_t lda, const T *w, int64_t ldk, T *out, int64_t ldo,
                    int64_t M, int64_t N, int64_t K, int num_threads) {
    const int32_t offs[1] = {(int32_t)M};
    return FN(herd_grouped_gemm)(a, lda, w, 0, ldk, out, ldo, offs, 1, N, K, num_threads);
}

#undef PANEL
#undef KCHUNK
#undef STRIP
#undef TILE
#undef TILES_OF
#undef TILE_
#undef FN
#undef LOADV
#undef STOREV
#undef GET
#undef STORE1
