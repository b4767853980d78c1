// The training loop, independent of the model math: the model's forward + backward on one sample plugs in as a
// TrainStepFn over a list of named parameters and their gradients. The loop does what the reference's DeepSpeed
// engine does for one optimizer update (anomalygpt-reference.md 6.2): `accum` micro-steps that accumulate
// gradients, their mean, the global-norm clip, AdamW at the schedule's lr (train/schedule.h); then a log.jsonl
// line, a checkpoint every `ckpt_every` updates and at the end (train/run_state.h), and a clean stop on request.
//
// Determinism. Samples come from train/loader.h (order and randomness fixed by seed, epoch, index); the step
// function must be a pure function of the parameters and the sample. A run resumed from a checkpoint then ends
// bit-identical to one that never stopped: the state holds the parameters, the AdamW moments, the update count
// and the data position.
//
// Devices: the parameters and gradients are f32 tensors, all on the CPU or all on the engine's GPU. On the CPU the
// loop updates them in place. On a GPU the optimizer runs on the CPU, as the reference's DeepSpeed run offloads
// it: the gradients accumulate on the GPU over an update's micro-steps (in f32) and come to host copies once per
// update; AdamW steps the host f32 masters, which go back to the GPU. The moments and checkpoints are host
// memory either way.
#pragma once
#include <signal.h>
#include <stdbool.h>

#include "kernels/engine.h"
#include "runtime/comm.h"
#include "train/loader.h"
#include "train/schedule.h"

typedef struct TrainParam {
    const char *name;  // model-file name: the delta's and the state's key
    Tensor param;      // [any] f32 CPU, updated in place
    Tensor grad;       // [same] f32 CPU, accumulated by the step function, zeroed by the loop
    float lr_scale;    // this tensor's learning rate over the schedule's (0 stands for 1): a part that should
                       // move slower than the rest, such as a ViT whose features the few-shot map compares
} TrainParam;

typedef struct TrainLosses {
    double ce, focal, dice;  // this micro-step's losses (0 where a part has none)
} TrainLosses;

// Forward + backward of one sample: ADDS d loss / d param into every grad and reports the losses.
typedef Status (*TrainStepFn)(void *ctx, const void *sample, TrainLosses *out);

// What on_update gets: the update just done, its mean losses over the micro-steps, the gradient norm before
// clipping, the learning rate it used and its wall time.
typedef struct TrainerUpdate {
    int64_t update, total_updates;
    TrainLosses mean;
    double grad_norm, lr, ms;
    int64_t epoch;                // epoch of the next sample
} TrainerUpdate;

typedef struct TrainerConfig {
    int accum;                    // samples per update (8 in the reference, where a sample is one micro-step)
    int micro_per_sample;         // micro-steps a sample holds (0 or 1: one; 2: an anomaly item and an
                                  // instruction sample): the update's gradient is the sum over accum samples
                                  // of every rank divided by accum * ranks * micro_per_sample
    int64_t total_updates;        // stop after this many updates
    int ckpt_every;               // save every this many updates (0: only at the end and on a stop)
    float beta1, beta2, eps, weight_decay, grad_clip;  // AdamW; clip <= 0 disables
    WarmupDecayConfig schedule;
    const char *dir;              // run folder: log.jsonl, delta.safetensors, state.safetensors
    const char *config_text;      // canonical options text (refuses a resume with other options)
    bool resume;                  // continue from dir/state.safetensors
    LoaderConfig loader;          // epoch and position are overwritten on a resume
    volatile sig_atomic_t *stop;  // set by a SIGINT handler: save at the next update and return (may be NULL)
    // Data parallel (may be NULL: one process): every rank takes its share of the sample order (train/loader.h),
    // the gradients and losses are summed over the ranks before the update, rank 0 alone writes the log and the
    // checkpoints (every rank can resume from them: they hold the shared data position), and a rank that fails
    // stops them all at the end of that update's micro-steps (the others finish theirs first). N ranks of accum
    // K compute what one process of accum N * K computes on the same samples (up to the order of the sums).
    const Comm *comm;
    // ZeRO stage: 0 (off) or 1, which shards AdamW's moments over the ranks (each keeps 1/N of them): the summed
    // gradients are reduce-scattered, each rank clips and steps its shard of the parameters, and the parameters
    // are all-gathered. Checkpoints hold every moment either way (gathered on the save). The result equals plain
    // data parallel up to the order of the gradient norm's sum (within 1e-6; the tests check it).
    int zero;
    // Work on host copies even for CPU parameters, exactly as for parameters on a GPU (the tests run the device
    // path's logic this way on machines without one).
    bool host_copies;
    // Called after every update on rank 0 (may be NULL): the progress bar.
    void (*on_update)(void *ctx, const TrainerUpdate *u);
    void *on_update_ctx;
} TrainerConfig;


typedef struct TrainerResult {
    int64_t updates;              // updates done in total (resumed ones included)
    bool stopped;                 // ended by *stop before total_updates
    double last_loss;             // ce + focal + dice of the last update, averaged over its micro-steps
} TrainerResult;

// The reference's AdamW values (lr comes from the schedule): betas (0.9, 0.95), eps 1e-8, weight decay 0.001,
// clip 1.0, accumulation 8.
TrainerConfig trainer_default_config(void);

Status trainer_run(Engine *e, const TrainerConfig *cfg, TrainParam *params, int n_params, TrainStepFn step,
                   void *ctx, TrainerResult *result);
