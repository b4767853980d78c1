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
// - op_cross_entropy against the CPU op at V = 32001 (LLaMA's vocabulary, the unaligned path) for R = 1..64 rows,
//   an aligned and a misaligned 4096, V = 7 and V = 1, in f32/bf16/f16: loss, d logits, in place, loss only.
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

// ---- fused cross-entropy (op_cross_entropy) ----------------------------------------------------------------

// GPU loss and d logits against the CPU op on the same dtype-rounded logits: logits 4 * normal plus row offsets of
// 0 / +300 / -300, every fifth row ignored (-100), grad_scale 1/counted as the trainer passes it; dlogits poisoned
// with NaN first. Tolerances: the loss (f32 per row, summed in double) 1e-5 relative in every dtype; d logits f32
// 1e-5, f16/bf16 1e-2 (one rounding of the stored gradient). Also: in place (dlogits = logits) and loss-only calls
// match the first call bit for bit, and a second call gives the same loss bit for bit (deterministic).
static void test_cross_entropy(DType dt, int64_t R, int64_t V, int off) {
    char name[160];
    snprintf(name, sizeof name, "cross_entropy %s R%lld V%lld%s", dtype_name(dt), (long long)R, (long long)V,
             off ? " misaligned" : "");
    const int64_t n = R * V;
    float *x = malloc((size_t)n * sizeof(float));
    rng_fill_normal(&rng, x, (size_t)n, 0.0f, 4.0f);
    for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < V; i++) x[r * V + i] += r % 3 == 1 ? 300.0f : r % 3 == 2 ? -300.0f : 0.0f;
    round_to(x, n, dt);
    int32_t *y = malloc((size_t)R * sizeof(int32_t));
    int counted = 0;
    for (int64_t r = 0; r < R; r++) {
        y[r] = r % 5 == 4 ? -100 : (int32_t)((uint32_t)(rng_uniform(&rng) * (float)V) % (uint32_t)V);
        counted += y[r] != -100;
    }
    const float gs = counted ? 1.0f / (float)counted : 0.0f;
    float *ref_d = malloc((size_t)n * sizeof(float));
    double ref_loss = NAN;
    Tensor cx = tensor_2d(x, DT_F32, DEV_CPU, R, V), cd = tensor_2d(ref_d, DT_F32, DEV_CPU, R, V);
    Tensor ty = tensor_1d(y, DT_I32, DEV_CPU, R);
    CHECK_OK(op_cross_entropy(&cpu, &ref_loss, &cd, &cx, &ty, -100, gs));

    void *bx = NULL, *bd = NULL;
    Tensor gx = dev_tensor(x, R, V, dt, off, &bx), gd = dev_tensor(NULL, R, V, dt, off, &bd);
    double loss = NAN, loss2 = NAN, loss3 = NAN;
    Status st = op_cross_entropy(&gpu, &loss, &gd, &gx, &ty, -100, gs);
    CHECK(st == AGPT_OK, "%s: %s", name, agpt_last_error());
    const double lerr = fabs(loss - ref_loss) / fmax(fabs(ref_loss), 1e-30);
    const bool lok = isfinite(loss) && lerr <= 1e-5;
    printf("%s %-56s loss  %.9g vs %.9g rel %.3g (tol 1e-05)\n", lok ? "PASS" : "FAIL", name, loss, ref_loss, lerr);
    if (lok) test_passed++;
    else test_failed++;
    float *got = to_host(&gd);
    expect_close(name, "dlogits", got, ref_d, n, dt == DT_F32 ? 1e-5 : 1e-2);
    bool zeros = true;
    for (int64_t r = 0; r < R; r++)
        if (y[r] == -100)
            for (int64_t i = 0; i < V; i++) zeros &= got[r * V + i] == 0.0f;
    CHECK(zeros, "%s: ignored rows of dlogits are not exactly 0", name);

    // Loss only (no wait on a gradient), twice: bit-identical losses.
    st = op_cross_entropy(&gpu, &loss2, NULL, &gx, &ty, -100, gs);
    if (st == AGPT_OK) st = op_cross_entropy(&gpu, &loss3, NULL, &gx, &ty, -100, gs);
    CHECK(st == AGPT_OK && loss2 == loss && loss3 == loss, "%s: loss-only calls give %.17g, %.17g vs %.17g (%s)",
          name, loss2, loss3, loss, agpt_last_error());
    // Gradient only, in place over the logits: the same gradient bit for bit.
    st = op_cross_entropy(&gpu, NULL, &gx, &gx, &ty, -100, gs);
    CHECK(st == AGPT_OK, "%s in place: %s", name, agpt_last_error());
    float *inplace = to_host(&gx);
    CHECK(memcmp(inplace, got, (size_t)n * sizeof(float)) == 0, "%s: in place differs from out of place", name);
    free(inplace), free(got), free(x), free(y), free(ref_d);
    mem_device_free(bx), mem_device_free(bd);
}

