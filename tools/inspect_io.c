#define _DEFAULT_SOURCE  // mkstemp, flock, O_DIRECTORY
#include "tools/inspect_io.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/log.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "runtime/text.h"
#include "tools/heatmap.h"

// A new empty file <dir>/.<stem><suffix>.XXXXXX with a name no other process holds; its path in out.
static Status reserve_temp(const char *dir, const char *stem, const char *suffix, char *out, size_t cap) {
    if (snprintf(out, cap, "%s/.%s%s.XXXXXX", dir, stem, suffix) >= (int)cap)
        return AGPT_FAIL(AGPT_ERR_ARG, "output path %s/%s%s is longer than %zu bytes", dir, stem, suffix, cap - 16);
    int fd = mkstemp(out);
    if (fd < 0) {
        int e = errno;
        out[0] = 0;
        return AGPT_FAIL(AGPT_ERR_IO, "cannot create a file in %s: %s (may we write there?)", dir, strerror(e));
    }
    close(fd);
    return AGPT_OK;
}

Status ensure_dir(const char *dir) {
    struct stat st;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return AGPT_FAIL(AGPT_ERR_IO, "cannot create output directory %s: %s", dir, strerror(errno));
    if (stat(dir, &st) != 0) return AGPT_FAIL(AGPT_ERR_IO, "output directory %s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return AGPT_FAIL(AGPT_ERR_IO, "output directory %s: exists and is not a folder", dir);
    // access(W_OK) says what the mode bits allow, not what a read-only mount or an ACL does: make a file.
    char probe[4096];
    Status s = reserve_temp(dir, "agpt-probe", "", probe, sizeof probe);
    if (s != AGPT_OK) return agpt_add_context(s, "output directory %s", dir);
    unlink(probe);
    return AGPT_OK;
}

void stem_of(const char *path, char *out, size_t cap) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    snprintf(out, cap, "%s", base);
    char *dot = strrchr(out, '.');
    if (dot && dot != out) *dot = 0;
}

// Renames the two finished temporaries over their targets as one step for every other writer of dir (see the
// header). A file system without flock still gets both renames, only without the guarantee across processes.
static Status publish_pair(const char *dir, const char *tmp_a, const char *a, const char *tmp_b, const char *b) {
    static bool warned;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    bool locked = false;
    if (fd >= 0) {
        int r;
        while ((r = flock(fd, LOCK_EX)) != 0 && errno == EINTR) {}
        locked = r == 0;
    }
    if (!locked && !warned) {
        warned = true;
        LOG_W("cannot lock %s (%s): outputs are renamed into place without the lock; two runs on this folder at "
              "once could mix their heatmaps and maps", dir, strerror(errno));
    }
    Status s = AGPT_OK;
    if (rename(tmp_a, a) != 0) {
        s = AGPT_FAIL(AGPT_ERR_IO, "cannot rename %s to %s: %s", tmp_a, a, strerror(errno));
    } else if (rename(tmp_b, b) != 0) {
        s = AGPT_FAIL(AGPT_ERR_IO, "cannot rename %s to %s: %s", tmp_b, b, strerror(errno));
        unlink(a);  // rather one file missing than a pair from two different runs
    }
    if (fd >= 0) close(fd);  // releases the lock
    return s;
}

Status write_map_outputs(const VisionModel *m, const Image *img, const float *map, const char *out_dir,
                         const char *stem, char *heatmap_path, char *map_path, size_t cap) {
    int S = m->vision.image;
    if (snprintf(map_path, cap, "%s/%s.map.safetensors", out_dir, stem) >= (int)cap ||
        snprintf(heatmap_path, cap, "%s/%s.heatmap.png", out_dir, stem) >= (int)cap)
        return AGPT_FAIL(AGPT_ERR_ARG, "output path %s/%s... is longer than %zu bytes", out_dir, stem, cap);
    char tmp_map[4096] = "", tmp_heat[4096] = "";
    uint8_t *crop = NULL, *over = NULL;
    Status s = reserve_temp(out_dir, stem, ".map.safetensors", tmp_map, sizeof tmp_map);
    if (s == AGPT_OK) s = reserve_temp(out_dir, stem, ".heatmap.png", tmp_heat, sizeof tmp_heat);
    // st_write and image_save_png write "<name>.tmp", fsync it and rename it over the reserved name: the
    // reserved names are unique, so theirs are too.
    if (s == AGPT_OK) {
        StEntry entry = {"anomaly_map", tensor_2d((void *)map, DT_F32, DEV_CPU, S, S)};
        const char *meta[] = {"format", "agpt-anomaly-map-1", "preprocess", preprocess_mode_name(m->mode)};
        s = st_write(tmp_map, &entry, 1, meta, 2);
    }
    if (s == AGPT_OK) s = mem_host_alloc((size_t)S * S * 3, (void **)&crop);
    if (s == AGPT_OK) s = mem_host_alloc((size_t)S * S * 3, (void **)&over);
    if (s == AGPT_OK) s = preprocess_image_u8(img, m->mode, S, RESIZE_PILLOW_10, crop);
    if (s == AGPT_OK) {
        heatmap_overlay(crop, map, S, 0.5f, over);
        s = image_save_png(tmp_heat, S, S, 3, over);
    }
    if (s == AGPT_OK) s = publish_pair(out_dir, tmp_map, map_path, tmp_heat, heatmap_path);
    if (s != AGPT_OK) {  // no temporary left behind (after a publish they are gone already)
        if (tmp_map[0]) unlink(tmp_map);
        if (tmp_heat[0]) unlink(tmp_heat);
    }
    mem_host_free(crop);
    mem_host_free(over);
    return s;
}

