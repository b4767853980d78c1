#include "train/loader.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void loader_sample_rng(uint64_t seed, int64_t epoch, int64_t index, Rng *out) {
    rng_seed(out, mix64(mix64(mix64(seed) ^ (uint64_t)epoch) ^ (uint64_t)index ^ 0x5a4d504c45ull));
}

// Fisher-Yates over 0..n-1 from the epoch's own stream; Lemire's multiply-shift draws j in [0, i] without modulo.
static void epoch_permutation(uint64_t seed, int64_t epoch, int64_t n, int64_t *perm) {
    Rng r;
    rng_seed(&r, mix64(mix64(seed) ^ (uint64_t)epoch) ^ 0x7065726dull);
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(((unsigned __int128)rng_u64(&r) * (uint64_t)(i + 1)) >> 64);
        int64_t t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
}

int64_t loader_epoch_length(const LoaderConfig *c) { return c->world > 0 ? c->n_items / c->world : 0; }

int64_t loader_index_at(const LoaderConfig *c, int64_t epoch, int64_t position) {
    int64_t L = loader_epoch_length(c);
    if (position < 0 || position >= L) return -1;
    int64_t *perm = malloc((size_t)c->n_items * sizeof *perm);
    if (!perm) return -1;
    epoch_permutation(c->seed, epoch, c->n_items, perm);
    int64_t index = perm[position * c->world + c->rank];
    free(perm);
    return index;
}

// Slot t % Q holds sample t (t counts samples from the loader's start, across epochs).
typedef struct Slot {
    int64_t seq;            // the sample it holds or is being built for; -1 when free
    bool ready;
    Status status;
    char error[1024];       // the worker's message when status != OK
    int64_t epoch, position, index;
    unsigned char *data;    // [sample_bytes]
} Slot;

struct Loader {
    LoaderConfig cfg;
    int64_t L;                 // samples per epoch for this rank
    pthread_mutex_t mu;
    pthread_cond_t slot_free;  // a worker may claim a new sample
    pthread_cond_t slot_ready; // the consumer's sample may be ready
    Slot *slots;               // [Q]
    int Q;
    int64_t next_claim;        // the next sample a worker takes
    int64_t next_deliver;      // the next sample the consumer takes
    bool stopping;             // stop claiming (an error, loader_stop, or free)
    bool stopped_by_user;
    int64_t perm_epoch;        // the epoch perm[] was drawn for (-1: none)
    int64_t *perm;             // [N]
    pthread_t *workers;        // [threads]
    int n_workers;             // started
};

