"""Golden for model/sampler.c: HF transformers' logits warpers (temperature, top-k, top-p) as generate applies
them, on random logits; the filtered, renormalised distributions. Writes tests/data/sampler.safetensors."""
import os

import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from golden_io import write

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "sampler.safetensors")
# (temperature, top_k, top_p): the reference's settings first (5.6), then others.
CONFIGS = [(1.0, 50, 0.01), (1.0, 50, 0.1), (1.0, 50, 0.7), (0.7, 50, 0.9), (1.0, 0, 0.5), (1.3, 10, 1.0),
           (1.0, 0, 1.0)]


def main():
    torch.manual_seed(5)
    tensors, meta = {}, {"configs": ";".join(f"{t},{k},{p}" for t, k, p in CONFIGS)}
    logits = torch.randn(4, 300) * 3  # a few peaked rows and flat ones
    logits[1] *= 0.1
    logits[2, 7] += 15
    tensors["logits"] = logits
    for c, (t, k, p) in enumerate(CONFIGS):
        scores = logits.clone()
        if t != 1.0:
            scores = TemperatureLogitsWarper(t)(None, scores)
        if k > 0:
            scores = TopKLogitsWarper(top_k=k)(None, scores)
        if p < 1.0:
            scores = TopPLogitsWarper(top_p=p)(None, scores)
        tensors[f"probs.{c}"] = torch.softmax(scores, dim=-1)
    write(OUT, tensors, meta)


if __name__ == "__main__":
    main()
