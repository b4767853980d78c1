#include "train/run_state.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "runtime/safetensors.h"

uint64_t run_config_hash(const char *text) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) h = (h ^ *p) * 0x100000001b3ull;
    return h;
}

int run_progress_rng(RunProgress *p, const char *name) {
    for (int i = 0; i < p->n_rngs; i++)
        if (strcmp(p->rng_names[i], name) == 0) return i;
    if (p->n_rngs >= RUN_MAX_RNGS || strlen(name) >= RUN_NAME_MAX) return -1;
    snprintf(p->rng_names[p->n_rngs], RUN_NAME_MAX, "%s", name);
    memset(&p->rngs[p->n_rngs], 0, sizeof(Rng));
    return p->n_rngs++;
}

static uint32_t crc_of(const void *data, size_t n);

// The progress as one canonical line, whose CRC-32 ("run.check") guards the metadata fields that no parser would
// catch when flipped (an RNG's name).
static void progress_text(const RunProgress *p, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "step=%" PRId64 ";epoch=%" PRId64 ";position=%" PRId64, p->step, p->epoch,
                                p->position);
    for (int r = 0; r < p->n_rngs && n < cap; r++) {
        const uint64_t *w = p->rngs[r].s;
        n += (size_t)snprintf(buf + n, cap - n, ";%s=%016" PRIx64 "%016" PRIx64 "%016" PRIx64 "%016" PRIx64,
                              p->rng_names[r], w[0], w[1], w[2], w[3]);
    }
}

static uint32_t crc_of(const void *data, size_t n) {
    // zlib's crc32 takes a uInt length: feed it in pieces.
    uLong crc = crc32(0L, Z_NULL, 0);
    const unsigned char *p = data;
    while (n > 0) {
        uInt piece = n > (1u << 30) ? (1u << 30) : (uInt)n;
        crc = crc32(crc, p, piece);
        p += piece, n -= piece;
    }
    return (uint32_t)crc;
}

// Growing list of owned strings for the metadata pairs.
typedef struct Meta {
    char **kv;
    int n, cap;  // strings (2 per pair)
} Meta;

static Status meta_add(Meta *m, const char *key, const char *value) {
    if (m->n + 2 > m->cap) {
        int cap = m->cap ? 2 * m->cap : 64;
        char **kv = realloc(m->kv, (size_t)cap * sizeof *kv);
        if (!kv) return AGPT_FAIL(AGPT_ERR_OOM, "run_state: no memory for metadata");
        m->kv = kv, m->cap = cap;
    }
    m->kv[m->n] = strdup(key);
    m->kv[m->n + 1] = strdup(value);
    m->n += 2;
    if (!m->kv[m->n - 2] || !m->kv[m->n - 1]) return AGPT_FAIL(AGPT_ERR_OOM, "run_state: no memory for metadata");
    return AGPT_OK;
}

static void meta_free(Meta *m) {
    for (int i = 0; i < m->n; i++) free(m->kv[i]);
    free(m->kv);
}

static Status check_param(const RunParam *p) {
    AGPT_CHECK_ARG(p->name && p->name[0], "run_state: a parameter without a name");
    const Tensor *t[3] = {&p->master, &p->m, &p->v};
    for (int j = 0; j < 3; j++) {
        AGPT_CHECK_ARG(t[j]->data && t[j]->dtype == DT_F32 && t[j]->device == DEV_CPU,
                       "run_state: %s: master and moments must be f32 CPU tensors", p->name);
        AGPT_CHECK_ARG(tensor_same_shape(t[j], &p->master), "run_state: %s: moments differ in shape from the master",
                       p->name);
    }
    return AGPT_OK;
}

static Status write_delta(const char *dir, const RunProgress *pr, const RunParam *params, int n) {
    char path[4096], step[32];
    snprintf(path, sizeof path, "%s/delta.safetensors", dir);
    snprintf(step, sizeof step, "%" PRId64, pr->step);
    StEntry *e = calloc((size_t)n, sizeof *e);
    if (!e) return AGPT_FAIL(AGPT_ERR_OOM, "run_state: no memory for %d entries", n);
    for (int i = 0; i < n; i++) e[i] = (StEntry){.name = params[i].name, .tensor = params[i].master};
    const char *kv[] = {"agpt.train.step", step};
    Status s = st_write(path, e, n, kv, 1);
    free(e);
    return s;
}

