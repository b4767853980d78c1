// agpt serve: the queue, the inference worker, reference banks, chat sessions and metrics (see serve.h).
#define _DEFAULT_SOURCE  // strdup, DT_DIR
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <microhttpd.h>
#include <stdarg.h>

#include "runtime/log.h"
#include "runtime/memory.h"
#include "runtime/text.h"
#include "runtime/timer.h"
#include "tools/heatmap.h"
#include "tools/serve.h"

// Histogram bounds in seconds (Prometheus' convention): 1 ms to 60 s.
static const double BUCKET_S[HIST_BUCKETS] = {0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                                              0.5,   1,     2,     5,    10,   30,   60};
static const char *STAGE_NAME[N_STAGES] = {"decode_image", "queue", "vision", "prefill", "generate", "total"};
// Batch sizes use the same histogram type with these bounds.
static const double BATCH_BOUNDS[HIST_BUCKETS] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256};

// ---- small helpers ----------------------------------------------------------------------------------------

const char *clean_error(const char *m) {
    // Library messages read "runtime/image.c:412: photo.png: truncated PNG"; contexts prepend more of them.
    for (;;) {
        const char *colon = strstr(m, ".c:");
        if (!colon) return m;
        const char *p = colon + 3;
        if (!isdigit((unsigned char)*p)) return m;
        while (isdigit((unsigned char)*p)) p++;
        if (p[0] != ':' || p[1] != ' ') return m;
        // Only a prefix (no space before the file name) is stripped.
        for (const char *q = m; q < colon; q++)
            if (*q == ' ') return m;
        m = p + 2;
    }
}

cJSON *error_json(int status, const char *message) {
    cJSON *o = cJSON_CreateObject();
    char *clean = utf8_lossy(message ? message : "");
    cJSON_AddStringToObject(o, "error", clean ? clean : "error");
    cJSON_AddNumberToObject(o, "status", status);
    free(clean);
    return o;
}

static void add_text(cJSON *obj, const char *key, const char *text) {
    char *clean = utf8_lossy(text ? text : "");
    cJSON_AddStringToObject(obj, key, clean ? clean : "");
    free(clean);
}

static char *base64(const uint8_t *p, size_t n) {
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = malloc(4 * ((n + 2) / 3) + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
        *o++ = A[v >> 18 & 63], *o++ = A[v >> 12 & 63];
        *o++ = i + 1 < n ? A[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? A[v & 63] : '=';
    }
    *o = 0;
    return out;
}

bool bank_name_valid(const char *name) {
    size_t n = strlen(name);
    if (n == 0 || n > SERVE_NAME_MAX) return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)name[i]) && name[i] != '_' && name[i] != '-') return false;
    return true;
}

void job_free(Job *job) {
    if (!job) return;
    image_free(&job->image);
    for (int i = 0; i < SERVE_MAX_REFS; i++) {
        image_free(&job->refs[i]);
        free(job->ref_bytes[i]);
    }
    free(job->question);
    cJSON_Delete(job->result);
    free(job);
}

// ---- metrics ----------------------------------------------------------------------------------------------

static void hist_add(Histogram *h, const double *bounds, double v) {
    int b = 0;
    while (b < HIST_BUCKETS && v > bounds[b]) b++;
    h->counts[b]++;
    h->sum += v;
    h->n++;
}

void server_count_status(Server *srv, int status) {
    pthread_mutex_lock(&srv->mu);
    if (status >= 100 && status < 600) srv->by_status[status]++;
    pthread_mutex_unlock(&srv->mu);
}

void server_observe(Server *srv, Stage stage, double ms) {
    pthread_mutex_lock(&srv->mu);
    hist_add(&srv->stage[stage], BUCKET_S, ms / 1e3);
    pthread_mutex_unlock(&srv->mu);
}

typedef struct Text { char *p; size_t n, cap; bool oom; } Text;
static void put(Text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(Text *t, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = t->oom ? -1 : vsnprintf(t->p ? t->p + t->n : NULL, t->p ? t->cap - t->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0) return;
        if (t->p && t->n + (size_t)k < t->cap) { t->n += (size_t)k; return; }
        size_t cap = (t->cap ? 2 * t->cap : 8192) + (size_t)k;
        char *p = realloc(t->p, cap);
        if (!p) { t->oom = true; return; }
        t->p = p, t->cap = cap;
    }
}

static void put_hist(Text *t, const char *name, const char *label, const Histogram *h, const double *bounds) {
    uint64_t cum = 0;
    for (int b = 0; b <= HIST_BUCKETS; b++) {
        cum += h->counts[b];
        if (b < HIST_BUCKETS) put(t, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, label, *label ? "," : "", bounds[b],
                                  (unsigned long long)cum);
        else put(t, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, label, *label ? "," : "", (unsigned long long)cum);
    }
    put(t, "%s_sum%s%s%s %.6f\n", name, *label ? "{" : "", label, *label ? "}" : "", h->sum);
    put(t, "%s_count%s%s%s %llu\n", name, *label ? "{" : "", label, *label ? "}" : "", (unsigned long long)h->n);
}

