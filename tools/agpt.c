// agpt: AnomalyGPT inference, training and tools in one binary.
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"
#include "tools/cli.h"

int cli_report(const char *cmd, Status s) {
    fprintf(stderr, "agpt %s: error (%s): %s\n", cmd, agpt_status_name(s), agpt_last_error());
    return 1;
}

const char *cli_value(int argc, char **argv, int *i, const char *cmd) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "agpt %s: %s needs a value\n", cmd, argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

int cli_parse_int(const char *cmd, const char *opt, const char *text, long long lo, long long hi, long long *out) {
    char *end = NULL;
    errno = 0;
    long long v = text && *text ? strtoll(text, &end, 10) : 0;
    if (!text || !*text || *end != 0 || errno == ERANGE || v < lo || v > hi) {
        fprintf(stderr, "agpt %s: %s needs an integer in [%lld, %lld], not '%s'\n", cmd, opt, lo, hi, text ? text : "");
        return -1;
    }
    *out = v;
    return 0;
}

int cli_parse_double(const char *cmd, const char *opt, const char *text, double lo, double hi, double *out) {
    char *end = NULL;
    errno = 0;
    double v = text && *text ? strtod(text, &end) : NAN;
    if (!text || !*text || *end != 0 || errno == ERANGE || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "agpt %s: %s needs a number in [%g, %g], not '%s'\n", cmd, opt, lo, hi, text ? text : "");
        return -1;
    }
    *out = v;
    return 0;
}

int cli_engine_option(int argc, char **argv, int *i, const char *cmd, Device *device, DType *dtype, int *threads) {
    const char *a = argv[*i], *v;
    if (strcmp(a, "--device") && strcmp(a, "--dtype") && strcmp(a, "--threads")) return 0;
    if (!(v = cli_value(argc, argv, i, cmd))) return -1;
    if (!strcmp(a, "--device")) {
        if (strcmp(v, "cpu") && strcmp(v, "cuda")) {
            fprintf(stderr, "agpt %s: --device cpu|cuda\n", cmd);
            return -1;
        }
        *device = strcmp(v, "cuda") ? DEV_CPU : DEV_CUDA;
    } else if (!strcmp(a, "--dtype")) {
        int d = dtype_from_name(v);
        if (d < 0 || !dtype_is_float((DType)d)) {
            fprintf(stderr, "agpt %s: --dtype f32|f16|bf16\n", cmd);
            return -1;
        }
        *dtype = (DType)d;
    } else {
        long long n;  // 0 (the default) means one per core; an explicit count must be a real one
        if (cli_parse_int(cmd, "--threads", v, 1, 1024, &n)) return -1;
        *threads = (int)n;
    }
    return 1;
}

DType cli_model_dtype(int argc, char **argv, Device device, DType dtype) {
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--dtype") == 0) return dtype;
    return device == DEV_CPU ? DT_F32 : dtype;
}

