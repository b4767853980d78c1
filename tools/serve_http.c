// agpt serve: the HTTP layer on libmicrohttpd (its internal thread pool). Each request's body is read into memory
// (bounded per request and over all requests), checked and decoded on the HTTP thread; inference requests become
// jobs for the worker while their connection is suspended, and are answered when the worker resumes it.
#define _GNU_SOURCE  // memmem, strcasecmp, strdup
#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "runtime/text.h"
#include "runtime/timer.h"
#include "tools/serve.h"

#define MAX_PARTS 32
#define MAX_PROMPT 2000

typedef enum Route { R_PAGE, R_HEALTH, R_READY, R_METRICS, R_INSPECT, R_BANKS, R_BANK, R_SESSION, R_ASK } Route;

typedef struct Request {
    Server *srv;
    Route route;
    char name[SERVE_NAME_MAX + 1];  // the bank name or session id in the path
    uint8_t *body;                  // what was read so far: [len] of [cap]
    size_t len, cap;
    int refused;                    // a status decided while reading (413, 503) or when the queue refused the job
    bool responded;
    Job *job;                       // queued: the connection is suspended until the worker is done with it
} Request;

// ---- responses --------------------------------------------------------------------------------------------

static enum MHD_Result send_body(struct MHD_Connection *c, Request *r, int status, const char *ctype, void *data,
                                 size_t len, enum MHD_ResponseMemoryMode mode, int retry_after) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, data, mode);
    if (!resp) {
        if (mode == MHD_RESPMEM_MUST_FREE) free(data);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", ctype);
    MHD_add_response_header(resp, "Cache-Control", "no-store");
    if (retry_after > 0) {
        char v[16];
        snprintf(v, sizeof v, "%d", retry_after);
        MHD_add_response_header(resp, "Retry-After", v);
    }
    if (status == 401) MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
    if (status == 405) {
        const char *allow = r->route == R_BANK ? "GET, PUT, DELETE" : r->route == R_INSPECT || r->route == R_ASK ? "POST" : "GET";
        MHD_add_response_header(resp, "Allow", allow);
    }
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    if (ok == MHD_YES) {
        r->responded = true;
        server_count_status(r->srv, status);
    }
    return ok;
}

static enum MHD_Result send_json(struct MHD_Connection *c, Request *r, int status, cJSON *obj, int retry_after) {
    char *text = obj ? cJSON_PrintUnformatted(obj) : NULL;
    cJSON_Delete(obj);
    if (!text) text = strdup("{\"error\":\"out of memory\",\"status\":503}"), status = 503;
    if (!text) return MHD_NO;
    return send_body(c, r, status, "application/json", text, strlen(text), MHD_RESPMEM_MUST_FREE, retry_after);
}

static enum MHD_Result send_error(struct MHD_Connection *c, Request *r, int status, const char *message) {
    int retry = status == 429 ? 1 : status == 503 ? 5 : 0;
    return send_json(c, r, status, error_json(status, message), retry);
}

// ---- routing and authentication -------------------------------------------------------------------------

static bool session_id_valid(const char *id) {
    size_t n = strlen(id);
    if (n != 32) return false;
    for (size_t i = 0; i < n; i++)
        if (!strchr("0123456789abcdef", id[i])) return false;
    return true;
}

