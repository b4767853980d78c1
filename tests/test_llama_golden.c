// The LLaMA language model (model/llama) against HF transformers + PEFT (tests/data/llama/, made by
// tests/reference/make_llama_goldens.py): a small LlamaForCausalLM (dim 64, 4 heads, 2 layers, vocab 300) with
// LoRA r 8, alpha 16 stored apart from the base weights, so the C side does the merge. Checks the prefill
// logits (batch 1 and 2), each decode step's logits over the KV cache, greedy generation token for token (with
// a stop id that never occurs, one that ends the output early, and the default stops), the base model without
// LoRA, the PandaGPT LoRA key form and the alpha default, and bad inputs (a missing tensor, a wrong shape,
// incomplete or misshapen LoRA, misuse of the cache). Sequences of different lengths in one batch
// (llama_prefill_varlen, then decode steps at per-sequence positions) against each sequence run alone: 13 rows
// of b1.embeds and 9 rows of b2.embeds' second sequence, in both orders. On the CPU, and on CUDA (f32 and
// bf16) when a GPU exists.
//
// Usage: test_llama_golden [data_dir]   (default AGPT_TEST_DATA; the files are in <data_dir>/llama)
// Exit: 0 all passed, 1 a check failed, 77 (skipped) when the golden files are absent.
//
// Tolerances (DESIGN.md): fp32 end to end vs PyTorch 1e-4; bf16 CUDA 1e-2, where greedy tokens are reported
// but may differ (a bf16 model is a different model for argmax near-ties).
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/ops.h"
#include "model/llama.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "test.h"
#include "test_util.h"

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

static char dir[1024];
static SafeTensors *base, *lora, *golden;

static int golden_meta_int(const char *key) {
    const char *v = st_metadata(golden, key);
    return v ? atoi(v) : -1;
}

// rel L2 of the rows [row0, row0 + rows) of a [*, V] golden against the device tensor t [rows, V].
static double compare_rows(const char *what, const Tensor *t, const float *want, int64_t row0, double tol) {
    int64_t n = tensor_numel(t);
    float *got = test_to_host_f32(t);
    double err = rel_l2(got, want + row0 * t->shape[1], n);
    printf("  %-44s rel_l2 %.3g (tol %.0e)\n", what, err, tol);
    CHECK(err <= tol, "%s: rel_l2 %.3g > %.0e", what, err, tol);
    free(got);
    return err;
}

// Uploads a golden f32 tensor into an arena tensor of dtype dt on the engine's device.
static Status upload(Arena *io, DType dt, const char *name, Tensor *out) {
    Tensor src;
    AGPT_TRY(st_get(golden, name, &src));
    AGPT_TRY(arena_tensor(io, dt, src.ndim, src.shape, out));
    int64_t n = tensor_numel(&src);
    void *buf = malloc((size_t)n * 4);
    convert_host(buf, dt, src.data, src.dtype, (size_t)n);
    Tensor h = tensor_make(buf, dt, DEV_CPU, src.ndim, src.shape);
    Status s = tensor_copy(out, &h);
    free(buf);
    return s;
}

static Status load_model(Engine *e, DType dt, bool with_lora, WeightStore *ws, Llama *m) {
    weights_init(ws, e, dt, with_lora ? lora : base, with_lora ? "llama lora golden" : "llama base golden");
    if (with_lora) AGPT_TRY(weights_add_file(ws, base, "llama base golden"));
    return llama_load(m, ws);
}

