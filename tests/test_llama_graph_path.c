// The decode step over device-side state (KvCache.use_graph: tokens, positions and attention lengths read from
// memory by op_embedding_dev, op_rope, op_kv_append and op_attention_decode; on CUDA the step is captured once
// per batch size and replayed) against the plain decode step, on the CPU engine where use_graph runs the same ops
// without capture:
// - the ops alone: op_attention_decode over ragged lengths equals op_attention(causal) per sequence over its
//   prefix, op_kv_append writes row b * max_seq + pos[b] and nothing else, op_embedding_dev equals op_embedding;
// - llama_decode_step with use_graph equals the plain step (logits bit for bit, or within 1e-6) on random f32
//   LLaMAs, over 8 steps of a ragged batch started by llama_prefill_varlen, then after a prefill of another
//   batch size, with the logits written to the cache's buffer and to a caller's tensor;
// - argument errors: bad token ids (the cache is left as it was), a full cache, bad lengths / positions / ids and
//   shapes for the ops.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/engine.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "model/weights.h"
#include "runtime/rng.h"
#include "test.h"

static Engine e;
static Rng rng;

static float *randn(int64_t n, float std) {
    float *x = malloc((size_t)n * sizeof(float));
    rng_fill_normal(&rng, x, (size_t)n, 0.0f, std);
    return x;
}

// The largest |a - b|, +inf on a NaN.
static double max_diff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= m)) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

// ---- the ops alone -----------------------------------------------------------------------------------------

static void test_ops(void) {
    const int B = 3, S = 12, H = 2, D = 8, C = H * D;
    const float scale = 0.35f;
    float *q = randn(B * C, 1.0f), *k = randn(B * S * C, 1.0f), *v = randn(B * S * C, 1.0f);
    float *out = malloc(B * C * sizeof(float)), *ref = malloc(C * sizeof(float));
    int32_t lengths[3] = {1, 12, 7};
    Tensor tq = tensor_4d(q, DT_F32, DEV_CPU, B, 1, H, D), to = tensor_4d(out, DT_F32, DEV_CPU, B, 1, H, D);
    Tensor tk = tensor_4d(k, DT_F32, DEV_CPU, B, S, H, D), tv = tensor_4d(v, DT_F32, DEV_CPU, B, S, H, D);
    Tensor tl = tensor_1d(lengths, DT_I32, DEV_CPU, B);
    CHECK_OK(op_attention_decode(&e, &to, &tq, &tk, &tv, &tl, scale));
    for (int b = 0; b < B; b++) {
        Tensor qb = tensor_4d(q + b * C, DT_F32, DEV_CPU, 1, 1, H, D), ob = tensor_4d(ref, DT_F32, DEV_CPU, 1, 1, H, D);
        Tensor kb = tensor_4d(k + b * S * C, DT_F32, DEV_CPU, 1, lengths[b], H, D);
        Tensor vb = tensor_4d(v + b * S * C, DT_F32, DEV_CPU, 1, lengths[b], H, D);
        CHECK_OK(op_attention(&e, &ob, &qb, &kb, &vb, true, scale));
        CHECK(memcmp(ref, out + b * C, C * sizeof(float)) == 0, "op_attention_decode sequence %d (length %d) "
              "differs from op_attention over its prefix (max diff %.3g)", b, lengths[b],
              max_diff(ref, out + b * C, C));
    }
    // errors: lengths outside [1,S], wrong dtype or count, two queries per sequence
    lengths[1] = 13;
    CHECK_ERR(op_attention_decode(&e, &to, &tq, &tk, &tv, &tl, scale));
    lengths[1] = 0;
    CHECK_ERR(op_attention_decode(&e, &to, &tq, &tk, &tv, &tl, scale));
    lengths[1] = 5;
    Tensor tl_f = tensor_1d(lengths, DT_F32, DEV_CPU, B), tl_2 = tensor_1d(lengths, DT_I32, DEV_CPU, 2);
    CHECK_ERR(op_attention_decode(&e, &to, &tq, &tk, &tv, &tl_f, scale));
    CHECK_ERR(op_attention_decode(&e, &to, &tq, &tk, &tv, &tl_2, scale));
    CHECK_ERR(op_attention_decode(&e, &to, &tq, &tk, &tv, NULL, scale));
    Tensor tq2 = tensor_4d(k, DT_F32, DEV_CPU, B, 2, H, D), to2 = tensor_4d(v, DT_F32, DEV_CPU, B, 2, H, D);
    CHECK_ERR(op_attention_decode(&e, &to2, &tq2, &tk, &tv, &tl, scale));
    CHECK_OK(op_attention_decode(&e, &to, &tq, &tk, &tv, &tl, scale));

    // op_kv_append: row b * S + pos[b] gets rows[b], every other row is untouched
    float *cache = randn(B * S * C, 1.0f), *before = malloc(B * S * C * sizeof(float)), *rows = randn(B * C, 1.0f);
    memcpy(before, cache, B * S * C * sizeof(float));
    int32_t pos[3] = {0, 11, 4};
    Tensor tc = tensor_2d(cache, DT_F32, DEV_CPU, B * S, C), tr = tensor_2d(rows, DT_F32, DEV_CPU, B, C);
    Tensor tp = tensor_1d(pos, DT_I32, DEV_CPU, B);
    CHECK_OK(op_kv_append(&e, &tc, &tr, &tp, S));
    int wrong = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < S; t++) {
            const float *want = t == pos[b] ? rows + b * C : before + (b * S + t) * C;
            wrong += memcmp(cache + (b * S + t) * C, want, C * sizeof(float)) != 0;
        }
    CHECK(wrong == 0, "op_kv_append: %d cache rows wrong", wrong);
    pos[2] = S;
    CHECK_ERR(op_kv_append(&e, &tc, &tr, &tp, S));
    pos[2] = -1;
    CHECK_ERR(op_kv_append(&e, &tc, &tr, &tp, S));
    pos[2] = 3;
    CHECK_ERR(op_kv_append(&e, &tc, &tr, &tp, 0));
    CHECK_ERR(op_kv_append(&e, &tc, &tr, &tp, S + 1));  // the cache holds fewer than B sequences of S + 1
    Tensor tr_w = tensor_2d(rows, DT_F32, DEV_CPU, B, C - 1), tp_2 = tensor_1d(pos, DT_I32, DEV_CPU, 2);
    CHECK_ERR(op_kv_append(&e, &tc, &tr_w, &tp, S));
    CHECK_ERR(op_kv_append(&e, &tc, &tr, &tp_2, S));
    CHECK_ERR(op_kv_append(&e, &tc, &tc, &tp, S));

    // op_embedding_dev equals op_embedding
    const int V = 10;
    float *table = randn(V * C, 1.0f), *g1 = malloc(4 * C * sizeof(float)), *g2 = malloc(4 * C * sizeof(float));
    int32_t ids[4] = {9, 0, 3, 9};
    Tensor tt = tensor_2d(table, DT_F32, DEV_CPU, V, C), ti = tensor_1d(ids, DT_I32, DEV_CPU, 4);
    Tensor t1 = tensor_2d(g1, DT_F32, DEV_CPU, 4, C), t2 = tensor_2d(g2, DT_F32, DEV_CPU, 4, C);
    CHECK_OK(op_embedding(&e, &t1, &tt, &ti));
    CHECK_OK(op_embedding_dev(&e, &t2, &tt, &ti));
    CHECK(memcmp(g1, g2, 4 * C * sizeof(float)) == 0, "op_embedding_dev differs from op_embedding");
    ids[2] = V;
    CHECK_ERR(op_embedding_dev(&e, &t2, &tt, &ti));
    ids[2] = -1;
    CHECK_ERR(op_embedding_dev(&e, &t2, &tt, &ti));
    ids[2] = 2;
    Tensor ti_f = tensor_1d(ids, DT_F32, DEV_CPU, 4), t3 = tensor_2d(g2, DT_F32, DEV_CPU, 3, C);
    CHECK_ERR(op_embedding_dev(&e, &t2, &tt, &ti_f));
    CHECK_ERR(op_embedding_dev(&e, &t3, &tt, &ti));
    printf("ops: attention_decode, kv_append, embedding_dev checked\n");
    free(q), free(k), free(v), free(out), free(ref), free(cache), free(before), free(rows), free(table), free(g1),
        free(g2);
}

