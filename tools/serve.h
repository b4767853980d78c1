// agpt serve: the inspection server's state, shared by its parts.
//
//   HTTP threads (serve_http.c, libmicrohttpd's pool)     the one inference worker (serve_core.c)
//     read the body, decode the image, check options  ->  queue  ->  takes up to max_batch compatible jobs
//     suspend the connection                              (bounded)  within batch_wait_ms, runs them through
//     resume: send the job's JSON                     <-             anomalygpt_ask_batch, fills each job's result
//
// Only the worker touches the model: inspections, follow-up questions, and building or deleting reference banks
// are all jobs. Banks and sessions live in tables guarded by the server mutex; their device tensors are used and
// freed by the worker alone, so a table lock is never held across inference.
#pragma once
#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/anomalygpt.h"
#include "tools/inspect_io.h"

#define SERVE_MAX_REFS 8        // reference images per bank or per request (the vision model's batch is >= 8)
#define SERVE_MAX_BANKS 64
#define SERVE_NAME_MAX 64       // bank names: [A-Za-z0-9_-], 1..64, so a name is always one folder under the bank dir
#define SERVE_MAX_TURNS 16      // questions a session holds
#define SERVE_VERDICT_TOKENS VERDICT_TOKENS  // verdict_only (tools/inspect_io.h)

typedef enum JobKind { JOB_INSPECT, JOB_ASK, JOB_BANK_PUT, JOB_BANK_DELETE } JobKind;

// One unit of work for the worker. The submitter owns it; the worker fills status/result and sets done.
typedef struct Job {
    JobKind kind;
    struct Job *next;             // queue link
    // inputs
    Image image;                  // INSPECT: the query (moved into the session it creates)
    Image refs[SERVE_MAX_REFS];   // INSPECT: per-request references; BANK_PUT: the bank's images
    int n_refs;
    uint8_t *ref_bytes[SERVE_MAX_REFS];  // BANK_PUT: the files as uploaded (persisted as they came)
    size_t ref_len[SERVE_MAX_REFS];
    char bank[SERVE_NAME_MAX + 1];       // INSPECT (may be ""), BANK_PUT, BANK_DELETE
    char class_name[128];                // INSPECT: "" = the reference's rule from the prompt text
    char *question;                      // INSPECT, ASK: malloc'd
    char session[33];                    // ASK: the session id
    bool verdict_only;
    bool no_session;                     // INSPECT from the hot folder: nobody will ask a follow-up
    int map_format;                      // 0 none, 1 png (heatmap overlay), 2 f32 (raw map)
    int max_new;
    double t_arrival, t_queued, decode_ms;  // seconds (timer_now_s), decode ms
    // completion
    struct MHD_Connection *conn;         // HTTP: resumed when done; NULL: the submitter waits on done_cv
    atomic_bool done;
    bool orphaned;                       // its connection closed before it was done: the worker frees it
    // Delivery: a finished HTTP job stays on the server's delivering list until its HTTP thread takes the result.
    struct Job *deliver_next;
    double t_resumed;                    // when its connection was last resumed
    bool resuming;                       // a resume call is under way: the job must not be freed yet
    int http_status;
    cJSON *result;                       // the answer or {"error": ...}; the submitter frees it
} Job;

typedef struct Bank {
    char name[SERVE_NAME_MAX + 1];
    int k;                        // images; 0 = free slot
    FewShotRefs refs;             // patch features of the k images, on the device (worker only)
} Bank;

typedef struct Session {
    char id[33];                  // "" = free slot
    double last_used;             // timer_now_s
    Image image;
    char bank[SERVE_NAME_MAX + 1];
    FewShotRefs refs;             // references uploaded with the inspection (k = 0: none, or the bank's)
    char class_name[128];
    char *questions[SERVE_MAX_TURNS], *answers[SERVE_MAX_TURNS];
    int turns;
} Session;

