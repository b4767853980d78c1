// The PromptLearner and llama_proj (model/prompt_learner.c) against PyTorch: tests/data/prompt_learner.safetensors,
// made by tests/reference/make_prompt_learner_goldens.py, holds the exact nn.Sequential of reference section 4 at
// reduced widths (1 -> 4 -> 8 -> 8 -> 16 -> 16 -> 32, D = 32) on real 224 x 224 maps in [0,2], batch 2, with the
// checkpoint's key names, and llama_proj at 16 -> 32. On the CPU in f32, and on CUDA (f32 and bf16) when a GPU
// exists. Exits 77 when the golden is missing.
#include <string.h>
#include <unistd.h>

#include "kernels/ops.h"
#include "model/prompt_learner.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "test.h"
#include "test_util.h"

static SafeTensors *golden;

// Uploads a golden tensor into `dst` (already carved, the store's dtype, the engine's device).
static Status upload_golden(const char *name, Tensor *dst) {
    int64_t n = 0;
    float *h = test_golden_f32(golden, name, &n);
    if (!h) return AGPT_FAIL(AGPT_ERR_ARG, "golden %s missing", name);
    if (n != tensor_numel(dst)) {
        free(h);
        return AGPT_FAIL(AGPT_ERR_ARG, "golden %s has %lld elements, expected %lld", name, (long long)n,
                         (long long)tensor_numel(dst));
    }
    void *raw = malloc(tensor_nbytes(dst));
    convert_host(raw, dst->dtype, h, DT_F32, (size_t)n);
    Tensor src = tensor_make(raw, dst->dtype, DEV_CPU, dst->ndim, dst->shape);
    Status s = tensor_copy(dst, &src);
    free(raw), free(h);
    return s;
}

static void run(Engine *e, DType dt, double tol, const char *label) {
    printf("== %s ==\n", label);
    WeightStore ws;
    weights_init(&ws, e, dt, golden, "prompt_learner golden");
    PromptLearner p;
    LlamaProj lp;
    Status s = prompt_learner_load(&p, &ws);
    CHECK_OK(s);
    if (s) {
        weights_free(&ws);
        return;
    }
    CHECK_OK(llama_proj_load(&lp, &ws));
    const int want_ch[PROMPT_CONVS] = {4, 8, 8, 16, 16, 32};
    CHECK(p.dim == 32 && p.in_channels == 1 && memcmp(p.channels, want_ch, sizeof want_ch) == 0 &&
              p.kernel[0] == 3 && p.kernel[5] == 5 && p.padding[0] == 1 && p.padding[5] == 0,
          "config read off the shapes: dim %d, channels %d %d %d %d %d %d", p.dim, p.channels[0], p.channels[1],
          p.channels[2], p.channels[3], p.channels[4], p.channels[5]);
    CHECK(lp.in_dim == 16 && lp.out_dim == 32, "llama_proj %d -> %d", lp.in_dim, lp.out_dim);

    const int B = 2, S = 224, D = p.dim;
    Arena arena;
    const size_t bytes = prompt_learner_arena_bytes(&p, B, S, S);
    CHECK_OK(arena_init(&arena, e->device, bytes + ((size_t)1 << 20)));  // + the test's own tensors
    Tensor map, prompts, cls, token;
    CHECK_OK(arena_tensor(&arena, dt, 4, (int64_t[]){B, 1, S, S}, &map));
    CHECK_OK(arena_tensor(&arena, dt, 3, (int64_t[]){B, PROMPT_TOKENS, D}, &prompts));
    CHECK_OK(arena_tensor(&arena, dt, 2, (int64_t[]){B, lp.in_dim}, &cls));
    CHECK_OK(arena_tensor(&arena, dt, 3, (int64_t[]){B, 1, lp.out_dim}, &token));
    CHECK_OK(upload_golden("golden.map", &map));
    CHECK_OK(upload_golden("golden.cls_emb", &cls));

    // Poison the output first: every element must be written.
    float *nan_host = malloc(tensor_nbytes(&prompts));
    memset(nan_host, 0xFF, tensor_nbytes(&prompts));
    Tensor nan_src = tensor_make(nan_host, dt, DEV_CPU, 3, prompts.shape);
    CHECK_OK(tensor_copy(&prompts, &nan_src));
    free(nan_host);

    const size_t used_before = arena.used;
    CHECK_OK(prompt_learner_forward(e, &p, &arena, &map, &prompts));
    CHECK(arena.used == used_before, "prompt_learner_forward left %zu arena bytes in use",
          arena.used - used_before);
    CHECK(arena.peak - used_before <= bytes, "prompt_learner_forward used %zu arena bytes, more than the %zu "
          "prompt_learner_arena_bytes promised", arena.peak - used_before, bytes);
    test_compare_golden(golden, "prompts [2,18,32] (all)", &prompts, "golden.prompts", tol);
    // The two halves separately: base prompts are a copy (exact in f32), the map-derived ones the conv stack.
    {
        int64_t n = 0;
        float *want = test_golden_f32(golden, "golden.prompts", &n), *got = test_to_host_f32(&prompts);
        if (want && n == (int64_t)B * PROMPT_TOKENS * D) {
            for (int b = 0; b < B; b++) {
                const int64_t base = (int64_t)b * PROMPT_TOKENS * D;
                char what[96];
                snprintf(what, sizeof what, "image %d: 9 base prompts", b);
                CHECK_CLOSE(got + base, want + base, PROMPT_BASE * D, dt == DT_F32 ? 0.0 : tol, what);
                snprintf(what, sizeof what, "image %d: 9 map-derived prompts", b);
                CHECK_CLOSE(got + base + PROMPT_BASE * D, want + base + PROMPT_BASE * D, PROMPT_BASE * D, tol, what);
            }
        }
        free(want), free(got);
    }
    // The input map as 3-D [B,S,S] gives the same.
    Tensor map3 = tensor_3d(map.data, dt, e->device, B, S, S);
    CHECK_OK(prompt_learner_forward(e, &p, &arena, &map3, &prompts));
    test_compare_golden(golden, "prompts from a [B,S,S] map", &prompts, "golden.prompts", tol);

    CHECK_OK(image_token_forward(e, &lp, &cls, &token));
    test_compare_golden(golden, "llama_proj image token [2,1,32]", &token, "golden.image_token", tol);

    // Bad shapes are errors, not crashes.
    Tensor small = tensor_4d(map.data, dt, e->device, 1, 1, 100, 100);
    Tensor wrong_out = tensor_3d(prompts.data, dt, e->device, B, 9, D);
    Tensor two_ch = tensor_4d(map.data, dt, e->device, 1, 2, S, S);
    Tensor cls_bad = tensor_2d(cls.data, dt, e->device, B * 2, lp.in_dim / 2);
    Tensor token_bad = tensor_3d(token.data, dt, e->device, B, 2, lp.out_dim / 2);
    Tensor p1 = tensor_3d(prompts.data, dt, e->device, 1, PROMPT_TOKENS, D);
    CHECK_ERR(prompt_learner_forward(e, &p, &arena, &small, &p1));       // 100 px: not a 3x3 grid
    CHECK_ERR(prompt_learner_forward(e, &p, &arena, &map, &wrong_out));  // out [B,9,D]
    CHECK_ERR(prompt_learner_forward(e, &p, &arena, &two_ch, &p1));      // two channels
    CHECK_ERR(image_token_forward(e, &lp, &cls_bad, &token));
    CHECK_ERR(image_token_forward(e, &lp, &cls, &token_bad));
    Arena tiny;
    CHECK_OK(arena_init(&tiny, e->device, 4096));
    CHECK_ERR(prompt_learner_forward(e, &p, &tiny, &map, &prompts));     // arena too small: an error
    CHECK(tiny.used == 0, "a failed forward left %zu arena bytes in use", tiny.used);
    arena_free(&tiny);

    arena_free(&arena);
    weights_free(&ws);
}

