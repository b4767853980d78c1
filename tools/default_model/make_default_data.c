// make_default_data: the image sets of the default model (tools/train-default.sh), in the MVTec-AD layout that
// agpt train and agpt eval read.
//
//   make_default_data train   OUT SEED CROPS PHOTOS...   normal crops, CROPS per photo over 4 windows of it:
//       OUT/<photo>-<w>/train/good/NNN.png, one class per window
//   make_default_data heldout OUT SEED CROPS PHOTOS...   a test set with defects of kinds training never makes,
//       one class per photo: OUT/<photo>/test/{good,scratch,stain,hole}/NNN.png,
//       OUT/<photo>/ground_truth/KIND/NNN_mask.png, and every fourth crop a normal one in OUT/<photo>/train/good
//       (the k-shot references)
//
// A class's crops are one square window of the photo (training: 35-70 % of the shorter side, mirrored or not;
// held out: half of it) shifted by up to 4 % of its side, resized to 224 x 224 (bilinear): a part under a
// fixed camera, so that the references show what the class's other images show. Everything depends on SEED
// and the arguments only.
//
// The held-out defects are drawn, not pasted (agpt train's NSA pastes patches of other images):
//   scratch  a thin curve (a quadratic Bezier of 40-140 px), 1.5-4 px wide, dark on a light surface, light on a
//            dark one; the mask where its opacity is at least 0.3
//   stain    an irregular blob (8-28 px radius, the rim wobbling), a random tint blended at 45-75 %; the mask
//            halfway down its soft rim
//   hole     a dark disc (6-16 px radius) with a lighter rim and a shaded inside; the mask is disc and rim
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "runtime/image.h"
#include "runtime/rng.h"
#include "train/seamless_clone.h"

#define SIDE 224
#define WINDOWS 4  // training classes per photo

static float uniform(Rng *r, float lo, float hi) { return lo + (hi - lo) * rng_uniform(r); }

static int make_dirs(const char *path) {  // mkdir -p
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(tmp, 0755);
            *p = '/';
        }
    if (mkdir(tmp, 0755) != 0) {
        struct stat st;
        if (stat(tmp, &st) != 0 || !S_ISDIR(st.st_mode)) {
            fprintf(stderr, "make_default_data: cannot create %s\n", tmp);
            return 1;
        }
    }
    return 0;
}

// The square img[y0 : y0+s, x0 : x0+s], mirrored or not, resized to SIDE x SIDE RGB.
static int crop(const Image *img, int x0, int y0, int s, bool mirror, uint8_t *out) {
    uint8_t *square = malloc((size_t)s * s * 3);
    if (!square) return 1;
    for (int y = 0; y < s; y++)
        for (int x = 0; x < s; x++) {
            int sx = mirror ? x0 + s - 1 - x : x0 + x;
            memcpy(square + ((size_t)y * s + x) * 3, img->rgb + ((size_t)(y0 + y) * img->width + sx) * 3, 3);
        }
    Status st = resize_linear(square, s, s, 3, out, SIDE, SIDE);
    free(square);
    if (st != AGPT_OK) {
        fprintf(stderr, "make_default_data: %s\n", agpt_last_error());
        return 1;
    }
    return 0;
}

// Distance from (px, py) to the segment (ax, ay)-(bx, by).
static float segment_distance(float px, float py, float ax, float ay, float bx, float by) {
    float dx = bx - ax, dy = by - ay, len2 = dx * dx + dy * dy;
    float t = len2 > 0 ? ((px - ax) * dx + (py - ay) * dy) / len2 : 0;
    t = t < 0 ? 0 : t > 1 ? 1 : t;
    float ex = ax + t * dx - px, ey = ay + t * dy - py;
    return sqrtf(ex * ex + ey * ey);
}

// Blends color into rgb with the per-pixel opacity alpha [SIDE*SIDE]; the mask is 255 where alpha >= threshold.
static void blend(uint8_t *rgb, const float *alpha, const float color[3], float threshold, uint8_t *mask) {
    for (int i = 0; i < SIDE * SIDE; i++) {
        float a = alpha[i] < 0 ? 0 : alpha[i] > 1 ? 1 : alpha[i];
        for (int c = 0; c < 3; c++) {
            float v = (1 - a) * rgb[i * 3 + c] + a * color[c];
            rgb[i * 3 + c] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v + 0.5f);
        }
        mask[i] = a >= threshold ? 255 : 0;
    }
}

static float mean_luma(const uint8_t *rgb) {
    double sum = 0;
    for (int i = 0; i < SIDE * SIDE; i++) sum += 0.299 * rgb[i * 3] + 0.587 * rgb[i * 3 + 1] + 0.114 * rgb[i * 3 + 2];
    return (float)(sum / (SIDE * SIDE));
}

