// agpt bench ops: each op at the model's real sizes, timed on the chosen backend, reported as a fraction of
// two limits measured in the same run: the copy bandwidth (a device-to-device or memcpy copy) for the
// memory-bound ops, and the dense matmul rate (a large square GEMM in the same dtype) for the GEMMs.
// Ratios, not seconds, are what to compare between runs and machines.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "runtime/log.h"
#include "runtime/memory.h"
#include "runtime/timer.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"

typedef struct BenchCtx {
    Engine *e;
    DType dt;
    Arena arena;
    int iters;
} BenchCtx;

// A tensor of random values (normal * 0.5) in the bench dtype on the engine's device.
static Status bench_tensor(BenchCtx *b, DType dt, int ndim, const int64_t *shape, Tensor *out) {
    AGPT_TRY(arena_tensor(&b->arena, dt, ndim, shape, out));
    int64_t n = tensor_numel(out);
    float *host = NULL;
    AGPT_TRY(mem_host_alloc((size_t)n * 4, (void **)&host));
    rng_fill_normal(&b->e->rng, host, (size_t)n, 0.0f, 0.5f);
    if (dt == DT_I32)
        for (int64_t i = 0; i < n; i++) ((int32_t *)host)[i] = (int32_t)(i % 4096);
    void *staged = host;
    uint16_t *half = NULL;
    if (dt == DT_F16 || dt == DT_BF16) {
        Status s = mem_host_alloc((size_t)n * 2, (void **)&half);
        if (s != AGPT_OK) { mem_host_free(host); return s; }
        convert_host(half, dt, host, DT_F32, (size_t)n);
        staged = half;
    }
    Tensor src = *out;
    src.data = staged;
    src.device = DEV_CPU;
    Status s = tensor_copy(out, &src);
    mem_host_free(host);
    mem_host_free(half);
    return s;
}

// Times `fn` over b->iters calls after one warm-up; seconds per call.
typedef Status (*BenchFn)(BenchCtx *b, void *args);
static Status time_op(BenchCtx *b, BenchFn fn, void *args, double *seconds) {
    AGPT_TRY(fn(b, args));
    AGPT_TRY(engine_synchronize(b->e));
    double t0 = timer_now_s();
    for (int i = 0; i < b->iters; i++) AGPT_TRY(fn(b, args));
    AGPT_TRY(engine_synchronize(b->e));
    *seconds = (timer_now_s() - t0) / b->iters;
    return AGPT_OK;
}

typedef struct OpArgs {
    const char *name;
    int kind;
    Tensor x, y, z, w, bias, mean, rstd, pos;
    double bytes, flops;  // per call
} OpArgs;

enum { K_COPY, K_MATMUL, K_LINEAR, K_ADD, K_LAYERNORM, K_RMSNORM, K_GELU, K_SWIGLU, K_SOFTMAX, K_ATTENTION,
       K_ROPE, K_ATTENTION_CAUSAL };

static Status run_op(BenchCtx *b, void *p) {
    OpArgs *a = p;
    Engine *e = b->e;
    switch (a->kind) {
    case K_COPY: return tensor_copy(&a->y, &a->x);
    case K_MATMUL: return op_matmul(e, &a->z, &a->x, &a->w, NULL, false, false, 1.0f, 0.0f);
    case K_LINEAR: return op_linear(e, &a->z, &a->x, &a->w, a->bias.data ? &a->bias : NULL);
    case K_ADD: return op_add(e, &a->z, &a->x, &a->y);
    case K_LAYERNORM: return op_layernorm(e, &a->z, &a->mean, &a->rstd, &a->x, &a->w, &a->bias, 1e-6f);
    case K_RMSNORM: return op_rmsnorm(e, &a->z, &a->rstd, &a->x, &a->w, 1e-6f);
    case K_GELU: return op_gelu(e, &a->z, &a->x);
    case K_SWIGLU: return op_swiglu(e, &a->z, &a->x, &a->y);
    case K_SOFTMAX: return op_softmax(e, &a->z, &a->x, 1.0f);
    case K_ATTENTION: return op_attention(e, &a->z, &a->x, &a->y, &a->w, false, 0.1118f);
    case K_ROPE: return op_rope(e, &a->z, &a->x, &a->pos, 10000.0f);
    case K_ATTENTION_CAUSAL:  // scale 1/sqrt(D) for the two causal head dims, 64 (CLIP text) and 128 (LLaMA)
        return op_attention(e, &a->z, &a->x, &a->y, &a->w, true, a->x.shape[3] == 64 ? 0.125f : 0.08838834764f);
    }
    return AGPT_FAIL(AGPT_ERR_ARG, "unknown bench op");
}