// A store without the prompt learner, or with a wrong kernel size, is a clear error.
static void test_load_errors(void) {
    printf("== load errors ==\n");
    Engine cpu;
    CHECK_OK(engine_create(&cpu, DEV_CPU, 0, 0, 1));
    WeightStore empty;
    weights_init(&empty, &cpu, DT_F32, NULL, "empty");
    PromptLearner p;
    LlamaProj lp;
    CHECK_ERR(prompt_learner_load(&p, &empty));
    CHECK_ERR(llama_proj_load(&lp, &empty));
    weights_free(&empty);

    // The golden's tensors with meta_net.15 (the 5x5 conv) swapped for meta_net.12's 3x3 weight.
    char tmp[] = "/tmp/agpt-pl-XXXXXX", path[128];
    if (!mkdtemp(tmp)) return;
    snprintf(path, sizeof path, "%s/bad.safetensors", tmp);
    StEntry entries[64];
    int n = 0;
    for (int i = 0; i < st_count(golden) && n < 64; i++) {
        const char *name = st_name(golden, i);
        if (strncmp(name, "prompt_learner.", 15) != 0) continue;
        Tensor t;
        if (st_get(golden, name, &t) != AGPT_OK) continue;
        if (strcmp(name, "prompt_learner.meta_net.15.weight") == 0)
            CHECK_OK(st_get(golden, "prompt_learner.meta_net.12.weight", &t));
        entries[n++] = (StEntry){name, t};
    }
    CHECK_OK(st_write(path, entries, n, NULL, 0));
    SafeTensors *bad = NULL;
    CHECK_OK(st_open(path, &bad));
    if (bad) {
        WeightStore ws;
        weights_init(&ws, &cpu, DT_F32, bad, "bad");
        CHECK_ERR(prompt_learner_load(&p, &ws));
        printf("  wrong kernel size: %s\n", agpt_last_error());
        weights_free(&ws);
        st_close(bad);
    }
    unlink(path);
    rmdir(tmp);
    engine_destroy(&cpu);
}

int main(int argc, char **argv) {
    char path[1200];
    snprintf(path, sizeof path, "%s/prompt_learner.safetensors", argc > 1 ? argv[1] : AGPT_TEST_DATA);
    if (st_open(path, &golden) != AGPT_OK) {
        printf("golden missing (%s): skipped; make it with tests/reference/make_prompt_learner_goldens.py\n",
               agpt_last_error());
        return TEST_SKIP;
    }
    printf("golden %s (torch %s)\n", path, st_metadata(golden, "torch") ? st_metadata(golden, "torch") : "?");
    Engine cpu;
    CHECK_OK(engine_create(&cpu, DEV_CPU, 0, 0, 1));
    // Six convolutions, ReLUs and pools in a row: DESIGN.md's fp32 end-to-end tolerance would be 1e-4; the
    // per-op 1e-5 holds here (measured: see the log), so that is what is asked.
    run(&cpu, DT_F32, 1e-5, "cpu f32");
    engine_destroy(&cpu);
    test_load_errors();
    if (cuda_device_count() > 0) {
        Engine gpu;
        CHECK_OK(engine_create(&gpu, DEV_CUDA, 0, 0, 1));
        run(&gpu, DT_F32, 1e-5, "cuda f32");
        run(&gpu, DT_BF16, 1e-2, "cuda bf16");
        engine_destroy(&gpu);
    } else {
        printf("no CUDA device: the cuda part is skipped\n");
    }
    st_close(golden);
    return test_summary();
}
