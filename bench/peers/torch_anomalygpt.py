"""PyTorch peer for `agpt bench detect`: the whole AnomalyGPT inspection in the official per-image pipeline order
(anomalygpt-reference.md sections 0-5; openllama.py's generate / extract_multimodal_feature /
prepare_generation_embedding), random weights at full size, one image at a time:

    preprocess (ToTensor + Normalize of a 224x224 RGB image) -> ImageBind-H vision forward with the 4 taps
    (tests/reference/imagebind_modules.py, the official module structure) -> the decoder's 4 Linear(1280->1024),
    the zero-shot map (normalise, 100 x text features, bilinear 16->224, softmax, mean) -> PromptLearner convs ->
    llama_proj(cls_emb) -> the input embeddings [<s>] "### Human: <Img>" [image] "</Img> " [18 prompts]
    prompt + "\\n### Assistant:" -> HF LlamaForCausalLM.generate(inputs_embeds=..., greedy)

in two modes: verdict-only (--verdict-tokens, 3) and full answer (--answer-tokens, 32), each generating exactly
that many tokens (min_new_tokens = max_new_tokens; agpt ignores its stops the same way), so both sides do the same
work. The class text features are random and computed once (agpt caches them too); --text-per-image recomputes
them every inspection with a random ImageBind text encoder (24 sentences), as the official code does.
The prompt is the official MVTec bottle test prompt, as token ids (reference 5.3), so no tokenizer is needed.

    python3 bench/peers/torch_anomalygpt.py --device cuda --dtype f16 --json torch-detect.json
    python3 bench/peers/torch_anomalygpt.py --device cpu --threads 2 --vision-layers 2 --llm-layers 2 \\
        --llm-width 1024 --iters 2 --answer-tokens 8 --json out.json

Timings per mode: seconds per inspection (wall, after one warm-up), and per stage: vision (preprocess to input
embeddings), prefill (generate() to the first token's logits) and decode (the remaining tokens), from a logits
processor that synchronises the device once per generated token (generate() already waits on the device every step
for its stopping test). Weights are made on the meta device and given storage on the real one (to_empty), then
filled by normal_: the modules' own init of 7B parameters would take longer than the benchmark.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "reference"))
from imagebind_modules import Config, Model  # noqa: E402

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
BOS = 1
PROMPT_START = [835, 12968, 29901, 529, 25518, 29958]   # "### Human: <Img>"
IMAGE_END = [1533, 25518, 29958, 29871]                 # "</Img> "
# describles['bottle'] + " Is there any anomaly in the image?" + "\n### Assistant:" (reference 5.3): 49 tokens
PROMPT = [910, 338, 263, 15373, 310, 263, 18046, 280, 363, 29342, 14997, 15326, 29892, 607, 881, 367, 4513, 29892,
          1728, 738, 18658, 29892, 285, 10653, 29892, 23503, 29892, 22728, 29892, 16188, 470, 9391, 760, 29889, 1317,
          727, 738, 29342, 14997, 297, 278, 1967, 29973, 13, 2277, 29937, 4007, 22137, 29901]


class PromptLearner(nn.Module):
    """code/model/AnomalyGPT_models.py::PromptLearner(dim_in=1, dim_out) (reference section 4)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        layers, cin = [], dim_in
        for c in (4, 16, 64, 256, 1024):
            layers += [nn.Conv2d(cin, c, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = c
        layers.append(nn.Conv2d(cin, dim_out, kernel_size=5, padding=0))
        self.meta_net = nn.Sequential(*layers)
        self.base_prompts = nn.Parameter(torch.randn((9, dim_out)), requires_grad=True)

    def forward(self, input):
        B, C, H, W = input.shape
        img_prompts = self.meta_net(input)
        img_prompts = img_prompts.reshape(B, img_prompts.shape[1], 9).transpose(-2, -1)  # (B, 4096, 9) -> (B, 9, 4096)
        return torch.cat([self.base_prompts.expand(B, -1, -1), img_prompts], dim=1)


def text_map(vm, taps, text_features):
    """Section 3.2 (openllama.py extract_multimodal_feature): per layer fc, normalise, 100 x dot, upsample the logits,
    softmax, class 1; mean over the layers."""
    maps = []
    for i, t in enumerate(taps):
        p = vm.image_decoder.fc[i](t.transpose(0, 1)[:, 1:, :])  # [B,256,E]
        p = p / p.norm(dim=-1, keepdim=True)
        s = 100.0 * p @ text_features.transpose(-2, -1)  # [B,256,2]
        b, n, c = s.shape
        side = int(n ** 0.5)
        s = s.permute(0, 2, 1).view(b, 2, side, side)
        s = F.interpolate(s, size=224, mode="bilinear", align_corners=True)
        maps.append(torch.softmax(s, dim=1)[:, 1, :, :])
    return torch.mean(torch.stack(maps, dim=0), dim=0)  # [B,224,224]


def materialise(module, dev, dt):
    """A module built on the meta device, given storage on dev in dt and random values: N(0, 1/fan_in) matrices,
    norm weights 1, biases N(0, 0.02^2), base prompts N(0, 1)."""
    module = module.to_empty(device=dev).to(dt)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 0:
                p.fill_(math.log(1 / 0.07))  # the text encoder's log_logit_scale
            elif p.dim() == 1:
                if "norm" in name or "ln" in name or name.endswith("pre_transformer_layer.0.weight") or \
                        (name.endswith(".weight") and "head" in name):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
            elif name.endswith("base_prompts"):
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
    return module


def build_llama(args, dev, dt):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    C = args.llm_width
    config = LlamaConfig(hidden_size=C, num_attention_heads=C // 128, num_key_value_heads=C // 128,
                         intermediate_size=C * 11008 // 4096, vocab_size=32001, num_hidden_layers=args.llm_layers,
                         rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # parameters in the compute dtype: no f32 copy of 7B
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(default_dtype)
    model = model.to_empty(device=dev)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02)
        with torch.device(dev):
            model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    return model


class StepClock:
    """A logits processor that only records when each generated token's logits are ready (device synchronised)."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--verdict-tokens", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--vision-layers", type=int, default=32)
    ap.add_argument("--vision-width", type=int, default=1280)
    ap.add_argument("--llm-layers", type=int, default=32)
    ap.add_argument("--llm-width", type=int, default=4096)
    ap.add_argument("--text-per-image", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("f16" if dev == "cuda" else "f32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = args.iters or (10 if dev == "cuda" else 2)
    from transformers import LogitsProcessorList

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    torch.manual_seed(7)
    W, L = args.vision_width, args.vision_layers
    taps = [L * (i + 1) // 4 - 1 for i in range(4)]
    cfg = Config(v_width=W, v_heads=W // 80, v_blocks=L, v_mlp=4 * W, taps=taps)
    with torch.device("meta"):
        vm = Model(cfg, text=args.text_per_image).eval()
        pl = PromptLearner(1, args.llm_width).eval()
        proj = nn.Linear(cfg.embed, args.llm_width)
    vm, pl, proj = (materialise(m, dev, dt) for m in (vm, pl, proj))
    if args.text_per_image:  # the causal mask buffer, lost by to_empty
        pre = vm.modality_preprocessors["text"]
        pre.mask = torch.empty(cfg.context, cfg.context, device=dev, dtype=dt).fill_(float("-inf")).triu_(1)
    llm = build_llama(args, dev, dt)
    params = sum(p.numel() * p.element_size() for m in (vm, pl, proj, llm) for p in m.parameters())
    print(f"torch {torch.__version__}: AnomalyGPT, official per-image pipeline, random weights ({params / 1e9:.2f} GB, "
          f"made in {time.perf_counter() - t0:.1f} s), {dev} {dt}, {torch.get_num_threads()} threads, attention "
          f"{llm.config._attn_implementation}; vision {L} x {W}, LLM {args.llm_layers} x {args.llm_width}"
          f"{', text features recomputed per image' if args.text_per_image else ''}", flush=True)

    gen = torch.Generator().manual_seed(11)
    image = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=gen).numpy()
    tf_cached = F.normalize(torch.randn(2, cfg.embed, generator=gen), dim=-1).to(dev, dt)
    sentence_ids = torch.randint(1, 49406, (24, 77), generator=gen)
    sentence_ids[:, 10] = 49407  # the end-of-text token (argmax) at position 10, zeros after, as the CLIP tokenizer
    sentence_ids[:, 11:] = 0
    sentence_ids = sentence_ids.to(dev)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    embed = llm.get_input_embeddings()
    ids = lambda t: torch.tensor([t], device=dev)  # noqa: E731

    def inspect(n_new):
        """One image, the official order; returns (vision_ms, prefill_ms, decode_ms, tokens)."""
        t_start = time.perf_counter()
        x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)  # ToTensor
        x = ((x - mean) / std).unsqueeze(0).to(dev, dt)  # Normalize, then .half().cuda() as the official inputs
        emb, vtaps = vm.encode_image(x)
        if args.text_per_image:  # encode_text_with_prompt_ensemble: 14 normal + 10 abnormal sentences
            t = vm.encode_text(sentence_ids)
            tf = torch.stack([F.normalize(t[:14].mean(0), dim=-1), F.normalize(t[14:].mean(0), dim=-1)])
        else:
            tf = tf_cached
        amap = text_map(vm, vtaps, tf[None])          # [1,224,224]
        prompts = pl(amap[:, None])                   # [1,18,D]
        image_token = proj(emb).unsqueeze(1)          # [1,1,D]
        E = torch.cat([embed(ids([BOS])), embed(ids(PROMPT_START)), image_token, embed(ids(IMAGE_END)), prompts,
                       embed(ids(PROMPT))], dim=1)
        sync()
        t_llm = time.perf_counter()
        clock = StepClock(sync)
        out = llm.generate(inputs_embeds=E, attention_mask=torch.ones(E.shape[:2], dtype=torch.long, device=dev),
                           max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
                           pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        sync()
        t_end = time.perf_counter()
        first = clock.times[0] if clock.times else t_end
        return ((t_llm - t_start) * 1e3, (first - t_llm) * 1e3, (t_end - first) * 1e3, out.shape[-1], E.shape[1])

    runs, prefix = [], 0
    with torch.inference_mode():
        for mode, n_new in (("verdict", args.verdict_tokens), ("full", args.answer_tokens)):
            inspect(n_new)  # warm-up
            stages = np.zeros(3)
            t1 = time.perf_counter()
            for _ in range(iters):
                v, p, d, n, prefix = inspect(n_new)
                assert n == n_new, f"generated {n} tokens, asked for {n_new}"
                stages += (v, p, d)
            s = (time.perf_counter() - t1) / iters
            stages /= iters
            runs.append({"mode": mode, "new_tokens": n_new, "s_per_inspection": s, "inspections_per_s": 1 / s,
                         "vision_ms": stages[0], "prefill_ms": stages[1], "decode_ms": stages[2]})
            print(f"{mode:8s} {n_new:4d} tokens: {1 / s:.3f} inspections/s ({s * 1e3:.2f} ms; vision {stages[0]:.2f}, "
                  f"prefill {stages[1]:.2f}, decode {stages[2]:.2f} ms)", flush=True)
    print(f"LLM input {prefix} rows; {iters} timed inspections per mode after a warm-up")
    doc = {"peer": "torch " + torch.__version__, "bench": "detect", "device": dev, "dtype": str(dt),
           "threads": torch.get_num_threads(), "vision_layers": L, "vision_width": W, "llm_layers": args.llm_layers,
           "llm_width": args.llm_width, "prefix_tokens": prefix, "iters": iters,
           "text_per_image": args.text_per_image, "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
