// What the inspection commands (map, detect) share: output folders, the per-image outputs, JSON lines.
#pragma once
#include <cjson/cJSON.h>
#include <stddef.h>

#include "model/vision_model.h"

// Creates dir if missing (not its parents); an existing non-folder is an error.
Status ensure_dir(const char *dir);
// "path/to/img_01.png" -> "img_01"
void stem_of(const char *path, char *out, size_t cap);
// <out_dir>/<stem>.map.safetensors (the raw [S,S] f32 map) and <out_dir>/<stem>.heatmap.png (the map over the
// image as the model saw it); their paths are returned in map_path and heatmap_path.
Status write_map_outputs(const VisionModel *m, const Image *img, const float *map, const char *out_dir,
                         const char *stem, char *heatmap_path, char *map_path, size_t cap);
// Prints obj as one line on stdout, flushed, and frees it.
void print_json_line(cJSON *obj);