char *server_metrics_text(Server *srv) {
    Text t = {0};
    pthread_mutex_lock(&srv->mu);
    put(&t, "# HELP agpt_http_requests_total HTTP responses sent, by status code.\n"
            "# TYPE agpt_http_requests_total counter\n");
    for (int c = 100; c < 600; c++)
        if (srv->by_status[c]) put(&t, "agpt_http_requests_total{code=\"%d\"} %llu\n", c, (unsigned long long)srv->by_status[c]);
    put(&t, "# HELP agpt_stage_seconds Time per request in each stage (queue: waiting for the worker; vision, prefill,\n"
            "# generate: the request's share of its batch).\n# TYPE agpt_stage_seconds histogram\n");
    for (int s = 0; s < N_STAGES; s++) {
        char label[64];
        snprintf(label, sizeof label, "stage=\"%s\"", STAGE_NAME[s]);
        put_hist(&t, "agpt_stage_seconds", label, &srv->stage[s], BUCKET_S);
    }
    put(&t, "# HELP agpt_batch_size Jobs per model call of the worker.\n# TYPE agpt_batch_size histogram\n");
    put_hist(&t, "agpt_batch_size", "", &srv->batch_sizes, BATCH_BOUNDS);
    int banks = 0, sessions = 0;
    for (int i = 0; i < SERVE_MAX_BANKS; i++) banks += srv->banks[i].k > 0;
    for (int i = 0; i < srv->cfg.max_sessions; i++) sessions += srv->sessions[i].id[0] != 0;
    put(&t, "# HELP agpt_queue_depth Jobs waiting for the worker.\n# TYPE agpt_queue_depth gauge\nagpt_queue_depth %d\n",
        srv->queued);
    put(&t, "# TYPE agpt_queue_capacity gauge\nagpt_queue_capacity %d\n", srv->cfg.queue_cap);
    put(&t, "# TYPE agpt_max_batch gauge\nagpt_max_batch %d\n", srv->cfg.max_batch);
    put(&t, "# TYPE agpt_sessions gauge\nagpt_sessions %d\n# TYPE agpt_sessions_evicted_total counter\n"
            "agpt_sessions_evicted_total %llu\n", sessions, (unsigned long long)srv->evicted_sessions);
    put(&t, "# TYPE agpt_banks gauge\nagpt_banks %d\n", banks);
    put(&t, "# HELP agpt_resume_retries_total Connections resumed again because an answer was not picked up.\n"
            "# TYPE agpt_resume_retries_total counter\nagpt_resume_retries_total %llu\n",
        (unsigned long long)srv->resume_retries);
    put(&t, "# HELP agpt_request_body_bytes Request body bytes held in memory now.\n"
            "# TYPE agpt_request_body_bytes gauge\nagpt_request_body_bytes %zu\n", atomic_load(&srv->body_bytes));
    // Memory the model holds (device memory on CUDA, host memory on the CPU): weights are mapped, not counted.
    const AnomalyGPT *a = srv->agpt;
    put(&t, "# HELP agpt_model_arena_bytes Activation arenas of the model (device memory on CUDA).\n"
            "# TYPE agpt_model_arena_bytes gauge\nagpt_model_arena_bytes{arena=\"llm\",kind=\"capacity\"} %zu\n"
            "agpt_model_arena_bytes{arena=\"llm\",kind=\"peak\"} %zu\n"
            "agpt_model_arena_bytes{arena=\"vision\",kind=\"capacity\"} %zu\n"
            "agpt_model_arena_bytes{arena=\"vision\",kind=\"peak\"} %zu\n",
        a->arena.capacity, a->arena.peak, a->vision.arena.capacity, a->vision.arena.peak);
    put(&t, "# TYPE agpt_ready gauge\nagpt_ready %d\n", atomic_load(&srv->ready) && !atomic_load(&srv->stopping));
    pthread_mutex_unlock(&srv->mu);
    return t.oom ? (free(t.p), NULL) : t.p;
}

// ---- the queue --------------------------------------------------------------------------------------------

int server_submit(Server *srv, Job *job) {
    pthread_mutex_lock(&srv->mu);
    int refused = atomic_load(&srv->stopping) ? 503 : srv->queued >= srv->cfg.queue_cap ? 429 : 0;
    if (!refused) {
        job->next = NULL;
        job->t_queued = timer_now_s();
        if (srv->tail) srv->tail->next = job;
        else srv->head = job;
        srv->tail = job;
        srv->queued++;
        pthread_cond_signal(&srv->work_cv);
    }
    pthread_mutex_unlock(&srv->mu);
    return refused;
}

// Inspections that can share one anomalygpt_ask_batch call: the same map source and the same answer length.
static bool batchable(const Job *a, const Job *b) {
    return a->kind == JOB_INSPECT && b->kind == JOB_INSPECT && a->n_refs == 0 && b->n_refs == 0 &&
           !strcmp(a->bank, b->bank) && !strcmp(a->class_name, b->class_name) && a->max_new == b->max_new;
}

static int count_batchable(const Server *srv, const Job *first) {
    int n = 0;
    for (const Job *j = srv->head; j; j = j->next) n += batchable(first, j);
    return n;
}

static void resume_stale(Server *srv);   // the delivery section below
static void wait_a_little(Server *srv);

