#!/usr/bin/env python3
"""End-to-end golden for the assembled AnomalyGPT (anomalygpt-reference.md 0, 4, 5.4-5.6): a PyTorch
re-expression of the reference's prepare_generation_embedding and greedy generation on small parts:

  vision    the ImageBind-structured golden model of make_imagebind_goldens.py (tests/data/imagebind), query.png,
            the zero-shot map of the class the prompt names ('bottle', from its cached text features)
  prompts   the PromptLearner of code/model/AnomalyGPT_models.py (make_prompt_learner_goldens.PromptLearner) at
            small widths, and llama_proj
  LLM       HF LlamaForCausalLM (hidden 64, 2 layers, 4 heads, Vicuna v0's 32001 rows) with PEFT LoRA
            (r 8, alpha 16, q/k/v/o) saved under PandaGPT's key names, so the C side merges it
  tokens    the real LLaMA tokenizer.model through sentencepiece (= HF's slow LlamaTokenizer with
            add_special_tokens=False for these texts); each prompt piece tokenised on its own

Writes tests/data/anomalygpt/parts.safetensors: the LLM, LoRA, prompt learner and llama_proj weights (the token
table and lm_head sparsely: only the rows the test uses are non-zero, rebuilt by the C test), and
  golden.embeds [T,64]   the LLM input   golden.logits0 [32001]   the logits after the prefill
  golden.tokens [n] i32  greedy tokens   metadata "answer": decode(tokens[:-2], skip_special_tokens)
Needs ../shared/data/llama-tokenizer.model (skips with a message when it is missing).
"""
import math
import os
import sys

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import make_imagebind_goldens as ib
from golden_io import write
from imagebind_modules import Config, Model
from make_prompt_learner_goldens import PromptLearner

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")
TOKENIZER = os.path.join(HERE, "..", "..", "..", "shared", "data", "llama-tokenizer.model")
OUT = os.path.join(DATA, "anomalygpt", "parts.safetensors")

HIDDEN, INTER, LAYERS, HEADS, VOCAB, R, ALPHA = 64, 172, 2, 4, 32001, 8, 16
WIDTHS = (4, 8, 8, 16, 16)
PROMPT = "This is a photo of a bottle for anomaly detection. Is there any anomaly in the image?"
MAX_NEW = 24


def vision_model():
    c = Config(ib.V_WIDTH, ib.V_HEADS, ib.V_BLOCKS, ib.V_MLP, ib.PATCH, ib.IMAGE, ib.T_WIDTH, ib.T_HEADS, ib.T_BLOCKS,
               ib.T_MLP, ib.CONTEXT, ib.VOCAB, ib.EMBED, ib.TAPS)
    model = Model(c, text=False)
    sd = {k: v.float() for k, v in load_file(os.path.join(DATA, "imagebind", "model.safetensors")).items()}
    missing, _ = model.load_state_dict(sd, strict=False)
    assert not missing, missing
    return model.eval(), sd


def main():
    if not os.path.exists(TOKENIZER):
        print(f"make_anomalygpt_goldens: {TOKENIZER} is missing; skipped")
        return
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    torch.manual_seed(77)
    vm, sd = vision_model()
    pl = PromptLearner(1, HIDDEN, WIDTHS)
    proj = torch.nn.Linear(ib.EMBED, HIDDEN)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, vocab_size=VOCAB, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=256,
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    llm = LlamaForCausalLM(cfg)

    pieces = ["### Human: <Img>", "</Img> ", PROMPT + "\n### Assistant:"]
    ids = [sp.encode(p) for p in pieces]
    # Rows of the token table and lm_head that are not zero: every prompt id, the stop ids, and a random set the
    # answer can wander through.
    rows = sorted(set(sum(ids, [])) | {0, 1, 2, 13, 2277, 29937} |
                  set(torch.randint(3, 32000, (600,), generator=torch.Generator().manual_seed(3)).tolist()))
    rows_t = torch.tensor(rows)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.zero_()
                p[rows_t] = torch.randn(len(rows), HIDDEN) * (1.0 if "embed" in name else 0.5)
            else:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound)
        for m in pl.meta_net:
            if isinstance(m, torch.nn.Conv2d):
                bound = 1.0 / math.sqrt(m.weight[0].numel())
                m.weight.uniform_(-bound, bound)
                m.bias.uniform_(-bound, bound)
    llm.eval()
    base = {k: v.detach().clone() for k, v in llm.state_dict().items()}
    pm = get_peft_model(llm, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    pm.eval()

    with torch.no_grad():
        # Vision: the query's zero-shot map for the class the prompt names, and its embedding.
        q = Image.open(os.path.join(DATA, "imagebind", "query.png")).convert("RGB")
        x = ib.to_input(np.asarray(q))[None]
        emb, taps = vm.encode_image(x)
        anomaly_map = ib.text_map(vm, taps, sd["text_features.bottle"][None])  # [1,224,224]
        prompts = pl(anomaly_map[:, None])                                      # [1,18,64]
        image_token = proj(emb)[:, None]                                        # [1,1,64]
        embed = pm.get_input_embeddings()
        e = lambda t: embed(torch.tensor(t)[None])  # noqa: E731
        E = torch.cat([e([1]), e(ids[0]), image_token, e(ids[1]), prompts, e(ids[2])], dim=1)
        out = pm(inputs_embeds=E, use_cache=True)
        logits0 = out.logits[0, -1].clone()
        pkv, last = out.past_key_values, out.logits[:, -1]
        tokens, margins = [], []
        for _ in range(MAX_NEW):
            top = last[0].topk(2).values
            margins.append((top[0] - top[1]).item())
            tok = int(last[0].argmax())
            tokens.append(tok)
            if tok in (2277, 2):
                break
            o = pm(input_ids=torch.tensor([[tok]]), past_key_values=pkv, use_cache=True)
            pkv, last = o.past_key_values, o.logits[:, -1]
        keep = [t for t in tokens[:-2] if t not in (0, 1, 2) and t < sp.get_piece_size()]
        answer = sp.decode(keep)

    tensors = {}
    for k, v in base.items():
        if "embed_tokens" in k or "lm_head" in k:
            tensors["sparse." + k + ".rows"] = rows_t.to(torch.int32)
            tensors["sparse." + k + ".values"] = v[rows_t].clone()
        else:
            tensors[k] = v
    for k, v in get_peft_model_state_dict(pm).items():  # PandaGPT's key names
        tensors["llama_model." + k.replace(".lora_A.weight", ".lora_A.default.weight")
                .replace(".lora_B.weight", ".lora_B.default.weight")] = v.detach().clone()
    for k, v in pl.state_dict().items():
        tensors["prompt_learner." + k] = v.detach().clone()
    for k, v in proj.state_dict().items():
        tensors["llama_proj." + k] = v.detach().clone()
    tensors["golden.embeds"] = E[0].clone()
    tensors["golden.logits0"] = logits0
    tensors["golden.tokens"] = torch.tensor(tokens, dtype=torch.int32)
    tensors["golden.map_score"] = anomaly_map.max().reshape(1)
    meta = {"llama.heads": str(HEADS), "lora.alpha": str(ALPHA), "prompt": PROMPT, "answer": answer,
            "min_top2_margin": f"{min(margins):.6f}", "torch": torch.__version__}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    write(OUT, tensors, meta)
    print(f"  prefix {E.shape[1]} tokens, {len(tokens)} generated {tokens}, min top-2 margin {min(margins):.4f}")
    print(f"  answer: {answer!r}")


if __name__ == "__main__":
    main()
