"""PyTorch peer for `agpt bench ops`: the same ops at the same sizes, timed the same way, as JSON.

    python3 bench/peers/torch_ops.py --device cuda --dtype bf16 --json torch-ops.json
    python3 bench/peers/torch_ops.py --device cpu --quick --json torch-ops-cpu.json

Each op uses what a PyTorch user would call (F.linear, F.layer_norm, F.gelu, F.scaled_dot_product_attention,
torch.nn.functional.rms_norm, ...). Names match agpt's so bench/compare.py can pair them.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def sizes(device, quick):
    vit_rows = 257 if quick else (64 * 257 if device == "cuda" else 4 * 257)
    llm_rows = 64 if quick else (4096 if device == "cuda" else 512)
    gemm_n = 512 if quick else (8192 if device == "cuda" else 2048)
    copy_elems = (8 << 20) if quick else (64 << 20)
    return vit_rows, llm_rows, gemm_n, copy_elems


def rope(x, pos, base=10000.0):
    """Rotate-half RoPE as HF LLaMA applies it; x [B,T,H,D], pos [B,T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.float()[..., None] * inv_freq  # [B,T,D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, :, None, :].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, :, None, :].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if dev == "cuda" else "f32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = args.iters or (50 if dev == "cuda" else 3)
    vit_rows, llm_rows, gemm_n, copy_elems = sizes(dev, args.quick)
    es = torch.tensor([], dtype=dt).element_size()
    g = torch.Generator(device="cpu").manual_seed(1234)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(device=dev, dtype=dt)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timeit(fn):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t0) / iters

    images = vit_rows // 257
    ops = []
    a, b = r(copy_elems), r(copy_elems)
    ops.append(("copy (limit)", lambda: b.copy_(a), 2.0 * copy_elems * es, 0))
    x, w = r(gemm_n, gemm_n), r(gemm_n, gemm_n)
    ops.append(("matmul square (limit)", lambda: x @ w, 0, 2.0 * gemm_n ** 3))
    xv, wq, bq = r(vit_rows, 1280), r(3840, 1280), r(3840)
    ops.append(("linear vit qkv 1280->3840", lambda: F.linear(xv, wq, bq), 0, 2.0 * vit_rows * 1280 * 3840))
    xl, wm = r(llm_rows, 4096), r(11008, 4096)
    ops.append(("linear llama mlp 4096->11008", lambda: F.linear(xl, wm), 0, 2.0 * llm_rows * 4096 * 11008))
    ya = r(vit_rows, 1280)
    ops.append(("add vit residual", lambda: xv + ya, 3.0 * vit_rows * 1280 * es, 0))
    lw, lb = r(1280), r(1280)
    ops.append(("layernorm vit 1280", lambda: F.layer_norm(xv, (1280,), lw, lb, 1e-6), 2.0 * vit_rows * 1280 * es, 0))
    rw = r(4096)
    ops.append(("rmsnorm llama 4096", lambda: F.rms_norm(xl, (4096,), rw, 1e-6), 2.0 * llm_rows * 4096 * es, 0))
    xg = r(vit_rows, 5120)
    ops.append(("gelu vit mlp 5120", lambda: F.gelu(xg), 2.0 * vit_rows * 5120 * es, 0))
    gate, up = r(llm_rows, 11008), r(llm_rows, 11008)
    ops.append(("swiglu llama 11008", lambda: F.silu(gate) * up, 3.0 * llm_rows * 11008 * es, 0))
    srows = images * 16 * 257
    sc = r(srows, 257)
    ops.append(("softmax vit scores 257", lambda: torch.softmax(sc, -1), 2.0 * srows * 257 * es, 0))
    q, k, v = (r(images, 16, 257, 80) for _ in range(3))  # SDPA wants [B,H,T,D]
    ops.append(("attention vit 257x16x80", lambda: F.scaled_dot_product_attention(q, k, v), 0,
                4.0 * images * 16 * 257 * 257 * 80))
    xr = r(1, llm_rows, 32, 128)
    pos = torch.arange(llm_rows, device=dev)[None]
    ops.append(("rope llama 32x128", lambda: rope(xr, pos), 2.0 * llm_rows * 4096 * es, 0))

    results, copy_gbps, mm_tflops = [], 0.0, 0.0
    for name, fn, nbytes, flops in ops:
        sec = timeit(fn)
        rec = {"name": name, "us": sec * 1e6, "gbps": 0.0, "tflops": 0.0}
        if flops:
            rec["tflops"] = flops / sec / 1e12
            mm_tflops = mm_tflops or rec["tflops"]
            rec["fraction"], rec["of"] = rec["tflops"] / mm_tflops, "matmul"
        else:
            rec["gbps"] = nbytes / sec / 1e9
            copy_gbps = copy_gbps or rec["gbps"]
            rec["fraction"], rec["of"] = rec["gbps"] / copy_gbps, "copy"
        results.append(rec)
        print(f"{name:32s} {sec * 1e6:12.1f} us  {rec['fraction']:.2f} of {rec['of']}", flush=True)
    doc = {"peer": "torch " + torch.__version__, "device": dev, "dtype": args.dtype or str(dt), "iters": iters,
           "quick": args.quick, "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "",
           "copy_gbps": copy_gbps, "matmul_tflops": mm_tflops, "ops": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