// ---- the decode step -----------------------------------------------------------------------------------------

// Compares the two caches' logits after one step; counts a failure above 1e-6 and reports bit-identity.
static void compare(const char *name, int step, const float *a, const float *b, int64_t n, int *identical) {
    double d = max_diff(a, b, n);
    bool same = memcmp(a, b, (size_t)n * sizeof(float)) == 0;
    if (!same) *identical = 0;
    CHECK(d <= 1e-6, "%s step %d: device-state logits differ from the plain step by %.3g", name, step, d);
}

static void test_decode(int C, int H, int I, int L, int V, uint64_t seed) {
    char name[96];
    snprintf(name, sizeof name, "decode C=%d H=%d L=%d V=%d", C, H, L, V);
    WeightStore ws;
    Llama m;
    weights_init(&ws, &e, DT_F32, NULL, "random llama");
    Status s = llama_init_random(&m, &ws, C, H, I, L, V, seed);
    CHECK(s == AGPT_OK, "%s: llama_init_random: %s", name, agpt_last_error());
    if (s != AGPT_OK) {
        weights_free(&ws);
        return;
    }
    enum { MB = 3, STEPS = 8 };
    const int lengths[MB] = {5, 11, 2}, maxT = 11 + STEPS + 3;
    KvCache plain, dev;
    CHECK_OK(kv_cache_create(&plain, &e, &m, MB, maxT));
    CHECK_OK(kv_cache_create(&dev, &e, &m, MB, maxT));
    dev.use_graph = true;
    const int total = 5 + 11 + 2;
    float *emb = randn((int64_t)total * C, 0.5f);
    Tensor embeds = tensor_2d(emb, DT_F32, DEV_CPU, total, C);
    Tensor lp = tensor_rows_view(&plain.logits, 0, MB), ld = tensor_rows_view(&dev.logits, 0, MB);
    CHECK_OK(llama_prefill_varlen(&e, &m, &plain, &embeds, lengths, MB, &lp));
    CHECK_OK(llama_prefill_varlen(&e, &m, &dev, &embeds, lengths, MB, &ld));
    float *own = malloc((size_t)MB * V * sizeof(float));  // a caller's logits tensor, not the cache's
    Tensor lo = tensor_2d(own, DT_F32, DEV_CPU, MB, V);
    int identical = 1;
    int32_t tokens[MB];
    for (int step = 0; step < STEPS; step++) {
        for (int b = 0; b < MB; b++) tokens[b] = (int32_t)((step * 37 + b * 101 + 3) % V);
        CHECK_OK(llama_decode_step(&e, &m, &plain, tokens, &lp));
        CHECK_OK(llama_decode_step(&e, &m, &dev, tokens, step % 2 ? &lo : &ld));
        compare(name, step, (float *)lp.data, step % 2 ? own : (float *)ld.data, (int64_t)MB * V, &identical);
    }
    int pos_ok = plain.pos == dev.pos;
    for (int b = 0; b < MB; b++) pos_ok &= plain.seq_pos[b] == dev.seq_pos[b] && dev.seq_pos[b] == lengths[b] + STEPS;
    CHECK(pos_ok, "%s: cache positions differ after %d steps (dev pos %d, plain %d)", name, STEPS, dev.pos,
          plain.pos);

    // A bad token id fails and leaves the cache as it was; the next good step still matches.
    int32_t bad[MB] = {1, V, 2};
    CHECK_ERR(llama_decode_step(&e, &m, &dev, bad, &ld));
    bad[1] = -1;
    CHECK_ERR(llama_decode_step(&e, &m, &dev, bad, &ld));
    CHECK(dev.pos == plain.pos && dev.batch == MB, "%s: a refused step changed the cache", name);
    CHECK_OK(llama_decode_step(&e, &m, &plain, tokens, &lp));
    CHECK_OK(llama_decode_step(&e, &m, &dev, tokens, &ld));
    compare(name, STEPS, (float *)lp.data, (float *)ld.data, (int64_t)MB * V, &identical);

    // Another batch size (2 sequences of 4 tokens) in the same caches.
    Tensor e2 = tensor_3d(emb, DT_F32, DEV_CPU, 2, 4, C);
    Tensor lp2 = tensor_rows_view(&plain.logits, 0, 2), ld2 = tensor_rows_view(&dev.logits, 0, 2);
    CHECK_OK(llama_prefill(&e, &m, &plain, &e2, &lp2));
    CHECK_OK(llama_prefill(&e, &m, &dev, &e2, &ld2));
    for (int step = 0; step < 3; step++) {
        for (int b = 0; b < 2; b++) tokens[b] = (int32_t)((step * 13 + b * 7 + 1) % V);
        CHECK_OK(llama_decode_step(&e, &m, &plain, tokens, &lp2));
        CHECK_OK(llama_decode_step(&e, &m, &dev, tokens, &ld2));
        compare(name, 100 + step, (float *)lp2.data, (float *)ld2.data, (int64_t)2 * V, &identical);
    }

    // A full cache is refused, as by the plain step.
    Tensor e1 = tensor_3d(emb, DT_F32, DEV_CPU, 1, maxT, C);
    float *emb_full = NULL;
    if (total < maxT) {  // enough rows for a prefill of maxT tokens
        emb_full = randn((int64_t)maxT * C, 0.5f);
        e1 = tensor_3d(emb_full, DT_F32, DEV_CPU, 1, maxT, C);
    }
    Tensor ld1 = tensor_rows_view(&dev.logits, 0, 1);
    CHECK_OK(llama_prefill(&e, &m, &dev, &e1, &ld1));
    CHECK_ERR(llama_decode_step(&e, &m, &dev, tokens, &ld1));
    // Logits of the wrong shape are refused.
    CHECK_OK(llama_prefill(&e, &m, &dev, &e2, &ld2));
    CHECK_ERR(llama_decode_step(&e, &m, &dev, tokens, &ld1));

    printf("%s %s: %d + 1 ragged steps and 3 steps at B=2 %s\n", identical ? "PASS" : "PASS (within 1e-6)", name,
           STEPS, identical ? "bit-identical to the plain step" : "within 1e-6 of the plain step");
    free(emb), free(emb_full), free(own);
    kv_cache_free(&plain);
    kv_cache_free(&dev);
    llama_free(&m);
    weights_free(&ws);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (engine_create(&e, DEV_CPU, 0, 0, 7) != AGPT_OK) {
        printf("FAIL engine_create: %s\n", agpt_last_error());
        return 1;
    }
    rng_seed(&rng, 20261128);
    test_ops();
    test_decode(64, 4, 128, 2, 97, 11);
    test_decode(96, 3, 160, 3, 211, 12);  // D = 32, three layers
    engine_destroy(&e);
    return test_summary();
}