// Takes the head job and, for a plain inspection, every queued job it can share a batch with, waiting up to
// batch_wait_ms for the batch to fill. Returns how many (0: stopping with an empty queue). Called locked.
static int take_batch(Server *srv, Job **batch) {
    resume_stale(srv);
    while (!srv->head && !atomic_load(&srv->stopping)) {
        if (!srv->delivering) {
            pthread_cond_wait(&srv->work_cv, &srv->mu);
        } else {
            wait_a_little(srv);
            resume_stale(srv);
        }
    }
    if (!srv->head) return 0;
    Job *first = srv->head;
    int want = first->kind == JOB_INSPECT && first->n_refs == 0 ? srv->cfg.max_batch : 1;
    if (want > 1 && srv->cfg.batch_wait_ms > 0) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        long long ns = until.tv_nsec + (long long)srv->cfg.batch_wait_ms * 1000000ll;
        until.tv_sec += (time_t)(ns / 1000000000ll), until.tv_nsec = (long)(ns % 1000000000ll);
        while (count_batchable(srv, first) < want && !atomic_load(&srv->stopping))
            if (pthread_cond_timedwait(&srv->work_cv, &srv->mu, &until) == ETIMEDOUT) break;
    }
    int n = 0;
    for (Job **link = &srv->head; *link && n < want;) {
        Job *j = *link;
        if (j == first || (want > 1 && batchable(first, j))) {
            *link = j->next;
            batch[n++] = j;
        } else {
            link = &j->next;
        }
    }
    srv->tail = NULL;
    for (Job *j = srv->head; j; j = j->next) srv->tail = j;
    srv->queued -= n;
    return n;
}

// ---- sessions (worker side; the table is read by HTTP threads under the lock) -------------------------------

static void session_clear(Session *s) {
    image_free(&s->image);
    fewshot_refs_free(&s->refs);
    for (int i = 0; i < s->turns; i++) free(s->questions[i]), free(s->answers[i]);
    memset(s, 0, sizeof *s);
}

static bool session_expired(const Server *srv, const Session *s, double now) {
    return s->id[0] && now - s->last_used > srv->cfg.session_ttl_s;
}

// Drops expired sessions. Called locked.
static void sessions_expire(Server *srv) {
    double now = timer_now_s();
    for (int i = 0; i < srv->cfg.max_sessions; i++)
        if (session_expired(srv, &srv->sessions[i], now)) {
            session_clear(&srv->sessions[i]);
            srv->evicted_sessions++;
        }
}

// A free slot for a new session: expired ones go first, then the least recently used. Called locked.
static Session *session_slot(Server *srv) {
    sessions_expire(srv);
    Session *lru = NULL;
    for (int i = 0; i < srv->cfg.max_sessions; i++) {
        Session *s = &srv->sessions[i];
        if (!s->id[0]) return s;
        if (!lru || s->last_used < lru->last_used) lru = s;
    }
    session_clear(lru);
    srv->evicted_sessions++;
    return lru;
}

static Session *session_find(Server *srv, const char *id) {
    double now = timer_now_s();
    for (int i = 0; i < srv->cfg.max_sessions; i++) {
        Session *s = &srv->sessions[i];
        if (s->id[0] && !strcmp(s->id, id) && !session_expired(srv, s, now)) return s;
    }
    return NULL;
}

bool server_has_session(Server *srv, const char *id) {
    pthread_mutex_lock(&srv->mu);
    bool found = session_find(srv, id) != NULL;
    pthread_mutex_unlock(&srv->mu);
    return found;
}

// ---- banks ------------------------------------------------------------------------------------------------

static Bank *bank_find(Server *srv, const char *name) {
    for (int i = 0; i < SERVE_MAX_BANKS; i++)
        if (srv->banks[i].k > 0 && !strcmp(srv->banks[i].name, name)) return &srv->banks[i];
    return NULL;
}

bool server_has_bank(Server *srv, const char *name) {
    pthread_mutex_lock(&srv->mu);
    bool found = bank_find(srv, name) != NULL;
    pthread_mutex_unlock(&srv->mu);
    return found;
}

cJSON *server_banks_json(Server *srv, const char *name) {
    pthread_mutex_lock(&srv->mu);
    cJSON *out = NULL;
    if (name) {
        Bank *b = bank_find(srv, name);
        if (b) {
            out = cJSON_CreateObject();
            cJSON_AddStringToObject(out, "name", b->name);
            cJSON_AddNumberToObject(out, "images", b->k);
        }
    } else {
        out = cJSON_CreateObject();
        cJSON *list = cJSON_AddArrayToObject(out, "banks");
        for (int i = 0; i < SERVE_MAX_BANKS; i++)
            if (srv->banks[i].k > 0) {
                cJSON *o = cJSON_CreateObject();
                cJSON_AddStringToObject(o, "name", srv->banks[i].name);
                cJSON_AddNumberToObject(o, "images", srv->banks[i].k);
                cJSON_AddItemToArray(list, o);
            }
    }
    pthread_mutex_unlock(&srv->mu);
    return out;
}

// Patch features of k images: computed into the vision model's own reference slot, then moved out of it.
static Status build_refs(Server *srv, const Image *images, int k, FewShotRefs *out) {
    VisionModel *vm = &srv->agpt->vision;
    vm->refs = (FewShotRefs){0};
    Status s = vision_model_set_references(vm, images, k);
    *out = vm->refs;
    vm->refs = (FewShotRefs){0};
    return s;
}

static bool is_png(const uint8_t *p, size_t n) { return n >= 8 && !memcmp(p, "\x89PNG", 4); }

