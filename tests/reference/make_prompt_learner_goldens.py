"""Golden for AnomalyGPT's PromptLearner and llama_proj (anomalygpt-reference.md section 4).

The PromptLearner is built exactly as code/model/AnomalyGPT_models.py builds it (nn.Sequential of Conv2d k3 pad 1,
ReLU, MaxPool2d(2) five times, then Conv2d k5 pad 0; base_prompts a [9, D] Parameter; output cat(base, img_prompts))
at reduced widths 1 -> 4 -> 8 -> 8 -> 16 -> 16 -> 32 and D = 32 instead of 4096, but on the real 224 x 224 map, so
the spatial path 224 -> 112 -> 56 -> 28 -> 14 -> 7 -> 3 is the real one. llama_proj is nn.Linear(16, 32) standing
in for Linear(1024, 4096). Weights are seeded random (conv weights He-initialised, small biases, base prompts
N(0,1)); key names are the AnomalyGPT / PandaGPT checkpoint's.

Writes tests/data/prompt_learner.safetensors:
  prompt_learner.base_prompts               [9,32]
  prompt_learner.meta_net.{0,3,6,9,12,15}.weight/bias
  llama_proj.weight [32,16], llama_proj.bias [32]
  golden.map        [2,1,224,224]  anomaly maps in [0,2] (the few-shot map's range; one smooth blob each)
  golden.prompts    [2,18,32]      prompt_learner(map)
  golden.cls_emb    [2,16]         L2-normalised embeddings
  golden.image_token [2,1,32]      llama_proj(cls_emb).unsqueeze(1)

Run: tests/reference/.venv/bin/python tests/reference/make_prompt_learner_goldens.py
(or bash tests/reference/make_goldens.sh, which makes every golden file).
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import golden_io  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "prompt_learner.safetensors")


class PromptLearner(nn.Module):
    """code/model/AnomalyGPT_models.py::PromptLearner with the widths as parameters (the reference hard-codes
    4, 16, 64, 256, 1024 and dim_out = 4096)."""

    def __init__(self, dim_in, dim_out, widths):
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.meta_net = nn.Sequential(
            nn.Conv2d(dim_in, c1, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c5, dim_out, kernel_size=5, padding=0),
        )
        self.base_prompts = nn.Parameter(torch.randn((9, dim_out)), requires_grad=True)

    def forward(self, input):
        B, C, H, W = input.shape
        img_prompts = self.meta_net(input)
        img_prompts = img_prompts.reshape(B, img_prompts.shape[1], 9).transpose(-2, -1)  # reference: (B, 4096, 9)
        output = torch.cat([self.base_prompts.expand(B, -1, -1), img_prompts], dim=1)
        return output


def smooth_maps(B, S, gen):
    """Anomaly-map-like inputs in [0, 2]: a background level plus a Gaussian blob, values above 1 included."""
    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32),
                            indexing="ij")
    maps = []
    for _ in range(B):
        cy, cx = (torch.rand(2, generator=gen) * S).tolist()
        sigma = 10 + 30 * torch.rand(1, generator=gen).item()
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma ** 2))
        noise = 0.2 * torch.rand(S, S, generator=gen)
        maps.append((0.3 + 1.5 * blob + noise).clamp(0, 2))
    return torch.stack(maps)[:, None]


def main():
    torch.manual_seed(20240611)
    gen = torch.Generator().manual_seed(7)
    D, E, B, S = 32, 16, 2, 224
    pl = PromptLearner(1, D, (4, 8, 8, 16, 16)).eval()
    with torch.no_grad():
        for m in pl.meta_net:
            if isinstance(m, nn.Conv2d):
                # He init keeps the signal alive through the ReLUs, so the map (not the biases) dominates the
                # prompts and a swapped image or a transposed grid fails by far, in bf16 too.
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.uniform_(-0.05, 0.05)
        pl.base_prompts.normal_()
    proj = nn.Linear(E, D, bias=True).eval()

    maps = smooth_maps(B, S, gen)
    assert maps.min() >= 0 and maps.max() <= 2 and maps.max() > 1
    cls = torch.randn(B, E)
    cls = cls / cls.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        prompts = pl(maps)
        token = proj(cls).unsqueeze(1)
    assert prompts.shape == (B, 18, D) and token.shape == (B, 1, D)

    t = {}
    for k, v in pl.state_dict().items():
        t["prompt_learner." + k] = v.detach().clone().contiguous()
    for k, v in proj.state_dict().items():
        t["llama_proj." + k] = v.detach().clone().contiguous()
    t["golden.map"] = maps.contiguous()
    t["golden.prompts"] = prompts.contiguous()
    t["golden.cls_emb"] = cls.contiguous()
    t["golden.image_token"] = token.contiguous()
    golden_io.write(OUT, t, {"torch": torch.__version__})


if __name__ == "__main__":
    main()
