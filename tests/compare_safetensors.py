#!/usr/bin/env python3
"""Compares two safetensors files tensor by tensor with the standard library alone (CI has no numpy):
  compare_safetensors.py A B TOL   exit 0 when both hold the same F32 tensors, each within rel L2 TOL
Prints the worst tensor."""
import json
import math
import struct
import sys


def load(path):
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    body = blob[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            sys.exit(f"{path}: {name} is {info['dtype']}, expected F32")
        a, b = info["data_offsets"]
        out[name] = struct.unpack(f"<{(b - a) // 4}f", body[a:b])
    return out


def main():
    a, b, tol = load(sys.argv[1]), load(sys.argv[2]), float(sys.argv[3])
    if sorted(a) != sorted(b):
        sys.exit(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    worst, worst_name = 0.0, ""
    for name in a:
        x, y = a[name], b[name]
        if len(x) != len(y):
            sys.exit(f"{name}: {len(x)} vs {len(y)} elements")
        num = sum((p - q) ** 2 for p, q in zip(x, y))
        den = sum(q * q for q in y)
        err = math.sqrt(num / den) if den > 0 else math.sqrt(num)
        if not math.isfinite(err):
            err = math.inf
        if err > worst:
            worst, worst_name = err, name
    print(f"  {len(a)} tensors, worst rel L2 {worst:.3e} ({worst_name})")
    sys.exit(0 if worst <= tol else 1)


if __name__ == "__main__":
    main()
