// Tests for model/preprocess.c against the goldens in tests/data/preprocess/ (made by
// tests/reference/make_preprocess_goldens.py from Pillow and torchvision):
// - image_resize_bicubic against Pillow's Image.resize(BICUBIC), byte for byte: every case prints how many bytes are
//   equal, how many differ by one level and the largest difference; a difference above one level fails, and so does
//   a full-image checksum mismatch where the stored window matched exactly. Pillow 10's pass order is the reference
//   (the stored goldens); Pillow 13's order (RESIZE_PILLOW_13) is checked against checksums of its full output;
// - the torchvision geometry (Resize(224) sizes, CenterCrop offsets with round half to even) for both modes;
// - the crop that preprocess_image_u8 returns, and the float output of preprocess_image against torch's
//   ToTensor + Normalize table (within 1e-6; the number of bit-exact values is printed);
// - windows equal crops of the full resize, the result does not depend on the OpenMP thread count, bad arguments
//   give errors, and a 1x32768 image preprocesses without a 224x7340032 intermediate.
//
// Usage: test_preprocess [DATA_DIR] (default AGPT_TEST_DATA/preprocess). The photos come from
// AGPT_SHARED_DATA/images; without them those cases are skipped and the rest still run. Exit 0: all passed,
// 1: a failure, 77: no golden data at all.
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model/preprocess.h"
#include "runtime/image.h"
#include "tests/test.h"

static char g_data[4096];
static char g_shared[4096];

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static uint8_t *read_file(const char *path, size_t *len) {
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return NULL;
    }
    long n = ftell(f);
    rewind(f);
    uint8_t *buf = n > 0 ? malloc((size_t)n) : NULL;
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) *len = (size_t)n;
    return buf;
}

static uint64_t fnv1a64(const uint8_t *p, size_t n) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return h;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

// Loads an image file of the golden folder: *.png through image_load (RGB), anything else as raw bytes that must
// hold exactly w * h * channels of them. Returns NULL (after counting a failure) when it cannot.
static uint8_t *load_pixels(const char *file, int w, int h, int channels) {
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", g_data, file);
    if (ends_with(file, ".png")) {
        Image im = {0};
        Status s = image_load(path, &im);
        CHECK(s == AGPT_OK, "load %s: %s", path, agpt_last_error());
        if (s != AGPT_OK) return NULL;
        CHECK(im.width == w && im.height == h && channels == 3, "%s is %dx%d, expected %dx%d with 3 channels", path,
              im.width, im.height, w, h);
        if (im.width != w || im.height != h || channels != 3) {
            image_free(&im);
            return NULL;
        }
        size_t n = (size_t)w * h * 3;
        uint8_t *copy = malloc(n);
        memcpy(copy, im.rgb, n);
        image_free(&im);
        return copy;
    }
    size_t len;
    uint8_t *buf = read_file(path, &len);
    CHECK(buf && len == (size_t)w * h * channels, "%s: %zu bytes, expected %dx%dx%d", path, len, w, h, channels);
    if (buf && len != (size_t)w * h * channels) {
        free(buf);
        buf = NULL;
    }
    return buf;
}

// Differences of two byte arrays, in u8 levels.
typedef struct Diff {
    int64_t n, equal, off_by_one, worse;
    int max;
} Diff;

static void diff_add(Diff *d, const uint8_t *a, const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        int e = abs((int)a[i] - (int)b[i]);
        d->n++;
        if (e == 0) d->equal++;
        else if (e == 1) d->off_by_one++;
        else d->worse++;
        if (e > d->max) d->max = e;
    }
}

static Diff g_total;  // over every golden byte compared

static void report_diff(const char *what, const Diff *d) {
    printf("  %-44s %9lld bytes: %lld equal, %lld off by 1, %lld worse, max %d\n", what, (long long)d->n,
           (long long)d->equal, (long long)d->off_by_one, (long long)d->worse, d->max);
    CHECK(d->worse == 0, "%s: %lld bytes differ from Pillow by more than one level (max %d)", what,
          (long long)d->worse, d->max);
}

