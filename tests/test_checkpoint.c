// runtime/checkpoint: HF directories (index + safetensors shards, shards without an index, single files),
// torch.save files, conversions on read, and the errors for broken directories; runtime/st_stream: the
// streaming writer against the reader.
#define _DEFAULT_SOURCE  // mkdtemp
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/checkpoint.h"
#include "runtime/dtype.h"
#include "runtime/safetensors.h"
#include "runtime/st_stream.h"
#include "tests/test.h"

static char dir[256];

static void write_text(const char *name, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    fputs(text, f);
    fclose(f);
}

static void remove_file(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
}

// A shard with tensors "<prefix>.a" (f32 [2,3] = base + i) and "<prefix>.b" (f16 [4]).
static void write_shard(const char *name, const char *prefix, float base) {
    static float a[6];
    static uint16_t b[4];
    for (int i = 0; i < 6; i++) a[i] = base + (float)i;
    for (int i = 0; i < 4; i++) b[i] = f32_to_f16(base - (float)i * 0.5f);
    char na[64], nb[64], path[512];
    snprintf(na, sizeof na, "%s.a", prefix);
    snprintf(nb, sizeof nb, "%s.b", prefix);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    StEntry e[2] = {{na, tensor_2d(a, DT_F32, DEV_CPU, 2, 3)}, {nb, tensor_1d(b, DT_F16, DEV_CPU, 4)}};
    CHECK(st_write(path, e, 2, NULL, 0) == AGPT_OK, "write shard %s", name);
}