int cli_sampling_option(int argc, char **argv, int *i, const char *cmd, SamplerConfig *cfg) {
    const char *a = argv[*i], *v;
    if (!strcmp(a, "--greedy")) {
        cfg->greedy = true;
        return 1;
    }
    if (strcmp(a, "--temperature") && strcmp(a, "--top-p") && strcmp(a, "--top-k") && strcmp(a, "--seed")) return 0;
    if (!(v = cli_value(argc, argv, i, cmd))) return -1;
    double x;
    long long k;
    if (!strcmp(a, "--temperature")) {
        // Below 1e-4 the logits / T of a real model overflow float; above 1e4 every token is equally likely.
        if (cli_parse_double(cmd, a, v, 1e-4, 1e4, &x)) return -1;
        cfg->temperature = (float)x;
    } else if (!strcmp(a, "--top-p")) {
        if (cli_parse_double(cmd, a, v, 0, 1, &x)) return -1;
        if (x == 0) {  // the sampler's range is (0, 1]: p = 0 would keep nothing
            fprintf(stderr, "agpt %s: --top-p needs a number in (0, 1], not '%s'\n", cmd, v);
            return -1;
        }
        cfg->top_p = (float)x;
    } else if (!strcmp(a, "--top-k")) {
        if (cli_parse_int(cmd, a, v, 0, 1 << 30, &k)) return -1;  // 0: no top-k cut (model/sampler.h)
        cfg->top_k = (int)k;
    } else {
        // The whole uint64 range: strtoull alone would take "-5" as 2^64 - 5 and "4abc" as 4.
        char *end = NULL;
        errno = 0;
        unsigned long long seed = v[0] >= '0' && v[0] <= '9' ? strtoull(v, &end, 10) : 0;
        if (!end || *end || errno == ERANGE) {
            fprintf(stderr, "agpt %s: --seed needs an integer in [0, 18446744073709551615], not '%s'\n", cmd, v);
            return -1;
        }
        cfg->seed = (uint64_t)seed;
    }
    return 1;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt [--log-level error|warn|info|debug] <command> [options]\n"
            "\n"
            "commands:\n"
            "  detect --model M [--reference R ...] [--class NAME] [--out DIR] IMAGES_OR_FOLDERS...\n"
            "                             the line command: verdict, score, answer and map per image, JSON lines\n"
            "  convert --imagebind F --vicuna DIR --pandagpt F --anomalygpt F -o M.safetensors\n"
            "                             the official checkpoints -> one agpt model file (agpt convert --help)\n"
            "  info [MODEL.safetensors]   build, devices and threads; with a file, its config and tensors\n"
            "  bench ops [options]        time each op at model sizes, as fractions of the measured copy\n"
            "                             bandwidth and matmul rate (agpt bench ops --help)\n"
            "  map --model M [--reference R ...] [--class NAME] -o DIR IMAGE...\n"
            "                             anomaly maps (heatmap PNG, raw float map) and image scores\n"
            "                             (--ask \"QUESTION\" --tokenizer F: also the model's answer)\n"
            "  chat --model M [--reference R ...] IMAGE\n"
            "                             a conversation about an image in the terminal (agpt chat --help)\n"
            "  serve --model M [--port N] [--max-batch N] [--watch DIR [--sort]]\n"
            "                             the inspection server: HTTP API, web page, banks, chat, metrics;\n"
            "                             a hot folder (agpt serve --help)\n"
            "  synth --class NAME --count N --out DIR IMAGES...\n"
            "                             the synthetic anomalies and conversations training sees (agpt synth --help)\n"
            "  train --model M --out RUNDIR (--data DIR [--format mvtec|visa] | --normal DIR --class NAME)\n"
            "                             train the decoder and prompt learner on normal images (agpt train --help)\n"
            "  eval --model M --data DIR --format mvtec|visa|folder --out DIR [--k-shot 0|1|2|4] [--maps-only]\n"
            "                             the official test protocol: accuracy, image/pixel AUROC, AUPRO, F1-max,\n"
            "                             AP per class, reports and plots (agpt eval --help)\n");
}

int main(int argc, char **argv) {
    int i = 1;
    while (i < argc && strncmp(argv[i], "--", 2) == 0) {
        if (strcmp(argv[i], "--log-level") == 0 && i + 1 < argc) {
            int level = log_level_from_name(argv[i + 1]);
            if (level < 0) {
                fprintf(stderr, "agpt: unknown log level '%s'\n", argv[i + 1]);
                return 2;
            }
            log_set_level((LogLevel)level);
            i += 2;
        } else if (strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "agpt: unknown option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (i >= argc) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[i];
    if (strcmp(cmd, "info") == 0) return cmd_info(argc - i, argv + i);
    if (strcmp(cmd, "bench") == 0) return cmd_bench(argc - i, argv + i);
    if (strcmp(cmd, "map") == 0) return cmd_map(argc - i, argv + i);
    if (strcmp(cmd, "chat") == 0) return cmd_chat(argc - i, argv + i);
    if (strcmp(cmd, "convert") == 0) return cmd_convert(argc - i, argv + i);
    if (strcmp(cmd, "detect") == 0) return cmd_detect(argc - i, argv + i);
    if (strcmp(cmd, "serve") == 0) return cmd_serve(argc - i, argv + i);
    if (strcmp(cmd, "synth") == 0) return cmd_synth(argc - i, argv + i);
    if (strcmp(cmd, "train") == 0) return cmd_train(argc - i, argv + i);
    if (strcmp(cmd, "eval") == 0) return cmd_eval(argc - i, argv + i);
    if (strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "agpt: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
