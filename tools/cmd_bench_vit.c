// agpt bench vit: the ImageBind-H vision encoder (random weights, full size) in images/s and as a fraction of the
// dense matmul rate measured in the same run. bench/peers/torch_vit.py runs the same model in PyTorch.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "model/imagebind.h"
#include "runtime/memory.h"
#include "runtime/timer.h"
#include "tools/bench_limits.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"

int cmd_bench_vit(int argc, char **argv) {
    Device dev = cuda_device_count() > 0 ? DEV_CUDA : DEV_CPU;
    int dtype_arg = -1, iters = 0, layers = 32, threads = 0;
    int batches[8] = {0}, n_batches = 0;
    const char *json_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *v;
        if (!strcmp(argv[i], "--device")) {
            if (!(v = cli_value(argc, argv, &i, "bench vit"))) return 2;
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) { fprintf(stderr, "agpt bench vit: --device cpu|cuda\n"); return 2; }
            dev = strcmp(v, "cuda") ? DEV_CPU : DEV_CUDA;
        } else if (!strcmp(argv[i], "--dtype")) {
            if (!(v = cli_value(argc, argv, &i, "bench vit"))) return 2;
            dtype_arg = dtype_from_name(v);
            if (dtype_arg < 0 || !dtype_is_float((DType)dtype_arg)) {
                fprintf(stderr, "agpt bench vit: --dtype f32|f16|bf16\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--batch")) {
            if (!(v = cli_value(argc, argv, &i, "bench vit"))) return 2;
            long long n;
            if (n_batches == 8) { fprintf(stderr, "agpt bench vit: --batch N (up to 8 times)\n"); return 2; }
            if (cli_parse_int("bench vit", "--batch", v, 1, 4096, &n)) return 2;
            batches[n_batches++] = (int)n;
        } else if (!strcmp(argv[i], "--iters")) {
            if (!(v = cli_value(argc, argv, &i, "bench vit"))) return 2;
            long long n;
            if (cli_parse_int("bench vit", "--iters", v, 1, 1000000, &n)) return 2;
            iters = (int)n;
        } else if (!strcmp(argv[i], "--layers")) {
            if (!(v = cli_value(argc, argv, &i, "bench vit"))) return 2;
            long long n;
            if (cli_parse_int("bench vit", "--layers", v, 4, 256, &n)) return 2;
            layers = (int)n;
        } else if (!strcmp(argv[i], "--threads")) {
            if (!(v = cli_value(argc, argv, &i, "bench vit"))) return 2;
            long long n;
            if (cli_parse_int("bench vit", "--threads", v, 1, 1024, &n)) return 2;
            threads = (int)n;
        } else if (!strcmp(argv[i], "--json")) {
            if (!(json_path = cli_value(argc, argv, &i, "bench vit"))) return 2;
        } else {
            printf("usage: agpt bench vit [--device cpu|cuda] [--dtype f32|f16|bf16] [--batch N]... [--iters N]\n"
                   "                      [--layers N] [--threads N] [--json FILE]\n"
                   "  ImageBind-H vision encoder with random weights (width 1280, 16 heads, MLP 5120, 224 px,\n"
                   "  --layers blocks, 32 by default): seconds per image, images/s, and the fraction of the\n"
                   "  square-GEMM rate measured in the same run. On the CPU, --dtype bf16|f16 keeps the block matrices\n"
                   "  in it (f32 arithmetic; AGPT_CPU_BF16_GEMM=1 runs the products in bf16).\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    DType dt = dtype_arg >= 0 ? (DType)dtype_arg : (dev == DEV_CUDA ? DT_BF16 : DT_F32);
    // On the CPU, --dtype bf16|f16 keeps the block matrices in it (f32 arithmetic; with AGPT_CPU_BF16_GEMM=1 the
    // products run in bf16); the activations stay f32.
    DType cpu_matrices = dev == DEV_CPU ? dt : DT_F32;
    if (dev == DEV_CPU) dt = DT_F32;
    if (!n_batches) {
        if (dev == DEV_CUDA) batches[0] = 1, batches[1] = 8, batches[2] = 64, n_batches = 3;
        else batches[0] = 1, n_batches = 1;
    }
    if (!iters) iters = dev == DEV_CUDA ? 10 : 2;
    Engine eng;
    Status s = engine_create(&eng, dev, 0, threads, 7);
    if (s) return cli_report("bench vit", s);
    WeightStore ws;
    weights_init(&ws, &eng, dt, NULL, "random ViT-H");
    VisionEncoder v = {0};
    if (cpu_matrices != DT_F32 && (s = weights_set_matrix_dtype(&ws, cpu_matrices))) goto fail;
    double t0 = timer_now_s();
    s = vision_init_random(&v, &ws, 1280, 16, layers, 5120, 14, 224, 1024, 7);
    if (s) goto fail;
    printf("agpt bench vit: ImageBind-H vision, %d blocks, random weights (%.2f GB, made in %.1f s), %s %s, block "
           "matrices %s, %d threads\n", layers, (double)ws.bytes / 1e9, timer_now_s() - t0, device_name(dev),
           dtype_name(dt), dtype_name(dev == DEV_CPU ? cpu_matrices : dt), eng.num_threads);
    double rate = 0;
    if ((s = bench_matmul_rate(&eng, dt, dev == DEV_CUDA ? 8192 : 2048, &rate))) goto fail;
    double flops = vision_flops_per_image(&v);
    printf("matmul rate (limit): %.3f TFLOP/s; one image is %.1f GFLOP\n", rate, flops / 1e9);
    printf("%8s %14s %12s %12s %10s\n", "batch", "s/image", "images/s", "TFLOP/s", "fraction");
    FILE *jf = json_path ? fopen(json_path, "w") : NULL;
    if (json_path && !jf) { s = AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", json_path); goto fail; }
    if (jf) fprintf(jf, "{\"bench\": \"vit\", \"device\": \"%s\", \"dtype\": \"%s\", \"layers\": %d, \"threads\": %d, "
                    "\"matmul_tflops\": %.4f, \"gflop_per_image\": %.2f, \"runs\": [", device_name(dev),
                    dtype_name(dt), layers, eng.num_threads, rate, flops / 1e9);
    for (int bi = 0; bi < n_batches; bi++) {
        int B = batches[bi];
        Arena arena;
        size_t io = (size_t)B * 3 * 224 * 224 * 4 + (size_t)B * 1024 * 4 + (size_t)4 * B * 257 * 1280 * 4;
        if ((s = arena_init(&arena, dev, vision_arena_bytes(&v, B) + io + 16 * AGPT_ALIGN))) goto fail_json;
        Tensor images, emb, taps[VISION_TAPS];
        s = arena_tensor(&arena, dt, 4, (int64_t[]){B, 3, 224, 224}, &images);
        if (!s) s = arena_tensor(&arena, dt, 2, (int64_t[]){B, 1024}, &emb);
        for (int i = 0; i < VISION_TAPS && !s; i++) s = arena_tensor(&arena, dt, 3, (int64_t[]){B, 257, 1280}, &taps[i]);
        if (!s) s = tensor_zero(&images);
        if (!s) s = vision_forward(&eng, &v, &arena, &images, &emb, taps);  // warm-up
        if (!s) s = engine_synchronize(&eng);
        double t1 = timer_now_s();
        for (int it = 0; it < iters && !s; it++) s = vision_forward(&eng, &v, &arena, &images, &emb, taps);
        if (!s) s = engine_synchronize(&eng);
        double per_image = (timer_now_s() - t1) / iters / B;
        arena_free(&arena);
        if (s) goto fail_json;
        double tf = flops / per_image / 1e12;
        printf("%8d %14.4f %12.2f %12.3f %10.2f\n", B, per_image, 1.0 / per_image, tf, tf / rate);
        if (jf) fprintf(jf, "%s{\"batch\": %d, \"s_per_image\": %.6f, \"images_per_s\": %.3f, \"tflops\": %.4f, "
                        "\"fraction\": %.4f}", bi ? ", " : "", B, per_image, 1.0 / per_image, tf, tf / rate);
    }
    if (jf) {
        fprintf(jf, "]}\n");
        fclose(jf);
    }
    vision_free(&v);
    weights_free(&ws);
    engine_destroy(&eng);
    return finish_stdout("bench vit", 0);
fail_json:
    if (jf) fclose(jf);
fail:
    vision_free(&v);
    weights_free(&ws);
    engine_destroy(&eng);
    return cli_report("bench vit", s);
}
