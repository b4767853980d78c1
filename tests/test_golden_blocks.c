// Golden test of one ViT block (model/vit_block) and one LLaMA layer (model/llama_block) against PyTorch:
// tests/data/vit_block.safetensors and llama_layer.safetensors, made by tests/reference/make_block_goldens.py
// from torch.nn modules shaped as ImageBind's BlockWithMasking and from transformers' LlamaDecoderLayer.
// Forward output and every gradient (input and parameters) are compared by relative L2 error.
//
// Usage: test_golden_blocks [data_dir]   (default "tests/data", relative to the working directory)
// Exit: 0 all passed, 1 a check failed, 77 (skipped) when the golden files are absent.
//
// Tolerances (DESIGN.md). fp32 CPU vs PyTorch fp32 is 1e-5 per op; a block chains ~15 ops, each the same
// fp32 math summed in another order, and the whole block stays within 1e-5 too (measured 6e-8..5e-7), so
// 1e-5 is used, not the 1e-4 end-to-end bound. The CUDA backend, run here in f32, is held to 1e-4: cuBLASLt
// and the attention kernels block their reductions differently from OpenBLAS and PyTorch's CPU path.
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/engine.h"
#include "kernels/ops.h"
#include "model/llama_block.h"
#include "model/vit_block.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "tests/test.h"

#define TOL_CPU 1e-5
#define TOL_CUDA 1e-4

static void fail_status(const char *what, Status s) {
    printf("FAIL  %s: %s: %s\n", what, agpt_status_name(s), agpt_last_error());
    test_failed++;
}

// Relative L2 error of a tensor on any device against a host f32 reference; NaN never passes.
static void compare(const char *dev, const char *label, const Tensor *out, const Tensor *ref, double tol) {
    char a[96], b[96];
    if (out->dtype != DT_F32 || ref->dtype != DT_F32 || tensor_numel(out) != tensor_numel(ref)) {
        printf("FAIL  %-5s %-44s shape or dtype: %s vs reference %s\n", dev, label,
               tensor_describe(out, a, sizeof a), tensor_describe(ref, b, sizeof b));
        test_failed++;
        return;
    }
    int64_t count = tensor_numel(out);
    float *host = malloc((size_t)count * sizeof(float));
    Tensor h = tensor_1d(host, DT_F32, DEV_CPU, count);
    Tensor flat = tensor_1d(out->data, DT_F32, out->device, count);
    if (!host || tensor_copy(&h, &flat) != AGPT_OK) {
        printf("FAIL  %-5s %-44s could not read the result back: %s\n", dev, label, agpt_last_error());
        free(host);
        test_failed++;
        return;
    }
    double err = rel_l2(host, ref->data, count);  // +inf on NaN or inf
    free(host);
    bool ok = err <= tol;
    printf("%s  %-5s %-44s rel L2 %.3e (tol %.0e)\n", ok ? "PASS" : "FAIL", dev, label, err, tol);
    if (ok) test_passed++;
    else test_failed++;
}

// ---------------------------------------------------------------------------------------------------------
// Loading

// Copies st[prefix+name] to a fresh arena tensor on the arena's device.
static Status load(const SafeTensors *st, const char *prefix, const char *name, Arena *arena, Tensor *out) {
    char key[256];
    snprintf(key, sizeof key, "%s%s", prefix, name);
    Tensor src;
    AGPT_TRY(st_get(st, key, &src));
    AGPT_TRY(arena_tensor(arena, src.dtype, src.ndim, src.shape, out));
    return tensor_copy(out, &src);
}

// A zero tensor shaped like t (gradients accumulate, so they start at zero).
static Status zeros_like(const Tensor *t, Arena *arena, Tensor *out) {
    AGPT_TRY(arena_tensor(arena, t->dtype, t->ndim, t->shape, out));
    void *zeros = calloc(1, tensor_nbytes(t) ? tensor_nbytes(t) : 1);
    if (!zeros) return AGPT_FAIL(AGPT_ERR_OOM, "calloc of %zu bytes", tensor_nbytes(t));
    Tensor z = tensor_make(zeros, t->dtype, DEV_CPU, t->ndim, t->shape);
    Status s = tensor_copy(out, &z);
    free(zeros);
    return s;
}

static Status meta_int(const SafeTensors *st, const char *prefix, const char *key, int *out) {
    char k[128];
    snprintf(k, sizeof k, "%s%s", prefix, key);
    const char *v = st_metadata(st, k);
    if (!v) return AGPT_FAIL(AGPT_ERR_FORMAT, "golden file: metadata \"%s\" is missing", k);
    *out = atoi(v);
    return AGPT_OK;
}

