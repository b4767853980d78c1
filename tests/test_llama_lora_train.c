// LLaMA training with LoRA kept apart (model/llama_lora_train) against HF transformers + PEFT
// (tests/data/llama/lora_grads.safetensors, made by tests/reference/make_llama_lora_grad_goldens.py): a small
// LlamaForCausalLM (dim 64, 4 heads, 2 layers, MLP 172, vocab 128) with LoRA r 8, alpha 16 (scaling 2) on q, k,
// v, o and random lora_B, inputs_embeds [2,11] and labels with -100 holes; the reference is float64 on the same
// f32 values. Checks the logits, the causal-LM loss, every dA / dB and d inputs_embeds; the token-id path; the
// frozen-LoRA backward (no dA/dB, the same d embeds); gradient accumulation (+=) and num_items; central finite
// differences of the loss for a few A, B and input entries (independent of the golden); bad inputs.
//
// Usage: test_llama_lora_train [data_dir]   (default AGPT_TEST_DATA; the file is <data_dir>/llama/lora_grads...)
// Exit: 0 all passed, 1 a check failed, 77 (skipped) when the golden file is absent.
//
// The loss and d logits come from op_cross_entropy (kernels/ops.h) on the engine, fused: no logits go to the host.
// Tolerances (tests/README.md): fp32 CPU vs PyTorch end to end 1e-4 (logits and gradients chain ~40 ops through
// two layers, the fused cross-entropy and back; measured 2e-7..5e-7); the loss, one number, to 1e-5 relative
// (measured 4e-8).
// Finite differences in f32 (h 1e-2 on the largest-gradient entries, loss ~5; measured 3e-5..7e-4): 5e-3
// relative. Dropping LoRA's scaling (2) moves logits and gradients far outside every bound.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/ops.h"
#include "model/llama_lora_train.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "test.h"
#include "test_util.h"

#define TOL 1e-4
#define TOL_LOSS 1e-5
#define TOL_FD 5e-3

static SafeTensors *golden;
static const char *const PROJ[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};

static double golden_meta_double(const char *key) {
    const char *v = st_metadata(golden, key);
    return v ? strtod(v, NULL) : NAN;
}

static void check_loss(const char *what, float got, double want) {
    double err = fabs((double)got - want) / fabs(want);
    if (!isfinite(got)) err = INFINITY;
    printf("  %-44s %.9g vs %.9g rel %.3g (tol %.0e)\n", what, (double)got, want, err, TOL_LOSS);
    CHECK(err <= TOL_LOSS, "%s: %.9g vs %.9g (rel %.3g)", what, (double)got, want, err);
}

// Fills the state's whole arena with NaN, then restores the positions, so anything the forward or backward
// forgets to write shows up as NaN in a checked output (CPU only: the arena is host memory).
static void poison_state(LlamaTrainState *s) {
    size_t n = s->arena.used / sizeof(float);
    float *p = (float *)s->arena.base;
    for (size_t i = 0; i < n; i++) p[i] = NAN;
    memcpy(s->positions.data, s->host_positions, (size_t)s->B * s->T * sizeof(int32_t));
}

// Every dA, dB and d embeds against the golden; returns nothing, counts checks. `factor` scales the golden
// (2 after two accumulated backwards).
static void check_grads(const LlamaLoraTrain *m, const LlamaTrainState *s, double factor, const char *tag,
                        double *worst_a, double *worst_b) {
    char name[256], what[128];
    for (int l = 0; l < m->layers; l++)
        for (int p = 0; p < 4; p++)
            for (int ab = 0; ab < 2; ab++) {
                snprintf(name, sizeof name, "grad.base_model.model.model.layers.%d.self_attn.%s.lora_%s.weight", l,
                         PROJ[p], ab ? "B" : "A");
                int64_t n = 0;
                float *want = test_golden_f32(golden, name, &n);
                if (!want) continue;
                const Tensor *g = ab ? &m->grad[l].b[p] : &m->grad[l].a[p];
                float *got = test_to_host_f32(g);
                for (int64_t i = 0; i < n; i++) want[i] = (float)(want[i] * factor);
                snprintf(what, sizeof what, "%sd layer%d.%s.lora_%s", tag, l, PROJ[p], ab ? "B" : "A");
                CHECK(tensor_numel(g) == n, "%s: %lld elements vs golden %lld", what, (long long)tensor_numel(g),
                      (long long)n);
                if (tensor_numel(g) == n) {
                    double e = rel_l2(got, want, n);
                    double *worst = ab ? worst_b : worst_a;
                    if (worst && e > *worst) *worst = e;
                    CHECK_CLOSE(got, want, n, TOL, what);
                }
                free(want), free(got);
            }
}

