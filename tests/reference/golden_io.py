"""Shared writer for golden files: safetensors with sorted keys, so regenerating an unchanged golden changes
nothing in git (safetensors.torch.save_file orders its header through a hash map). Read back with the official
reader and checked."""
import json
import os
import struct

import torch
from safetensors.torch import load_file

DTYPES = {torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.uint8: "U8"}


def raw_bytes(t):
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().tobytes()  # numpy has no bf16; the bits are what we want
    return t.numpy().tobytes()  # little-endian on every machine we run on


def write(path, tensors, meta):
    header, blobs, offset = {"__metadata__": dict(sorted(meta.items()))}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        raw = raw_bytes(t)
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data section 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)
    back = load_file(path)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k].cpu()) for k in tensors), path
    print(f"  wrote {os.path.relpath(path)}: {len(tensors)} tensors, {os.path.getsize(path)} bytes")