// The route of (method, url), or the status that refuses it (400, 404, 405) with its message.
static int route_of(const char *url, const char *method, Request *r, const char **message) {
    bool get = !strcmp(method, "GET") || !strcmp(method, "HEAD"), post = !strcmp(method, "POST");
    struct { const char *path; Route route; bool ok; } fixed[] = {
        {"/", R_PAGE, get}, {"/index.html", R_PAGE, get}, {"/healthz", R_HEALTH, get}, {"/readyz", R_READY, get},
        {"/metrics", R_METRICS, get}, {"/v1/inspect", R_INSPECT, post}, {"/v1/banks", R_BANKS, get},
    };
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        if (!strcmp(url, fixed[i].path)) {
            r->route = fixed[i].route;
            *message = "method not allowed";
            return fixed[i].ok ? 0 : 405;
        }
    *message = "no such endpoint";
    if (!strncmp(url, "/v1/banks/", 10)) {
        const char *name = url + 10;
        r->route = R_BANK;
        if (!bank_name_valid(name)) {
            *message = "bad bank name: use 1 to 64 letters, digits, '_' or '-'";
            return 400;
        }
        snprintf(r->name, sizeof r->name, "%s", name);
        *message = "method not allowed";
        return get || !strcmp(method, "PUT") || !strcmp(method, "DELETE") ? 0 : 405;
    }
    if (!strncmp(url, "/v1/sessions/", 13)) {
        const char *id = url + 13, *slash = strchr(id, '/');
        size_t n = slash ? (size_t)(slash - id) : strlen(id);
        if (n >= sizeof r->name) return 404;
        memcpy(r->name, id, n);
        r->name[n] = 0;
        if (slash && strcmp(slash, "/ask")) return 404;
        r->route = slash ? R_ASK : R_SESSION;
        *message = "method not allowed";
        if (slash ? !post : !get) return 405;
        *message = "no such session (it expired or was evicted); inspect the image again";
        return session_id_valid(r->name) ? 0 : 404;
    }
    return 404;
}

static bool needs_key(Route r) { return r != R_PAGE && r != R_HEALTH && r != R_READY; }

// Compares all bytes whatever the first difference, so that timing does not tell how much of a key was right.
static bool same_secret(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    unsigned diff = na != nb;
    for (size_t i = 0; i < na; i++) diff |= (unsigned char)a[i] ^ (unsigned char)b[i % (nb ? nb : 1)];
    return diff == 0;
}

static bool authorized(struct MHD_Connection *c, const Server *srv) {
    if (!srv->cfg.api_key) return true;
    const char *auth = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    const char *key = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-API-Key");
    if (auth && !strncasecmp(auth, "Bearer ", 7)) key = auth + 7;
    return key && same_secret(key, srv->cfg.api_key);
}

// ---- multipart/form-data ----------------------------------------------------------------------------------

typedef struct Part {
    char name[64];
    bool is_file;          // had a filename
    const uint8_t *data;   // into the body
    size_t len;
} Part;

static const uint8_t *find(const uint8_t *p, size_t n, const char *needle, size_t k) {
    return k <= n ? memmem(p, n, needle, k) : NULL;
}

// The value of key="..." (or key=token) in a header line, into out.
static bool header_param(const char *line, size_t n, const char *key, char *out, size_t cap) {
    size_t k = strlen(key);
    for (size_t i = 0; i + k + 1 <= n; i++) {
        if (strncasecmp(line + i, key, k) || line[i + k] != '=' || (i > 0 && line[i - 1] != ' ' && line[i - 1] != ';'))
            continue;
        const char *v = line + i + k + 1, *end = line + n;
        bool quoted = v < end && *v == '"';
        if (quoted) v++;
        size_t m = 0;
        while (v + m < end && (quoted ? v[m] != '"' : v[m] != ';' && v[m] != ' ')) m++;
        if (m >= cap) m = cap - 1;
        memcpy(out, v, m);
        out[m] = 0;
        return true;
    }
    return false;
}