// Central difference of the loss in one entry of a host-memory tensor, against the analytic gradient.
static void check_fd(Engine *e, LlamaLoraTrain *m, LlamaTrainState *s, const Tensor *embeds,
                     const int32_t *labels, float *param, float analytic, double h, const char *what) {
    float keep = *param, lp = 0, lm = 0;
    *param = keep + (float)h;
    CHECK_OK(llama_lora_train_forward(e, m, s, embeds));
    CHECK_OK(llama_lora_train_loss(e, m, s, labels, 0, &lp));
    *param = keep - (float)h;
    CHECK_OK(llama_lora_train_forward(e, m, s, embeds));
    CHECK_OK(llama_lora_train_loss(e, m, s, labels, 0, &lm));
    *param = keep;
    double fd = ((double)lp - lm) / (2 * h);
    double err = fabs(fd - analytic) / fabs(analytic);
    if (!isfinite(fd) || !isfinite(analytic)) err = INFINITY;
    printf("  %-44s analytic %.6g, central difference %.6g, rel %.3g (tol %.0e)\n", what, (double)analytic, fd, err,
           TOL_FD);
    CHECK(err <= TOL_FD, "%s: analytic %.6g vs finite difference %.6g (rel %.3g)", what, (double)analytic, fd, err);
}

// Index of the largest |x|.
static int64_t argmax_abs(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (fabsf(x[i]) > fabsf(x[best])) best = i;
    return best;
}

