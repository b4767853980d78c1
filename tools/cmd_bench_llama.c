// agpt bench llama: the LLaMA-7B language model (random weights at Vicuna-7B's shapes: width 4096, 32 heads, MLP
// 11008, vocab 32001) with its KV cache: prefill tokens/s for a prompt of P tokens, as a fraction of the dense
// matmul rate, and decode tokens/s, as a fraction of the copy bandwidth (bytes of weights and KV read per step
// over the step time), both limits measured in the same run. bench/peers/torch_llama.py runs the same model
// (HF LlamaForCausalLM) in PyTorch. With fewer than 32 layers (the f32 CPU backend cannot hold 7B: 27 GB) the
// 32-layer numbers are scaled by the FLOPs (prefill) and bytes (decode) of the model, and are labelled so.
// --cpu-weights bf16 keeps the CPU's weight matrices in bf16 (13.5 GB for 7B; activations, norms, embeddings and
// the KV cache stay f32), so the whole 32-layer model runs on a machine with 24 GB.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "model/llama.h"
#include "runtime/memory.h"
#include "runtime/timer.h"
#include "tools/bench_limits.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"

enum { C_DIM = 4096, N_HEADS = 32, I_DIM = 11008, VOCAB = 32001, FULL_LAYERS = 32 };


// Work of the model at `layers` layers: prefill FLOPs of B sequences of T tokens (causal attention counted as
// the half it computes, lm_head on the last token only, as llama_prefill does), and the bytes one decode step
// reads at `pos` tokens already in the cache (every weight once, the keys and values of pos + 1 positions).
static double layer_flops(int T) {
    double C = C_DIM, I = I_DIM;
    return 2.0 * T * (4 * C * C + 3 * C * I) + 2.0 * C * T * (T + 1.0);
}
static double prefill_flops(int layers, int B, int T) {
    return B * (layers * layer_flops(T) + 2.0 * VOCAB * C_DIM);
}
// es: bytes per element of the activations, norms and KV cache; ws: of the weight matrices (es, or 2 with
// --cpu-weights bf16).
static double layer_weight_bytes(size_t ws, size_t es) {
    return (4.0 * C_DIM + 3.0 * I_DIM) * C_DIM * ws + 2.0 * C_DIM * es;
}
static double step_bytes(int layers, int B, double mean_kv_positions, size_t ws, size_t es) {
    double weights = layers * layer_weight_bytes(ws, es) + (double)VOCAB * C_DIM * ws + C_DIM * es;  // + lm_head, norm
    double kv = 2.0 * layers * B * mean_kv_positions * C_DIM * es;
    return weights + kv + (double)B * C_DIM * es;  // + the embedding rows
}

