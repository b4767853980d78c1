"""Makes the image decoding goldens in tests/data/images/ (run once; the files are committed).

For every small test image this writes the file itself and NAME.rgb: the bytes that
Pillow's `Image.open(f).convert("RGB").tobytes()` gives, which is what the official
AnomalyGPT feeds its preprocessing. tests/test_image.c decodes each file with
runtime/image.c and compares byte for byte, so the C test needs no Python.

PNG variants Pillow cannot write (2/4-bit gray, 16-bit colour, Adam7 interlace,
out-of-range palette indices, gAMA/sBIT chunks) come from the small PNG writer below;
the YCCK JPEG is a committed input (see "Fixed inputs" below). The expected bytes
always come from Pillow's decoder. goldens.txt lists
"name width height" per file.

Run from the repository root, with a throwaway venv:
    python3 -m venv /tmp/pilvenv && /tmp/pilvenv/bin/pip install pillow numpy
    /tmp/pilvenv/bin/python tests/reference/make_image_goldens.py
(The committed goldens were made with Pillow 13.0.0, libjpeg-turbo 3.2.0.)
It also prints the checksums of ../shared/data/images/*.png that tests/test_image.c hardcodes.
"""
import io
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "images")
W, H = 37, 23  # odd sizes: partial JPEG MCUs, partial Adam7 passes, partial bytes at 1/2/4 bits
rng = np.random.default_rng(1234)


