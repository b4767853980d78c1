// Pillow's BICUBIC resize, torchvision's CenterCrop and ToTensor + Normalize (see preprocess.h).
//
// The resampler follows Pillow's src/libImaging/Resample.c: precompute_coeffs, normalize_coeffs_8bpc,
// ImagingResampleHorizontal_8bpc / Vertical_8bpc and ImagingResampleInner. The coefficients and the passes compute
// the same since 2018 (Pillow 5.1 through 13.0); Pillow 13 only changed which pass runs first in some cases
// (RESIZE_PILLOW_13). Every floating-point expression keeps Pillow's order of operations, because a coefficient one
// ulp off can move a pixel by one level after the 22-bit quantisation. The accumulators are int32 as in Pillow:
// the normalised bicubic weights sum to 1 and their negative lobes are small (1/8 at most when upscaling), so the
// positive weights stay below 1.5 and |sum| < 1.5 * 255 * 2^22 + 2^21 < 2^31.
#include "model/preprocess.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// Pillow's x86-64 wheels are built without FMA, so a*b+c rounds twice there. Keep the compiler from fusing them
// on targets that have FMA (GCC fuses by default in gnu11 mode; clang honours the standard pragma).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

// torch.as_tensor(mean, dtype=float32): the Python float (a double) rounded to float32, hence the casts from
// double literals rather than float literals (double rounding can differ from direct rounding).
const float PREPROCESS_CLIP_MEAN[3] = {(float)0.48145466, (float)0.4578275, (float)0.40821073};
const float PREPROCESS_CLIP_STD[3] = {(float)0.26862954, (float)0.26130258, (float)0.27577711};

// 8 bits for the result, 2 for the filter's overshoot above 1 and below 0, and the sign: the coefficient scale.
#define PRECISION_BITS (32 - 8 - 2)
#define BICUBIC_SUPPORT 2.0
// A pass that writes more than this many bytes is split over OpenMP threads (by rows: the bytes are the same for
// any thread count).
#define PARALLEL_MIN_WORK 16384

const char *preprocess_mode_name(PreprocessMode mode) {
    switch (mode) {
        case PREPROCESS_SHORTER_SIDE_CROP: return "shorter-side+crop";
        case PREPROCESS_SQUASH: return "squash";
    }
    return "unknown";
}

// Keys' cubic convolution with a = -0.5, written as Pillow writes it (bicubic_filter in Resample.c).
static double bicubic_filter(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

// Fixed-point taps for output indices [first, first + count) of a resize from in_size to out_size samples along
// one axis. Tap t of output i weighs input sample bounds[2i] + t, for t < bounds[2i + 1].
typedef struct ResampleCoeffs {
    int ksize;       // taps allocated per output sample
    int *bounds;     // [count][2]: first input sample, number of taps
    int32_t *k;      // [count][ksize]: weights scaled by 2^PRECISION_BITS
} ResampleCoeffs;

static void coeffs_free(ResampleCoeffs *c) {
    free(c->bounds);
    free(c->k);
    c->bounds = NULL;
    c->k = NULL;
}

// Pillow's precompute_coeffs (box = (0, in_size), as Image.resize passes it without a box) followed by
// normalize_coeffs_8bpc.
static Status coeffs_compute(int in_size, int out_size, int first, int count, ResampleCoeffs *c) {
    memset(c, 0, sizeof *c);
    // _resize passes the box as floats: in0 = 0.0f, in1 = (float)in_size (exact for any side below 2^24).
    float in0 = 0.0f, in1 = (float)in_size;
    double scale = (double)(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;  // widen the filter when downscaling: antialiasing
    double support = BICUBIC_SUPPORT * filterscale;
    double ksize_d = ceil(support) * 2 + 1;
    if (ksize_d > (double)INT_MAX / 8) {
        return AGPT_FAIL(AGPT_ERR_ARG, "resize %d -> %d samples needs a %.0f-tap filter; too large", in_size,
                         out_size, ksize_d);
    }
    int ksize = (int)ksize_d;
    size_t nk = (size_t)count * (size_t)ksize;
    if (nk / (size_t)ksize != (size_t)count || nk > SIZE_MAX / sizeof(double)) {
        return AGPT_FAIL(AGPT_ERR_OOM, "resize %d -> %d: %d x %d filter taps overflow size_t", in_size, out_size,
                         count, ksize);
    }
    c->ksize = ksize;
    c->bounds = malloc((size_t)count * 2 * sizeof(int));
    c->k = malloc(nk * sizeof(int32_t));
    double *w = malloc((size_t)ksize * sizeof(double));
    if (!c->bounds || !c->k || !w) {
        free(w);
        coeffs_free(c);
        return AGPT_FAIL(AGPT_ERR_OOM, "resize %d -> %d: cannot allocate %zu bytes of filter taps", in_size,
                         out_size, nk * (sizeof(int32_t) + sizeof(double)));
    }

    double inv_filterscale = 1.0 / filterscale;
    for (int i = 0; i < count; i++) {
        int xx = first + i;
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        // (int) truncates towards zero, as in Pillow; a negative start is clamped to 0 just after.
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double v = bicubic_filter((x + xmin - center + 0.5) * inv_filterscale);
            w[x] = v;
            ww += v;
        }
        if (ww != 0.0) {
            for (int x = 0; x < xmax; x++) w[x] /= ww;
        }
        int32_t *k = c->k + (size_t)i * ksize;
        for (int x = 0; x < ksize; x++) {
            double v = x < xmax ? w[x] : 0.0;
            k[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << PRECISION_BITS)) : (int32_t)(0.5 + v * (1 << PRECISION_BITS));
        }
        c->bounds[2 * i + 0] = xmin;
        c->bounds[2 * i + 1] = xmax;
    }
    free(w);
    return AGPT_OK;
}

