/* The batched sampling pass of sampling_pass.py for float32 logits on the CPU: each row's floor (the lowest
 * logit its top-k and top-p let it draw), then its exponential race, from the row's own noise.
 *
 * One vectorized pass per row computes every token's mass and each block's mass and largest logit. The
 * blocks' maxima bound the floor from below (the k largest logits are no less than the k-th largest block
 * maximum; the nucleus reaches no lower than where the block maxima alone hold top_p of the mass), so only
 * the tokens above that bound are looked at again: few on peaked logits, all of them on flat ones. Those
 * are binned by distance below the top (BINS_PER_NAT bins a nat), counting tokens and summing mass per bin;
 * walking the bins from the top finds the bin of the k-th token and the bin where the nucleus ends, and only
 * those are sorted. The race weighs exactly only the blocks whose whole mass could still win. Each row is
 * computed alone, in a fixed order, so its token depends on its logits, settings and noise only, never on
 * where it sits in the batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

#define NUM_BINS 1024
#define BINS_PER_NAT 8.0f /* the bins span 128 nats below the top: past ~87 a mass is 0 in float32 */
#define LANES 16          /* one AVX-512 vector of floats: a block's sums run in this many lanes */

typedef struct {
    float logit;
    float mass;
} Entry;

static int by_logit_descending(const void *a, const void *b) {
    const float x = ((const Entry *)a)->logit, y = ((const Entry *)b)->logit;
    return (x < y) - (x > y);
}

