"""Golden for train/optimizer.c: torch.optim.AdamW with clip_grad_norm_ and a warmup + cosine LambdaLR.

Writes tests/data/optimizer.safetensors. Run through tests/reference/make_goldens.sh (which sets up the venv).
"""
import math
import os

import torch
from golden_io import write

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "optimizer.safetensors")
LR, BETAS, EPS, WD = 2e-3, (0.9, 0.95), 1e-8, 0.01
WARMUP, TOTAL, MIN_RATIO, CLIP, STEPS = 2, 6, 0.1, 1.0, 7


def lr_at(step):
    """The schedule of train/optimizer.c, for a 1-based step."""
    if step <= WARMUP:
        return LR * step / WARMUP
    progress = min(1.0, (step - WARMUP) / (TOTAL - WARMUP))
    floor = LR * MIN_RATIO
    return floor + (LR - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def main():
    torch.manual_seed(7)
    p0 = torch.nn.Parameter(torch.randn(4, 5))
    p1 = torch.nn.Parameter(torch.randn(7))
    tensors = {"init.p0": p0.detach().clone(), "init.p1": p1.detach().clone()}
    opt = torch.optim.AdamW([p0, p1], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    # LambdaLR's epoch e is our step e + 1.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_at(e + 1) / LR)
    for step in range(STEPS):
        scale = 3.0 if step % 3 == 1 else 0.05  # some steps clip, some do not
        g0, g1 = torch.randn(4, 5) * scale, torch.randn(7) * scale
        tensors[f"step{step}.grad.p0"], tensors[f"step{step}.grad.p1"] = g0.clone(), g1.clone()
        p0.grad, p1.grad = g0.clone(), g1.clone()
        norm = torch.nn.utils.clip_grad_norm_([p0, p1], CLIP)
        tensors[f"step{step}.grad_norm"] = norm.reshape(1).float()
        opt.step()
        sched.step()
        tensors[f"step{step}.p0"], tensors[f"step{step}.p1"] = p0.detach().clone(), p1.detach().clone()
    meta = {"lr": repr(LR), "beta1": repr(BETAS[0]), "beta2": repr(BETAS[1]), "eps": repr(EPS), "wd": repr(WD),
            "warmup": str(WARMUP), "total": str(TOTAL), "min_ratio": repr(MIN_RATIO), "clip": repr(CLIP),
            "steps": str(STEPS), "torch": torch.__version__}
    write(OUT, {k: v.contiguous() for k, v in tensors.items()}, meta)


if __name__ == "__main__":
    main()
