"""Golden files for runtime/pth.c, the reader of torch.save checkpoints: small files written by the real
torch.save, hostile files built by hand (never loaded or run here), and tests/data/pth/expected.json with every
tensor's dtype, shape, strides, storage offset and values, which tests/test_pth.c checks exactly.
Usage: tests/reference/.venv/bin/python tests/reference/make_pth_goldens.py (from the repository root)."""
import collections
import io
import json
import os
import struct
import zipfile
import zlib

import torch

OUT = "tests/data/pth"
STORAGE = {torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
           torch.int64: "LongStorage", torch.int32: "IntStorage", torch.uint8: "ByteStorage",
           torch.float64: "DoubleStorage", torch.bool: "BoolStorage"}


def describe(sd, prefix=""):
    """Flattens nested dicts with "outer.inner" names, as pth.c does, and describes every tensor."""
    out = {}
    for k, v in sd.items():
        name = prefix + str(k)
        if isinstance(v, dict):
            out.update(describe(v, name + "."))
        elif isinstance(v, torch.Tensor):
            out[name] = {"storage": STORAGE[v.dtype], "shape": list(v.shape), "stride": list(v.stride()),
                         "offset": v.storage_offset(), "contiguous": v.is_contiguous(),
                         "parameter": isinstance(v, torch.nn.Parameter),
                         "values": [float(x) if v.is_floating_point() else int(x)
                                    for x in v.detach().reshape(-1).to(torch.float64 if v.is_floating_point()
                                                                        else torch.int64).tolist()]}
    return out


def save(name, obj, **kw):
    path = os.path.join(OUT, name)
    torch.save(obj, path, **kw)
    # The official reader agrees with what we wrote. weights_only=False because its restricted unpickler lacks
    # FRAME (protocol 4); the file was written just above, so loading it runs nothing foreign.
    back = torch.load(path, weights_only=False)
    assert describe(back) == describe(obj), name
    print(f"  wrote {path}: {os.path.getsize(path)} bytes")
    return describe(obj)


