// Tests for runtime/image.c: PNG round trips, byte-exact agreement with Pillow on the goldens in tests/data/images
// (made by tests/reference/make_image_goldens.py), the shared photos, and a corrupt-input corpus (truncations,
// byte flips, hostile headers) that must give errors with messages and never crash.
//
// Usage: test_image [REPO_ROOT]. Without it the repository root is the current folder when it holds
// tests/data/images, else the folder above this source file. Exit 0: all passed; 1: a failure; 77: passed, but the
// shared photos (REPO_ROOT/../shared/data/images) are missing, so that part was skipped.
#define _POSIX_C_SOURCE 200809L  // mkdtemp, rmdir

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <zlib.h>  // crc32, to forge PNG headers that pass libpng's CRC check

#include "runtime/image.h"

static int g_passed, g_failed;

static void check(int ok, const char *file, int line, const char *fmt, ...) {
    if (ok) {
        g_passed++;
        return;
    }
    g_failed++;
    printf("FAIL %s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}
#define CHECK(cond, ...) check(!!(cond), __FILE__, __LINE__, __VA_ARGS__)

static char g_root[4096] = ".";

// snprintf for paths, without gcc's -Wformat-truncation guesses about how long g_root might be.
static void pathf(char *dst, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dst, cap, fmt, ap);
    va_end(ap);
}

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static uint8_t *read_all(const char *path, size_t *len) {
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    for (;;) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        cap *= 2;
        buf = realloc(buf, cap);
    }
    fclose(f);
    *len = n;
    return buf;
}

static int write_all(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(data, 1, len, f) == len;
    return fclose(f) == 0 && ok;
}

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return h;
}

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {  // xorshift64*: deterministic, so a failure reproduces
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return (uint32_t)((g_rng * 0x2545F4914F6CDD1Dull) >> 32);
}

// ---------------------------------------------------------------------------------------------------------------

static void test_roundtrip(const char *tmpdir) {
    const int sizes[][2] = {{37, 23}, {1, 1}, {1, 17}, {300, 2}};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        int w = sizes[si][0], h = sizes[si][1];
        for (int ch = 1; ch <= 4; ch++) {
            if (ch == 2) continue;
            size_t n = (size_t)w * h * ch;
            uint8_t *px = malloc(n);
            for (size_t i = 0; i < n; i++) px[i] = (uint8_t)rnd();
            uint8_t *png = NULL;
            size_t len = 0;
            Status s = image_encode_png_memory(w, h, ch, px, &png, &len);
            CHECK(s == AGPT_OK && png && len > 8, "encode %dx%dx%d: %s", w, h, ch, agpt_last_error());
            Image im;
            s = image_decode(png, len, "roundtrip.png", &im);
            CHECK(s == AGPT_OK && im.width == w && im.height == h, "decode %dx%dx%d: %s", w, h, ch,
                  agpt_last_error());
            int same = s == AGPT_OK;
            for (size_t i = 0; same && i < (size_t)w * h; i++)
                for (int c = 0; c < 3; c++)  // gray is replicated; RGBA loses its alpha
                    if (im.rgb[3 * i + c] != px[i * ch + (ch == 1 ? 0 : c)]) same = 0;
            CHECK(same, "round trip %dx%dx%d differs", w, h, ch);
            image_free(&im);
            CHECK(im.rgb == NULL && im.width == 0, "image_free zeroes the Image");

            // Through a file: the .tmp must be gone and the file must decode the same.
            char path[4200], tmp[4300];
            pathf(path, sizeof path, "%s/rt_%d_%d_%d.png", tmpdir, w, h, ch);
            pathf(tmp, sizeof tmp, "%s.tmp", path);
            s = image_save_png(path, w, h, ch, px);
            CHECK(s == AGPT_OK, "save %s: %s", path, agpt_last_error());
            CHECK(!exists(tmp), "%s left behind", tmp);
            size_t flen;
            uint8_t *fdata = read_all(path, &flen);
            CHECK(fdata && flen == len && memcmp(fdata, png, len) == 0, "saved file equals the in-memory PNG");
            free(fdata);
            s = image_load(path, &im);
            CHECK(s == AGPT_OK && im.width == w && im.height == h, "load %s: %s", path, agpt_last_error());
            image_free(&im);
            remove(path);
            free(png);
            free(px);
        }
    }
}