typedef struct Result {
    char name[64];
    double seconds, gbps, tflops, fraction;
    const char *limit;
} Result;

static void usage(void) {
    printf("usage: agpt bench ops [--device cpu|cuda] [--dtype f32|f16|bf16] [--iters N] [--quick] [--json FILE]\n"
           "  Times each op at AnomalyGPT's sizes (ViT-H width 1280, 257 tokens; LLaMA-7B width 4096, MLP 11008)\n"
           "  and prints GB/s or TFLOP/s with the fraction of the copy bandwidth or matmul rate measured in the\n"
           "  same run. --quick uses smaller sizes (for CI and CPUs). Default: cuda + bf16 when a GPU exists.\n"
           "Also: agpt bench vit | llama | detect (end-to-end inspections/s, random weights) | train (the training\n"
           "step on a model file) | comm (all-reduce bandwidth under mpirun); each takes --help.\n");
}

int cmd_bench_vit(int argc, char **argv);
int cmd_bench_llama(int argc, char **argv);
int cmd_bench_detect(int argc, char **argv);
int cmd_bench_train(int argc, char **argv);
int cmd_bench_comm(int argc, char **argv);

int cmd_bench(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "vit") == 0) return cmd_bench_vit(argc - 1, argv + 1);
    if (argc >= 2 && strcmp(argv[1], "llama") == 0) return cmd_bench_llama(argc - 1, argv + 1);
    if (argc >= 2 && strcmp(argv[1], "detect") == 0) return cmd_bench_detect(argc - 1, argv + 1);
    if (argc >= 2 && strcmp(argv[1], "train") == 0) return cmd_bench_train(argc - 1, argv + 1);
    if (argc >= 2 && strcmp(argv[1], "comm") == 0) return cmd_bench_comm(argc - 1, argv + 1);
    if (argc < 2 || strcmp(argv[1], "ops") != 0) {
        if (argc >= 2 && strcmp(argv[1], "--help") == 0) { usage(); return 0; }
        fprintf(stderr, "agpt bench: 'agpt bench ops' or 'agpt bench vit'\n");
        usage();
        return 2;
    }
    Device dev = cuda_device_count() > 0 ? DEV_CUDA : DEV_CPU;
    int dtype_arg = -1, iters = 0, quick = 0;
    const char *json_path = NULL;
    for (int i = 2; i < argc; i++) {
        const char *v;
        if (strcmp(argv[i], "--device") == 0) {
            if (!(v = cli_value(argc, argv, &i, "bench"))) return 2;
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) { fprintf(stderr, "agpt bench: --device cpu|cuda\n"); return 2; }
            dev = strcmp(v, "cuda") == 0 ? DEV_CUDA : DEV_CPU;
        } else if (strcmp(argv[i], "--dtype") == 0) {
            if (!(v = cli_value(argc, argv, &i, "bench"))) return 2;
            dtype_arg = dtype_from_name(v);
            if (dtype_arg < 0 || !dtype_is_float((DType)dtype_arg)) {
                fprintf(stderr, "agpt bench: --dtype must be f32, f16 or bf16\n");
                return 2;
            }
        } else if (strcmp(argv[i], "--iters") == 0) {
            if (!(v = cli_value(argc, argv, &i, "bench"))) return 2;
            long long n;
            if (cli_parse_int("bench", "--iters", v, 1, 1000000, &n)) return 2;
            iters = (int)n;
        } else if (strcmp(argv[i], "--json") == 0) {
            if (!(json_path = cli_value(argc, argv, &i, "bench"))) return 2;
        } else if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else if (strcmp(argv[i], "--help") == 0) {
            usage();
            return 0;
        } else {
            fprintf(stderr, "agpt bench: unknown option '%s'\n", argv[i]);
            return 2;
        }
    }
    DType dt = dtype_arg >= 0 ? (DType)dtype_arg : (dev == DEV_CUDA ? DT_BF16 : DT_F32);
    if (dev == DEV_CPU && dt != DT_F32) {
        fprintf(stderr, "agpt bench: the CPU backend computes in f32; use --dtype f32\n");
        return 2;
    }
    if (!iters) iters = dev == DEV_CUDA ? 50 : 3;

    Engine eng;
    Status s = engine_create(&eng, dev, 0, 0, 1234);
    if (s != AGPT_OK) return cli_report("bench", s);
    BenchCtx b = {.e = &eng, .dt = dt, .iters = iters};
    size_t arena_bytes = dev == DEV_CUDA ? ((size_t)6 << 30) : (quick ? ((size_t)512 << 20) : ((size_t)3 << 30));
    s = arena_init(&b.arena, dev, arena_bytes);
    if (s != AGPT_OK) { engine_destroy(&eng); return cli_report("bench", s); }

    // Model sizes: ViT-H tokens (B images x 257) and LLaMA-7B prefill rows. --quick shrinks the row counts.
    int64_t vit_rows = quick ? 257 : (dev == DEV_CUDA ? 64 * 257 : 4 * 257);
    int64_t llm_rows = quick ? 64 : (dev == DEV_CUDA ? 4096 : 512);
    int64_t gemm_n = quick ? 512 : (dev == DEV_CUDA ? 8192 : 2048);
    int64_t copy_elems = quick ? ((int64_t)8 << 20) : ((int64_t)64 << 20);
    size_t es = dtype_size(dt);
    enum { MAX_OPS = 16 };
    OpArgs ops[MAX_OPS];
    int n_ops = 0;
