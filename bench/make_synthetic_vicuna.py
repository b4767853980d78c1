#!/usr/bin/env python3
"""A Vicuna-7B-shaped HF directory with random fp16 weights, written as the official one is (torch.save
pytorch_model-0000N-of-0000M.bin shards, pytorch_model.bin.index.json, config.json, rotary inv_freq buffers),
with fewer layers so that it fits a small disk: for measuring `agpt convert`'s time and peak memory at real
tensor sizes (bench/convert_memory.sh). Not a golden: the values are random.

    python bench/make_synthetic_vicuna.py OUT_DIR [--layers 4] [--shards 2]
"""
import argparse
import json
import os

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32001)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    C, I, V, L = a.hidden, a.intermediate, a.vocab, a.layers
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)

    names = ["model.embed_tokens.weight"]
    for i in range(L):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.rotary_emb.inv_freq"]
    names += ["model.norm.weight", "lm_head.weight"]

    def make(name):
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            return rand(V, C)
        if name.endswith("inv_freq"):
            return 1.0 / (10000 ** (torch.arange(0, C // 32, 2).float() / (C // 32)))
        if "norm" in name:
            return torch.ones(C, dtype=torch.float16)
        if "down_proj" in name:
            return rand(C, I)
        if "gate_proj" in name or "up_proj" in name:
            return rand(I, C)
        return rand(C, C)

    per = (len(names) + a.shards - 1) // a.shards
    weight_map, total = {}, 0
    for s in range(a.shards):
        shard = f"pytorch_model-{s + 1:05d}-of-{a.shards:05d}.bin"
        state = {n: make(n) for n in names[s * per:(s + 1) * per]}
        for n, t in state.items():
            weight_map[n] = shard
            total += t.numel() * t.element_size()
        torch.save(state, os.path.join(a.out, shard))
        del state
    with open(os.path.join(a.out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": C,
                   "intermediate_size": I, "num_attention_heads": C // 128, "num_hidden_layers": L,
                   "rms_norm_eps": 1e-6, "vocab_size": V, "torch_dtype": "float16"}, f, indent=2)
    print(f"{a.out}: {L} layers, {total / 1e9:.2f} GB in {a.shards} shards")


if __name__ == "__main__":
    main()
