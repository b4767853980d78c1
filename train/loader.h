// A deterministic data loader: K worker threads build samples through a callback, into a bounded queue, and the
// consumer receives them in order. Which sample comes when, and every random draw inside a sample, depend only on
// (seed, epoch, index): never on the thread count or on timing.
//
// Order. Epoch e visits the dataset in a Fisher-Yates permutation of 0..N-1 drawn from an RNG seeded by
// (seed, e) (the reference's RandomSampler reshuffles each epoch; its torch draws are not reproduced bit for bit).
// Data parallelism: rank r of `world` takes the positions r, r + world, r + 2 world, ... of that permutation
// (as a DistributedBatchSampler splitting each global batch across ranks), floor(N / world) of them, so every rank
// has the same count and the shares are disjoint.
//
// Randomness. Sample (epoch, position) gets its own Rng seeded by hash(seed, epoch, dataset index): a sample's
// synthetic anomaly is the same whichever thread builds it and whenever.
//
// Errors. A failing make_sample stops the loader: loader_next returns its Status, with the dataset index and
// epoch prepended to its message, after every sample before it was delivered. loader_stop (Ctrl-C, an error in
// the training step) wakes and joins every worker; samples in flight are dropped.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/rng.h"
#include "runtime/status.h"

// Builds dataset item `index` into `out` (sample_bytes bytes, zeroed before the call) using only `rng` and the
// item's data. Called from worker threads, concurrently for different indices: it must be thread-safe.
typedef Status (*LoaderMakeSample)(void *ctx, int64_t index, Rng *rng, void *out);

typedef struct LoaderConfig {
    int64_t n_items;       // N: dataset size
    size_t sample_bytes;   // size of one sample slot
    int threads;           // K worker threads, >= 1
    int queue;             // slots in the queue (>= threads; 2 * threads when 0)
    uint64_t seed;
    int rank, world;       // this rank's share (0, 1 for one process)
    int64_t epoch;         // where to start (a resume)
    int64_t position;      //   position inside this rank's share of that epoch
    LoaderMakeSample make_sample;
    void *ctx;
} LoaderConfig;

typedef struct Loader Loader;

// Samples per epoch for this rank: floor(N / world).
int64_t loader_epoch_length(const LoaderConfig *cfg);
// The dataset index at `position` of rank's share in `epoch` (what the workers build; for tests and logs).
int64_t loader_index_at(const LoaderConfig *cfg, int64_t epoch, int64_t position);
// The RNG a sample gets.
void loader_sample_rng(uint64_t seed, int64_t epoch, int64_t index, Rng *out);

Status loader_start(const LoaderConfig *cfg, Loader **out);
// Blocks until the next sample in order is ready and copies it to `out` (sample_bytes); reports which one it was
// (any pointer may be NULL). Epochs follow one another without end; the caller decides when to stop.
Status loader_next(Loader *l, void *out, int64_t *epoch, int64_t *position, int64_t *index);
// Asks the workers to stop (safe from another thread; not from a signal handler: set a flag there and call it
// from the main loop).
void loader_stop(Loader *l);
// Stops, joins and frees; NULL is fine.
void loader_free(Loader *l);
