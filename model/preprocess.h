// Image preprocessing for the vision encoder: what the official AnomalyGPT does to a PIL image before ImageBind
// (reference doc section 1.1), reproduced byte for byte.
//
//   resize  PIL Image.resize(size, BICUBIC), as torchvision's Resize calls it on PIL images: Pillow's separable
//           resampler (libImaging/Resample.c), bicubic a = -0.5, support 2 widened by the scale when downscaling
//           (antialiasing), coefficients in 22-bit fixed point, a horizontal pass then a vertical pass, each
//           rounding and clipping to u8. No box, no reducing_gap (torchvision passes neither). That pass order is
//           every Pillow up to 12.x, and the reference pins Pillow 10.0.0; Pillow 13 sometimes runs the vertical
//           pass first, which moves some pixels by a few levels (RESIZE_PILLOW_13 reproduces it on request).
//   crop    torchvision CenterCrop: top = round((H - size) / 2), left = round((W - size) / 2) with Python's
//           round (half to even), so a 229-pixel side starts at 2, not 3.
//   tensor  ToTensor then Normalize: ((float)u8 / 255 - mean[c]) / std[c] in float32, CHW, the CLIP constants.
//
// Two resize variants are in use (reference 1.1):
//   PREPROCESS_SHORTER_SIDE_CROP  Resize(size): shorter side to size, longer side int(size * long / short), then
//                                 CenterCrop(size). Inference, test, few-shot query and references.
//   PREPROCESS_SQUASH             Resize((size, size)): ignores the aspect ratio; the CenterCrop after it is a
//                                 no-op. Web demo text/LLM branch and training.
//
// Only the pixels inside the crop are ever computed: a Pillow output pixel depends on its own row and column
// coefficients alone, so a window of the resize is exactly the same bytes as the full resize, and a 1x32768
// image costs a 224-wide strip instead of a 224x7340032 intermediate.
#pragma once
#include <stdint.h>

#include "runtime/image.h"
#include "runtime/status.h"

typedef enum PreprocessMode {
    PREPROCESS_SHORTER_SIDE_CROP = 0,  // inference, few-shot: Resize(size) + CenterCrop(size)
    PREPROCESS_SQUASH = 1,             // web demo, training: Resize((size, size))
} PreprocessMode;

// ImageBind / CLIP normalisation constants (RGB order).
extern const float PREPROCESS_CLIP_MEAN[3];  // 0.48145466, 0.4578275, 0.40821073
extern const float PREPROCESS_CLIP_STD[3];   // 0.26862954, 0.26130258, 0.27577711

// Where the crop comes from: the size Resize produces and the crop offsets inside it.
typedef struct PreprocessGeometry {
    int resized_w, resized_h;  // the image after Resize, before CenterCrop
    int crop_left, crop_top;   // offsets of the size x size crop inside the resized image
} PreprocessGeometry;

// The geometry for a w x h image; size is the model input side (224). Fails on non-positive sizes or a resized
// side that does not fit an int.
Status preprocess_geometry(int w, int h, PreprocessMode mode, int size, PreprocessGeometry *out);

// Which Pillow's pass order to reproduce. Each pass rounds to u8, so the order changes results.
typedef enum ResizePassOrder {
    RESIZE_PILLOW_10 = 0,  // horizontal, then vertical: Pillow 5 to 12.x; the reference (Pillow 10.0.0). Default.
    RESIZE_PILLOW_13 = 1,  // Pillow 13+: vertical first when rows removed > 2 x columns removed (and rows shrink)
} ResizePassOrder;

// 1 when `order` runs the vertical pass first for a w x h -> out_w x out_h resize that changes both sides.
int image_resize_vertical_first(int w, int h, int out_w, int out_h, ResizePassOrder order);

// Pillow-exact Image.resize((out_w, out_h), Image.BICUBIC) (Pillow 10 pass order) of an 8-bit image with 1 to 4 interleaved channels
// (src [h][w][channels], dst [out_h][out_w][channels]; channels are resampled independently, as Pillow does for
// L, RGB, RGBX and CMYK; RGBA is not that: Pillow premultiplies alpha first). src and dst must not overlap.
// Multithreaded with OpenMP; the bytes do not depend on the thread count.
Status image_resize_bicubic(const uint8_t *src, int w, int h, int channels, uint8_t *dst, int out_w, int out_h);

// The window [x0, x0 + win_w) x [y0, y0 + win_h) of that same resize (in either pass order), into
// dst [win_h][win_w][channels]: the same bytes as cropping the full result, at the cost of the window alone.
Status image_resize_bicubic_window(const uint8_t *src, int w, int h, int channels, int out_w, int out_h, int x0,
                                   int y0, int win_w, int win_h, ResizePassOrder order, uint8_t *dst);

// Resize and crop only: the u8 RGB pixels that ToTensor would see, out_hwc [size][size][3].
Status preprocess_image_u8(const Image *img, PreprocessMode mode, int size, ResizePassOrder order, uint8_t *out_hwc);

// ToTensor + Normalize of size x size RGB pixels: out_chw [3][size][size] = (u8 / 255 - mean[c]) / std[c].
void preprocess_normalize(const uint8_t *hwc, int size, float *out_chw);

// The whole path: img (RGB u8, from image_load) -> out_chw [3][size][size] float32, the encoder's input.
// Uses the reference's pass order (RESIZE_PILLOW_10).
Status preprocess_image(const Image *img, PreprocessMode mode, int size, float *out_chw);

// A [3,size,size] image moved down by dy and right by dx pixels (0 <= dy, dx < size), the uncovered border filled
// with the nearest edge pixel: a reference's view whose patch grid falls between the original's.
void preprocess_shift_chw(const float *src, int size, int dy, int dx, float *out_chw);
// View v (0 <= v < shifts^2) of a reference: moved down by v / shifts and right by v % shifts steps of
// patch / shifts pixels (view 0 is the image itself). The views of --reference-shifts, at inference and in training.
void preprocess_reference_view(const float *src, int size, int patch, int shifts, int view, float *out_chw);
// A [3,size,size] image turned by `quarters` quarter turns (any integer; mod 4), as torch.rot90(x, quarters,
// dims=(1, 2)): for one quarter out[c][i][j] = src[c][j][size-1-i]. The few-shot references' turned views, at
// inference (--rotate-references) and in training. src and out must not overlap.
void preprocess_rotate_chw(const float *src, int size, int quarters, float *out_chw);

const char *preprocess_mode_name(PreprocessMode mode);
