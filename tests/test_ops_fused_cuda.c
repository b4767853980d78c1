// GPU tests of the fusions (ctest label `gpu`), all through kernels/ops.h and model/ with a CUDA engine beside a
// CPU engine as the reference:
// - op_add_layernorm / op_add_rmsnorm against the CPU ops on the same (dtype-rounded) inputs: f32 within 1e-5,
//   f16/bf16 within 1e-2 (the sum exactly); the CPU norm runs on the sum rounded to the dtype, as the GPU's is. Widths of the
//   models (ViT-H 1280, LLaMA 4096), odd widths (the unaligned scalar path), and rows too wide for the register
//   cache (the read-back path); sum in place over a and over b; outputs poisoned with NaN first. The fused GPU
//   op is also compared with the unfused GPU pair (op_add then the norm) at 1e-6.
// - op_upsample_softmax2_axpy against the CPU op (itself bit-equal to the three unfused ops there).
// - CUDA-graph decode steps (KvCache.use_graph) against plain decode steps on a small random LLaMA: the same
//   logits, bit for bit, over several steps and two batch sizes.
// Without a CUDA device (or in a build without CUDA) it prints why and exits 77 (skipped).
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/engine.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "model/weights.h"
#include "runtime/dtype.h"
#include "runtime/memory.h"
#include "runtime/rng.h"
#include "runtime/status.h"
#include "test.h"

static Engine gpu, cpu;
static Rng rng;

// ---- small helpers: device tensors from host floats, and back ------------------------------------------------

