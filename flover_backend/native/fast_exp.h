/* e^x for the kernels' softmaxes, written so that the compiler vectorizes it. */
#ifndef FLOVER_FAST_EXP_H
#define FLOVER_FAST_EXP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x for x <= 0 (Cephes' expf: range reduction by ln 2, degree-6 polynomial, within 2 ulp); 0 below -87,
 * where float32 leaves the normal range. */
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

#endif
