// The CPU backend's mixed-dtype matmul: op_matmul / op_linear with a bf16 or f16 weight operand and f32
// activations, bias and output (kernels/cpu/matmul.c: a GEMV that widens the weights in registers for a few rows,
// f32 blocks through BLAS otherwise). Each product is compared with a double loop over the weights as rounded to
// bf16/f16, at odd sizes (tails of every vector width and tile) and LLaMA-7B's real MLP shapes, through the
// kernels of one SIMD level (kernels/cpu/isa.h: `--isa portable|avx2|avx512`; skipped where the CPU lacks it).
// Then the model side (weights_set_matrix_dtype): a LLaMA with bf16 matrices equals, to f32 rounding, the f32
// LLaMA whose matrices hold the same bf16-rounded values, and the LoRA merge works on bf16 matrices.
// Last the opt-in bf16 GEMM (ops_set_cpu_bf16_activations, AGPT_CPU_BF16_GEMM=1; M >= 16, avx512_bf16): the
// activations are rounded to bf16, so its reference is the double loop over bf16-rounded a and w; skipped on a
// CPU without avx512_bf16. With the switch off the old path's results stay the same bit for bit.
// One part per run, each its own ctest: --isa NAME, --part model, --part bf16-gemm, --part env EXPECTED (checks
// that AGPT_CPU_ISA, set by ctest, selected EXPECTED).
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/isa.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "runtime/memory.h"
#include "runtime/rng.h"
#include "runtime/timer.h"
#include "test.h"
#define TEST_NAME_WIDTH 64
#include "test_util.h"

static Rng rng;
static Engine eng;
// The bf16 GEMM is on: references round a to bf16 and are held to 1e-6 (f32 accumulation) instead of 1e-5.
static bool bf16_act;

// a copy of x[n] rounded to bf16 (kept in f32) when bf16_act, else x itself.
static float *act_ref(const float *x, int64_t n) {
    if (!bf16_act) return (float *)x;
    float *r = malloc((size_t)(n ? n : 1) * sizeof *r);
    for (int64_t i = 0; i < n; i++) r[i] = bf16_to_f32(f32_to_bf16(x[i]));
    return r;
}

// n weights drawn normal, stored in dt (bf16 or f16), and the same values widened to f32.
static uint16_t *rounded_weights(DType dt, int64_t n, float scale, float **widened) {
    uint16_t *h = malloc((size_t)(n + 1) * sizeof *h);
    float *f = malloc((size_t)(n + 1) * sizeof *f);
    for (int64_t i = 0; i < n; i++) {
        float x = scale * rng_normal(&rng);
        h[i] = dt == DT_BF16 ? f32_to_bf16(x) : f32_to_f16(x);
        f[i] = dt == DT_BF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
    }
    *widened = f;
    return h;
}

// ref = alpha op(a) op(w) + beta c0 + bias, in double, batch items; w shared unless w_batched.
static void ref_matmul(double *ref, const float *a, const float *w, const float *bias, const float *c0,
                       int64_t batch, int64_t M, int64_t N, int64_t K, bool ta, bool tb, bool w_batched, float alpha,
                       float beta) {
    double *row = malloc((size_t)N * sizeof *row);
    for (int64_t z = 0; z < batch; z++) {
        const float *az = a + z * M * K, *wz = w + (w_batched ? z * K * N : 0);
        for (int64_t i = 0; i < M; i++) {
            if (tb) {  // w [N,K]: a dot per output, contiguous in k
                for (int64_t j = 0; j < N; j++) {
                    double s = 0;
                    for (int64_t k = 0; k < K; k++) s += (double)(ta ? az[k * M + i] : az[i * K + k]) * wz[j * K + k];
                    row[j] = s;
                }
            } else {  // w [K,N]: rows of w scaled and summed, contiguous in j
                for (int64_t j = 0; j < N; j++) row[j] = 0;
                for (int64_t k = 0; k < K; k++) {
                    double av = ta ? az[k * M + i] : az[i * K + k];
                    for (int64_t j = 0; j < N; j++) row[j] += av * wz[k * N + j];
                }
            }
            for (int64_t j = 0; j < N; j++) {
                int64_t o = (z * M + i) * N + j;
                ref[o] = alpha * row[j] + (beta != 0.0f ? beta * (double)c0[o] : 0.0) + (bias ? bias[j] : 0.0);
            }
        }
    }
    free(row);
}

