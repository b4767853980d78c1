// The image operations that NSA's patch_ex (anomalygpt-reference.md 6.4) borrows from OpenCV, re-expressed so
// that a synthetic anomaly made here is the one the reference trains on:
//
//   seamless_clone   cv2.seamlessClone(src, dst, mask, center, NORMAL_CLONE) of OpenCV 4.x (4.8, the version the
//                    reference pins, and 4.10 agree). What OpenCV computes, step by step:
//                    1. the mask's outer one-pixel ring is zeroed; roi_s = bounding box of its nonzero pixels;
//                       roi_d = the same size at (cx - w/2, cy - h/2) in dst (integer division). Empty mask: dst.
//                    2. the mask inside roi_s is eroded by a 7x7 square (3 x 3x3 iterations). The erosion sees
//                       the mask's zeros just outside roi_s, and nothing (no erosion) past the mask image's edge.
//                    3. forward differences gx(y,x) = I(y,x+1) - I(y,x), gy likewise, of dst(roi_d) and of
//                       src(roi_s) masked to the (uneroded) mask; the guidance field is
//                       G = m * grad(src) + (1 - m) * grad(dst), with m the eroded mask as 0/1.
//                    4. the whole roi_d rectangle is re-solved: on its outer ring u = dst, inside the 5-point
//                       Laplacian of u equals div G (backward differences of G). OpenCV solves that Dirichlet
//                       problem with a float32 FFT-based sine transform; we solve the same discrete problem
//                       exactly with a double-precision DST-I (the Laplacian's eigenbasis), so the two differ
//                       only where float32 rounding moves a value across an integer.
//                    5. u is truncated (not rounded) to u8, clamped to [0, 255].
//                    OpenCV 4.14 and 5.x compute something else (a delta in the source's first or third
//                    channel has no effect there); the reference predates them.
//   resize_linear    cv2.resize(..., INTER_LINEAR) of an 8-bit image: 11-bit fixed-point weights, the
//                    horizontal pass kept in int, the vertical pass rounded as OpenCV's SIMD path does
//                    ((((S0 >> 4) * b0) >> 16) + (((S1 >> 4) * b1) >> 16) + 2) >> 2. Bit-exact against cv2 4.10.
//   median_binary    cv2.medianBlur(m, k) of a 0/1 image (k odd; replicated border).
#pragma once
#include <stdint.h>

#include "runtime/status.h"

// out [dh][dw][3] = seamless clone of src [sh][sw][3] into dst [dh][dw][3] under mask [sh][sw] (any nonzero value
// counts; patch_ex passes 0/255) centred at column cx, row cy. Fails with AGPT_ERR_ARG (as cv2 raises) when roi_d
// leaves dst. out may equal dst.
Status seamless_clone(const uint8_t *src, int sh, int sw, const uint8_t *dst, int dh, int dw, const uint8_t *mask,
                      int cx, int cy, uint8_t *out);

// dst [dh][dw][cn] = cv2.resize(src [sh][sw][cn], (dw, dh)) with INTER_LINEAR. cn in 1..4.
Status resize_linear(const uint8_t *src, int sh, int sw, int cn, uint8_t *dst, int dh, int dw);

// dst [h][w] = cv2.medianBlur(src [h][w], k) for 0/1 input: 1 where more than k*k/2 of the window is 1.
Status median_binary(const uint8_t *src, int h, int w, int k, uint8_t *dst);