static void draw_scratch(uint8_t *rgb, uint8_t *mask, Rng *r, float *alpha) {
    float len = uniform(r, 40, 140), angle = uniform(r, 0, 6.2831853f);
    float cx = uniform(r, 40, SIDE - 40), cy = uniform(r, 40, SIDE - 40);
    float ax = cx - 0.5f * len * cosf(angle), ay = cy - 0.5f * len * sinf(angle);
    float bx = cx + 0.5f * len * cosf(angle), by = cy + 0.5f * len * sinf(angle);
    float bend = uniform(r, -0.3f, 0.3f) * len;  // the control point, off the chord
    float qx = cx - bend * sinf(angle), qy = cy + bend * cosf(angle);
    float half = 0.5f * uniform(r, 1.5f, 4.0f);
    enum { PIECES = 16 };
    float px[PIECES + 1], py[PIECES + 1];
    for (int k = 0; k <= PIECES; k++) {
        float t = (float)k / PIECES, u = 1 - t;
        px[k] = u * u * ax + 2 * u * t * qx + t * t * bx;
        py[k] = u * u * ay + 2 * u * t * qy + t * t * by;
    }
    for (int y = 0; y < SIDE; y++)
        for (int x = 0; x < SIDE; x++) {
            float d = 1e9f;
            for (int k = 0; k < PIECES; k++) {
                float dk = segment_distance(x + 0.5f, y + 0.5f, px[k], py[k], px[k + 1], py[k + 1]);
                if (dk < d) d = dk;
            }
            alpha[y * SIDE + x] = d <= half ? 1.0f : d < half + 1 ? half + 1 - d : 0;  // a 1 px soft edge
        }
    // A scratch shows the material under the surface: dark on a light surface, light on a dark one.
    float luma = mean_luma(rgb), v = luma > 110 ? uniform(r, 10, 50) : uniform(r, 200, 245);
    float color[3] = {v, v, v};
    blend(rgb, alpha, color, 0.3f, mask);
}

static void draw_stain(uint8_t *rgb, uint8_t *mask, Rng *r, float *alpha) {
    float radius = uniform(r, 8, 28), cx = uniform(r, 30, SIDE - 30), cy = uniform(r, 30, SIDE - 30);
    float wobble[3][2];  // the rim: radius * (1 + sum of three angular waves)
    for (int k = 0; k < 3; k++) wobble[k][0] = uniform(r, 0, 0.18f), wobble[k][1] = uniform(r, 0, 6.2831853f);
    float opacity = uniform(r, 0.45f, 0.75f);
    float color[3] = {uniform(r, 40, 200), uniform(r, 30, 160), uniform(r, 10, 120)};  // rust, oil, coffee tints
    for (int y = 0; y < SIDE; y++)
        for (int x = 0; x < SIDE; x++) {
            float dx = x + 0.5f - cx, dy = y + 0.5f - cy, theta = atan2f(dy, dx);
            float rim = radius;
            for (int k = 0; k < 3; k++) rim += radius * wobble[k][0] * sinf((k + 2) * theta + wobble[k][1]);
            float d = sqrtf(dx * dx + dy * dy);
            float edge = d < rim - 2 ? 1 : d < rim + 2 ? (rim + 2 - d) / 4 : 0;  // a 4 px soft rim
            alpha[y * SIDE + x] = opacity * edge;
        }
    blend(rgb, alpha, color, 0.5f * opacity, mask);  // the mask ends halfway down the rim
}

static void draw_hole(uint8_t *rgb, uint8_t *mask, Rng *r) {
    float radius = uniform(r, 6, 16), cx = uniform(r, 24, SIDE - 24), cy = uniform(r, 24, SIDE - 24);
    float dark = uniform(r, 5, 35);
    for (int i = 0; i < SIDE * SIDE; i++) mask[i] = 0;
    for (int y = 0; y < SIDE; y++)
        for (int x = 0; x < SIDE; x++) {
            float dx = x + 0.5f - cx, dy = y + 0.5f - cy, d = sqrtf(dx * dx + dy * dy);
            uint8_t *p = rgb + ((size_t)y * SIDE + x) * 3;
            if (d < radius) {
                // Inside: dark, a little lighter towards the lower right (light falls in from the upper left).
                float v = dark + 25 * (dx + dy) / (2 * radius) + 10;
                for (int c = 0; c < 3; c++) p[c] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
                mask[y * SIDE + x] = 255;
            } else if (d < radius + 2) {  // a raised, lighter rim
                for (int c = 0; c < 3; c++) p[c] = (uint8_t)(p[c] + (255 - p[c]) * 0.35f);
                mask[y * SIDE + x] = 255;
            }
        }
}

static int save(const char *path, int channels, const uint8_t *pixels) {
    if (image_save_png(path, SIDE, SIDE, channels, pixels) != AGPT_OK) {
        fprintf(stderr, "make_default_data: %s\n", agpt_last_error());
        return 1;
    }
    return 0;
}

// A photo's file name without folders and extension: its class name in the held-out tree.
static void stem_of(const char *path, char *out, size_t n) {
    const char *base = strrchr(path, '/');
    snprintf(out, n, "%s", base ? base + 1 : path);
    char *dot = strrchr(out, '.');
    if (dot && dot != out) *dot = 0;
}

