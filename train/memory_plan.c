#include "train/memory_plan.h"

#include <stdio.h>
#include <string.h>

#define GIB (1024.0 * 1024.0 * 1024.0)

MemPlanConfig mem_plan_reference_config(void) {
    return (MemPlanConfig){.vit_width = 1280, .vit_layers = 32, .vit_mlp = 5120, .vit_heads = 16, .vit_tokens = 257,
                           .vit_patch = 14, .image = 224, .embed = 1024, .taps = 4,
                           .prompt_channels = {4, 16, 64, 256, 1024, 4096}, .prompt_base = 9,
                           .llm_width = 4096, .llm_layers = 32, .llm_hidden = 11008, .llm_heads = 32, .vocab = 32001,
                           .lora_rank = 32, .seq_len = 1054, .micro_batch = 2, .images_per_micro = 2,
                           .weight_dtype = DT_F16, .compute_dtype = DT_F16, .train_decoder = true, .train_prompt = true,
                           .recompute = true, .flash_attention = true, .workspace_bytes = (size_t)256 << 20};
}

static void add(MemPlan *p, const char *what, double bytes) {
    if (p->n < MEM_PLAN_ITEMS) p->item[p->n++] = (MemPlanItem){what, bytes};
    p->peak_bytes += bytes;
}

Status mem_plan_compute(const MemPlanConfig *c, MemPlan *p) {
    memset(p, 0, sizeof *p);
    AGPT_CHECK_ARG(c->vit_width > 0 && c->vit_layers > 0 && c->vit_mlp > 0 && c->vit_heads > 0 && c->vit_tokens > 1 &&
                       c->vit_patch > 0 && c->image >= 32 && c->embed > 0 && c->taps > 0 && c->llm_width > 0 &&
                       c->llm_layers > 0 && c->llm_hidden > 0 && c->llm_heads > 0 && c->vocab > 0 && c->lora_rank >= 0 &&
                       c->seq_len > 0 && c->micro_batch > 0 && c->images_per_micro > 0 && c->prompt_base >= 0,
                   "memory plan: every dimension, the sequence length and the micro-batch must be > 0");
    for (int i = 0; i < 6; i++) AGPT_CHECK_ARG(c->prompt_channels[i] > 0, "memory plan: prompt channel %d is %d", i,
                                               c->prompt_channels[i]);
    const double wb = (double)dtype_size(c->weight_dtype), ab = (double)dtype_size(c->compute_dtype), f32 = 4;
    const double C = c->vit_width, M = c->vit_mlp, N = c->vit_tokens, Ci = c->images_per_micro;
    const double D = c->llm_width, I = c->llm_hidden, L = c->llm_layers, V = c->vocab, T = c->seq_len;
    const double B = c->micro_batch, R = c->lora_rank, E = c->embed;

    // Parameter counts (the reference's 5,246,976 decoder and 107,416,504 prompt-learner parameters at ViT-H/7B).
    double vit_block = 3 * C * C + 3 * C + C * C + C + 2 * C * M + M + C + 4 * C;
    double vit = c->vit_layers * vit_block + 3.0 * c->vit_patch * c->vit_patch * C + C + N * C + 2 * C + 2 * C + E * C;
    double decoder = c->taps * (C * E + E);
    double prompt = c->prompt_base * D, cin = 1;
    for (int i = 0; i < 6; i++) {
        double k = i == 5 ? 5 : 3, cout = i == 5 ? D : c->prompt_channels[i];
        prompt += cout * cin * k * k + cout;
        cin = cout;
    }
    double proj = E * D + D;
    double lora = L * 4 * (2 * R * D);
    double llama = 2 * V * D + L * (4 * D * D + 3 * D * I + 2 * D) + D;

    // A trained part leaves the frozen weights: its compute copy is counted with its trained state below.
    double head = V * D + D, blocks = c->vit_layers * vit_block;  // lm_head + model.norm; the ViT's blocks
    double vit_frozen = vit - (c->train_vision ? blocks : 0), llama_frozen = llama - (c->train_head ? head : 0);
    double trained = 0, other_frozen = 0;
    (c->train_decoder ? &trained : &other_frozen)[0] += decoder;
    (c->train_prompt ? &trained : &other_frozen)[0] += prompt;
    (c->train_proj ? &trained : &other_frozen)[0] += proj;
    if (c->train_lora) trained += lora;  // frozen LoRA is merged into q, k, v, o
    if (c->train_head) trained += head;
    if (c->train_vision) trained += blocks;
    p->trained_params = trained, p->frozen_params = vit_frozen + llama_frozen + other_frozen;

    add(p, "frozen weights: ViT-H vision", vit_frozen * wb);
    add(p, "frozen weights: LLaMA", llama_frozen * wb);
    add(p, "frozen weights: other parts", other_frozen * wb);
    double copy = c->compute_dtype == DT_F32 ? 0 : ab;  // f32 compute updates the master in place
    add(p, "trained: params + f32 master + f32 grad", trained * (copy + f32 + f32));
    double shards = c->optimizer_shards > 1 ? c->optimizer_shards : 1;  // ZeRO-1
    add(p, "trained: AdamW moments (f32 m, v)", c->optimizer_on_host ? 0 : trained * 2 * f32 / shards);

    // Kept: taps and class embedding per image; the decoder's features, normalised features and maps per tap.
    double S = c->image, grid = (double)(c->image / c->vit_patch), P = grid * grid;
    add(p, "kept: ViT taps + class embedding", Ci * (c->taps * N * C + E) * ab);
    // Training the ViT keeps every block's activations (LN1, q, k, v, attention out, residual, LN2, out: 8 C; the
    // MLP's two hidden M; 4 row statistics) and the taps' gradients.
    if (c->train_vision)
        add(p, "kept: ViT block activations (train vision)",
            Ci * N * (c->vit_layers * (8 * C + 2 * M + 4) + c->taps * C) * f32);
    add(p, "kept: decoder features and maps", Ci * c->taps * (2 * P * E * ab + 2 * 2 * S * S * f32));
    // Prompt learner on the map [1,S,S]: per stage conv out, ReLU out, pool out; the last conv valid 5x5.
    double pl = 0, side = S;
    for (int i = 0; i < 5; i++) {
        pl += c->prompt_channels[i] * side * side * 2 + c->prompt_channels[i] * (side / 2) * (side / 2);
        side /= 2;
    }
    pl += D * (side - 4) * (side - 4);
    add(p, "kept: prompt learner activations", B * pl * f32);

    // One LLaMA layer's activations per token: norm out, q, k, v, roped q and k, attention out, o out, residual,
    // norm2 out (10 D), gate, up, silu(gate) * up (3 I); LoRA's x A for q, k, v, o when trained; attention scores
    // unless fused.
    double layer = B * T * (10 * D + 3 * I + (c->train_lora ? 4 * R : 0)) * ab +
                   (c->flash_attention ? B * c->llm_heads * T * f32 : B * c->llm_heads * T * T * ab);
    double llm_kept = c->recompute ? L * B * T * D * ab : L * layer;
    add(p, c->recompute ? "kept: LLaMA layer inputs (recompute)" : "kept: LLaMA activations (no recompute)", llm_kept);
    add(p, "kept: logits f32 (their gradient in place)", B * T * V * f32);
    add(p, "kept: d input embeddings (f32) + residual grads", B * T * D * (f32 + 2 * ab));

    // Transient: a ViT block (x, norm, qkv, attention out, MLP hidden; scores unless fused), or a LLaMA layer's
    // recomputed activations plus their gradients.
    double vit_tr = Ci * N * (6 * C + M) * ab + (c->flash_attention ? 0 : Ci * c->vit_heads * N * N * ab);
    double llm_tr = c->recompute ? 2 * layer : layer;
    add(p, vit_tr > llm_tr ? "transient: one ViT block" : "transient: one LLaMA layer backward",
        vit_tr > llm_tr ? vit_tr : llm_tr);
    add(p, "workspace and slack", (double)c->workspace_bytes);
    return AGPT_OK;
}