Status run_state_save(const char *dir, const RunProgress *pr, const char *config_text, const RunParam *params,
                      int n) {
    AGPT_CHECK_ARG(dir && config_text && n >= 1 && pr->n_rngs >= 0 && pr->n_rngs <= RUN_MAX_RNGS,
                   "run_state_save: a folder, the options text and at least one parameter are needed");
    for (int i = 0; i < n; i++) AGPT_TRY(check_param(&params[i]));
    AGPT_TRY(write_delta(dir, pr, params, n));

    char path[4096], key[512], val[128];
    snprintf(path, sizeof path, "%s/state.safetensors", dir);
    StEntry *e = calloc((size_t)3 * n, sizeof *e);
    char **names = calloc((size_t)3 * n, sizeof *names);
    Meta meta = {0};
    Status s = e && names ? AGPT_OK : AGPT_FAIL(AGPT_ERR_OOM, "run_state: no memory for %d entries", 3 * n);
    static const char *const prefix[3] = {"master.", "adam_m.", "adam_v."};
    for (int i = 0; s == AGPT_OK && i < n; i++)
        for (int j = 0; s == AGPT_OK && j < 3; j++) {
            const Tensor *t = j == 0 ? &params[i].master : j == 1 ? &params[i].m : &params[i].v;
            size_t len = strlen(prefix[j]) + strlen(params[i].name) + 1;
            char *name = names[3 * i + j] = malloc(len);
            if (!name) { s = AGPT_FAIL(AGPT_ERR_OOM, "run_state: no memory"); break; }
            snprintf(name, len, "%s%s", prefix[j], params[i].name);
            e[3 * i + j] = (StEntry){.name = name, .tensor = *t};
            snprintf(key, sizeof key, "crc.%s", name);
            snprintf(val, sizeof val, "%08" PRIx32, crc_of(t->data, tensor_nbytes(t)));
            s = meta_add(&meta, key, val);
        }
    if (s == AGPT_OK) {
        snprintf(val, sizeof val, "%" PRId64, pr->step), s = meta_add(&meta, "run.step", val);
        snprintf(val, sizeof val, "%" PRId64, pr->epoch), s = s ? s : meta_add(&meta, "run.epoch", val);
        snprintf(val, sizeof val, "%" PRId64, pr->position), s = s ? s : meta_add(&meta, "run.position", val);
        snprintf(val, sizeof val, "%d", pr->n_rngs), s = s ? s : meta_add(&meta, "run.rngs", val);
        snprintf(val, sizeof val, "%016" PRIx64, run_config_hash(config_text));
        s = s ? s : meta_add(&meta, "run.config_hash", val);
        s = s ? s : meta_add(&meta, "run.config", config_text);
    }
    for (int r = 0; s == AGPT_OK && r < pr->n_rngs; r++) {
        const uint64_t *w = pr->rngs[r].s;
        snprintf(key, sizeof key, "run.rng.%d.name", r), s = meta_add(&meta, key, pr->rng_names[r]);
        snprintf(key, sizeof key, "run.rng.%d.state", r);
        snprintf(val, sizeof val, "%016" PRIx64 "%016" PRIx64 "%016" PRIx64 "%016" PRIx64, w[0], w[1], w[2], w[3]);
        s = s ? s : meta_add(&meta, key, val);
    }
    if (s == AGPT_OK) {
        char text[RUN_MAX_RNGS * (RUN_NAME_MAX + 72) + 128];
        progress_text(pr, text, sizeof text);
        snprintf(val, sizeof val, "%08" PRIx32, crc_of(text, strlen(text)));
        s = meta_add(&meta, "run.check", val);
    }
    if (s == AGPT_OK) s = st_write(path, e, 3 * n, (const char *const *)meta.kv, meta.n / 2);
    for (int i = 0; names && i < 3 * n; i++) free(names[i]);
    free(names), free(e), meta_free(&meta);
    return s == AGPT_OK ? AGPT_OK : agpt_add_context(s, "saving the training state in %s", dir);
}

// Strict parse of a metadata integer or hex field.
static Status meta_i64(const SafeTensors *st, const char *path, const char *key, int64_t lo, int64_t *out) {
    const char *v = st_metadata(st, key);
    if (!v) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no '%s' in the metadata: not an agpt training state", path, key);
    char *end = NULL;
    long long x = strtoll(v, &end, 10);
    if (end == v || *end || x < lo)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: metadata '%s' = '%s' is not an integer >= %lld", path, key, v,
                         (long long)lo);
    *out = x;
    return AGPT_OK;
}

static bool parse_hex64(const char *s, uint64_t *out) {
    if (strlen(s) < 16) return false;
    uint64_t x = 0;
    for (int i = 0; i < 16; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return false;
        x = x << 4 | (uint64_t)d;
    }
    *out = x;
    return true;
}

// The first line where two options texts differ, for the refusal message.
static void first_difference(const char *a, const char *b, char *out, size_t cap) {
    while (*a || *b) {
        size_t la = strcspn(a, "\n"), lb = strcspn(b, "\n");
        if (la != lb || memcmp(a, b, la) != 0) {
            snprintf(out, cap, "the state has '%.*s', this run '%.*s'", (int)(la > 200 ? 200 : la), a,
                     (int)(lb > 200 ? 200 : lb), b);
            return;
        }
        a += la + (a[la] == '\n'), b += lb + (b[lb] == '\n');
    }
    snprintf(out, cap, "the texts are equal but the hash differs (a corrupt state)");
}