static Status meta_float(const SafeTensors *st, const char *prefix, const char *key, float *out) {
    char k[128];
    snprintf(k, sizeof k, "%s%s", prefix, key);
    const char *v = st_metadata(st, k);
    if (!v) return AGPT_FAIL(AGPT_ERR_FORMAT, "golden file: metadata \"%s\" is missing", k);
    *out = strtof(v, NULL);
    return AGPT_OK;
}

// Bytes of every tensor in the file, each rounded to the arena alignment: an upper bound for one case's
// weights (twice: values and gradients) and inputs.
static size_t file_bytes(const SafeTensors *st) {
    size_t n = 0;
    for (int i = 0; i < st_count(st); i++) {
        StInfo info;
        if (st_info(st, i, &info) == AGPT_OK) n += (info.nbytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN;
    }
    return n;
}

// ---------------------------------------------------------------------------------------------------------
// ViT block

typedef struct Param {
    const char *name;  // state_dict name in the golden file
    size_t offset;     // of the Tensor field in the weights struct
} Param;

static const Param VIT_PARAMS[] = {
    {"norm_1.weight", offsetof(VitBlockWeights, norm_1_w)},
    {"norm_1.bias", offsetof(VitBlockWeights, norm_1_b)},
    {"attn.in_proj_weight", offsetof(VitBlockWeights, in_proj_w)},
    {"attn.in_proj_bias", offsetof(VitBlockWeights, in_proj_b)},
    {"attn.out_proj.weight", offsetof(VitBlockWeights, out_proj_w)},
    {"attn.out_proj.bias", offsetof(VitBlockWeights, out_proj_b)},
    {"norm_2.weight", offsetof(VitBlockWeights, norm_2_w)},
    {"norm_2.bias", offsetof(VitBlockWeights, norm_2_b)},
    {"mlp.fc1.weight", offsetof(VitBlockWeights, fc1_w)},
    {"mlp.fc1.bias", offsetof(VitBlockWeights, fc1_b)},
    {"mlp.fc2.weight", offsetof(VitBlockWeights, fc2_w)},
    {"mlp.fc2.bias", offsetof(VitBlockWeights, fc2_b)},
};
#define N_VIT_PARAMS (int)(sizeof VIT_PARAMS / sizeof VIT_PARAMS[0])

static Tensor *field(void *weights, size_t offset) { return (Tensor *)((char *)weights + offset); }

static Status vit_case(Engine *e, const SafeTensors *st, const char *prefix, double tol) {
    const char *dev = device_name(e->device);
    VitBlockConfig cfg = {0};
    int B = 0, T = 0, causal = 0;
    AGPT_TRY(meta_int(st, prefix, "dim", &cfg.dim));
    AGPT_TRY(meta_int(st, prefix, "heads", &cfg.heads));
    AGPT_TRY(meta_int(st, prefix, "mlp_hidden", &cfg.mlp_hidden));
    AGPT_TRY(meta_float(st, prefix, "eps", &cfg.eps));
    AGPT_TRY(meta_int(st, prefix, "causal", &causal));
    AGPT_TRY(meta_int(st, prefix, "batch", &B));
    AGPT_TRY(meta_int(st, prefix, "seq_len", &T));
    cfg.causal = causal != 0;

    Arena data = {0}, acts = {0};
    Status s = arena_init(&data, e->device, 2 * file_bytes(st));
    if (s == AGPT_OK)
        s = arena_init(&acts, e->device, vit_block_activation_bytes(&cfg, B, T) + vit_block_scratch_bytes(&cfg, B, T));
    VitBlockWeights w, g;
    VitBlockActs a;
    VitBlockScratch sc;
    Tensor x, dout, dx;
    for (int i = 0; s == AGPT_OK && i < N_VIT_PARAMS; i++) {
        s = load(st, prefix, VIT_PARAMS[i].name, &data, field(&w, VIT_PARAMS[i].offset));
        if (s == AGPT_OK) s = zeros_like(field(&w, VIT_PARAMS[i].offset), &data, field(&g, VIT_PARAMS[i].offset));
    }
    if (s == AGPT_OK) s = load(st, prefix, "x", &data, &x);
    if (s == AGPT_OK) s = load(st, prefix, "dout", &data, &dout);
    if (s == AGPT_OK) s = zeros_like(&x, &data, &dx);
    if (s == AGPT_OK) s = vit_block_acts_carve(&cfg, B, T, DT_F32, &acts, &a);
    if (s == AGPT_OK) s = vit_block_scratch_carve(&cfg, B, T, DT_F32, &acts, &sc);
    if (s == AGPT_OK) s = vit_block_forward(e, &cfg, &w, &a, &x);
    if (s == AGPT_OK) s = vit_block_backward(e, &cfg, &w, &g, &a, &sc, &x, &dout, &dx);
    if (s == AGPT_OK) s = engine_synchronize(e);
    if (s == AGPT_OK) {
        char label[128];
        Tensor ref;
        snprintf(label, sizeof label, "vit %sy", prefix);
        s = st_get(st, label + 4, &ref);
        if (s == AGPT_OK) compare(dev, label, &a.out, &ref, tol);
        snprintf(label, sizeof label, "vit %sgrad.x", prefix);
        if (s == AGPT_OK) s = st_get(st, label + 4, &ref);
        if (s == AGPT_OK) compare(dev, label, &dx, &ref, tol);
        for (int i = 0; s == AGPT_OK && i < N_VIT_PARAMS; i++) {
            snprintf(label, sizeof label, "vit %sgrad.%s", prefix, VIT_PARAMS[i].name);
            s = st_get(st, label + 4, &ref);
            if (s == AGPT_OK) compare(dev, label, field(&g, VIT_PARAMS[i].offset), &ref, tol);
        }
    }
    arena_free(&acts);
    arena_free(&data);
    return s;
}

// ---------------------------------------------------------------------------------------------------------
// LLaMA layer

static const Param LLAMA_PARAMS[] = {
    {"input_layernorm.weight", offsetof(LlamaBlockWeights, input_norm)},
    {"self_attn.q_proj.weight", offsetof(LlamaBlockWeights, wq)},
    {"self_attn.k_proj.weight", offsetof(LlamaBlockWeights, wk)},
    {"self_attn.v_proj.weight", offsetof(LlamaBlockWeights, wv)},
    {"self_attn.o_proj.weight", offsetof(LlamaBlockWeights, wo)},
    {"post_attention_layernorm.weight", offsetof(LlamaBlockWeights, post_norm)},
    {"mlp.gate_proj.weight", offsetof(LlamaBlockWeights, w_gate)},
    {"mlp.up_proj.weight", offsetof(LlamaBlockWeights, w_up)},
    {"mlp.down_proj.weight", offsetof(LlamaBlockWeights, w_down)},
};
#define N_LLAMA_PARAMS (int)(sizeof LLAMA_PARAMS / sizeof LLAMA_PARAMS[0])

// Weights are stored once (no prefix); each case ("pos0.", "pos5.") has its own inputs and references.
// A case may store only some parameter gradients (the file says why); those present are all compared.
static Status llama_case(Engine *e, const SafeTensors *st, const char *prefix, double tol) {
    const char *dev = device_name(e->device);
    LlamaBlockConfig cfg = {0};
    int B = 0, T = 0, kv_heads = 0;
    AGPT_TRY(meta_int(st, "", "hidden", &cfg.dim));
    AGPT_TRY(meta_int(st, "", "heads", &cfg.heads));
    AGPT_TRY(meta_int(st, "", "kv_heads", &kv_heads));
    AGPT_TRY(meta_int(st, "", "intermediate", &cfg.hidden));
    AGPT_TRY(meta_float(st, "", "rms_norm_eps", &cfg.eps));
    AGPT_TRY(meta_float(st, "", "rope_theta", &cfg.rope_base));
    AGPT_TRY(meta_int(st, "", "batch", &B));
    AGPT_TRY(meta_int(st, "", "seq_len", &T));
    if (kv_heads != cfg.heads)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "golden llama layer has %d kv heads for %d heads; the block has no "
                         "grouped-query attention", kv_heads, cfg.heads);

    Arena data = {0}, acts = {0};
    Status s = arena_init(&data, e->device, 2 * file_bytes(st));
    if (s == AGPT_OK)
        s = arena_init(&acts, e->device,
                       llama_block_activation_bytes(&cfg, B, T) + llama_block_scratch_bytes(&cfg, B, T));
    LlamaBlockWeights w, g;
    LlamaBlockActs a;
    LlamaBlockScratch sc;
    Tensor x, dout, dx, positions;
    for (int i = 0; s == AGPT_OK && i < N_LLAMA_PARAMS; i++) {
        s = load(st, "", LLAMA_PARAMS[i].name, &data, field(&w, LLAMA_PARAMS[i].offset));
        if (s == AGPT_OK)
            s = zeros_like(field(&w, LLAMA_PARAMS[i].offset), &data, field(&g, LLAMA_PARAMS[i].offset));
    }
    if (s == AGPT_OK) s = load(st, prefix, "x", &data, &x);
    if (s == AGPT_OK) s = load(st, prefix, "dout", &data, &dout);
    if (s == AGPT_OK) s = load(st, prefix, "positions", &data, &positions);
    if (s == AGPT_OK) s = zeros_like(&x, &data, &dx);
    if (s == AGPT_OK) s = llama_block_acts_carve(&cfg, B, T, DT_F32, &acts, &a);
    if (s == AGPT_OK) s = llama_block_scratch_carve(&cfg, B, T, DT_F32, &acts, &sc);
    if (s == AGPT_OK) s = llama_block_forward(e, &cfg, &w, &a, &x, &positions);
    if (s == AGPT_OK) s = llama_block_backward(e, &cfg, &w, &g, &a, &sc, &x, &positions, &dout, &dx);
    if (s == AGPT_OK) s = engine_synchronize(e);
    if (s == AGPT_OK) {
        char label[128];
        Tensor ref;
        snprintf(label, sizeof label, "llama %sy", prefix);
        s = st_get(st, label + 6, &ref);
        if (s == AGPT_OK) compare(dev, label, &a.out, &ref, tol);
        snprintf(label, sizeof label, "llama %sgrad.x", prefix);
        if (s == AGPT_OK) s = st_get(st, label + 6, &ref);
        if (s == AGPT_OK) compare(dev, label, &dx, &ref, tol);
        int compared = 0;
        for (int i = 0; s == AGPT_OK && i < N_LLAMA_PARAMS; i++) {
            snprintf(label, sizeof label, "llama %sgrad.%s", prefix, LLAMA_PARAMS[i].name);
            if (st_find(st, label + 6) < 0) continue;
            s = st_get(st, label + 6, &ref);
            if (s == AGPT_OK) compare(dev, label, field(&g, LLAMA_PARAMS[i].offset), &ref, tol);
            compared++;
        }
        if (s == AGPT_OK && compared == 0)
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "golden llama case %s has no parameter gradients", prefix);
    }
    arena_free(&acts);
    arena_free(&data);
    return s;
}

