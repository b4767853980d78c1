// The hot folder (see watch.h): inotify on one folder, one inspection per complete image file.
#define _DEFAULT_SOURCE  // strdup, strcasecmp
#include "tools/watch.h"

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/text.h"

static bool wanted(const char *name) {
    if (name[0] == '.') return false;
    const char *dot = strrchr(name, '.');
    return dot && (!strcasecmp(dot, ".png") || !strcasecmp(dot, ".jpg") || !strcasecmp(dot, ".jpeg"));
}

// Moves dir/name into dir/sub/, finding a free name there; the new path goes to out.
static bool move_into(const char *dir, const char *name, const char *sub, char *out, size_t cap) {
    char folder[4096], from[8192];
    snprintf(folder, sizeof folder, "%s/%s", dir, sub);
    if (mkdir(folder, 0755) != 0 && errno != EEXIST) return false;
    snprintf(from, sizeof from, "%s/%s", dir, name);
    const char *dot = strrchr(name, '.');
    int stem = (int)(dot - name);
    for (int i = 0; i < 1000; i++) {
        if (i == 0) snprintf(out, cap, "%s/%s", folder, name);
        else snprintf(out, cap, "%s/%.*s-%d%s", folder, stem, name, i, dot);
        struct stat st;
        if (lstat(out, &st) == 0) continue;  // taken: never overwrite an earlier image
        return rename(from, out) == 0;
    }
    return false;
}

typedef struct Watch {
    const WatchConfig *cfg;
    WatchInspect inspect;
    void *ctx;
    FILE *log;
} Watch;

static Status handle(Watch *w, const char *name) {
    char path[4096];
    if (!wanted(name) || snprintf(path, sizeof path, "%s/%s", w->cfg->dir, name) >= (int)sizeof path) return AGPT_OK;
    struct stat st;
    if (lstat(path, &st) != 0 || !S_ISREG(st.st_mode)) return AGPT_OK;  // gone already, or not a plain file
    cJSON *res = w->inspect(w->ctx, path);
    if (!res) return AGPT_OK;
    cJSON *line = cJSON_CreateObject();
    char *clean = utf8_lossy(path);
    cJSON_AddStringToObject(line, "image", clean ? clean : "");
    free(clean);
    for (cJSON *f = res->child; f;) {  // the inspection's fields after "image"
        cJSON *next = f->next;
        cJSON_AddItemToObject(line, f->string, cJSON_DetachItemViaPointer(res, f));
        f = next;
    }
    cJSON_Delete(res);
    if (w->cfg->sort) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(line, "verdict");
        const char *sub = cJSON_IsString(v) ? (!strcmp(v->valuestring, "normal") ? "ok" : "ng") : NULL;
        char to[8192];
        if (sub && move_into(w->cfg->dir, name, sub, to, sizeof to)) {
            clean = utf8_lossy(to);
            cJSON_AddStringToObject(line, "moved_to", clean ? clean : "");
            free(clean);
        }
    }
    char *text = cJSON_PrintUnformatted(line);
    cJSON_Delete(line);
    bool ok = text && fprintf(w->log, "%s\n", text) > 0 && fflush(w->log) == 0;
    free(text);
    return ok ? AGPT_OK : AGPT_FAIL(AGPT_ERR_IO, "cannot append to the hot folder's log");
}

static int cmp_cstr(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

// The images already in the folder, in name order.
static Status scan(Watch *w) {
    DIR *d = opendir(w->cfg->dir);
    if (!d) return AGPT_FAIL(AGPT_ERR_IO, "cannot read the hot folder %s: %s", w->cfg->dir, strerror(errno));
    char **names = NULL;
    int n = 0, cap = 0;
    struct dirent *e;
    Status s = AGPT_OK;
    while ((e = readdir(d))) {
        if (!wanted(e->d_name)) continue;
        if (n == cap) {
            char **p = realloc(names, (size_t)(cap = cap ? 2 * cap : 64) * sizeof *p);
            if (!p) { s = AGPT_FAIL(AGPT_ERR_OOM, "out of memory listing %s", w->cfg->dir); break; }
            names = p;
        }
        if (!(names[n] = strdup(e->d_name))) { s = AGPT_FAIL(AGPT_ERR_OOM, "out of memory"); break; }
        n++;
    }
    closedir(d);
    if (s == AGPT_OK && n > 1) qsort(names, (size_t)n, sizeof *names, cmp_cstr);  // names is NULL when n == 0
    for (int i = 0; i < n; i++) {
        if (s == AGPT_OK) s = handle(w, names[i]);
        free(names[i]);
    }
    free(names);
    return s;
}

Status watch_folder(const WatchConfig *cfg, WatchInspect inspect, void *ctx, const atomic_bool *stop) {
    struct stat st;
    if (stat(cfg->dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return AGPT_FAIL(AGPT_ERR_ARG, "the hot folder %s is not a folder", cfg->dir);
    char log_path[4096];
    if (!cfg->log_path) snprintf(log_path, sizeof log_path, "%s/inspections.jsonl", cfg->dir);
    else snprintf(log_path, sizeof log_path, "%s", cfg->log_path);
    Watch w = {cfg, inspect, ctx, strcmp(log_path, "-") ? fopen(log_path, "a") : stdout};
    if (!w.log) return AGPT_FAIL(AGPT_ERR_IO, "cannot open %s for appending: %s", log_path, strerror(errno));
    // Watch before scanning, so that a file arriving during the scan is not missed.
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    Status s = AGPT_OK;
    if (fd < 0 || inotify_add_watch(fd, cfg->dir, IN_CLOSE_WRITE | IN_MOVED_TO) < 0)
        s = AGPT_FAIL(AGPT_ERR_IO, "cannot watch %s: %s", cfg->dir, strerror(errno));
    if (s == AGPT_OK) s = scan(&w);
    // Events are aligned for struct inotify_event; each names a file of the folder.
    char buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
    while (s == AGPT_OK && !atomic_load(stop)) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int ready = poll(&p, 1, 200);
        if (ready < 0 && errno != EINTR) s = AGPT_FAIL(AGPT_ERR_IO, "poll on the hot folder: %s", strerror(errno));
        if (ready <= 0) continue;
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno != EAGAIN && errno != EINTR) s = AGPT_FAIL(AGPT_ERR_IO, "inotify: %s", strerror(errno));
        for (ssize_t off = 0; n > 0 && off < n && s == AGPT_OK;) {
            const struct inotify_event *ev = (const struct inotify_event *)(buf + off);
            if (ev->len > 0 && !(ev->mask & IN_ISDIR)) s = handle(&w, ev->name);
            off += (ssize_t)sizeof *ev + ev->len;
        }
    }
    if (fd >= 0) close(fd);
    if (w.log != stdout) fclose(w.log);
    return s;
}
