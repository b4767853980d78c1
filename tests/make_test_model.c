// make_test_model: one complete small AnomalyGPT model file from the golden files, for end-to-end CLI tests.
//
//   make_test_model OUT_DIR [DATA_DIR]      (DATA_DIR: tests/data, the default compiled in)
//
// Writes OUT_DIR/model.safetensors holding every tensor of DATA_DIR/imagebind/model.safetensors (the 5-D Conv3d
// weight included: tensors are copied as raw bytes through st_info, since st_write takes at most 4-D Tensors),
// the non-sparse tensors of DATA_DIR/anomalygpt/parts.safetensors, and its sparse token table and lm_head
// rebuilt whole ([32001,C], zero rows elsewhere), with the metadata of both files (the first file wins on a
// repeated key). Also writes OUT_DIR/prompt.txt (the golden prompt), OUT_DIR/answer.txt (the golden greedy answer
// for 24 new tokens) and OUT_DIR/answer.json (that answer as a JSON string, as cJSON prints it). Prints the model
// path on stdout.
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/safetensors.h"

#ifndef AGPT_TEST_DATA
#define AGPT_TEST_DATA "tests/data"
#endif
#define VOCAB 32001
#define MAX_TENSORS 1024

typedef struct Item {
    const char *name;
    const char *dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
    size_t nbytes;
} Item;

static int dtype_bytes(const char *dt) {
    if (!strcmp(dt, "F64") || !strcmp(dt, "I64") || !strcmp(dt, "U64")) return 8;
    if (!strcmp(dt, "F32") || !strcmp(dt, "I32") || !strcmp(dt, "U32")) return 4;
    if (!strcmp(dt, "F16") || !strcmp(dt, "BF16") || !strcmp(dt, "I16") || !strcmp(dt, "U16")) return 2;
    return 1;
}

static int by_element_size(const void *a, const void *b) {  // largest element first keeps every tensor aligned
    return dtype_bytes(((const Item *)b)->dtype) - dtype_bytes(((const Item *)a)->dtype);
}