static float g_table[3][256];  // torch's ToTensor + Normalize of byte v in channel c
static int g_have_table;

static void check_normalize_table(const char *file) {
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", g_data, file);
    size_t len;
    uint8_t *buf = read_file(path, &len);
    CHECK(buf && len == sizeof g_table, "%s: %zu bytes, expected %zu", path, len, sizeof g_table);
    if (!buf || len != sizeof g_table) {
        free(buf);
        return;
    }
    memcpy(g_table, buf, sizeof g_table);  // little-endian float32, as the build machines are
    free(buf);
    g_have_table = 1;

    uint8_t ramp[16 * 16 * 3];
    for (int i = 0; i < 256; i++) ramp[i * 3 + 0] = ramp[i * 3 + 1] = ramp[i * 3 + 2] = (uint8_t)i;
    float out[3 * 256];
    preprocess_normalize(ramp, 16, out);
    int exact = 0;
    double max_err = 0;
    for (int c = 0; c < 3; c++) {
        for (int v = 0; v < 256; v++) {
            float a = out[c * 256 + v], b = g_table[c][v];
            if (memcmp(&a, &b, sizeof a) == 0) exact++;
            double e = fabs((double)a - b);
            if (!(e <= max_err)) max_err = e;  // NaN propagates
        }
    }
    printf("  %-44s %d of 768 values bit-exact vs torch, max |diff| %.3g\n", "normalize: every byte, every channel",
           exact, max_err);
    CHECK(max_err <= 1e-6, "normalize: max |diff| %.3g vs torch > 1e-6", max_err);
}

// The full resize in Pillow 13's pass order against the checksum of Pillow 13's output. fnv10 is the Pillow 10
// checksum, to say whether the order matters for this case.
static void check_pillow13(const uint8_t *src, int w, int h, int ch, int ow, int oh, uint64_t want13, uint64_t fnv10) {
    uint8_t *out = malloc((size_t)ow * oh * ch);
    if (!out) return;
    CHECK_OK(image_resize_bicubic_window(src, w, h, ch, ow, oh, 0, 0, ow, oh, RESIZE_PILLOW_13, out));
    uint64_t got = fnv1a64(out, (size_t)ow * oh * ch);
    printf("  %-44s %s%s\n", "Pillow 13 pass order: full-image checksum", got == want13 ? "equal" : "DIFFERS",
           want13 == fnv10 ? "" : " (Pillow 13's result differs from Pillow 10's here)");
    CHECK(got == want13, "%dx%d -> %dx%d in Pillow 13's pass order differs from Pillow 13", w, h, ow, oh);
    free(out);
}

