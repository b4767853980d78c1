// Anomaly map visualisation: a jet-coloured map blended over the image the model saw.
#pragma once
#include <stdint.h>

// rgb [S][S][3] (the preprocessed crop), map [S][S] -> out [S][S][3]. Map values are drawn on a fixed scale
// [0, 1] (clamped), not rescaled per image, so colours mean the same on every image.
void heatmap_overlay(const uint8_t *rgb, const float *map, int S, float alpha, uint8_t *out);
