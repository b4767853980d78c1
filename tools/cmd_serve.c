// agpt serve: the inspection server (HTTP API, web page, reference banks, chat sessions, metrics) and the hot
// folder. See tools/serve.h for how the parts fit, README "Serving" for the API.
//
// Exit status: 0 after a clean shutdown (SIGTERM or SIGINT), 1 when the model or the server could not start,
// 2 for a usage error.
#define _DEFAULT_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/log.h"
#include "runtime/timer.h"
#include "tools/cli.h"
#include "tools/serve.h"
#include "tools/watch.h"

#define MAX_OVERLAYS 7

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt serve --model M.safetensors [options]\n"
            "  --model F, --weights F (repeatable), --tokenizer F   the model, as agpt detect opens it\n"
            "  --host ADDR      numeric address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)\n"
            "  --port N         (default 8080; 0 picks a free port), --port-file F writes the port chosen\n"
            "  --max-batch N    inspections per model call (default 8), --batch-wait-ms T how long the worker waits\n"
            "                   for a batch to fill (default 5), --queue N jobs waiting at most (default 64; more: 429)\n"
            "  --api-key K      require 'Authorization: Bearer K' (or X-API-Key: K) on /v1/* and /metrics\n"
            "  --bank-dir D     where reference banks persist (default ./agpt-banks)\n"
            "  --reference-shifts N   each bank image also in N x N shifted views, as agpt map (1: none)\n"
            "  --max-body-mb N  request body limit (default 16; larger: 413), --body-budget-mb N all bodies at once\n"
            "                   (default 512; beyond it: 503)\n"
            "  --max-new N      answer tokens at most (default 512), --context N (2048)\n"
            "  --max-sessions N chat sessions kept (default 64, least recently used evicted), --session-ttl S (600)\n"
            "  --http-threads N (default 4), --timeout S idle connections are closed after S seconds (default 15)\n"
            "  --device cpu|cuda, --dtype f32|f16|bf16, --threads N   as agpt detect\n"
            "Hot folder (besides the HTTP server):\n"
            "  --watch DIR      inspect every image written into DIR; JSON lines appended to --watch-log F\n"
            "                   (default DIR/inspections.jsonl; '-' stdout); --sort moves them into DIR/ok and DIR/ng\n"
            "  --class C, --prompt P, --bank B, --verdict-only   how the hot folder's images are inspected\n"
            "SIGTERM or SIGINT: queued work is finished, new work refused (503), then the server exits.\n");
}

// ---- the hot folder's inspections go through the same queue as HTTP requests ------------------------------

typedef struct WatchContext {
    Server *srv;
    const char *class_name, *prompt, *bank;
    bool verdict_only;
} WatchContext;

static cJSON *watch_inspect(void *arg, const char *path) {
    WatchContext *w = arg;
    Server *srv = w->srv;
    Job *job = calloc(1, sizeof *job);
    if (!job) return error_json(503, "out of memory");
    job->kind = JOB_INSPECT;
    job->no_session = true;
    job->t_arrival = timer_now_s();
    snprintf(job->class_name, sizeof job->class_name, "%s", w->class_name ? w->class_name : "");
    snprintf(job->bank, sizeof job->bank, "%s", w->bank ? w->bank : "");
    job->verdict_only = w->verdict_only;
    job->max_new = w->verdict_only ? SERVE_VERDICT_TOKENS : srv->cfg.max_new;
    job->question = serve_question(w->prompt, w->class_name);
    Status s = image_load(path, &job->image);
    job->decode_ms = 1e3 * (timer_now_s() - job->t_arrival);
    if (s != AGPT_OK || !job->question) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddFalseToObject(o, "ok");
        cJSON_AddStringToObject(o, "error", s != AGPT_OK ? clean_error(agpt_last_error()) : "out of memory");
        job_free(job);
        return o;
    }
    int refused;
    while ((refused = server_submit(srv, job)) == 429) usleep(20000);  // a full queue: the camera waits
    if (refused) {  // shutting down: the file stays for the next start
        job_free(job);
        return NULL;
    }
    pthread_mutex_lock(&srv->mu);
    while (!atomic_load(&job->done)) pthread_cond_wait(&srv->done_cv, &srv->mu);
    pthread_mutex_unlock(&srv->mu);
    cJSON *res = job->result;
    job->result = NULL;
    if (job->http_status != 200 && res) {  // {"error", "status"} -> {"ok": false, "error"}
        cJSON_DeleteItemFromObject(res, "status");
        cJSON_AddFalseToObject(res, "ok");
    }
    job_free(job);
    return res;
}

typedef struct WatchThread {
    WatchConfig cfg;
    WatchContext ctx;
    Status status;
    char error[512];
} WatchThread;

static void *watch_main(void *arg) {
    WatchThread *t = arg;
    t->status = watch_folder(&t->cfg, watch_inspect, &t->ctx, &t->ctx.srv->stopping);
    if (t->status != AGPT_OK) {
        snprintf(t->error, sizeof t->error, "%s", agpt_last_error());
        LOG_E("serve: the hot folder stopped: %s", t->error);
    }
    return NULL;
}