def content(channels, maxval):
    """Smooth gradients, a sinusoid and some noise: exercises the DCT, filters and every value range."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    planes = []
    for c in range(channels):
        v = (x / (W - 1)) * (0.3 + 0.2 * c) + (y / (H - 1)) * (0.5 - 0.1 * c)
        v += 0.2 * np.sin((x + 3 * c) / 3.0) * np.cos(y / 4.0)
        v += rng.normal(0, 0.05, size=v.shape)
        v = (v - v.min()) / (v.max() - v.min())
        planes.append(np.round(v * maxval).astype(np.int64))
    a = np.stack(planes, axis=-1)
    # Pin the corners to the extremes so 0 and maxval are always present.
    a[0, 0, :] = 0
    a[-1, -1, :] = maxval
    return a


# ---- a minimal PNG writer (all five filter types, Adam7, any bit depth) ----------------------------

ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def pack_row(samples, bit_depth):
    """samples: flat list of ints for one row (all channels interleaved)."""
    if bit_depth == 16:
        return b"".join(struct.pack(">H", int(s)) for s in samples)
    if bit_depth == 8:
        return bytes(int(s) for s in samples)
    out, acc, nbits = bytearray(), 0, 0
    for s in samples:
        acc = (acc << bit_depth) | int(s)
        nbits += bit_depth
        if nbits == 8:
            out.append(acc)
            acc, nbits = 0, 0
    if nbits:
        out.append(acc << (8 - nbits))
    return bytes(out)


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_row(ftype, row, prev, bpp):
    out = bytearray([ftype])
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i] if prev is not None else 0
        c = prev[i - bpp] if (prev is not None and i >= bpp) else 0
        pred = [0, a, b, (a + b) // 2, paeth(a, b, c)][ftype]
        out.append((x - pred) & 0xFF)
    return bytes(out)


def write_png(name, arr, color_type, bit_depth, palette=None, trns=None, interlace=False, extra=()):
    h, w, ch = arr.shape
    assert ch == CHANNELS[color_type]
    bpp = max(1, ch * bit_depth // 8)
    raw = bytearray()
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    nrow = 0
    for x0, y0, dx, dy in passes:
        sub = arr[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue  # empty passes are omitted entirely, as the PNG spec says
        prev = None
        for r in sub:
            packed = pack_row(r.reshape(-1).tolist(), bit_depth)
            raw += filter_row(nrow % 5, packed, prev, bpp)
            prev = packed
            nrow += 1
    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 1 if interlace else 0))
    for tag, data in extra:
        png += chunk(tag, data)
    if palette is not None:
        png += chunk(b"PLTE", bytes(int(v) for v in np.asarray(palette).reshape(-1)))
    if trns is not None:
        png += chunk(b"tRNS", trns)
    png += chunk(b"IDAT", zlib.compress(bytes(raw), 9))
    png += chunk(b"IEND", b"")
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(png)


def save_pillow(name, im, **kw):
    im.save(os.path.join(OUT, name), **kw)


# ---- the goldens ----------------------------------------------------------------------------------


def main():
    os.makedirs(OUT, exist_ok=True)
    made = []

    def add(name):
        made.append(name)

    # Pillow-written PNGs.
    g8 = content(1, 255)[..., 0].astype(np.uint8)
    rgb8 = content(3, 255).astype(np.uint8)
    rgba8 = content(4, 255).astype(np.uint8)
    save_pillow("png_gray8.png", Image.fromarray(g8, "L")); add("png_gray8.png")
    save_pillow("png_gray1.png", Image.fromarray(g8 > 127).convert("1")); add("png_gray1.png")
    save_pillow("png_la8.png", Image.fromarray(rgba8[..., :2], "LA")); add("png_la8.png")
    save_pillow("png_rgb8.png", Image.fromarray(rgb8, "RGB")); add("png_rgb8.png")
    save_pillow("png_rgba8.png", Image.fromarray(rgba8, "RGBA")); add("png_rgba8.png")
    pal = Image.fromarray(rgb8, "RGB").quantize(colors=40)
    trns = bytes((i * 37) % 256 for i in range(40))
    save_pillow("png_pal8_trns.png", pal, transparency=trns); add("png_pal8_trns.png")

    # 16-bit gray: values 0..1023 so that both the clipped (>255) and the unclipped range appear.
    g16 = content(1, 1023)
    g16[0, 1, 0] = 65535
    g16[1, 0, 0] = 256
    write_png("png_gray16.png", g16, 0, 16); add("png_gray16.png")
    # A full-range 16-bit gray too (Pillow: almost all white), and its interlaced twin.
    g16full = content(1, 65535)
    write_png("png_gray16_adam7.png", g16full, 0, 16, interlace=True); add("png_gray16_adam7.png")

    write_png("png_gray2.png", content(1, 3), 0, 2); add("png_gray2.png")
    write_png("png_gray4.png", content(1, 15), 0, 4); add("png_gray4.png")
    write_png("png_la16.png", content(2, 65535), 4, 16); add("png_la16.png")
    write_png("png_rgb16.png", content(3, 65535), 2, 16); add("png_rgb16.png")
    write_png("png_rgba16.png", content(4, 65535), 6, 16); add("png_rgba16.png")
    write_png("png_gray8_trns.png", content(1, 255), 0, 8, trns=struct.pack(">H", 128)); add("png_gray8_trns.png")
    write_png("png_rgb8_trns.png", content(3, 255), 2, 8, trns=struct.pack(">HHH", 0, 0, 0)); add("png_rgb8_trns.png")
    # gAMA 0.45455, cHRM-less, sBIT 5/6/5: a decoder that applies gamma or sBIT shifts would differ.
    write_png("png_rgb8_gamma.png", content(3, 255), 2, 8,
              extra=[(b"gAMA", struct.pack(">I", 45455)), (b"sBIT", bytes([5, 6, 5]))]); add("png_rgb8_gamma.png")

    # Palettes at 1, 2, 4 bits; one with fewer entries than the indices used (out-of-range indices).
    palette16 = content(3, 255).reshape(-1, 3)[:16]
    write_png("png_pal1.png", content(1, 1), 3, 1, palette=palette16[:2]); add("png_pal1.png")
    write_png("png_pal2.png", content(1, 3), 3, 2, palette=palette16[:4], trns=bytes([0, 255])); add("png_pal2.png")
    write_png("png_pal4.png", content(1, 15), 3, 4, palette=palette16); add("png_pal4.png")
    # Only 5 palette entries for indices up to 15: Pillow (and libpng) show the missing entries as black.
    write_png("png_pal4_short.png", content(1, 15), 3, 4, palette=palette16[:5]); add("png_pal4_short.png")
    # Interlaced: every colour type and some sub-byte depths.
    write_png("png_rgb8_adam7.png", content(3, 255), 2, 8, interlace=True); add("png_rgb8_adam7.png")
    write_png("png_rgba16_adam7.png", content(4, 65535), 6, 16, interlace=True); add("png_rgba16_adam7.png")
    write_png("png_gray1_adam7.png", content(1, 1), 0, 1, interlace=True); add("png_gray1_adam7.png")
    write_png("png_pal4_adam7.png", content(1, 15), 3, 4, palette=palette16, interlace=True); add("png_pal4_adam7.png")
    write_png("png_la8_adam7.png", content(2, 255), 4, 8, interlace=True); add("png_la8_adam7.png")
    # Tiny images: 1x1 and 1-pixel-wide interlaced (most Adam7 passes are empty).
    write_png("png_1x1.png", np.array([[[10, 200, 30]]]), 2, 8); add("png_1x1.png")
    one_col = content(3, 255)[:, :1]
    write_png("png_1col_adam7.png", one_col, 2, 8, interlace=True); add("png_1col_adam7.png")

    # JPEGs, written by Pillow (libjpeg-turbo).
    rgb = Image.fromarray(rgb8, "RGB")
    save_pillow("jpg_gray.jpg", Image.fromarray(g8, "L"), quality=90); add("jpg_gray.jpg")
    save_pillow("jpg_420.jpg", rgb, quality=85, subsampling=2); add("jpg_420.jpg")
    save_pillow("jpg_422.jpg", rgb, quality=85, subsampling=1); add("jpg_422.jpg")
    save_pillow("jpg_444.jpg", rgb, quality=95, subsampling=0); add("jpg_444.jpg")
    save_pillow("jpg_progressive.jpg", rgb, quality=85, subsampling=2, progressive=True); add("jpg_progressive.jpg")
    save_pillow("jpg_progressive_gray.jpg", Image.fromarray(g8, "L"), quality=80, progressive=True)
    add("jpg_progressive_gray.jpg")
    save_pillow("jpg_cmyk.jpg", Image.fromarray(content(4, 255).astype(np.uint8), "CMYK"), quality=90)
    add("jpg_cmyk.jpg")
    save_pillow("jpg_optimized.jpg", rgb, quality=70, optimize=True); add("jpg_optimized.jpg")
    # Fixed inputs that Pillow cannot write; kept as committed, only their expected bytes are recomputed.
    # jpg_ycck.jpg: 37x23 CMYK stored as YCCK (Adobe transform 2, as Photoshop writes CMYK JPEGs), written once by
    # libjpeg-turbo 2.1.5 (in_color_space JCS_CMYK, jpeg_set_colorspace(JCS_YCCK), quality 90).
    for fixed in ["jpg_ycck.jpg"]:
        if os.path.exists(os.path.join(OUT, fixed)):
            add(fixed)

    with open(os.path.join(OUT, "goldens.txt"), "w") as man:
        man.write("# name width height: made by tests/reference/make_image_goldens.py; NAME.rgb = Pillow "
                  "Image.open(NAME).convert('RGB').tobytes()\n")
        for name in made:
            path = os.path.join(OUT, name)
            with Image.open(path) as im:
                out = im.convert("RGB")
                with open(path + ".rgb", "wb") as f:
                    f.write(out.tobytes())
                man.write(f"{name} {out.width} {out.height}\n")
                print(f"{name:28s} {im.mode:5s} {os.path.getsize(path):6d} bytes")

    # The high-byte variant of the 16-bit gray file (ImageDecodeOptions.gray16_high_byte): v >> 8.
    with open(os.path.join(OUT, "png_gray16.png.hi.rgb"), "wb") as f:
        f.write(np.repeat((g16 >> 8).astype(np.uint8), 3, axis=-1).tobytes())

    # Checksums of the shared photos, hardcoded in tests/test_image.c.
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "images")
    if os.path.isdir(shared):
        for name in sorted(os.listdir(shared)):
            if not name.endswith(".png"):
                continue
            im = Image.open(os.path.join(shared, name)).convert("RGB")
            b = im.tobytes()
            h = 0xCBF29CE484222325
            for byte in b:
                h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
            px = [im.getpixel(p) for p in [(0, 0), (im.width - 1, 0), (100, 200), (im.width - 1, im.height - 1)]]
            print(f'{{"{name}", {im.width}, {im.height}, 0x{h:016X}ull, {px}}}')


if __name__ == "__main__":
    sys.exit(main())
