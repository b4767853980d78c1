"""PyTorch peer for `agpt bench llama`: HF transformers LlamaForCausalLM at LLaMA-7B's shapes (width 4096, 32
heads, MLP 11008, vocab 32001, untied lm_head) with --layers layers and random init, at the same thread count:
prefill tokens/s for B sequences of P tokens (logits of the last position only, as agpt's llama_prefill), then
decode tokens/s: one model(...) call per step with its KV cache (past_key_values, or cache), the same token fed
each step (no sampling, no read-back), as agpt's bench does.

    python3 bench/peers/torch_llama.py --device cpu --threads 2 --layers 2 --batch 1 --json out.json
    python3 bench/peers/torch_llama.py --device cuda --dtype bf16 --batch 1 --batch 32
    python3 bench/peers/torch_llama.py --device cpu --dtype bf16 --layers 32 --threads 2 --prompt 32 --decode 16

The model is built on the meta device and then given uninitialised storage on the real one (to_empty), filled by
normal_ (std 0.02 for the matrices and embeddings, ones for the norms): the module's own init of 7B parameters
would take longer than the benchmark, and only one copy of the weights ever exists (13.5 GB in bf16). The rotary
embedding's inv_freq buffer is computed at construction, so it is rebuilt on the real device.
"""
import argparse
import inspect
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--prompt", type=int, default=80)
    ap.add_argument("--decode", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if dev == "cuda" else "f32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batch or [1]
    layers = args.layers or (32 if dev == "cuda" else 4)
    iters = args.iters or (5 if dev == "cuda" else 2)
    steps = args.decode or (32 if dev == "cuda" else 8)
    P, V = args.prompt, 32001
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                         vocab_size=V, num_hidden_layers=layers, rms_norm_eps=1e-6, rope_theta=10000.0,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    t0 = time.perf_counter()
    torch.manual_seed(7)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # parameters in the compute dtype: no f32 copy of 7B on the host
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(default_dtype)
    model = model.to_empty(device=dev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02)
        with torch.device(dev):
            model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"torch {torch.__version__}: LlamaForCausalLM, {layers} layers, random init ({params / 1e9:.2f} GB, "
          f"made in {time.perf_counter() - t0:.1f} s), {dev} {dt}, {torch.get_num_threads()} threads, "
          f"attention {model.config._attn_implementation}", flush=True)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    # transformers 5.2x renamed past_key_values (argument and output) to cache; use whichever this one has
    kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(tok, past):
        return getattr(model(input_ids=tok, use_cache=True, **{kv: past}), kv)

    runs = []
    with torch.inference_mode():
        for b in batches:
            ids = ((torch.arange(b * P, device=dev) * 7919 + 1) % V).reshape(b, P)
            model(input_ids=ids, use_cache=True, logits_to_keep=1)  # warm-up
            sync()
            t1 = time.perf_counter()
            for _ in range(iters):
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync()
            prefill_s = (time.perf_counter() - t1) / iters
            past, tok = getattr(out, kv), ids[:, :1]
            past = step(tok, past)  # warm-up step
            sync()
            t2 = time.perf_counter()
            for _ in range(steps):
                past = step(tok, past)
            sync()
            step_s = (time.perf_counter() - t2) / steps
            runs.append({"batch": b, "prefill_s": prefill_s, "prefill_tokens_per_s": b * P / prefill_s,
                         "decode_step_s": step_s, "decode_tokens_per_s": b / step_s})
            print(f"batch {b:4d}: prefill {b * P / prefill_s:.1f} tokens/s ({prefill_s:.4f} s), "
                  f"decode {b / step_s:.2f} tokens/s ({step_s * 1e3:.2f} ms/step)", flush=True)
            del out, past
    doc = {"peer": "torch " + torch.__version__, "bench": "llama", "device": dev, "dtype": str(dt),
           "layers": layers, "threads": torch.get_num_threads(), "prompt": P, "decode_steps": steps, "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