// One product through op_matmul (w of dtype dt) against the double loop; returns the seconds op_matmul took.
static double matmul_case(DType dt, CpuIsa isa, int64_t batch, int64_t M, int64_t N, int64_t K, bool ta,
                          bool tb, bool w_batched, bool with_bias, float alpha, float beta) {
    char name[160];
    snprintf(name, sizeof name, "%s%s %s b%lld M%lld N%lld K%lld ta%d tb%d%s%s%s", bf16_act ? "bf16-act " : "",
             dtype_name(dt), cpu_isa_name(isa), (long long)batch, (long long)M, (long long)N, (long long)K, ta, tb,
             w_batched ? " batched-w" : "", with_bias ? " bias" : "", beta != 0.0f ? " a/b" : "");
    CHECK(cpu_set_isa(isa) == isa, "the %s kernels are available", cpu_isa_name(isa));
    int64_t nw = (w_batched ? batch : 1) * N * K, nc = batch * M * N;
    float *wf = NULL;
    uint16_t *wh = rounded_weights(dt, nw, 1.0f / sqrtf((float)(K > 0 ? K : 1)), &wf);
    float *a = test_randn(&rng, batch * M * K, 1), *bias = with_bias ? test_randn(&rng, N, 1) : NULL;
    float *c = beta != 0.0f ? test_randn(&rng, nc, 1) : test_poisoned(nc);
    float *c0 = malloc((size_t)(nc ? nc : 1) * sizeof *c0);
    memcpy(c0, c, (size_t)nc * sizeof *c);
    double *ref = malloc((size_t)(nc ? nc : 1) * sizeof *ref);
    float *aref = act_ref(a, batch * M * K);
    ref_matmul(ref, aref, wf, bias, c0, batch, M, N, K, ta, tb, w_batched, alpha, beta);
    if (aref != a) free(aref);
    int64_t ar = ta ? K : M, ac = ta ? M : K, wr = tb ? N : K, wc = tb ? K : N;
    Tensor at = batch > 1 ? cpu_f32_3d(a, batch, ar, ac) : cpu_f32_2d(a, ar, ac);
    Tensor wt = w_batched ? tensor_3d(wh, dt, DEV_CPU, batch, wr, wc) : tensor_2d(wh, dt, DEV_CPU, wr, wc);
    Tensor ct = batch > 1 ? cpu_f32_3d(c, batch, M, N) : cpu_f32_2d(c, M, N);
    Tensor bt = cpu_f32_1d(bias, N);
    double t0 = timer_now_s();
    CHECK_OK(op_matmul(&eng, &ct, &at, &wt, with_bias ? &bt : NULL, ta, tb, alpha, beta));
    double seconds = timer_now_s() - t0;
    CHECK_CLOSE_D(name, c, ref, nc, bf16_act ? 1e-6 : 1e-5);
    free(wh), free(wf), free(a), free(bias), free(c), free(c0), free(ref);
    return seconds;
}

// op_linear with a bf16 weight [N,K] and bias on 3-D x equals the double loop (the model's call).
static void linear_case(DType dt, CpuIsa isa, int64_t B, int64_t T, int64_t N, int64_t K) {
    char name[160];
    snprintf(name, sizeof name, "op_linear %s%s %s x[%lld,%lld,%lld] w[%lld,%lld] bias", bf16_act ? "bf16-act " : "",
             dtype_name(dt), cpu_isa_name(isa), (long long)B, (long long)T, (long long)K, (long long)N, (long long)K);
    CHECK(cpu_set_isa(isa) == isa, "the %s kernels are available", cpu_isa_name(isa));
    float *wf = NULL;
    uint16_t *wh = rounded_weights(dt, N * K, 0.1f, &wf);
    float *x = test_randn(&rng, B * T * K, 1), *bias = test_randn(&rng, N, 1), *out = test_poisoned(B * T * N);
    double *ref = malloc((size_t)(B * T * N) * sizeof *ref);
    float *xref = act_ref(x, B * T * K);
    ref_matmul(ref, xref, wf, bias, NULL, 1, B * T, N, K, false, true, false, 1.0f, 0.0f);
    if (xref != x) free(xref);
    Tensor xt = cpu_f32_3d(x, B, T, K), ot = cpu_f32_3d(out, B, T, N), bt = cpu_f32_1d(bias, N);
    Tensor wt = tensor_2d(wh, dt, DEV_CPU, N, K);
    CHECK_OK(op_linear(&eng, &ot, &xt, &wt, &bt));
    CHECK_CLOSE_D(name, out, ref, B * T * N, bf16_act ? 1e-6 : 1e-5);
    free(wh), free(wf), free(x), free(bias), free(out), free(ref);
}