void mem_plan_format(const MemPlan *p, char *buf, size_t cap) {
    size_t n = 0;
    if (cap == 0) return;
    buf[0] = 0;
    for (int i = 0; i < p->n && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "  %-46s %8.3f GiB\n", p->item[i].what, p->item[i].bytes / GIB);
    if (n < cap)
        snprintf(buf + n, cap - n, "  %-46s %8.3f GiB  (%.0f trained, %.0f frozen parameters)\n", "peak (upper bound)",
                 p->peak_bytes / GIB, p->trained_params, p->frozen_params);
}

Status mem_plan_check(const MemPlan *p, double budget) {
    if (p->peak_bytes <= budget) return AGPT_OK;
    // Name the three largest items: what to shrink.
    int top[3] = {-1, -1, -1};
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < p->n; i++) {
            bool used = false;
            for (int j = 0; j < k; j++) used |= top[j] == i;
            if (!used && (top[k] < 0 || p->item[i].bytes > p->item[top[k]].bytes)) top[k] = i;
        }
    char largest[512] = "";
    size_t n = 0;
    for (int k = 0; k < 3 && top[k] >= 0; k++)
        n += (size_t)snprintf(largest + n, sizeof largest - n, "%s%s %.2f GiB", k ? ", " : "", p->item[top[k]].what,
                              p->item[top[k]].bytes / GIB);
    return AGPT_FAIL(AGPT_ERR_OOM, "a training step needs up to %.2f GiB but the budget is %.2f GiB (largest: %s); "
                     "use a smaller micro-batch or sequence length, activation recompute, or the optimizer on the host",
                     p->peak_bytes / GIB, budget / GIB, largest);
}