int cmd_bench_llama(int argc, char **argv) {
    Device dev = cuda_device_count() > 0 ? DEV_CUDA : DEV_CPU;
    int dtype_arg = -1, iters = 0, layers = 0, threads = 0, prompt = 80, steps = 0, cpu_weights = DT_F32;
    int batches[8] = {0}, n_batches = 0;
    bool graph = false, bf16_act = false;
    const char *json_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *v;
        if (!strcmp(argv[i], "--device")) {
            if (!(v = cli_value(argc, argv, &i, "bench llama"))) return 2;
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) {
                fprintf(stderr, "agpt bench llama: --device cpu|cuda\n");
                return 2;
            }
            dev = strcmp(v, "cuda") ? DEV_CPU : DEV_CUDA;
        } else if (!strcmp(argv[i], "--dtype")) {
            if (!(v = cli_value(argc, argv, &i, "bench llama"))) return 2;
            dtype_arg = dtype_from_name(v);
            if (dtype_arg < 0 || !dtype_is_float((DType)dtype_arg)) {
                fprintf(stderr, "agpt bench llama: --dtype f32|f16|bf16\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--cpu-weights")) {
            if (!(v = cli_value(argc, argv, &i, "bench llama"))) return 2;
            cpu_weights = dtype_from_name(v);
            if (cpu_weights != DT_F32 && cpu_weights != DT_BF16 && cpu_weights != DT_F16) {
                fprintf(stderr, "agpt bench llama: --cpu-weights f32|bf16|f16\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--batch")) {
            if (!(v = cli_value(argc, argv, &i, "bench llama"))) return 2;
            long long n;
            if (n_batches == 8) {
                fprintf(stderr, "agpt bench llama: --batch N (up to 8 times)\n");
                return 2;
            }
            if (cli_parse_int("bench llama", "--batch", v, 1, 4096, &n)) return 2;
            batches[n_batches++] = (int)n;
        } else if (!strcmp(argv[i], "--iters")) {
            if (!(v = cli_value(argc, argv, &i, "bench llama"))) return 2;
            long long n;
            if (cli_parse_int("bench llama", "--iters", v, 1, 1000000, &n)) return 2;
            iters = (int)n;
        } else if (!strcmp(argv[i], "--layers")) {
            if (!(v = cli_value(argc, argv, &i, "bench llama"))) return 2;
            long long n;
            if (cli_parse_int("bench llama", "--layers", v, 1, 256, &n)) return 2;
            layers = (int)n;
        } else if (!strcmp(argv[i], "--prompt")) {
            if (!(v = cli_value(argc, argv, &i, "bench llama"))) return 2;
            long long n;
            if (cli_parse_int("bench llama", "--prompt", v, 1, 4096, &n)) return 2;
            prompt = (int)n;
        } else if (!strcmp(argv[i], "--decode")) {
            if (!(v = cli_value(argc, argv, &i, "bench llama"))) return 2;
            long long n;
            if (cli_parse_int("bench llama", "--decode", v, 1, 4096, &n)) return 2;
            steps = (int)n;
        } else if (!strcmp(argv[i], "--threads")) {
            if (!(v = cli_value(argc, argv, &i, "bench llama"))) return 2;
            long long n;
            if (cli_parse_int("bench llama", "--threads", v, 1, 1024, &n)) return 2;
            threads = (int)n;
        } else if (!strcmp(argv[i], "--json")) {
            if (!(json_path = cli_value(argc, argv, &i, "bench llama"))) return 2;
        } else if (!strcmp(argv[i], "--graph")) {
            graph = true;
        } else if (!strcmp(argv[i], "--cpu-bf16-activations")) {
            bf16_act = true;
        } else {
            printf("usage: agpt bench llama [--device cpu|cuda] [--dtype f32|f16|bf16] [--cpu-weights f32|bf16|f16]\n"
                   "                        [--layers N] [--prompt P] [--decode N] [--batch B]... [--iters N]\n"
                   "                        [--threads N] [--graph] [--cpu-bf16-activations] [--json FILE]\n"
                   "  LLaMA-7B shapes with random weights (width 4096, 32 heads, MLP 11008, vocab 32001), --layers\n"
                   "  of them (32 on CUDA; 4 on the CPU, where 7B in f32 needs 27 GB): prefill of B sequences of P\n"
                   "  tokens (80 by default) in tokens/s and as a fraction of the square-GEMM rate, then --decode\n"
                   "  steps (32 on CUDA, 8 on the CPU) in tokens/s and as a fraction of the copy bandwidth (bytes\n"
                   "  of weights + KV read per step over the step time). Both limits are measured in the same run.\n"
                   "  Below 32 layers the 32-layer figures are scaled by FLOPs / bytes, not measured.\n"
                   "  --cpu-weights bf16|f16: on the CPU, the weight matrices in that dtype (the rest stays f32);\n"
                   "  32 layers by default then (13.5 GB).\n"
                   "  --cpu-bf16-activations: with --cpu-weights bf16, products of >= 16 rows round the activations\n"
                   "  to bf16 and use avx512_bf16 dot products (as AGPT_CPU_BF16_GEMM=1; PyTorch's bf16 numerics).\n"
                   "  --graph: on CUDA, each decode step goes through a CUDA graph (KvCache.use_graph).\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    DType dt = dtype_arg >= 0 ? (DType)dtype_arg : (dev == DEV_CUDA ? DT_BF16 : DT_F32);
    if (dev == DEV_CPU && dt != DT_F32) {
        fprintf(stderr, "agpt bench llama: the CPU backend computes in f32; use --dtype f32\n");
        return 2;
    }
    if (dev != DEV_CPU) cpu_weights = dt;  // CUDA keeps every weight in the compute dtype
    if (!layers) layers = dev == DEV_CUDA || cpu_weights != DT_F32 ? FULL_LAYERS : 4;
    if (!n_batches) batches[0] = 1, n_batches = 1;
    if (!iters) iters = dev == DEV_CUDA ? 5 : 2;
    if (!steps) steps = dev == DEV_CUDA ? 32 : 8;
    size_t es = dtype_size(dt), ws_es = dtype_size((DType)cpu_weights);
    Engine eng;
    Status s = engine_create(&eng, dev, 0, threads, 7);
    if (s) return cli_report("bench llama", s);
    if (bf16_act && dev == DEV_CPU)
        printf("agpt bench llama: --cpu-bf16-activations: %s\n", ops_set_cpu_bf16_activations(true)
               ? "bf16 GEMM on (activations rounded to bf16 for products of >= 16 rows with bf16 weights)"
               : "this CPU has no avx512_bf16, the f32 path runs");
    WeightStore ws;
    weights_init(&ws, &eng, dt, NULL, "random LLaMA-7B");
    if ((s = weights_set_matrix_dtype(&ws, (DType)cpu_weights))) goto fail;
    Llama m;
    memset(&m, 0, sizeof m);
    double t0 = timer_now_s();
    s = llama_init_random(&m, &ws, C_DIM, N_HEADS, I_DIM, layers, VOCAB, 7);
    if (s) goto fail;
    printf("agpt bench llama: LLaMA-7B shapes, %d of %d layers, random weights (%.2f GB, made in %.1f s), %s %s, "
           "weight matrices %s, %d threads\n", layers, FULL_LAYERS, (double)ws.bytes / 1e9, timer_now_s() - t0,
           device_name(dev), dtype_name(dt), dtype_name((DType)cpu_weights), eng.num_threads);
    if (layers != FULL_LAYERS)
        printf("  %d layers measured; the 32-layer columns are scaled by the model's FLOPs (prefill) and bytes "
               "(decode), not measured (32 layers in %s: %.1f GB)\n", layers, dtype_name((DType)cpu_weights),
               (FULL_LAYERS * layer_weight_bytes(ws_es, es) + VOCAB * C_DIM * (double)(ws_es + es)) / 1e9);
    double rate = 0, bw = 0, rbw = 0;
    int64_t bw_elems = dev == DEV_CUDA ? ((int64_t)256 << 20) : ((int64_t)64 << 20);
    if ((s = bench_matmul_rate(&eng, dt, dev == DEV_CUDA ? 8192 : 2048, &rate))) goto fail;
    if ((s = bench_copy_rate(&eng, dt, bw_elems, &bw))) goto fail;
    if ((s = bench_read_rate(&eng, dt, 2 * bw_elems, &rbw))) goto fail;
    printf("limits: matmul %.3f TFLOP/s, copy %.1f GB/s, read %.1f GB/s; prompt %d tokens, %d decode steps, "
           "%d prefill iterations\n", rate, bw, rbw, prompt, steps, iters);
    {  // decode at batch 1 reads every weight once per token: the copy bandwidth over those bytes bounds it
        double sb1 = step_bytes(layers, 1, prompt + 1 + (steps + 1) / 2.0, ws_es, es);
        printf("prediction: a batch-1 decode step reads %.2f GB; at the copy bandwidth that is %.2f tokens/s, at the "
               "read bandwidth %.2f\n", sb1 / 1e9, bw * 1e9 / sb1, rbw * 1e9 / sb1);
    }
    printf("%6s | %12s %10s %9s %12s %12s | %12s %10s %9s %12s %12s\n", "batch", "prefill tok/s", "TFLOP/s", "fraction",
           "ms/layer", "32L tok/s", "decode tok/s", "GB/s", "fraction", "ms/layer", "32L tok/s");
    FILE *jf = json_path ? fopen(json_path, "w") : NULL;
    if (json_path && !jf) { s = AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", json_path); goto fail; }
    if (jf) fprintf(jf, "{\"bench\": \"llama\", \"device\": \"%s\", \"dtype\": \"%s\", \"weight_dtype\": \"%s\", "
                    "\"layers\": %d, "
                    "\"threads\": %d, "
                    "\"prompt\": %d, \"decode_steps\": %d, \"matmul_tflops\": %.4f, \"copy_gbps\": %.3f, \"read_gbps\": %.3f, "
                    "\"weight_gb\": %.3f, \"runs\": [", device_name(dev), dtype_name(dt),
                    dtype_name((DType)cpu_weights), layers, eng.num_threads,
                    prompt, steps, rate, bw, rbw, (double)ws.bytes / 1e9);
    for (int bi = 0; bi < n_batches; bi++) {
        int B = batches[bi];
        KvCache cache;
        Arena arena;
        memset(&arena, 0, sizeof arena);
        int max_seq = prompt + 1 + steps;  // the prompt, one warm-up step, the timed steps
        if ((s = kv_cache_create(&cache, &eng, &m, B, max_seq))) goto fail_json;
        cache.use_graph = graph;
        s = arena_init(&arena, dev, (size_t)B * prompt * C_DIM * es + 4 * AGPT_ALIGN);
        Tensor embeds;
        int32_t *ids = malloc((size_t)B * prompt * sizeof *ids);
        if (!s && !ids) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d token ids", B * prompt);
        for (int i = 0; !s && i < B * prompt; i++) ids[i] = (int32_t)((i * 7919 + 1) % VOCAB);
        if (!s) s = arena_tensor(&arena, dt, 3, (int64_t[]){B, prompt, C_DIM}, &embeds);
        if (!s) s = llama_embed_tokens(&eng, &m, ids, B * prompt, &embeds);
        // prefill: a warm-up, then the timed iterations (each restarts the cache)
        if (!s) s = llama_prefill(&eng, &m, &cache, &embeds, &cache.logits);
        if (!s) s = bench_sync(&eng);
        double tp = timer_now_s();
        for (int it = 0; it < iters && !s; it++) s = llama_prefill(&eng, &m, &cache, &embeds, &cache.logits);
        if (!s) s = bench_sync(&eng);
        double prefill_s = (timer_now_s() - tp) / iters;
        // decode: one warm-up step, then the timed steps; the same tokens each step (no argmax read-back)
        if (!s) s = llama_decode_step(&eng, &m, &cache, ids, &cache.logits);
        if (!s) s = bench_sync(&eng);
        int pos0 = cache.pos;
        double td = timer_now_s();
        for (int it = 0; it < steps && !s; it++) s = llama_decode_step(&eng, &m, &cache, ids, &cache.logits);
        if (!s) s = bench_sync(&eng);
        double step_s = (timer_now_s() - td) / steps;
        free(ids);
        arena_free(&arena);
        kv_cache_free(&cache);
        if (s) goto fail_json;
        // prefill: FLOPs over the time; decode: bytes read per step (KV at the mean cache length) over the time
        double pf = prefill_flops(layers, B, prompt), pf32 = prefill_flops(FULL_LAYERS, B, prompt);
        double p_tps = B * prompt / prefill_s, p_tf = pf / prefill_s / 1e12;
        double p_layer_ms = prefill_s * layer_flops(prompt) * B / pf * 1e3, p_tps32 = p_tps * pf / pf32;
        double mean_kv = pos0 + (steps + 1) / 2.0;  // positions read per step: pos + 1 at pos = pos0 .. pos0+steps-1
        double sb = step_bytes(layers, B, mean_kv, ws_es, es), sb32 = step_bytes(FULL_LAYERS, B, mean_kv, ws_es, es);
        double d_tps = B / step_s, d_gbps = sb / step_s / 1e9;
        double layer_b = layer_weight_bytes(ws_es, es) + 2.0 * B * mean_kv * C_DIM * es;
        double d_layer_ms = step_s * layer_b / sb * 1e3, d_tps32 = d_tps * sb / sb32;
        printf("%6d | %13.1f %10.3f %9.2f %12.2f %12.1f | %12.2f %10.1f %9.2f %12.2f %12.2f\n", B, p_tps, p_tf,
               p_tf / rate, p_layer_ms, p_tps32, d_tps, d_gbps, d_gbps / bw, d_layer_ms, d_tps32);
        if (jf) fprintf(jf, "%s{\"batch\": %d, \"prefill_s\": %.6f, \"prefill_tokens_per_s\": %.3f, "
                        "\"prefill_tflops\": %.4f, \"prefill_fraction\": %.4f, \"prefill_ms_per_layer\": %.4f, "
                        "\"prefill_tokens_per_s_32_layers_scaled\": %.3f, \"decode_step_s\": %.6f, "
                        "\"decode_tokens_per_s\": %.4f, \"decode_gbps\": %.3f, \"decode_fraction\": %.4f, "
                        "\"decode_fraction_of_read\": %.4f, "
                        "\"decode_ms_per_layer\": %.4f, \"decode_tokens_per_s_32_layers_scaled\": %.4f}",
                        bi ? ", " : "", B, prefill_s, p_tps, p_tf, p_tf / rate, p_layer_ms, p_tps32, step_s, d_tps,
                        d_gbps, d_gbps / bw, d_gbps / rbw, d_layer_ms, d_tps32);
    }
    if (layers != FULL_LAYERS) printf("(32L columns: scaled from %d layers, not measured)\n", layers);
    if (jf) {
        fprintf(jf, "]}\n");
        fclose(jf);
    }
    llama_free(&m);
    weights_free(&ws);
    engine_destroy(&eng);
    return finish_stdout("bench llama", 0);
fail_json:
    if (jf) fclose(jf);
fail:
    llama_free(&m);
    weights_free(&ws);
    engine_destroy(&eng);
    return cli_report("bench llama", s);
}