static void run_cross_entropy(DType dt) {
    static const int64_t rows[] = {1, 2, 3, 8, 13, 31, 64};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) test_cross_entropy(dt, rows[i], 32001, 0);
    test_cross_entropy(dt, 5, 4096, 0);  // the 16-byte vector path
    test_cross_entropy(dt, 5, 4096, 1);  // the same width misaligned: scalar path
    test_cross_entropy(dt, 13, 7, 0);
    test_cross_entropy(dt, 4, 1, 0);
}

// ---- decode steps captured once and replayed (device-side positions and lengths) ------------------------------

// op_attention_decode over ragged lengths equals op_attention(causal) of each sequence over its prefix, bit for
// bit (the flash split-K decode for f16/bf16 with D = 64/128, the simple kernel for f32 and D = 48).
static void test_attention_decode_dev(DType dt, int H, int D) {
    char name[96];
    snprintf(name, sizeof name, "attention_decode %s H=%d D=%d", dtype_name(dt), H, D);
    const int B = 4, S = 300, C = H * D;
    const int32_t lengths[4] = {1, 64, 65, 300};
    float *q = randn((int64_t)B * C, dt, 0.0f, 1.0f), *k = randn((int64_t)B * S * C, dt, 0.0f, 1.0f);
    float *v = randn((int64_t)B * S * C, dt, 0.0f, 1.0f);
    void *bq, *bk, *bv, *bo, *br, *bl = NULL;
    Tensor tq = dev_tensor(q, B, C, dt, 0, &bq), tk = dev_tensor(k, (int64_t)B * S, C, dt, 0, &bk);
    Tensor tv = dev_tensor(v, (int64_t)B * S, C, dt, 0, &bv), to = dev_tensor(NULL, B, C, dt, 0, &bo);
    Tensor tr = dev_tensor(NULL, B, C, dt, 0, &br);
    CHECK_OK(mem_device_alloc(sizeof lengths, &bl));
    Tensor hl = tensor_1d((void *)lengths, DT_I32, DEV_CPU, B), tl = tensor_1d(bl, DT_I32, DEV_CUDA, B);
    CHECK_OK(tensor_copy(&tl, &hl));
    const float scale = 1.0f / sqrtf((float)D);
    Tensor q4 = tensor_4d(tq.data, dt, DEV_CUDA, B, 1, H, D), o4 = tensor_4d(to.data, dt, DEV_CUDA, B, 1, H, D);
    Tensor k4 = tensor_4d(tk.data, dt, DEV_CUDA, B, S, H, D), v4 = tensor_4d(tv.data, dt, DEV_CUDA, B, S, H, D);
    CHECK_OK(op_attention_decode(&gpu, &o4, &q4, &k4, &v4, &tl, scale));
    const size_t es = dtype_size(dt), row = (size_t)C * es;
    for (int b = 0; b < B; b++) {
        Tensor qb = tensor_4d((char *)tq.data + b * row, dt, DEV_CUDA, 1, 1, H, D);
        Tensor rb = tensor_4d((char *)tr.data + b * row, dt, DEV_CUDA, 1, 1, H, D);
        Tensor kb = tensor_4d((char *)tk.data + (size_t)b * S * row, dt, DEV_CUDA, 1, lengths[b], H, D);
        Tensor vb = tensor_4d((char *)tv.data + (size_t)b * S * row, dt, DEV_CUDA, 1, lengths[b], H, D);
        CHECK_OK(op_attention(&gpu, &rb, &qb, &kb, &vb, true, scale));
    }
    CHECK_OK(engine_synchronize(&gpu));
    float *o = to_host(&to), *r = to_host(&tr);
    bool same = memcmp(o, r, (size_t)B * C * sizeof(float)) == 0;
    double e = rel_l2(o, r, (int64_t)B * C);
    printf("%s %-56s rel_l2 %.3g%s\n", same ? "PASS" : "FAIL", name, e, same ? " (bit-identical)" : "");
    CHECK(same, "%s: differs from op_attention per sequence (rel_l2 %.3g)", name, e);
    free(o), free(r), free(q), free(k), free(v);
    mem_device_free(bq), mem_device_free(bk), mem_device_free(bv), mem_device_free(bo), mem_device_free(br);
    mem_device_free(bl);
}