// Pillow's clip8: the accumulator carries 2^(PRECISION_BITS-1) for rounding; the shift floors (arithmetic shift,
// as in Pillow), then the value is clamped to a byte.
static inline uint8_t clip8(int32_t ss) {
    int32_t v = ss >> PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

// One horizontal pass over rows [0, rows) of in: out[r][i] = clip8(sum_t in[r][bounds_i - col_offset + t] * k_i[t])
// for the count output columns of c. in[r][0] is source column col_offset. Pillow's ResampleHorizontal_8bpc.
static void pass_horizontal(const uint8_t *in, size_t in_stride, int rows, int channels, const ResampleCoeffs *c,
                            int count, int col_offset, uint8_t *out, size_t out_stride) {
    const size_t ch = (size_t)channels;
#pragma omp parallel for schedule(static) if ((int64_t)rows * count * channels > PARALLEL_MIN_WORK)
    for (int r = 0; r < rows; r++) {
        const uint8_t *line_in = in + (size_t)r * in_stride;
        uint8_t *line_out = out + (size_t)r * out_stride;
        for (int i = 0; i < count; i++) {
            const int xmin = c->bounds[2 * i] - col_offset, xmax = c->bounds[2 * i + 1];
            const int32_t *k = c->k + (size_t)i * c->ksize;
            const uint8_t *p = line_in + (size_t)xmin * ch;
            for (size_t b = 0; b < ch; b++) {
                int32_t ss = 1 << (PRECISION_BITS - 1);
                for (int x = 0; x < xmax; x++) ss += p[(size_t)x * ch + b] * k[x];
                line_out[(size_t)i * ch + b] = clip8(ss);
            }
        }
    }
}

// One vertical pass: out[j][b] = clip8(sum_t in[bounds_j - row_offset + t][b] * k_j[t]) for the count output rows
// of c and row_bytes bytes per row. in[0] is source row row_offset. Pillow's ResampleVertical_8bpc.
static void pass_vertical(const uint8_t *in, size_t in_stride, size_t row_bytes, const ResampleCoeffs *c, int count,
                          int row_offset, uint8_t *out, size_t out_stride) {
#pragma omp parallel for schedule(static) if ((int64_t)count * (int64_t)row_bytes > PARALLEL_MIN_WORK)
    for (int j = 0; j < count; j++) {
        const int ymin = c->bounds[2 * j] - row_offset, ymax = c->bounds[2 * j + 1];
        const int32_t *k = c->k + (size_t)j * c->ksize;
        const uint8_t *base = in + (size_t)ymin * in_stride;
        uint8_t *line_out = out + (size_t)j * out_stride;
        for (size_t b = 0; b < row_bytes; b++) {
            int32_t ss = 1 << (PRECISION_BITS - 1);
            for (int y = 0; y < ymax; y++) ss += base[(size_t)y * in_stride + b] * k[y];
            line_out[b] = clip8(ss);
        }
    }
}

// The input samples that output samples [first, first + count) read: [*lo, *hi).
static void coeffs_span(const ResampleCoeffs *c, int count, int *lo, int *hi) {
    *lo = INT_MAX;
    *hi = 0;
    for (int i = 0; i < count; i++) {
        int a = c->bounds[2 * i], b = a + c->bounds[2 * i + 1];
        if (a < *lo) *lo = a;
        if (b > *hi) *hi = b;
    }
    if (*hi < *lo) *hi = *lo;  // only for a filter with no taps, which bicubic never has
}

int image_resize_vertical_first(int w, int h, int out_w, int out_h, ResizePassOrder order) {
    if (order != RESIZE_PILLOW_13) return 0;
    // Pillow 13 ImagingResampleInner: "If height is being scaled down more than twice the amount the width is,
    // run the vertical pass first". In rows and columns removed, not in scale factors.
    int64_t dh = (int64_t)h - out_h, dw = (int64_t)w - out_w;
    return dh > 0 && dh > dw * 2;
}

Status image_resize_bicubic_window(const uint8_t *src, int w, int h, int channels, int out_w, int out_h, int x0,
                                   int y0, int win_w, int win_h, ResizePassOrder order, uint8_t *dst) {
    AGPT_CHECK_ARG(src && dst, "image_resize_bicubic: NULL %s", src ? "dst" : "src");
    AGPT_CHECK_ARG(w > 0 && h > 0 && out_w > 0 && out_h > 0,
                   "image_resize_bicubic: sizes must be positive (%dx%d -> %dx%d)", w, h, out_w, out_h);
    AGPT_CHECK_ARG(channels >= 1 && channels <= 4, "image_resize_bicubic: %d channels; 1 to 4 are supported",
                   channels);
    AGPT_CHECK_ARG(x0 >= 0 && y0 >= 0 && win_w > 0 && win_h > 0 && win_w <= out_w - x0 && win_h <= out_h - y0,
                   "image_resize_bicubic: window %dx%d at (%d,%d) is not inside the %dx%d output", win_w, win_h, x0,
                   y0, out_w, out_h);
    AGPT_CHECK_ARG(order == RESIZE_PILLOW_10 || order == RESIZE_PILLOW_13, "image_resize_bicubic: unknown pass "
                   "order %d", (int)order);
    const size_t ch = (size_t)channels;
    const size_t src_stride = (size_t)w * ch, dst_stride = (size_t)win_w * ch;

    // Pillow runs a pass only along an axis whose size changes (need_horizontal / need_vertical in
    // ImagingResampleInner); along an unchanged axis the bicubic taps would be the identity anyway.
    const int need_horizontal = out_w != w, need_vertical = out_h != h;
    if (!need_horizontal && !need_vertical) {
        for (int y = 0; y < win_h; y++) {
            memcpy(dst + (size_t)y * dst_stride, src + (size_t)(y0 + y) * src_stride + (size_t)x0 * ch, dst_stride);
        }
        return AGPT_OK;
    }

    ResampleCoeffs cx = {0}, cy = {0};
    uint8_t *temp = NULL;
    Status st = AGPT_OK;
    if (need_horizontal && (st = coeffs_compute(w, out_w, x0, win_w, &cx)) != AGPT_OK) goto done;
    if (need_vertical && (st = coeffs_compute(h, out_h, y0, win_h, &cy)) != AGPT_OK) goto done;

    if (!need_vertical) {
        pass_horizontal(src + (size_t)y0 * src_stride, src_stride, win_h, channels, &cx, win_w, 0, dst, dst_stride);
    } else if (!need_horizontal) {
        pass_vertical(src + (size_t)x0 * ch, src_stride, dst_stride, &cy, win_h, 0, dst, dst_stride);
    } else if (!image_resize_vertical_first(w, h, out_w, out_h, order)) {
        // Horizontal pass over the source rows the window reads (Pillow's ybox_first..ybox_last), rounded to u8,
        // then the vertical pass.
        int row_first, row_last;
        coeffs_span(&cy, win_h, &row_first, &row_last);
        size_t bytes = (size_t)(row_last - row_first) * dst_stride;
        temp = malloc(bytes ? bytes : 1);
        if (!temp) {
            st = AGPT_FAIL(AGPT_ERR_OOM, "image_resize_bicubic: cannot allocate %zu bytes for the %dx%d intermediate",
                           bytes, win_w, row_last - row_first);
            goto done;
        }
        pass_horizontal(src + (size_t)row_first * src_stride, src_stride, row_last - row_first, channels, &cx,
                        win_w, 0, temp, dst_stride);
        pass_vertical(temp, dst_stride, dst_stride, &cy, win_h, row_first, dst, dst_stride);
    } else {
        // Pillow 13 order: vertical pass over the source columns the window reads, then the horizontal pass.
        int col_first, col_last;
        coeffs_span(&cx, win_w, &col_first, &col_last);
        size_t temp_stride = (size_t)(col_last - col_first) * ch;
        size_t bytes = (size_t)win_h * temp_stride;
        temp = malloc(bytes ? bytes : 1);
        if (!temp) {
            st = AGPT_FAIL(AGPT_ERR_OOM, "image_resize_bicubic: cannot allocate %zu bytes for the %dx%d intermediate",
                           bytes, col_last - col_first, win_h);
            goto done;
        }
        pass_vertical(src + (size_t)col_first * ch, src_stride, temp_stride, &cy, win_h, 0, temp, temp_stride);
        pass_horizontal(temp, temp_stride, win_h, channels, &cx, win_w, col_first, dst, dst_stride);
    }

done:
    free(temp);
    coeffs_free(&cx);
    coeffs_free(&cy);
    return st;
}

Status image_resize_bicubic(const uint8_t *src, int w, int h, int channels, uint8_t *dst, int out_w, int out_h) {
    return image_resize_bicubic_window(src, w, h, channels, out_w, out_h, 0, 0, out_w, out_h, RESIZE_PILLOW_10, dst);
}

// Python's round() of d / 2 for d >= 0: halves go to the even neighbour (round(2.5) == 2, round(1.5) == 2).
static int half_round_even(int d) {
    int k = d / 2;
    if (d % 2 == 0) return k;
    return (k % 2 == 0) ? k : k + 1;
}

Status preprocess_geometry(int w, int h, PreprocessMode mode, int size, PreprocessGeometry *out) {
    AGPT_CHECK_ARG(out, "preprocess_geometry: NULL output");
    AGPT_CHECK_ARG(w > 0 && h > 0, "preprocess_geometry: image size %dx%d must be positive", w, h);
    AGPT_CHECK_ARG(size > 0, "preprocess_geometry: input size %d must be positive", size);
    if (mode == PREPROCESS_SQUASH) {
        // Resize((size, size)): torchvision passes (w, h) = (size, size) to PIL.
        out->resized_w = size;
        out->resized_h = size;
    } else if (mode == PREPROCESS_SHORTER_SIDE_CROP) {
        // torchvision 0.14 _compute_resized_output_size with size = [s]:
        //   short, long = (w, h) if w <= h else (h, w)
        //   new_short, new_long = s, int(s * long / short)
        //   new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        // s * long is an exact integer; Python's true division of two integers below 2^53 equals the
        // correctly rounded double quotient, and int() truncates.
        int shorter = w <= h ? w : h, longer = w <= h ? h : w;
        double new_long = trunc((double)((int64_t)size * longer) / (double)shorter);
        AGPT_CHECK_ARG(new_long <= (double)INT_MAX,
                       "preprocess_geometry: %dx%d with the shorter side at %d gives a longer side of %.0f pixels",
                       w, h, size, new_long);
        out->resized_w = w <= h ? size : (int)new_long;
        out->resized_h = w <= h ? (int)new_long : size;
    } else {
        return AGPT_FAIL(AGPT_ERR_ARG, "preprocess_geometry: unknown mode %d", (int)mode);
    }
    // torchvision CenterCrop: crop_top = int(round((H - s) / 2.0)), crop_left likewise. The resized image is never
    // smaller than s on either side here, so torchvision's zero-padding branch is never taken.
    out->crop_left = half_round_even(out->resized_w - size);
    out->crop_top = half_round_even(out->resized_h - size);
    return AGPT_OK;
}

Status preprocess_image_u8(const Image *img, PreprocessMode mode, int size, ResizePassOrder order, uint8_t *out_hwc) {
    AGPT_CHECK_ARG(img && img->rgb && out_hwc, "preprocess_image: NULL image or output");
    PreprocessGeometry g = {0};
    AGPT_TRY(preprocess_geometry(img->width, img->height, mode, size, &g));
    return image_resize_bicubic_window(img->rgb, img->width, img->height, 3, g.resized_w, g.resized_h, g.crop_left,
                                       g.crop_top, size, size, order, out_hwc);
}

void preprocess_normalize(const uint8_t *hwc, int size, float *out_chw) {
    // torchvision ToTensor: byte tensor .to(float32).div(255); Normalize: tensor.sub_(mean).div_(std), both with
    // float32 operands, one rounding per operation.
    const size_t plane = (size_t)size * size;
    for (int c = 0; c < 3; c++) {
        const float mean = PREPROCESS_CLIP_MEAN[c], std = PREPROCESS_CLIP_STD[c];
        float *o = out_chw + (size_t)c * plane;
        for (size_t i = 0; i < plane; i++) {
            float v = (float)hwc[i * 3 + c] / 255.0f;
            o[i] = (v - mean) / std;
        }
    }
}

Status preprocess_image(const Image *img, PreprocessMode mode, int size, float *out_chw) {
    AGPT_CHECK_ARG(out_chw, "preprocess_image: NULL output");
    AGPT_CHECK_ARG(size > 0 && size <= 16384, "preprocess_image: input size %d outside 1..16384", size);
    size_t bytes = (size_t)size * size * 3;
    uint8_t *pixels = malloc(bytes);
    if (!pixels) return AGPT_FAIL(AGPT_ERR_OOM, "preprocess_image: cannot allocate %zu bytes", bytes);
    Status st = preprocess_image_u8(img, mode, size, RESIZE_PILLOW_10, pixels);
    if (st == AGPT_OK) preprocess_normalize(pixels, size, out_chw);
    free(pixels);
    return st;
}

void preprocess_reference_view(const float *src, int size, int patch, int shifts, int view, float *out_chw) {
    preprocess_shift_chw(src, size, view / shifts * patch / shifts, view % shifts * patch / shifts, out_chw);
}

void preprocess_shift_chw(const float *src, int size, int dy, int dx, float *out_chw) {
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < size; y++) {
            int sy = y - dy < 0 ? 0 : y - dy;
            for (int x = 0; x < size; x++) {
                int sx = x - dx < 0 ? 0 : x - dx;
                out_chw[((size_t)c * size + y) * size + x] = src[((size_t)c * size + sy) * size + sx];
            }
        }
}

void preprocess_rotate_chw(const float *src, int size, int quarters, float *out_chw) {
    const int S = size, k = ((quarters % 4) + 4) % 4;
    for (int c = 0; c < 3; c++) {
        const float *x = src + (size_t)c * S * S;
        float *dst = out_chw + (size_t)c * S * S;
        for (int i = 0; i < S; i++)
            for (int j = 0; j < S; j++) {
                int si = i, sj = j;  // dst[i][j] = x[si][sj]
                if (k == 1) si = j, sj = S - 1 - i;
                else if (k == 2) si = S - 1 - i, sj = S - 1 - j;
                else if (k == 3) si = S - 1 - j, sj = i;
                dst[(size_t)i * S + j] = x[(size_t)si * S + sj];
            }
    }
}
