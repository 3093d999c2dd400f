/* A Llama layer's element-wise work on float32 CPU rows, one call each where torch runs several operators:
 * RMSNorm (with the residual add before it), rotary embedding in place, and SiLU(gate) * up.
 *
 * At decode sizes each torch operator costs more in dispatch and in waking OpenMP threads than in work: at
 * 32 rows of builtin:small a norm took ~100 us and a rotary ~90 us inside a step, for a few microseconds of
 * arithmetic. These loops run on the calling thread, and share the work out over torch's OpenMP threads
 * only for prompt-sized inputs. Each row is computed alone in a fixed order.
 */
#include <math.h>
#include <stdint.h>

#include "fast_exp.h"

#define PARALLEL_FLOATS (1 << 17) /* inputs this large are worth waking the other threads for */

static void rms_norm_row(const float *x, const float *weight, float eps, int64_t dim, float *out) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < dim; d++) sum += x[d] * x[d];
    const float scale = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
    for (int64_t d = 0; d < dim; d++) out[d] = weight[d] * (x[d] * scale);
}

/* out[r] = RMSNorm(x[r]) * weight for each of `rows` rows of `dim` floats. */
void flover_rms_norm(const float *x, const float *weight, float eps, int64_t rows, int64_t dim, float *out) {
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * dim, weight, eps, dim, out + r * dim);
}

/* x[r] += delta[r] (the residual stream, in place), then out[r] = RMSNorm(x[r]) * weight. */
void flover_add_rms_norm(float *x, const float *delta, const float *weight, float eps, int64_t rows, int64_t dim,
                         float *out) {
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) row[d] += delta[r * dim + d];
        rms_norm_row(row, weight, eps, dim, out + r * dim);
    }
}

/* Rotate the first `heads` heads of each token's row in place (HF's rotate_half convention): x * cos +
 * rotate_half(x) * sin, with the token's own cos and sin rows of `head_dim` floats. */
void flover_rope(float *x, int64_t tokens, int64_t row_stride, int64_t heads, int64_t head_dim, const float *cos,
                 const float *sin) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (tokens * heads * head_dim >= PARALLEL_FLOATS)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *lo = x + t * row_stride + h * head_dim, *hi = lo + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = lo[i], b = hi[i];
                lo[i] = a * c[i] - b * s[i];
                hi[i] = b * c[half + i] + a * s[half + i];
            }
        }
    }
}

/* out[r] = SiLU(gate_up[r][:width]) * gate_up[r][width:], for `rows` rows of 2 * width floats. */
void flover_silu_mul(const float *gate_up, int64_t rows, int64_t width, float *out) {
#pragma omp parallel for schedule(static) if (rows * width >= PARALLEL_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * width, *up = gate + width;
        float *o = out + r * width;
#pragma omp simd
        for (int64_t j = 0; j < width; j++) {
            const float g = gate[j], e = exp_nonpositive(g < 0.0f ? g : -g); /* e^-|g|, never overflows */
            o[j] = (g < 0.0f ? g * e : g) / (1.0f + e) * up[j];
        }
    }
}
