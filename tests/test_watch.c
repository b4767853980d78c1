// The hot folder (tools/watch.c) with a fake inspection whose verdict comes from the file name: files there at
// start, a file written slowly (not inspected before it is closed), one renamed in, hidden and non-image names
// ignored; the JSON lines; ok/ and ng/ sorting, a taken name in ok/, files without a verdict left in place.
#define _DEFAULT_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/test.h"
#include "tools/watch.h"

static atomic_int calls;
static char seen[32][256];

// n*: normal, a*: anomalous, u*: no verdict, e*: a failed inspection.
static cJSON *fake_inspect(void *ctx, const char *path) {
    (void)ctx;
    const char *name = strrchr(path, '/') + 1;
    int k = atomic_fetch_add(&calls, 1);
    if (k < 32) snprintf(seen[k], sizeof seen[k], "%s", name);
    cJSON *o = cJSON_CreateObject();
    if (name[0] == 'e') {
        cJSON_AddFalseToObject(o, "ok");
        cJSON_AddStringToObject(o, "error", "broken");
        return o;
    }
    cJSON_AddTrueToObject(o, "ok");
    if (name[0] == 'n') cJSON_AddStringToObject(o, "verdict", "normal");
    else if (name[0] == 'a') cJSON_AddStringToObject(o, "verdict", "anomalous");
    else cJSON_AddNullToObject(o, "verdict");
    cJSON_AddNumberToObject(o, "score", 0.5);
    return o;
}

typedef struct Run {
    WatchConfig cfg;
    atomic_bool stop;
    Status status;
} Run;

static void *run_watch(void *arg) {
    Run *r = arg;
    r->status = watch_folder(&r->cfg, fake_inspect, NULL, &r->stop);
    return NULL;
}

static void write_file(const char *dir, const char *name, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f) fputs(text, f), fclose(f);
}

static bool exists(const char *dir, const char *name) {
    char path[512];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return stat(path, &st) == 0;
}

static bool wait_calls(int n) {
    for (int i = 0; i < 500 && atomic_load(&calls) < n; i++) usleep(10000);
    return atomic_load(&calls) >= n;
}

static bool was_seen(const char *name) {
    for (int i = 0; i < atomic_load(&calls) && i < 32; i++)
        if (!strcmp(seen[i], name)) return true;
    return false;
}

int main(void) {
    char dir[] = "/tmp/agpt-watch-XXXXXX", path[512], log[600];
    if (!mkdtemp(dir)) return 1;
    snprintf(log, sizeof log, "%s/log.jsonl", dir);
    // There at start: inspected first, in name order.
    write_file(dir, "a1.png", "x");
    write_file(dir, "n1.png", "x");
    write_file(dir, "u1.png", "x");
    write_file(dir, "e1.png", "x");
    write_file(dir, ".hidden.png", "x");
    write_file(dir, "notes.txt", "x");
    snprintf(path, sizeof path, "%s/ok", dir);
    mkdir(path, 0755);
    write_file(path, "n1.png", "an earlier image");  // the moved n1.png must not overwrite it

    Run run = {.cfg = {dir, log, true}};
    pthread_t t;
    pthread_create(&t, NULL, run_watch, &run);
    CHECK(wait_calls(4), "the 4 images there at start are inspected (%d)", atomic_load(&calls));
    CHECK(!strcmp(seen[0], "a1.png") && !strcmp(seen[1], "e1.png") && !strcmp(seen[2], "n1.png") &&
          !strcmp(seen[3], "u1.png"), "in name order");

    // A file being written is not inspected until its writer closes it.
    snprintf(path, sizeof path, "%s/a2.jpg", dir);
    FILE *slow = fopen(path, "wb");
    fputs("half", slow);
    fflush(slow);
    usleep(300000);
    CHECK(atomic_load(&calls) == 4, "a file still open for writing is not inspected");
    fputs(" and the rest", slow);
    fclose(slow);
    CHECK(wait_calls(5) && was_seen("a2.jpg"), "inspected once closed");
    // Written under a hidden name, then renamed in.
    write_file(dir, ".n3.jpeg.part", "x");
    char from[512], to[512];
    snprintf(from, sizeof from, "%s/.n3.jpeg.part", dir);
    snprintf(to, sizeof to, "%s/n3.jpeg", dir);
    rename(from, to);
    CHECK(wait_calls(6) && was_seen("n3.jpeg"), "inspected once renamed in");
    write_file(dir, "later.txt", "x");
    usleep(200000);
    atomic_store(&run.stop, true);
    pthread_join(t, NULL);
    CHECK(run.status == AGPT_OK, "the watcher stops cleanly: %s", agpt_last_error());
    CHECK(atomic_load(&calls) == 6 && !was_seen(".hidden.png") && !was_seen("notes.txt") && !was_seen("later.txt") &&
          !was_seen(".n3.jpeg.part"), "hidden and non-image names are ignored (%d calls)", atomic_load(&calls));

    char okd[512], ngd[512];
    snprintf(okd, sizeof okd, "%s/ok", dir);
    snprintf(ngd, sizeof ngd, "%s/ng", dir);
    CHECK(exists(ngd, "a1.png") && exists(ngd, "a2.jpg") && !exists(dir, "a1.png"), "anomalous -> ng/");
    CHECK(exists(okd, "n1-1.png") && exists(okd, "n1.png") && exists(okd, "n3.jpeg"), "normal -> ok/, taken name -> n1-1.png");
    CHECK(exists(dir, "u1.png") && exists(dir, "e1.png"), "no verdict, or failed: left in place");

    // The log: one JSON line per inspection, "image" first, moved_to where moved.
    FILE *f = fopen(log, "r");
    char line[2048];
    int n = 0, moved = 0, good = 0;
    while (f && fgets(line, sizeof line, f)) {
        cJSON *j = cJSON_Parse(line);
        n++;
        if (j && j->child && !strcmp(j->child->string, "image") && cJSON_GetObjectItem(j, "ok")) good++;
        if (j && cJSON_GetObjectItem(j, "moved_to")) moved++;
        cJSON_Delete(j);
    }
    if (f) fclose(f);
    CHECK(n == 6 && good == 6 && moved == 4, "6 JSON lines (%d, %d well formed), 4 with moved_to (%d)", n, good, moved);

    // A missing folder is an error, not a hang.
    Run missing = {.cfg = {"/nonexistent/agpt-hot", NULL, false}};
    CHECK(watch_folder(&missing.cfg, fake_inspect, NULL, &missing.stop) == AGPT_ERR_ARG &&
          strstr(agpt_last_error(), "not a folder"), "a missing folder: %s", agpt_last_error());

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return test_summary();
}