// Removes a bank folder: only the files it can hold (ref_NN.png/jpg), then the folder itself.
static void remove_bank_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "ref_", 4)) continue;
        char path[4608];
        if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) < (int)sizeof path) unlink(path);
    }
    closedir(d);
    rmdir(dir);
}

// Writes the uploaded files to <bank_dir>/.new-<name>/ and renames the folder over <bank_dir>/<name>.
static Status persist_bank(const Server *srv, const Job *job) {
    char tmp[4200], dir[4200], path[4300];
    snprintf(tmp, sizeof tmp, "%s/.new-%s", srv->cfg.bank_dir, job->bank);
    snprintf(dir, sizeof dir, "%s/%s", srv->cfg.bank_dir, job->bank);
    remove_bank_dir(tmp);
    if (mkdir(tmp, 0755) != 0) return AGPT_FAIL(AGPT_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
    for (int i = 0; i < job->n_refs; i++) {
        snprintf(path, sizeof path, "%s/ref_%02d.%s", tmp, i, is_png(job->ref_bytes[i], job->ref_len[i]) ? "png" : "jpg");
        FILE *f = fopen(path, "wb");
        bool ok = f && fwrite(job->ref_bytes[i], 1, job->ref_len[i], f) == job->ref_len[i];
        if (f) ok = (fflush(f) == 0 && fsync(fileno(f)) == 0) && ok, ok = fclose(f) == 0 && ok;
        if (!ok) {
            remove_bank_dir(tmp);
            return AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", path);
        }
    }
    remove_bank_dir(dir);
    if (rename(tmp, dir) != 0) {
        remove_bank_dir(tmp);
        return AGPT_FAIL(AGPT_ERR_IO, "cannot rename %s to %s: %s", tmp, dir, strerror(errno));
    }
    return AGPT_OK;
}

static void run_bank_put(Server *srv, Job *job) {
    FewShotRefs refs = {0};
    Status s = build_refs(srv, job->refs, job->n_refs, &refs);
    if (s == AGPT_OK) s = persist_bank(srv, job);
    if (s != AGPT_OK) {
        fewshot_refs_free(&refs);
        job->http_status = s == AGPT_ERR_IO || s == AGPT_ERR_OOM || s == AGPT_ERR_DEVICE ? 500 : 400;
        job->result = error_json(job->http_status, clean_error(agpt_last_error()));
        return;
    }
    pthread_mutex_lock(&srv->mu);
    Bank *b = bank_find(srv, job->bank);
    bool created = !b;
    for (int i = 0; i < SERVE_MAX_BANKS && !b; i++)
        if (srv->banks[i].k == 0) b = &srv->banks[i];
    if (b) {
        fewshot_refs_free(&b->refs);
        snprintf(b->name, sizeof b->name, "%s", job->bank);
        b->k = job->n_refs;
        b->refs = refs;
    }
    pthread_mutex_unlock(&srv->mu);
    if (!b) {  // checked by the HTTP layer too; a race between two new banks ends here
        fewshot_refs_free(&refs);
        job->http_status = 507;
        job->result = error_json(507, "the server holds the most banks it can; delete one first");
        return;
    }
    job->http_status = created ? 201 : 200;
    job->result = cJSON_CreateObject();
    cJSON_AddStringToObject(job->result, "name", job->bank);
    cJSON_AddNumberToObject(job->result, "images", job->n_refs);
    cJSON_AddBoolToObject(job->result, "created", created);
}

static void run_bank_delete(Server *srv, Job *job) {
    pthread_mutex_lock(&srv->mu);
    Bank *b = bank_find(srv, job->bank);
    FewShotRefs refs = b ? b->refs : (FewShotRefs){0};
    if (b) memset(b, 0, sizeof *b);
    pthread_mutex_unlock(&srv->mu);
    if (!b) {
        job->http_status = 404;
        job->result = error_json(404, "no bank of that name");
        return;
    }
    fewshot_refs_free(&refs);
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/%s", srv->cfg.bank_dir, job->bank);
    remove_bank_dir(dir);
    job->http_status = 200;
    job->result = cJSON_CreateObject();
    cJSON_AddStringToObject(job->result, "deleted", job->bank);
}

// Loads every <bank_dir>/<name>/ref_NN.* at start-up (the worker is not running yet).
static Status load_banks(Server *srv) {
    DIR *d = opendir(srv->cfg.bank_dir);
    if (!d) return AGPT_FAIL(AGPT_ERR_IO, "cannot read the bank folder %s: %s", srv->cfg.bank_dir, strerror(errno));
    struct dirent *e;
    int loaded = 0;
    Status s = AGPT_OK;
    while ((e = readdir(d)) && s == AGPT_OK) {
        if (!bank_name_valid(e->d_name) || loaded == SERVE_MAX_BANKS) continue;
        char dir[4200];
        snprintf(dir, sizeof dir, "%s/%s", srv->cfg.bank_dir, e->d_name);
        Image imgs[SERVE_MAX_REFS] = {0};
        int k = 0;
        for (int i = 0; i < SERVE_MAX_REFS; i++) {
            char path[4300];
            snprintf(path, sizeof path, "%s/ref_%02d.png", dir, i);
            if (access(path, R_OK) != 0) snprintf(path, sizeof path, "%s/ref_%02d.jpg", dir, i);
            if (access(path, R_OK) != 0) break;
            if ((s = image_load(path, &imgs[k]))) break;
            k++;
        }
        Bank *b = &srv->banks[loaded];
        if (s == AGPT_OK && k > 0 && (s = build_refs(srv, imgs, k, &b->refs)) == AGPT_OK) {
            snprintf(b->name, sizeof b->name, "%s", e->d_name);
            b->k = k;
            loaded++;
            LOG_I("serve: bank '%s' (%d image%s) loaded", b->name, k, k > 1 ? "s" : "");
        }
        for (int i = 0; i < k; i++) image_free(&imgs[i]);
        if (s) s = agpt_add_context(s, "bank %s", dir);
    }
    closedir(d);
    return s;
}

// ---- inspections ------------------------------------------------------------------------------------------

// The question of an inspection, as agpt detect words it.
char *serve_question(const char *prompt, const char *class_name) {
    char q[4096];
    if (prompt && *prompt) snprintf(q, sizeof q, "%s", prompt);
    else if (class_name && *class_name)
        snprintf(q, sizeof q, "This is a photo of a %s for anomaly detection, which should be without any damage, "
                 "flaw, defect, scratch, hole or broken part. Is there any anomaly in the image?", class_name);
    else snprintf(q, sizeof q, "Is there any anomaly in the image?");
    return strdup(q);
}

static cJSON *map_json(Server *srv, const Job *job, const float *map) {
    int S = srv->image_size;
    cJSON *m = cJSON_CreateObject();
    cJSON_AddNumberToObject(m, "width", S);
    cJSON_AddNumberToObject(m, "height", S);
    char *data = NULL;
    if (job->map_format == 2) {  // the raw map, f32 little-endian (x86 and arm64 hosts are little-endian)
        cJSON_AddStringToObject(m, "format", "f32");
        data = base64((const uint8_t *)map, (size_t)S * S * sizeof(float));
    } else {  // the heatmap over the image as the model saw it, as agpt detect --out writes it
        cJSON_AddStringToObject(m, "format", "png");
        uint8_t *crop = NULL, *over = NULL, *png = NULL;
        size_t png_len = 0;
        Status s = mem_host_alloc((size_t)S * S * 3, (void **)&crop);
        if (s == AGPT_OK) s = mem_host_alloc((size_t)S * S * 3, (void **)&over);
        if (s == AGPT_OK) s = preprocess_image_u8(&job->image, srv->agpt->vision.mode, S, RESIZE_PILLOW_10, crop);
        if (s == AGPT_OK) {
            heatmap_overlay(crop, map, S, 0.5f, over);
            s = image_encode_png_memory(S, S, 3, over, &png, &png_len);
        }
        if (s == AGPT_OK) data = base64(png, png_len);
        mem_host_free(crop), mem_host_free(over), free(png);
    }
    if (data) cJSON_AddStringToObject(m, "data", data);
    else cJSON_AddNullToObject(m, "data");
    free(data);
    return m;
}

static void add_ms(cJSON *o, const Job *job, const AnomalyAnswer *ans, double queue_ms, double total_ms) {
    cJSON *t = cJSON_AddObjectToObject(o, "ms");
    cJSON_AddNumberToObject(t, "decode_image", job->decode_ms);
    cJSON_AddNumberToObject(t, "queue", queue_ms);
    cJSON_AddNumberToObject(t, "vision", ans->vision_ms);
    cJSON_AddNumberToObject(t, "prefill", ans->prefill_ms);
    cJSON_AddNumberToObject(t, "generate", ans->decode_ms);
    cJSON_AddNumberToObject(t, "tokens", ans->n_tokens);
    cJSON_AddNumberToObject(t, "total", total_ms);
}

// A new session for an answered inspection: it keeps the image (moved out of the job), the references and the turn.
static const char *session_create(Server *srv, Job *job, FewShotRefs *refs, const char *answer) {
    pthread_mutex_lock(&srv->mu);
    Session *s = session_slot(srv);
    uint64_t r = ((uint64_t)rand() << 32) ^ (uint64_t)rand() ^ ((uint64_t)(timer_now_s() * 1e9));
    snprintf(s->id, sizeof s->id, "%016llx%016llx", (unsigned long long)++srv->session_counter, (unsigned long long)r);
    s->last_used = timer_now_s();
    s->image = job->image;
    job->image = (Image){0};
    snprintf(s->bank, sizeof s->bank, "%s", job->bank);
    snprintf(s->class_name, sizeof s->class_name, "%s", job->class_name);
    if (refs) s->refs = *refs, *refs = (FewShotRefs){0};
    s->questions[0] = strdup(job->question);
    s->answers[0] = strdup(answer);
    s->turns = 1;
    pthread_mutex_unlock(&srv->mu);
    return s->id;
}

// Installs the map source of a job in the model: a bank's references, the job's own, or none (zero-shot).
static void use_refs(Server *srv, const FewShotRefs *refs) {
    srv->agpt->vision.refs = refs ? *refs : (FewShotRefs){0};
}


// 400 for what the request asked (too long a prompt for the context, a bad option), 500 for the server's faults.
static int status_of(Status s) {
    return s == AGPT_ERR_ARG || s == AGPT_ERR_FORMAT || s == AGPT_ERR_UNSUPPORTED ? 400 : 500;
}

static void fail_job(Job *job, int status, const char *message) {
    job->http_status = status;
    job->result = error_json(status, message);
}

// The answer of one inspection, its metrics, and its session.
static void answer_inspect(Server *srv, Job *job, AnomalyAnswer *ans, const float *map, bool few_shot,
                           FewShotRefs *own_refs, int batch, double t_batch) {
    AnomalyGPT *a = srv->agpt;
    double now = timer_now_s();
    double queue_ms = 1e3 * (t_batch - job->t_queued), total_ms = 1e3 * (now - job->t_arrival);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddTrueToObject(o, "ok");
    char *raw = job->verdict_only ? answer_raw_text(a, ans) : NULL;
    const char *verdict = answer_verdict(job->verdict_only ? raw : ans->text);
    free(raw);
    if (verdict) cJSON_AddStringToObject(o, "verdict", verdict);
    else cJSON_AddNullToObject(o, "verdict");
    cJSON_AddNumberToObject(o, "score", ans->score);
    cJSON_AddStringToObject(o, "mode", few_shot ? "few-shot" : "zero-shot");
    if (!few_shot) add_text(o, "class", ans->class_name && ans->class_name[0] ? ans->class_name : "object");
    if (job->bank[0]) cJSON_AddStringToObject(o, "bank", job->bank);
    if (!job->verdict_only) add_text(o, "answer", ans->text);
    cJSON_AddNumberToObject(o, "batch", batch);
    add_ms(o, job, ans, queue_ms, total_ms);
    if (job->map_format) cJSON_AddItemToObject(o, "map", map_json(srv, job, map));
    if (!job->verdict_only && !job->no_session) cJSON_AddStringToObject(o, "session", session_create(srv, job, own_refs, ans->text));
    job->http_status = 200;
    job->result = o;
    server_observe(srv, STAGE_DECODE, job->decode_ms);
    server_observe(srv, STAGE_QUEUE, queue_ms);
    server_observe(srv, STAGE_VISION, ans->vision_ms);
    server_observe(srv, STAGE_PREFILL, ans->prefill_ms);
    server_observe(srv, STAGE_GENERATE, ans->decode_ms);
    server_observe(srv, STAGE_TOTAL, total_ms);
}

// n compatible inspections (batchable(), or one with its own references) through one model call. A batch that
// fails is retried job by job, so that one request (a prompt too long for the context) cannot fail the others.
static void run_inspect(Server *srv, Job **jobs, int n) {
    AnomalyGPT *a = srv->agpt;
    size_t SS = (size_t)srv->image_size * srv->image_size;
    double t_batch = timer_now_s();
    float *maps = NULL;
    AnomalyAnswer *ans = calloc((size_t)n, sizeof *ans);
    Image *images = calloc((size_t)n, sizeof *images);
    const char **inputs = calloc((size_t)n, sizeof *inputs);
    if (!ans || !images || !inputs || mem_host_alloc((size_t)n * SS * sizeof(float), (void **)&maps) != AGPT_OK) {
        for (int i = 0; i < n; i++) fail_job(jobs[i], 503, "out of memory for this batch; try again");
        goto done;
    }
    FewShotRefs own = {0};
    const FewShotRefs *refs = NULL;
    Status s = AGPT_OK;
    if (jobs[0]->n_refs > 0) {
        if ((s = build_refs(srv, jobs[0]->refs, jobs[0]->n_refs, &own))) {
            fail_job(jobs[0], status_of(s), clean_error(agpt_last_error()));
            goto done;
        }
        refs = &own;
    } else if (jobs[0]->bank[0]) {
        pthread_mutex_lock(&srv->mu);
        Bank *b = bank_find(srv, jobs[0]->bank);
        pthread_mutex_unlock(&srv->mu);
        if (!b) {  // deleted after the request was checked
            for (int i = 0; i < n; i++) fail_job(jobs[i], 404, "no bank of that name (it was deleted)");
            goto done;
        }
        refs = &b->refs;  // only this thread frees banks
    }
    a->map_class = jobs[0]->class_name[0] ? jobs[0]->class_name : NULL;
    for (int i = 0; i < n; i++) {
        images[i] = jobs[i]->image, inputs[i] = jobs[i]->question;
        ans[i] = (AnomalyAnswer){.map = maps + (size_t)i * SS};
    }
    use_refs(srv, refs);
    if (n == 1) s = anomalygpt_ask(a, &images[0], NULL, 0, inputs[0], NULL, jobs[0]->max_new, &ans[0]);
    else s = anomalygpt_ask_batch(a, images, n, inputs, jobs[0]->max_new, ans);
    char *err = s != AGPT_OK ? strdup(clean_error(agpt_last_error())) : NULL;
    if (s != AGPT_OK && n > 1) {  // one by one: each job gets its own answer or its own error
        free(err), err = NULL;
        for (int i = 0; i < n; i++) {
            Status si = anomalygpt_ask(a, &images[i], NULL, 0, inputs[i], NULL, jobs[i]->max_new, &ans[i]);
            if (si != AGPT_OK) fail_job(jobs[i], status_of(si), clean_error(agpt_last_error()));
        }
        s = AGPT_OK;
    }
    use_refs(srv, NULL);
    a->map_class = NULL;
    pthread_mutex_lock(&srv->mu);
    hist_add(&srv->batch_sizes, BATCH_BOUNDS, n);
    srv->batches++;
    pthread_mutex_unlock(&srv->mu);
    for (int i = 0; i < n; i++) {
        if (jobs[i]->result) continue;  // failed on its own
        if (s != AGPT_OK) fail_job(jobs[i], status_of(s), err ? err : "inspection failed");
        else answer_inspect(srv, jobs[i], &ans[i], ans[i].map, refs != NULL, refs == &own ? &own : NULL, n, t_batch);
    }
    free(err);
    fewshot_refs_free(&own);  // unless a session took them
done:
    for (int i = 0; ans && i < n; i++) free(ans[i].text);
    free(ans), free(images), free(inputs);
    mem_host_free(maps);
}

// A follow-up question about a session's image: the whole conversation so far as history. The KV cache keeps the
// rows of the last conversation it ran (reuse_cache), so a session asked twice in a row re-runs only the new rows.
static void run_ask(Server *srv, Job *job) {
    AnomalyGPT *a = srv->agpt;
    double t_start = timer_now_s();
    pthread_mutex_lock(&srv->mu);
    Session *se = session_find(srv, job->session);
    const FewShotRefs *refs = NULL;
    const char *problem = NULL;
    int status = 0;
    if (!se) status = 404, problem = "no such session (it expired or was evicted); inspect the image again";
    else if (se->turns == SERVE_MAX_TURNS) status = 409, problem = "the session holds the most questions it can; inspect the image again";
    else if (se->refs.k > 0) refs = &se->refs;
    else if (se->bank[0]) {
        Bank *b = bank_find(srv, se->bank);
        if (b) refs = &b->refs;
        else status = 409, problem = "the session's bank was deleted";
    }
    if (se) se->last_used = timer_now_s();
    pthread_mutex_unlock(&srv->mu);
    if (problem) {
        fail_job(job, status, problem);
        return;
    }
    // Only this thread changes or evicts sessions: se stays valid without the lock.
    ConversationTurn history[SERVE_MAX_TURNS];
    for (int i = 0; i < se->turns; i++) history[i] = (ConversationTurn){se->questions[i], se->answers[i]};
    float *map = NULL;
    AnomalyAnswer ans = {0};
    Status s = mem_host_alloc((size_t)srv->image_size * srv->image_size * sizeof(float), (void **)&map);
    if (s == AGPT_OK) {
        ans.map = map;
        a->map_class = se->class_name[0] ? se->class_name : NULL;
        use_refs(srv, refs);
        s = anomalygpt_ask(a, &se->image, history, se->turns, job->question, NULL, job->max_new, &ans);
        use_refs(srv, NULL);
        a->map_class = NULL;
    }
    mem_host_free(map);
    if (s != AGPT_OK) {
        fail_job(job, status_of(s), clean_error(agpt_last_error()));
        return;
    }
    pthread_mutex_lock(&srv->mu);
    se->questions[se->turns] = strdup(job->question);
    se->answers[se->turns] = strdup(ans.text ? ans.text : "");
    se->turns++;
    int turn = se->turns;
    pthread_mutex_unlock(&srv->mu);
    double now = timer_now_s();
    cJSON *o = cJSON_CreateObject();
    cJSON_AddTrueToObject(o, "ok");
    cJSON_AddStringToObject(o, "session", job->session);
    cJSON_AddNumberToObject(o, "turn", turn);
    add_text(o, "answer", ans.text);
    const char *verdict = answer_verdict(ans.text);
    if (verdict) cJSON_AddStringToObject(o, "verdict", verdict);
    else cJSON_AddNullToObject(o, "verdict");
    cJSON_AddNumberToObject(o, "prefix_tokens", ans.prefix_tokens);
    cJSON_AddNumberToObject(o, "reused_tokens", ans.reused_tokens);
    add_ms(o, job, &ans, 1e3 * (t_start - job->t_queued), 1e3 * (now - job->t_arrival));
    free(ans.text);
    job->http_status = 200;
    job->result = o;
    server_observe(srv, STAGE_TOTAL, 1e3 * (now - job->t_arrival));
}

// ---- the worker -------------------------------------------------------------------------------------------

// Delivery. The worker resumes a finished job's connection; libmicrohttpd can miss a resume that arrives while
// the connection is still being suspended (the HTTP thread suspends, queues the job, and a fast worker may finish
// before the suspension has taken effect), which leaves the client waiting until some other event wakes that
// thread. So a finished job stays on the delivering list until its HTTP thread takes the result, and the worker
// resumes any connection that has not taken it within RESUME_RETRY_S again. A spurious wake-up is harmless: the
// HTTP thread sees the job is not done and suspends again.
#define RESUME_RETRY_S 0.01

static void unlink_delivering(Server *srv, Job *job) {
    for (Job **link = &srv->delivering; *link; link = &(*link)->deliver_next)
        if (*link == job) {
            *link = job->deliver_next;
            return;
        }
}

// Called locked; unlocks around the resume calls. A job marked resuming cannot be taken or freed meanwhile, so its
// connection stays valid.
static void resume_stale(Server *srv) {
    Job *again[64];
    int n = 0;
    double now = timer_now_s();
    for (Job *j = srv->delivering; j && n < 64; j = j->deliver_next)
        if (!j->resuming && now - j->t_resumed > RESUME_RETRY_S) {
            j->resuming = true, j->t_resumed = now;
            again[n++] = j;
        }
    if (n == 0) return;
    srv->resume_retries += (uint64_t)n;
    pthread_mutex_unlock(&srv->mu);
    for (int i = 0; i < n; i++) MHD_resume_connection(again[i]->conn);
    pthread_mutex_lock(&srv->mu);
    for (int i = 0; i < n; i++) again[i]->resuming = false;
    pthread_cond_broadcast(&srv->done_cv);
}

// Waits (locked) up to RESUME_RETRY_S for a signal on work_cv.
static void wait_a_little(Server *srv) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    long long ns = until.tv_nsec + (long long)(RESUME_RETRY_S * 1e9);
    until.tv_sec += (time_t)(ns / 1000000000ll), until.tv_nsec = (long)(ns % 1000000000ll);
    pthread_cond_timedwait(&srv->work_cv, &srv->mu, &until);
}