// A "pipe" line: one input, one mode. Compares the resize, the geometry, the u8 crop and the float tensor.
static void check_pipe(char **f) {
    const char *name = f[1], *input = f[2], *mode_name = f[3];
    int w = atoi(f[4]), h = atoi(f[5]), rw = atoi(f[6]), rh = atoi(f[7]), left = atoi(f[8]), top = atoi(f[9]);
    const char *golden_file = f[10];
    int gx = atoi(f[11]), gy = atoi(f[12]), gw = atoi(f[13]), gh = atoi(f[14]);
    uint64_t want_fnv = strtoull(f[15], NULL, 16), want_fnv13 = strtoull(f[16], NULL, 16);
    PreprocessMode mode = strcmp(mode_name, "squash") == 0 ? PREPROCESS_SQUASH : PREPROCESS_SHORTER_SIDE_CROP;
    const int S = 224;

    char path[8192];
    if (strncmp(input, "shared:", 7) == 0) {
        snprintf(path, sizeof path, "%s/%s", g_shared, input + 7);
        if (!exists(path)) {
            printf("  %-44s skipped: %s is missing\n", name, path);
            return;
        }
    } else {
        snprintf(path, sizeof path, "%s/%s", g_data, input + 5);
    }
    printf("%s %s: %dx%d -> %dx%d, crop at (%d,%d)\n", name, mode_name, w, h, rw, rh, left, top);

    Image img = {0};
    Status s = image_load(path, &img);
    CHECK(s == AGPT_OK && img.width == w && img.height == h, "load %s: %s (%dx%d)", path, agpt_last_error(),
          img.width, img.height);
    if (s != AGPT_OK) return;

    PreprocessGeometry g;
    CHECK_OK(preprocess_geometry(w, h, mode, S, &g));
    CHECK(g.resized_w == rw && g.resized_h == rh && g.crop_left == left && g.crop_top == top,
          "%s %s: geometry %dx%d crop (%d,%d), torchvision says %dx%d crop (%d,%d)", name, mode_name, g.resized_w,
          g.resized_h, g.crop_left, g.crop_top, rw, rh, left, top);

    uint8_t *golden = load_pixels(golden_file, gw, gh, 3);
    uint8_t *full = malloc((size_t)rw * rh * 3);
    uint8_t *crop = malloc((size_t)S * S * 3);
    float *chw = malloc(sizeof(float) * 3 * S * S);
    if (!golden || !full || !crop || !chw) goto out;

    // The whole resize, compared where the golden has it, and hashed everywhere.
    CHECK_OK(image_resize_bicubic(img.rgb, w, h, 3, full, rw, rh));
    Diff d = {0};
    for (int y = 0; y < gh; y++) {
        diff_add(&d, full + ((size_t)(gy + y) * rw + gx) * 3, golden + (size_t)y * gw * 3, (size_t)gw * 3);
    }
    char what[256];
    snprintf(what, sizeof what, "resize %dx%d window of %dx%d", gw, gh, rw, rh);
    report_diff(what, &d);
    g_total.n += d.n;
    g_total.equal += d.equal;
    g_total.off_by_one += d.off_by_one;
    g_total.worse += d.worse;
    if (d.max > g_total.max) g_total.max = d.max;
    uint64_t fnv = fnv1a64(full, (size_t)rw * rh * 3);
    if (gw != rw || gh != rh) {
        if (d.n == d.equal) {
            CHECK(fnv == want_fnv, "%s %s: the window matches but the full %dx%d resize does not (fnv %016llx, "
                  "want %016llx)", name, mode_name, rw, rh, (unsigned long long)fnv, (unsigned long long)want_fnv);
            printf("  %-44s %s\n", "full resize checksum", fnv == want_fnv ? "equal" : "DIFFERS");
        } else {
            printf("  %-44s not comparable (window differs)\n", "full resize checksum");
        }
    } else if (d.n == d.equal) {
        CHECK(fnv == want_fnv, "%s %s: equal pixels but a different checksum", name, mode_name);
    }
    check_pillow13(img.rgb, w, h, 3, rw, rh, want_fnv13, want_fnv);

    // The crop preprocess_image_u8 computes on its own (a window of the resize) must be the full resize's crop.
    CHECK_OK(preprocess_image_u8(&img, mode, S, RESIZE_PILLOW_10, crop));
    Diff dc = {0}, dself = {0};
    for (int y = 0; y < S; y++) {
        const uint8_t *want = golden + ((size_t)(top - gy + y) * gw + (left - gx)) * 3;
        diff_add(&dc, crop + (size_t)y * S * 3, want, (size_t)S * 3);
        diff_add(&dself, crop + (size_t)y * S * 3, full + ((size_t)(top + y) * rw + left) * 3, (size_t)S * 3);
    }
    report_diff("center crop (preprocess_image_u8)", &dc);
    CHECK(dself.n == dself.equal, "%s %s: preprocess_image_u8 is not the crop of image_resize_bicubic (%lld bytes)",
          name, mode_name, (long long)(dself.n - dself.equal));

    // The float tensor: torch's normalisation of our bytes (tolerance 1e-6), and how much equals the peer's
    // tensor (torch's normalisation of Pillow's bytes) bit for bit.
    CHECK_OK(preprocess_image(&img, mode, S, chw));
    if (g_have_table) {
        double max_err = 0, max_vs_peer = 0;
        int64_t exact = 0;
        for (int c = 0; c < 3; c++) {
            for (int y = 0; y < S; y++) {
                for (int x = 0; x < S; x++) {
                    float got = chw[((size_t)c * S + y) * S + x];
                    uint8_t ours = crop[((size_t)y * S + x) * 3 + c];
                    uint8_t peer = golden[((size_t)(top - gy + y) * gw + (left - gx + x)) * 3 + c];
                    double e = fabs((double)got - g_table[c][ours]);
                    double ep = fabs((double)got - g_table[c][peer]);
                    if (!(e <= max_err)) max_err = e;
                    if (!(ep <= max_vs_peer)) max_vs_peer = ep;
                    if (memcmp(&got, &g_table[c][peer], sizeof got) == 0) exact++;
                }
            }
        }
        printf("  %-44s %lld of %d floats bit-exact vs the peer, max |diff| %.3g\n", "normalised [3,224,224]",
               (long long)exact, 3 * S * S, max_vs_peer);
        CHECK(max_err <= 1e-6, "%s %s: normalised output off torch's by %.3g", name, mode_name, max_err);
    }

out:
    free(golden);
    free(full);
    free(crop);
    free(chw);
    image_free(&img);
}

