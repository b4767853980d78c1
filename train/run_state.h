// Checkpoints of a training run (DESIGN.md "Training and scale"): two files in the run's folder, each written
// atomically by st_write ("<path>.tmp", fsync, rename, fsync of the folder), so a crash at any moment leaves
// either the previous file or the new one, never a broken one:
//   <dir>/delta.safetensors   the trained tensors under their model-file names ("image_decoder.fc.0.weight",
//                             "prompt_learner.meta_net.0.weight", LoRA factors...), f32: `agpt detect --weights
//                             <dir>/delta.safetensors` layers it over the base model (model/weights.h).
//   <dir>/state.safetensors   what --resume needs: for every trained tensor its fp32 master ("master.<name>")
//                             and AdamW moments ("adam_m.<name>", "adam_v.<name>"); in the metadata the step,
//                             the data position (epoch, position in this rank's share), every named RNG state,
//                             the run's options text and its hash, and a CRC-32 of every tensor's bytes.
// The delta is written first: a crash between the two leaves a state one checkpoint older, and the resume redoes
// those steps deterministically. The resume reads only the state (its masters are the parameters).
#pragma once
#include <stdint.h>

#include "runtime/rng.h"
#include "runtime/tensor.h"

#define RUN_MAX_RNGS 8
#define RUN_NAME_MAX 64

// One trained tensor: views of host f32 buffers (the trainer copies device state down before saving).
typedef struct RunParam {
    const char *name;   // model-file name
    Tensor master;      // [any] f32 CPU: the fp32 weights
    Tensor m, v;        // [same] f32 CPU: AdamW moments
} RunParam;

typedef struct RunProgress {
    int64_t step;       // optimizer updates done
    int64_t epoch;      // epoch of the next sample
    int64_t position;   // index of the next sample in this rank's share of that epoch's order
    int n_rngs;
    char rng_names[RUN_MAX_RNGS][RUN_NAME_MAX];
    Rng rngs[RUN_MAX_RNGS];
} RunProgress;

// A stable 64-bit hash (FNV-1a) of the options text: the canonical "key=value\n" lines of every option that
// changes the run's numbers.
uint64_t run_config_hash(const char *config_text);

// Writes <dir>/delta.safetensors then <dir>/state.safetensors (dir must exist).
Status run_state_save(const char *dir, const RunProgress *progress, const char *config_text, const RunParam *params,
                      int n_params);

// Reads <dir>/state.safetensors into the caller's tensors (every param's master, m, v: shapes must match, CRCs must
// hold) and *progress. A state made with other options (config hash differs from config_text's) is refused with the
// first differing line; a missing, truncated or corrupt file, a missing or extra tensor, is a clear error. Nothing is
// written into the params unless every check passed.
Status run_state_load(const char *dir, const char *config_text, const RunParam *params, int n_params,
                      RunProgress *progress);

// The index of RNG `name` in progress (adding it when absent and there is room), or -1 when full.
int run_progress_rng(RunProgress *progress, const char *name);