static void *worker_main(void *arg) {
    Loader *l = arg;
    const LoaderConfig *c = &l->cfg;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        while (!l->stopping && l->next_claim >= l->next_deliver + l->Q) pthread_cond_wait(&l->slot_free, &l->mu);
        if (l->stopping) break;
        int64_t t = l->next_claim++;
        int64_t flat = c->position + t;
        int64_t epoch = c->epoch + flat / l->L, position = flat % l->L;
        // Claims come in order, so epochs only grow: one permutation at a time is enough.
        if (epoch != l->perm_epoch) {
            epoch_permutation(c->seed, epoch, c->n_items, l->perm);
            l->perm_epoch = epoch;
        }
        Slot *s = &l->slots[t % l->Q];
        s->seq = t, s->ready = false;
        s->epoch = epoch, s->position = position, s->index = l->perm[position * c->world + c->rank];
        pthread_mutex_unlock(&l->mu);

        Rng rng;
        loader_sample_rng(c->seed, epoch, s->index, &rng);
        memset(s->data, 0, c->sample_bytes);
        agpt_clear_error();
        Status st = c->make_sample(c->ctx, s->index, &rng, s->data);

        pthread_mutex_lock(&l->mu);
        s->status = st;
        if (st != AGPT_OK) {
            snprintf(s->error, sizeof s->error, "%s", agpt_last_error()[0] ? agpt_last_error() : "(no message)");
            l->stopping = true;  // earlier samples are all claimed already and finish; later ones are not started
            pthread_cond_broadcast(&l->slot_free);
        }
        s->ready = true;
        pthread_cond_broadcast(&l->slot_ready);
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

Status loader_start(const LoaderConfig *cfg, Loader **out) {
    *out = NULL;
    AGPT_CHECK_ARG(cfg->make_sample && cfg->sample_bytes > 0, "loader: a make_sample callback and a sample size are needed");
    AGPT_CHECK_ARG(cfg->threads >= 1 && cfg->threads <= 256, "loader: %d threads (1..256)", cfg->threads);
    AGPT_CHECK_ARG(cfg->world >= 1 && cfg->rank >= 0 && cfg->rank < cfg->world, "loader: rank %d of world %d",
                   cfg->rank, cfg->world);
    AGPT_CHECK_ARG(cfg->n_items >= cfg->world, "loader: %lld items cannot be shared by %d ranks (each needs one)",
                   (long long)cfg->n_items, cfg->world);
    int64_t L = cfg->n_items / cfg->world;
    AGPT_CHECK_ARG(cfg->epoch >= 0 && cfg->position >= 0 && cfg->position <= L,
                   "loader: start at epoch %lld position %lld (an epoch has %lld samples)", (long long)cfg->epoch,
                   (long long)cfg->position, (long long)L);
    int Q = cfg->queue > 0 ? cfg->queue : 2 * cfg->threads;
    AGPT_CHECK_ARG(Q >= cfg->threads && Q <= 4096, "loader: queue of %d slots for %d threads (threads..4096)", Q,
                   cfg->threads);
    Loader *l = calloc(1, sizeof *l);
    if (!l) return AGPT_FAIL(AGPT_ERR_OOM, "loader: no memory");
    l->cfg = *cfg, l->L = L, l->Q = Q, l->perm_epoch = -1;
    l->slots = calloc((size_t)Q, sizeof *l->slots);
    l->perm = malloc((size_t)cfg->n_items * sizeof *l->perm);
    l->workers = calloc((size_t)cfg->threads, sizeof *l->workers);
    bool ok = l->slots && l->perm && l->workers;
    for (int i = 0; ok && i < Q; i++) {
        l->slots[i].seq = -1;
        ok = (l->slots[i].data = malloc(cfg->sample_bytes)) != NULL;
    }
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->slot_free, NULL);
    pthread_cond_init(&l->slot_ready, NULL);
    if (!ok) {
        loader_free(l);
        return AGPT_FAIL(AGPT_ERR_OOM, "loader: no memory for %d slots of %zu bytes and %lld indices", Q,
                         cfg->sample_bytes, (long long)cfg->n_items);
    }
    for (int i = 0; i < cfg->threads; i++) {
        if (pthread_create(&l->workers[i], NULL, worker_main, l) != 0) {
            loader_free(l);
            return AGPT_FAIL(AGPT_ERR_OOM, "loader: could not start worker thread %d", i);
        }
        l->n_workers++;
    }
    *out = l;
    return AGPT_OK;
}

Status loader_next(Loader *l, void *out, int64_t *epoch, int64_t *position, int64_t *index) {
    pthread_mutex_lock(&l->mu);
    Slot *s = &l->slots[l->next_deliver % l->Q];
    // A stop by the user ends the wait; an error stop still delivers every sample claimed before it.
    while (!l->stopped_by_user && !(s->seq == l->next_deliver && s->ready)) {
        if (l->stopping && l->next_deliver >= l->next_claim) break;  // never claimed: nothing will come
        pthread_cond_wait(&l->slot_ready, &l->mu);
    }
    Status st;
    if (l->stopped_by_user || !(s->seq == l->next_deliver && s->ready)) {
        st = AGPT_FAIL(AGPT_ERR_ARG, "loader: stopped before sample %lld", (long long)l->next_deliver);
    } else if (s->status != AGPT_OK) {
        st = AGPT_FAIL(s->status, "loader: dataset item %lld (epoch %lld, position %lld): %s", (long long)s->index,
                       (long long)s->epoch, (long long)s->position, s->error);
    } else {
        memcpy(out, s->data, l->cfg.sample_bytes);
        if (epoch) *epoch = s->epoch;
        if (position) *position = s->position;
        if (index) *index = s->index;
        s->seq = -1;
        l->next_deliver++;
        pthread_cond_broadcast(&l->slot_free);
        st = AGPT_OK;
    }
    pthread_mutex_unlock(&l->mu);
    return st;
}

void loader_stop(Loader *l) {
    if (!l) return;
    pthread_mutex_lock(&l->mu);
    l->stopping = l->stopped_by_user = true;
    pthread_cond_broadcast(&l->slot_free);
    pthread_cond_broadcast(&l->slot_ready);
    pthread_mutex_unlock(&l->mu);
}

void loader_free(Loader *l) {
    if (!l) return;
    loader_stop(l);
    for (int i = 0; i < l->n_workers; i++) pthread_join(l->workers[i], NULL);
    for (int i = 0; l->slots && i < l->Q; i++) free(l->slots[i].data);
    pthread_cond_destroy(&l->slot_ready);
    pthread_cond_destroy(&l->slot_free);
    pthread_mutex_destroy(&l->mu);
    free(l->slots), free(l->perm), free(l->workers), free(l);
}