// Everything but the weight operand stays f32 on the CPU, and the backward passes do not take a bf16 weight.
static void test_rejected(void) {
    float *f = calloc(64 * 64, sizeof(float));
    uint16_t *h = calloc(64 * 64, sizeof(uint16_t));
    int32_t *iv = calloc(64 * 64, sizeof(int32_t));
    Tensor a32 = cpu_f32_2d(f, 4, 8), w32 = cpu_f32_2d(f, 16, 8), o32 = cpu_f32_2d(f, 4, 16);
    Tensor a16 = tensor_2d(h, DT_BF16, DEV_CPU, 4, 8), w16 = tensor_2d(h, DT_BF16, DEV_CPU, 16, 8);
    Tensor o16 = tensor_2d(h, DT_BF16, DEV_CPU, 4, 16), bias16 = tensor_1d(h, DT_BF16, DEV_CPU, 16);
    Tensor wi32 = tensor_2d(iv, DT_I32, DEV_CPU, 16, 8), wu8 = tensor_2d(h, DT_U8, DEV_CPU, 16, 8);
    Tensor wbad = tensor_2d(h, DT_BF16, DEV_CPU, 16, 9);
    CHECK_OK(op_linear(&eng, &o32, &a32, &w16, NULL));
    CHECK_OK(op_matmul(&eng, &o32, &a32, &w16, NULL, false, true, 1.0f, 0.0f));
    CHECK_ERR(op_matmul(&eng, &o32, &a16, &w16, NULL, false, true, 1.0f, 0.0f));   // bf16 activations
    CHECK_ERR(op_matmul(&eng, &o32, &a16, &w32, NULL, false, true, 1.0f, 0.0f));   // bf16 a with f32 b
    CHECK_ERR(op_matmul(&eng, &o16, &a32, &w16, NULL, false, true, 1.0f, 0.0f));   // bf16 out
    CHECK_ERR(op_matmul(&eng, &o32, &a32, &w16, &bias16, false, true, 1.0f, 0.0f));  // bf16 bias
    CHECK_ERR(op_matmul(&eng, &o32, &a32, &wi32, NULL, false, true, 1.0f, 0.0f));  // integer weights
    CHECK_ERR(op_matmul(&eng, &o32, &a32, &wu8, NULL, false, true, 1.0f, 0.0f));
    CHECK_ERR(op_matmul(&eng, &o32, &a32, &wbad, NULL, false, true, 1.0f, 0.0f));  // inner dims differ
    CHECK_ERR(op_matmul(&eng, &o32, &a32, &w16, NULL, false, false, 1.0f, 0.0f));  // [16,8] untransposed
    CHECK_ERR(op_linear(&eng, &o32, &a16, &w16, NULL));
    CHECK_ERR(op_linear(&eng, &o16, &a32, &w16, NULL));
    CHECK_ERR(op_linear(&eng, &o32, &a32, &wbad, NULL));
    Tensor dx = cpu_f32_2d(f + 1024, 4, 8), dout = cpu_f32_2d(f + 2048, 4, 16);
    CHECK_ERR(op_linear_backward(&eng, &dx, NULL, NULL, &dout, &a32, &w16));
    CHECK_ERR(op_matmul_backward(&eng, &dx, NULL, &dout, &a32, &w16, false, true, false));
    free(f), free(h), free(iv);
}