// Splits a multipart body at its boundary. Returns the number of parts, or -1 with *err for a malformed body.
static int multipart_parse(const uint8_t *body, size_t len, const char *ctype, Part *parts, int max, const char **err) {
    char boundary[128], delim[140];
    *err = "malformed multipart body";
    if (!header_param(ctype, strlen(ctype), "boundary", boundary, sizeof boundary) || !boundary[0]) {
        *err = "multipart/form-data without a boundary";
        return -1;
    }
    int dn = snprintf(delim, sizeof delim, "\r\n--%s", boundary);
    // The first delimiter may open the body (no CRLF before it).
    const uint8_t *p = len >= (size_t)dn - 2 && !memcmp(body, delim + 2, (size_t)dn - 2) ? body + dn - 2
                                                                                         : find(body, len, delim, (size_t)dn);
    if (p && p != body + dn - 2) p += dn;
    int n = 0;
    const uint8_t *end = body + len;
    while (p) {
        if (end - p >= 2 && p[0] == '-' && p[1] == '-') return n;  // the closing delimiter
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n') return -1;
        p += 2;
        const uint8_t *hend = find(p, (size_t)(end - p), "\r\n\r\n", 4);
        if (!hend) return -1;
        if (n == max) {
            *err = "too many parts in the multipart body";
            return -1;
        }
        Part *part = &parts[n];
        memset(part, 0, sizeof *part);
        for (const uint8_t *line = p; line < hend;) {
            const uint8_t *eol = find(line, (size_t)(hend - line), "\r\n", 2);
            size_t ln = eol ? (size_t)(eol - line) : (size_t)(hend - line);
            if (ln > 20 && !strncasecmp((const char *)line, "Content-Disposition:", 20)) {
                char file[256];
                header_param((const char *)line, ln, "name", part->name, sizeof part->name);
                part->is_file = header_param((const char *)line, ln, "filename", file, sizeof file);
            }
            line += ln + 2;
        }
        const uint8_t *data = hend + 4, *next = find(data, (size_t)(end - data), delim, (size_t)dn);
        if (!next) return -1;
        part->data = data, part->len = (size_t)(next - data);
        n++;
        p = next + dn;
    }
    return -1;
}

// ---- request options --------------------------------------------------------------------------------------

typedef struct InspectOptions {
    char class_name[128], bank[SERVE_NAME_MAX + 1], prompt[MAX_PROMPT + 1];
    bool verdict_only;
    int map;  // 0 none, 1 png, 2 f32
} InspectOptions;

// Sets one option from its text; returns a message for a bad value, else NULL.
static const char *set_option(InspectOptions *o, const char *key, const char *v, size_t n) {
    if (!strcmp(key, "class")) {
        if (n >= sizeof o->class_name) return "class: at most 127 characters";
        for (size_t i = 0; i < n; i++)
            if (!((v[i] >= 'a' && v[i] <= 'z') || (v[i] >= 'A' && v[i] <= 'Z') || (v[i] >= '0' && v[i] <= '9') ||
                  v[i] == ' ' || v[i] == '_' || v[i] == '-'))
                return "class: letters, digits, spaces, '_' and '-' only";
        memcpy(o->class_name, v, n), o->class_name[n] = 0;
    } else if (!strcmp(key, "bank")) {
        if (n >= sizeof o->bank) return "bank: bad name";
        memcpy(o->bank, v, n), o->bank[n] = 0;
        if (n && !bank_name_valid(o->bank)) return "bank: bad name (1 to 64 letters, digits, '_' or '-')";
    } else if (!strcmp(key, "prompt")) {
        if (n > MAX_PROMPT) return "prompt: at most 2000 bytes";
        memcpy(o->prompt, v, n), o->prompt[n] = 0;
        if (memchr(v, 0, n)) return "prompt: contains a NUL byte";
    } else if (!strcmp(key, "verdict_only")) {
        char b[8] = {0};
        memcpy(b, v, n < 7 ? n : 7);
        if (n < 7 && (!strcmp(b, "1") || !strcmp(b, "true") || !strcmp(b, "yes") || !strcmp(b, "on") || n == 0))
            o->verdict_only = true;
        else if (n < 7 && (!strcmp(b, "0") || !strcmp(b, "false") || !strcmp(b, "no") || !strcmp(b, "off")))
            o->verdict_only = false;
        else return "verdict_only: use 1 or 0 (true or false)";
    } else if (!strcmp(key, "map")) {
        if (n == 4 && !memcmp(v, "none", 4)) o->map = 0;
        else if (n == 3 && !memcmp(v, "png", 3)) o->map = 1;
        else if (n == 3 && !memcmp(v, "f32", 3)) o->map = 2;
        else return "map: use none, png or f32";
    } else {
        return NULL;  // unknown fields are ignored, as query strings usually are
    }
    return NULL;
}

static const char *query_options(struct MHD_Connection *c, InspectOptions *o) {
    static const char *keys[] = {"class", "bank", "prompt", "verdict_only", "map"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const char *v = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, keys[i]);
        const char *err = v ? set_option(o, keys[i], v, strlen(v)) : NULL;
        if (err) return err;
    }
    return NULL;
}

