"""ImageBind's vision and text branches (the parts AnomalyGPT uses) plus AnomalyGPT's patch decoder, with the
official module structure and state_dict key names (anomalygpt-reference.md sections 1, 2, 8), at any size.
Used by make_imagebind_goldens.py (small dims) and bench/peers/torch_vit.py (ImageBind-H)."""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    v_width: int = 1280
    v_heads: int = 16
    v_blocks: int = 32
    v_mlp: int = 5120
    patch: int = 14
    image: int = 224
    t_width: int = 1024
    t_heads: int = 16
    t_blocks: int = 24
    t_mlp: int = 4096
    context: int = 77
    vocab: int = 49408
    embed: int = 1024
    taps: list = field(default_factory=lambda: [7, 15, 23, 31])


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class BlockWithMasking(nn.Module):
    """ImageBind transformer.py BlockWithMasking with layer scale None, drop path 0."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=False)
        self.norm_1, self.mlp, self.norm_2 = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, mlp), nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, attn_mask):  # [L,B,C]
        y = self.norm_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, dim, heads, mlp, blocks, pre_ln):
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6)) if pre_ln else None
        self.blocks = nn.ModuleList([BlockWithMasking(dim, heads, mlp) for _ in range(blocks)])

    def forward(self, x, attn_mask=None, out_layers=()):  # x [B,L,C]
        if self.pre_transformer_layer is not None:
            x = self.pre_transformer_layer(x)
        x = x.transpose(0, 1)  # "b l d -> l b d": the trunk runs sequence-first
        taps = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn_mask)
            if i in out_layers:
                taps.append(x)
        return x.transpose(0, 1), taps


class VisionPre(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.v_width))
        self.rgbt_stem = nn.Module()
        self.rgbt_stem.proj = nn.Sequential(nn.Identity(),  # proj.0 is PadIm2Video (no parameters)
                                            nn.Conv3d(3, c.v_width, (2, c.patch, c.patch), (2, c.patch, c.patch),
                                                      bias=False))
        self.pos_embedding_helper = nn.Module()
        n = (c.image // c.patch) ** 2 + 1
        self.pos_embedding_helper.pos_embed = nn.Parameter(torch.zeros(1, n, c.v_width))

    def forward(self, img):  # [B,3,H,W]
        video = img.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # PadIm2Video(repeat, ntimes=2)
        x = self.rgbt_stem.proj[1](video).flatten(2).transpose(1, 2)  # [B,256,C]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embedding_helper.pos_embed


class TextPre(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab, c.t_width)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.context, c.t_width))
        self.register_buffer("mask", torch.empty(c.context, c.context).fill_(float("-inf")).triu_(1))

    def forward(self, ids):
        return self.token_embedding(ids) + self.pos_embed


class Model(nn.Module):
    def __init__(self, c=Config(), text=True):
        super().__init__()
        self.config = c
        pre = {"vision": VisionPre(c)}
        trunks = {"vision": Trunk(c.v_width, c.v_heads, c.v_mlp, c.v_blocks, True)}
        heads = {"vision": nn.Sequential(nn.LayerNorm(c.v_width, eps=1e-6), nn.Identity(),  # 1 = SelectElement(0)
                                         nn.Linear(c.v_width, c.embed, bias=False))}
        if text:
            pre["text"] = TextPre(c)
            trunks["text"] = Trunk(c.t_width, c.t_heads, c.t_mlp, c.t_blocks, False)
            heads["text"] = nn.Module()
            heads["text"].proj = nn.Sequential(nn.LayerNorm(c.t_width, eps=1e-6),
                                               nn.Linear(c.t_width, c.embed, bias=False))
        self.modality_preprocessors = nn.ModuleDict(pre)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        if text:
            self.modality_postprocessors = nn.ModuleDict({"text": nn.Sequential(nn.Identity(), nn.Module())})
            self.modality_postprocessors["text"][1].log_logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07)))
        self.image_decoder = nn.Module()
        self.image_decoder.fc = nn.ModuleList([nn.Linear(c.v_width, c.embed) for _ in range(4)])

    def encode_image(self, img):
        x = self.modality_preprocessors["vision"](img)
        x, taps = self.modality_trunks["vision"](x, None, self.config.taps)
        h = self.modality_heads["vision"]
        emb = h[2](h[0](x)[:, 0])
        return F.normalize(emb, dim=-1), taps  # taps: [257,B,C] each

    def encode_text(self, ids):
        pre = self.modality_preprocessors["text"]
        x, _ = self.modality_trunks["text"](pre(ids), pre.mask)
        x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]  # SelectEOSAndProject: the EOT position
        x = self.modality_heads["text"].proj(x)
        scale = self.modality_postprocessors["text"][1].log_logit_scale.exp().clamp(max=100)
        return F.normalize(x, dim=-1) * scale