static void test_encode_errors(const char *tmpdir) {
    uint8_t px[12] = {0};
    uint8_t *out = (uint8_t *)1;
    size_t len = 1;
    CHECK(image_encode_png_memory(2, 2, 2, px, &out, &len) == AGPT_ERR_ARG && out == NULL && len == 0,
          "2 channels refused");
    CHECK(strstr(agpt_last_error(), "channels") != NULL, "message names channels: %s", agpt_last_error());
    CHECK(image_encode_png_memory(0, 2, 3, px, &out, &len) == AGPT_ERR_ARG, "width 0 refused");
    CHECK(image_encode_png_memory(40000, 1, 3, px, &out, &len) == AGPT_ERR_ARG, "width 40000 refused");
    CHECK(image_encode_png_memory(2, 2, 3, NULL, &out, &len) == AGPT_ERR_ARG, "NULL pixels refused");

    // A folder that does not exist: an I/O error, and neither the file nor its .tmp appears.
    char path[4200];
    pathf(path, sizeof path, "%s/no/such/folder/x.png", tmpdir);
    CHECK(image_save_png(path, 2, 2, 3, px) == AGPT_ERR_IO, "save into a missing folder fails");
    CHECK(strstr(agpt_last_error(), "x.png.tmp") != NULL, "message names the file: %s", agpt_last_error());

    // Saving over an existing file replaces it whole.
    pathf(path, sizeof path, "%s/replace.png", tmpdir);
    CHECK(write_all(path, "old contents", 12), "write %s", path);
    CHECK(image_save_png(path, 2, 2, 3, px) == AGPT_OK, "save over a file: %s", agpt_last_error());
    Image im;
    CHECK(image_load(path, &im) == AGPT_OK && im.width == 2, "replaced file decodes: %s", agpt_last_error());
    image_free(&im);
    remove(path);
}

// ---------------------------------------------------------------------------------------------------------------
// Goldens: the C decoder must give exactly Pillow's bytes.

typedef struct Golden {
    char name[128];
    int w, h;
} Golden;

static int load_goldens(Golden *g, int max) {
    char path[4200];
    pathf(path, sizeof path, "%s/tests/data/images/goldens.txt", g_root);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[512];
    int n = 0;
    while (n < max && fgets(line, sizeof line, f))
        if (line[0] != '#' && sscanf(line, "%127s %d %d", g[n].name, &g[n].w, &g[n].h) == 3) n++;
    fclose(f);
    return n;
}

static void compare_to_file(const char *what, const Image *im, const char *rgb_path) {
    size_t n;
    uint8_t *want = read_all(rgb_path, &n);
    CHECK(want != NULL, "read %s", rgb_path);
    if (!want) return;
    size_t have = (size_t)im->width * im->height * 3;
    size_t first = 0;
    int same = n == have;
    for (size_t i = 0; same && i < n; i++)
        if (want[i] != im->rgb[i]) same = 0, first = i;
    if (!same && n == have)
        CHECK(0, "%s differs from Pillow first at byte %zu (pixel %zu,%zu): got %d, Pillow %d", what, first,
              first / 3 % (size_t)im->width, first / 3 / (size_t)im->width, im->rgb[first], want[first]);
    else
        CHECK(same, "%s: %zu bytes decoded, Pillow gives %zu", what, have, n);
    free(want);
}

static void test_goldens(const Golden *g, int n) {
    for (int i = 0; i < n; i++) {
        char path[4400], rgb[4500];
        pathf(path, sizeof path, "%s/tests/data/images/%s", g_root, g[i].name);
        pathf(rgb, sizeof rgb, "%s.rgb", path);
        Image im;
        Status s = image_load(path, &im);
        CHECK(s == AGPT_OK, "decode %s: %s", g[i].name, agpt_last_error());
        if (s != AGPT_OK) continue;
        CHECK(im.width == g[i].w && im.height == g[i].h, "%s is %dx%d, Pillow says %dx%d", g[i].name, im.width,
              im.height, g[i].w, g[i].h);
        if (im.width == g[i].w && im.height == g[i].h) compare_to_file(g[i].name, &im, rgb);
        image_free(&im);
    }
    // The option that departs from Pillow: 16-bit gray keeps the high byte instead of clipping.
    char path[4400], rgb[4500];
    pathf(path, sizeof path, "%s/tests/data/images/png_gray16.png", g_root);
    pathf(rgb, sizeof rgb, "%s.hi.rgb", path);
    ImageDecodeOptions opt = {.gray16_high_byte = 1};
    Image im;
    CHECK(image_load_ex(path, &opt, &im) == AGPT_OK, "decode gray16 high byte: %s", agpt_last_error());
    if (im.rgb) compare_to_file("png_gray16.png with gray16_high_byte", &im, rgb);
    image_free(&im);
}