static bool is_image_type(const char *ctype) {
    return !ctype || !*ctype || !strncasecmp(ctype, "image/png", 9) || !strncasecmp(ctype, "image/jpeg", 10) ||
           !strncasecmp(ctype, "image/jpg", 9) || !strncasecmp(ctype, "application/octet-stream", 24);
}

static Status decode(const uint8_t *p, size_t n, const char *what, Image *out, double *ms) {
    double t0 = timer_now_s();
    Status s = n == 0 ? AGPT_FAIL(AGPT_ERR_FORMAT, "%s: empty", what) : image_decode(p, n, what, out);
    if (ms) *ms = 1e3 * (timer_now_s() - t0);
    return s;
}

// Queues the job and suspends the connection until the worker resumes it. Suspending first means the worker's
// resume always comes after it.
static enum MHD_Result enqueue(struct MHD_Connection *c, Request *r, Job *job) {
    job->conn = c;
    r->job = job;
    atomic_fetch_add(&r->srv->in_flight, 1);
    MHD_suspend_connection(c);
    int refused = server_submit(r->srv, job);
    if (refused) {  // answered on the next call, after this resume
        r->refused = refused;
        r->job = NULL;
        job_free(job);
        atomic_fetch_sub(&r->srv->in_flight, 1);
        MHD_resume_connection(c);
    }
    return MHD_YES;
}

static enum MHD_Result do_inspect(struct MHD_Connection *c, Request *r) {
    Server *srv = r->srv;
    InspectOptions o = {0};
    const char *err = query_options(c, &o);
    if (err) return send_error(c, r, 400, err);
    const char *ctype = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type");
    const uint8_t *image = r->body;
    size_t image_len = r->len;
    const uint8_t *ref[SERVE_MAX_REFS];
    size_t ref_len[SERVE_MAX_REFS];
    int n_refs = 0;
    if (ctype && !strncasecmp(ctype, "multipart/form-data", 19)) {
        Part parts[MAX_PARTS];
        int n = multipart_parse(r->body, r->len, ctype, parts, MAX_PARTS, &err);
        if (n < 0) return send_error(c, r, 400, err);
        image = NULL, image_len = 0;
        for (int i = 0; i < n; i++) {
            if (!strcmp(parts[i].name, "image")) image = parts[i].data, image_len = parts[i].len;
            else if (!strcmp(parts[i].name, "reference") || !strcmp(parts[i].name, "references")) {
                if (parts[i].len == 0 && parts[i].is_file) continue;  // a browser's empty file input
                if (n_refs == SERVE_MAX_REFS) return send_error(c, r, 400, "at most 8 reference images");
                ref[n_refs] = parts[i].data, ref_len[n_refs++] = parts[i].len;
            } else if (!parts[i].is_file && (err = set_option(&o, parts[i].name, (const char *)parts[i].data, parts[i].len)))
                return send_error(c, r, 400, err);
        }
        if (!image) return send_error(c, r, 400, "the multipart body has no 'image' part");
    } else if (!is_image_type(ctype)) {
        return send_error(c, r, 415, "send the image as image/png, image/jpeg, application/octet-stream or multipart/form-data");
    }
    if (o.bank[0] && n_refs > 0) return send_error(c, r, 400, "name a bank or send references, not both");
    if (o.bank[0] && !server_has_bank(srv, o.bank)) return send_error(c, r, 404, "no bank of that name");
    if (!srv->agpt) return send_error(c, r, 503, "the model is not loaded");
    Job *job = calloc(1, sizeof *job);
    if (!job) return send_error(c, r, 503, "out of memory; try again");
    job->kind = JOB_INSPECT;
    job->t_arrival = timer_now_s();
    Status s = decode(image, image_len, "image", &job->image, &job->decode_ms);
    for (int i = 0; i < n_refs && s == AGPT_OK; i++) {
        char what[32];
        snprintf(what, sizeof what, "reference %d", i + 1);
        s = decode(ref[i], ref_len[i], what, &job->refs[i], NULL);
    }
    if (s != AGPT_OK) {
        job_free(job);
        return send_error(c, r, s == AGPT_ERR_OOM ? 503 : 400, clean_error(agpt_last_error()));
    }
    job->n_refs = n_refs;
    snprintf(job->bank, sizeof job->bank, "%s", o.bank);
    snprintf(job->class_name, sizeof job->class_name, "%s", o.class_name);
    job->verdict_only = o.verdict_only;
    job->map_format = o.map;
    job->max_new = o.verdict_only ? SERVE_VERDICT_TOKENS : srv->cfg.max_new;
    if (!(job->question = serve_question(o.prompt, o.class_name))) {
        job_free(job);
        return send_error(c, r, 503, "out of memory; try again");
    }
    return enqueue(c, r, job);
}

