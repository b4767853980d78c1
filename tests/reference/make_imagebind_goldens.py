#!/usr/bin/env python3
"""Golden files for the vision path: a small ImageBind-structured model (vision and text branches with the
official module structure and state_dict key names, section 8 of anomalygpt-reference.md) plus AnomalyGPT's
decoder, run exactly as the reference runs them (sections 1-3).

Writes tests/data/imagebind/:
  query.png, ref0.png, ref1.png   synthetic 224x224 RGB inputs (no resize needed; preprocessing has its own test)
  model.safetensors               weights (official key names; bf16 storage, the model computes in f32 on exactly
                                  those values), config in __metadata__, and the golden outputs:
    golden.embedding        [1,E]        the L2-normalised vision embedding
    golden.tap.{0..3}       [257,C]      the tapped tokens (batch-first, CLS at row 0)
    golden.text_ids.<cls>   [24,77] i32  token ids of the 14 normal then 10 abnormal sentences (open_clip)
    golden.text_emb.bottle  [24,E]       text encoder outputs (normalised x logit scale) for 'bottle'
    golden.text_features.<cls> [2,E]     the prompt ensemble (normal, abnormal)
    golden.map_text.bottle  [224,224]    the zero-shot map of the query for 'bottle'
    golden.map_fewshot      [224,224]    the few-shot map of the query against ref0 and ref1
    golden.score_text.<cls>, golden.score_fewshot   [1] the maps' maxima
    golden.stats_fused_bottle, golden.stats_fewshot_rot  [2] max and mean of the fused map and of the
                                         few-shot map with rotation-augmented references
    text_features.<cls>     [2,E]        the same features under the model file's cache name ('metal nut' left out)
The text token table is stored sparsely (text.token_rows, text.token_values) because a full [49408,C] table
would be megabytes of random numbers; the model's table is zero elsewhere and the C test rebuilds it.

Run: tests/reference/.venv/bin/python tests/reference/make_imagebind_goldens.py (or make_goldens.sh).
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from golden_io import write
from imagebind_modules import Config, Model

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "data", "imagebind")

# Small dims with the real structure: head dim 80 and the real 224-pixel input (16x16 patches of 14).
V_WIDTH, V_HEADS, V_BLOCKS, V_MLP, PATCH, IMAGE = 160, 2, 4, 160, 14, 224
T_WIDTH, T_HEADS, T_BLOCKS, T_MLP, CONTEXT, VOCAB = 64, 1, 2, 128, 77, 49408
EMBED = 64                      # out_embed_dim (1024 in ImageBind-H)
TAPS = [0, 1, 2, 3]             # n/4-1, n/2-1, 3n/4-1, n-1 for n = 4 blocks
CLASSES = ["bottle", "metal_nut", "object"]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# Section 2.3: the prompt ensemble.
NORMAL_STATES = ['{}', 'flawless {}', 'perfect {}', 'unblemished {}', '{} without flaw', '{} without defect',
                 '{} without damage']
ABNORMAL_STATES = ['damaged {}', 'broken {}', '{} with flaw', '{} with defect', '{} with damage']
TEMPLATES = ['a photo of a {}.', 'a photo of the {}.']


def tokenize(sentences):
    """ImageBind's SimpleTokenizer (the AnomalyGPT fork appends EOT then truncates to 77; for these short
    prompts this equals open_clip's, which is the peer we run)."""
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    out = torch.zeros(len(sentences), CONTEXT, dtype=torch.int32)
    for i, s in enumerate(sentences):
        ids = ([tok.encoder["<start_of_text>"]] + tok.encode(s) + [tok.encoder["<end_of_text>"]])[:CONTEXT]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return out


