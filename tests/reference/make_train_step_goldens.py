#!/usr/bin/env python3
"""Golden for one training step of AnomalyGPT (anomalygpt-reference.md 3.2, 3.4, 4, 5.4, 6.5): a PyTorch
re-expression of the official training forward (openllama.py::forward with 'masks' in the inputs) on the small
model that tests/make_test_model.c assembles from tests/data/imagebind and tests/data/anomalygpt:

  vision    the frozen ImageBind-structured golden model; its four taps
  decoder   image_decoder.fc[i] -> normalise -> 100 x dot with the class's text features -> upsample the logits
            (bilinear, align_corners) -> softmax over the 2 classes: per layer A_i [B,2,224,224]; the map is the
            mean of A_i[:,1]
  losses    per layer FocalLoss (gamma 2, smooth 1e-5, on the probabilities) + BinaryDiceLoss on A_i[:,1], summed
            over the 4 layers; the LLM's causal-LM cross-entropy (HF, mean over the targets of the batch)
  few-shot  (case "fewshot") the prompt learner sees 1 - sim against the reference turned by 0, 90, 180, 270
            degrees (the pixel loss still uses the text maps)
  prompts   PromptLearner -> [B,18,D]; llama_proj(cls_emb) -> the image token
  LLM       HF LlamaForCausalLM with PEFT LoRA; input [<s>] "### Human: <Img>" [img] "</Img> " [18] then the
            conversation tokens (question + "\\n### Assistant:" without loss, answer + "\\n###" with loss),
            right-padded with id 2 and label -100, attention_mask = ids != 2 on the text part

Cases: "zeroshot" (an anomaly item: the normal image with a zero mask and the image with an anomaly and its
mask, class bottle), "fewshot" (the same with a reference image of another texture), "sft" (one image, no mask, class object:
the cross-entropy alone). For every case the losses and the gradient of every trainable tensor (decoder, prompt
learner, and as options llama_proj and the LoRA factors) are written to tests/data/train_step.safetensors,
with the normalised inputs, the mask, token ids and targets the C test feeds; and the losses of 20 updates of the
whole loop (AdamW, clipping, WarmupDecayLR) on the zero-shot batch. Needs
../shared/data/llama-tokenizer.model (skips with a message when it is missing).
"""
import copy
import os

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import make_imagebind_goldens as ib
from golden_io import write
from make_anomalygpt_goldens import ALPHA, HEADS, HIDDEN, INTER, LAYERS, R, VOCAB, WIDTHS, vision_model
from make_prompt_learner_goldens import PromptLearner
from make_schedule import formula_gamma

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")
TOKENIZER = os.path.join(HERE, "..", "..", "..", "shared", "data", "llama-tokenizer.model")
OUT = os.path.join(DATA, "train_step.safetensors")
DESCRIPTION = ("This is a photo of a bottle for anomaly detection, which should be round, without any damage, "
               "flaw, defect, scratch, hole or broken part.")
QUESTION = DESCRIPTION + " Is there any anomaly in the image?"
NORMAL = "No, there is no anomaly in the image."
ANOMALY = "Yes, there is an anomaly in the image, at the top of the image."
LOOP_UPDATES, LOOP_WARMUP, LOOP_LR = 20, 5, 1e-3