#define HIST_BUCKETS 15
typedef struct Histogram {
    uint64_t counts[HIST_BUCKETS + 1];  // the last is +Inf
    double sum;
    uint64_t n;
} Histogram;

typedef enum Stage { STAGE_DECODE, STAGE_QUEUE, STAGE_VISION, STAGE_PREFILL, STAGE_GENERATE, STAGE_TOTAL, N_STAGES } Stage;

typedef struct ServeConfig {
    const char *host;
    int port;                     // 0: any free port
    int max_batch, batch_wait_ms, queue_cap, http_threads, timeout_s;
    int max_new, max_sessions, session_ttl_s;
    size_t max_body;              // bytes per request
    size_t body_budget;           // bytes all requests may hold at once
    const char *api_key;          // NULL: no authentication
    const char *bank_dir;
    const char *watch_dir;        // hot folder (NULL: none)
    const char *watch_log;        // JSON lines file (NULL: <watch_dir>/inspections.jsonl)
    bool watch_sort;              // move inspected files into ok/ and ng/
} ServeConfig;

typedef struct Server {
    ServeConfig cfg;
    AnomalyGPT *agpt;             // opened with max_batch = cfg.max_batch
    int image_size;               // S: the map is [S,S]
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    Job *head, *tail;
    int queued;
    atomic_bool stopping;         // SIGTERM: finish what is queued, refuse new work
    atomic_bool ready;            // model loaded, banks loaded
    atomic_int in_flight;         // suspended connections waiting for a job
    atomic_size_t body_bytes;     // request bodies held now
    bool worker_done;
    Job *delivering;              // finished HTTP jobs whose answer has not been picked up yet
    uint64_t resume_retries;      // connections resumed again because the first resume was not seen
    Bank banks[SERVE_MAX_BANKS];
    Session *sessions;            // [cfg.max_sessions]
    uint64_t session_counter;
    // metrics (under mu)
    uint64_t by_status[600];
    Histogram stage[N_STAGES];
    Histogram batch_sizes;
    uint64_t batches, evicted_sessions;
} Server;

// serve_core.c
Status server_init(Server *srv, const ServeConfig *cfg, AnomalyGPT *agpt);  // loads the banks from cfg.bank_dir
void server_free(Server *srv);
void *server_worker(void *srv);   // the inference loop; returns once stopping and the queue is empty
// Queues a job. Returns 0, or the HTTP status that refuses it: 429 (queue full) or 503 (shutting down).
int server_submit(Server *srv, Job *job);
void job_free(Job *job);
// The HTTP thread of a resumed connection: true when the job is done (it leaves the delivering list and belongs to
// the caller again), false when the wake-up was spurious (suspend again).
bool server_take_result(Server *srv, Job *job);
// The connection of a queued or finished job closed: frees a finished job, else leaves it to the worker.
void server_drop_job(Server *srv, Job *job);
bool bank_name_valid(const char *name);
bool server_has_bank(Server *srv, const char *name);   // under the lock
bool server_has_session(Server *srv, const char *id);  // unexpired
cJSON *server_banks_json(Server *srv, const char *name);  // all banks, or one (NULL when it does not exist)
char *server_metrics_text(Server *srv);                // Prometheus text format, malloc'd
void server_count_status(Server *srv, int status);
void server_observe(Server *srv, Stage stage, double ms);
cJSON *error_json(int status, const char *message);
// The question of an inspection, as agpt detect words it: the prompt, else the reference's training prompt for
// the class, else "Is there any anomaly in the image?". malloc'd.
char *serve_question(const char *prompt, const char *class_name);
// The library's last error without its "file.c:123: " prefixes: what an API client should read.
const char *clean_error(const char *message);

// serve_http.c
struct MHD_Daemon;
Status http_start(Server *srv, struct MHD_Daemon **out, int *bound_port);
void http_stop(struct MHD_Daemon *d);

// serve_page.c: the web page, one self-contained HTML document.
extern const char SERVE_PAGE_HTML[];
