"""PyTorch peer for `agpt bench vit`: the ImageBind-H vision encoder (the official module structure, from
tests/reference/imagebind_modules.py) with random weights, seconds per image at the same thread count.

    python3 bench/peers/torch_vit.py --device cpu --threads 2 --layers 32 --batch 1 --json out.json
    python3 bench/peers/torch_vit.py --device cuda --dtype bf16 --batch 1 --batch 8 --batch 64
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "reference"))
from imagebind_modules import Config, Model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if dev == "cuda" else "f32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batch or ([1, 8, 64] if dev == "cuda" else [1])
    iters = args.iters or (10 if dev == "cuda" else 2)
    taps = [args.layers * (i + 1) // 4 - 1 for i in range(4)]
    model = Model(Config(v_blocks=args.layers, taps=taps), text=False).to(device=dev, dtype=dt).eval()

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    runs = []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, 3, 224, 224, device=dev, dtype=dt)
            model.encode_image(x)  # warm-up
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                model.encode_image(x)
            sync()
            per_image = (time.perf_counter() - t0) / iters / b
            runs.append({"batch": b, "s_per_image": per_image, "images_per_s": 1 / per_image})
            print(f"batch {b:4d}: {per_image:.4f} s/image, {1 / per_image:.2f} images/s", flush=True)
    doc = {"peer": "torch " + torch.__version__, "bench": "vit", "device": dev, "dtype": str(dt),
           "layers": args.layers, "threads": torch.get_num_threads(), "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
