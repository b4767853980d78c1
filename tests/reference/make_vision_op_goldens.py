"""Golden for the vision-path ops of kernels/ops.h against PyTorch (reference section 3).

Writes tests/data/vision_ops.safetensors:
  map.x         [1,2,16,16]   two-class logits on the 16x16 patch grid (as 100 * cos, so about +-30)
  map.rows      i32 [48]      which output rows are stored (0 and 223 always; the file would be 600 KB whole)
  map.up        [2,48,224]    F.interpolate(x, 224, bilinear, align_corners=True)[0][:, rows]
  map.p         [48,224]      torch.softmax(up, dim=1)[0, 1][rows]: the "abnormal" probability
  small.x       [2,3,5,7]     a small odd-sized resize ...
  small.out     [2,3,9,11]    ... to 9x11 (PyTorch takes its vectorised channels-last kernel here)
  cos.query     [48,64]       F.cosine_similarity(query[:, None], refs[None], dim=-1).amax(1)
  cos.refs      [80,64]       (row 7 of refs is zero: eps 1e-8 makes its cosine 0, not NaN)
  cos.max       [48]

Run: tests/reference/.venv/bin/python tests/reference/make_vision_op_goldens.py
(or bash tests/reference/make_goldens.sh, which makes every golden file).
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "vision_ops.safetensors")


def main():
    torch.manual_seed(11)
    t = {}

    x = torch.randn(1, 2, 16, 16) * 10
    up = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=True)
    p = torch.softmax(up, dim=1)[:, 1]
    rows = torch.cat([torch.tensor([0, 223]), torch.randperm(222)[:46] + 1]).sort().values
    t["map.x"] = x
    t["map.rows"] = rows.to(torch.int32)
    t["map.up"] = up[0][:, rows]
    t["map.p"] = p[0][rows]

    xs = torch.randn(2, 3, 5, 7)
    t["small.x"] = xs
    t["small.out"] = F.interpolate(xs, size=(9, 11), mode="bilinear", align_corners=True)

    q = torch.randn(48, 64)
    r = torch.randn(80, 64)
    r[7] = 0
    t["cos.query"] = q
    t["cos.refs"] = r
    t["cos.max"] = F.cosine_similarity(q[:, None, :], r[None, :, :], dim=-1, eps=1e-8).amax(dim=1)

    meta = {"torch": torch.__version__}  # one key: safetensors writes several in a random order
    save_file({k: v.contiguous() for k, v in t.items()}, OUT, metadata=meta)
    print(f"wrote {OUT}: {len(t)} tensors, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
