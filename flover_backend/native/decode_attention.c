/* A decode step's attention over the KV arena (float32, CPU): store each row's new key and value at its
 * write position, then attend with one query per row and head to that row's cached keys, read in place.
 *
 * The caches are addressed by strides (row, kv head, position; a head's values are contiguous), so the kernel
 * reads either arena layout. The engine's CPU arena is position-major, (rows, positions, kv heads, head_dim):
 * a row's visible keys for all its heads are then one contiguous span, which streams at near the memory's
 * rate, where a span per (row, head) read ~35% slower on this machine (measured, 32 rows x 76 positions).
 *
 * Rows whose first positions hold copies of one shared prefix (prefix reuse) are attended as a group: the
 * prefix's keys and values are read once from one of them (the group's reference) for all, where each row
 * would otherwise stream its own copy. 32 rows behind a shared 320-token prompt read 1/32 of those bytes.
 *
 * The work is split into items of (group, block of kv heads): a whole group per item when there are groups
 * enough for every thread, else its heads shared out. Each query head's result is computed in a fixed order
 * whatever the split or grouping: scores over the visible positions, softmax, the values' weighted sum in
 * position order. So neither what else is in the batch nor reading a shared prefix from another row's copy
 * changes a row's bits. Built by attention.py with -fopenmp (see build.py): the process's OpenMP runtime is
 * torch's own libgomp (already loaded, same soname), so the loop shares torch's threads.
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

/* Vectors of LANES floats with GCC's vector types. A vector statement is one operation per lane on every target
 * (two 8-float halves on AVX2), so the lanes' arithmetic is the same wherever a function using them is inlined. */
#define LANES 16
typedef float Vec __attribute__((vector_size(LANES * sizeof(float))));

static inline Vec load(const float *at) {
    Vec v;
    __builtin_memcpy(&v, at, sizeof v);
    return v;
}

/* The first `count` (<= LANES) floats from `at`, zeros after. */
static inline Vec load_part(const float *at, int64_t count) {
    Vec v = {0.0f};
    __builtin_memcpy(&v, at, sizeof(float) * (size_t)count);
    return v;
}

/* Every score is made here: the dots of `a` with b0..b3, each as LANES running sums (lane l takes d = l, l + LANES,
 * ...), each a chain of multiply-adds, then a fixed tree, reduced side by side (a's loads and the tree's shuffles
 * shared by four scores). Spelled out rather than left to `omp simd reduction`, whose order the compiler picks per
 * loop: a score's bits must not depend on which loop computes it. */