static void test_index_dir(void) {
    write_shard("model-00001-of-00002.safetensors", "x", 1.0f);
    write_shard("model-00002-of-00002.safetensors", "y", 10.0f);
    write_text("model.safetensors.index.json",
               "{\"metadata\":{},\"weight_map\":{\"x.a\":\"model-00001-of-00002.safetensors\",\"x.b\":"
               "\"model-00001-of-00002.safetensors\",\"y.a\":\"model-00002-of-00002.safetensors\",\"y.b\":"
               "\"model-00002-of-00002.safetensors\"}}");
    Checkpoint *c = NULL;
    CHECK(ckpt_open(dir, &c) == AGPT_OK, "index dir opens: %s", agpt_last_error());
    if (!c) return;
    CHECK(ckpt_count(c) == 4 && ckpt_file_count(c) == 2, "4 tensors in 2 files (got %d in %d)", ckpt_count(c),
          ckpt_file_count(c));
    int i = ckpt_find(c, "y.a");
    CkptTensor t;
    CHECK(i >= 0 && ckpt_tensor(c, i, &t) == AGPT_OK && t.ndim == 2 && t.shape[1] == 3 && t.is_float &&
              strcmp(t.dtype, "F32") == 0, "y.a described");
    float f[6];
    uint16_t h[6];
    CHECK(ckpt_read(c, i, DT_F32, f, sizeof f) == AGPT_OK && f[0] == 10.0f && f[5] == 15.0f, "f32 read");
    CHECK(ckpt_read(c, i, DT_F16, h, sizeof h) == AGPT_OK && f16_to_f32(h[5]) == 15.0f, "f32 -> f16 read");
    CHECK(ckpt_read(c, i, DT_BF16, h, sizeof h) == AGPT_OK && bf16_to_f32(h[2]) == 12.0f, "f32 -> bf16 read");
    int j = ckpt_find(c, "x.b");
    CHECK(ckpt_read(c, j, DT_F32, f, sizeof f) == AGPT_OK && f[0] == 1.0f && f[3] == -0.5f, "f16 -> f32 read");
    CHECK(ckpt_read(c, j, DT_F32, f, 8) != AGPT_OK, "a small buffer is refused");
    CHECK(ckpt_read(c, j, DT_I32, f, sizeof f) != AGPT_OK, "a float tensor is not read as i32");
    ckpt_release(c, i);
    CHECK(ckpt_read(c, i, DT_F32, f, sizeof f) == AGPT_OK && f[5] == 15.0f, "released pages read back the same");
    CHECK(ckpt_find(c, "z") == -1, "absent name");
    ckpt_close(c);

    // The index names a shard that is not there.
    write_text("model.safetensors.index.json",
               "{\"weight_map\":{\"x.a\":\"model-00001-of-00002.safetensors\",\"q\":\"model-00003-of-00003.safetensors\"}}");
    CHECK(ckpt_open(dir, &c) != AGPT_OK && strstr(agpt_last_error(), "missing"), "missing shard: %s", agpt_last_error());
    // A tensor the index promises is not in its shard.
    write_text("model.safetensors.index.json", "{\"weight_map\":{\"x.zz\":\"model-00001-of-00002.safetensors\"}}");
    CHECK(ckpt_open(dir, &c) != AGPT_OK && strstr(agpt_last_error(), "not there"), "promised tensor: %s",
          agpt_last_error());
    // Shard names must stay inside the directory.
    write_text("model.safetensors.index.json", "{\"weight_map\":{\"x.a\":\"../model-00001-of-00002.safetensors\"}}");
    CHECK(ckpt_open(dir, &c) != AGPT_OK && strstr(agpt_last_error(), "not a file name"), "path escape: %s",
          agpt_last_error());
    write_text("model.safetensors.index.json", "{\"weights\":{}}");
    CHECK(ckpt_open(dir, &c) != AGPT_OK && strstr(agpt_last_error(), "weight_map"), "no weight_map: %s",
          agpt_last_error());
    write_text("model.safetensors.index.json", "{not json");
    CHECK(ckpt_open(dir, &c) != AGPT_OK, "broken index JSON is an error");
    remove_file("model.safetensors.index.json");

    // No index: every safetensors file, in name order; a name in two files is an error.
    CHECK(ckpt_open(dir, &c) == AGPT_OK && ckpt_count(c) == 4, "shards without an index: %s", agpt_last_error());
    ckpt_close(c);
    write_shard("model-extra.safetensors", "x", 5.0f);
    CHECK(ckpt_open(dir, &c) != AGPT_OK && strstr(agpt_last_error(), "in both"), "duplicate name: %s",
          agpt_last_error());
    remove_file("model-extra.safetensors");
    remove_file("model-00001-of-00002.safetensors");
    remove_file("model-00002-of-00002.safetensors");
    CHECK(ckpt_open(dir, &c) != AGPT_OK && strstr(agpt_last_error(), "no checkpoint"), "empty dir: %s",
          agpt_last_error());
}

static void test_files(const char *data) {
    Checkpoint *c = NULL;
    char path[512];
    // A torch.save file (the golden pth corpus) opens through the same interface.
    snprintf(path, sizeof path, "%s/e2e/official/anomalygpt/pytorch_model.pt", data);
    if (access(path, R_OK) == 0) {
        CHECK(ckpt_open(path, &c) == AGPT_OK && ckpt_find(c, "prompt_learner.base_prompts") >= 0, "torch.save file: %s",
              agpt_last_error());
        CkptTensor t;
        int i = ckpt_find(c, "prompt_learner.base_prompts");
        CHECK(i >= 0 && ckpt_tensor(c, i, &t) == AGPT_OK && strcmp(t.dtype, "F16") == 0 && t.shape[0] == 9,
              "fp16 Parameter [9,C]");
        ckpt_close(c);
    }
    // Things that are not checkpoints.
    write_text("notes.txt", "hello");
    snprintf(path, sizeof path, "%s/notes.txt", dir);
    CHECK(ckpt_open(path, &c) != AGPT_OK && strstr(agpt_last_error(), "neither"), "text file: %s", agpt_last_error());
    FILE *f = fopen(path, "wb");
    fputc(0x80, f), fputc(0x02, f), fputs("legacy", f);
    fclose(f);
    CHECK(ckpt_open(path, &c) != AGPT_OK && strstr(agpt_last_error(), "legacy"), "bare pickle: %s", agpt_last_error());
    write_text("empty.bin", "");
    snprintf(path, sizeof path, "%s/empty.bin", dir);
    CHECK(ckpt_open(path, &c) != AGPT_OK && strstr(agpt_last_error(), "empty"), "empty file: %s", agpt_last_error());
    snprintf(path, sizeof path, "%s/absent.pth", dir);
    CHECK(ckpt_open(path, &c) != AGPT_OK, "absent file");
    remove_file("notes.txt");
    remove_file("empty.bin");
}