bool server_take_result(Server *srv, Job *job) {
    pthread_mutex_lock(&srv->mu);
    while (job->resuming) pthread_cond_wait(&srv->done_cv, &srv->mu);
    bool done = atomic_load(&job->done);
    if (done) unlink_delivering(srv, job);
    pthread_mutex_unlock(&srv->mu);
    return done;
}

void server_drop_job(Server *srv, Job *job) {
    pthread_mutex_lock(&srv->mu);
    while (job->resuming) pthread_cond_wait(&srv->done_cv, &srv->mu);
    bool done = atomic_load(&job->done);
    if (done) unlink_delivering(srv, job);
    else job->orphaned = true;
    pthread_mutex_unlock(&srv->mu);
    if (done) job_free(job);
}

static void complete(Server *srv, Job *job) {
    pthread_mutex_lock(&srv->mu);
    atomic_store(&job->done, true);
    bool orphaned = job->orphaned;
    struct MHD_Connection *conn = orphaned ? NULL : job->conn;
    if (conn) {
        job->resuming = true, job->t_resumed = timer_now_s();
        job->deliver_next = srv->delivering;
        srv->delivering = job;
    }
    pthread_cond_broadcast(&srv->done_cv);
    pthread_mutex_unlock(&srv->mu);
    if (orphaned) {
        job_free(job);
    } else if (conn) {  // the HTTP thread sends the result (and frees the job)
        MHD_resume_connection(conn);
        pthread_mutex_lock(&srv->mu);
        job->resuming = false;
        pthread_cond_broadcast(&srv->done_cv);
        pthread_mutex_unlock(&srv->mu);
    }
}

