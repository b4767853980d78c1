// f32 <-> f16 / bf16 conversions: exact bit patterns on edge values, every f16 value round-trips, and random
// f32 values round to the nearest representable value with ties to even (checked against double arithmetic).
#include <string.h>

#include "runtime/dtype.h"
#include "runtime/rng.h"
#include "test.h"

static float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static void check_f16(float x, uint16_t want) {
    uint16_t got = f32_to_f16(x);
    CHECK(got == want, "f32_to_f16(%a) = 0x%04x, want 0x%04x", (double)x, got, want);
}

static void check_bf16(uint32_t xbits, uint16_t want) {
    uint16_t got = f32_to_bf16(from_bits(xbits));
    CHECK(got == want, "f32_to_bf16(0x%08x) = 0x%04x, want 0x%04x", xbits, got, want);
}

// Nearest-even check for any rounding: neighbours of the chosen code must not be closer.
// Counted in one total (printing the first few) so that the pass count stays meaningful.
static int nearest_bad = 0;
static void check_nearest(float x, uint16_t code, float (*decode)(uint16_t), const char *what) {
    double v = decode(code), d = fabs((double)x - v);
    if (isinf(v)) return;  // overflow handled by the edge cases
    for (int delta = -1; delta <= 1; delta += 2) {
        uint16_t n = (uint16_t)(code + delta);
        double nv = decode(n);
        if (isnan(nv) || isinf(nv) || (nv < 0) != (v < 0)) continue;
        double nd = fabs((double)x - nv);
        int ok = d < nd || (d == nd && (code & 1) == 0);
        if (!ok && nearest_bad++ < 5)
            printf("FAIL %s(%a) -> 0x%04x (%g), but 0x%04x (%g) is %s\n", what, (double)x, code, v, n, nv,
                   d == nd ? "an equally close even code" : "closer");
    }
}

int main(void) {
    // f16 edge values
    check_f16(1.0f, 0x3c00);
    check_f16(-2.0f, 0xc000);
    check_f16(0.0f, 0x0000);
    check_f16(-0.0f, 0x8000);
    check_f16(65504.0f, 0x7bff);              // max
    check_f16(65519.996f, 0x7bff);            // just below the overflow tie
    check_f16(65520.0f, 0x7c00);              // tie with odd max -> inf
    check_f16(1e10f, 0x7c00);
    check_f16(INFINITY, 0x7c00);
    check_f16(-INFINITY, 0xfc00);
    check_f16(ldexpf(1, -14), 0x0400);        // smallest normal
    check_f16(ldexpf(1, -24), 0x0001);        // smallest denormal
    check_f16(ldexpf(1023, -24), 0x03ff);     // largest denormal
    check_f16(ldexpf(1, -25), 0x0000);        // tie between 0 and the smallest denormal -> even (0)
    check_f16(ldexpf(3, -26), 0x0001);        // 0.75 of the smallest denormal -> 1
    check_f16(ldexpf(3, -25), 0x0002);        // tie between 1 and 2 -> 2
    check_f16(ldexpf(2047, -25), 0x0400);     // largest denormal + half rounds up into the normals
    check_f16(1.0f + ldexpf(1, -11), 0x3c00); // tie -> even
    check_f16(1.0f + ldexpf(3, -11), 0x3c02); // tie -> even (up)
    check_f16(from_bits(0x00000001), 0x0000); // f32 denormal -> 0
    uint16_t hn = f32_to_f16(NAN);
    CHECK((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff) != 0, "f32_to_f16(NaN) = 0x%04x is not NaN", hn);
    CHECK(isnan(f16_to_f32(0x7e00)) && isinf(f16_to_f32(0x7c00)), "f16 NaN/inf decode");
    CHECK(f16_to_f32(0x0001) == ldexpf(1, -24) && f16_to_f32(0x8001) == -ldexpf(1, -24), "f16 denormal decode");

    // Every finite f16 round-trips exactly; NaNs stay NaN.
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = f16_to_f32((uint16_t)h);
        uint16_t back = f32_to_f16(f);
        if (isnan(f) ? !isnan(f16_to_f32(back)) : back != h) bad++;
    }
    CHECK(bad == 0, "%d f16 values do not round-trip", bad);

    // bf16 edge values
    check_bf16(0x3f800000, 0x3f80);  // 1.0
    check_bf16(0x3f808000, 0x3f80);  // tie, even stays
    check_bf16(0x3f818000, 0x3f82);  // tie, odd rounds up
    check_bf16(0x3f808001, 0x3f81);  // above the tie
    check_bf16(0x7f7fffff, 0x7f80);  // f32 max rounds to inf, as PyTorch does
    check_bf16(0x7f800000, 0x7f80);  // inf
    check_bf16(0xff800000, 0xff80);  // -inf
    check_bf16(0x00000001, 0x0000);  // tiny denormal
    check_bf16(0x00018000, 0x0002);  // denormal tie, odd rounds up
    check_bf16(0x80000000, 0x8000);  // -0
    uint16_t bn = f32_to_bf16(from_bits(0x7f800001));  // a signalling NaN with a low payload must stay NaN
    CHECK((bn & 0x7f80) == 0x7f80 && (bn & 0x7f) != 0, "f32_to_bf16(sNaN) = 0x%04x is not NaN", bn);
    bad = 0;
    for (uint32_t b = 0; b < 65536; b++) {
        float f = bf16_to_f32((uint16_t)b);
        if (!isnan(f) && f32_to_bf16(f) != b) bad++;
    }
    CHECK(bad == 0, "%d bf16 values do not round-trip", bad);

    // Random values over the whole range, including denormals: nearest, ties to even.
    Rng rng;
    rng_seed(&rng, 1234);
    for (int i = 0; i < 200000; i++) {
        float x = from_bits((uint32_t)rng_u64(&rng));
        if (isnan(x)) continue;
        if (fabsf(x) < 65504.0f) check_nearest(x, f32_to_f16(x), f16_to_f32, "f32_to_f16");
        check_nearest(x, f32_to_bf16(x), bf16_to_f32, "f32_to_bf16");
        float small = ldexpf(rng_uniform(&rng), -(int)(rng_u64(&rng) % 30));  // dense near f16 denormals
        check_nearest(small, f32_to_f16(small), f16_to_f32, "f32_to_f16");
    }

    CHECK(nearest_bad == 0, "%d random values not rounded to nearest-even", nearest_bad);

    // convert_host between all float pairs preserves exactly representable values.
    float src[4] = {1.0f, -0.5f, 3.0f, 0.0f}, back[4];
    uint16_t mid[4];
    CHECK(convert_host(mid, DT_F16, src, DT_F32, 4) == 0 && convert_host(back, DT_F32, mid, DT_F16, 4) == 0 &&
              memcmp(src, back, sizeof src) == 0, "convert_host f32->f16->f32");
    CHECK(convert_host(mid, DT_BF16, src, DT_F32, 4) == 0 && convert_host(back, DT_F32, mid, DT_BF16, 4) == 0 &&
              memcmp(src, back, sizeof src) == 0, "convert_host f32->bf16->f32");
    CHECK(convert_host(mid, DT_I32, src, DT_F32, 4) == -1, "convert_host refuses f32->i32");
    CHECK(dtype_size(DT_BF16) == 2 && dtype_from_name("bf16") == DT_BF16 && dtype_from_name("f64") == -1,
          "dtype names");
    (void)to_bits;
    return test_summary();
}
