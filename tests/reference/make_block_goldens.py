#!/usr/bin/env python3
"""Golden files for one ViT block (ImageBind BlockWithMasking) and one LLaMA decoder layer (HF transformers).

Writes, under tests/data/:
  vit_block.safetensors    prefixes "plain." (vision-style, no mask) and "causal." (text-encoder style,
                           additive -inf mask triu(1))
  llama_layer.safetensors  prefixes "pos0." (positions 0..T-1) and "pos5." (positions 5..5+T-1)

Each case holds the weights under the peer's own state_dict names, the input "x", the output "y", the
upstream gradient "dout" (the loss is sum(y * dout)), and "grad.x" plus "grad.<param name>" for every
parameter. Everything is float32, seeded and deterministic; the config is in __metadata__ as strings.

Layouts: the ImageBind trunk runs sequence-first [L,B,C]; the file stores x, y, dout and grad.x batch-first
[B,L,C] (the transpose of what the module sees), which is the layout the C code uses. LLaMA is batch-first
[B,T,C] already.

Sizes: the plain block has dim 160 (the smallest with two heads of the real ViT head dim 80) and an MLP of 2x
(ImageBind's is 4x; the ratio is read from the file), the causal one dim 128 with an MLP of 1x, so
vit_block.safetensors is about 2.4 MB and llama_layer.safetensors 1.8 MB. To keep them from growing further, the "pos5." LLaMA case
stores only y, grad.x and the q/k projection gradients: a position-dependent bug can only sit in RoPE or its
backward, which those catch; every other parameter gradient is checked in "pos0.".

Run: tests/reference/.venv/bin/python tests/reference/make_block_goldens.py [out_dir]
(or bash tests/reference/make_goldens.sh, which makes every golden file).
"""
import math
import os
import sys

import torch
from torch import nn
from golden_io import write

import transformers
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # reproducible reductions across machines

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "data")


# --------------------------------------------------------------------------------------------------------
# ImageBind BlockWithMasking (code/model/ImageBind/models/transformer.py), with layer_scale_type None,
# drop_path 0, dropout 0: x = x + attn(LN1(x)); x = x + mlp(LN2(x)).

class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, approximate='none'
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class BlockWithMasking(nn.Module):
    def __init__(self, dim, heads, mlp_hidden):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=False, batch_first=False)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, attn_mask):  # x: [L,B,C]
        y = self.norm_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        x = x + self.mlp(self.norm_2(x))
        return x


