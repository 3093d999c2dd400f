/* A decode step's attention over the KV arena (float32, CPU): store each row's new key and value at its
 * write position, then attend with one query per row to that row's cached keys, read in place.
 *
 * For each (row, head): scores over the row's visible positions [start, end), softmax, weighted sum of the
 * values. Each (row, head) is computed alone with a fixed loop order, so its result does not depend on what
 * else is in the batch. Built by attention.py with -fopenmp (see build.py): the process's OpenMP runtime is
 * torch's own libgomp (already loaded, same soname), so the loop shares torch's threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

void flover_decode_attention(const float *q,        /* (rows, num_heads, head_dim), contiguous */
                             const float *k_new,    /* (rows, num_kv_heads, head_dim): this step's keys */
                             const float *v_new,
                             const int64_t *write_pos, /* (rows,) where each row's new key goes */
                             float *k_cache,        /* row 0, kv head 0, position 0 of this layer's keys */
                             float *v_cache,
                             int64_t row_stride,    /* floats between rows in the caches */
                             int64_t head_stride,   /* floats between kv heads */
                             const int64_t *starts, /* (rows,) first visible position */
                             const int64_t *ends,   /* (rows,) one past the last visible position */
                             float *out,            /* (rows, num_heads, head_dim) */
                             int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t max_positions, float scale) {
    const int64_t group = num_heads / num_kv_heads;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < rows * num_kv_heads; item++) {
            const int64_t row = item / num_kv_heads, head = item % num_kv_heads;
            if (write_pos[row] < 0 || write_pos[row] >= max_positions) continue; /* never outside the row */
            const int64_t at = row * row_stride + head * head_stride + write_pos[row] * head_dim;
            for (int64_t d = 0; d < head_dim; d++) {
                k_cache[at + d] = k_new[item * head_dim + d];
                v_cache[at + d] = v_new[item * head_dim + d];
            }
        } /* the loop's barrier: every key is stored before any row reads */
        float *probs = malloc(sizeof(float) * (size_t)max_positions);
        float *acc = malloc(sizeof(float) * (size_t)head_dim);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < rows * num_heads; item++) {
            const int64_t row = item / num_heads, head = item % num_heads;
            const float *qv = q + item * head_dim;
            const int64_t offset = row * row_stride + (head / group) * head_stride;
            const float *keys = k_cache + offset, *values = v_cache + offset;
            float *o = out + item * head_dim;
            /* Clamped to the row, so no value handed in can make the kernel read outside the arena. */
            const int64_t start = starts[row] < 0 ? 0 : starts[row];
            const int64_t end = ends[row] > max_positions ? max_positions : ends[row];
            for (int64_t d = 0; d < head_dim; d++) acc[d] = 0.0f;
            if (end <= start) {
                for (int64_t d = 0; d < head_dim; d++) o[d] = 0.0f;
                continue;
            }
            float top = -INFINITY;
            for (int64_t s = start; s < end; s++) {
                const float *k = keys + s * head_dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; d++) dot += qv[d] * k[d];
                dot *= scale;
                probs[s - start] = dot;
                top = dot > top ? dot : top;
            }
            float total = 0.0f;
            for (int64_t s = 0; s < end - start; s++) {
                probs[s] = expf(probs[s] - top);
                total += probs[s];
            }
            for (int64_t s = start; s < end; s++) {
                const float *v = values + s * head_dim;
                const float p = probs[s - start];
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) acc[d] += p * v[d];
            }
            const float inv = 1.0f / total;
            for (int64_t d = 0; d < head_dim; d++) o[d] = acc[d] * inv;
        }
        free(acc);
        free(probs);
    }
}
