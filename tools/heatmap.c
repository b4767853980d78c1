#include "tools/heatmap.h"

// The jet colormap as piecewise-linear ramps: blue -> cyan -> yellow -> red.
static void jet(float v, float rgb[3]) {
    if (!(v >= 0)) v = 0;  // NaN reads as 0
    if (v > 1) v = 1;
    float r = 1.5f - (4 * v - 3 < 0 ? -(4 * v - 3) : 4 * v - 3);
    float g = 1.5f - (4 * v - 2 < 0 ? -(4 * v - 2) : 4 * v - 2);
    float b = 1.5f - (4 * v - 1 < 0 ? -(4 * v - 1) : 4 * v - 1);
    rgb[0] = r < 0 ? 0 : r > 1 ? 1 : r;
    rgb[1] = g < 0 ? 0 : g > 1 ? 1 : g;
    rgb[2] = b < 0 ? 0 : b > 1 ? 1 : b;
}

void heatmap_overlay(const uint8_t *rgb, const float *map, int S, float alpha, uint8_t *out) {
    for (int i = 0; i < S * S; i++) {
        float c[3];
        jet(map[i], c);
        for (int k = 0; k < 3; k++) {
            float v = (1 - alpha) * rgb[3 * i + k] + alpha * 255.0f * c[k];
            out[3 * i + k] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v + 0.5f);
        }
    }
}