#define SHAPE(...) (int64_t[]){__VA_ARGS__}
#define NEW(dtype, nd, ...) bench_tensor(&b, dtype, nd, SHAPE(__VA_ARGS__), 
    Result results[MAX_OPS];
    int n_results = 0;
    double copy_gbps = 0, gemm_tflops = 0;

    // The two limits first.
    {
        OpArgs *a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "copy (limit)", a->kind = K_COPY;
        if ((s = NEW(dt, 1, copy_elems) &a->x)) || (s = NEW(dt, 1, copy_elems) &a->y))) goto fail;
        a->bytes = 2.0 * (double)copy_elems * (double)es;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "matmul square (limit)", a->kind = K_MATMUL;
        if ((s = NEW(dt, 2, gemm_n, gemm_n) &a->x)) || (s = NEW(dt, 2, gemm_n, gemm_n) &a->w)) ||
            (s = NEW(dt, 2, gemm_n, gemm_n) &a->z)))
            goto fail;
        a->flops = 2.0 * (double)gemm_n * gemm_n * gemm_n;
    }
    // The model's ops.
    {
        OpArgs *a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "linear vit qkv 1280->3840", a->kind = K_LINEAR;
        if ((s = NEW(dt, 2, vit_rows, 1280) &a->x)) || (s = NEW(dt, 2, 3840, 1280) &a->w)) ||
            (s = NEW(dt, 1, 3840) &a->bias)) || (s = NEW(dt, 2, vit_rows, 3840) &a->z)))
            goto fail;
        a->flops = 2.0 * vit_rows * 1280 * 3840;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "linear llama mlp 4096->11008", a->kind = K_LINEAR;
        if ((s = NEW(dt, 2, llm_rows, 4096) &a->x)) || (s = NEW(dt, 2, 11008, 4096) &a->w)) ||
            (s = NEW(dt, 2, llm_rows, 11008) &a->z)))
            goto fail;
        a->flops = 2.0 * llm_rows * 4096 * 11008;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "add vit residual", a->kind = K_ADD;
        if ((s = NEW(dt, 2, vit_rows, 1280) &a->x)) || (s = NEW(dt, 2, vit_rows, 1280) &a->y)) ||
            (s = NEW(dt, 2, vit_rows, 1280) &a->z)))
            goto fail;
        a->bytes = 3.0 * vit_rows * 1280 * es;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "layernorm vit 1280", a->kind = K_LAYERNORM;
        if ((s = NEW(dt, 2, vit_rows, 1280) &a->x)) || (s = NEW(dt, 2, vit_rows, 1280) &a->z)) ||
            (s = NEW(dt, 1, 1280) &a->w)) || (s = NEW(dt, 1, 1280) &a->bias)) ||
            (s = NEW(DT_F32, 1, vit_rows) &a->mean)) || (s = NEW(DT_F32, 1, vit_rows) &a->rstd)))
            goto fail;
        a->bytes = 2.0 * vit_rows * 1280 * es;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "rmsnorm llama 4096", a->kind = K_RMSNORM;
        if ((s = NEW(dt, 2, llm_rows, 4096) &a->x)) || (s = NEW(dt, 2, llm_rows, 4096) &a->z)) ||
            (s = NEW(dt, 1, 4096) &a->w)) || (s = NEW(DT_F32, 1, llm_rows) &a->rstd)))
            goto fail;
        a->bytes = 2.0 * llm_rows * 4096 * es;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "gelu vit mlp 5120", a->kind = K_GELU;
        if ((s = NEW(dt, 2, vit_rows, 5120) &a->x)) || (s = NEW(dt, 2, vit_rows, 5120) &a->z))) goto fail;
        a->bytes = 2.0 * vit_rows * 5120 * es;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "swiglu llama 11008", a->kind = K_SWIGLU;
        if ((s = NEW(dt, 2, llm_rows, 11008) &a->x)) || (s = NEW(dt, 2, llm_rows, 11008) &a->y)) ||
            (s = NEW(dt, 2, llm_rows, 11008) &a->z)))
            goto fail;
        a->bytes = 3.0 * llm_rows * 11008 * es;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        int64_t srows = (vit_rows / 257) * 16 * 257;  // one score row per image, head and query
        a->name = "softmax vit scores 257", a->kind = K_SOFTMAX;
        if ((s = NEW(dt, 2, srows, 257) &a->x)) || (s = NEW(dt, 2, srows, 257) &a->z))) goto fail;
        a->bytes = 2.0 * srows * 257 * es;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        int64_t images = vit_rows / 257;
        a->name = "attention vit 257x16x80", a->kind = K_ATTENTION;
        if ((s = NEW(dt, 4, images, 257, 16, 80) &a->x)) || (s = NEW(dt, 4, images, 257, 16, 80) &a->y)) ||
            (s = NEW(dt, 4, images, 257, 16, 80) &a->w)) || (s = NEW(dt, 4, images, 257, 16, 80) &a->z)))
            goto fail;
        a->flops = 4.0 * images * 16 * 257.0 * 257.0 * 80;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "rope llama 32x128", a->kind = K_ROPE;
        if ((s = NEW(dt, 4, 1, llm_rows, 32, 128) &a->x)) || (s = NEW(dt, 4, 1, llm_rows, 32, 128) &a->z)) ||
            (s = NEW(DT_I32, 2, 1, llm_rows) &a->pos)))
            goto fail;
        a->bytes = 2.0 * llm_rows * 4096 * es;
        // Causal attention: CLIP text (77 tokens, 16 heads of 64, one sequence per ViT image), LLaMA prefill
        // (4 sequences of llm_rows / 4 tokens, 32 heads of 128) and a LLaMA decode step over an llm_rows cache
        // (memory-bound: reported as the bytes of K and V read). FLOPs count only the visible pairs.
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "attention text 77x16x64 causal", a->kind = K_ATTENTION_CAUSAL;
        if ((s = NEW(dt, 4, images, 77, 16, 64) &a->x)) || (s = NEW(dt, 4, images, 77, 16, 64) &a->y)) ||
            (s = NEW(dt, 4, images, 77, 16, 64) &a->w)) || (s = NEW(dt, 4, images, 77, 16, 64) &a->z)))
            goto fail;
        a->flops = 4.0 * images * 16 * (77.0 * 78.0 / 2) * 64;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        int64_t pre_t = llm_rows / 4;
        a->name = "attention llama prefill causal", a->kind = K_ATTENTION_CAUSAL;
        if ((s = NEW(dt, 4, 4, pre_t, 32, 128) &a->x)) || (s = NEW(dt, 4, 4, pre_t, 32, 128) &a->y)) ||
            (s = NEW(dt, 4, 4, pre_t, 32, 128) &a->w)) || (s = NEW(dt, 4, 4, pre_t, 32, 128) &a->z)))
            goto fail;
        a->flops = 4.0 * 4 * 32 * ((double)pre_t * (pre_t + 1) / 2) * 128;
        a = &ops[n_ops++];
        memset(a, 0, sizeof *a);
        a->name = "attention llama decode 1xcache", a->kind = K_ATTENTION_CAUSAL;
        if ((s = NEW(dt, 4, 1, 1, 32, 128) &a->x)) || (s = NEW(dt, 4, 1, llm_rows, 32, 128) &a->y)) ||
            (s = NEW(dt, 4, 1, llm_rows, 32, 128) &a->w)) || (s = NEW(dt, 4, 1, 1, 32, 128) &a->z)))
            goto fail;
        a->bytes = 2.0 * llm_rows * 4096 * es;
    }
