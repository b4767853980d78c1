// The assembled AnomalyGPT against a PyTorch re-expression of the reference's prepare_generation_embedding and
// greedy generation (tests/data/anomalygpt, from tests/reference/make_anomalygpt_goldens.py): the LLM input
// embeddings (BOS, prompt pieces, image token, 18 prompts from the map), the prefill logits, the generated tokens
// and the answer text. Uses the real LLaMA tokenizer from ../shared/data (skipped without it).
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/anomalygpt.h"
#include "runtime/memory.h"
#include "test.h"
#include "test_util.h"

static SafeTensors *parts;

// The golden stores embed_tokens and lm_head sparsely; write them whole (zeros elsewhere) to a layered file.
static Status write_tables(const char *path) {
    const char *names[2] = {"model.embed_tokens.weight", "lm_head.weight"};
    float *tables[2] = {NULL, NULL};
    StEntry entries[2];
    Status s = AGPT_OK;
    for (int i = 0; i < 2 && s == AGPT_OK; i++) {
        int64_t V = 32001, C = 0;
        tables[i] = dense_table(parts, names[i], V, &C);
        if (!tables[i]) {
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "golden: no usable sparse %s", names[i]);
            break;
        }
        entries[i] = (StEntry){names[i], tensor_2d(tables[i], DT_F32, DEV_CPU, V, C)};
    }
    if (s == AGPT_OK) s = st_write(path, entries, 2, NULL, 0);
    free(tables[0]), free(tables[1]);
    return s;
}

static float *golden_f32(const char *name, int64_t *n) {
    Tensor t;
    if (st_get(parts, name, &t) != AGPT_OK) return NULL;
    *n = tensor_numel(&t);
    float *out = malloc((size_t)*n * sizeof(float));
    memcpy(out, t.data, (size_t)*n * sizeof(float));
    return out;
}

static float *to_host(const Tensor *t) {
    int64_t n = tensor_numel(t);
    float *out = malloc((size_t)n * sizeof(float));
    Tensor h = *t;
    h.device = DEV_CPU;
    h.data = out;
    if (t->dtype != DT_F32 || tensor_copy(&h, t) != AGPT_OK)
        for (int64_t i = 0; i < n; i++) out[i] = NAN;
    return out;
}