// llama_decode_step with use_graph (captured on the first step of a batch size, replayed unchanged after) against
// the plain step on a ragged batch (llama_prefill_varlen): the same logits bit for bit; one graph per batch size,
// kept across steps and across a later prefill of the same batch size.
static void test_graph_replay(DType dt, int C, int H) {
    char name[128];
    snprintf(name, sizeof name, "graph replay %s C=%d H=%d", dtype_name(dt), C, H);
    const int I = 2 * C, L = 2, V = 500, steps = 6, B = 3, maxT = 200;
    WeightStore ws;
    Llama m;
    weights_init(&ws, &gpu, dt, NULL, "random llama");
    Status s = llama_init_random(&m, &ws, C, H, I, L, V, 9);
    CHECK(s == AGPT_OK, "%s: llama_init_random: %s", name, agpt_last_error());
    if (s != AGPT_OK) {
        weights_free(&ws);
        return;
    }
    KvCache plain, graph;
    CHECK_OK(kv_cache_create(&plain, &gpu, &m, B, maxT));
    CHECK_OK(kv_cache_create(&graph, &gpu, &m, B, maxT));
    graph.use_graph = true;
    const int runs[2][3] = {{9, 3, 150}, {40, 1, 7}};  // the second prefill: same batch size, other lengths
    float *emb = randn((int64_t)162 * C, dt, 0.0f, 0.5f);
    void *emb_buf = NULL;
    Tensor e2 = dev_tensor(emb, 162, C, dt, 0, &emb_buf);
    Tensor lp = tensor_rows_view(&plain.logits, 0, B), lg = tensor_rows_view(&graph.logits, 0, B);
    void *first = NULL;
    int32_t tokens[3];
    const int failed_before = test_failed;
    for (int run = 0; run < 2; run++) {
        const int *len = runs[run];
        Tensor embeds = tensor_rows_view(&e2, 0, len[0] + len[1] + len[2]);
        CHECK_OK(llama_prefill_varlen(&gpu, &m, &plain, &embeds, len, B, &lp));
        CHECK_OK(llama_prefill_varlen(&gpu, &m, &graph, &embeds, len, B, &lg));
        for (int step = 0; step < steps; step++) {
            for (int b = 0; b < B; b++) tokens[b] = (int32_t)((step * 37 + b * 101 + run * 11 + 3) % V);
            CHECK_OK(llama_decode_step(&gpu, &m, &plain, tokens, &lp));
            CHECK_OK(llama_decode_step(&gpu, &m, &graph, tokens, &lg));
            if (!first) first = graph.graph_exec;
            float *p = to_host(&lp), *g = to_host(&lg);
            bool same = memcmp(p, g, (size_t)B * V * sizeof(float)) == 0;
            double e = rel_l2(g, p, (int64_t)B * V);
            printf("%s %-56s run %d step %d rel_l2 %.3g%s\n", same ? "PASS" : "FAIL", name, run, step, e,
                   same ? " (bit-identical)" : "");
            CHECK(same, "%s run %d step %d: replayed graph logits differ from the plain step (rel_l2 %.3g)", name,
                  run, step, e);
            CHECK(graph.graph_exec == first && first != NULL, "%s run %d step %d: the graph was captured again", name,
                  run, step);
            free(p), free(g);
        }
        for (int b = 0; b < B; b++)
            CHECK(graph.seq_pos[b] == len[b] + steps && plain.seq_pos[b] == graph.seq_pos[b],
                  "%s: sequence %d at %d, expected %d", name, b, graph.seq_pos[b], len[b] + steps);
    }
    // Logits into a caller's tensor (copied out of the graph's buffer) and another batch size (a second graph).
    void *own_buf = NULL;
    Tensor own = dev_tensor(NULL, 1, V, dt, 0, &own_buf);
    Tensor one = tensor_3d(e2.data, dt, DEV_CUDA, 1, 5, C), lp1 = tensor_rows_view(&plain.logits, 0, 1);
    Tensor own2 = tensor_2d(own.data, dt, DEV_CUDA, 1, V);
    CHECK_OK(llama_prefill(&gpu, &m, &plain, &one, &lp1));
    CHECK_OK(llama_prefill(&gpu, &m, &graph, &one, &own2));
    for (int step = 0; step < 3; step++) {
        tokens[0] = (int32_t)(step * 7 + 1);
        CHECK_OK(llama_decode_step(&gpu, &m, &plain, tokens, &lp1));
        CHECK_OK(llama_decode_step(&gpu, &m, &graph, tokens, &own2));
        float *p = to_host(&lp1), *g = to_host(&own2);
        bool same = memcmp(p, g, (size_t)V * sizeof(float)) == 0;
        CHECK(same, "%s B=1 step %d: logits copied to the caller's tensor differ (rel_l2 %.3g)", name, step,
              rel_l2(g, p, V));
        free(p), free(g);
    }
    CHECK(graph.graph_exec != first && graph.graphs[0] != NULL && graph.graphs[B - 1] == first,
          "%s: expected one graph per batch size", name);
    printf("%s %-56s B=1 into the caller's logits tensor\n", test_failed == failed_before ? "PASS" : "FAIL", name);
    kv_cache_free(&plain);
    kv_cache_free(&graph);
    mem_device_free(emb_buf);
    mem_device_free(own_buf);
    free(emb);
    llama_free(&m);
    weights_free(&ws);
}

static void run_graph_replay(void) {
    test_attention_decode_dev(DT_BF16, 4, 64);
    test_attention_decode_dev(DT_F16, 2, 128);
    test_attention_decode_dev(DT_F32, 4, 64);
    test_attention_decode_dev(DT_BF16, 3, 48);  // not a flash head dim: the simple kernel
    test_graph_replay(DT_BF16, 256, 4);          // D = 64: flash decode
    test_graph_replay(DT_F16, 256, 2);           // D = 128
    test_graph_replay(DT_F32, 256, 4);           // the simple kernel
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
    run_cross_entropy(DT_F32);
    run_cross_entropy(DT_BF16);
    run_cross_entropy(DT_F16);
    run_graph_replay();
    engine_destroy(&cpu);
    engine_destroy(&gpu);
    return test_summary();
}
