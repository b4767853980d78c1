"""Golden for the training backward ops of kernels/ops.h against torch autograd (reference sections 3.2, 4, 6.5).

Writes tests/data/train_ops.safetensors (f32 unless noted):
  conv{a,b}.x, .w, .b, .dout, .dx, .dw, .db   Conv2d backward: a = [2,3,7,6] with w [4,3,3,3], padding 1;
                                              b = [1,5,9,9] with w [6,5,5,5], padding 0 (the last layer's k5)
  conv{a,b}.pad                i32 [1]
  pool.x, .dout, .dx           MaxPool2d(2) backward on [2,3,7,9] (odd: last row/column dropped) with values on a
                               0.5 grid, so most windows hold ties (PyTorch's CPU kernel routes to the first max)
  up.x, up.dx                  F.interpolate(x [1,2,16,16], 224, bilinear, align_corners=True) backward with
                               dout[c,y,x] = cos(0.05 y + 0.3 c) sin(0.031 x + 0.2) (made in double, rounded to f32:
                               the C test makes the same, so the 224x224 plane is not stored)
  l2.x, .dout, .dx             x / x.norm(dim=-1, keepdim=True) backward, [5,33]; row 3 scaled by 1e-3
  loss.logits [2,2,16,16]      the pixel losses on softmax(upsample(logits)) probabilities (section 6.5), with
  loss.focal, loss.dice [1]    gt a rectangle in sample 0 (rows 40..99, columns 120..199) and empty in sample 1 (made
  loss.dlogits [2,2,16,16]     in C the same way): FocalLoss(gamma 2, smooth 1e-5 one-hot clamp, alpha 1, mean) and
                               BinaryDiceLoss, re-expressed from the reference's description, and d(focal + dice)/d
                               logits through softmax and the upsample

Run: tests/reference/.venv/bin/python tests/reference/make_train_op_goldens.py
(or bash tests/reference/make_goldens.sh, which makes every golden file).
"""
import math
import os

import torch
import torch.nn.functional as F

import golden_io

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "train_ops.safetensors")


def focal_loss(prob, target, gamma=2.0, smooth=1e-5):
    """FocalLoss() of the reference (section 6.5): prob [B,C,H,W] probabilities, target [B,H,W] class ids."""
    n, c = prob.shape[:2]
    p = prob.reshape(n, c, -1).permute(0, 2, 1).reshape(-1, c)  # one row per pixel
    t = target.reshape(-1, 1).long()
    one_hot = torch.zeros(t.shape[0], c, dtype=prob.dtype).scatter_(1, t, 1.0)
    one_hot = one_hot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * p).sum(1) + smooth
    return (-torch.pow(1.0 - pt, gamma) * pt.log()).mean()  # alpha all ones


def dice_loss(x, g):
    """BinaryDiceLoss: x, g [B,H,W]; smooth 1."""
    n = g.shape[0]
    x, g = x.reshape(n, -1), g.reshape(n, -1)
    d = (2 * (x * g).sum(1) + 1) / (x.sum(1) + g.sum(1) + 1)
    return 1 - d.sum() / n


def conv_case(t, name, shape_x, cout, k, pad):
    x = torch.randn(*shape_x, requires_grad=True)
    cin = shape_x[1]
    conv = torch.nn.Conv2d(cin, cout, k, padding=pad)
    y = conv(x)
    dout = torch.randn_like(y)
    y.backward(dout)
    t[f"{name}.x"] = x.detach()
    t[f"{name}.w"] = conv.weight.detach()
    t[f"{name}.b"] = conv.bias.detach()
    t[f"{name}.dout"] = dout
    t[f"{name}.dx"] = x.grad
    t[f"{name}.dw"] = conv.weight.grad
    t[f"{name}.db"] = conv.bias.grad
    t[f"{name}.pad"] = torch.tensor([pad], dtype=torch.int32)


def main():
    torch.manual_seed(1111)
    t = {}
    conv_case(t, "conva", (2, 3, 7, 6), 4, 3, 1)
    conv_case(t, "convb", (1, 5, 9, 9), 6, 5, 0)

    x = (torch.randn(2, 3, 7, 9) * 2).round() / 2  # a 0.5 grid: ties in most windows
    x.requires_grad_(True)
    y = torch.nn.MaxPool2d(2)(x)
    dout = torch.randn_like(y)
    y.backward(dout)
    t["pool.x"], t["pool.dout"], t["pool.dx"] = x.detach(), dout, x.grad

    xu = torch.randn(1, 2, 16, 16, requires_grad=True)
    yu = F.interpolate(xu, size=(224, 224), mode="bilinear", align_corners=True)
    d = torch.empty(1, 2, 224, 224, dtype=torch.float64)
    for c in range(2):
        for i in range(224):
            for j in range(224):
                d[0, c, i, j] = math.cos(0.05 * i + 0.3 * c) * math.sin(0.031 * j + 0.2)
    yu.backward(d.float())
    t["up.x"], t["up.dx"] = xu.detach(), xu.grad

    xl = torch.randn(5, 33)
    xl[3] *= 1e-3
    xl.requires_grad_(True)
    yl = xl / xl.norm(dim=-1, keepdim=True)
    dl = torch.randn_like(yl)
    yl.backward(dl)
    t["l2.x"], t["l2.dout"], t["l2.dx"] = xl.detach(), dl, xl.grad

    logits = (torch.randn(2, 2, 16, 16) * 3).requires_grad_(True)
    gt = torch.zeros(2, 224, 224)
    gt[0, 40:100, 120:200] = 1
    prob = torch.softmax(F.interpolate(logits, size=(224, 224), mode="bilinear", align_corners=True), dim=1)
    focal = focal_loss(prob, gt)
    dice = dice_loss(prob[:, 1], gt)
    (focal + dice).backward()
    t["loss.logits"] = logits.detach()
    t["loss.focal"] = focal.detach().reshape(1)
    t["loss.dice"] = dice.detach().reshape(1)
    t["loss.dlogits"] = logits.grad
    print(f"  focal {focal.item():.6f} dice {dice.item():.6f}")

    golden_io.write(OUT, t, {"torch": torch.__version__})


if __name__ == "__main__":
    main()