def randomise_(module):
    """Non-trivial values for every parameter, so a swapped or ignored tensor makes the test fail.
    Linear weights keep PyTorch's init scale; norms get w ~ 1 + 0.2 N(0,1) and biases ~ 0.1 N(0,1)
    (MultiheadAttention starts its biases at zero, which would hide a missing bias)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound)


def vit_case(prefix, dim, heads, mlp_hidden, L, B, causal, tensors, meta):
    block = BlockWithMasking(dim, heads, mlp_hidden)
    randomise_(block)
    block.train()  # dropout is 0 everywhere; train mode keeps MHA off its inference fast path

    x = torch.randn(B, L, dim)        # batch-first, as stored
    dout = torch.randn(B, L, dim)
    mask = None
    if causal:  # ImageBind build_causal_attention_mask: additive -inf above the diagonal
        mask = torch.empty(L, L).fill_(float("-inf")).triu_(1)

    xs = x.clone().transpose(0, 1).contiguous().requires_grad_(True)  # [L,B,C], what the trunk sees
    ys = block(xs, mask)
    y = ys.transpose(0, 1).contiguous()                               # back to [B,L,C]
    (y * dout).sum().backward()

    tensors[prefix + "x"] = x
    tensors[prefix + "y"] = y.detach()
    tensors[prefix + "dout"] = dout
    tensors[prefix + "grad.x"] = xs.grad.transpose(0, 1).contiguous()
    for name, p in block.named_parameters():
        tensors[prefix + name] = p.detach().clone()
        tensors[prefix + "grad." + name] = p.grad.detach().clone()

    meta[prefix + "dim"] = str(dim)
    meta[prefix + "heads"] = str(heads)
    meta[prefix + "head_dim"] = str(dim // heads)
    meta[prefix + "mlp_hidden"] = str(mlp_hidden)
    meta[prefix + "seq_len"] = str(L)
    meta[prefix + "batch"] = str(B)
    meta[prefix + "causal"] = "1" if causal else "0"
    meta[prefix + "eps"] = "1e-6"
    print(f"  vit {prefix:8s} dim {dim} heads {heads} (head dim {dim // heads}) L {L} B {B} causal {int(causal)}: "
          f"|y| {y.norm():.4f}  |grad.x| {xs.grad.norm():.4f}")


def make_vit():
    torch.manual_seed(1234)
    tensors, meta = {}, {"format": "agpt-golden-1", "what": "ImageBind BlockWithMasking, pre-LN, batch-first [B,L,C] "
                         "(the module ran on the transpose [L,B,C]); loss = sum(y * dout)",
                         "torch": torch.__version__}
    # MLP widths are smaller than ImageBind's 4x to keep the files small; 2x in the plain case keeps fc1 and fc2
    # of different shapes, so a swap of the two cannot pass.
    vit_case("plain.", dim=160, heads=2, mlp_hidden=320, L=17, B=2, causal=False, tensors=tensors, meta=meta)
    vit_case("causal.", dim=128, heads=2, mlp_hidden=128, L=9, B=1, causal=True, tensors=tensors, meta=meta)
    return tensors, meta


# --------------------------------------------------------------------------------------------------------
# One HF LlamaDecoderLayer.

LLAMA = dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
             rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, mlp_bias=False, hidden_act="silu",
             num_hidden_layers=1, max_position_embeddings=64, vocab_size=32)


def llama_config():
    cfg = LlamaConfig(
        hidden_size=LLAMA["hidden_size"], intermediate_size=LLAMA["intermediate_size"],
        num_attention_heads=LLAMA["num_attention_heads"], num_key_value_heads=LLAMA["num_key_value_heads"],
        rms_norm_eps=LLAMA["rms_norm_eps"], attention_bias=False, mlp_bias=False, hidden_act="silu",
        num_hidden_layers=1, max_position_embeddings=LLAMA["max_position_embeddings"],
        vocab_size=LLAMA["vocab_size"],
        rope_parameters={"rope_type": "default", "rope_theta": LLAMA["rope_theta"]},
        attn_implementation="eager",  # the plain softmax(q k^T * scale + mask) v path
    )
    assert cfg.rope_parameters["rope_theta"] == LLAMA["rope_theta"], cfg.rope_parameters
    assert cfg._attn_implementation == "eager"
    return cfg


def llama_run(cfg, layer, rotary, x, dout, start):
    B, T, _ = x.shape
    position_ids = (torch.arange(T) + start).unsqueeze(0).expand(B, T).contiguous()
    xg = x.clone().requires_grad_(True)
    position_embeddings = rotary(xg, position_ids)  # (cos, sin), each [B,T,head_dim]
    # The mask as LlamaModel.forward builds it (no padding, no cache); materialised for eager attention.
    mask = create_causal_mask(config=cfg, inputs_embeds=xg, attention_mask=None, cache=None,
                              position_ids=position_ids, allow_is_causal_skip=False)
    assert mask is not None and mask.dtype == torch.float32, mask
    blocked = mask[:, 0] < -1e30                      # [B,T,T]
    assert torch.equal(blocked, torch.ones(T, T, dtype=torch.bool).triu(1).expand(B, T, T)), "not plain causal"
    layer.zero_grad(set_to_none=True)
    y = layer(xg, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
    if isinstance(y, tuple):  # older transformers returned (hidden_states, ...)
        y = y[0]
    (y * dout).sum().backward()
    return position_ids, y.detach(), xg.grad.detach()


def make_llama():
    torch.manual_seed(4321)
    cfg = llama_config()
    layer = LlamaDecoderLayer(cfg, layer_idx=0)
    rotary = LlamaRotaryEmbedding(config=cfg)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound)
    layer.train()  # attention dropout is 0.0

    B, T = 2, 11
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H
    tensors = {}
    meta = {"format": "agpt-golden-1", "what": "HF transformers LlamaDecoderLayer, eager attention, causal, "
            "batch-first [B,T,C]; loss = sum(y * dout); weights are shared by both cases and stored once",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "hidden": str(cfg.hidden_size), "intermediate": str(cfg.intermediate_size), "heads": str(H),
            "kv_heads": str(cfg.num_key_value_heads), "head_dim": str(D), "rms_norm_eps": "1e-6",
            "rope_theta": "10000", "seq_len": str(T), "batch": str(B), "cases": "pos0,pos5"}
    for name, p in layer.named_parameters():
        tensors[name] = p.detach().clone()

    for prefix, start, full in (("pos0.", 0, True), ("pos5.", 5, False)):
        x = torch.randn(B, T, cfg.hidden_size)
        dout = torch.randn(B, T, cfg.hidden_size)
        positions, y, gx = llama_run(cfg, layer, rotary, x, dout, start)
        tensors[prefix + "x"] = x
        tensors[prefix + "positions"] = positions.to(torch.int32)
        tensors[prefix + "y"] = y
        tensors[prefix + "dout"] = dout
        tensors[prefix + "grad.x"] = gx
        for name, p in layer.named_parameters():
            if full or name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                tensors[prefix + "grad." + name] = p.grad.detach().clone()
        meta[prefix + "position_start"] = str(start)
        print(f"  llama {prefix:6s} positions {start}..{start + T - 1} B {B} T {T} hidden {cfg.hidden_size} "
              f"heads {H} (head dim {D}): |y| {y.norm():.4f}  |grad.x| {gx.norm():.4f}")
    return tensors, meta


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    print(f"make_block_goldens: torch {torch.__version__}, transformers {transformers.__version__}")
    t, m = make_vit()
    write(os.path.join(OUT_DIR, "vit_block.safetensors"), t, m)
    t, m = make_llama()
    write(os.path.join(OUT_DIR, "llama_layer.safetensors"), t, m)


if __name__ == "__main__":
    main()
