#!/usr/bin/env python3
"""Golden file for LLaMA training with LoRA kept apart (model/llama_lora_train.c): the causal-LM loss of a
PEFT-LoRA-wrapped HF LlamaForCausalLM and its gradients with respect to every lora_A / lora_B and to
inputs_embeds, made with the real peers (transformers + PEFT, anomalygpt-reference.md 5.1, 5.2, 5.4).

The model is small (hidden 64, 2 layers, 4 heads, MLP 172, vocab 128), LoRA r 8, alpha 16 (scaling 2, so a
forgotten scaling shows) on q, k, v, o, dropout 0, lora_B random (PEFT starts it at zero, which would hide B's
part of dA and of the forward). Weights are drawn in f32; the reference runs in float64 on exactly those f32
values, so the golden is the exact answer and the C side's error is its own f32 rounding only.

Writes tests/data/llama/lora_grads.safetensors:
  model.*, lm_head.weight                      the base model under HF names, f32
  base_model.model.model.layers.N.self_attn.P.lora_{A,B}.weight   the LoRA factors as PEFT saves them, f32
  inputs_embeds [2,T,C] f32 (T = 11)           labels [2,T] i32 (-100 = ignored: a prompt prefix, right padding)
  loss [1]                                     model(inputs_embeds=..., labels=...).loss (HF shift: logits[t]
                                               predicts labels[t+1], mean over the non-ignored targets), taken
                                               in float64 (HF casts logits to f32 first; checked to 1e-6)
  logits [2,T,V]                               the forward's logits
  grad.<lora key> (16 tensors), grad.inputs_embeds [2,T,C]
  ids.input_ids [2,T] i32, ids.loss [1], ids.logits [2,T,V]   the same labels from token ids (embedding path)
  metadata: llama.heads, llama.rms_eps, lora.r, lora.alpha, loss as a decimal string (float64), versions.
Run: tests/reference/.venv/bin/python tests/reference/make_llama_lora_grad_goldens.py [out_dir]
"""
import math
import os
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
import peft
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from golden_io import write

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "data", "llama")

HIDDEN, INTER, LAYERS, HEADS, VOCAB = 64, 172, 2, 4, 128
R, ALPHA = 8, 16
B, T = 2, 11


def make_model():
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                      hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound)
    return model


def main():
    os.makedirs(OUT, exist_ok=True)
    print(f"make_llama_lora_grad_goldens: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    torch.manual_seed(4404)
    model = make_model()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}  # f32
    lcfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM", bias="none")
    pm = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}  # f32
    assert len(lora) == LAYERS * 4 * 2, sorted(lora)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in lora, sorted(lora)
    assert abs(pm.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] - ALPHA / R) < 1e-12

    embeds = torch.randn(B, T, HIDDEN)  # f32 values, used in float64 below
    ids = torch.randint(0, VOCAB, (B, T))
    labels = torch.randint(0, VOCAB, (B, T))
    labels[:, :3] = -100   # the prompt prefix
    labels[0, 5] = -100    # a hole
    labels[1, -2:] = -100  # right padding

    pm = pm.double()
    pm.train()  # dropout is 0, so train() changes nothing but is what training runs
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert len(trainable) == LAYERS * 8 and all("lora_" in n for n in trainable), sorted(trainable)

    x = embeds.double().requires_grad_(True)
    out = pm(inputs_embeds=x, labels=labels)
    # HF's loss casts the logits to float32 first (ForCausalLMLoss), which would put f32 rounding into a float64
    # reference: the same loss in float64, checked against HF's to f32 precision, is the one differentiated.
    lg = out.logits[:, :-1].reshape(-1, VOCAB)
    tg = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(lg, tg, ignore_index=-100, reduction="mean")
    assert abs(loss.item() - out.loss.item()) < 1e-6 * abs(loss.item()), (loss.item(), out.loss.item())
    loss.backward()

    g = {"inputs_embeds": embeds, "labels": labels.to(torch.int32), "loss": loss.detach().float().reshape(1),
         "logits": out.logits.detach().float(), "grad.inputs_embeds": x.grad.float()}
    g.update(base)
    g.update(lora)
    # PEFT's state-dict names drop the adapter name ("default"); the parameters carry it
    for n, p in trainable.items():
        key = n.replace(".default", "")
        assert key in lora, (n, key)
        g["grad." + key] = p.grad.float()
        print(f"  grad {key}: |g| {p.grad.norm():.4g}")
    with torch.no_grad():
        out_ids = pm(input_ids=ids, labels=labels)
    g["ids.input_ids"] = ids.to(torch.int32)
    g["ids.loss"] = out_ids.loss.float().reshape(1)
    g["ids.logits"] = out_ids.logits.float()
    print(f"  loss {loss.item():.12g} (HF's {out.loss.item():.12g}), ids loss {out_ids.loss.item():.12g}, "
          f"|d embeds| {x.grad.norm():.4g}, targets {(tg != -100).sum().item()}")

    meta = {"format": "agpt-golden-1", "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "llama.heads": str(HEADS), "llama.rms_eps": "1e-06", "lora.r": str(R),
            "lora.alpha": str(ALPHA), "loss": repr(loss.item()), "ids.loss": repr(out_ids.loss.item()),
            "what": "PEFT-LoRA-wrapped HF LlamaForCausalLM (eager), reference in float64 on f32 values: causal-LM "
                    "loss, logits, gradients of every lora_A/lora_B and of inputs_embeds"}
    write(os.path.join(OUT, "lora_grads.safetensors"), g, meta)


if __name__ == "__main__":
    main()