// A "resize" line: image_resize_bicubic on its own, 1, 3 or 4 channels, sizes other than 224.
static void check_resize(char **f) {
    const char *name = f[1];
    int w = atoi(f[3]), h = atoi(f[4]), ch = atoi(f[5]), ow = atoi(f[6]), oh = atoi(f[7]);
    uint64_t want_fnv13 = strtoull(f[9], NULL, 16);
    printf("resize %s: %dx%dx%d -> %dx%d\n", name, w, h, ch, ow, oh);
    uint8_t *src = load_pixels(f[2], w, h, ch);
    uint8_t *want = load_pixels(f[8], ow, oh, ch);
    uint8_t *got = malloc((size_t)ow * oh * ch);
    if (src && want && got) {
        CHECK_OK(image_resize_bicubic(src, w, h, ch, got, ow, oh));
        Diff d = {0};
        diff_add(&d, got, want, (size_t)ow * oh * ch);
        report_diff("image_resize_bicubic", &d);
        check_pillow13(src, w, h, ch, ow, oh, want_fnv13, fnv1a64(want, (size_t)ow * oh * ch));
        g_total.n += d.n;
        g_total.equal += d.equal;
        g_total.off_by_one += d.off_by_one;
        g_total.worse += d.worse;
        if (d.max > g_total.max) g_total.max = d.max;
    }
    free(src);
    free(want);
    free(got);
}

