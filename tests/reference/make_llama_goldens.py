#!/usr/bin/env python3
"""Golden files for the LLaMA language model with LoRA, a KV cache and greedy generation (model/llama.c),
made with the real peers: HF transformers LlamaForCausalLM wrapped by PEFT LoRA (anomalygpt-reference.md 5.1,
5.2, 5.6) on a small seeded config.

Writes tests/data/llama/:
  base.safetensors    the base model under HF names (model.embed_tokens.weight, model.layers.N...., model.norm.weight,
                      lm_head.weight), f32; metadata llama.heads
  lora.safetensors    the LoRA A/B as PEFT saves them (get_peft_model_state_dict: base_model.model.model.layers.N.
                      self_attn.{q,k,v}_proj.lora_A.weight [r,in] / lora_B.weight [out,r]), f32; metadata lora.alpha,
                      lora.r. The C side merges W' = W + alpha/r * B @ A at load.
  golden.safetensors  inputs and outputs of the LoRA-wrapped model, f32 / i32:
    b1.embeds [1,T,C]          random inputs_embeds (T = 13)
    b1.prefill_logits [1,V]    logits of the last position of the prefill
    b1.step_tokens [S] i32     the argmax token fed at each decode step (S = 5), the first from the prefill
    b1.step_logits [S,V]       logits of each decode step over the KV cache
    b2.*                       the same for a batch of two sequences of length T ([2,...]; 3 steps)
    gen.embeds [1,T,C]         inputs_embeds for greedy generation
    gen.tokens [40] i32        model.generate(do_sample=False, max_new_tokens=40) with an eos id that never occurs
    gen_stop.tokens [n] i32    the same with eos = the last token of gen.tokens that is a first occurrence (the
                               greedy output falls into a cycle), so the output stops there, eos included
    nolora.prefill_logits [1,V] the b1 prefill through the base model alone (LoRA disabled)
  metadata: config, gen.eos (the never-produced id), gen_stop.eos, min top-2 logit margin along the generations.

Weights are random: linear weights U(-1/sqrt(in), 1/sqrt(in)), norms 1 + 0.2 N(0,1), embeddings N(0,1),
lora_A PEFT's kaiming init, lora_B N(0, 0.05^2) (PEFT starts it at zero, which would hide the merge).
Run: tests/reference/.venv/bin/python tests/reference/make_llama_goldens.py [out_dir]  (or make_goldens.sh)
"""
import math
import os
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, GenerationConfig
import peft
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from golden_io import write

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "data", "llama")

HIDDEN, INTER, LAYERS, HEADS, VOCAB = 64, 172, 2, 4, 300
R, ALPHA = 8, 16
T, STEPS_B1, STEPS_B2, MAX_NEW = 13, 5, 3, 40


def make_model():
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      max_position_embeddings=128, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                      hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      attn_implementation="eager")
    assert cfg.rope_parameters["rope_theta"] == 10000.0
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
    model.eval()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    return cfg, model


@torch.no_grad()
def prefill_and_steps(model, embeds, steps):
    """Prefill logits of the last position, then `steps` decode steps over the cache, feeding the argmax."""
    out = model(inputs_embeds=embeds, use_cache=True)
    last = out.logits[:, -1, :]
    pkv = out.past_key_values
    tokens, logits = [], []
    tok = last.argmax(-1)
    for _ in range(steps):
        tokens.append(tok)
        o = model(input_ids=tok[:, None], past_key_values=pkv, use_cache=True)
        pkv = o.past_key_values
        logits.append(o.logits[:, -1, :])
        tok = o.logits[:, -1, :].argmax(-1)
    return last.clone(), torch.stack(tokens, 1).to(torch.int32), torch.stack(logits, 1)


def margin(logits):
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()


@torch.no_grad()
def generate(model, embeds, eos):
    gc = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=eos,
                          bos_token_id=1, num_beams=1, use_cache=True)
    out = model.generate(inputs_embeds=embeds, generation_config=gc, output_scores=True,
                         return_dict_in_generate=True)
    seq = out.sequences[0]
    assert seq.shape[0] == len(out.scores), "generate with inputs_embeds returns only the new tokens"
    return seq.to(torch.int32), min(margin(s) for s in out.scores)