static int write_text(const char *dir, const char *name, const char *text) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "make_test_model: cannot write %s\n", path);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: make_test_model OUT_DIR [DATA_DIR]\n");
        return 2;
    }
    const char *out_dir = argv[1], *data = argc > 2 ? argv[2] : AGPT_TEST_DATA;
    char vision_path[4096], parts_path[4096], out_path[4096];
    snprintf(vision_path, sizeof vision_path, "%s/imagebind/model.safetensors", data);
    snprintf(parts_path, sizeof parts_path, "%s/anomalygpt/parts.safetensors", data);
    snprintf(out_path, sizeof out_path, "%s/model.safetensors", out_dir);
    SafeTensors *files[2] = {NULL, NULL};
    if (st_open(vision_path, &files[0]) != AGPT_OK || st_open(parts_path, &files[1]) != AGPT_OK) {
        fprintf(stderr, "make_test_model: %s\n", agpt_last_error());
        return 1;
    }
    static Item items[MAX_TENSORS];
    int n = 0;
    float *tables[2] = {NULL, NULL};
    const char *table_names[2] = {"model.embed_tokens.weight", "lm_head.weight"};
    for (int f = 0; f < 2; f++) {
        for (int i = 0; i < st_count(files[f]); i++) {
            StInfo info;
            if (st_info(files[f], i, &info) != AGPT_OK) {
                fprintf(stderr, "make_test_model: %s\n", agpt_last_error());
                return 1;
            }
            if (!strncmp(info.name, "sparse.", 7)) continue;
            int dup = 0;
            for (int j = 0; j < n && !dup; j++) dup = !strcmp(items[j].name, info.name);
            if (dup) continue;
            if (n == MAX_TENSORS) {
                fprintf(stderr, "make_test_model: more than %d tensors\n", MAX_TENSORS);
                return 1;
            }
            Item *it = &items[n++];
            it->name = info.name;
            it->dtype = info.dtype;
            it->ndim = info.ndim;
            memcpy(it->shape, info.shape, sizeof it->shape);
            it->data = info.data;
            it->nbytes = info.nbytes;
        }
    }
    // The sparse tables rebuilt whole.
    for (int i = 0; i < 2; i++) {
        char rn[128], vn[128];
        snprintf(rn, sizeof rn, "sparse.%s.rows", table_names[i]);
        snprintf(vn, sizeof vn, "sparse.%s.values", table_names[i]);
        Tensor rows, values;
        if (st_get(files[1], rn, &rows) != AGPT_OK || st_get(files[1], vn, &values) != AGPT_OK ||
            rows.dtype != DT_I32 || values.dtype != DT_F32 || values.ndim != 2) {
            fprintf(stderr, "make_test_model: %s: no usable %s / %s\n", parts_path, rn, vn);
            return 1;
        }
        int64_t C = values.shape[1];
        tables[i] = calloc((size_t)(VOCAB * C), sizeof(float));
        if (!tables[i]) return 1;
        for (int64_t r = 0; r < rows.shape[0]; r++) {
            int32_t id;
            memcpy(&id, (const char *)rows.data + r * 4, 4);
            if (id < 0 || id >= VOCAB) {
                fprintf(stderr, "make_test_model: row id %d out of range\n", id);
                return 1;
            }
            memcpy(tables[i] + (size_t)id * C, (const char *)values.data + r * C * 4, (size_t)C * 4);
        }
        Item *it = &items[n++];
        it->name = table_names[i];
        it->dtype = "F32";
        it->ndim = 2;
        it->shape[0] = VOCAB;
        it->shape[1] = C;
        it->data = tables[i];
        it->nbytes = (size_t)(VOCAB * C) * sizeof(float);
    }
    qsort(items, (size_t)n, sizeof items[0], by_element_size);

    // Header: every tensor back to back, then the merged metadata.
    cJSON *header = cJSON_CreateObject(), *meta = cJSON_CreateObject();
    for (int f = 0; f < 2; f++)
        for (int i = 0; i < st_metadata_count(files[f]); i++) {
            const char *k = st_metadata_key(files[f], i);
            if (!cJSON_GetObjectItemCaseSensitive(meta, k)) cJSON_AddStringToObject(meta, k, st_metadata(files[f], k));
        }
    cJSON_AddItemToObject(header, "__metadata__", meta);
    size_t offset = 0;
    for (int i = 0; i < n; i++) {
        cJSON *t = cJSON_CreateObject(), *shape = cJSON_CreateArray(), *offs = cJSON_CreateArray();
        cJSON_AddStringToObject(t, "dtype", items[i].dtype);
        for (int d = 0; d < items[i].ndim; d++) cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)items[i].shape[d]));
        cJSON_AddItemToObject(t, "shape", shape);
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)offset));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(offset + items[i].nbytes)));
        cJSON_AddItemToObject(t, "data_offsets", offs);
        cJSON_AddItemToObject(header, items[i].name, t);
        offset += items[i].nbytes;
    }
    char *json = cJSON_PrintUnformatted(header);
    cJSON_Delete(header);
    if (!json) return 1;
    size_t hlen = strlen(json), padded = (8 + hlen + 63) / 64 * 64 - 8;  // data starts 64-byte aligned
    char tmp_path[4200];
    snprintf(tmp_path, sizeof tmp_path, "%s.tmp", out_path);
    FILE *out = fopen(tmp_path, "wb");
    int ok = out != NULL;
    if (ok) {
        uint64_t len = padded;
        unsigned char le[8];
        for (int b = 0; b < 8; b++) le[b] = (unsigned char)(len >> (8 * b));
        ok = fwrite(le, 1, 8, out) == 8 && fwrite(json, 1, hlen, out) == hlen;
        for (size_t p = hlen; ok && p < padded; p++) ok = fputc(' ', out) != EOF;
        for (int i = 0; ok && i < n; i++) ok = fwrite(items[i].data, 1, items[i].nbytes, out) == items[i].nbytes;
        ok = (fclose(out) == 0) && ok;
    }
    free(json);
    if (!ok || rename(tmp_path, out_path) != 0) {
        fprintf(stderr, "make_test_model: cannot write %s\n", out_path);
        return 1;
    }
    // The golden prompt and answer, for the CLI test to compare with.
    const char *prompt = st_metadata(files[1], "prompt"), *answer = st_metadata(files[1], "answer");
    if (!prompt || !answer) {
        fprintf(stderr, "make_test_model: %s has no prompt/answer metadata\n", parts_path);
        return 1;
    }
    cJSON *s = cJSON_CreateString(answer);
    char *answer_json = cJSON_PrintUnformatted(s);
    cJSON_Delete(s);
    int rc = write_text(out_dir, "prompt.txt", prompt) | write_text(out_dir, "answer.txt", answer) |
             write_text(out_dir, "answer.json", answer_json ? answer_json : "");
    free(answer_json);
    free(tables[0]), free(tables[1]);
    st_close(files[0]);
    st_close(files[1]);
    if (rc == 0) printf("%s\n", out_path);
    return rc;
}