// Checks that need no golden: windows, thread counts, geometry corner cases, errors, bounded memory.
static void check_properties(void) {
    printf("properties\n");
    // Deterministic content with hard edges, so that every window and thread split has work to get wrong.
    const int w = 173, h = 131;
    uint8_t *src = malloc((size_t)w * h * 3);
    uint32_t state = 12345;
    for (int i = 0; i < w * h * 3; i++) {
        state = state * 1664525u + 1013904223u;
        src[i] = (uint8_t)((i / 3 % w) < w / 2 ? (state >> 24) : (state >> 31) * 255);
    }
    // Pillow 13's order starts with the vertical pass for {500, 3}, {170, 40} and {300, 20} (and for {173, 60},
    // which has no horizontal pass); the others start with the horizontal pass in both orders.
    const int sizes[][2] = {{301, 257}, {64, 48}, {173, 60}, {90, 131}, {1, 1}, {500, 3}, {170, 40}, {300, 20}};
    int vertical_first_seen = 0;
    for (size_t t = 0; t < 2 * sizeof sizes / sizeof sizes[0]; t++) {
        int ow = sizes[t / 2][0], oh = sizes[t / 2][1];
        ResizePassOrder order = t % 2 ? RESIZE_PILLOW_13 : RESIZE_PILLOW_10;
        vertical_first_seen += image_resize_vertical_first(w, h, ow, oh, order);
        size_t n = (size_t)ow * oh * 3;
        uint8_t *full = malloc(n), *one = malloc(n), *win = malloc(n), *many = malloc(n);
        CHECK_OK(image_resize_bicubic_window(src, w, h, 3, ow, oh, 0, 0, ow, oh, order, full));
        int threads = omp_get_max_threads();
        omp_set_num_threads(1);
        CHECK_OK(image_resize_bicubic_window(src, w, h, 3, ow, oh, 0, 0, ow, oh, order, one));
        omp_set_num_threads(threads > 1 ? threads : 3);  // also split a single-core machine's work 3 ways
        CHECK_OK(image_resize_bicubic_window(src, w, h, 3, ow, oh, 0, 0, ow, oh, order, many));
        omp_set_num_threads(threads);
        CHECK(memcmp(full, one, n) == 0 && memcmp(full, many, n) == 0,
              "%dx%d -> %dx%d (order %d) depends on the thread count", w, h, ow, oh, (int)order);
        free(many);
        // A few windows, including ones touching every border.
        const int wins[][4] = {{0, 0, ow, oh}, {0, 0, 1, 1}, {ow - 1, oh - 1, 1, 1}, {ow / 3, oh / 4, ow / 2, oh / 2},
                               {ow / 2, 0, ow - ow / 2, oh}};
        for (size_t k = 0; k < sizeof wins / sizeof wins[0]; k++) {
            int x0 = wins[k][0], y0 = wins[k][1], ww = wins[k][2], wh = wins[k][3];
            if (ww < 1 || wh < 1) continue;
            CHECK_OK(image_resize_bicubic_window(src, w, h, 3, ow, oh, x0, y0, ww, wh, order, win));
            int same = 1;
            for (int y = 0; y < wh && same; y++) {
                same = memcmp(win + (size_t)y * ww * 3, full + ((size_t)(y0 + y) * ow + x0) * 3, (size_t)ww * 3) == 0;
            }
            CHECK(same, "window %dx%d at (%d,%d) of %dx%d (order %d) differs from the full resize", ww, wh, x0, y0,
                  ow, oh, (int)order);
        }
        free(full);
        free(one);
        free(win);
    }
    CHECK(vertical_first_seen == 4, "expected 4 vertical-first cases, saw %d", vertical_first_seen);
    CHECK(!image_resize_vertical_first(7, 300, 224, 224, RESIZE_PILLOW_10) &&
              image_resize_vertical_first(7, 300, 224, 224, RESIZE_PILLOW_13) &&
              !image_resize_vertical_first(640, 480, 224, 224, RESIZE_PILLOW_13),
          "Pillow 13 pass-order rule");
    // Same size: a copy.
    uint8_t *copy = malloc((size_t)w * h * 3);
    CHECK_OK(image_resize_bicubic(src, w, h, 3, copy, w, h));
    CHECK(memcmp(copy, src, (size_t)w * h * 3) == 0, "a same-size resize must copy");
    free(copy);

    // Geometry: torchvision's int() truncation and Python's round half to even.
    PreprocessGeometry g;
    struct {
        int w, h, rw, rh, left, top;
    } geo[] = {
        {224, 225, 224, 225, 0, 0},   // round(0.5) = 0
        {224, 227, 224, 227, 0, 2},   // round(1.5) = 2
        {224, 229, 224, 229, 0, 2},   // round(2.5) = 2
        {224, 231, 224, 231, 0, 4},   // round(3.5) = 4
        {480, 640, 224, 298, 0, 37},  // int(298.67) = 298, round(37.0)
        {640, 480, 298, 224, 37, 0},
        {1, 32768, 224, 7340032, 0, 3669904},
        {3, 1000, 224, 74666, 0, 37221},  // int(74666.67); round(37221.0)
        {100, 100, 224, 224, 0, 0},
    };
    for (size_t i = 0; i < sizeof geo / sizeof geo[0]; i++) {
        CHECK_OK(preprocess_geometry(geo[i].w, geo[i].h, PREPROCESS_SHORTER_SIDE_CROP, 224, &g));
        CHECK(g.resized_w == geo[i].rw && g.resized_h == geo[i].rh && g.crop_left == geo[i].left &&
                  g.crop_top == geo[i].top,
              "geometry %dx%d: %dx%d crop (%d,%d), want %dx%d crop (%d,%d)", geo[i].w, geo[i].h, g.resized_w,
              g.resized_h, g.crop_left, g.crop_top, geo[i].rw, geo[i].rh, geo[i].left, geo[i].top);
        CHECK_OK(preprocess_geometry(geo[i].w, geo[i].h, PREPROCESS_SQUASH, 224, &g));
        CHECK(g.resized_w == 224 && g.resized_h == 224 && g.crop_left == 0 && g.crop_top == 0, "squash geometry");
    }

    // Bounded memory: a 1x32768 image would be 224x7340032 after Resize(224); only the crop is computed. Upscaled
    // from one column, every output column is the same.
    Image tall = {1, 32768, malloc(32768 * 3)};
    for (int i = 0; i < 32768 * 3; i++) tall.rgb[i] = (uint8_t)(i * 7 + (i >> 9));
    uint8_t *crop = malloc(224 * 224 * 3);
    CHECK_OK(preprocess_image_u8(&tall, PREPROCESS_SHORTER_SIDE_CROP, 224, RESIZE_PILLOW_10, crop));
    int columns_equal = 1;
    for (int y = 0; y < 224 && columns_equal; y++) {
        for (int x = 1; x < 224 && columns_equal; x++) {
            columns_equal = memcmp(crop + (y * 224 + x) * 3, crop + y * 224 * 3, 3) == 0;
        }
    }
    CHECK(columns_equal, "1x32768: upscaled columns differ");
    float *chw = malloc(sizeof(float) * 3 * 224 * 224);
    CHECK_OK(preprocess_image(&tall, PREPROCESS_SQUASH, 224, chw));
    free(chw);
    free(crop);
    free(tall.rgb);

    // Errors, with messages.
    uint8_t out[64];
    CHECK_ERR(image_resize_bicubic(NULL, 4, 4, 3, out, 2, 2));
    CHECK_ERR(image_resize_bicubic(src, 4, 4, 3, NULL, 2, 2));
    CHECK_ERR(image_resize_bicubic(src, 0, 4, 3, out, 2, 2));
    CHECK_ERR(image_resize_bicubic(src, 4, 4, 3, out, 2, -1));
    CHECK_ERR(image_resize_bicubic(src, 4, 4, 5, out, 2, 2));
    CHECK_ERR(image_resize_bicubic_window(src, 4, 4, 3, 4, 4, 3, 0, 2, 2, RESIZE_PILLOW_10, out));
    CHECK_ERR(image_resize_bicubic_window(src, 4, 4, 3, 4, 4, 0, 0, 0, 2, RESIZE_PILLOW_10, out));
    CHECK_ERR(image_resize_bicubic_window(src, 4, 4, 3, 2, 2, 0, 0, 2, 2, (ResizePassOrder)9, out));
    CHECK_ERR(preprocess_geometry(0, 10, PREPROCESS_SQUASH, 224, &g));
    CHECK_ERR(preprocess_geometry(10, 10, (PreprocessMode)7, 224, &g));
    CHECK_ERR(preprocess_geometry(10, 10, PREPROCESS_SQUASH, 0, &g));
    Image empty = {0};
    float f1[3];
    CHECK_ERR(preprocess_image(&empty, PREPROCESS_SQUASH, 1, f1));
    CHECK_ERR(preprocess_image(NULL, PREPROCESS_SQUASH, 1, f1));
    free(src);
}

