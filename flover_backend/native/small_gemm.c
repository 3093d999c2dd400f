/* y = x W^T (+ bias) for 1-12 rows of x, with W packed in panels of 32 output columns: [ceil(N/32)][K][32].
 *
 * At a few rows a linear layer is a stream of its weights. oneDNN's packed matmul, laid out for the full
 * batch, reads them at ~20 GB/s here at 1-4 rows and gains little up to 12; each 32-column panel here is one
 * contiguous run that the hardware prefetcher follows, and each weight vector loaded feeds an FMA per row of
 * x. Threads take whole panels in order, so every thread streams one contiguous span. Each output is summed
 * over k in order, whatever the thread count.
 */
#include <stdint.h>
#include <string.h>

#define PANEL 32
#define MAX_ROWS 12

typedef float vec16 __attribute__((vector_size(64), aligned(4)));

static inline vec16 load16(const float *p) { vec16 v; memcpy(&v, p, sizeof v); return v; }
static inline vec16 splat16(float a) { return (vec16){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }

/* One panel of 32 output columns for `rows` (1-12) rows of x, written into acc[rows][32]. The row loop must be
 * unrolled so the 2 x rows accumulators stay in registers (12 rows: 24 of the 32 vector registers); left
 * rolled, 8 rows ran 1.6x slower than 4. */
static inline void panel(const float *x, int64_t rows, int64_t k_dim, const float *w, float *acc) {
    vec16 c[MAX_ROWS][2] = {{{0}}};
    switch (rows) {
#define ROWS_CASE(R)                                                             \
    case R:                                                                      \
        for (int64_t k = 0; k < k_dim; k++) {                                    \
            vec16 w0 = load16(w + k * PANEL), w1 = load16(w + k * PANEL + 16);   \
            _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) {                  \
                vec16 a = splat16(x[r * k_dim + k]);                             \
                c[r][0] += a * w0;                                               \
                c[r][1] += a * w1;                                               \
            }                                                                    \
        }                                                                        \
        break;
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
        ROWS_CASE(7) ROWS_CASE(8) ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11) ROWS_CASE(12)
#undef ROWS_CASE
    }
    for (int64_t r = 0; r < rows; r++) {
        memcpy(acc + r * PANEL, &c[r][0], sizeof(vec16));
        memcpy(acc + r * PANEL + 16, &c[r][1], sizeof(vec16));
    }
}

/* W (n, k) row-major -> panels [ceil(n/32)][k][32], columns past n zero. */
void flover_pack_panels(const float *w, int64_t n, int64_t k_dim, float *packed) {
    int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k = 0; k < k_dim; k++)
            for (int64_t j = 0; j < PANEL; j++) {
                int64_t col = p * PANEL + j;
                packed[(p * k_dim + k) * PANEL + j] = col < n ? w[col * k_dim + k] : 0.0f;
            }
}

/* y (rows, n) = x (rows, k) W^T + bias (may be NULL); rows in [1, 12]: at 16 rows oneDNN is faster. */
void flover_small_linear(const float *x, int64_t rows, int64_t k_dim, const float *packed, const float *bias,
                         int64_t n, float *y) {
    int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        float acc[MAX_ROWS * PANEL];
        panel(x, rows, k_dim, packed + p * k_dim * PANEL, acc);
        int64_t width = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < width; j++)
                y[r * n + p * PANEL + j] = acc[r * PANEL + j] + (bias ? bias[p * PANEL + j] : 0.0f);
    }
}