int main(int argc, char **argv) {
    if (argc < 6 || (strcmp(argv[1], "train") && strcmp(argv[1], "heldout"))) {
        fprintf(stderr, "usage: make_default_data train|heldout OUT SEED CROPS PHOTOS...\n");
        return 2;
    }
    bool heldout = !strcmp(argv[1], "heldout");
    const char *out = argv[2];
    uint64_t seed = strtoull(argv[3], NULL, 10);
    int per_photo = atoi(argv[4]);
    if (per_photo < 1 || per_photo > 999) {
        fprintf(stderr, "make_default_data: CROPS must be in [1, 999]\n");
        return 2;
    }
    static const char *kinds[] = {"good", "scratch", "stain", "hole"};
    uint8_t *rgb = malloc(SIDE * SIDE * 3), *mask = malloc(SIDE * SIDE);
    float *alpha = malloc(SIDE * SIDE * sizeof(float));
    if (!rgb || !mask || !alpha) return 1;
    int written = 0, references = 0, counts[4] = {0, 0, 0, 0};
    char cls[256], dir[4096], path[4400];
    for (int p = 5; p < argc; p++) {
        Image img;
        if (image_load(argv[p], &img) != AGPT_OK) {
            fprintf(stderr, "make_default_data: %s\n", agpt_last_error());
            return 1;
        }
        if (img.width < 64 || img.height < 64) {
            fprintf(stderr, "make_default_data: %s is %d x %d: too small to crop (64 x 64 at least)\n", argv[p],
                    img.width, img.height);
            return 1;
        }
        Rng r;
        rng_seed(&r, seed * 1000003u + (uint64_t)(p - 5));
        // Every crop of a class is one window of the photo shifted by up to 4 % of its side, as a part under
        // a fixed camera, so that a class's references show what its other images show. Training: WINDOWS
        // windows of 35-70 % of the shorter side per photo, classes "<photo>-<w>", mirrored or not. Held out:
        // one window (half the shorter side) per photo, the class named after the photo.
        char stem[200];
        stem_of(argv[p], stem, sizeof stem);
        int windows = heldout ? 1 : WINDOWS, shorter = img.width < img.height ? img.width : img.height;
        for (int w = 0; w < windows; w++) {
            if (heldout) snprintf(cls, sizeof cls, "%s", stem);
            else snprintf(cls, sizeof cls, "%s-%d", stem, w);
            snprintf(dir, sizeof dir, "%s/%s/train/good", out, cls);
            if (make_dirs(dir)) return 1;
            for (int k = 0; heldout && k < 4; k++) {
                snprintf(dir, sizeof dir, "%s/%s/test/%s", out, cls, kinds[k]);
                if (make_dirs(dir)) return 1;
                snprintf(dir, sizeof dir, "%s/%s/ground_truth/%s", out, cls, kinds[k]);
                if (k > 0 && make_dirs(dir)) return 1;
            }
            int s = heldout ? shorter / 2 : (int)(shorter * uniform(&r, 0.35f, 0.70f)), jitter = s / 25;
            int wx = jitter + (int)(rng_uniform(&r) * (float)(img.width - s - 2 * jitter + 1));
            int wy = jitter + (int)(rng_uniform(&r) * (float)(img.height - s - 2 * jitter + 1));
            bool mirror = !heldout && rng_uniform(&r) < 0.5f;
            int crops = heldout ? per_photo : (per_photo + WINDOWS - 1) / WINDOWS;
            int train_good = 0, photo_counts[4] = {0, 0, 0, 0};
            for (int i = 0; i < crops; i++) {
                int dx = (int)(rng_uniform(&r) * (2 * jitter + 1)) - jitter;
                int dy = (int)(rng_uniform(&r) * (2 * jitter + 1)) - jitter;
                if (crop(&img, wx + dx, wy + dy, s, mirror, rgb)) return 1;
                if (!heldout || i % 4 == 0) {  // training images, and every fourth held-out crop: a reference
                    snprintf(path, sizeof path, "%s/%s/train/good/%03d.png", out, cls, train_good++);
                    if (save(path, 3, rgb)) return 1;
                    if (heldout) references++;
                    else written++;
                    continue;
                }
                int kind = (i - i / 4 - 1) % 4;  // the test images: good, scratch, stain, hole in turn
                if (kind == 1) draw_scratch(rgb, mask, &r, alpha);
                if (kind == 2) draw_stain(rgb, mask, &r, alpha);
                if (kind == 3) draw_hole(rgb, mask, &r);
                int number = photo_counts[kind]++;
                snprintf(path, sizeof path, "%s/%s/test/%s/%03d.png", out, cls, kinds[kind], number);
                if (save(path, 3, rgb)) return 1;
                if (kind > 0) {
                    snprintf(path, sizeof path, "%s/%s/ground_truth/%s/%03d_mask.png", out, cls, kinds[kind], number);
                    if (save(path, 1, mask)) return 1;
                }
                counts[kind]++;
            }
        }
        image_free(&img);
    }
    if (heldout)
        printf("%d references, test: %d good, %d scratch, %d stain, %d hole\n", references, counts[0], counts[1],
               counts[2], counts[3]);
    else
        printf("%d training crops\n", written);
    free(rgb), free(mask), free(alpha);
    return 0;
}