// preprocess_rotate_chw against torch.rot90(x, k, dims=(1, 2)) on a 3x3 image (its outputs written out), k mod 4,
// and two quarter turns composing to a half turn on a 224x224 image.
static void check_rotations(void) {
    float x[27], out[27];
    for (int i = 0; i < 27; i++) x[i] = (float)i;
    static const float want[4][9] = {{0, 1, 2, 3, 4, 5, 6, 7, 8}, {2, 5, 8, 1, 4, 7, 0, 3, 6},
                                     {8, 7, 6, 5, 4, 3, 2, 1, 0}, {6, 3, 0, 7, 4, 1, 8, 5, 2}};
    const int ks[6] = {0, 1, 2, 3, 4, -1}, rows[6] = {0, 1, 2, 3, 0, 3};
    for (int t = 0; t < 6; t++) {
        preprocess_rotate_chw(x, 3, ks[t], out);
        int ok = 1;
        for (int c = 0; c < 3; c++)
            for (int i = 0; i < 9; i++) ok &= out[c * 9 + i] == want[rows[t]][i] + 9 * c;
        CHECK(ok, "rot90 by %d quarters on 3x3 is torch.rot90's", ks[t]);
    }
    const int S = 224;
    float *a = malloc(sizeof(float) * 3 * S * S * 3), *b = a + 3 * S * S, *c = b + 3 * S * S;
    if (!a) return;
    for (int i = 0; i < 3 * S * S; i++) a[i] = (float)((i * 7919) % 1000);
    preprocess_rotate_chw(a, S, 1, b);
    preprocess_rotate_chw(b, S, 1, c);
    preprocess_rotate_chw(a, S, 2, b);
    CHECK(!memcmp(b, c, sizeof(float) * 3 * S * S), "two quarter turns are a half turn");
    free(a);
}