// Greedy generation against a golden token list; strict: they must agree, else only report agreement.
static void check_generation(Engine *e, const Llama *m, KvCache *c, const Tensor *embeds, const char *gname,
                             int32_t stop, bool strict, const char *label) {
    int64_t n_want = 0;
    int32_t *want = golden_i32(golden, gname, &n_want);
    if (!want) return;
    int32_t out[64];
    int n_out = 0;
    int max_new = golden_meta_int("gen.max_new") > 0 ? golden_meta_int("gen.max_new") : 40;
    CHECK_OK(llama_generate_greedy(e, m, c, embeds, max_new, &stop, 1, out, &n_out));
    int agree = 0;
    while (agree < n_out && agree < n_want && out[agree] == want[agree]) agree++;
    printf("  %-44s %d tokens (golden %lld), first %d agree\n", label, n_out, (long long)n_want, agree);
    if (strict) CHECK(n_out == n_want && agree == n_want, "%s: generated tokens differ from HF", label);
    free(want);
}

// ---------------------------------------------------------------------------------------------------------
// Sequences of different lengths in one batch

#define VL_STEPS 4  // greedy decode steps after the prefill

static int32_t argmax_row(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

// Uploads host f32 rows [rows, cols] as dtype dt into an arena tensor of the given shape.
static Status upload_host(Arena *io, DType dt, const float *host, int ndim, const int64_t *shape, Tensor *out) {
    AGPT_TRY(arena_tensor(io, dt, ndim, shape, out));
    int64_t n = tensor_numel(out);
    void *buf = malloc((size_t)n * 4);
    convert_host(buf, dt, host, DT_F32, (size_t)n);
    Tensor h = tensor_make(buf, dt, DEV_CPU, ndim, shape);
    Status s = tensor_copy(out, &h);
    free(buf);
    return s;
}

// Two sequences (13 rows of b1.embeds, 9 rows of b2.embeds[1]) prefilled together by llama_prefill_varlen, in
// both orders, then VL_STEPS greedy decode steps with each sequence fed its own argmax: every step's logits
// within `tol` (rel L2) of running the sequence alone through llama_prefill / llama_decode_step, and the same
// tokens (when strict). Then the length checks and a decode step refused when one sequence's cache is full.
static void check_varlen(Engine *e, const Llama *m, KvCache *c, Arena *io, double tol, bool strict_tokens) {
    const int C = m->block.dim, V = m->vocab;
    DType mdt = m->embed.dtype;
    int64_t n1 = 0, n2 = 0;
    float *e1 = test_golden_f32(golden, "b1.embeds", &n1), *e2 = test_golden_f32(golden, "b2.embeds", &n2);
    if (!e1 || !e2 || n1 < 13 * C || n2 < (13 + 9) * C) {
        CHECK(0, "varlen: b1.embeds / b2.embeds missing or too short");
        free(e1), free(e2);
        return;
    }
    const int len[2] = {13, 9};
    const float *src[2] = {e1, e2 + (n2 / 2)};  // b2.embeds [2,T,C]: its second sequence
    size_t mark = arena_mark(io);
    float *alone = malloc((size_t)2 * (VL_STEPS + 1) * V * sizeof(float));  // [seq][step][V]
    int32_t alone_tok[2][VL_STEPS + 1];
    // Each sequence alone.
    for (int q = 0; q < 2; q++) {
        Tensor emb, logits;
        CHECK_OK(upload_host(io, mdt, src[q], 3, SHAPE(1, len[q], C), &emb));
        CHECK_OK(arena_tensor(io, mdt, 2, SHAPE(1, V), &logits));
        CHECK_OK(llama_prefill(e, m, c, &emb, &logits));
        for (int st = 0; st <= VL_STEPS; st++) {
            float *got = test_to_host_f32(&logits);
            float *row = alone + ((size_t)q * (VL_STEPS + 1) + st) * V;
            memcpy(row, got, (size_t)V * sizeof(float));
            free(got);
            alone_tok[q][st] = argmax_row(row, V);
            if (st < VL_STEPS) CHECK_OK(llama_decode_step(e, m, c, &alone_tok[q][st], &logits));
        }
    }
    // Together, in both orders: order 0 is {13, 9}, order 1 is {9, 13}.
    for (int order = 0; order < 2; order++) {
        int seq[2] = {order, 1 - order}, lengths[2] = {len[seq[0]], len[seq[1]]};
        float *packed = malloc((size_t)(lengths[0] + lengths[1]) * C * sizeof(float));
        memcpy(packed, src[seq[0]], (size_t)lengths[0] * C * sizeof(float));
        memcpy(packed + (size_t)lengths[0] * C, src[seq[1]], (size_t)lengths[1] * C * sizeof(float));
        Tensor emb, logits;
        CHECK_OK(upload_host(io, mdt, packed, 2, SHAPE(lengths[0] + lengths[1], C), &emb));
        free(packed);
        CHECK_OK(arena_tensor(io, mdt, 2, SHAPE(2, V), &logits));
        CHECK_OK(llama_prefill_varlen(e, m, c, &emb, lengths, 2, &logits));
        double worst = 0;
        int tok_agree = 0, tok_total = 0;
        for (int st = 0; st <= VL_STEPS; st++) {
            CHECK(c->batch == 2 && c->seq_pos[0] == lengths[0] + st && c->seq_pos[1] == lengths[1] + st &&
                  c->pos == (lengths[0] > lengths[1] ? lengths[0] : lengths[1]) + st,
                  "varlen step %d: batch %d, seq_pos {%d,%d}, pos %d", st, c->batch, c->seq_pos[0], c->seq_pos[1],
                  c->pos);
            float *got = test_to_host_f32(&logits);
            int32_t feed[2];
            for (int b = 0; b < 2; b++) {
                const float *want = alone + ((size_t)seq[b] * (VL_STEPS + 1) + st) * V;
                double err = rel_l2(got + (size_t)b * V, want, V);
                if (err > worst) worst = err;
                CHECK(err <= tol, "varlen order %d step %d sequence %d: rel_l2 %.3g > %.0e vs alone", order, st, b,
                      err, tol);
                feed[b] = argmax_row(got + (size_t)b * V, V);
                tok_agree += feed[b] == alone_tok[seq[b]][st];
                tok_total++;
                // feed what the sequence alone generated, so the steps stay comparable even when not strict
                feed[b] = alone_tok[seq[b]][st];
            }
            free(got);
            if (st < VL_STEPS) CHECK_OK(llama_decode_step(e, m, c, feed, &logits));
        }
        char what[96];
        snprintf(what, sizeof what, "varlen {%d,%d}: prefill + %d steps vs alone", lengths[0], lengths[1], VL_STEPS);
        printf("  %-44s rel_l2 max %.3g (tol %.0e), tokens %d of %d agree\n", what, worst, tol, tok_agree, tok_total);
        if (strict_tokens) CHECK(tok_agree == tok_total, "%s: greedy tokens differ", what);
    }
    // Lengths that do not fit, and a sequence whose cache is full.
    {
        int64_t rows = c->max_seq + 3;
        float *zeros = calloc((size_t)rows * C, sizeof(float));
        Tensor emb, logits;
        CHECK_OK(upload_host(io, mdt, zeros, 2, SHAPE(rows, C), &emb));
        CHECK_OK(arena_tensor(io, mdt, 2, SHAPE(2, V), &logits));
        int full[2] = {c->max_seq, 3}, sum_wrong[2] = {c->max_seq, 2}, zero[2] = {0, (int)rows};
        int over[2] = {c->max_seq + 1, 2}, three[3] = {1, 1, (int)rows - 2};
        int32_t toks[2] = {5, 6};
        CHECK_ERR(llama_prefill_varlen(e, m, c, &emb, sum_wrong, 2, &logits));  // the rows are not the sum
        CHECK_ERR(llama_prefill_varlen(e, m, c, &emb, zero, 2, &logits));       // an empty sequence
        CHECK_ERR(llama_prefill_varlen(e, m, c, &emb, over, 2, &logits));       // longer than the cache
        CHECK_ERR(llama_prefill_varlen(e, m, c, &emb, three, 3, &logits));      // more sequences than the cache
        CHECK_OK(llama_prefill_varlen(e, m, c, &emb, full, 2, &logits));
        CHECK(c->seq_pos[0] == c->max_seq && c->seq_pos[1] == 3, "seq_pos {%d,%d}", c->seq_pos[0], c->seq_pos[1]);
        CHECK_ERR(llama_decode_step(e, m, c, toks, &logits));                   // sequence 0 has no room
        free(zeros);
    }
    free(alone);
    free(e1), free(e2);
    arena_reset_to(io, mark);
}

static void run(Engine *e, DType dt, double tol, bool strict_tokens, const char *label) {
    printf("== %s ==\n", label);
    WeightStore ws;
    Llama m;
    Status s = load_model(e, dt, true, &ws, &m);
    CHECK_OK(s);
    if (s) {
        weights_free(&ws);
        return;
    }
    CHECK(m.block.dim == 64 && m.block.heads == 4 && m.block.hidden == 172 && m.layers == 2 && m.vocab == 300,
          "config read from the file: dim %d heads %d hidden %d layers %d vocab %d", m.block.dim, m.block.heads,
          m.block.hidden, m.layers, m.vocab);
    CHECK(m.lora_rank == 8 && m.lora_alpha == 16.0f, "LoRA rank %d alpha %g (want 8, 16)", m.lora_rank,
          (double)m.lora_alpha);
    KvCache c;
    CHECK_OK(kv_cache_create(&c, e, &m, 2, 64));
    Arena io;
    CHECK_OK(arena_init(&io, e->device, 1 << 20));
    DType mdt = m.embed.dtype;

    // Prefill and decode steps, batch 1 then 2. The golden tokens are fed (not ours), so each step's logits
    // are compared on the same input; our argmax is checked against them separately.
    const char *prefixes[2] = {"b1.", "b2."};
    for (int p = 0; p < 2; p++) {
        char name[128], what[128];
        Tensor embeds;
        snprintf(name, sizeof name, "%sembeds", prefixes[p]);
        if (upload(&io, mdt, name, &embeds) != AGPT_OK) {
            printf("FAIL %s: %s\n", name, agpt_last_error());
            test_failed++;
            continue;
        }
        int B = (int)embeds.shape[0];
        int64_t n_pre = 0, n_steps = 0, n_tok = 0;
        snprintf(name, sizeof name, "%sprefill_logits", prefixes[p]);
        float *pre = test_golden_f32(golden, name, &n_pre);
        snprintf(name, sizeof name, "%sstep_logits", prefixes[p]);
        float *steps = test_golden_f32(golden, name, &n_steps);
        snprintf(name, sizeof name, "%sstep_tokens", prefixes[p]);
        int32_t *toks = golden_i32(golden, name, &n_tok);
        if (pre && steps && toks) {
            int S = (int)(n_tok / B), V = m.vocab;
            size_t mark = arena_mark(&io);
            Tensor logits;
            CHECK_OK(arena_tensor(&io, mdt, 2, SHAPE(B, V), &logits));
            CHECK_OK(llama_prefill(e, &m, &c, &embeds, &logits));
            snprintf(what, sizeof what, "%sprefill logits [%d,%d]", prefixes[p], B, V);
            compare_rows(what, &logits, pre, 0, tol);
            int argmax_agree = 0, argmax_total = 0;
            for (int st = 0; st <= S; st++) {
                // tokens of step st: golden [B,S] (b2) or [S] (b1); our argmax of the previous logits
                float *got = test_to_host_f32(&logits);
                for (int b = 0; b < B && st < S; b++) {
                    int32_t best = 0;
                    for (int v = 1; v < V; v++)
                        if (got[b * V + v] > got[b * V + best]) best = v;
                    argmax_agree += best == toks[b * S + st];
                    argmax_total++;
                }
                free(got);
                if (st == S) break;
                int32_t feed[2];
                for (int b = 0; b < B; b++) feed[b] = toks[b * S + st];
                CHECK_OK(llama_decode_step(e, &m, &c, feed, &logits));
                // step logits: golden [B,S,V] (b2) or [S,V] (b1); gather this step's rows
                float *want = malloc((size_t)B * V * sizeof(float));
                for (int b = 0; b < B; b++) memcpy(want + b * V, steps + ((size_t)b * S + st) * V, V * sizeof(float));
                snprintf(what, sizeof what, "%sdecode step %d logits (pos %d)", prefixes[p], st, c.pos - 1);
                compare_rows(what, &logits, want, 0, tol);
                free(want);
            }
            printf("  %-44s %d of %d\n", "argmax = HF's fed token", argmax_agree, argmax_total);
            if (strict_tokens) CHECK(argmax_agree == argmax_total, "%s argmax differs from HF", prefixes[p]);
            arena_reset_to(&io, mark);
        }
        free(pre), free(steps), free(toks);
    }

    // Sequences of different lengths in one batch, against each alone (same engine and dtype).
    check_varlen(e, &m, &c, &io, dt == DT_F32 ? 1e-5 : 1e-2, strict_tokens);

    // Greedy generation: a stop id that never occurs (all 40 tokens), one that ends the output early.
    Tensor gen;
    if (upload(&io, mdt, "gen.embeds", &gen) == AGPT_OK) {
        check_generation(e, &m, &c, &gen, "gen.tokens", golden_meta_int("gen.eos"), strict_tokens,
                         "greedy, 40 new tokens");
        check_generation(e, &m, &c, &gen, "gen_stop.tokens", golden_meta_int("gen_stop.eos"), strict_tokens,
                         "greedy, stops at its stop id");
        // The reference's stops {2277, 2}: the output ends at the first of them in the golden tokens.
        int64_t n_want = 0;
        int32_t *want = golden_i32(golden, "gen.tokens", &n_want);
        int expect = (int)n_want;
        for (int i = 0; want && i < n_want; i++)
            if (want[i] == LLAMA_EOS || want[i] == LLAMA_STOP_HASHES) {
                expect = i + 1;
                break;
            }
        int32_t out[64];
        int n_out = 0;
        CHECK_OK(llama_generate_greedy(e, &m, &c, &gen, 40, NULL, 0, out, &n_out));
        printf("  %-44s %d tokens (expect %d)\n", "greedy, default stops {2277, 2}", n_out, expect);
        if (strict_tokens) CHECK(n_out == expect && want && memcmp(out, want, (size_t)n_out * 4) == 0,
                                 "default stops: %d tokens, expected %d", n_out, expect);
        free(want);
    } else {
        printf("FAIL gen.embeds: %s\n", agpt_last_error());
        test_failed++;
    }

    // The base model alone: its logits match HF with the adapter disabled, and differ from the merged ones.
    {
        WeightStore ws0;
        Llama m0;
        Tensor embeds, logits;
        size_t mark = arena_mark(&io);
        Status s0 = load_model(e, dt, false, &ws0, &m0);
        CHECK_OK(s0);
        if (s0 == AGPT_OK) {
            CHECK(m0.lora_rank == 0, "no LoRA keys, but rank %d", m0.lora_rank);
            CHECK_OK(upload(&io, mdt, "b1.embeds", &embeds));
            CHECK_OK(arena_tensor(&io, mdt, 2, SHAPE(1, m0.vocab), &logits));
            CHECK_OK(llama_prefill(e, &m0, &c, &embeds, &logits));
            int64_t n = 0, n1 = 0;
            float *want = test_golden_f32(golden, "nolora.prefill_logits", &n);
            float *merged = test_golden_f32(golden, "b1.prefill_logits", &n1);
            if (want && merged) {
                compare_rows("no LoRA: prefill logits vs HF adapter off", &logits, want, 0, tol);
                float *got = test_to_host_f32(&logits);
                double d = rel_l2(got, merged, n1);
                printf("  %-44s rel_l2 %.3g (must be > 1e-2)\n", "no LoRA vs LoRA-merged golden", d);
                CHECK(d > 1e-2, "the LoRA merge makes no difference (rel %.3g)", d);
                free(got);
            }
            free(want), free(merged);
            llama_free(&m0);
        }
        weights_free(&ws0);
        arena_reset_to(&io, mark);
    }
    arena_free(&io);
    kv_cache_free(&c);
    llama_free(&m);
    weights_free(&ws);
}

// ---------------------------------------------------------------------------------------------------------
// Bad inputs (CPU)

// Writes the tensors of `st` to path, leaving out `skip` (or none) and replacing `reshape` by a [rows, cols-1]
// copy of its first rows*(cols-1) values (or none).
static Status rewrite(const SafeTensors *st, const char *path, const char *skip, const char *reshape) {
    int n = st_count(st), k = 0;
    StEntry *entries = calloc((size_t)n, sizeof *entries);
    if (!entries) return AGPT_FAIL(AGPT_ERR_OOM, "entries");
    for (int i = 0; i < n; i++) {
        const char *name = st_name(st, i);
        if (skip && strcmp(name, skip) == 0) continue;
        entries[k].name = name;
        AGPT_TRY(st_get(st, name, &entries[k].tensor));
        if (reshape && strcmp(name, reshape) == 0) entries[k].tensor.shape[1] -= 1;
        k++;
    }
    const char *meta[] = {"llama.heads", "4", "lora.alpha", "16"};
    Status s = st_write(path, entries, k, meta, 2);
    free(entries);
    return s;
}

// The LoRA factors under the PandaGPT / AnomalyGPT checkpoint names (llama_model.base_model.model.model.layers.N.
// self_attn.P.lora_X.default.weight), with or without the lora.alpha metadata.
static Status rewrite_panda(const char *path, bool with_alpha) {
    int n = st_count(lora);
    StEntry *entries = calloc((size_t)n, sizeof *entries);
    char (*names)[256] = calloc((size_t)n, 256);
    if (!entries || !names) return AGPT_FAIL(AGPT_ERR_OOM, "entries");
    Status s = AGPT_OK;
    for (int i = 0; s == AGPT_OK && i < n; i++) {
        const char *name = st_name(lora, i);
        const char *ab = strstr(name, ".lora_A.weight") ? "A" : "B";
        size_t stem = strlen(name) - strlen(".lora_A.weight");
        snprintf(names[i], 256, "llama_model.%.*s.lora_%s.default.weight", (int)stem, name, ab);
        entries[i].name = names[i];
        s = st_get(lora, name, &entries[i].tensor);
    }
    const char *meta[] = {"lora.alpha", "16"};
    if (s == AGPT_OK) s = st_write(path, entries, n, with_alpha ? meta : NULL, with_alpha ? 1 : 0);
    free(entries);
    free(names);
    return s;
}

// Prefill of b1 with the LoRA from `path` layered over the base; returns rel L2 against the golden logits.
static double prefill_with_lora_file(Engine *e, const char *path, int *rank, float *alpha) {
    double err = INFINITY;
    SafeTensors *f = NULL;
    if (st_open(path, &f) != AGPT_OK) return err;
    WeightStore ws;
    weights_init(&ws, e, DT_F32, f, "renamed lora");
    Llama m;
    KvCache c = {0};
    Arena io = {0};
    Tensor embeds, logits;
    int64_t n = 0;
    float *want = test_golden_f32(golden, "b1.prefill_logits", &n);
    Status s = weights_add_file(&ws, base, "llama base golden");
    if (s == AGPT_OK) s = llama_load(&m, &ws);
    if (s == AGPT_OK) {
        *rank = m.lora_rank, *alpha = m.lora_alpha;
        s = kv_cache_create(&c, e, &m, 1, 16);
        if (s == AGPT_OK) s = arena_init(&io, e->device, 1 << 16);
        if (s == AGPT_OK) s = upload(&io, DT_F32, "b1.embeds", &embeds);
        if (s == AGPT_OK) s = arena_tensor(&io, DT_F32, 2, SHAPE(1, m.vocab), &logits);
        if (s == AGPT_OK) s = llama_prefill(e, &m, &c, &embeds, &logits);
        if (s == AGPT_OK && want) {
            float *got = test_to_host_f32(&logits);
            err = rel_l2(got, want, n);
            free(got);
        }
        arena_free(&io);
        kv_cache_free(&c);
        llama_free(&m);
    }
    CHECK_OK(s);
    free(want);
    weights_free(&ws);
    st_close(f);
    return err;
}

static void expect_load_error(Engine *e, const char *path, bool with_lora_file, const char *needle, const char *what) {
    SafeTensors *bad = NULL;
    Status s = st_open(path, &bad);
    CHECK_OK(s);
    if (s) return;
    WeightStore ws;
    weights_init(&ws, e, DT_F32, bad, "bad file");
    if (with_lora_file) CHECK_OK(weights_add_file(&ws, base, "llama base golden"));
    Llama m;
    CHECK_ERR(llama_load(&m, &ws));
    const char *msg = agpt_last_error();
    printf("  %-44s -> %s\n", what, msg);
    CHECK(strstr(msg, needle) != NULL, "%s: the message should name '%s'", what, needle);
    weights_free(&ws);
    st_close(bad);
}

static void run_bad_inputs(Engine *e) {
    printf("== LoRA key forms and bad inputs (cpu) ==\n");
    char tmp[] = "/tmp/agpt-llama-XXXXXX", path[1200];
    if (!mkdtemp(tmp)) {
        CHECK(0, "mkdtemp");
        return;
    }
    snprintf(path, sizeof path, "%s/bad.safetensors", tmp);
    const char *missing = "model.layers.1.mlp.down_proj.weight";
    CHECK_OK(rewrite(base, path, missing, NULL));
    expect_load_error(e, path, false, missing, "a missing tensor");
    const char *wrong = "model.layers.0.self_attn.k_proj.weight";
    CHECK_OK(rewrite(base, path, NULL, wrong));
    expect_load_error(e, path, false, wrong, "a wrong shape");
    // LoRA for layer 0's q_proj found, but one factor of layer 1's v_proj absent.
    const char *lmissing = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    CHECK_OK(rewrite(lora, path, lmissing, NULL));
    expect_load_error(e, path, true, lmissing, "an incomplete LoRA");
    const char *lwrong = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight";
    CHECK_OK(rewrite(lora, path, NULL, lwrong));
    expect_load_error(e, path, true, lwrong, "a LoRA factor of the wrong shape");
    // The PandaGPT key form merges the same; without lora.alpha the scaling is 1 (alpha = r), not 16/8.
    int rank = 0;
    float alpha = 0;
    CHECK_OK(rewrite_panda(path, true));
    double err = prefill_with_lora_file(e, path, &rank, &alpha);
    printf("  %-44s rel_l2 %.3g (tol 1e-04), rank %d alpha %g\n", "PandaGPT LoRA key form: prefill logits", err,
           rank, (double)alpha);
    CHECK(err <= 1e-4 && rank == 8 && alpha == 16.0f, "PandaGPT key form: rel %.3g, rank %d, alpha %g", err, rank,
          (double)alpha);
    CHECK_OK(rewrite_panda(path, false));
    err = prefill_with_lora_file(e, path, &rank, &alpha);
    printf("  %-44s rel_l2 %.3g (must be > 1e-3), alpha %g\n", "no lora.alpha: scaling 1, not the golden's 2",
           err, (double)alpha);
    CHECK(err > 1e-3 && alpha == 8.0f, "without lora.alpha: rel %.3g, alpha %g (want alpha = r = 8)", err,
          (double)alpha);
    unlink(path);
    rmdir(tmp);

    // Misuse of the cache and the generator.
    WeightStore ws;
    Llama m;
    if (load_model(e, DT_F32, true, &ws, &m) != AGPT_OK) {
        CHECK(0, "load: %s", agpt_last_error());
        weights_free(&ws);
        return;
    }
    KvCache c;
    CHECK_OK(kv_cache_create(&c, e, &m, 1, 8));
    float *zeros = calloc((size_t)2 * 13 * 64 + 300 * 2, sizeof(float));
    Tensor logits = tensor_2d(zeros + 2 * 13 * 64, DT_F32, DEV_CPU, 1, 300);
    Tensor long_in = tensor_3d(zeros, DT_F32, DEV_CPU, 1, 13, 64), two = tensor_3d(zeros, DT_F32, DEV_CPU, 2, 4, 64);
    Tensor short_in = tensor_3d(zeros, DT_F32, DEV_CPU, 1, 4, 64), wrong_c = tensor_3d(zeros, DT_F32, DEV_CPU, 1, 4, 32);
    int32_t tok = 5, bad_tok = 300, out[16];
    int n_out = 0;
    CHECK_ERR(llama_decode_step(e, &m, &c, &tok, &logits));          // before any prefill
    CHECK_ERR(llama_prefill(e, &m, &c, &long_in, &logits));           // 13 tokens, cache of 8
    CHECK_ERR(llama_prefill(e, &m, &c, &two, &logits));               // 2 sequences, cache of 1
    CHECK_ERR(llama_prefill(e, &m, &c, &wrong_c, &logits));           // wrong width
    CHECK_OK(llama_prefill(e, &m, &c, &short_in, &logits));
    CHECK_ERR(llama_decode_step(e, &m, &c, &bad_tok, &logits));       // outside the vocabulary
    CHECK_ERR(llama_generate_greedy(e, &m, &c, &short_in, 6, NULL, 0, out, &n_out));  // 4 + 6 - 1 > 8
    CHECK_OK(llama_generate_greedy(e, &m, &c, &short_in, 5, NULL, 0, out, &n_out));   // 4 + 5 - 1 = 8 fits
    CHECK(n_out >= 1 && n_out <= 5, "generated %d tokens", n_out);
    free(zeros);
    kv_cache_free(&c);
    llama_free(&m);
    weights_free(&ws);
}

int main(int argc, char **argv) {
    snprintf(dir, sizeof dir, "%s/llama", argc > 1 ? argv[1] : AGPT_TEST_DATA);
    const char *names[3] = {"base", "lora", "golden"};
    SafeTensors **files[3] = {&base, &lora, &golden};
    for (int i = 0; i < 3; i++) {
        char path[1200];
        snprintf(path, sizeof path, "%s/%s.safetensors", dir, names[i]);
        if (st_open(path, files[i]) != AGPT_OK) {
            printf("golden missing (%s): skipped\n", agpt_last_error());
            for (int j = 0; j < i; j++) st_close(*files[j]);
            return TEST_SKIP;
        }
    }
    Engine cpu;
    CHECK_OK(engine_create(&cpu, DEV_CPU, 0, 0, 1));
    run(&cpu, DT_F32, 1e-4, true, "cpu f32");
    run_bad_inputs(&cpu);
    engine_destroy(&cpu);
    if (cuda_device_count() > 0) {
        Engine gpu;
        CHECK_OK(engine_create(&gpu, DEV_CUDA, 0, 0, 1));
        run(&gpu, DT_F32, 1e-4, true, "cuda f32");
        run(&gpu, DT_BF16, 1e-2, false, "cuda bf16 (greedy tokens reported, not required)");
        engine_destroy(&gpu);
    } else {
        printf("no CUDA device: the cuda part is skipped\n");
    }
    st_close(golden);
    st_close(lora);
    st_close(base);
    return test_summary();
}