static Status load_checked(const SafeTensors *st, const char *path, const char *config_text, const RunParam *params,
                           int n, RunProgress *pr) {
    const char *hash = st_metadata(st, "run.config_hash"), *saved = st_metadata(st, "run.config");
    uint64_t h = 0;
    if (!hash || !saved || !parse_hex64(hash, &h))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no valid run.config_hash / run.config: not an agpt training state", path);
    if (h != run_config_hash(saved))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: run.config does not match its hash: the file is corrupt", path);
    if (h != run_config_hash(config_text)) {
        char diff[512];
        first_difference(saved, config_text, diff, sizeof diff);
        return AGPT_FAIL(AGPT_ERR_ARG, "%s was made with other options (%s); resume with the same options, or "
                         "start a new run in another folder", path, diff);
    }
    RunProgress p = {0};
    int64_t rngs = 0;
    AGPT_TRY(meta_i64(st, path, "run.step", 0, &p.step));
    AGPT_TRY(meta_i64(st, path, "run.epoch", 0, &p.epoch));
    AGPT_TRY(meta_i64(st, path, "run.position", 0, &p.position));
    AGPT_TRY(meta_i64(st, path, "run.rngs", 0, &rngs));
    if (rngs > RUN_MAX_RNGS) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: %lld RNG states (at most %d)", path,
                                              (long long)rngs, RUN_MAX_RNGS);
    char key[640];
    for (int r = 0; r < rngs; r++) {
        snprintf(key, sizeof key, "run.rng.%d.name", r);
        const char *name = st_metadata(st, key);
        snprintf(key, sizeof key, "run.rng.%d.state", r);
        const char *state = st_metadata(st, key);
        if (!name || strlen(name) >= RUN_NAME_MAX || !state || strlen(state) != 64)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: RNG state %d is missing or malformed", path, r);
        snprintf(p.rng_names[r], RUN_NAME_MAX, "%s", name);
        for (int w = 0; w < 4; w++)
            if (!parse_hex64(state + 16 * w, &p.rngs[r].s[w]))
                return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: RNG state %d is not hex", path, r);
    }
    p.n_rngs = (int)rngs;
    char text[RUN_MAX_RNGS * (RUN_NAME_MAX + 72) + 128], want[16];
    progress_text(&p, text, sizeof text);
    snprintf(want, sizeof want, "%08" PRIx32, crc_of(text, strlen(text)));
    const char *check = st_metadata(st, "run.check");
    if (!check || strcmp(check, want) != 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the step, data position and RNG states fail their check (run.check): "
                         "the file is corrupt", path);
    if (st_count(st) != 3 * n)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s holds %d tensors, this run trains %d (x3: master, adam_m, adam_v): "
                         "the trained parts differ", path, st_count(st), n);

    // Verify everything before writing anything into the caller's tensors.
    static const char *const prefix[3] = {"master.", "adam_m.", "adam_v."};
    char name[512], desc[2][128];
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < n; i++)
            for (int j = 0; j < 3; j++) {
                const Tensor *dst = j == 0 ? &params[i].master : j == 1 ? &params[i].m : &params[i].v;
                snprintf(name, sizeof name, "%s%s", prefix[j], params[i].name);
                int idx = st_find(st, name);
                if (idx < 0) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no tensor '%s' (this run trains '%s')", path, name,
                                              params[i].name);
                Tensor t;
                AGPT_TRY(st_get(st, name, &t));
                if (pass == 1) {
                    memcpy(dst->data, t.data, tensor_nbytes(&t));
                    continue;
                }
                if (t.dtype != DT_F32 || !tensor_same_shape(&t, dst))
                    return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: '%s' is %s, this run has %s", path, name,
                                     tensor_describe(&t, desc[0], sizeof desc[0]),
                                     tensor_describe(dst, desc[1], sizeof desc[1]));
                snprintf(key, sizeof key, "crc.%s", name);
                const char *crc = st_metadata(st, key);
                char got[16];
                snprintf(got, sizeof got, "%08" PRIx32, crc_of(t.data, tensor_nbytes(&t)));
                if (!crc || strcmp(crc, got) != 0)
                    return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: '%s' fails its CRC-32 (stored %s, computed %s): the file is "
                                     "corrupt; resume from an older copy or start again", path, name,
                                     crc ? crc : "none", got);
            }
    *pr = p;
    return AGPT_OK;
}

Status run_state_load(const char *dir, const char *config_text, const RunParam *params, int n, RunProgress *pr) {
    AGPT_CHECK_ARG(dir && config_text && n >= 1, "run_state_load: a folder, the options text and parameters are needed");
    for (int i = 0; i < n; i++) AGPT_TRY(check_param(&params[i]));
    char path[4096];
    snprintf(path, sizeof path, "%s/state.safetensors", dir);
    SafeTensors *st = NULL;
    Status s = st_open(path, &st);
    if (s != AGPT_OK) return agpt_add_context(s, "resuming from %s", dir);
    s = load_checked(st, path, config_text, params, n, pr);
    st_close(st);
    return s;
}