static void round_to(float *x, int64_t n, DType dt) {
    if (dt == DT_F16)
        for (int64_t i = 0; i < n; i++) x[i] = f16_to_f32(f32_to_f16(x[i]));
    else if (dt == DT_BF16)
        for (int64_t i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

static float *randn(int64_t n, DType dt, float mean, float std) {
    float *x = malloc((size_t)n * sizeof(float));
    rng_fill_normal(&rng, x, (size_t)n, mean, std);
    round_to(x, n, dt);
    return x;
}

// A device tensor [rows, C] (or [C] when rows == 0) of dt holding host floats, or NaN bytes when h is NULL;
// `off` elements into its allocation (1 misaligns it). *base gets the allocation to free.
static Tensor dev_tensor(const float *h, int64_t rows, int64_t C, DType dt, int off, void **base) {
    int64_t n = rows ? rows * C : C;
    size_t es = dtype_size(dt);
    *base = NULL;
    if (mem_device_alloc((size_t)(n + off) * es, base) != AGPT_OK) {
        printf("FAIL device allocation: %s\n", agpt_last_error());
        exit(1);
    }
    void *raw = malloc((size_t)n * es);
    if (h) convert_host(raw, dt, h, DT_F32, (size_t)n);
    else memset(raw, 0xFF, (size_t)n * es);
    void *p = (char *)*base + (size_t)off * es;
    Tensor t = rows ? tensor_2d(p, dt, DEV_CUDA, rows, C) : tensor_1d(p, dt, DEV_CUDA, C);
    Tensor src = t;
    src.device = DEV_CPU;
    src.data = raw;
    if (tensor_copy(&t, &src) != AGPT_OK || cuda_synchronize() != AGPT_OK) {
        printf("FAIL upload: %s\n", agpt_last_error());
        exit(1);
    }
    free(raw);
    return t;
}

static float *to_host(const Tensor *t) {
    int64_t n = tensor_numel(t);
    float *out = malloc((size_t)n * sizeof(float));
    void *raw = malloc((size_t)n * dtype_size(t->dtype));
    Tensor h = *t;
    h.device = DEV_CPU;
    h.data = raw;
    if (engine_synchronize(&gpu) != AGPT_OK || tensor_copy(&h, t) != AGPT_OK) {
        for (int64_t i = 0; i < n; i++) out[i] = NAN;
    } else {
        convert_host(out, DT_F32, raw, t->dtype, (size_t)n);
    }
    free(raw);
    return out;
}

static void expect_close(const char *name, const char *what, const float *out, const float *ref, int64_t n,
                         double tol) {
    double e = rel_l2(out, ref, n);
    bool ok = e <= tol;
    printf("%s %-56s %-5s rel_l2 %.3g (tol %.0e)\n", ok ? "PASS" : "FAIL", name, what, e, tol);
    if (ok) test_passed++;
    else test_failed++;
}

// ---- residual add + norm ---------------------------------------------------------------------------------

// alias: 0 sum is its own buffer, 1 sum = a, 2 sum = b.
static void test_add_norm(DType dt, bool rms, int64_t rows, int64_t C, int off, int alias) {
    char name[160];
    snprintf(name, sizeof name, "add_%s %s %lldx%lld%s%s", rms ? "rmsnorm" : "layernorm", dtype_name(dt),
             (long long)rows, (long long)C, off ? " misaligned" : "", alias == 1 ? " sum=a" : alias == 2 ? " sum=b" : "");
    const int64_t n = rows * C;
    const float eps = rms ? 1e-6f : 1e-5f;
    float *a = randn(n, dt, 2.0f, 1.0f), *b = randn(n, dt, 0.0f, 0.5f);
    float *w = randn(C, dt, 1.0f, 0.2f), *bias = randn(C, dt, 0.0f, 0.1f);

    // The CPU reference: op_add, the sum rounded to dt (what the GPU stores and normalises), then the norm.
    float *r_sum = malloc((size_t)n * sizeof(float)), *r_out = malloc((size_t)n * sizeof(float));
    float *r_mean = malloc((size_t)rows * sizeof(float)), *r_rstd = malloc((size_t)rows * sizeof(float));
    Tensor ca = tensor_2d(a, DT_F32, DEV_CPU, rows, C), cb = tensor_2d(b, DT_F32, DEV_CPU, rows, C);
    Tensor cs = tensor_2d(r_sum, DT_F32, DEV_CPU, rows, C), co = tensor_2d(r_out, DT_F32, DEV_CPU, rows, C);
    Tensor cw = tensor_1d(w, DT_F32, DEV_CPU, C), cbias = tensor_1d(bias, DT_F32, DEV_CPU, C);
    Tensor cm = tensor_1d(r_mean, DT_F32, DEV_CPU, rows), cr = tensor_1d(r_rstd, DT_F32, DEV_CPU, rows);
    CHECK_OK(op_add(&cpu, &cs, &ca, &cb));
    round_to(r_sum, n, dt);
    if (rms) CHECK_OK(op_rmsnorm(&cpu, &co, &cr, &cs, &cw, eps));
    else CHECK_OK(op_layernorm(&cpu, &co, &cm, &cr, &cs, &cw, &cbias, eps));

    void *bufs[10];
    Tensor ga = dev_tensor(a, rows, C, dt, off, &bufs[0]), gb = dev_tensor(b, rows, C, dt, off, &bufs[1]);
    Tensor gw = dev_tensor(w, 0, C, dt, off, &bufs[2]), gbias = dev_tensor(bias, 0, C, dt, off, &bufs[3]);
    Tensor gs_own = dev_tensor(NULL, rows, C, dt, off, &bufs[4]), go = dev_tensor(NULL, rows, C, dt, off, &bufs[5]);
    Tensor gm = dev_tensor(NULL, 0, rows, DT_F32, 0, &bufs[6]), gr = dev_tensor(NULL, 0, rows, DT_F32, 0, &bufs[7]);
    Tensor *gs = alias == 1 ? &ga : alias == 2 ? &gb : &gs_own;
    Status s = rms ? op_add_rmsnorm(&gpu, gs, &go, &gr, &ga, &gb, &gw, eps)
                   : op_add_layernorm(&gpu, gs, &go, &gm, &gr, &ga, &gb, &gw, &gbias, eps);
    if (s == AGPT_OK) s = engine_synchronize(&gpu);
    CHECK(s == AGPT_OK, "%s: %s", name, agpt_last_error());
    const double tol = dt == DT_F32 ? 1e-5 : 1e-2;
    float *f_sum = to_host(gs), *f_out = to_host(&go), *f_rstd = to_host(&gr), *f_mean = to_host(&gm);
    expect_close(name, "sum", f_sum, r_sum, n, 0.0);  // one rounding of an exact f32 sum: bit-exact
    expect_close(name, "out", f_out, r_out, n, tol);
    expect_close(name, "rstd", f_rstd, r_rstd, rows, tol);
    if (!rms) expect_close(name, "mean", f_mean, r_mean, rows, tol);

    // The unfused GPU pair on fresh copies of the inputs: the fused op must agree closely (same reductions).
    if (alias == 0) {
        Tensor us = dev_tensor(NULL, rows, C, dt, off, &bufs[8]), uo = dev_tensor(NULL, rows, C, dt, off, &bufs[9]);
        s = op_add(&gpu, &us, &ga, &gb);
        if (s == AGPT_OK)
            s = rms ? op_rmsnorm(&gpu, &uo, NULL, &us, &gw, eps) : op_layernorm(&gpu, &uo, NULL, NULL, &us, &gw, &gbias, eps);
        CHECK(s == AGPT_OK, "%s unfused: %s", name, agpt_last_error());
        float *u_out = to_host(&uo);
        // The same reductions in the same order, so normally bit-equal; on f16/bf16 leave room for a one-ulp
        // store difference should the compiler contract the two kernels' arithmetic differently.
        printf("     fused %s the unfused GPU pair bit for bit\n",
               memcmp(f_out, u_out, (size_t)n * sizeof(float)) == 0 ? "matches" : "does not match");
        expect_close(name, "vs unfused GPU", f_out, u_out, n, dt == DT_F32 ? 1e-6 : 1e-3);
        free(u_out);
        mem_device_free(bufs[8]), mem_device_free(bufs[9]);
    }
    for (int i = 0; i < 8; i++) mem_device_free(bufs[i]);
    free(a), free(b), free(w), free(bias), free(r_sum), free(r_out), free(r_mean), free(r_rstd);
    free(f_sum), free(f_out), free(f_rstd), free(f_mean);
}

static void run_add_norm(DType dt) {
    static const int64_t shapes[][2] = {{1, 4096}, {7, 4096}, {257, 1280}, {3, 37}, {2, 3001}, {2, 20000}, {1, 1}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int rms = 0; rms < 2; rms++) test_add_norm(dt, rms, shapes[i][0], shapes[i][1], 0, 0);
    for (int rms = 0; rms < 2; rms++) {
        test_add_norm(dt, rms, 5, 1280, 1, 0);  // misaligned: the scalar path at a model width
        test_add_norm(dt, rms, 4, 4096, 0, 1);  // x = x + branch, as the blocks call it
        test_add_norm(dt, rms, 4, 4096, 0, 2);
    }
}

// ---- upsample + two-class softmax + accumulate ------------------------------------------------------------

static void test_upsample_softmax2(DType dt, int64_t B, int64_t h, int64_t w, int64_t H, int64_t W, float alpha) {
    char name[160];
    snprintf(name, sizeof name, "upsample_softmax2_axpy %s B%lld %lldx%lld->%lldx%lld", dtype_name(dt), (long long)B,
             (long long)h, (long long)w, (long long)H, (long long)W);
    const int64_t nl = B * 2 * h * w, n = B * H * W;
    float *logits = randn(nl, dt, 0.0f, 4.0f), *out0 = randn(n, dt, 0.5f, 0.2f);
    float *ref = malloc((size_t)n * sizeof(float));
    memcpy(ref, out0, (size_t)n * sizeof(float));
    Tensor cl = tensor_4d(logits, DT_F32, DEV_CPU, B, 2, h, w), cr = tensor_3d(ref, DT_F32, DEV_CPU, B, H, W);
    CHECK_OK(op_upsample_softmax2_axpy(&cpu, &cr, &cl, alpha));
    void *bl = NULL, *bo = NULL;
    Tensor gl2 = dev_tensor(logits, B * 2 * h, w, dt, 0, &bl), go2 = dev_tensor(out0, B * H, W, dt, 0, &bo);
    Tensor gl = tensor_4d(gl2.data, dt, DEV_CUDA, B, 2, h, w), go = tensor_3d(go2.data, dt, DEV_CUDA, B, H, W);
    Status s = op_upsample_softmax2_axpy(&gpu, &go, &gl, alpha);
    if (s == AGPT_OK) s = engine_synchronize(&gpu);
    CHECK(s == AGPT_OK, "%s: %s", name, agpt_last_error());
    float *got = to_host(&go);
    // f32: the CPU's arithmetic except expf (a few ulp on the device); f16/bf16: one rounding of the result.
    expect_close(name, "out", got, ref, n, dt == DT_F32 ? 1e-6 : 1e-2);
    free(got), free(logits), free(out0), free(ref);
    mem_device_free(bl), mem_device_free(bo);
}

static void run_upsample_softmax2(DType dt) {
    test_upsample_softmax2(dt, 1, 16, 16, 224, 224, 0.25f);
    test_upsample_softmax2(dt, 3, 16, 16, 224, 224, 0.25f);
    test_upsample_softmax2(dt, 2, 3, 5, 7, 4, 1.0f);
    test_upsample_softmax2(dt, 1, 4, 4, 4, 4, 0.5f);
}

// ---- CUDA-graph decode steps ------------------------------------------------------------------------------

static void test_graph_decode(DType dt, int B) {
    char name[128];
    snprintf(name, sizeof name, "graph decode %s B=%d", dtype_name(dt), B);
    const int C = 256, H = 4, I = 512, L = 3, V = 500, T = 9, steps = 6;
    WeightStore ws;
    Llama m;
    weights_init(&ws, &gpu, dt, NULL, "random llama");
    Status s = llama_init_random(&m, &ws, C, H, I, L, V, 5);
    CHECK(s == AGPT_OK, "%s: llama_init_random: %s", name, agpt_last_error());
    if (s != AGPT_OK) {
        weights_free(&ws);
        return;
    }
    KvCache plain, graph;
    CHECK_OK(kv_cache_create(&plain, &gpu, &m, B, T + steps));
    CHECK_OK(kv_cache_create(&graph, &gpu, &m, B, T + steps));
    graph.use_graph = true;
    float *emb = randn((int64_t)B * T * C, dt, 0.0f, 0.5f);
    void *emb_buf = NULL;
    Tensor e2 = dev_tensor(emb, (int64_t)B * T, C, dt, 0, &emb_buf);
    Tensor embeds = tensor_3d(e2.data, dt, DEV_CUDA, B, T, C);
    Tensor lp = tensor_rows_view(&plain.logits, 0, B), lg = tensor_rows_view(&graph.logits, 0, B);
    CHECK_OK(llama_prefill(&gpu, &m, &plain, &embeds, &lp));
    CHECK_OK(llama_prefill(&gpu, &m, &graph, &embeds, &lg));
    int32_t tokens[8];
    size_t nbytes = (size_t)B * V * sizeof(float);
    for (int step = 0; step < steps; step++) {
        for (int b = 0; b < B; b++) tokens[b] = (int32_t)((step * 37 + b * 101 + 3) % V);
        CHECK_OK(llama_decode_step(&gpu, &m, &plain, tokens, &lp));
        CHECK_OK(llama_decode_step(&gpu, &m, &graph, tokens, &lg));
        float *p = to_host(&lp), *g = to_host(&lg);
        bool same = memcmp(p, g, nbytes) == 0;
        double e = rel_l2(g, p, (int64_t)B * V);
        printf("%s %-56s step %d rel_l2 %.3g%s\n", same ? "PASS" : "FAIL", name, step, e,
               same ? " (bit-identical)" : "");
        CHECK(same, "%s step %d: graph logits differ from the plain step (rel_l2 %.3g)", name, step, e);
        free(p), free(g);
    }
    CHECK(graph.graph_exec != NULL, "%s: no graph was made", name);
    CHECK(graph.pos == plain.pos && graph.pos == T + steps, "%s: cache positions %d and %d, expected %d", name,
          graph.pos, plain.pos, T + steps);
    kv_cache_free(&plain);
    kv_cache_free(&graph);
    mem_device_free(emb_buf);
    free(emb);
    llama_free(&m);
    weights_free(&ws);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (cuda_device_count() == 0) {
        printf("no CUDA device: skipped\n");
        return TEST_SKIP;
    }
    if (engine_create(&gpu, DEV_CUDA, 0, 0, 1234) != AGPT_OK) {
        printf("FAIL engine_create(cuda): %s\n", agpt_last_error());
        return 1;
    }
    if (engine_create(&cpu, DEV_CPU, 0, 0, 1234) != AGPT_OK) {
        printf("FAIL engine_create(cpu): %s\n", agpt_last_error());
        return 1;
    }
    rng_seed(&rng, 20261128);
    run_add_norm(DT_F32);
    run_add_norm(DT_BF16);
    run_add_norm(DT_F16);
    run_upsample_softmax2(DT_F32);
    run_upsample_softmax2(DT_BF16);
    run_upsample_softmax2(DT_F16);
    test_graph_decode(DT_F32, 1);
    test_graph_decode(DT_BF16, 1);
    test_graph_decode(DT_BF16, 3);
    engine_destroy(&cpu);
    engine_destroy(&gpu);
    return test_summary();
}
