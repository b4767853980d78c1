#include "tools/inspect_io.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "tools/heatmap.h"

Status ensure_dir(const char *dir) {
    if (mkdir(dir, 0755) == 0 || errno == EEXIST) {
        struct stat st;
        if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode)) return AGPT_OK;
    }
    return AGPT_FAIL(AGPT_ERR_IO, "cannot create output directory %s: %s", dir, strerror(errno));
}

void stem_of(const char *path, char *out, size_t cap) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    snprintf(out, cap, "%s", base);
    char *dot = strrchr(out, '.');
    if (dot && dot != out) *dot = 0;
}

Status write_map_outputs(const VisionModel *m, const Image *img, const float *map, const char *out_dir,
                         const char *stem, char *heatmap_path, char *map_path, size_t cap) {
    int S = m->vision.image;
    if (snprintf(map_path, cap, "%s/%s.map.safetensors", out_dir, stem) >= (int)cap ||
        snprintf(heatmap_path, cap, "%s/%s.heatmap.png", out_dir, stem) >= (int)cap)
        return AGPT_FAIL(AGPT_ERR_ARG, "output path %s/%s... is longer than %zu bytes", out_dir, stem, cap);
    StEntry entry = {"anomaly_map", tensor_2d((void *)map, DT_F32, DEV_CPU, S, S)};
    const char *meta[] = {"format", "agpt-anomaly-map-1", "preprocess", preprocess_mode_name(m->mode)};
    AGPT_TRY(st_write(map_path, &entry, 1, meta, 2));
    uint8_t *crop = NULL, *over = NULL;
    Status s = mem_host_alloc((size_t)S * S * 3, (void **)&crop);
    if (s == AGPT_OK) s = mem_host_alloc((size_t)S * S * 3, (void **)&over);
    if (s == AGPT_OK) s = preprocess_image_u8(img, m->mode, S, RESIZE_PILLOW_10, crop);
    if (s == AGPT_OK) {
        heatmap_overlay(crop, map, S, 0.5f, over);
        s = image_save_png(heatmap_path, S, S, 3, over);
    }
    mem_host_free(crop);
    mem_host_free(over);
    return s;
}

void print_json_line(cJSON *obj) {
    char *text = cJSON_PrintUnformatted(obj);
    if (text) {
        printf("%s\n", text);
        fflush(stdout);
        free(text);
    }
    cJSON_Delete(obj);
}

