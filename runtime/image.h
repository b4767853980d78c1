// Image files: PNG and JPEG decoded to 8-bit RGB, PNG encoded from 1, 3 or 4 channels.
//
// Decoding reproduces what the official AnomalyGPT sees: Pillow's Image.open(f).convert("RGB"), byte for byte
// (tests/test_image.c checks this against goldens made by tests/reference/make_image_goldens.py):
// - PNG: every colour type and bit depth, Adam7 interlace, palettes with or without tRNS. Alpha is dropped, not
//   composited; gAMA, sBIT and ICC profiles are ignored (Pillow applies none of them). 16-bit samples keep the
//   high byte (v >> 8), except 16-bit grayscale: Pillow opens it as mode "I;16", whose conversion to RGB clips
//   every value above 255 to 255. That is reproduced by default; ImageDecodeOptions.gray16_high_byte selects v >> 8.
// - JPEG: grayscale, YCbCr, RGB, CMYK and YCCK; baseline, progressive, arithmetic. libjpeg's accurate integer IDCT
//   (JDCT_ISLOW) and fancy upsampling, Pillow's defaults. Four-component JPEGs are read as Adobe-inverted CMYK and
//   turned into RGB with Pillow's formula (see jpeg_cmyk_to_rgb in image.c). EXIF orientation is not applied
//   (Image.open does not apply it either).
// - Other formats (BMP, GIF, TIFF, WebP) are refused with a message naming what the file looks like.
// The format comes from the first bytes, never from the file name.
//
// Safety: no input crashes the process or allocates without bound. Images over IMAGE_MAX_SIDE pixels on a side or
// IMAGE_MAX_PIXELS in all are refused before any pixel memory is allocated; a truncated file is an error, never a
// silently gray-filled image; libpng and libjpeg errors come back as a Status with the library's message.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"

#ifndef IMAGE_MAX_SIDE
#define IMAGE_MAX_SIDE 32768
#endif
#ifndef IMAGE_MAX_PIXELS
#define IMAGE_MAX_PIXELS 200000000ll  // 600 MB of RGB
#endif
#define IMAGE_MAX_FILE_BYTES (1ll << 30)  // image_load refuses larger files before reading them

typedef struct Image {
    int width, height;
    uint8_t *rgb;  // [height][width][3], from mem_host_alloc; release with image_free
} Image;

typedef struct ImageDecodeOptions {
    // 16-bit grayscale PNG: 0 (default) clips values above 255 to 255, as Pillow's "I;16" -> "RGB" does;
    // 1 keeps the high byte, as Pillow does for 16-bit RGB, RGBA and gray+alpha.
    int gray16_high_byte;
} ImageDecodeOptions;

// Reads the whole file, then decodes it as image_decode does. Errors name the path.
Status image_load(const char *path, Image *out);
Status image_load_ex(const char *path, const ImageDecodeOptions *opt, Image *out);

// Decodes a PNG or JPEG held in memory. name_for_errors starts every message ("photo.jpg: truncated JPEG (...)");
// NULL reads as "image". On failure *out is {0, 0, NULL}. opt may be NULL (the defaults above).
Status image_decode(const uint8_t *buf, size_t len, const char *name_for_errors, Image *out);
Status image_decode_ex(const uint8_t *buf, size_t len, const char *name_for_errors, const ImageDecodeOptions *opt,
                       Image *out);

// Frees the pixels and zeroes *img; safe on a zeroed or already freed Image.
void image_free(Image *img);

// Writes an 8-bit PNG (channels 1 = gray, 3 = RGB, 4 = RGBA; pixels [height][width][channels]). It writes
// "<path>.tmp", flushes it to disk and renames it over path, so a failure never leaves a partial file under path.
// Two writers of the same path at once must be serialised by the caller (they share the .tmp name).
Status image_save_png(const char *path, int width, int height, int channels, const uint8_t *pixels);

// The same PNG into a new buffer (*out, *out_len) that the caller releases with free().
Status image_encode_png_memory(int width, int height, int channels, const uint8_t *pixels, uint8_t **out,
                               size_t *out_len);