static enum MHD_Result do_bank_put(struct MHD_Connection *c, Request *r) {
    const char *ctype = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type"), *err;
    const uint8_t *img[SERVE_MAX_REFS];
    size_t len[SERVE_MAX_REFS];
    int k = 0;
    if (ctype && !strncasecmp(ctype, "multipart/form-data", 19)) {
        Part parts[MAX_PARTS];
        int n = multipart_parse(r->body, r->len, ctype, parts, MAX_PARTS, &err);
        if (n < 0) return send_error(c, r, 400, err);
        for (int i = 0; i < n; i++) {
            if (!parts[i].is_file || parts[i].len == 0) continue;
            if (k == SERVE_MAX_REFS) return send_error(c, r, 400, "a bank holds at most 8 images");
            img[k] = parts[i].data, len[k++] = parts[i].len;
        }
    } else if (is_image_type(ctype)) {
        if (r->len) img[0] = r->body, len[0] = r->len, k = 1;
    } else {
        return send_error(c, r, 415, "send the bank's images as multipart/form-data files, or one image as the body");
    }
    if (k == 0) return send_error(c, r, 400, "a bank needs at least one normal image");
    Job *job = calloc(1, sizeof *job);
    if (!job) return send_error(c, r, 503, "out of memory; try again");
    job->kind = JOB_BANK_PUT;
    job->t_arrival = timer_now_s();
    snprintf(job->bank, sizeof job->bank, "%s", r->name);
    Status s = AGPT_OK;
    for (int i = 0; i < k && s == AGPT_OK; i++) {
        char what[32];
        snprintf(what, sizeof what, "image %d", i + 1);
        s = decode(img[i], len[i], what, &job->refs[i], NULL);
        if (s == AGPT_OK && !(job->ref_bytes[i] = malloc(len[i]))) s = AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
        if (s == AGPT_OK) memcpy(job->ref_bytes[i], img[i], len[i]), job->ref_len[i] = len[i];
    }
    job->n_refs = k;
    if (s != AGPT_OK) {
        job_free(job);
        return send_error(c, r, s == AGPT_ERR_OOM ? 503 : 400, clean_error(agpt_last_error()));
    }
    return enqueue(c, r, job);
}

static enum MHD_Result do_ask(struct MHD_Connection *c, Request *r) {
    const char *ctype = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type");
    if (ctype && strncasecmp(ctype, "application/json", 16))
        return send_error(c, r, 415, "send the question as application/json: {\"question\": \"...\"}");
    if (!server_has_session(r->srv, r->name))
        return send_error(c, r, 404, "no such session (it expired or was evicted); inspect the image again");
    cJSON *body = cJSON_ParseWithLength((const char *)r->body, r->len);
    if (!body || !cJSON_IsObject(body)) {
        cJSON_Delete(body);
        return send_error(c, r, 400, "the body is not a JSON object");
    }
    cJSON *q = cJSON_GetObjectItemCaseSensitive(body, "question"), *mn = cJSON_GetObjectItemCaseSensitive(body, "max_new");
    const char *problem = !cJSON_IsString(q) || !q->valuestring[0]  ? "\"question\" must be a non-empty string"
                          : strlen(q->valuestring) > MAX_PROMPT      ? "\"question\": at most 2000 bytes"
                          : mn && (!cJSON_IsNumber(mn) || mn->valuedouble != (int)mn->valuedouble || mn->valuedouble < 1 ||
                                   mn->valuedouble > 1024)           ? "\"max_new\" must be an integer in [1, 1024]"
                                                                     : NULL;
    if (problem) {
        cJSON_Delete(body);
        return send_error(c, r, 400, problem);
    }
    Job *job = calloc(1, sizeof *job);
    if (!job || !(job->question = strdup(q->valuestring))) {
        free(job);
        cJSON_Delete(body);
        return send_error(c, r, 503, "out of memory; try again");
    }
    job->kind = JOB_ASK;
    job->t_arrival = timer_now_s();
    job->max_new = mn ? (int)mn->valuedouble : r->srv->cfg.max_new;
    snprintf(job->session, sizeof job->session, "%.32s", r->name);
    cJSON_Delete(body);
    return enqueue(c, r, job);
}

