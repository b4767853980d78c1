// agpt: AnomalyGPT inference, training and tools in one binary.
#include <stdio.h>
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

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt [--log-level error|warn|info|debug] <command> [options]\n"
            "\n"
            "commands:\n"
            "  info [MODEL.safetensors]   build, devices and threads; with a file, its config and tensors\n"
            "  bench ops [options]        time each op at model sizes, as fractions of the measured copy\n"
            "                             bandwidth and matmul rate (agpt bench ops --help)\n"
            "  map --model M [--reference R ...] [--class NAME] -o DIR IMAGE...\n"
            "                             anomaly maps (heatmap PNG, raw float map) and image scores\n"
            "                             (--ask \"QUESTION\" --tokenizer F: also the model's answer)\n"
            "  chat --model M --tokenizer F [--reference R ...] IMAGE\n"
            "                             a conversation about an image in the terminal (agpt chat --help)\n"
            "\n"
            "Later: detect, serve, train, eval, convert (see README.md).\n");
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
    if (strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "agpt: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
