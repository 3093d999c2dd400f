/* A decode step's attention over the KV arena (float32, CPU): store each row's new key and value at its
 * write position, then attend with one query per row and head to that row's cached keys, read in place.
 *
 * The caches are addressed by strides (row, kv head, position; a head's values are contiguous), so the kernel
 * reads either arena layout. The engine's CPU arena is position-major, (rows, positions, kv heads, head_dim):
 * a row's visible keys for all its heads are then one contiguous span, which streams at near the memory's
 * rate, where a span per (row, head) read ~35% slower on this machine (measured, 32 rows x 76 positions).
 *
 * The work is split into items of (row, block of kv heads): a whole row per item when the batch has rows
 * enough for every thread, else its heads shared out. Each query head's result is computed in a fixed order
 * whatever the split: scores over the visible positions, softmax, the values' weighted sum. So what else is
 * in the batch never changes a row's bits. Built by attention.py with -fopenmp (see build.py): the
 * process's OpenMP runtime is torch's own libgomp (already loaded, same soname), so the loop shares torch's
 * threads.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

typedef struct {
    int64_t row, head, position; /* floats between consecutive rows, kv heads and positions */
} Strides;

/* One item's query heads (`num_queries` consecutive ones, sharing kv heads `group` at a time) against the
 * positions [start, start + count) of `keys` and `values`, which point at the item's first kv head. */
static void attend(const float *q, const float *keys, const float *values, Strides strides, int64_t start,
                   int64_t count, int64_t num_queries, int64_t group, int64_t head_dim, int64_t max_positions,
                   float scale, float *probs, float *out) {
    for (int64_t i = 0; i < num_queries * head_dim; i++) out[i] = 0.0f;
    if (count == 0) return;
    for (int64_t s = 0; s < count; s++) {
        const float *at = keys + (start + s) * strides.position;
        for (int64_t j = 0; j < num_queries; j++) {
            const float *k = at + (j / group) * strides.head, *qv = q + j * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; d++) dot += qv[d] * k[d];
            probs[j * max_positions + s] = dot * scale;
        }
    }
    for (int64_t j = 0; j < num_queries; j++) {
        float *p = probs + j * max_positions, top = -INFINITY, total = 0.0f;
        for (int64_t s = 0; s < count; s++) top = p[s] > top ? p[s] : top;
#pragma omp simd reduction(+ : total)
        for (int64_t s = 0; s < count; s++) {
            p[s] = exp_nonpositive(p[s] - top);
            total += p[s];
        }
        const float inv = 1.0f / total;
        for (int64_t s = 0; s < count; s++) p[s] *= inv;
    }
    for (int64_t s = 0; s < count; s++) {
        const float *at = values + (start + s) * strides.position;
        for (int64_t j = 0; j < num_queries; j++) {
            const float *v = at + (j / group) * strides.head, weight = probs[j * max_positions + s];
            float *o = out + j * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) o[d] += weight * v[d];
        }
    }
}

void flover_decode_attention(const float *q,        /* (rows, num_heads, head_dim), contiguous */
                             const float *k_new,    /* (rows, num_kv_heads, head_dim): this step's keys */
                             const float *v_new,
                             const int64_t *write_pos, /* (rows,) where each row's new key goes */
                             float *k_cache,        /* row 0, kv head 0, position 0 of this layer's keys */
                             float *v_cache,
                             int64_t row_stride, int64_t head_stride, int64_t position_stride,
                             const int64_t *starts, /* (rows,) first visible position */
                             const int64_t *ends,   /* (rows,) one past the last visible position */
                             float *out,            /* (rows, num_heads, head_dim) */
                             int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t max_positions, float scale) {
    const Strides strides = {row_stride, head_stride, position_stride};
    const int64_t group = num_heads / num_kv_heads;
    /* Blocks enough that every thread gets two items, when the rows alone do not give it them. */
    int64_t blocks = (2 * omp_get_max_threads() + rows - 1) / rows;
    blocks = blocks < 1 ? 1 : blocks > num_kv_heads ? num_kv_heads : blocks;
    const int64_t heads_per_block = (num_kv_heads + blocks - 1) / blocks;
    blocks = (num_kv_heads + heads_per_block - 1) / heads_per_block;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < rows * num_kv_heads; item++) {
            const int64_t row = item / num_kv_heads, head = item % num_kv_heads;
            if (write_pos[row] < 0 || write_pos[row] >= max_positions) continue; /* never outside the row */
            const int64_t at = row * row_stride + head * head_stride + write_pos[row] * position_stride;
            memcpy(k_cache + at, k_new + item * head_dim, sizeof(float) * (size_t)head_dim);
            memcpy(v_cache + at, v_new + item * head_dim, sizeof(float) * (size_t)head_dim);
        } /* the loop's barrier: every key is stored before any row reads */
        float *probs = malloc(sizeof(float) * (size_t)(max_positions * heads_per_block * group));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < rows * blocks; item++) {
            const int64_t row = item / blocks, first = (item % blocks) * heads_per_block;
            const int64_t last = first + heads_per_block < num_kv_heads ? first + heads_per_block : num_kv_heads;
            /* Clamped to the row, so no value handed in can make the kernel read outside the arena. */
            const int64_t start = starts[row] < 0 ? 0 : starts[row];
            const int64_t end = ends[row] > max_positions ? max_positions : ends[row];
            const int64_t offset = row * row_stride + first * head_stride;
            const int64_t query = (row * num_heads + first * group) * head_dim;
            attend(q + query, k_cache + offset, v_cache + offset, strides, start, end > start ? end - start : 0,
                   (last - first) * group, group, head_dim, max_positions, scale, probs, out + query);
        }
        free(probs);
    }
}