// The shared photos: dimensions, a few pixels and a checksum of all bytes, all from Pillow.
static int test_shared_photos(void) {
    char dir[4200];
    pathf(dir, sizeof dir, "%s/../shared/data/images", g_root);
    if (!exists(dir)) {
        printf("SKIP shared photos: %s is missing\n", dir);
        return 0;
    }
    static const struct {
        const char *name;
        int w, h;
        uint64_t fnv;
        uint8_t px[4];  // gray value (R = G = B) at (0,0), (w-1,0), (100,200), (w-1,h-1)
    } photos[] = {
        {"brick.png", 512, 512, 0x004D4A15F2CA262Aull, {99, 150, 98, 176}},
        {"grass.png", 512, 512, 0xF157CD6EE11DAB76ull, {113, 173, 76, 108}},
        {"gravel.png", 512, 512, 0x7F89E030751F5976ull, {171, 87, 113, 158}},
    };
    for (size_t i = 0; i < sizeof photos / sizeof photos[0]; i++) {
        char path[4400];
        pathf(path, sizeof path, "%s/%s", dir, photos[i].name);
        Image im;
        Status s = image_load(path, &im);
        CHECK(s == AGPT_OK, "decode %s: %s", path, agpt_last_error());
        if (s != AGPT_OK) continue;
        CHECK(im.width == photos[i].w && im.height == photos[i].h, "%s is %dx%d", photos[i].name, im.width,
              im.height);
        const int xy[4][2] = {{0, 0}, {im.width - 1, 0}, {100, 200}, {im.width - 1, im.height - 1}};
        for (int k = 0; k < 4; k++) {
            const uint8_t *p = im.rgb + ((size_t)xy[k][1] * im.width + xy[k][0]) * 3;
            CHECK(p[0] == photos[i].px[k] && p[1] == photos[i].px[k] && p[2] == photos[i].px[k],
                  "%s pixel (%d,%d) = %d,%d,%d, Pillow %d", photos[i].name, xy[k][0], xy[k][1], p[0], p[1], p[2],
                  photos[i].px[k]);
        }
        uint64_t h = fnv1a(im.rgb, (size_t)im.width * im.height * 3);
        CHECK(h == photos[i].fnv, "%s checksum %016llX, Pillow %016llX", photos[i].name, (unsigned long long)h,
              (unsigned long long)photos[i].fnv);
        image_free(&im);
    }
    return 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Corrupt inputs

// A decode that must fail: an error status, a zeroed Image, and a message that names the input.
static int fails_cleanly(const uint8_t *buf, size_t len, const char *name, Status *code) {
    Image im = {1, 1, (uint8_t *)&im};
    agpt_clear_error();
    Status s = image_decode(buf, len, name, &im);
    if (code) *code = s;
    if (s == AGPT_OK) {
        image_free(&im);
        return 0;
    }
    return im.rgb == NULL && im.width == 0 && im.height == 0 && strstr(agpt_last_error(), name) != NULL;
}

static void test_truncations(const Golden *g, int n) {
    for (int i = 0; i < n; i++) {
        char path[4400];
        pathf(path, sizeof path, "%s/tests/data/images/%s", g_root, g[i].name);
        size_t len;
        uint8_t *full = read_all(path, &len);
        if (!full) continue;
        int bad = 0, tried = 0;
        size_t bad_len = 0;
        // Every length near the start (signature, headers) and the end (IEND, EOI), a stride in between.
        for (size_t cut = 0; cut < len; cut += (cut < 300 || cut + 40 > len) ? 1 : 7) {
            uint8_t *copy = malloc(cut ? cut : 1);  // an exact-size copy, so ASan sees any over-read
            memcpy(copy, full, cut);
            tried++;
            if (!fails_cleanly(copy, cut, g[i].name, NULL)) bad++, bad_len = cut;
            free(copy);
        }
        CHECK(bad == 0, "%s: %d of %d truncations did not fail cleanly (e.g. at %zu of %zu bytes: %s)", g[i].name,
              bad, tried, bad_len, len, agpt_last_error());
        free(full);
    }
}

static void test_messages(void) {
    char path[4400];
    size_t len;
    Status code;
    pathf(path, sizeof path, "%s/tests/data/images/jpg_420.jpg", g_root);
    uint8_t *jpg = read_all(path, &len);
    CHECK(jpg != NULL, "read %s", path);
    if (jpg) {
        CHECK(fails_cleanly(jpg, len / 2, "photo.jpg", &code) && code == AGPT_ERR_FORMAT, "half a JPEG fails");
        CHECK(strstr(agpt_last_error(), "photo.jpg: truncated JPEG (Premature end of JPEG file") != NULL,
              "truncated JPEG message: %s", agpt_last_error());
        CHECK(fails_cleanly(jpg, len - 2, "photo.jpg", &code), "JPEG without EOI fails");
        CHECK(strstr(agpt_last_error(), "truncated JPEG") != NULL, "no-EOI message: %s", agpt_last_error());
        free(jpg);
    }
    pathf(path, sizeof path, "%s/tests/data/images/png_rgb8.png", g_root);
    uint8_t *png = read_all(path, &len);
    CHECK(png != NULL, "read %s", path);
    if (png) {
        CHECK(fails_cleanly(png, len / 2, "cut.png", &code) && code == AGPT_ERR_FORMAT, "half a PNG fails");
        CHECK(strstr(agpt_last_error(), "cut.png: truncated PNG") != NULL, "message: %s", agpt_last_error());
        CHECK(fails_cleanly(png, len - 12, "noiend.png", &code), "PNG without IEND fails");
        CHECK(strstr(agpt_last_error(), "truncated PNG") != NULL, "message: %s", agpt_last_error());
        free(png);
    }

    const uint8_t bmp[] = {'B', 'M', 0x36, 0, 0, 0, 0, 0, 0, 0, 0x36, 0, 0, 0};
    CHECK(fails_cleanly(bmp, sizeof bmp, "x.bmp", &code) && code == AGPT_ERR_UNSUPPORTED, "BMP refused");
    CHECK(strstr(agpt_last_error(), "x.bmp: not a PNG or JPEG file (starts with 42 4D 36 00 00 00 00 00 ...") &&
              strstr(agpt_last_error(), "BMP"),
          "BMP message: %s", agpt_last_error());
    const char *text = "hello, this is not an image\n";
    CHECK(fails_cleanly((const uint8_t *)text, strlen(text), "notes.txt", &code) && code == AGPT_ERR_FORMAT,
          "text refused");
    CHECK(strstr(agpt_last_error(), "notes.txt: not a PNG or JPEG file (starts with 68 65 6C") != NULL,
          "text message: %s", agpt_last_error());
    CHECK(fails_cleanly((const uint8_t *)"", 0, "empty.png", &code) && code == AGPT_ERR_FORMAT, "empty refused");
    CHECK(strstr(agpt_last_error(), "empty") != NULL, "empty message: %s", agpt_last_error());
    Image im;
    CHECK(image_decode(NULL, 0, NULL, &im) != AGPT_OK && strstr(agpt_last_error(), "image: empty"),
          "NULL name reads as 'image': %s", agpt_last_error());
}

static void test_files(const char *tmpdir) {
    char path[4200];
    Image im;
    pathf(path, sizeof path, "%s/empty.png", tmpdir);
    CHECK(write_all(path, "", 0), "write %s", path);
    CHECK(image_load(path, &im) == AGPT_ERR_FORMAT && strstr(agpt_last_error(), "empty.png: empty"),
          "empty file: %s", agpt_last_error());
    remove(path);
    pathf(path, sizeof path, "%s/missing.png", tmpdir);
    CHECK(image_load(path, &im) == AGPT_ERR_IO && strstr(agpt_last_error(), "missing.png"), "missing file: %s",
          agpt_last_error());
    CHECK(image_load(tmpdir, &im) == AGPT_ERR_IO && strstr(agpt_last_error(), "folder"), "folder: %s",
          agpt_last_error());
    // A JPEG named .png: the bytes decide.
    char src[4400];
    pathf(src, sizeof src, "%s/tests/data/images/jpg_gray.jpg", g_root);
    size_t len;
    uint8_t *jpg = read_all(src, &len);
    pathf(path, sizeof path, "%s/really_a_jpeg.png", tmpdir);
    CHECK(jpg && write_all(path, jpg, len), "write %s", path);
    CHECK(image_load(path, &im) == AGPT_OK && im.width == 37, "JPEG named .png decodes: %s", agpt_last_error());
    image_free(&im);
    remove(path);
    free(jpg);
}

// Rewrites the IHDR size of a PNG and fixes its CRC, so that only our own limit can refuse it.
static void forge_png(uint8_t *png, uint32_t w, uint32_t h) {
    uint8_t *ihdr = png + 8;  // length(4) "IHDR"(4) width(4) height(4) ... crc
    for (int i = 0; i < 4; i++) ihdr[8 + i] = (uint8_t)(w >> (24 - 8 * i)), ihdr[12 + i] = (uint8_t)(h >> (24 - 8 * i));
    uint32_t crc = (uint32_t)crc32(0, ihdr + 4, 17);
    for (int i = 0; i < 4; i++) ihdr[21 + i] = (uint8_t)(crc >> (24 - 8 * i));
}

static void test_hostile_headers(void) {
    char path[4400];
    size_t len;
    Status code;
    pathf(path, sizeof path, "%s/tests/data/images/png_rgb8.png", g_root);
    uint8_t *png = read_all(path, &len);
    if (png) {
        forge_png(png, 100000, 100000);
        CHECK(fails_cleanly(png, len, "huge.png", &code) && code == AGPT_ERR_UNSUPPORTED, "100000x100000 PNG");
        CHECK(strstr(agpt_last_error(), "100000x100000") && strstr(agpt_last_error(), "too large"), "message: %s",
              agpt_last_error());
        forge_png(png, 30000, 30000);  // each side allowed, the total is not
        CHECK(fails_cleanly(png, len, "wide.png", &code) && code == AGPT_ERR_UNSUPPORTED, "30000x30000 PNG");
        forge_png(png, 0, 0);
        CHECK(fails_cleanly(png, len, "zero.png", &code) && code == AGPT_ERR_FORMAT, "0x0 PNG: %s",
              agpt_last_error());
        forge_png(png, 20000, 9000);  // within limits, but the data is 37x23: an error, not a crash or a hang
        CHECK(fails_cleanly(png, len, "short.png", &code), "20000x9000 PNG with 37x23 data: %s", agpt_last_error());
        free(png);
    }
    pathf(path, sizeof path, "%s/tests/data/images/jpg_420.jpg", g_root);
    uint8_t *jpg = read_all(path, &len);
    if (jpg) {
        size_t sof = 0;
        for (size_t i = 2; i + 9 < len; i++)
            if (jpg[i] == 0xFF && (jpg[i + 1] == 0xC0 || jpg[i + 1] == 0xC2)) { sof = i; break; }
        CHECK(sof != 0, "found SOF in jpg_420.jpg");
        if (sof) {
            // SOF: FF C0, length(2), precision(1), height(2), width(2)
            jpg[sof + 5] = 65000 >> 8, jpg[sof + 6] = 65000 & 255;
            jpg[sof + 7] = 65000 >> 8, jpg[sof + 8] = 65000 & 255;
            CHECK(fails_cleanly(jpg, len, "huge.jpg", &code) && code == AGPT_ERR_UNSUPPORTED, "65000x65000 JPEG");
            CHECK(strstr(agpt_last_error(), "65000x65000") && strstr(agpt_last_error(), "too large"), "message: %s",
                  agpt_last_error());
            jpg[sof + 5] = 0, jpg[sof + 6] = 0;
            CHECK(fails_cleanly(jpg, len, "zero.jpg", &code), "0-high JPEG: %s", agpt_last_error());
            jpg[sof + 5] = 9000 >> 8, jpg[sof + 6] = 9000 & 255, jpg[sof + 7] = 9000 >> 8, jpg[sof + 8] = 9000 & 255;
            // Its entropy data stops long before 9000x9000, but the file ends with a proper EOI: libjpeg only warns
            // ("premature end of data segment") and fills the rest with gray, and Pillow returns that image. So do
            // we (cameras streaming MJPEG often trigger that warning on images worth keeping).
            Image im;
            CHECK(image_decode(jpg, len, "short.jpg", &im) == AGPT_OK && im.width == 9000 &&
                      im.rgb[(4500u * 9000 + 4500) * 3] == 128,
                  "9000x9000 JPEG with 37x23 data decodes gray-filled, as in Pillow: %s", agpt_last_error());
            image_free(&im);
        }
        free(jpg);
    }

    // A scan bomb: the last scan of a progressive JPEG repeated 600 times. libjpeg only warns about the bogus
    // progression, so without a limit every copy costs a pass over the whole coefficient buffer.
    pathf(path, sizeof path, "%s/tests/data/images/jpg_progressive.jpg", g_root);
    jpg = read_all(path, &len);
    if (jpg) {
        size_t last_sos = 0;
        for (size_t i = 2; i + 1 < len; i++)
            if (jpg[i] == 0xFF && jpg[i + 1] == 0xDA) last_sos = i;
        size_t seg = len - 2 - last_sos;  // SOS .. just before EOI
        size_t blen = (len - 2) + 600 * seg + 2;
        uint8_t *bomb = malloc(blen);
        memcpy(bomb, jpg, len - 2);
        for (int k = 0; k < 600; k++) memcpy(bomb + (len - 2) + k * seg, jpg + last_sos, seg);
        bomb[blen - 2] = 0xFF, bomb[blen - 1] = 0xD9;
        CHECK(last_sos && fails_cleanly(bomb, blen, "bomb.jpg", &code) && code == AGPT_ERR_FORMAT &&
                  strstr(agpt_last_error(), "scans"),
              "600 repeated scans refused: %s", agpt_last_error());
        free(bomb);
        free(jpg);
    }
}

// Random byte changes: any outcome but a crash, a leak or an error without a message.
static void test_byte_flips(const Golden *g, int n, int per_file) {
    int ok = 0, err = 0, bad = 0;
    for (int i = 0; i < n; i++) {
        char path[4400];
        pathf(path, sizeof path, "%s/tests/data/images/%s", g_root, g[i].name);
        size_t len;
        uint8_t *full = read_all(path, &len);
        if (!full) continue;
        uint8_t *copy = malloc(len);
        for (int t = 0; t < per_file; t++) {
            memcpy(copy, full, len);
            int flips = 1 + (int)(rnd() % 4);
            for (int k = 0; k < flips; k++) {
                // Half the time aim at the first 100 bytes, where the headers are.
                size_t at = (rnd() & 1) ? rnd() % (len < 100 ? len : 100) : rnd() % len;
                copy[at] = (rnd() & 1) ? (uint8_t)rnd() : (uint8_t)(copy[at] ^ (1u << (rnd() % 8)));
            }
            Image im;
            agpt_clear_error();
            Status s = image_decode(copy, len, g[i].name, &im);
            if (s == AGPT_OK) {
                ok++;
                if (im.width <= 0 || im.height <= 0 || !im.rgb) bad++;
                image_free(&im);
            } else {
                err++;
                if (!strstr(agpt_last_error(), g[i].name) || im.rgb) bad++;
            }
        }
        free(copy);
        free(full);
    }
    CHECK(bad == 0, "byte flips: %d of %d results malformed", bad, ok + err);
    printf("byte flips: %d decoded, %d refused with a message\n", ok, err);
}

// ---------------------------------------------------------------------------------------------------------------

static void find_root(int argc, char **argv) {
    if (argc > 1) {
        snprintf(g_root, sizeof g_root, "%s", argv[1]);
        return;
    }
    if (exists("tests/data/images/goldens.txt")) return;  // run from the repository root
    // Else the folder above tests/, from this file's path as the compiler saw it (absolute under CMake).
    snprintf(g_root, sizeof g_root, "%s", __FILE__);
    char *slash = strrchr(g_root, '/');
    if (slash) *slash = 0;  // .../tests
    slash = strrchr(g_root, '/');
    if (slash) *slash = 0;
    else snprintf(g_root, sizeof g_root, ".");
}

int main(int argc, char **argv) {
    find_root(argc, argv);
    clock_t t0 = clock();
    char tmpdir[] = "/tmp/agpt_test_image_XXXXXX";
    if (!mkdtemp(tmpdir)) {
        printf("cannot create a temporary folder\n");
        return 1;
    }

    test_roundtrip(tmpdir);
    test_encode_errors(tmpdir);
    test_files(tmpdir);

    Golden g[128];
    int n = load_goldens(g, 128);
    CHECK(n > 30, "tests/data/images/goldens.txt under %s lists the goldens (found %d)", g_root, n);
    if (n < 0) n = 0;
    test_goldens(g, n);
    int shared = test_shared_photos();
    test_messages();
    test_hostile_headers();
    test_truncations(g, n);
    test_byte_flips(g, n, 100);
    rmdir(tmpdir);

    printf("test_image: %.2f s CPU\n", (double)(clock() - t0) / CLOCKS_PER_SEC);
    printf("%d passed, %d failed\n", g_passed, g_failed);
    if (g_failed) return 1;
    return shared ? 0 : 77;
}