int main(int argc, char **argv) {
    const char *data = argc > 1 ? argv[1] : AGPT_TEST_DATA;
    char path[2048];
    snprintf(path, sizeof path, "%s/llama/lora_grads.safetensors", data);
    if (access(path, R_OK) != 0) {
        printf("skipped: %s is missing (bash tests/reference/make_goldens.sh makes it)\n", path);
        return TEST_SKIP;
    }
    Engine e;
    CHECK_OK(engine_create(&e, DEV_CPU, 0, 2, 1234));
    CHECK_OK(st_open(path, &golden));
    if (test_failed) return test_summary();

    WeightStore ws;
    weights_init(&ws, &e, DT_F32, golden, "lora grads golden");
    LlamaLoraTrain m;
    CHECK_OK(llama_lora_train_load(&m, &ws));
    if (test_failed) return test_summary();
    CHECK(m.layers == 2 && m.block.dim == 64 && m.block.heads == 4 && m.vocab == 128 && m.rank == 8 &&
              m.alpha == 16.0f && m.scaling == 2.0f,
          "config: %d layers, dim %d, %d heads, vocab %d, rank %d, alpha %g, scaling %g", m.layers, m.block.dim,
          m.block.heads, m.vocab, m.rank, (double)m.alpha, (double)m.scaling);

    int64_t n_emb = 0, n_lab = 0, n_ids = 0;
    float *emb = test_golden_f32(golden, "inputs_embeds", &n_emb);
    int32_t *labels = golden_i32(golden, "labels", &n_lab);
    int32_t *ids = golden_i32(golden, "ids.input_ids", &n_ids);
    if (!emb || !labels || !ids) return test_summary();
    const int B = 2, T = 11, C = m.block.dim;
    CHECK(n_emb == (int64_t)B * T * C && n_lab == B * T && n_ids == B * T, "golden inputs have odd sizes");
    Tensor embeds = cpu_f32_3d(emb, B, T, C);

    LlamaTrainState s;
    CHECK_OK(llama_train_state_create(&s, &e, &m, B, T));
    if (test_failed) return test_summary();

    // ---- forward, loss, backward against the golden
    printf("golden: embeds [2,11,64] -> loss and gradients\n");
    poison_state(&s);
    float loss = NAN;
    CHECK_OK(llama_lora_train_forward(&e, &m, &s, &embeds));
    test_compare_golden(golden, "logits [2,11,128]", &s.logits, "logits", TOL);
    CHECK_OK(llama_lora_train_loss(&e, &m, &s, labels, 0, &loss));
    check_loss("loss (mean over the targets)", loss, golden_meta_double("loss"));
    CHECK(s.n_targets == 13, "13 targets expected, got %d", s.n_targets);
    CHECK_OK(llama_lora_train_backward(&e, &m, &s, true));
    double worst_a = 0, worst_b = 0;
    check_grads(&m, &s, 1.0, "", &worst_a, &worst_b);
    test_compare_golden(golden, "d inputs_embeds", &s.d_x, "grad.inputs_embeds", TOL);
    printf("  worst: dA %.3g, dB %.3g\n", worst_a, worst_b);
    float *d_embeds = test_to_host_f32(&s.d_x);

    // ---- accumulation: a second backward of the same forward adds the same gradients again
    CHECK_OK(llama_lora_train_backward(&e, &m, &s, true));
    check_grads(&m, &s, 2.0, "2x ", NULL, NULL);

    // ---- frozen LoRA: no dA, dB, the same d embeds
    CHECK_OK(llama_lora_train_zero_grad(&m));
    CHECK_OK(llama_lora_train_backward(&e, &m, &s, false));
    {
        double sq = 0;
        for (int l = 0; l < m.layers; l++)
            for (int p = 0; p < 4; p++) {
                double a = 0, b = 0;
                CHECK_OK(op_sum_squares(&e, &a, &m.grad[l].a[p]));
                CHECK_OK(op_sum_squares(&e, &b, &m.grad[l].b[p]));
                sq += a + b;
            }
        CHECK(sq == 0, "frozen LoRA: dA, dB must stay zero (sum of squares %g)", sq);
        float *d2 = test_to_host_f32(&s.d_x);
        CHECK(memcmp(d2, d_embeds, (size_t)B * T * C * sizeof(float)) == 0,
              "frozen LoRA: d embeds differ from the training backward's");
        printf("  %-44s dA, dB zero; d embeds identical\n", "frozen LoRA backward");
        free(d2);
    }

    // ---- num_items (HF's num_items_in_batch): the sum over twice the targets halves loss and gradients
    {
        float half = NAN;
        CHECK_OK(llama_lora_train_loss(&e, &m, &s, labels, 2 * 13, &half));
        check_loss("loss with num_items 26", half, golden_meta_double("loss") / 2);
        CHECK_OK(llama_lora_train_backward(&e, &m, &s, true));
        check_grads(&m, &s, 0.5, "half ", NULL, NULL);
    }

    // ---- token ids through embed_tokens
    printf("golden: token ids -> logits and loss\n");
    poison_state(&s);
    CHECK_OK(llama_lora_train_forward_tokens(&e, &m, &s, ids));
    test_compare_golden(golden, "ids: logits", &s.logits, "ids.logits", TOL);
    CHECK_OK(llama_lora_train_loss(&e, &m, &s, labels, 0, &loss));
    check_loss("ids: loss", loss, golden_meta_double("ids.loss"));

    // ---- finite differences, independent of the golden: the analytic gradient of this code's own forward
    printf("finite differences (h 1e-2, the largest entries)\n");
    CHECK_OK(llama_lora_train_zero_grad(&m));
    CHECK_OK(llama_lora_train_forward(&e, &m, &s, &embeds));
    CHECK_OK(llama_lora_train_loss(&e, &m, &s, labels, 0, &loss));
    CHECK_OK(llama_lora_train_backward(&e, &m, &s, true));
    {
        struct { int layer, proj, is_b; } pick[] = {{0, 0, 0}, {0, 2, 1}, {1, 3, 0}, {1, 1, 1}};
        for (size_t i = 0; i < sizeof pick / sizeof pick[0]; i++) {
            const Tensor *g = pick[i].is_b ? &m.grad[pick[i].layer].b[pick[i].proj]
                                           : &m.grad[pick[i].layer].a[pick[i].proj];
            Tensor *w = pick[i].is_b ? &m.lora[pick[i].layer].b[pick[i].proj] : &m.lora[pick[i].layer].a[pick[i].proj];
            int64_t n = tensor_numel(g), k = argmax_abs((const float *)g->data, n);
            float analytic = ((const float *)g->data)[k];
            char what[96];
            snprintf(what, sizeof what, "FD layer%d.%s.lora_%s[%lld]", pick[i].layer, PROJ[pick[i].proj],
                     pick[i].is_b ? "B" : "A", (long long)k);
            check_fd(&e, &m, &s, &embeds, labels, (float *)w->data + k, analytic, 1e-2, what);
        }
        int64_t k = argmax_abs(d_embeds, (int64_t)B * T * C);
        check_fd(&e, &m, &s, &embeds, labels, emb + k, d_embeds[k], 1e-2, "FD inputs_embeds[largest]");
    }

    // ---- bad inputs
    printf("bad inputs\n");
    {
        int32_t bad[22];
        memcpy(bad, labels, sizeof bad);
        bad[7] = 128;  // outside the vocabulary
        CHECK_ERR(llama_lora_train_loss(&e, &m, &s, bad, 0, NULL));
        bad[7] = -5;
        CHECK_ERR(llama_lora_train_loss(&e, &m, &s, bad, 0, NULL));
        Tensor wrong = cpu_f32_3d(emb, 1, 2 * T, C);
        CHECK_ERR(llama_lora_train_forward(&e, &m, &s, &wrong));
        CHECK_ERR(llama_lora_train_backward(&e, &m, &s, true));  // the failed forward left no loss to differentiate
        int32_t bad_ids[22];
        memcpy(bad_ids, ids, sizeof bad_ids);
        bad_ids[3] = 500;
        CHECK_ERR(llama_lora_train_forward_tokens(&e, &m, &s, bad_ids));
        // all labels ignored: loss 0 and zero d logits, not NaN
        int32_t none[22];
        for (int i = 0; i < 22; i++) none[i] = -100;
        float z = NAN;
        CHECK_OK(llama_lora_train_forward(&e, &m, &s, &embeds));
        CHECK_OK(llama_lora_train_loss(&e, &m, &s, none, 0, &z));
        double sq = 1;
        CHECK_OK(op_sum_squares(&e, &sq, &s.d_logits));
        CHECK(z == 0 && sq == 0 && s.n_targets == 0, "no targets: loss %g, |d logits|^2 %g", (double)z, sq);
        // a diverged forward (NaN logits) is an error naming it, not a NaN loss, and leaves nothing to differentiate
        for (int64_t i = 0; i < tensor_numel(&s.logits); i++) ((float *)s.logits.data)[i] = NAN;
        CHECK_ERR(llama_lora_train_loss(&e, &m, &s, labels, 0, NULL));
        CHECK_ERR(llama_lora_train_backward(&e, &m, &s, true));
        // a store without LoRA is refused with a message
        WeightStore ws2;
        SafeTensors *llama_base = NULL;
        char base_path[2048];
        snprintf(base_path, sizeof base_path, "%s/llama/base.safetensors", data);
        if (st_open(base_path, &llama_base) == AGPT_OK) {
            weights_init(&ws2, &e, DT_F32, llama_base, "base only");
            LlamaLoraTrain m2;
            CHECK_ERR(llama_lora_train_load(&m2, &ws2));
            weights_free(&ws2);
            st_close(llama_base);
        }
    }

    free(d_embeds), free(emb), free(labels), free(ids);
    llama_train_state_free(&s);
    llama_lora_train_free(&m);
    weights_free(&ws);
    st_close(golden);
    engine_destroy(&e);
    return test_summary();
}