static inline __attribute__((always_inline)) void dot4(const float *a, const float *b0, const float *b1,
                                                       const float *b2, const float *b3, int64_t n, float *out) {
    Vec s0 = {0.0f}, s1 = {0.0f}, s2 = {0.0f}, s3 = {0.0f};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES) {
        const Vec x = load(a + d);
        s0 = x * load(b0 + d) + s0;
        s1 = x * load(b1 + d) + s1;
        s2 = x * load(b2 + d) + s2;
        s3 = x * load(b3 + d) + s3;
    }
    if (d < n) {
        const Vec x = load_part(a + d, n - d);
        s0 = x * load_part(b0 + d, n - d) + s0;
        s1 = x * load_part(b1 + d, n - d) + s1;
        s2 = x * load_part(b2 + d, n - d) + s2;
        s3 = x * load_part(b3 + d, n - d) + s3;
    }
    typedef float Half __attribute__((vector_size(LANES / 2 * sizeof(float))));
    typedef float Quarter __attribute__((vector_size(LANES / 4 * sizeof(float))));
    /* Halves: lanes 0-7 of h01 are score 0's lanes l + lanes l + 8, lanes 8-15 score 1's. */
    const Vec h01 = __builtin_shufflevector(s0, s1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(s0, s1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const Vec h23 = __builtin_shufflevector(s2, s3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(s2, s3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    /* Quarters: lanes 4i..4i+3 are score i's r[0..3], each a half's lane plus the lane 4 after it. */
    const Vec r = __builtin_shufflevector(h01, h23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(h01, h23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    /* (r[0] + r[2]) and (r[1] + r[3]) of each score, then their sum. */
    const Half pairs = __builtin_shufflevector(r, r, 0, 1, 4, 5, 8, 9, 12, 13) +
                       __builtin_shufflevector(r, r, 2, 3, 6, 7, 10, 11, 14, 15);
    const Quarter sums =
        __builtin_shufflevector(pairs, pairs, 0, 2, 4, 6) + __builtin_shufflevector(pairs, pairs, 1, 3, 5, 7);
    __builtin_memcpy(out, &sums, sizeof sums);
}

/* Positions are taken TILE at a time, so a tile's keys or values (for a block of heads) stay in the L1 cache
 * while every member of a group and every query head reads them. */
#define TILE 8

/* probs[s - offset] = scale * q . keys(s) for s in [from, to): one query head against one kv head's keys, four
 * positions at a time (a last short group repeats its last position and keeps only its own scores). */
static inline void score_tile(const float *qv, const float *keys, int64_t position_stride, int64_t from, int64_t to,
                              int64_t head_dim, float scale, float *probs, int64_t offset) {
    for (int64_t s = from; s < to; s += 4) {
        const float *at[4];
        for (int i = 0; i < 4; i++) at[i] = keys + (s + i < to ? s + i : to - 1) * position_stride;
        float four[4];
        dot4(qv, at[0], at[1], at[2], at[3], head_dim, four);
        for (int i = 0; i < 4 && s + i < to; i++) probs[s + i - offset] = four[i] * scale;
    }
}

/* out += sum over s in [from, to), in that order, of probs[s - offset] * values(s): each element one chain of
 * multiply-adds, kept in registers across the tile. Four chunks of LANES elements at a time, so four independent
 * chains hide the multiply-add's latency. */
static inline void weigh_tile(float *out, const float *values, int64_t position_stride, int64_t from, int64_t to,
                              int64_t head_dim, const float *probs, int64_t offset) {
    int64_t d = 0;
    for (; d + 4 * LANES <= head_dim; d += 4 * LANES) {
        Vec a0 = load(out + d), a1 = load(out + d + LANES), a2 = load(out + d + 2 * LANES),
            a3 = load(out + d + 3 * LANES);
        for (int64_t s = from; s < to; s++) {
            const float weight = probs[s - offset], *v = values + s * position_stride + d;
            a0 = weight * load(v) + a0;
            a1 = weight * load(v + LANES) + a1;
            a2 = weight * load(v + 2 * LANES) + a2;
            a3 = weight * load(v + 3 * LANES) + a3;
        }
        __builtin_memcpy(out + d, &a0, sizeof a0);
        __builtin_memcpy(out + d + LANES, &a1, sizeof a1);
        __builtin_memcpy(out + d + 2 * LANES, &a2, sizeof a2);
        __builtin_memcpy(out + d + 3 * LANES, &a3, sizeof a3);
    }
    for (; d < head_dim; d += LANES) {
        const int64_t width = head_dim - d < LANES ? head_dim - d : LANES;
        Vec acc = load_part(out + d, width);
        for (int64_t s = from; s < to; s++)
            acc = probs[s - offset] * load_part(values + s * position_stride + d, width) + acc;
        __builtin_memcpy(out + d, &acc, sizeof(float) * (size_t)width);
    }
}

/* What member `row` of a group reads: positions [start, end), of which [start, share) from the group's reference. */
typedef struct {
    int64_t row, start, end, share;
} Member;

static inline Member member(int64_t row, const int64_t *shared, const int64_t *starts, const int64_t *ends,
                            int64_t max_positions) {
    /* Clamped to the row, so no value handed in can make the kernel read outside the arena. */
    const int64_t start = starts[row] < 0 ? 0 : starts[row];
    const int64_t end = ends[row] > max_positions ? max_positions : ends[row];
    int64_t share = shared != NULL && start == 0 ? shared[row] : 0; /* a window's rows read their own keys */
    share = share < 0 ? 0 : share > end ? end : share;
    return (Member){row, start, end, share};
}

/* The softmax of one query head's `count` scores, in place. Called from one place, so its vectorized sum runs
 * in one order for every row. */
static inline void softmax(float *p, int64_t count) {
    float top = -INFINITY, total = 0.0f;
#pragma omp simd reduction(max : top) /* a maximum is the same in any order */
    for (int64_t s = 0; s < count; s++) top = p[s] > top ? p[s] : top;
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < count; s++) {
        p[s] = exp_nonpositive(p[s] - top);
        total += p[s];
    }
    const float inv = 1.0f / total;
    for (int64_t s = 0; s < count; s++) p[s] *= inv;
}

/* Rows that hold the same keys for their first positions (copies of one prefix), attended together for a block
 * of kv heads from `first`: `members` are the rows, the first of them the reference, which holds the shared
 * positions of all the others. A member's positions [0, share) are read from the reference, once for every
 * member, the rest from its own row. Each (row, query head) still gets its scores, softmax and weighted sum of
 * values with the same arithmetic in the same order as a row alone gets them, and the reference's keys are the
 * member's own bits, so sharing changes no bit of any result: only how often the shared keys are read. A group
 * of one is a row alone. `probs` holds num_members x num_queries x max_positions floats. */
static void attend_group(const float *q, const float *k_cache, const float *v_cache, Strides strides,
                         const int64_t *members, int64_t num_members, const int64_t *shared, const int64_t *starts,
                         const int64_t *ends, int64_t first, int64_t num_queries, int64_t group, int64_t num_heads,
                         int64_t head_dim, int64_t max_positions, float scale, float *probs, float *out) {
    const int64_t reference = members[0] * strides.row + first * strides.head, width = num_queries * head_dim;
    const int64_t pos = strides.position;
    int64_t top_shared = 0;
    for (int64_t i = 0; i < num_members; i++) {
        const Member m = member(members[i], shared, starts, ends, max_positions);
        top_shared = m.share > top_shared ? m.share : top_shared;
        float *o = out + (m.row * num_heads + first * group) * head_dim;
        for (int64_t d = 0; d < width; d++) o[d] = 0.0f;
    }
    /* Scores: the shared keys a tile at a time for every member, then each member's own keys, then its softmax. */
    for (int64_t tile = 0; tile < top_shared; tile += TILE) {
        for (int64_t i = 0; i < num_members; i++) {
            const Member m = member(members[i], shared, starts, ends, max_positions);
            const int64_t to = tile + TILE < m.share ? tile + TILE : m.share;
            const float *qs = q + (m.row * num_heads + first * group) * head_dim;
            for (int64_t j = 0; j < num_queries && tile < to; j++)
                score_tile(qs + j * head_dim, k_cache + reference + (j / group) * strides.head, pos, tile, to,
                           head_dim, scale, probs + (i * num_queries + j) * max_positions, 0);
        }
    }
    for (int64_t i = 0; i < num_members; i++) {
        const Member m = member(members[i], shared, starts, ends, max_positions);
        const float *qs = q + (m.row * num_heads + first * group) * head_dim;
        const float *keys = k_cache + m.row * strides.row + first * strides.head;
        const int64_t own = m.share > m.start ? m.share : m.start;
        float *p = probs + i * num_queries * max_positions;
        for (int64_t tile = own; tile < m.end; tile += 4) { /* near memory order: a position's heads are adjacent */
            const int64_t to = tile + 4 < m.end ? tile + 4 : m.end;
            for (int64_t j = 0; j < num_queries; j++)
                score_tile(qs + j * head_dim, keys + (j / group) * strides.head, pos, tile, to, head_dim, scale,
                           p + j * max_positions, m.start);
        }
        for (int64_t j = 0; j < num_queries && m.end > m.start; j++) softmax(p + j * max_positions, m.end - m.start);
    }
    /* Values in position order: the shared ones a tile at a time for every member, then each member's own. */
    for (int64_t tile = 0; tile < top_shared; tile += TILE) {
        for (int64_t i = 0; i < num_members; i++) {
            const Member m = member(members[i], shared, starts, ends, max_positions);
            const int64_t to = tile + TILE < m.share ? tile + TILE : m.share;
            float *os = out + (m.row * num_heads + first * group) * head_dim;
            for (int64_t j = 0; j < num_queries && tile < to; j++)
                weigh_tile(os + j * head_dim, v_cache + reference + (j / group) * strides.head, pos, tile, to,
                           head_dim, probs + (i * num_queries + j) * max_positions, 0);
        }
    }
    for (int64_t i = 0; i < num_members; i++) {
        const Member m = member(members[i], shared, starts, ends, max_positions);
        float *os = out + (m.row * num_heads + first * group) * head_dim;
        const float *values = v_cache + m.row * strides.row + first * strides.head;
        const int64_t own = m.share > m.start ? m.share : m.start;
        for (int64_t tile = own; tile < m.end; tile += TILE) {
            const int64_t to = tile + TILE < m.end ? tile + TILE : m.end;
            for (int64_t j = 0; j < num_queries; j++)
                weigh_tile(os + j * head_dim, values + (j / group) * strides.head, pos, tile, to, head_dim,
                           probs + (i * num_queries + j) * max_positions, m.start);
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
                             const int64_t *order,  /* (rows,) every row once, grouped; NULL: a group per row */
                             const int64_t *group_starts, /* (num_groups + 1,) each group's first index in order */
                             int64_t num_groups,
                             const int64_t *shared, /* (rows,) leading positions read from the group's first row */
                             float *out,            /* (rows, num_heads, head_dim) */
                             int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t max_positions, float scale) {
    const Strides strides = {row_stride, head_stride, position_stride};
    const int64_t group = num_heads / num_kv_heads;
    if (order == NULL) num_groups = rows;
    int64_t largest = 1;
    for (int64_t g = 0; order != NULL && g < num_groups; g++) {
        const int64_t size = group_starts[g + 1] - group_starts[g];
        largest = size > largest ? size : largest;
    }
    /* Blocks enough that every thread gets two items, when the groups alone do not give it them. */
    int64_t blocks = (2 * omp_get_max_threads() + num_groups - 1) / num_groups;
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
        float *probs = malloc(sizeof(float) * (size_t)(largest * max_positions * heads_per_block * group));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < num_groups * blocks; item++) {
            const int64_t g = item / blocks, first = (item % blocks) * heads_per_block;
            const int64_t last = first + heads_per_block < num_kv_heads ? first + heads_per_block : num_kv_heads;
            const int64_t *members = order == NULL ? &g : order + group_starts[g];
            const int64_t count = order == NULL ? 1 : group_starts[g + 1] - group_starts[g];
            attend_group(q, k_cache, v_cache, strides, members, count, order == NULL ? NULL : shared,
                         starts, ends, first, (last - first) * group, group, num_heads, head_dim, max_positions,
                         scale, probs, out);
        }
        free(probs);
    }
}
