/* The batched sampling pass of sampling_pass.py for float32 logits on the CPU: each row's floor (the lowest
 * logit its top-k and top-p let it draw), then its exponential race, from the row's own noise.
 *
 * For the floor, a row's tokens are binned by how far below the row's top they lie in scaled logits (BINS_PER_NAT bins a
 * nat), counting tokens and summing their probability mass per bin; walking the bins from the top finds the
 * one bin holding the k-th token and the one where the nucleus ends, and only those are sorted. So a row
 * costs two passes over its logits whatever the size of its nucleus, where ranking the nucleus first costs
 * a topk as wide as it. The race then reads the masses already computed. Each row is computed alone, in a
 * fixed order, so its token depends on its logits, settings and noise only, never on the batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NUM_BINS 1024
#define BINS_PER_NAT 8.0f /* the bins span 128 nats below the top: past ~87 a mass is 0 in float32 */

typedef struct {
    float logit;
    float mass;
} Entry;

static int by_logit_descending(const void *a, const void *b) {
    const float x = ((const Entry *)a)->logit, y = ((const Entry *)b)->logit;
    return (x < y) - (x > y);
}

/* e^x for x <= 0 (Cephes' expf: range reduction by ln 2, degree-6 polynomial, within 2 ulp), written so that
 * the compiler vectorizes it; 0 below -87, where float32 leaves the normal range. */
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    const float n = rintf(clamped * 1.44269504088896341f);
    const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : y * scale;
}

/* The bin of a token `x` nats (scaled logits) below its row's top; the last bin holds every token past the span. */
static inline uint16_t bin_of(float x) {
    const float distance = x < 0.0f ? -x * BINS_PER_NAT : 0.0f;
    return (uint16_t)(distance < (float)(NUM_BINS - 1) ? distance : (float)(NUM_BINS - 1));
}

/* The entries of `bin` whose logit is at least `least`, sorted by logit, largest first; returns their count. */
static int64_t sorted_bin(const float *logits, const float *mass, const uint16_t *bins, int64_t vocab, int bin,
                          float least, Entry *entries) {
    int64_t count = 0;
    for (int64_t i = 0; i < vocab; i++) {
        if (bins[i] == bin && logits[i] >= least) {
            entries[count].logit = logits[i];
            entries[count].mass = mass[i];
            count++;
        }
    }
    qsort(entries, (size_t)count, sizeof(Entry), by_logit_descending);
    return count;
}

/* The floor of one row whose largest scaled logit is `top`, its tokens' masses `mass` (relative to the top
 * token's): its k-th largest logit under top-k (k > 0), raised to the lowest logit of its nucleus under top-p
 * (p < 1): a token stays while the mass ranked before it is under p of the mass top-k keeps. Tokens tied with
 * the floor stay. -INFINITY keeps every token. */