def main():
    os.makedirs(OUT, exist_ok=True)
    print(f"make_llama_goldens: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    torch.manual_seed(2024)
    cfg, model = make_model()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in base and "model.embed_tokens.weight" in base

    lcfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM", bias="none")
    pm = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    pm.eval()
    lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    assert len(lora) == LAYERS * 4 * 2, sorted(lora)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in lora, sorted(lora)

    g, meta = {}, {"format": "agpt-golden-1", "torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__, "hidden": str(HIDDEN), "intermediate": str(INTER),
                   "layers": str(LAYERS), "heads": str(HEADS), "vocab": str(VOCAB), "lora.r": str(R),
                   "lora.alpha": str(ALPHA), "seq_len": str(T), "gen.max_new": str(MAX_NEW),
                   "what": "PEFT-LoRA-wrapped HF LlamaForCausalLM (eager attention), f32: prefill logits of the "
                           "last position, decode steps over the KV cache, greedy generation"}
    margins = []
    e1 = torch.randn(1, T, HIDDEN)
    e2 = torch.randn(2, T, HIDDEN)
    for prefix, emb, steps in (("b1.", e1, STEPS_B1), ("b2.", e2, STEPS_B2)):
        last, toks, logits = prefill_and_steps(pm, emb, steps)
        g[prefix + "embeds"] = emb
        g[prefix + "prefill_logits"] = last
        g[prefix + "step_tokens"] = toks if prefix == "b2." else toks[0]
        g[prefix + "step_logits"] = logits if prefix == "b2." else logits[0]
        margins += [margin(last), margin(logits)]
        print(f"  {prefix} prefill |logits| {last.norm():.4f}, steps {toks.tolist()}")

    with pm.disable_adapter():
        out = pm(inputs_embeds=e1)
        g["nolora.prefill_logits"] = out.logits[:, -1, :].detach().clone()
    diff = (g["nolora.prefill_logits"] - g["b1.prefill_logits"]).norm() / g["b1.prefill_logits"].norm()
    print(f"  LoRA changes the prefill logits by rel L2 {diff:.3f}")
    assert diff > 0.05

    # Generation: first with an eos id that is never produced (all MAX_NEW tokens), then with eos set to a
    # token at its first occurrence, so generation stops right there.
    eg = torch.randn(1, T, HIDDEN)
    probe, _ = generate(pm, eg, eos=VOCAB + 1)  # an id outside the vocabulary cannot occur
    unused = next(i for i in range(3, VOCAB) if i not in probe.tolist())
    toks, m1 = generate(pm, eg, eos=unused)
    assert torch.equal(toks, probe) and toks.shape[0] == MAX_NEW
    print(f"  generate: {toks.tolist()}")
    firsts = [i for i in range(1, MAX_NEW) if toks[i].item() not in toks[:i].tolist()]
    stop_at = firsts[-1]  # the latest first occurrence
    stop_id = toks[stop_at].item()
    stoks, m2 = generate(pm, eg, eos=stop_id)
    assert stoks.shape[0] == stop_at + 1 and torch.equal(stoks, toks[:stop_at + 1]), (stoks, toks)
    g["gen.embeds"] = eg
    g["gen.tokens"] = toks
    g["gen_stop.tokens"] = stoks
    meta["gen.eos"] = str(unused)
    meta["gen_stop.eos"] = str(stop_id)
    margins += [m1, m2]
    meta["min_top2_margin"] = f"{min(margins):.6f}"
    print(f"  generate: {toks.tolist()}\n  stop at {stop_at} (id {stop_id}); min top-2 margin {min(margins):.4g}")
    assert min(margins) > 1e-3, "argmax too close to a tie for a token-exact golden: change the seed"

    write(os.path.join(OUT, "base.safetensors"), base, {"format": "agpt-golden-1", "llama.heads": str(HEADS)})
    write(os.path.join(OUT, "lora.safetensors"), lora, {"format": "agpt-golden-1", "lora.alpha": str(ALPHA),
                                                        "lora.r": str(R)})
    write(os.path.join(OUT, "golden.safetensors"), g, meta)


if __name__ == "__main__":
    main()