// ---------------------------------------------------------------------------------------------------------

static void run_all(Engine *e, const SafeTensors *vit, const SafeTensors *llama, double tol) {
    const char *vit_cases[] = {"plain.", "causal."}, *llama_cases[] = {"pos0.", "pos5."};
    for (int i = 0; i < 2; i++) {
        Status s = vit_case(e, vit, vit_cases[i], tol);
        if (s != AGPT_OK) {
            char what[64];
            snprintf(what, sizeof what, "%s vit %s", device_name(e->device), vit_cases[i]);
            fail_status(what, s);
        }
    }
    for (int i = 0; i < 2; i++) {
        Status s = llama_case(e, llama, llama_cases[i], tol);
        if (s != AGPT_OK) {
            char what[64];
            snprintf(what, sizeof what, "%s llama %s", device_name(e->device), llama_cases[i]);
            fail_status(what, s);
        }
    }
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "tests/data";
    char vit_path[4096], llama_path[4096];
    snprintf(vit_path, sizeof vit_path, "%s/vit_block.safetensors", dir);
    snprintf(llama_path, sizeof llama_path, "%s/llama_layer.safetensors", dir);
    if (access(vit_path, R_OK) != 0 || access(llama_path, R_OK) != 0) {
        printf("SKIP  golden files missing (%s, %s); make them with: bash tests/reference/make_goldens.sh\n",
               vit_path, llama_path);
        return TEST_SKIP;
    }

    SafeTensors *vit = NULL, *llama = NULL;
    Status s = st_open(vit_path, &vit);
    if (s == AGPT_OK) s = st_open(llama_path, &llama);
    if (s != AGPT_OK) {
        fail_status("open golden files", s);
        st_close(vit);
        return test_summary();
    }

    Engine cpu;
    s = engine_create(&cpu, DEV_CPU, 0, 0, 1234);
    if (s != AGPT_OK) fail_status("engine_create(cpu)", s);
    else {
        run_all(&cpu, vit, llama, TOL_CPU);
        engine_destroy(&cpu);
    }

    if (cuda_device_count() > 0) {
        Engine gpu;
        s = engine_create(&gpu, DEV_CUDA, 0, 0, 1234);
        if (s != AGPT_OK) fail_status("engine_create(cuda)", s);
        else {
            run_all(&gpu, vit, llama, TOL_CUDA);
            engine_destroy(&gpu);
        }
    } else {
        printf("cuda part skipped (%s)\n", cuda_compiled() ? "no CUDA device" : "built without CUDA");
    }

    st_close(vit);
    st_close(llama);
    if (test_passed == 0) test_failed++;  // nothing compared is not a pass
    return test_summary();
}