int main(int argc, char **argv) {
    const char *data = argc > 1 ? argv[1] : AGPT_TEST_DATA;
    char path[1200], model[1200], tokenizer[1200], image_path[1200];
    snprintf(path, sizeof path, "%s/anomalygpt/parts.safetensors", data);
    snprintf(model, sizeof model, "%s/imagebind/model.safetensors", data);
    snprintf(image_path, sizeof image_path, "%s/imagebind/query.png", data);
    snprintf(tokenizer, sizeof tokenizer, "%s/llama-tokenizer.model", AGPT_SHARED_DATA);
    if (access(tokenizer, R_OK) != 0) {
        printf("no %s: skipped\n", tokenizer);
        return TEST_SKIP;
    }
    if (st_open(path, &parts) != AGPT_OK) {
        printf("golden missing (%s): skipped\n", agpt_last_error());
        return TEST_SKIP;
    }
    char tmp[] = "/tmp/agpt-e2e-XXXXXX", tables[1300];
    if (!mkdtemp(tmp)) return 1;
    snprintf(tables, sizeof tables, "%s/tables.safetensors", tmp);
    CHECK_OK(write_tables(tables));

    Engine e;
    CHECK_OK(engine_create(&e, DEV_CPU, 0, 0, 1));
    AnomalyGPT a;
    const char *overlays[2] = {tables, path};
    Status s = anomalygpt_open(&a, &e, model, overlays, 2, tokenizer, DT_F32, 128);
    CHECK_OK(s);
    if (s == AGPT_OK) {
        CHECK(a.llm.lora_rank == 8, "LoRA found under PandaGPT's key names and merged (rank %d)", a.llm.lora_rank);
        Image img;
        CHECK_OK(image_load(image_path, &img));
        const char *prompt = st_metadata(parts, "prompt");
        Tensor embeds;
        float score = 0;
        const char *cls = NULL;
        CHECK_OK(anomalygpt_input(&a, &img, prompt, &embeds, NULL, &score, &cls));
        CHECK(cls && strcmp(cls, "bottle") == 0, "class from the prompt: %s", cls ? cls : "(null)");
        int64_t n = 0;
        float *want = golden_f32("golden.embeds", &n);
        float *got = to_host(&embeds);
        CHECK(want && tensor_numel(&embeds) == n, "LLM input has %lld rows x 64, golden %lld values",
              (long long)embeds.shape[1], (long long)n);
        if (want && tensor_numel(&embeds) == n) CHECK_CLOSE(got, want, n, 1e-4, "LLM input embeddings (58 rows)");
        free(want), free(got);
        // The prefill logits.
        Tensor logits = tensor_2d(a.cache.logits.data, DT_F32, DEV_CPU, 1, a.llm.vocab);
        CHECK_OK(llama_prefill(&e, &a.llm, &a.cache, &embeds, &logits));
        want = golden_f32("golden.logits0", &n);
        if (want && n == a.llm.vocab) CHECK_CLOSE((float *)logits.data, want, n, 1e-4, "logits after the prefill");
        free(want);
        // The whole turn: greedy tokens and the answer text.
        AnomalyAnswer ans = {0};
        CHECK_OK(anomalygpt_ask(&a, &img, NULL, 0, prompt, NULL, 24, &ans));
        Tensor gt;
        if (st_get(parts, "golden.tokens", &gt) == AGPT_OK) {
            int same = ans.n_tokens == gt.shape[0];
            for (int i = 0; same && i < ans.n_tokens; i++) {
                int32_t w;
                memcpy(&w, (const char *)gt.data + 4 * i, 4);
                same = ans.tokens[i] == w;
            }
            CHECK(same, "greedy tokens equal PyTorch's (%d generated, golden %lld)", ans.n_tokens,
                  (long long)gt.shape[0]);
        }
        const char *want_text = st_metadata(parts, "answer");
        CHECK(ans.text && want_text && strcmp(ans.text, want_text) == 0, "answer text '%s' vs '%s'",
              ans.text ? ans.text : "(null)", want_text ? want_text : "(null)");
        printf("  answer: %s\n", ans.text ? ans.text : "(null)");
        free(ans.text);
        // Three turns, with and without reusing the KV cache of the shared prefix: the same answers, and the
        // later turns do reuse rows (the image, the prompts and the earlier turns).
        const char *questions[3] = {prompt, "Where is it?", "Why?"};
        char *answers[2][3] = {{0}};
        int reused[3] = {0};
        for (int mode = 0; mode < 2; mode++) {
            a.reuse_cache = mode == 1;
            a.cached_len = 0;
            ConversationTurn hist[3];
            for (int t = 0; t < 3; t++) {
                AnomalyAnswer turn = {0};
                CHECK_OK(anomalygpt_ask(&a, &img, hist, t, questions[t], NULL, 8, &turn));
                answers[mode][t] = turn.text;
                hist[t] = (ConversationTurn){questions[t], turn.text ? turn.text : ""};
                if (mode == 1) reused[t] = turn.reused_tokens;
            }
        }
        for (int t = 0; t < 3; t++) {
            CHECK(answers[0][t] && answers[1][t] && strcmp(answers[0][t], answers[1][t]) == 0,
                  "turn %d: the answer with the reused cache differs from the full re-run", t);
            free(answers[0][t]), free(answers[1][t]);
        }
        printf("  KV cache reuse: turns 2 and 3 reused %d and %d rows\n", reused[1], reused[2]);
        CHECK(reused[0] == 0 && reused[1] > 30 && reused[2] > reused[1], "rows reused per turn: %d %d %d", reused[0],
              reused[1], reused[2]);
        a.reuse_cache = false;
        // A conversation longer than the context is refused clearly.
        char *long_prompt = malloc(20001);
        memset(long_prompt, 'a', 20000);
        long_prompt[20000] = 0;
        for (int i = 1; i < 20000; i += 2) long_prompt[i] = ' ';
        CHECK_ERR(anomalygpt_ask(&a, &img, NULL, 0, long_prompt, NULL, 8, &ans));
        free(long_prompt);
        image_free(&img);
        anomalygpt_close(&a);
    }
    engine_destroy(&e);
    st_close(parts);
    unlink(tables);
    rmdir(tmp);
    return test_summary();
}
