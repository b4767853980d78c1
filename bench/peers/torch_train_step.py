"""PyTorch peer for `agpt bench train`: one training micro-step of AnomalyGPT (both images of an anomaly item,
forward and backward: the frozen vision encoder with taps, the decoder's four text maps, focal + Dice per layer,
the PromptLearner, llama_proj, HF LlamaForCausalLM with PEFT LoRA and its cross-entropy) on the small test model,
as the official training forward computes it, through the same re-expression the training-step golden uses
(tests/reference/make_train_step_goldens.py::step), in float32 on the CPU. Only the decoder and the prompt
learner are trained (the reference's default); --lora also trains the LoRA factors. The optimizer update is
not timed (neither side: agpt bench train times the step alone).

    tests/reference/.venv/bin/python bench/peers/torch_train_step.py --threads 2 --iters 10 --json torch-train.json
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "reference"))

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import make_train_step_goldens as g  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--fewshot", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(False)
    sp = spm.SentencePieceProcessor(model_file=g.TOKENIZER)
    vm, sd = g.vision_model()
    pm, pl, proj = g.load_parts()
    normal = np.asarray(Image.open(os.path.join(g.DATA, "imagebind", "query.png")).convert("RGB")).copy()
    anomalous = normal.copy()
    mask = np.zeros(normal.shape[:2], np.float32)
    mask[28:56, 75:112] = 1
    anomalous[28:56, 75:112] //= 3
    tf = sd["text_features.bottle"].float()
    ref = normal if a.fewshot else None
    trained = [p for fc in vm.image_decoder.fc for p in fc.parameters()] + list(pl.parameters())
    if a.lora:
        trained += [p for n, p in pm.named_parameters() if "lora_" in n]

    def once():
        # step() makes every candidate tensor require grad; freeze what this run does not train, as the
        # reference's agent does, so autograd does the same work as agpt.
        res, _ = g.step(vm, pm, pl, proj, sp, [normal, anomalous], [np.zeros_like(mask), mask], "bottle", tf,
                        [g.NORMAL, g.ANOMALY], ref, frozen=lambda p: not any(p is q for q in trained))
        return res

    once()  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.iters):
        once()
    per = (time.perf_counter() - t0) / a.iters
    print(f"torch train step: {a.threads} threads: {per * 1e3:.1f} ms per micro-step (2 images), "
          f"{2 / per:.2f} images/s{', few-shot' if a.fewshot else ''}{', LoRA' if a.lora else ''} "
          f"(torch {torch.__version__})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"impl": "torch", "bench": "train_step", "threads": a.threads, "fewshot": a.fewshot,
                       "lora": a.lora, "ms_per_step": per * 1e3, "images_per_s": 2 / per,
                       "torch": torch.__version__}, f)
            f.write("\n")


if __name__ == "__main__":
    main()