static float row_floor(const float *logits, const float *mass, int64_t vocab, float temperature, float top,
                       int64_t top_k, float top_p, uint16_t *bins, Entry *entries) {
    if (top_k <= 0 && !(top_p < 1.0f))
        return -INFINITY;
    int64_t counts[NUM_BINS] = {0};
    double bin_mass[NUM_BINS] = {0.0};
#pragma omp simd
    for (int64_t i = 0; i < vocab; i++)
        bins[i] = bin_of(logits[i] / temperature - top);
    for (int64_t i = 0; i < vocab; i++) {
        counts[bins[i]]++;
        bin_mass[bins[i]] += mass[i];
    }
    float floor = -INFINITY;
    int last_bin = NUM_BINS - 1; /* the lowest bin top-k keeps tokens of */
    double last_bin_mass = bin_mass[last_bin];
    int64_t sorted = -1; /* how many entries of last_bin are sorted in `entries`, once they are */
    if (top_k > 0 && top_k < vocab) {
        int64_t above = 0;
        for (last_bin = 0; above + counts[last_bin] < top_k; last_bin++)
            above += counts[last_bin];
        sorted = sorted_bin(logits, mass, bins, vocab, last_bin, -INFINITY, entries);
        floor = entries[top_k - above - 1].logit;
        while (sorted > 0 && entries[sorted - 1].logit < floor)
            sorted--;
        last_bin_mass = 0.0;
        for (int64_t j = 0; j < sorted; j++)
            last_bin_mass += entries[j].mass;
    }
    if (!(top_p < 1.0f))
        return floor;
    double total = last_bin_mass;
    for (int bin = 0; bin < last_bin; bin++)
        total += bin_mass[bin];
    const double target = (double)top_p * total;
    double before = 0.0;
    for (int bin = 0; bin <= last_bin; bin++) {
        const double kept = bin == last_bin ? last_bin_mass : bin_mass[bin];
        if (before + kept < target) {
            before += kept;
            continue;
        }
        const int64_t count = bin == last_bin && sorted >= 0
                                  ? sorted
                                  : sorted_bin(logits, mass, bins, vocab, bin, floor, entries);
        for (int64_t j = 0; j < count && before < target;) {
            const float value = entries[j].logit;
            floor = value; /* the entries are at least the top-k floor, largest first */
            for (; j < count && entries[j].logit == value; j++)
                before += entries[j].mass;
        }
        break;
    }
    return floor; /* the target not reached (rounding): top-p keeps all that top-k does */
}

/* The exponential race over one row's tokens at or above `floor`, in two levels as sampling_pass.py runs it:
 * the block whose kept mass wins log(mass) - block_noise[block], then the token of that block whose scaled
 * logit wins logit / temperature - token_noise[position]. Ties go to the lower id, as torch's argmax. */
static int64_t row_race(const float *logits, const float *mass, int64_t vocab, int64_t block_size,
                        float temperature, float floor, const float *block_noise, const float *token_noise) {
    int64_t best_block = 0;
    float best_score = -INFINITY;
    for (int64_t block = 0; block * block_size < vocab; block++) {
        const int64_t first = block * block_size, last = first + block_size < vocab ? first + block_size : vocab;
        double kept = 0.0;
        for (int64_t i = first; i < last; i++)
            kept += logits[i] >= floor ? mass[i] : 0.0f;
        const float score = kept > 0.0 ? (float)log(kept) - block_noise[block] : -INFINITY;
        if (score > best_score) {
            best_score = score;
            best_block = block;
        }
    }
    const int64_t first = best_block * block_size;
    int64_t best_token = first;
    best_score = -INFINITY;
    for (int64_t i = first; i < first + block_size && i < vocab; i++) {
        const float score = logits[i] >= floor ? logits[i] / temperature - token_noise[i - first] : -INFINITY;
        if (score > best_score) {
            best_score = score;
            best_token = i;
        }
    }
    return best_token;
}

/* Returns 0, or -1 where a thread's scratch memory could not be allocated (then the outputs are incomplete). */
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
    const int64_t num_blocks = (vocab + block_size - 1) / block_size;
    int status = 0;
#pragma omp parallel
    {
        float *mass = malloc((size_t)vocab * sizeof(float));
        uint16_t *bins = malloc((size_t)vocab * sizeof(uint16_t));
        Entry *entries = malloc((size_t)vocab * sizeof(Entry));
        const int allocated = mass != NULL && bins != NULL && entries != NULL;
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
#pragma omp simd
            for (int64_t i = 0; i < vocab; i++) {
                const float x = row_logits[i] / row_temperature - row_top;
                mass[i] = exp_nonpositive(x < 0.0f ? x : 0.0f);
            }
            floors[row] = row_floor(row_logits, mass, vocab, row_temperature, row_top, top_k[row], top_p[row],
                                    bins, entries);
            const float *noise = log_noise + row * noise_width;
            tokens[row] = row_race(row_logits, mass, vocab, block_size, row_temperature, floors[row], noise,
                                   noise + num_blocks);
        }
        free(mass);
        free(bins);
        free(entries);
    }
    return status;
}