int main(int argc, char **argv) {
    snprintf(g_data, sizeof g_data, "%s", argc > 1 ? argv[1] : AGPT_TEST_DATA "/preprocess");
    snprintf(g_shared, sizeof g_shared, "%s/images", AGPT_SHARED_DATA);
    char manifest[8192];
    snprintf(manifest, sizeof manifest, "%s/manifest.txt", g_data);
    FILE *mf = fopen(manifest, "r");
    if (!mf) {
        printf("skipped: %s is missing (make it with tests/reference/make_preprocess_goldens.py)\n", manifest);
        return TEST_SKIP;
    }
    if (!exists(g_shared)) printf("note: %s is missing; the photo cases are skipped\n", g_shared);

    char line[4096];
    int lines = 0;
    while (fgets(line, sizeof line, mf)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        char *f[20];
        int n = 0;
        for (char *tok = strtok(line, " \t\r\n"); tok && n < 20; tok = strtok(NULL, " \t\r\n")) f[n++] = tok;
        if (n == 0) continue;
        lines++;
        if (strcmp(f[0], "normalize") == 0 && n == 2) {
            check_normalize_table(f[1]);
        } else if (strcmp(f[0], "pipe") == 0 && n == 17) {
            check_pipe(f);
        } else if (strcmp(f[0], "resize") == 0 && n == 10) {
            check_resize(f);
        } else {
            CHECK(0, "%s: cannot read the line starting with '%s' (%d fields)", manifest, f[0], n);
        }
    }
    fclose(mf);
    CHECK(lines > 0, "%s has no cases", manifest);
    check_properties();
    check_rotations();

    printf("all golden bytes: %lld compared, %lld equal, %lld off by 1, %lld worse, max %d\n",
           (long long)g_total.n, (long long)g_total.equal, (long long)g_total.off_by_one, (long long)g_total.worse,
           g_total.max);
    return test_summary();
}