static enum MHD_Result dispatch(struct MHD_Connection *c, Request *r, const char *method) {
    Server *srv = r->srv;
    switch (r->route) {
    case R_PAGE:
        return send_body(c, r, 200, "text/html; charset=utf-8", (void *)SERVE_PAGE_HTML, strlen(SERVE_PAGE_HTML),
                         MHD_RESPMEM_PERSISTENT, 0);
    case R_HEALTH: {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "status", "ok");
        return send_json(c, r, 200, o, 0);
    }
    case R_READY: {
        bool ready = atomic_load(&srv->ready) && !atomic_load(&srv->stopping);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddBoolToObject(o, "ready", ready);
        if (!ready) cJSON_AddStringToObject(o, "reason", atomic_load(&srv->stopping) ? "shutting down" : "loading");
        return send_json(c, r, ready ? 200 : 503, o, ready ? 0 : 5);
    }
    case R_METRICS: {
        char *text = server_metrics_text(srv);
        if (!text) return send_error(c, r, 503, "out of memory; try again");
        return send_body(c, r, 200, "text/plain; version=0.0.4; charset=utf-8", text, strlen(text), MHD_RESPMEM_MUST_FREE, 0);
    }
    case R_INSPECT: return do_inspect(c, r);
    case R_BANKS: return send_json(c, r, 200, server_banks_json(srv, NULL), 0);
    case R_BANK:
        if (!strcmp(method, "PUT")) return do_bank_put(c, r);
        if (!server_has_bank(srv, r->name)) return send_error(c, r, 404, "no bank of that name");
        if (!strcmp(method, "DELETE")) {
            Job *job = calloc(1, sizeof *job);
            if (!job) return send_error(c, r, 503, "out of memory; try again");
            job->kind = JOB_BANK_DELETE;
            snprintf(job->bank, sizeof job->bank, "%s", r->name);
            return enqueue(c, r, job);
        }
        {
            cJSON *o = server_banks_json(srv, r->name);
            return o ? send_json(c, r, 200, o, 0) : send_error(c, r, 404, "no bank of that name");
        }
    case R_SESSION: {
        if (!server_has_session(srv, r->name))
            return send_error(c, r, 404, "no such session (it expired or was evicted); inspect the image again");
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "session", r->name);
        return send_json(c, r, 200, o, 0);
    }
    case R_ASK: return do_ask(c, r);
    }
    return send_error(c, r, 404, "no such endpoint");
}

static bool has_body(const Request *r, const char *method) {
    return r->route == R_INSPECT || r->route == R_ASK || (r->route == R_BANK && !strcmp(method, "PUT"));
}