static bool stdout_lost;  // print_json_line reported a lost line already: finish_stdout need not say it again

Status print_json_line(cJSON *obj) {
    char *text = cJSON_PrintUnformatted(obj);
    cJSON_Delete(obj);
    if (!text) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory printing a result");
    errno = 0;
    bool ok = printf("%s\n", text) >= 0 && fflush(stdout) == 0 && !ferror(stdout);
    free(text);
    if (!ok) stdout_lost = true;
    if (!ok) return AGPT_FAIL(AGPT_ERR_IO, "cannot write the results to stdout: %s", errno ? strerror(errno) : "write error");
    return AGPT_OK;
}

int finish_stdout(const char *cmd, int rc) {
    errno = 0;
    bool ok = fflush(stdout) == 0 && !ferror(stdout);
    int e = errno;
    if (fclose(stdout) != 0 && ok) ok = false, e = errno;  // some file systems report write errors only here
    if (ok) return rc;
    if (!stdout_lost)
        fprintf(stderr, "agpt %s: error: output written to stdout was lost: %s\n", cmd, e ? strerror(e) : "write error");
    return rc ? rc : 1;
}

Status check_model_path(const char *path, const char *option) {
    struct stat st;
    if (stat(path, &st) != 0) return AGPT_FAIL(AGPT_ERR_IO, "%s %s: %s", option, path, strerror(errno));
    if (S_ISDIR(st.st_mode))
        return AGPT_FAIL(AGPT_ERR_ARG, "%s %s is a folder; it takes the one .safetensors model file that agpt "
                         "convert writes (agpt convert --help)", option, path);
    FILE *f = fopen(path, "rb");
    if (!f) return AGPT_FAIL(AGPT_ERR_IO, "%s %s: %s", option, path, strerror(errno));
    unsigned char head[4] = {0};
    size_t n = fread(head, 1, sizeof head, f);
    fclose(f);
    bool zip = n >= 4 && !memcmp(head, "PK\x03\x04", 4);              // torch.save since PyTorch 1.6
    bool pickle = n >= 2 && head[0] == 0x80 && head[1] >= 2 && head[1] <= 5;  // the legacy torch.save format
    if (zip || pickle)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s %s is a PyTorch checkpoint (torch.save %s), not an agpt model file: "
                         "run agpt convert first (--imagebind, --vicuna, --pandagpt, --anomalygpt ... -o "
                         "model.safetensors; agpt convert --help)", option, path, zip ? "zip" : "pickle");
    return AGPT_OK;
}

bool class_name_ok(const char *cmd, const char *name) {
    if (name[0] && strlen(name) <= 100 && utf8_valid(name)) return true;
    fprintf(stderr, "agpt %s: --class needs 1 to 100 bytes of UTF-8 (got %zu bytes%s)\n", cmd, strlen(name),
            utf8_valid(name) ? "" : ", not UTF-8");
    return false;
}

const char *answer_verdict(const char *answer) {
    if (!answer) return NULL;
    while (*answer && isspace((unsigned char)*answer)) answer++;
    if (!strncmp(answer, "Yes", 3) && !isalpha((unsigned char)answer[3])) return "anomalous";
    if (!strncmp(answer, "No", 2) && !isalpha((unsigned char)answer[2])) return "normal";
    return NULL;
}

char *answer_raw_text(const AnomalyGPT *a, const AnomalyAnswer *ans) {
    int32_t ids[VERDICT_TOKENS + 8];
    int n = 0;
    for (int i = 0; i < ans->n_tokens && n < (int)(sizeof ids / sizeof ids[0]); i++)
        if (ans->tokens[i] >= 0 && ans->tokens[i] < sp_vocab_size(a->tokenizer) &&
            ans->tokens[i] != sp_bos_id(a->tokenizer) && ans->tokens[i] != sp_eos_id(a->tokenizer))
            ids[n++] = ans->tokens[i];
    char *text = NULL;
    return sp_decode(a->tokenizer, ids, n, &text) == AGPT_OK ? text : NULL;
}