def load_parts():
    parts = load_file(os.path.join(DATA, "anomalygpt", "parts.safetensors"))
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, vocab_size=VOCAB, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=256,
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    llm = LlamaForCausalLM(cfg)
    base = {}
    for k, v in parts.items():
        if k.startswith("sparse.") and k.endswith(".rows"):
            name = k[len("sparse."):-len(".rows")]
            full = torch.zeros(VOCAB, HIDDEN)
            full[v.long()] = parts["sparse." + name + ".values"]
            base[name] = full
        elif k.startswith("model.") or k.startswith("lm_head."):
            base[k] = v
    missing, unexpected = llm.load_state_dict(base, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    pm = get_peft_model(llm, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    lora = {k[len("llama_model."):]: v for k, v in parts.items() if ".lora_" in k}
    missing, unexpected = pm.load_state_dict(lora, strict=False)
    assert not unexpected and not [m for m in missing if "lora" in m], unexpected
    pm.eval()  # no dropout anywhere (LoRA dropout 0): train and eval modes compute the same
    pl = PromptLearner(1, HIDDEN, WIDTHS)
    pl.load_state_dict({k[len("prompt_learner."):]: v for k, v in parts.items() if k.startswith("prompt_learner.")})
    proj = torch.nn.Linear(ib.EMBED, HIDDEN)
    proj.load_state_dict({k[len("llama_proj."):]: v for k, v in parts.items() if k.startswith("llama_proj.")})
    return pm, pl, proj


def focal_loss(prob, gt):
    """FocalLoss(gamma 2, alpha None, smooth 1e-5) on probabilities [B,2,H,W] (6.5)."""
    p = prob.permute(0, 2, 3, 1).reshape(-1, 2)
    idx = gt.reshape(-1, 1).long()
    one_hot = torch.zeros(p.shape[0], 2, dtype=p.dtype).scatter_(1, idx, 1)
    one_hot = torch.clamp(one_hot, 1e-5, 1.0 - 1e-5)
    pt = (one_hot * p).sum(1) + 1e-5
    return (-torch.pow(1 - pt, 2) * pt.log()).mean()


def dice_loss(x, gt):
    """BinaryDiceLoss on the abnormal probability [B,H,W] (6.5)."""
    n = gt.shape[0]
    xf, gf = x.reshape(n, -1), gt.reshape(n, -1)
    dice = (2 * (xf * gf).sum(1) + 1) / (xf.sum(1) + gf.sum(1) + 1)
    return 1 - dice.sum() / n


def conversation(sp, answer):
    q = sp.encode(QUESTION + "\n### Assistant:")
    a = sp.encode(answer + "\n###")
    return q + a, [-100] * len(q) + a


def jittered(x, jitter, seed):
    """x * (1 + jitter * N(0,1)) per element (jitter 0: x)."""
    if jitter == 0:
        return x
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x * (1 + jitter * noise).to(x.dtype)


def step(vm, pm, pl, proj, sp, images, masks, class_name, text_features, answers, reference, jitter=0.0,
         frozen=None):
    """One training forward and backward; returns the losses and the named gradients. jitter > 0 multiplies the
    16 x 16 score grids (the decoder's logits, the few-shot similarities) by (1 + jitter * N(0,1)) per element
    before the upsampling: where an f32 computation's rounding enters the maps. frozen(p) True: p gets no
    gradient (bench/peers/torch_train_step.py trains what the reference trains)."""
    params = {}
    for i, fc in enumerate(vm.image_decoder.fc):
        params[f"image_decoder.fc.{i}.weight"] = fc.weight
        params[f"image_decoder.fc.{i}.bias"] = fc.bias
    for k, v in pl.named_parameters():
        params["prompt_learner." + k] = v
    for k, v in proj.named_parameters():
        params["llama_proj." + k] = v
    for k, v in pm.named_parameters():
        if "lora_" in k:
            params["llama_model." + k] = v
    for p in params.values():
        p.requires_grad_(not (frozen and frozen(p)))
        p.grad = None

    dt = next(pl.parameters()).dtype
    x = torch.stack([ib.to_input(im) for im in images]).to(dt)  # [B,3,224,224]
    with torch.no_grad():
        emb, taps = vm.encode_image(x)
    B = x.shape[0]
    probs, maps = [], []
    for i, t in enumerate(taps):
        p = vm.image_decoder.fc[i](t.transpose(0, 1)[:, 1:, :])
        p = p / p.norm(dim=-1, keepdim=True)
        s = 100.0 * p @ text_features.transpose(-2, -1)
        n = s.shape[1]
        side = int(n ** 0.5)
        s = jittered(s.permute(0, 2, 1).view(B, 2, side, side), jitter, 10 + i)
        s = F.interpolate(s, size=ib.IMAGE, mode="bilinear", align_corners=True)
        a = torch.softmax(s, dim=1)
        probs.append(a)
        maps.append(a[:, 1])
    anomaly_map = torch.mean(torch.stack(maps, dim=0), dim=0)[:, None]  # [B,1,224,224]
    focal = dice = torch.zeros(())
    if masks is not None:
        gt = torch.stack([torch.from_numpy(m) for m in masks]).to(dt)
        focal = sum(focal_loss(a, gt) for a in probs)
        dice = sum(dice_loss(a[:, 1], gt) for a in probs)
    pl_input = anomaly_map
    if reference is not None:
        r = ib.to_input(reference).to(dt)
        rots = torch.stack([torch.rot90(r, k, dims=(1, 2)) for k in range(4)])
        with torch.no_grad():
            _, rtaps = vm.encode_image(rots)
            sims = []
            for q, rt in zip(taps, rtaps):
                q = q.transpose(0, 1)[:, 1:, :]                          # [B,256,C]
                rr = rt.transpose(0, 1)[:, 1:, :].reshape(-1, q.shape[-1])  # [1024,C]
                cos = F.cosine_similarity(q[:, :, None, :], rr[None, None, :, :], dim=-1)
                sims.append(cos.max(dim=2).values)
            sim = jittered(torch.mean(torch.stack(sims, dim=0), dim=0), jitter, 20)  # [B,256]
            side = int(sim.shape[1] ** 0.5)
            sim = F.interpolate(sim.view(B, 1, side, side), size=ib.IMAGE, mode="bilinear", align_corners=True)
        pl_input = 1 - sim
    prompts = pl(pl_input)                                   # [B,18,D]
    image_token = proj(emb)[:, None]                         # [B,1,D]

    embed = pm.get_input_embeddings()
    e = lambda ids: embed(torch.tensor(ids))  # noqa: E731 (float64 rows)
    head = [sp.encode("### Human: <Img>"), sp.encode("</Img> ")]
    convs = [conversation(sp, a) for a in answers]
    T = max(len(ids) for ids, _ in convs)
    rows, labels, mask = [], [], []
    ids_out, targets_out = [], []
    for b, (ids, tgt) in enumerate(convs):
        pad = T - len(ids)
        ids_p, tgt_p = ids + [2] * pad, tgt + [-100] * pad
        rows.append(torch.cat([e([1]), e(head[0]), image_token[b], e(head[1]), prompts[b], e(ids_p)], dim=0))
        labels.append([-100] * (12 + 18) + tgt_p)
        mask.append([1] * 30 + [int(t != 2) for t in ids_p])
        ids_out.append(ids_p)
        targets_out.append(tgt_p)
    E = torch.stack(rows)
    out = pm(inputs_embeds=E, attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ce = out.loss
    loss = ce + focal + dice
    loss.backward()
    grads = {k: v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v) for k, v in params.items()}
    return {"pl_input": pl_input[:, 0].detach(), "ce": ce.item(), "focal": float(focal), "dice": float(dice), "loss": loss.item(),
            "map": anomaly_map[:, 0].detach(), "ids": ids_out, "targets": targets_out}, grads


def main():
    if not os.path.exists(TOKENIZER):
        print(f"make_train_step_goldens: {TOKENIZER} is missing; skipped")
        return
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    vm, sd = vision_model()
    pm, pl, proj = load_parts()
    # The whole step in float64: the golden is then the exact answer to about 1e-15, and the C side's f32 error is
    # measured against it. Each gradient's f32 noise is recorded, which the C test allows a small multiple of: the
    # larger of the float32 PyTorch step's error and the change that a relative jitter of 1e-6 on the 16 x 16
    # score grids (before the upsampling: where the f32 error of the encoder and decoder enters; the C side's
    # few-shot map is off by 1.07e-6 rel L2) makes in float64. Some gradients are ill-conditioned that way: the
    # first convs' weights behind the max pools of a smooth few-shot map move by 9e-5, the decoder's gradient
    # through a saturated softmax (the instruction case) by 7e-4.
    f32 = tuple(copy.deepcopy(mod) for mod in (vm, pm, pl, proj))
    vm, pm, pl, proj = vm.double(), pm.double(), pl.double(), proj.double()
    normal = np.asarray(Image.open(os.path.join(DATA, "imagebind", "query.png")).convert("RGB")).copy()
    anomalous = normal.copy()
    mask = np.zeros(normal.shape[:2], np.float32)
    mask[30:58, 80:150] = 1  # a dark patch near the top
    anomalous[30:58, 80:150] = (anomalous[30:58, 80:150] * 0.3).astype(np.uint8)
    # A reference unlike the query (another texture, with a scratch), so the few-shot map is far from flat.
    reference = ib.synthetic_image(123, True)
    cases = {
        "zeroshot": ([normal, anomalous], [np.zeros_like(mask), mask], "bottle", [NORMAL, ANOMALY], None),
        "fewshot": ([normal, anomalous], [np.zeros_like(mask), mask], "bottle", [NORMAL, ANOMALY], reference),
        "sft": ([anomalous], None, "object", [ANOMALY], None),
    }
    # The model inputs as the dataset's ToTensor + Normalize gives them ([3,224,224]), and the mask.
    # (f32: what the C side feeds; the step computes from these values widened to float64)
    tensors = {"input.normal": ib.to_input(normal), "input.anomalous": ib.to_input(anomalous),
               "input.reference": ib.to_input(reference), "mask.anomalous": torch.from_numpy(mask)}
    meta = {"torch": torch.__version__, "question": QUESTION, "answer.normal": NORMAL, "answer.anomalous": ANOMALY}
    for name, (images, masks, cls, answers, ref) in cases.items():
        tf = sd["text_features." + cls].double()
        res, grads = step(vm, pm, pl, proj, sp, images, masks, cls, tf, answers, ref)
        _, grads32 = step(*f32[:3], f32[3], sp, images, masks, cls, tf.float(), answers, ref)
        _, grads_j = step(vm, pm, pl, proj, sp, images, masks, cls, tf, answers, ref, jitter=1e-6)
        for k, g in grads.items():
            err32 = ((grads32[k].double() - g).norm() / g.norm().clamp_min(1e-30)).item()
            errj = ((grads_j[k] - g).norm() / g.norm().clamp_min(1e-30)).item()
            tensors[f"{name}.f32err.{k}"] = torch.tensor([max(err32, errj)], dtype=torch.float32)
        for k in ("ce", "focal", "dice", "loss"):
            tensors[f"{name}.loss.{k}"] = torch.tensor([res[k]], dtype=torch.float32)
        if name == "zeroshot":
            tensors[f"{name}.map"] = res["map"].float()
        if name == "fewshot":
            tensors[f"{name}.pl_input"] = res["pl_input"].float()
        tensors[f"{name}.ids"] = torch.tensor(res["ids"], dtype=torch.int32)
        tensors[f"{name}.targets"] = torch.tensor(res["targets"], dtype=torch.int32)
        for k, g in grads.items():
            tensors[f"{name}.grad.{k}"] = g.float()
        gn = {k: g.norm().item() for k, g in grads.items()}
        print(f"  {name}: ce {res['ce']:.6f} focal {res['focal']:.6f} dice {res['dice']:.6f}; "
              f"|grad| decoder.fc.0.w {gn['image_decoder.fc.0.weight']:.3e}, "
              f"prompt_learner.meta_net.0.weight {gn['prompt_learner.meta_net.0.weight']:.3e}")
    # 20 updates of the whole loop on the zero-shot batch (anomalygpt-reference.md 6.2): AdamW (0.9, 0.95, eps
    # 1e-8, weight decay 1e-3) over the decoder and the prompt learner, the global-norm clip at 1.0, and
    # WarmupDecayLR as DeepSpeed's engine steps it (update 1 at the optimizer's lr, then lr(k - 2); log warmup over
    # 5, total 20, max 1e-3), accumulation 1. The losses before every update are the golden.
    images, masks, cls, answers, ref = cases["zeroshot"]
    tf = sd["text_features." + cls].double()
    trained = [p for fc in vm.image_decoder.fc for p in fc.parameters()] + list(pl.parameters())
    opt = torch.optim.AdamW(trained, lr=LOOP_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-3)
    losses = {"ce": [], "focal": [], "dice": []}
    for k in range(1, LOOP_UPDATES + 1):
        lr = LOOP_LR if k == 1 else LOOP_LR * formula_gamma(k - 2, LOOP_UPDATES, LOOP_WARMUP, "log")
        for group in opt.param_groups:
            group["lr"] = lr
        res, _ = step(vm, pm, pl, proj, sp, images, masks, cls, tf, answers, ref)  # leaves .grad set
        for key in losses:
            losses[key].append(res[key])
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
    for key, values in losses.items():
        tensors[f"loop.{key}"] = torch.tensor(values, dtype=torch.float32)
    print(f"  loop: {LOOP_UPDATES} updates, loss {losses['ce'][0] + losses['focal'][0] + losses['dice'][0]:.4f} -> "
          f"{losses['ce'][-1] + losses['focal'][-1] + losses['dice'][-1]:.4f}")
    write(OUT, tensors, meta)


if __name__ == "__main__":
    main()
