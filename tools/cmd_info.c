// agpt info: what this build can do here, and what a model file holds.
#include <stdio.h>
#include <string.h>

#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "runtime/threads.h"
#include "tools/cli.h"

static void print_build(void) {
    printf("agpt %s\n", AGPT_VERSION);
    printf("backends: cpu (f32, OpenBLAS, OpenMP %d threads)%s\n", threads_get(),
           cuda_compiled() ? ", cuda (f32/f16/bf16, cuBLASLt)" : "");
    int n = cuda_device_count();
    if (!cuda_compiled()) printf("cuda: not compiled in (no nvcc at build time)\n");
    else if (n == 0) printf("cuda: compiled in, no device visible\n");
    for (int i = 0; i < n; i++) {
        char name[256];
        size_t total = 0;
        if (cuda_device_info(i, name, sizeof name, &total) == AGPT_OK)
            printf("cuda:%d %s, %.1f GiB\n", i, name, (double)total / (1 << 30));
    }
}

static int print_model(const char *path) {
    SafeTensors *st = NULL;
    Status s = st_open(path, &st);
    if (s != AGPT_OK) return cli_report("info", s);
    printf("\nfile: %s\n", path);
    int nm = st_metadata_count(st);
    printf("metadata (%d keys):\n", nm);
    for (int i = 0; i < nm; i++) {
        const char *key = st_metadata_key(st, i), *value = st_metadata(st, key);
        // Embedded tokenizers and large blobs: show their size, not their bytes.
        if (strlen(value) > 120) printf("  %-24s (%zu bytes)\n", key, strlen(value));
        else printf("  %-24s %s\n", key, value);
    }
    int64_t per_dtype[DT_COUNT] = {0};
    int64_t total = 0;
    int n = st_count(st);
    for (int i = 0; i < n; i++) {
        Tensor t;
        if (st_get(st, st_name(st, i), &t) != AGPT_OK) continue;  // unsupported dtype: counted below
        per_dtype[t.dtype] += tensor_numel(&t);
        total += tensor_numel(&t);
    }
    printf("tensors: %d, parameters: %lld (%.3f B)\n", n, (long long)total, (double)total / 1e9);
    for (int d = 0; d < DT_COUNT; d++)
        if (per_dtype[d]) printf("  %-5s %lld\n", dtype_name((DType)d), (long long)per_dtype[d]);
    int shown = n < 40 ? n : 40;
    for (int i = 0; i < shown; i++) {
        Tensor t;
        char desc[96];
        if (st_get(st, st_name(st, i), &t) == AGPT_OK)
            printf("  %-60s %s\n", st_name(st, i), tensor_describe(&t, desc, sizeof desc));
        else
            printf("  %-60s (unsupported: %s)\n", st_name(st, i), agpt_last_error());
    }
    if (shown < n) printf("  ... %d more\n", n - shown);
    st_close(st);
    return 0;
}

int cmd_info(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0) {
            printf("usage: agpt info [MODEL.safetensors]\n");
            return 0;
        }
    }
    print_build();
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '-') {
            fprintf(stderr, "agpt info: unknown option '%s'\n", argv[i]);
            return 2;
        }
        int rc = print_model(argv[i]);
        if (rc) return rc;
    }
    return 0;
}