// Rounds a weight matrix of an f32 model to bf16 values, in place (kept in f32).
static void round_to_bf16(Tensor *t) {
    float *x = t->data;
    for (int64_t i = 0; i < tensor_numel(t); i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

// Logits of a prefill of T random embeddings then 2 decode steps, [3, V] on the host (caller frees).
static float *llama_logits(const Llama *m, const float *embeds, int T) {
    int64_t V = m->vocab, C = m->block.dim;
    float *out = malloc((size_t)(3 * V) * sizeof(float));
    KvCache c;
    CHECK_OK(kv_cache_create(&c, &eng, m, 1, T + 2));
    Tensor x = tensor_3d((void *)embeds, DT_F32, DEV_CPU, 1, T, C), lg = tensor_2d(out, DT_F32, DEV_CPU, 1, V);
    CHECK_OK(llama_prefill(&eng, m, &c, &x, &lg));
    for (int i = 1; i < 3; i++) {
        int32_t tok = 5 * i;
        lg.data = out + i * V;
        CHECK_OK(llama_decode_step(&eng, m, &c, &tok, &lg));
    }
    kv_cache_free(&c);
    return out;
}

static void test_llama_bf16_matrices(void) {
    const int C = 64, H = 4, I = 172, L = 2, V = 301, T = 7;
    WeightStore w32, w16;
    Llama m32, m16;
    weights_init(&w32, &eng, DT_F32, NULL, "random f32");
    weights_init(&w16, &eng, DT_F32, NULL, "random bf16 matrices");
    CHECK_OK(weights_set_matrix_dtype(&w16, DT_BF16));
    CHECK_ERR(weights_set_matrix_dtype(&w16, DT_I32));
    CHECK_OK(llama_init_random(&m32, &w32, C, H, I, L, V, 11));
    CHECK_OK(llama_init_random(&m16, &w16, C, H, I, L, V, 11));
    CHECK(m16.layer[0].wq.dtype == DT_BF16 && m16.layer[1].w_down.dtype == DT_BF16 && m16.lm_head.dtype == DT_BF16 &&
          m16.embed.dtype == DT_F32 && m16.layer[0].input_norm.dtype == DT_F32 && m16.norm.dtype == DT_F32,
          "bf16 matrices, f32 embeddings and norms");
    CHECK(w16.bytes < w32.bytes * 6 / 10, "bf16 store %zu bytes vs f32 %zu", w16.bytes, w32.bytes);
    for (int l = 0; l < L; l++) {
        LlamaBlockWeights *b = &m32.layer[l];
        Tensor *mats[7] = {&b->wq, &b->wk, &b->wv, &b->wo, &b->w_gate, &b->w_up, &b->w_down};
        for (int i = 0; i < 7; i++) round_to_bf16(mats[i]);
    }
    round_to_bf16(&m32.lm_head);
    float *embeds = test_randn(&rng, (int64_t)T * C, 1);
    float *a = llama_logits(&m32, embeds, T), *b = llama_logits(&m16, embeds, T);
    double *ad = test_to_double(a, 3 * V);
    CHECK_CLOSE_D("llama bf16 matrices = f32 with the same values", b, ad, 3 * V, 1e-5);
    free(a), free(b), free(ad), free(embeds);
    llama_free(&m32), llama_free(&m16), weights_free(&w32), weights_free(&w16);
}

// The golden LoRA model (tests/data/llama) loaded with bf16 matrices: q/k/v/o merged, then rounded once.
static void test_lora_merge_bf16(void) {
    SafeTensors *base = NULL, *lora = NULL;
    if (st_open(AGPT_TEST_DATA "/llama/base.safetensors", &base) != AGPT_OK ||
        st_open(AGPT_TEST_DATA "/llama/lora.safetensors", &lora) != AGPT_OK) {
        printf("  LoRA merge with bf16 matrices: golden files missing, not checked\n");
        if (base) st_close(base);
        return;
    }
    WeightStore wb, w32, w16;
    Llama mb, m32, m16;
    weights_init(&wb, &eng, DT_F32, base, "base");
    weights_init(&w32, &eng, DT_F32, lora, "lora");
    weights_init(&w16, &eng, DT_F32, lora, "lora");
    CHECK_OK(weights_add_file(&w32, base, "base"));
    CHECK_OK(weights_add_file(&w16, base, "base"));
    CHECK_OK(weights_set_matrix_dtype(&w16, DT_BF16));
    CHECK_OK(llama_load(&mb, &wb));
    CHECK_OK(llama_load(&m32, &w32));
    CHECK_OK(llama_load(&m16, &w16));
    CHECK(m16.lora_rank > 0 && m16.lora_rank == m32.lora_rank, "LoRA rank %d (f32: %d)", m16.lora_rank,
          m32.lora_rank);
    for (int l = 0; l < m32.layers && m16.lora_rank > 0; l++) {
        const Tensor *w[3] = {&mb.layer[l].wv, &m32.layer[l].wv, &m16.layer[l].wv};
        int64_t n = tensor_numel(w[0]);
        float *got = malloc((size_t)n * sizeof(float));
        convert_host(got, DT_F32, w[2]->data, DT_BF16, (size_t)n);
        double *merged = test_to_double(w[1]->data, n);
        double err = rel_l2_d(got, merged, n), delta = rel_l2(w[0]->data, w[1]->data, n);
        printf("  layer %d v_proj: bf16 merged vs f32 merged rel_l2 %.3g, LoRA delta %.3g\n", l, err, delta);
        CHECK(err < 4e-3 && err < delta / 4, "layer %d: bf16 merge off by %.3g (delta %.3g)", l, err, delta);
        free(got), free(merged);
    }
    if (m32.layers > 0) llama_free(&m32);
    if (m16.layers > 0) llama_free(&m16);
    if (mb.layers > 0) llama_free(&mb);
    weights_free(&wb), weights_free(&w32), weights_free(&w16);
    st_close(base), st_close(lora);
}

// ---- the opt-in bf16 GEMM ----------------------------------------------------------------------------------


// op_linear-like product c[M,N] = a w[N,K]^T + bias with a bf16 w, the switch as it is; timed (best of 2).
static double time_linear(int64_t M, int64_t N, int64_t K, bool with_bias) {
    float *wf = NULL;
    uint16_t *wh = rounded_weights(DT_BF16, N * K, 0.02f, &wf);
    float *a = test_randn(&rng, M * K, 1), *c = test_poisoned(M * N), *bias = test_randn(&rng, N, 1);
    Tensor at = cpu_f32_2d(a, M, K), wt = tensor_2d(wh, DT_BF16, DEV_CPU, N, K), ct = cpu_f32_2d(c, M, N);
    Tensor bt = cpu_f32_1d(bias, N);
    double best = 1e30;
    for (int i = 0; i < 2; i++) {
        double t0 = timer_now_s();
        CHECK_OK(op_matmul(&eng, &ct, &at, &wt, with_bias ? &bt : NULL, false, true, 1.0f, 0.0f));
        double t = timer_now_s() - t0;
        best = t < best ? t : best;
    }
    free(wh), free(wf), free(a), free(c), free(bias);
    return best;
}

// The same inputs through the switch off, on, off: the two off runs agree bit for bit (the old path is
// untouched), and the on run differs (a different path: activations rounded).
static void test_switch_bits(bool supported) {
    const int64_t M = 64, N = 131, K = 77;
    float *wf = NULL;
    uint16_t *wh = rounded_weights(DT_BF16, N * K, 0.1f, &wf);
    float *a = test_randn(&rng, M * K, 1), *bias = test_randn(&rng, N, 1), *c[3];
    Tensor at = cpu_f32_2d(a, M, K), wt = tensor_2d(wh, DT_BF16, DEV_CPU, N, K), bt = cpu_f32_1d(bias, N);
    for (int i = 0; i < 3; i++) {
        c[i] = test_poisoned(M * N);
        Tensor ct = cpu_f32_2d(c[i], M, N);
        ops_set_cpu_bf16_activations(i == 1);
        CHECK_OK(op_linear(&eng, &ct, &at, &wt, &bt));
    }
    ops_set_cpu_bf16_activations(false);
    size_t bytes = (size_t)(M * N) * sizeof(float);
    CHECK(memcmp(c[0], c[2], bytes) == 0, "switch off: the same bits before and after the bf16 GEMM ran");
    if (supported) CHECK(memcmp(c[0], c[1], bytes) != 0, "switch on: the bf16 GEMM ran (results differ)");
    printf("  switch off / on / off: off runs equal bit for bit%s\n", supported ? ", on run differs" : "");
    free(wh), free(wf), free(a), free(bias), free(c[0]), free(c[1]), free(c[2]);
}

static void test_bf16_gemm(void) {
    const bool supported = cpu_has_avx512_bf16();
    test_switch_bits(supported);
    if (!ops_set_cpu_bf16_activations(true)) {
        ops_set_cpu_bf16_activations(false);
        printf("  bf16 GEMM: this CPU has no avx512_bf16, not checked (the switch falls back to the f32 path)\n");
        CHECK(!supported, "ops_set_cpu_bf16_activations(true) refused on a CPU with avx512_bf16");
        return;
    }
    bf16_act = true;
    // M = 16 (the threshold), 17 and 257 (row tails of the 8-row tiles), odd N and K (column tails of the
    // 48-column panels, odd pairs), every transpose, alpha/beta, bias; K = 1101: blocks of 256 values, 16x16
    // transposes and an odd tail.
    int64_t Ms[4] = {16, 17, 64, 257};
    for (int i = 0; i < 4; i++) {
        matmul_case(DT_BF16, CPU_ISA_AVX512, 1, Ms[i], 37, 53, false, true, false, false, 1.0f, 0.0f);
        matmul_case(DT_BF16, CPU_ISA_AVX512, 1, Ms[i], 131, 77, false, true, false, true, 0.5f, 2.0f);
        matmul_case(DT_BF16, CPU_ISA_AVX512, 1, Ms[i], 29, 45, false, false, false, true, 1.0f, 0.0f);
        matmul_case(DT_BF16, CPU_ISA_AVX512, 1, Ms[i], 29, 45, true, true, false, false, 0.5f, 2.0f);
        matmul_case(DT_BF16, CPU_ISA_AVX512, 1, Ms[i], 29, 45, true, false, false, false, 1.0f, 0.0f);
        matmul_case(DT_BF16, CPU_ISA_AVX512, 1, Ms[i], 97, 1101, false, true, false, true, 1.0f, 0.0f);
        matmul_case(DT_BF16, CPU_ISA_AVX512, 1, Ms[i], 50, 1025, false, false, false, false, 1.0f, 0.5f);
    }
    matmul_case(DT_BF16, CPU_ISA_AVX512, 3, 20, 19, 33, false, true, true, true, 1.0f, 0.0f);  // batched weights
    matmul_case(DT_BF16, CPU_ISA_AVX512, 3, 18, 19, 33, false, false, true, false, 0.5f, 2.0f);
    matmul_case(DT_BF16, CPU_ISA_AVX512, 2, 16, 19, 33, true, true, false, false, 1.0f, 0.0f);
    linear_case(DT_BF16, CPU_ISA_AVX512, 2, 9, 67, 129);  // 18 rows of a 3-D x
    // Not taken, even when on: f16 weights, M < 16, the portable kernels (exact f32 products, 1e-5).
    bf16_act = false;
    matmul_case(DT_F16, CPU_ISA_AVX512, 1, 64, 131, 77, false, true, false, true, 0.5f, 2.0f);
    matmul_case(DT_BF16, CPU_ISA_AVX512, 1, 15, 131, 77, false, true, false, true, 0.5f, 2.0f);
    matmul_case(DT_BF16, CPU_ISA_PORTABLE, 1, 64, 131, 77, false, true, false, true, 0.5f, 2.0f);
    bf16_act = true;
    // Real shapes: LLaMA-7B's attention and MLP at a 64-token prefill, the ViT-H MLP (257 tokens, 1280 -> 5120).
    matmul_case(DT_BF16, CPU_ISA_AVX512, 1, 64, 4096, 4096, false, true, false, true, 1.0f, 0.0f);
    matmul_case(DT_BF16, CPU_ISA_AVX512, 1, 64, 11008, 4096, false, true, false, false, 1.0f, 0.0f);
    matmul_case(DT_BF16, CPU_ISA_AVX512, 1, 64, 131, 11008, false, true, false, false, 1.0f, 0.0f);
    matmul_case(DT_BF16, CPU_ISA_AVX512, 1, 257, 5120, 1280, false, true, false, true, 1.0f, 0.0f);
    bf16_act = false;
    cpu_set_isa(CPU_ISA_AVX512);
    const int64_t shapes[2][3] = {{64, 11008, 4096}, {257, 5120, 1280}};
    for (int i = 0; i < 2; i++) {
        const int64_t M = shapes[i][0], N = shapes[i][1], K = shapes[i][2];
        double on = time_linear(M, N, K, true);
        ops_set_cpu_bf16_activations(false);
        double off = time_linear(M, N, K, true);
        ops_set_cpu_bf16_activations(true);
        printf("  (bf16 weight [%lld,%lld], %lld rows: bf16 GEMM %.1f ms = %.3f TFLOP/s, widen+sgemm %.1f ms = %.3f "
               "TFLOP/s, %.2fx; %d threads)\n", (long long)N, (long long)K, (long long)M, on * 1e3,
               2.0 * M * N * K / on / 1e12, off * 1e3, 2.0 * M * N * K / off / 1e12, off / on, eng.num_threads);
    }
    ops_set_cpu_bf16_activations(false);
}

// AGPT_CPU_BF16_GEMM=1 switches the bf16 GEMM on when it is read, at the first product that could take it.
static void test_env_switch(void) {
    setenv("AGPT_CPU_BF16_GEMM", "1", 1);
    bf16_act = cpu_has_avx512_bf16();
    matmul_case(DT_BF16, CPU_ISA_AVX512, 1, 16, 37, 53, false, true, false, true, 1.0f, 0.0f);
    bf16_act = false;
    unsetenv("AGPT_CPU_BF16_GEMM");
    ops_set_cpu_bf16_activations(false);
}

// Every product of one SIMD level against the double loop: odd sizes and LLaMA-7B's MLP shapes.
static void test_isa(CpuIsa isa) {
    DType dts[2] = {DT_BF16, DT_F16};
    int64_t Ms[4] = {1, 3, 64, 257};
    for (int d = 0; d < 2; d++) {
        // odd N and K: every tail of the 8- and 16-lane vectors and the row tiles, both paths (GEMV for M <= 4)
        for (int i = 0; i < 4; i++) {
            matmul_case(dts[d], isa, 1, Ms[i], 37, 53, false, true, false, false, 1.0f, 0.0f);
            matmul_case(dts[d], isa, 1, Ms[i], 131, 77, false, true, false, true, 0.5f, 2.0f);
            matmul_case(dts[d], isa, 1, Ms[i], 29, 45, false, false, false, true, 1.0f, 0.0f);
            matmul_case(dts[d], isa, 1, Ms[i], 29, 45, true, true, false, false, 0.5f, 2.0f);
            matmul_case(dts[d], isa, 1, Ms[i], 29, 45, true, false, false, false, 1.0f, 0.0f);
        }
        for (int64_t K = 1; K <= 17; K++)  // every K tail of one vector, for 1 to 4 rows (each tile width)
            for (int64_t M = 1; M <= 4; M++) matmul_case(dts[d], isa, 1, M, 11, K, false, true, false, false, 1.0f, 0.0f);
        matmul_case(dts[d], isa, 3, 2, 19, 33, false, true, true, true, 1.0f, 0.0f);  // batched weights
        matmul_case(dts[d], isa, 3, 5, 19, 33, false, false, true, false, 0.5f, 2.0f);
        matmul_case(dts[d], isa, 2, 3, 19, 33, true, true, false, false, 1.0f, 0.0f);
        matmul_case(dts[d], isa, 1, 2, 1, 1, false, true, false, false, 1.0f, 0.0f);
        matmul_case(dts[d], isa, 1, 3, 5, 0, false, true, false, false, 1.0f, 0.0f);  // K = 0: c = beta c
        matmul_case(dts[d], isa, 1, 3, 5, 0, false, true, false, false, 1.0f, 2.0f);
        linear_case(dts[d], isa, 2, 1, 67, 129);  // a decode step of 2 sequences
        linear_case(dts[d], isa, 2, 7, 67, 129);
    }
    // LLaMA-7B's MLP shapes: gate/up w[11008,4096], down w[4096,11008] (bf16, as the CPU model stores them),
    // with M = 1 and 3 (the GEMV), 64 (blocks through sgemm; 43 of them) and 257 rows on a slice of the outputs;
    // untransposed w [K,N] sums blocks of K, so beta must apply once.
    double t1 = matmul_case(DT_BF16, isa, 1, 1, 11008, 4096, false, true, false, false, 1.0f, 0.0f);
    matmul_case(DT_BF16, isa, 1, 3, 4096, 11008, false, true, false, false, 1.0f, 0.0f);
    matmul_case(DT_BF16, isa, 1, 64, 11008, 4096, false, true, false, true, 1.0f, 0.0f);
    matmul_case(DT_BF16, isa, 1, 257, 131, 11008, false, true, false, false, 1.0f, 0.0f);
    matmul_case(DT_BF16, isa, 1, 3, 4096, 11008, false, false, false, false, 0.5f, 2.0f);
    matmul_case(DT_F16, isa, 1, 1, 4096, 11008, false, true, false, false, 1.0f, 0.0f);
    printf("  (%s: one-row bf16 product with w[11008,4096]: %.2f ms, %.1f GB/s of weights, %d threads)\n",
           cpu_isa_name(isa), t1 * 1e3, 11008.0 * 4096 * 2 / t1 / 1e9, eng.num_threads);
}

static int usage(void) {
    fprintf(stderr, "usage: test_ops_cpu_bf16 --isa portable|avx2|avx512 | --part model | --part bf16-gemm | "
                    "--part env portable|avx2|avx512\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 3) return usage();
    const char *mode = argv[1], *what = argv[2];
    rng_seed(&rng, 4242);
    if (!strcmp(mode, "--isa")) {
        int isa = cpu_isa_from_name(what);
        if (isa < 0) return usage();
        if ((int)cpu_isa_detected() < isa) {
            printf("this CPU has no %s (its best is %s): skipped\n", what, cpu_isa_name(cpu_isa_detected()));
            return TEST_SKIP;
        }
        CHECK_OK(engine_create(&eng, DEV_CPU, 0, 0, 42));
        test_isa((CpuIsa)isa);
        CHECK(cpu_isa() == (CpuIsa)isa, "still on %s", what);
    } else if (!strcmp(mode, "--part") && !strcmp(what, "model")) {
        CHECK_OK(engine_create(&eng, DEV_CPU, 0, 0, 42));
        test_rejected();
        test_llama_bf16_matrices();
        test_lora_merge_bf16();
    } else if (!strcmp(mode, "--part") && !strcmp(what, "bf16-gemm")) {
        if (!cpu_has_avx512_bf16()) {
            printf("this CPU has no avx512_bf16: skipped (the switch falls back to the f32 path)\n");
            return TEST_SKIP;
        }
        CHECK_OK(engine_create(&eng, DEV_CPU, 0, 0, 42));
        test_env_switch();  // first: the variable is read once
        test_bf16_gemm();
    } else if (!strcmp(mode, "--part") && !strcmp(what, "env") && argc == 4) {
        // AGPT_CPU_ISA (set by ctest) caps the level: EXPECTED where the CPU has it, else the CPU's best
        int want = cpu_isa_from_name(argv[3]);
        if (want < 0) return usage();
        CpuIsa expect = (int)cpu_isa_detected() < want ? cpu_isa_detected() : (CpuIsa)want;
        const char *env = getenv("AGPT_CPU_ISA");
        CHECK(cpu_isa() == expect, "AGPT_CPU_ISA=%s: level %s, expected %s", env ? env : "(unset)",
              cpu_isa_name(cpu_isa()), cpu_isa_name(expect));
        printf("  AGPT_CPU_ISA=%s on a CPU whose best is %s: %s\n", env ? env : "(unset)",
               cpu_isa_name(cpu_isa_detected()), cpu_isa_name(cpu_isa()));
        CHECK_OK(engine_create(&eng, DEV_CPU, 0, 0, 42));
        matmul_case(DT_BF16, cpu_isa(), 1, 1, 37, 53, false, true, false, false, 1.0f, 0.0f);
    } else {
        return usage();
    }
    engine_destroy(&eng);
    printf("%d passed, %d failed\n", test_passed, test_failed);
    return test_failed ? 1 : 0;
}