void *server_worker(void *arg) {
    Server *srv = arg;
    Job **batch = calloc((size_t)srv->cfg.max_batch, sizeof *batch);
    for (;;) {
        pthread_mutex_lock(&srv->mu);
        int n = batch ? take_batch(srv, batch) : 0;
        pthread_mutex_unlock(&srv->mu);
        if (n == 0) break;
        switch (batch[0]->kind) {
        case JOB_INSPECT: run_inspect(srv, batch, n); break;
        case JOB_ASK: run_ask(srv, batch[0]); break;
        case JOB_BANK_PUT: run_bank_put(srv, batch[0]); break;
        case JOB_BANK_DELETE: run_bank_delete(srv, batch[0]); break;
        }
        for (int i = 0; i < n; i++) {
            if (!batch[i]->result) fail_job(batch[i], 500, "no result");
            complete(srv, batch[i]);
        }
    }
    free(batch);
    pthread_mutex_lock(&srv->mu);
    // Shutting down: the answers already made must reach their clients before the server stops (up to 5 s).
    for (int i = 0; i < 500 && srv->delivering; i++) {
        wait_a_little(srv);
        resume_stale(srv);
    }
    srv->worker_done = true;
    pthread_cond_broadcast(&srv->done_cv);
    pthread_mutex_unlock(&srv->mu);
    return NULL;
}