// ---- options ----------------------------------------------------------------------------------------------

static int int_option(const char *opt, const char *v, long long lo, long long hi, int *out) {
    long long x;
    if (cli_parse_int("serve", opt, v, lo, hi, &x)) return -1;
    *out = (int)x;
    return 0;
}

int cmd_serve(int argc, char **argv) {
    const char *model = NULL, *sp_model = NULL, *overlays[MAX_OVERLAYS], *port_file = NULL;
    const char *w_class = NULL, *w_prompt = NULL, *w_bank = NULL;
    int n_overlays = 0, threads = 0, context = 2048, max_body_mb = 16, budget_mb = 512, reference_shifts = 1;
    bool w_verdict_only = false;
    ServeConfig cfg = {.host = "127.0.0.1", .port = 8080, .max_batch = 8, .batch_wait_ms = 5, .queue_cap = 64,
                       .http_threads = 4, .timeout_s = 15, .max_new = 512, .max_sessions = 64,
                       .session_ttl_s = 600, .bank_dir = "agpt-banks"};
    Device dev = cuda_device_count() > 0 ? DEV_CUDA : DEV_CPU;
    DType dt = DT_F16;
    for (int i = 1; i < argc; i++) {
        int shared = cli_engine_option(argc, argv, &i, "serve", &dev, &dt, &threads);
        if (shared < 0) goto usage_error;
        if (shared) continue;
        const char *a = argv[i], *v;
#define VALUE() do { if (!(v = cli_value(argc, argv, &i, "serve"))) goto usage_error; } while (0)
#define INT(lo, hi, dst) do { VALUE(); if (int_option(a, v, lo, hi, dst)) goto usage_error; } while (0)
        if (!strcmp(a, "--model")) { VALUE(); model = v; }
        else if (!strcmp(a, "--weights")) {
            VALUE();
            if (n_overlays == MAX_OVERLAYS) { fprintf(stderr, "agpt serve: at most %d --weights\n", MAX_OVERLAYS); goto usage_error; }
            overlays[n_overlays++] = v;
        }
        else if (!strcmp(a, "--tokenizer")) { VALUE(); sp_model = v; }
        else if (!strcmp(a, "--host")) { VALUE(); cfg.host = v; }
        else if (!strcmp(a, "--port")) INT(0, 65535, &cfg.port);
        else if (!strcmp(a, "--port-file")) { VALUE(); port_file = v; }
        else if (!strcmp(a, "--max-batch")) INT(1, 256, &cfg.max_batch);
        else if (!strcmp(a, "--batch-wait-ms")) INT(0, 10000, &cfg.batch_wait_ms);
        else if (!strcmp(a, "--queue")) INT(1, 100000, &cfg.queue_cap);
        else if (!strcmp(a, "--api-key")) {
            VALUE();
            if (!*v) { fprintf(stderr, "agpt serve: --api-key must not be empty\n"); goto usage_error; }
            cfg.api_key = v;
        }
        else if (!strcmp(a, "--bank-dir")) { VALUE(); cfg.bank_dir = v; }
        else if (!strcmp(a, "--reference-shifts")) INT(1, 14, &reference_shifts);
        else if (!strcmp(a, "--max-body-mb")) INT(1, 1024, &max_body_mb);
        else if (!strcmp(a, "--body-budget-mb")) INT(1, 65536, &budget_mb);
        else if (!strcmp(a, "--max-new")) INT(1, 1024, &cfg.max_new);
        else if (!strcmp(a, "--context")) INT(64, 1 << 20, &context);
        else if (!strcmp(a, "--max-sessions")) INT(1, 100000, &cfg.max_sessions);
        else if (!strcmp(a, "--session-ttl")) INT(1, 7 * 86400, &cfg.session_ttl_s);
        else if (!strcmp(a, "--http-threads")) INT(1, 256, &cfg.http_threads);
        else if (!strcmp(a, "--timeout")) INT(1, 3600, &cfg.timeout_s);
        else if (!strcmp(a, "--watch")) { VALUE(); cfg.watch_dir = v; }
        else if (!strcmp(a, "--watch-log")) { VALUE(); cfg.watch_log = v; }
        else if (!strcmp(a, "--sort")) cfg.watch_sort = true;
        else if (!strcmp(a, "--class")) { VALUE(); w_class = v; }
        else if (!strcmp(a, "--prompt")) { VALUE(); w_prompt = v; }
        else if (!strcmp(a, "--bank")) { VALUE(); w_bank = v; }
        else if (!strcmp(a, "--verdict-only")) w_verdict_only = true;
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
        else { fprintf(stderr, "agpt serve: unknown option '%s'\n", a); goto usage_error; }
#undef INT
#undef VALUE
    }
    if (!model) { fprintf(stderr, "agpt serve: --model is required\n"); goto usage_error; }
    if ((cfg.watch_sort || cfg.watch_log || w_class || w_prompt || w_bank || w_verdict_only) && !cfg.watch_dir) {
        fprintf(stderr, "agpt serve: --sort, --watch-log, --class, --prompt, --bank and --verdict-only go with --watch\n");
        goto usage_error;
    }
    if (w_bank && !bank_name_valid(w_bank)) { fprintf(stderr, "agpt serve: --bank: bad bank name '%s'\n", w_bank); goto usage_error; }
    cfg.max_body = (size_t)max_body_mb << 20;
    cfg.body_budget = (size_t)budget_mb << 20;

    // Signals go to sigwait below: blocked here, before any thread starts, so that every thread inherits it.
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    signal(SIGPIPE, SIG_IGN);  // a client that goes away must not end the server

    // The worker's OpenMP threads spin while they wait by default; on a CPU shared with the HTTP threads that
    // turns into stalls of seconds under load (measured: 64 clients on 2 cores). libgomp reads the policy at
    // start-up, before main, so it can only be advised here.
    if (dev == DEV_CPU && !getenv("OMP_WAIT_POLICY"))
        LOG_W("serve: OMP_WAIT_POLICY is not set: spinning OpenMP threads can stall requests for seconds when many "
              "clients share the CPU; OMP_WAIT_POLICY=passive avoids it, at some throughput (README, Serving)");
    Engine eng;
    static AnomalyGPT agpt;
    static Server srv;
    dt = cli_model_dtype(argc, argv, dev, dt);
    Status s = engine_create(&eng, dev, 0, threads, 1);
    if (s) return cli_report("serve", s);
    double t0 = timer_now_s();
    if ((s = anomalygpt_open_batch(&agpt, &eng, model, overlays, n_overlays, sp_model, dt, context, cfg.max_batch))) {
        engine_destroy(&eng);
        return cli_report("serve", agpt_add_context(s, "opening the model (agpt serve needs one with the language model)"));
    }
    agpt.vision.reference_shifts = reference_shifts;
    int rc = 0;
    struct MHD_Daemon *http = NULL;
    pthread_t worker, watcher;
    bool worker_started = false, watcher_started = false;
    WatchThread wt = {.cfg = {cfg.watch_dir, cfg.watch_log, cfg.watch_sort},
                      .ctx = {&srv, w_class, w_prompt, w_bank, w_verdict_only}};
    int port = 0;
    if ((s = server_init(&srv, &cfg, &agpt))) goto failed;
    if (w_bank && !server_has_bank(&srv, w_bank)) {
        s = AGPT_FAIL(AGPT_ERR_ARG, "--bank %s: no such bank in %s", w_bank, cfg.bank_dir);
        goto failed;
    }
    if (pthread_create(&worker, NULL, server_worker, &srv) != 0) {
        s = AGPT_FAIL(AGPT_ERR_OOM, "cannot start the inference worker");
        goto failed;
    }
    worker_started = true;
    if ((s = http_start(&srv, &http, &port))) goto failed;
    atomic_store(&srv.ready, true);
    if (port_file) {
        FILE *f = fopen(port_file, "w");
        if (!f || fprintf(f, "%d\n", port) < 0 || fclose(f) != 0) {
            s = AGPT_FAIL(AGPT_ERR_IO, "cannot write --port-file %s", port_file);
            goto failed;
        }
    }
    fprintf(stderr, "agpt serve: listening on http://%s:%d/ (model loaded in %.2f s; max batch %d, wait %d ms, queue %d)\n",
            cfg.host, port, timer_now_s() - t0, cfg.max_batch, cfg.batch_wait_ms, cfg.queue_cap);
    if (cfg.watch_dir) {
        if (pthread_create(&watcher, NULL, watch_main, &wt) != 0) {
            s = AGPT_FAIL(AGPT_ERR_OOM, "cannot start the hot folder's thread");
            goto failed;
        }
        watcher_started = true;
        fprintf(stderr, "agpt serve: watching %s%s\n", cfg.watch_dir, cfg.watch_sort ? " (sorting into ok/ and ng/)" : "");
    }

    int sig = 0;
    sigwait(&stop_signals, &sig);
    fprintf(stderr, "agpt serve: %s: finishing %d queued job(s), refusing new work\n", sig == SIGTERM ? "SIGTERM" : "SIGINT",
            srv.queued);
    goto shutdown;

failed:
    rc = cli_report("serve", s);
shutdown:
    pthread_mutex_lock(&srv.mu);
    atomic_store(&srv.stopping, true);
    pthread_cond_broadcast(&srv.work_cv);
    pthread_mutex_unlock(&srv.mu);
    if (watcher_started) pthread_join(watcher, NULL);
    if (worker_started) pthread_join(worker, NULL);
    // The worker has resumed every suspended connection; give their answers a moment to leave.
    for (int i = 0; i < 500 && atomic_load(&srv.in_flight) > 0; i++) usleep(10000);
    http_stop(http);
    server_free(&srv);
    anomalygpt_close(&agpt);
    engine_destroy(&eng);
    if (rc == 0) fprintf(stderr, "agpt serve: stopped\n");
    return rc;

usage_error:
    usage(stderr);
    return 2;
}