static void test_stream(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/stream.safetensors", dir);
    StStreamEntry e[3] = {{"small", "F16", 1, {3}}, {"conv", "F32", 5, {2, 1, 2, 1, 3}}, {"bytes", "U8", 1, {5}}};
    const char *kv[] = {"agpt.format", "1"};
    StStream *s = NULL;
    CHECK(st_stream_open(path, e, 3, kv, 1, &s) == AGPT_OK, "stream opens: %s", agpt_last_error());
    if (!s) return;
    float conv[12];
    for (int i = 0; i < 12; i++) conv[i] = (float)i;
    // Pieces in any order; "small" is never written and must read as zeros.
    CHECK(st_stream_write(s, 1, 24, conv + 6, 24) == AGPT_OK && st_stream_write(s, 1, 0, conv, 24) == AGPT_OK,
          "pieces written");
    CHECK(st_stream_write(s, 2, 0, "abcde", 5) == AGPT_OK, "bytes written");
    CHECK(st_stream_write(s, 2, 3, "xyz", 3) != AGPT_OK, "a write past the tensor is refused");
    CHECK(access(path, F_OK) != 0, "nothing at the path before finish");
    CHECK(st_stream_finish(s) == AGPT_OK, "finish");
    SafeTensors *st = NULL;
    CHECK(st_open(path, &st) == AGPT_OK, "the result reads back: %s", agpt_last_error());
    if (!st) return;
    StInfo info;
    int k = st_find(st, "conv");
    CHECK(k >= 0 && st_info(st, k, &info) == AGPT_OK && info.ndim == 5 && memcmp(info.data, conv, 48) == 0,
          "5-D tensor bytes");
    Tensor t;
    CHECK(st_get(st, "small", &t) == AGPT_OK && ((uint16_t *)t.data)[2] == 0, "unwritten tensor is zeros");
    CHECK(st_get(st, "bytes", &t) == AGPT_OK && memcmp(t.data, "abcde", 5) == 0, "bytes");
    CHECK(st_metadata(st, "agpt.format") && strcmp(st_metadata(st, "agpt.format"), "1") == 0, "metadata");
    st_close(st);
    unlink(path);
    // Bad declarations are refused before anything is created; an aborted stream leaves nothing.
    StStreamEntry bad[2] = {{"t", "F32", 1, {2}}, {"t", "F32", 1, {2}}};
    CHECK(st_stream_open(path, bad, 2, NULL, 0, &s) != AGPT_OK && strstr(agpt_last_error(), "twice"), "duplicate");
    StStreamEntry odd = {"t", "Q4", 1, {2}};
    CHECK(st_stream_open(path, &odd, 1, NULL, 0, &s) != AGPT_OK, "unknown dtype");
    CHECK(st_stream_open(path, e, 1, NULL, 0, &s) == AGPT_OK, "reopen");
    st_stream_abort(s);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(access(path, F_OK) != 0 && access(tmp, F_OK) != 0, "abort leaves no file");
}

int main(int argc, char **argv) {
    const char *data = argc > 1 ? argv[1] : AGPT_TEST_DATA;
    snprintf(dir, sizeof dir, "/tmp/agpt_ckpt_XXXXXX");
    if (!mkdtemp(dir)) return 1;
    test_index_dir();
    test_files(data);
    test_stream();
    rmdir(dir);
    return test_summary();
}
