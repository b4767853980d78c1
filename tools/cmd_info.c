// agpt info: what this build can do here, and what a model file holds.
#include <stdio.h>
#include <string.h>

#include "kernels/cpu/isa.h"
#include "model/model_file.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "runtime/threads.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"

static void print_build(void) {
    printf("agpt %s\n", AGPT_VERSION);
    printf("backends: cpu (f32, OpenBLAS, OpenMP %d threads)%s\n", threads_get(),
           cuda_compiled() ? ", cuda (f32/f16/bf16, cuBLASLt)" : "");
    printf("cpu simd: %s (this CPU's best: %s%s; AGPT_CPU_ISA=portable|avx2|avx512 caps it)\n", cpu_isa_name(cpu_isa()),
           cpu_isa_name(cpu_isa_detected()), cpu_has_avx512_bf16() ? ", with avx512_bf16" : "");
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
    // Parameters per part of AnomalyGPT (by key prefix) and per dtype; st_info covers every tensor, the 5-D
    // Conv3d stem included.
    enum { PARTS = 9 };
    static const char *part_names[PARTS] = {"vision encoder", "text encoder", "patch decoder", "prompt learner",
                                            "llama_proj", "LoRA (unmerged)", "language model",
                                            "cached class features", "other"};
    static const char *prefixes[PARTS][4] = {
        {"modality_preprocessors.vision.", "modality_trunks.vision.", "modality_heads.vision.", NULL},
        {"modality_preprocessors.text.", "modality_trunks.text.", "modality_heads.text.",
         "modality_postprocessors.text."},
        {"image_decoder.", NULL},
        {"prompt_learner.", NULL},
        {"llama_proj.", NULL},
        {NULL},  // LoRA: any key with "lora_A" or "lora_B"
        {"model.", "lm_head.", "llama_model.", NULL},
        {"text_features.", NULL},
        {NULL}};
    int64_t per_part[PARTS] = {0}, per_dtype[DT_COUNT] = {0}, total = 0;
    int n = st_count(st), classes = 0;
    for (int i = 0; i < n; i++) {
        StInfo info;
        if (st_info(st, i, &info) != AGPT_OK) continue;
        if (!strcmp(info.name, MODEL_TENSOR_SP_TOKENIZER) || !strcmp(info.name, MODEL_TENSOR_CLIP_BPE)) {
            printf("embedded file: %-36s %zu bytes\n", info.name, info.nbytes);
            continue;  // files, not parameters
        }
        int64_t numel = 1;
        for (int d = 0; d < info.ndim; d++) numel *= info.shape[d];
        total += numel;
        int dt = dtype_from_name(strcmp(info.dtype, "F32") == 0 ? "f32" : strcmp(info.dtype, "F16") == 0 ? "f16"
                                 : strcmp(info.dtype, "BF16") == 0 ? "bf16" : strcmp(info.dtype, "I32") == 0 ? "i32"
                                 : strcmp(info.dtype, "U8") == 0 ? "u8" : "?");
        if (dt >= 0) per_dtype[dt] += numel;
        int part = PARTS - 1;
        if (strstr(info.name, "lora_A") || strstr(info.name, "lora_B")) {
            part = 5;
        } else {
            for (int p = 0; p < PARTS - 1 && part == PARTS - 1; p++)
                for (int k = 0; k < 4 && prefixes[p][k]; k++)
                    if (strncmp(info.name, prefixes[p][k], strlen(prefixes[p][k])) == 0) part = p;
        }
        per_part[part] += numel;
        classes += part == 7;
    }
    printf("tensors: %d, parameters: %lld (%.3f B)\n", n, (long long)total, (double)total / 1e9);
    printf("by part:\n");
    for (int p = 0; p < PARTS; p++)
        if (per_part[p]) printf("  %-24s %lld\n", part_names[p], (long long)per_part[p]);
    printf("by dtype:\n");
    for (int d = 0; d < DT_COUNT; d++)
        if (per_dtype[d]) printf("  %-24s %lld\n", dtype_name((DType)d), (long long)per_dtype[d]);
    if (classes) {
        printf("cached class names (%d):", classes);
        for (int i = 0; i < n; i++)
            if (strncmp(st_name(st, i), "text_features.", 14) == 0) printf(" '%s'", st_name(st, i) + 14);
        printf("\n");
    }
    int shown = n < 40 ? n : 40;
    for (int i = 0; i < shown; i++) {
        StInfo info;
        if (st_info(st, i, &info) != AGPT_OK) continue;
        char shape[128];
        int k = snprintf(shape, sizeof shape, "[");
        for (int d = 0; d < info.ndim && k < (int)sizeof shape - 24; d++)
            k += snprintf(shape + k, sizeof shape - (size_t)k, d ? ",%lld" : "%lld", (long long)info.shape[d]);
        snprintf(shape + k, sizeof shape - (size_t)k, "]");
        printf("  %-60s %s%s\n", info.name, info.dtype, shape);
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
        if (rc) return finish_stdout("info", rc);
    }
    return finish_stdout("info", 0);
}