// Appends a chunk of the body; returns the status that refuses the request (413, 503), or 0.
static int append_body(Request *r, const char *data, size_t n) {
    Server *srv = r->srv;
    if (r->len + n > srv->cfg.max_body) return 413;
    if (r->len + n > r->cap) {
        size_t cap = r->cap ? r->cap : 64 * 1024;
        while (cap < r->len + n) cap *= 2;
        if (cap > srv->cfg.max_body) cap = srv->cfg.max_body;
        // The memory all bodies hold together is bounded too: past it, clients are told to come back later.
        size_t before = atomic_fetch_add(&srv->body_bytes, cap - r->cap);
        if (before + (cap - r->cap) > srv->cfg.body_budget) {
            atomic_fetch_sub(&srv->body_bytes, cap - r->cap);
            return 503;
        }
        uint8_t *p = realloc(r->body, cap);
        if (!p) {
            atomic_fetch_sub(&srv->body_bytes, cap - r->cap);
            return 503;
        }
        r->body = p, r->cap = cap;
    }
    memcpy(r->body + r->len, data, n);
    r->len += n;
    return 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    Server *srv = cls;
    Request *r = *con_cls;
    if (!r) {  // the headers are in; the body (if any) comes in the next calls
        if (!(r = calloc(1, sizeof *r))) return MHD_NO;
        r->srv = srv;
        *con_cls = r;
        const char *message;
        int refused = route_of(url, method, r, &message);
        if (refused) return send_error(c, r, refused, message);
        if (needs_key(r->route) && !authorized(c, srv)) return send_error(c, r, 401, "a valid API key is required");
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (has_body(r, method) && cl && strtoull(cl, NULL, 10) > srv->cfg.max_body) {
            char m[96];
            snprintf(m, sizeof m, "the body is larger than the server's limit of %zu bytes", srv->cfg.max_body);
            return send_error(c, r, 413, m);
        }
        return MHD_YES;
    }
    if (r->responded) {
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size) {
        if (!r->refused) r->refused = append_body(r, upload, *upload_size);
        *upload_size = 0;
        return MHD_YES;
    }
    if (r->job) {  // resumed by the worker
        Job *job = r->job;
        if (!server_take_result(srv, job)) {  // a stray wake-up: the job is still queued or running
            MHD_suspend_connection(c);
            return MHD_YES;
        }
        r->job = NULL;
        int status = job->http_status;
        cJSON *result = job->result;
        job->result = NULL;
        job_free(job);
        atomic_fetch_sub(&srv->in_flight, 1);
        return send_json(c, r, status, result, status == 429 ? 1 : status == 503 ? 5 : 0);
    }
    if (r->refused == 413) return send_error(c, r, 413, "the body is larger than the server's limit");
    if (r->refused == 429) return send_error(c, r, 429, "the queue is full; try again shortly");
    if (r->refused == 503)
        return send_error(c, r, 503, atomic_load(&srv->stopping) ? "the server is shutting down"
                                                                   : "the server is busy; try again shortly");
    bool inference = r->route == R_INSPECT || r->route == R_ASK || r->route == R_BANK;
    if (inference && atomic_load(&srv->stopping) && strcmp(method, "GET"))
        return send_error(c, r, 503, "the server is shutting down");
    return dispatch(c, r, method);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode why) {
    Server *srv = cls;
    Request *r = *con_cls;
    if (!r) return;
    if (r->job) {  // closed while its job was queued: the worker frees it when done
        server_drop_job(srv, r->job);
        atomic_fetch_sub(&srv->in_flight, 1);
    }
    atomic_fetch_sub(&srv->body_bytes, r->cap);
    free(r->body);
    free(r);
    *con_cls = NULL;
}

Status http_start(Server *srv, struct MHD_Daemon **out, int *bound_port) {
    struct sockaddr_storage addr = {0};
    const char *host = srv->cfg.host;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&addr;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET, v4->sin_port = htons((uint16_t)srv->cfg.port);
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6, v6->sin6_port = htons((uint16_t)srv->cfg.port);
        flags |= MHD_USE_IPv6;
    } else {
        return AGPT_FAIL(AGPT_ERR_ARG, "--host %s: give a numeric IPv4 or IPv6 address (127.0.0.1, 0.0.0.0, ::1)", host);
    }
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, (uint16_t)srv->cfg.port, NULL, NULL, on_request, srv,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)srv->cfg.http_threads,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)srv->cfg.timeout_s,  // slow clients are dropped
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)1024,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)64 * 1024,        // headers beyond it: MHD answers 431 itself
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
        MHD_OPTION_END);
    if (!d) return AGPT_FAIL(AGPT_ERR_IO, "cannot listen on %s port %d (in use, or not an address of this machine)",
                             host, srv->cfg.port);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    *bound_port = info ? info->port : srv->cfg.port;
    *out = d;
    return AGPT_OK;
}

void http_stop(struct MHD_Daemon *d) {
    if (d) MHD_stop_daemon(d);
}