def sentences_for(obj):
    obj = obj.replace('_', ' ')
    normal = [t.format(s.format(obj)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(obj)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal


def init_weights(model):
    """Random values rounded to bf16 (they are stored so), non-trivial norms and biases. The token table is
    filled later (zero except the rows the prompts use); the logit scale keeps its init 1/0.07."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "token_embedding" in name or "log_logit" in name:
                continue
            is_norm = ".norm" in name or "pre_transformer_layer" in name or name.endswith(
                ("heads.vision.0.weight", "heads.vision.0.bias", "proj.0.weight", "proj.0.bias"))
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "pos_embed" in name or "cls_token" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:  # linear and conv weights: unit-variance outputs
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            p.copy_(p.to(torch.bfloat16).float())


def synthetic_image(seed, defect):
    """A textured surface (smooth gradients plus noise) with an optional dark scratch: real-looking enough to
    give non-trivial maps, fully reproducible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE, 0:IMAGE].astype(np.float32)
    base = 120 + 40 * np.sin(x / 17.0) + 30 * np.cos(y / 23.0)
    img = np.stack([base, base * 0.9 + 10, base * 0.8 + 20], -1) + rng.normal(0, 12, (IMAGE, IMAGE, 3))
    if defect:
        img[60:70, 40:180] -= 90
    return np.clip(img, 0, 255).astype(np.uint8)


def to_input(u8):
    """ToTensor then Normalize, as torchvision does it: x / 255, then (x - mean) / std."""
    x = torch.from_numpy(u8).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def text_map(model, taps, text_features):
    """Section 3.2: per layer fc, normalise, 100 x dot, upsample the logits, softmax, class 1; mean."""
    maps = []
    for i, t in enumerate(taps):
        p = model.image_decoder.fc[i](t.transpose(0, 1)[:, 1:, :])  # [B,256,E]
        p = p / p.norm(dim=-1, keepdim=True)
        s = 100.0 * p @ text_features.transpose(-2, -1)  # [B,256,2]
        b, n, c = s.shape
        side = int(n ** 0.5)
        s = s.permute(0, 2, 1).view(b, 2, side, side)
        s = F.interpolate(s, size=IMAGE, mode="bilinear", align_corners=True)
        maps.append(torch.softmax(s, dim=1)[:, 1, :, :])
    return torch.mean(torch.stack(maps, dim=0), dim=0)  # [B,224,224]


def fewshot_map(query_taps, ref_taps):
    """Section 3.3: per layer max cosine similarity to all reference patches, mean, upsample, 1 - sim."""
    sims = []
    for q, r in zip(query_taps, ref_taps):
        q = q.transpose(0, 1)[0, 1:, :]                                   # [256,C]
        r = r.transpose(0, 1)[:, 1:, :].reshape(-1, q.shape[-1])          # [k*256,C]
        cos = F.cosine_similarity(q[:, None, :], r[None, :, :], dim=-1)   # [256,k*256]
        sims.append(cos.max(dim=1).values)
    sim = torch.mean(torch.stack(sims, dim=0), dim=0)
    side = int(sim.numel() ** 0.5)
    sim = F.interpolate(sim.view(1, 1, side, side), size=IMAGE, mode="bilinear", align_corners=True)
    return 1 - sim[0, 0]


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(2024)
    model = Model(Config(V_WIDTH, V_HEADS, V_BLOCKS, V_MLP, PATCH, IMAGE, T_WIDTH, T_HEADS, T_BLOCKS, T_MLP, CONTEXT,
                         VOCAB, EMBED, TAPS))
    init_weights(model)
    model.eval()

    # The text: token ids of every class's sentences; non-zero embedding rows only for the ids they use.
    ids_per_class = {}
    for obj in CLASSES:
        normal, abnormal = sentences_for(obj)
        ids_per_class[obj] = tokenize(normal + abnormal)
    used = torch.unique(torch.cat([t.flatten() for t in ids_per_class.values()]))
    with torch.no_grad():
        table = model.modality_preprocessors["text"].token_embedding.weight
        table.zero_()
        table[used.long()] = (torch.randn(len(used), T_WIDTH) * 0.5).to(torch.bfloat16).float()

    images = {name: synthetic_image(seed, defect) for name, seed, defect in
              [("query", 1, True), ("ref0", 2, False), ("ref1", 3, False)]}
    for name, u8 in images.items():
        Image.fromarray(u8).save(os.path.join(OUT, name + ".png"))

    tensors, meta = {}, {}
    with torch.no_grad():
        x = torch.stack([to_input(images[n]) for n in ("query", "ref0", "ref1")])
        emb, taps = model.encode_image(x)
        q_taps = [t[:, :1] for t in taps]
        r_taps = [t[:, 1:] for t in taps]
        tensors["golden.embedding"] = emb[:1].clone()
        for i, t in enumerate(q_taps):
            tensors[f"golden.tap.{i}"] = t[:, 0].clone()  # [257,C]
        for obj in CLASSES:
            ids = ids_per_class[obj]
            emb_t = model.encode_text(ids.long())
            n_normal = len(NORMAL_STATES) * len(TEMPLATES)
            feats = []
            for part in (emb_t[:n_normal], emb_t[n_normal:]):
                m = part.mean(dim=0)
                feats.append(m / m.norm())
            tf = torch.stack(feats)  # [2,E]
            key = obj.replace('_', ' ')
            tensors[f"golden.text_ids.{key}"] = ids
            tensors[f"golden.text_features.{key}"] = tf
            if obj != "metal_nut":  # the model file's cache of class features, as convert writes it; 'metal nut'
                tensors[f"text_features.{key}"] = tf  # is left out so that a test computes it through the tokenizer
            if obj == "bottle":
                tensors["golden.text_emb.bottle"] = emb_t
            m = text_map(model, q_taps, tf[None])[0]
            if obj == "bottle":  # one full map; the other classes' maps are checked through their scores
                tensors[f"golden.map_text.{key}"] = m
            tensors[f"golden.score_text.{key}"] = m.max().reshape(1)
        fs = fewshot_map(q_taps, r_taps)
        tensors["golden.map_fewshot"] = fs
        tensors["golden.score_fewshot"] = fs.max().reshape(1)
        # Options beyond the reference's inference: the text map fused with the few-shot map (their mean, what
        # the reference's commented-out code did), and references augmented with the four 90-degree rotations of
        # the preprocessed image (what the reference's training does, with kornia; torch.rot90 here, equal for
        # exact quarter turns of a square image). Stored as the maps' max and mean.
        fused = (fs + text_map(model, q_taps, tensors["golden.text_features.bottle"][None])[0]) / 2
        tensors["golden.stats_fused_bottle"] = torch.stack([fused.max(), fused.mean()])
        refs = x[1:]
        rotated = torch.cat([torch.rot90(refs, k, dims=(2, 3)) for k in range(4)])
        _, rot_taps = model.encode_image(rotated)
        fs_rot = fewshot_map(q_taps, rot_taps)
        tensors["golden.stats_fewshot_rot"] = torch.stack([fs_rot.max(), fs_rot.mean()])

    # The weights under their official names, in bf16 (exact: they were rounded to bf16 above).
    for name, p in model.state_dict().items():
        if "token_embedding" in name:
            continue
        if name.endswith("log_logit_scale"):
            tensors[name] = p.detach().clone().float()  # a 0-dim f32 scalar, as in the real checkpoint
        elif name.endswith(".mask"):
            tensors[name] = p.detach().clone()
        else:
            tensors[name] = p.detach().to(torch.bfloat16)
    tensors["text.token_rows"] = used.to(torch.int32)
    tensors["text.token_values"] = table[used.long()].to(torch.bfloat16)

    meta.update({"format": "agpt-golden-1", "torch": torch.__version__,
                 "vision.heads": str(V_HEADS), "text.heads": str(T_HEADS), "vision.taps": ",".join(map(str, TAPS)),
                 "classes": ",".join(c.replace('_', ' ') for c in CLASSES),
                 "what": "ImageBind-structured model (small dims, official keys) + AnomalyGPT decoder; goldens "
                         "for the query image against refs ref0, ref1"})
    write(os.path.join(OUT, "model.safetensors"), tensors, meta)
    for obj in CLASSES:
        print(f"  {obj:10s} text score {tensors['golden.score_text.' + obj.replace('_', ' ')].item():.4f}")
    print(f"  few-shot score {tensors['golden.score_fewshot'].item():.4f}")


if __name__ == "__main__":
    main()
