// The agpt command: one binary, one function per subcommand. Only this layer prints errors and exits.
#pragma once
#include "model/sampler.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

int cmd_info(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_chat(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_detect(int argc, char **argv);
int cmd_eval(int argc, char **argv);   // tools/cmd_eval.c
int cmd_serve(int argc, char **argv);  // tools/cmd_serve.c
int cmd_synth(int argc, char **argv);  // tools/cmd_synth.c
int cmd_train(int argc, char **argv);  // tools/cmd_train.c

// Prints "agpt <cmd>: error: <message>" for a failed status and returns the process exit code (1).
int cli_report(const char *cmd, Status s);
// Value of "--name VALUE" style options; advances *i. Returns NULL (and reports) when the value is missing.
const char *cli_value(int argc, char **argv, int *i, const char *cmd);

// Options that every model command shares. Each returns 1 when argv[*i] was one of its options (consumed, with
// its value), 0 when it was not, and -1 for a missing or bad value (already reported).
//   engine:   --device cpu|cuda, --dtype f32|f16|bf16, --threads N
//   sampling: --greedy, --temperature T, --top-p P, --top-k K, --seed S
int cli_engine_option(int argc, char **argv, int *i, const char *cmd, Device *device, DType *dtype, int *threads);
// The dtype a model command opens its model in: the one --dtype gave, else on the CPU f32 throughout (a CPU
// bf16/f16 keeps the weight matrices in it, which the user must ask for), else the command's CUDA default.
DType cli_model_dtype(int argc, char **argv, Device device, DType dtype);
int cli_sampling_option(int argc, char **argv, int *i, const char *cmd, SamplerConfig *cfg);

// Strict numbers for every numeric option of every subcommand: the whole text must be a number (no "1.5" for an
// integer, no "4abc", no empty string), finite, and within [lo, hi]. On failure prints
// "agpt <cmd>: <opt> needs <kind> in [lo, hi], not '<text>'" and returns -1 (the caller exits 2, a usage error).
int cli_parse_int(const char *cmd, const char *opt, const char *text, long long lo, long long hi, long long *out);
int cli_parse_double(const char *cmd, const char *opt, const char *text, double lo, double hi, double *out);