def zip_like_torch(path, entries):
    """A zip with torch's layout (STORED entries, 64-byte aligned data) from (name, bytes, method) triples."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data, method in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            z.writestr(info, data)
    print(f"  wrote {path}: {os.path.getsize(path)} bytes (hostile)")


def write_zip64(path, entries):
    """A torch-layout archive that uses ZIP64 records throughout (as torch does past 4 GB): 0xFFFFFFFF sizes
    and offsets with ZIP64 extra fields, a ZIP64 end-of-central-directory record and its locator."""
    out, central = bytearray(), bytearray()
    for name, data in entries:
        nb, crc, off = name.encode(), zlib.crc32(data), len(out)
        extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        pad = -(off + 30 + len(nb) + len(extra) + 4) % 64  # torch pads with an "FB" field to align data
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(nb),
                           len(extra)) + nb + extra + data
        extra64 = struct.pack("<HHQQQ", 1, 24, len(data), len(data), off)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF,
                               0xFFFFFFFF, len(nb), len(extra64), 0, 0, 0, 0, 0xFFFFFFFF) + nb + extra64
    cd_off, n = len(out), len(entries)
    out += central
    eocd64 = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central), cd_off)
    out += struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    with open(path, "wb") as f:
        f.write(out)
    with zipfile.ZipFile(path) as z:  # Python's zip reader agrees
        assert [(i.filename, z.read(i.filename)) for i in z.infolist()] == list(entries), path
    print(f"  wrote {path}: {len(out)} bytes (ZIP64)")


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    expected = {}

    # Every dtype the loader needs, 0-d, empty, 5-D, and two tensors sharing one storage (a view at an offset).
    t = torch.arange(10.0)
    basic = collections.OrderedDict()
    basic["f32"] = torch.randn(3, 4, generator=g)
    basic["f16"] = torch.randn(2, 3, generator=g).half()
    basic["bf16"] = torch.randn(5, generator=g).bfloat16()
    basic["i64"] = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
    basic["i32"] = torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32)
    basic["u8"] = torch.tensor([0, 7, 255], dtype=torch.uint8)
    basic["conv3d.weight"] = torch.randn(4, 3, 2, 2, 2, generator=g)
    basic["scalar"] = torch.tensor(2.5)
    basic["empty"] = torch.zeros(0, 3)
    basic["view"] = t[2:5]
    basic["whole"] = t
    basic["transposed"] = torch.randn(3, 2, generator=g).t()  # non-contiguous strides [1,2]
    expected["basic.pt"] = save("basic.pt", basic)
    expected["basic_proto4.pt"] = save("basic_proto4.pt", basic, pickle_protocol=4)

    # nn.Parameters pickle through torch._utils._rebuild_parameter, as the PandaGPT/AnomalyGPT .pt files do.
    params = collections.OrderedDict()
    params["llama_proj.weight"] = torch.nn.Parameter(torch.randn(4, 3, generator=g).half())
    params["llama_proj.bias"] = torch.nn.Parameter(torch.randn(4, generator=g).half())
    params["frozen"] = torch.nn.Parameter(torch.randn(2, 2, generator=g), requires_grad=False)
    expected["params.pt"] = save("params.pt", params)

    # The HF style: torch.save(model.state_dict(), "pytorch_model.bin"), whose OrderedDict carries _metadata.
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Conv3d(2, 2, 2))
    expected["pytorch_model.bin"] = save("pytorch_model.bin", model.state_dict())

    # A training checkpoint that wraps the state dict: names come out as "model.<key>"; the other values are
    # skipped.
    # A tensor with a Python attribute pickles through torch._tensor._rebuild_from_type_v2.
    tagged = torch.randn(3, generator=g)
    tagged.note = "calibrated"
    wrapped = {"model": collections.OrderedDict(w=torch.randn(2, 2, generator=g), tagged=tagged), "epoch": 3,
               "lr": 0.5, "name": "run1", "flags": [True, None], 7: {"x": torch.ones(1, dtype=torch.bool)}}
    expected["wrapped.pt"] = save("wrapped.pt", wrapped)

    # The legacy format (torch < 1.6): refused with a clear message.
    torch.save(basic, os.path.join(OUT, "legacy.pt"), _use_new_zipfile_serialization=False)

    # Hostile and broken files. The pickles are built from opcodes by hand; nothing here unpickles them.
    with zipfile.ZipFile(os.path.join(OUT, "basic.pt")) as z:
        good = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    prefix = good[0][0].split("/")[0]

    def with_pickle(pkl):
        return [(n, pkl if n.endswith("/data.pkl") else d, zipfile.ZIP_STORED) for n, d in good]

    os_system = (b"\x80\x02" + b"cos\nsystem\n" + b"X\x02\x00\x00\x00ls" + b"\x85" + b"R" + b".")
    zip_like_torch(os.path.join(OUT, "hostile_os_system.pt"), with_pickle(os_system))
    evil = (b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93" + b"X\x04\x00\x00\x001+1;\x85R.")
    zip_like_torch(os.path.join(OUT, "hostile_eval.pt"), with_pickle(evil))
    # An unknown opcode (DUP is not in the subset) after a valid start.
    zip_like_torch(os.path.join(OUT, "hostile_opcode.pt"), with_pickle(b"\x80\x02}2."))
    big_endian = [(n, b"big" if n.endswith("/byteorder") else d, zipfile.ZIP_STORED) for n, d in good]
    zip_like_torch(os.path.join(OUT, "big_endian.pt"), big_endian)
    write_zip64(os.path.join(OUT, "zip64.pt"), good)
    assert describe(torch.load(os.path.join(OUT, "zip64.pt"), weights_only=True)) == expected["basic.pt"]
    deflated = [(n, d, zipfile.ZIP_DEFLATED) for n, d in good]
    zip_like_torch(os.path.join(OUT, "deflated.pt"), deflated)
    raw = open(os.path.join(OUT, "basic.pt"), "rb").read()
    with open(os.path.join(OUT, "truncated.pt"), "wb") as f:
        f.write(raw[: len(raw) // 2])

    expected["_prefix"] = prefix
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=0, sort_keys=True)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"  tests/data/pth: {total} bytes in all")


if __name__ == "__main__":
    main()
