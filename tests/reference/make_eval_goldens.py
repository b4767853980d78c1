"""Golden for train/metrics.c (agpt eval): sklearn's roc_auc_score, average_precision_score and
precision_recall_curve (F1-max), and the MVTec AD evaluation's PRO curve re-expressed in numpy (regions are the
8-connected components of scipy.ndimage.label with a 3x3 structure; per threshold the mean over all regions of
the share of the region at or above it, against the FPR over all normal pixels; (0, 0) prepended; the area to
FPR 0.3 with the last trapezoid cut by linear interpolation, divided by 0.3).

Cases: image scores with ties, constant scores, and pixel maps with ties, one-pixel regions, regions that touch
only diagonally, and normal images with empty masks. The "q" maps are multiples of 1/64, exact on the C
histogram grid; the "c" maps are continuous (the C side checks them within its stated bound).

Writes tests/data/eval.safetensors. Run through tests/reference/make_goldens.sh (which sets up the venv).
"""
import os

import numpy as np
import scipy
import scipy.ndimage
import sklearn
import torch
import torchvision.transforms as T
from golden_io import write
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "eval.safetensors")
MASK_PNG = os.path.join(os.path.dirname(__file__), "..", "data", "eval_mask.png")
MASK_SIZE = 64


def masks_as_reference(rng):
    """A 150x100 gray mask with soft edges and thin lines, resized as test_mvtec.py (Resize((S,S)), ToTensor,
    > 0.1) and test_visa.py (Resize(S) + CenterCrop(S), > max/100) do."""
    h, w = 100, 150
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.clip(255 - 4 * np.hypot(yy - 40, xx - 60), 0, 255)       # a soft disc
    g[70:72, 10:140] = 255                                          # a 2-pixel line
    g[5, 5] = 255                                                   # a lone pixel
    g[:, 146:] = 40                                                 # a faint band at the right edge
    img = Image.fromarray(g.astype(np.uint8), "L")
    img.save(MASK_PNG)
    mv = T.ToTensor()(T.Resize((MASK_SIZE, MASK_SIZE))(img))[0] > 0.1
    v = T.ToTensor()(T.CenterCrop(MASK_SIZE)(T.Resize(MASK_SIZE)(img)))[0]
    return mv.to(torch.uint8), (v > v.max() / 100).to(torch.uint8)


def f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    return f1.max()


def pro_area(maps, masks, limit=0.3):
    weights, scores, normal = [], [], []
    n_regions = 0
    for m, g in zip(maps, masks):
        lab, n = scipy.ndimage.label(g, structure=np.ones((3, 3), dtype=int))
        w = np.zeros(g.shape)
        for r in range(1, n + 1):
            w[lab == r] = 1.0 / (lab == r).sum()
        n_regions += n
        weights.append(w.ravel()), scores.append(m.ravel()), normal.append((g == 0).ravel())
    w, s, ok = np.concatenate(weights), np.concatenate(scores), np.concatenate(normal)
    order = np.argsort(-s, kind="stable")
    s, w, ok = s[order], w[order], ok[order]
    fpr = np.cumsum(ok) / ok.sum()
    pro = np.cumsum(w) / n_regions
    last = np.r_[s[1:] != s[:-1], True]  # the last index of each run of equal scores: one threshold each
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    keep = fpr <= limit
    x, y = fpr[keep], pro[keep]
    area = np.trapezoid(y, x) if hasattr(np, "trapezoid") else np.trapz(y, x)
    i = keep.sum()
    if i < len(fpr):  # cut the next segment at the limit
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        yl = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + yl) / 2
    return area / limit


def t(x, dtype=torch.float32):
    return torch.tensor(np.asarray(x), dtype=dtype)


def main():
    rng = np.random.default_rng(13)
    tensors, meta = {}, {"sklearn": sklearn.__version__, "scipy": scipy.__version__}
    # Image level: 60 scores rounded to 0.1 (many ties), and a constant case.
    y = (rng.random(60) < 0.4).astype(np.uint8)
    s = np.round(rng.random(60) * 0.6 + 0.3 * y, 1).astype(np.float32)
    cases = {"img": (s, y), "const": (np.full(20, 0.25, np.float32), (np.arange(20) % 3 == 0).astype(np.uint8))}
    for name, (s, y) in cases.items():
        tensors[f"{name}.scores"], tensors[f"{name}.labels"] = t(s), t(y, torch.uint8)
        tensors[f"{name}.expect"] = t([roc_auc_score(y, s), average_precision_score(y, s), f1_max(y, s)])
    # Pixel level: 8 images of 24x20; images 0-2 normal (empty masks).
    n, h, w = 8, 24, 20
    masks = np.zeros((n, h, w), np.uint8)
    masks[3, 4:10, 5:12] = 1
    masks[3, 15, 15] = 1                      # a one-pixel region
    masks[4, 2:5, 2:5] = 1
    masks[4, 5:8, 5:8] = 1                    # touches the first only at a corner: one region (8-connected)
    masks[5, 10:20, 0:20] = 1
    masks[6, 0, 0] = 1                        # one pixel in a corner
    masks[6, 23, 19] = 1
    masks[7] = rng.random((h, w)) < 0.08      # scattered: many small regions
    base = rng.random((n, h, w)) * 0.7
    cont = np.clip(base + 0.35 * masks * rng.random((n, h, w)), 0, 1).astype(np.float32)
    quant = (np.floor(cont * 64) / 64).astype(np.float32)  # ties everywhere, exact on the grid
    for name, maps in (("q", quant), ("c", cont)):
        yp, sp = masks.ravel(), maps.ravel()
        tensors[f"{name}.maps"] = t(maps)
        tensors[f"{name}.expect"] = t([roc_auc_score(yp, sp), average_precision_score(yp, sp), f1_max(yp, sp),
                                       pro_area(maps, masks)])
    tensors["pix.masks"] = t(masks, torch.uint8)
    lab_count = sum(scipy.ndimage.label(m, structure=np.ones((3, 3), dtype=int))[1] for m in masks)
    meta["regions"] = str(lab_count)
    tensors["mask.mvtec"], tensors["mask.visa"] = masks_as_reference(rng)
    write(OUT, tensors, meta)


if __name__ == "__main__":
    main()