#undef NEW
#undef SHAPE

    printf("agpt bench ops: device %s, dtype %s, %d iterations%s\n", device_name(dev), dtype_name(dt), iters,
           quick ? ", quick sizes" : "");
    for (int i = 0; i < n_ops; i++) {
        OpArgs *a = &ops[i];
        double sec = 0;
        if ((s = time_op(&b, run_op, a, &sec)) != AGPT_OK) goto fail;
        Result *r = &results[n_results++];
        memset(r, 0, sizeof *r);
        snprintf(r->name, sizeof r->name, "%s", a->name);
        r->seconds = sec;
        if (a->flops > 0) {
            r->tflops = a->flops / sec / 1e12;
            if (a->kind == K_MATMUL && gemm_tflops == 0) gemm_tflops = r->tflops;
            r->fraction = r->tflops / gemm_tflops;
            r->limit = "matmul";
        } else {
            r->gbps = a->bytes / sec / 1e9;
            if (a->kind == K_COPY && copy_gbps == 0) copy_gbps = r->gbps;
            r->fraction = r->gbps / copy_gbps;
            r->limit = "copy";
        }
    }

    printf("%-32s %12s %10s %10s %9s\n", "op", "time (us)", "GB/s", "TFLOP/s", "fraction");
    for (int i = 0; i < n_results; i++) {
        Result *r = &results[i];
        char gb[32] = "-", tf[32] = "-";
        if (r->tflops > 0) snprintf(tf, sizeof tf, "%.3f", r->tflops);
        else snprintf(gb, sizeof gb, "%.1f", r->gbps);
        printf("%-32s %12.1f %10s %10s %9.2f of %s\n", r->name, r->seconds * 1e6, gb, tf, r->fraction, r->limit);
    }
    if (json_path) {
        FILE *f = fopen(json_path, "w");
        if (!f) {
            s = AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", json_path);
            goto fail;
        }
        char gpu[256] = "";
        size_t mem = 0;
        if (dev == DEV_CUDA) cuda_device_info(0, gpu, sizeof gpu, &mem);
        fprintf(f, "{\n  \"device\": \"%s\", \"gpu\": \"%s\", \"dtype\": \"%s\", \"iters\": %d, \"quick\": %s,\n",
                device_name(dev), gpu, dtype_name(dt), iters, quick ? "true" : "false");
        fprintf(f, "  \"copy_gbps\": %.3f, \"matmul_tflops\": %.3f,\n  \"ops\": [\n", copy_gbps, gemm_tflops);
        for (int i = 0; i < n_results; i++) {
            Result *r = &results[i];
            fprintf(f, "    {\"name\": \"%s\", \"us\": %.3f, \"gbps\": %.3f, \"tflops\": %.4f, \"fraction\": %.4f, "
                    "\"of\": \"%s\"}%s\n", r->name, r->seconds * 1e6, r->gbps, r->tflops, r->fraction, r->limit,
                    i + 1 < n_results ? "," : "");
        }
        fprintf(f, "  ]\n}\n");
        fclose(f);
        printf("wrote %s\n", json_path);
    }
    arena_free(&b.arena);
    engine_destroy(&eng);
    return finish_stdout("bench", 0);
fail:
    arena_free(&b.arena);
    engine_destroy(&eng);
    return cli_report("bench", s);
}