static int by_float_descending(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* The bin of a token `x` nats (scaled logits) below its row's top; the last bin holds every token past the span. */
static inline uint16_t bin_of(float x) {
    const float distance = x < 0.0f ? -x * BINS_PER_NAT : 0.0f;
    return (uint16_t)(distance < (float)(NUM_BINS - 1) ? distance : (float)(NUM_BINS - 1));
}

/* The tokens of `bin` (by `bins`, parallel to `logits` and `mass`) whose logit is at least `least`, as
 * entries sorted by logit, largest first; returns their count. */
static int64_t sorted_bin(const float *logits, const float *mass, const uint16_t *bins, int64_t count, int bin,
                          float least, Entry *out) {
    int64_t kept = 0;
    for (int64_t i = 0; i < count; i++) {
        if (bins[i] == bin && logits[i] >= least) {
            out[kept].logit = logits[i];
            out[kept].mass = mass[i];
            kept++;
        }
    }
    qsort(out, (size_t)kept, sizeof(Entry), by_logit_descending);
    return kept;
}

/* Each token's mass relative to the row's top token (scaled logit `top`), and each block's mass and largest
 * logit; returns the row's whole mass. Lanes of 16 in a fixed order, so the sums depend on the row alone. */
static double weigh_blocks(const float *logits, int64_t num_blocks, int64_t block_size, float temperature,
                           float top, float *mass, double *block_mass, float *block_max) {
    double total = 0.0;
    for (int64_t block = 0; block < num_blocks; block++) {
        const float *block_logits = logits + block * block_size;
        float *block_masses = mass + block * block_size;
        float lane_mass[LANES] = {0.0f}, lane_max[LANES];
        for (int lane = 0; lane < LANES; lane++)
            lane_max[lane] = -INFINITY;
        for (int64_t j = 0; j < block_size; j += LANES) {
            for (int lane = 0; lane < LANES; lane++) {
                const float logit = block_logits[j + lane], x = logit / temperature - top;
                const float weight = exp_nonpositive(x < 0.0f ? x : 0.0f);
                block_masses[j + lane] = weight;
                lane_mass[lane] += weight;
                lane_max[lane] = logit > lane_max[lane] ? logit : lane_max[lane];
            }
        }
        double sum = 0.0;
        float largest = -INFINITY;
        for (int lane = 0; lane < LANES; lane++) {
            sum += lane_mass[lane];
            largest = lane_max[lane] > largest ? lane_max[lane] : largest;
        }
        block_mass[block] = sum;
        block_max[block] = largest;
        total += sum;
    }
    return total;
}

/* A logit no greater than the row's floor, from its blocks' maxima (sorted into `ranked`): the k-th largest
 * under top-k; without it, the largest maximum at which the maxima alone reach top_p of `total` (with a
 * margin for rounding); -INFINITY where neither bounds it. */
static float floor_bound(const float *block_max, int64_t num_blocks, float temperature, float top, int64_t top_k,
                         float top_p, double total, float *ranked) {
    memcpy(ranked, block_max, (size_t)num_blocks * sizeof(float));
    qsort(ranked, (size_t)num_blocks, sizeof(float), by_float_descending);
    if (top_k > 0)
        return top_k <= num_blocks ? ranked[top_k - 1] : -INFINITY;
    const double target = (double)top_p * total * (1.0 + 1e-6);
    double reached = 0.0;
    for (int64_t j = 0; j < num_blocks; j++) {
        const float x = ranked[j] / temperature - top;
        reached += exp_nonpositive(x < 0.0f ? x : 0.0f);
        if (reached >= target)
            return ranked[j];
    }
    return -INFINITY;
}

/* The floor of a row from `count` of its tokens (`logits`, `mass`), every token at or above a bound on it,
 * with masses relative to the top token, whose scaled logit is `top`: the k-th largest logit under top-k
 * (k > 0), raised to the lowest logit of the nucleus under top-p (p < 1): a token stays while the mass ranked
 * before it is under p of the mass top-k keeps (the row's whole mass `total` without top-k). Tokens tied with
 * the floor stay. */
static float tokens_floor(const float *logits, const float *mass, int64_t count, float temperature, float top,
                          int64_t top_k, float top_p, double total, uint16_t *bins, Entry *sorted) {
    int64_t counts[NUM_BINS] = {0};
    double bin_mass[NUM_BINS] = {0.0};
#pragma omp simd
    for (int64_t i = 0; i < count; i++)
        bins[i] = bin_of(logits[i] / temperature - top);
    for (int64_t i = 0; i < count; i++) {
        counts[bins[i]]++;
        bin_mass[bins[i]] += mass[i];
    }
    float floor = -INFINITY;
    int last_bin = NUM_BINS - 1; /* the lowest bin top-k keeps tokens of */
    double last_bin_mass = bin_mass[last_bin];
    int64_t num_sorted = -1; /* how many tokens of last_bin are in `sorted`, once they are */
    if (top_k > 0) {
        int64_t above = 0;
        for (last_bin = 0; above + counts[last_bin] < top_k; last_bin++)
            above += counts[last_bin];
        num_sorted = sorted_bin(logits, mass, bins, count, last_bin, -INFINITY, sorted);
        floor = sorted[top_k - above - 1].logit;
        while (num_sorted > 0 && sorted[num_sorted - 1].logit < floor)
            num_sorted--;
        last_bin_mass = 0.0;
        for (int64_t j = 0; j < num_sorted; j++)
            last_bin_mass += sorted[j].mass;
        total = last_bin_mass;
        for (int bin = 0; bin < last_bin; bin++)
            total += bin_mass[bin];
    }
    if (!(top_p < 1.0f))
        return floor;
    const double target = (double)top_p * total;
    double before = 0.0;
    for (int bin = 0; bin <= last_bin; bin++) {
        const double kept = bin == last_bin ? last_bin_mass : bin_mass[bin];
        if (before + kept < target) {
            before += kept;
            continue;
        }
        const int64_t in_bin = bin == last_bin && num_sorted >= 0
                                   ? num_sorted
                                   : sorted_bin(logits, mass, bins, count, bin, floor, sorted);
        for (int64_t j = 0; j < in_bin && before < target;) {
            const float value = sorted[j].logit;
            floor = value; /* the tokens are at least the top-k floor, largest first */
            for (; j < in_bin && sorted[j].logit == value; j++)
                before += sorted[j].mass;
        }
        break;
    }
    return floor; /* the target not reached (rounding): top-p keeps all that top-k does */
}

/* The tokens of the blocks reaching `least` whose logit is at least `least`, copied to `kept_logits` and
 * `kept_mass`; returns their count. */
static int64_t collect(const float *logits, const float *mass, int64_t num_blocks, int64_t block_size,
                       const float *block_max, float least, float *kept_logits, float *kept_mass) {
    int64_t count = 0;
    for (int64_t block = 0; block < num_blocks; block++) {
        if (block_max[block] < least)
            continue;
        for (int64_t i = block * block_size; i < (block + 1) * block_size; i++) {
            if (logits[i] >= least) {
                kept_logits[count] = logits[i];
                kept_mass[count] = mass[i];
                count++;
            }
        }
    }
    return count;
}

/* The exponential race over one row's tokens at or above `floor`, in two levels as sampling_pass.py runs it:
 * the block whose kept mass wins log(mass) - block_noise[block], then the token of that block whose scaled
 * logit wins logit / temperature - token_noise[position]. A block's kept mass is weighed only when its
 * whole mass could beat the best so far. Ties go to the lower id, as torch's argmax. */
static int64_t row_race(const float *logits, const float *mass, int64_t num_blocks, int64_t block_size,
                        float temperature, float floor, const double *block_mass, const float *block_max,
                        const float *block_noise, const float *token_noise) {
    int64_t best_block = 0;
    float best_score = -INFINITY;
    for (int64_t block = 0; block < num_blocks; block++) {
        if (block_max[block] < floor || !(block_mass[block] > 0.0))
            continue;
        float score = (float)log(block_mass[block]) - block_noise[block];
        if (!(score > best_score))
            continue;
        if (floor > -INFINITY) {
            double kept = 0.0;
            for (int64_t i = block * block_size; i < (block + 1) * block_size; i++)
                kept += logits[i] >= floor ? mass[i] : 0.0f;
            score = kept > 0.0 ? (float)log(kept) - block_noise[block] : -INFINITY;
        }
        if (score > best_score) {
            best_score = score;
            best_block = block;
        }
    }
    const int64_t first = best_block * block_size;
    int64_t best_token = first;
    best_score = -INFINITY;
    for (int64_t i = first; i < first + block_size; i++) {
        const float score = logits[i] >= floor ? logits[i] / temperature - token_noise[i - first] : -INFINITY;
        if (score > best_score) {
            best_score = score;
            best_token = i;
        }
    }
    return best_token;
}

/* Returns 0; -1 where a thread's scratch memory could not be allocated (then the outputs are incomplete), -2
 * where the vocabulary is not whole blocks of a multiple of LANES ids. */
int flover_sample(const float *logits,      /* (rows, vocab), rows `stride` floats apart */
                  int64_t rows, int64_t vocab, int64_t stride,
                  const float *temperature, /* (rows,) */
                  const float *top,         /* (rows,) each row's largest logit / its temperature, finite */
                  const int64_t *top_k,     /* (rows,) 0: no top-k */
                  const float *top_p,       /* (rows,) 1: no top-p */
                  const float *log_noise,   /* (rows, noise_width): per block of block_size ids, then per position */
                  int64_t noise_width, int64_t block_size,
                  float *floors,            /* (rows,) out: the lowest logit each row could draw */
                  int64_t *tokens) {        /* (rows,) out */
    if (block_size <= 0 || block_size % LANES != 0 || vocab % block_size != 0)
        return -2;
    const int64_t num_blocks = vocab / block_size;
    int status = 0;
#pragma omp parallel
    {
        float *mass = malloc((size_t)vocab * 3 * sizeof(float)); /* every token's, then the kept logits and mass */
        uint16_t *bins = malloc((size_t)vocab * sizeof(uint16_t));
        Entry *sorted = malloc((size_t)vocab * sizeof(Entry));
        double *block_mass = malloc((size_t)num_blocks * sizeof(double));
        float *block_max = malloc((size_t)num_blocks * 2 * sizeof(float)); /* the maxima, then ranked */
        const int allocated = mass && bins && sorted && block_mass && block_max;
        if (!allocated) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t row = 0; row < rows; row++) {
            if (!allocated)
                continue;
            const float *row_logits = logits + row * stride;
            const float row_temperature = temperature[row], row_top = top[row];
            const double total = weigh_blocks(row_logits, num_blocks, block_size, row_temperature, row_top, mass,
                                              block_mass, block_max);
            const int64_t row_top_k = top_k[row] < vocab ? top_k[row] : 0; /* k >= vocab keeps every token */
            float floor = -INFINITY;
            if (row_top_k > 0 || top_p[row] < 1.0f) {
                const float least = floor_bound(block_max, num_blocks, row_temperature, row_top, row_top_k,
                                                top_p[row], total, block_max + num_blocks);
                const float *kept_logits = row_logits, *kept_mass = mass; /* no bound: every token, in place */
                int64_t count = vocab;
                if (least > -INFINITY) {
                    float *copied_logits = mass + vocab, *copied_mass = mass + 2 * vocab;
                    count = collect(row_logits, mass, num_blocks, block_size, block_max, least, copied_logits,
                                    copied_mass);
                    kept_logits = copied_logits;
                    kept_mass = copied_mass;
                }
                floor = tokens_floor(kept_logits, kept_mass, count, row_temperature, row_top, row_top_k, top_p[row],
                                     total, bins, sorted);
            }
            floors[row] = floor;
            const float *noise = log_noise + row * noise_width;
            tokens[row] = row_race(row_logits, mass, num_blocks, block_size, row_temperature, floor, block_mass,
                                   block_max, noise, noise + num_blocks);
        }
        free(mass);
        free(bins);
        free(sorted);
        free(block_mass);
        free(block_max);
    }
    return status;
}