// ---- life cycle -------------------------------------------------------------------------------------------

Status server_init(Server *srv, const ServeConfig *cfg, AnomalyGPT *agpt) {
    memset(srv, 0, sizeof *srv);
    srv->cfg = *cfg;
    srv->agpt = agpt;
    srv->image_size = agpt->vision.vision.image;
    agpt->reuse_cache = true;  // follow-ups of the session served last re-run only their new rows
    pthread_mutex_init(&srv->mu, NULL);
    pthread_cond_init(&srv->work_cv, NULL);
    pthread_cond_init(&srv->done_cv, NULL);
    srand((unsigned)(timer_now_s() * 1e6) ^ (unsigned)getpid());
    srv->sessions = calloc((size_t)cfg->max_sessions, sizeof *srv->sessions);
    if (!srv->sessions) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d sessions", cfg->max_sessions);
    if (mkdir(cfg->bank_dir, 0755) != 0 && errno != EEXIST)
        return AGPT_FAIL(AGPT_ERR_IO, "cannot create the bank folder %s: %s", cfg->bank_dir, strerror(errno));
    return load_banks(srv);
}

void server_free(Server *srv) {
    for (int i = 0; i < SERVE_MAX_BANKS; i++) fewshot_refs_free(&srv->banks[i].refs);
    for (int i = 0; srv->sessions && i < srv->cfg.max_sessions; i++) session_clear(&srv->sessions[i]);
    free(srv->sessions);
    for (Job *j = srv->head, *next; j; j = next) next = j->next, job_free(j);
    pthread_mutex_destroy(&srv->mu);
    pthread_cond_destroy(&srv->work_cv);
    pthread_cond_destroy(&srv->done_cv);
}
