"""Makes the preprocessing goldens in tests/data/preprocess/ (the files are committed).

The peer is what the official AnomalyGPT runs (reference doc section 1.1, ImageBind data.py):
    Image.open(f).convert("RGB")
    -> transforms.Resize(224, BICUBIC) + CenterCrop(224)       (PREPROCESS_SHORTER_SIDE_CROP: inference, few-shot)
       or transforms.Resize((224, 224), BICUBIC) + CenterCrop   (PREPROCESS_SQUASH: web demo, training)
    -> ToTensor() -> Normalize(CLIP mean, std)
torchvision's Resize on a PIL image is PIL's Image.resize((w, h), BICUBIC) with no box and no reducing_gap, so the
resampling here is Pillow's own. When torchvision is importable the resized sizes, crop offsets and normalised values
are checked against torchvision itself, bit for bit, and must equal the script's transcription of torchvision 0.14
(resized_size, crop_offsets, to_tensor_normalize below), which is what runs without it.

Pass order. The reference pins Pillow 10.0.0, whose ImagingResampleInner (like every Pillow up to 12.x) runs the
horizontal pass and then the vertical pass. Pillow 13 runs the vertical pass first when the height loses more than
twice as many pixels as the width (Resample.c: (in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2), and
since each pass rounds to u8 some pixels then move by a few levels. Both orders are made here with any Pillow
version from two single-axis resizes (a resize that changes one side runs exactly one pass, the same code in every
version): im.resize((out_w, h)).resize((out_w, out_h)) is the Pillow 10 result, im.resize((w, out_h)).resize(...)
the vertical-first one. The script asserts that the installed Pillow's own im.resize equals the emulation of its
version. The stored goldens are the Pillow 10 ones; the Pillow 13 results are recorded as checksums. Run with
Pillow 10.0.0 (the reference's pin, `pip install --target DIR pillow==10.0.0` and PYTHONPATH=DIR) and with 13.0.0,
this script writes the same pixels.

What is written (tests/test_preprocess.c reads it, no Python needed):
  manifest.txt          one line per check, described at its top
  synth_*.png           the synthetic inputs (odd sizes and aspect ratios, sharp edges that make bicubic
                        overshoot and clip, 1-pixel checkerboards, noise, smooth gradients)
  *.png (expected)      Pillow 10's resized image before the crop, or, for resized images too large to commit
                        (7x300 -> 224x9600), the window that holds the crop, plus a 64-bit FNV-1a of the whole
                        resized image; written as 8-bit gray PNG when R = G = B (the shared photos), else RGB
  resize_*              inputs and outputs of image_resize_bicubic with 1, 3 and 4 channels at sizes that are
                        not 224 (4 channels as Pillow's CMYK, which resamples bands independently): raw .u8
                        [h][w][channels] for the small ones, PNG outputs of the larger synth_*.png inputs
  normalize_table.f32   [3][256] float32: ToTensor + Normalize of every byte value in every channel, from torch
The real photos ../shared/data/images/*.png are read from there (never copied); only their expected outputs are
stored.

Regenerate from the repository root:  tests/reference/.venv/bin/python tests/reference/make_preprocess_goldens.py
(made by tests/reference/make_goldens.sh too). Recorded in manifest.txt: the Pillow, torch and torchvision
versions used.
"""
import glob
import os
import sys

import numpy as np
from PIL import Image
import PIL

try:
    import torch
except ImportError:  # the table is then computed with numpy float32, which rounds the same way
    torch = None
try:
    import torchvision
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode
except ImportError:
    torchvision = None

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "data", "preprocess")
SHARED_IMAGES = os.path.join(ROOT, "..", "shared", "data", "images")
SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
INSTALLED_ORDER = "pillow13" if int(PIL.__version__.split(".")[0]) >= 13 else "pillow10"
# A resized image above this many pixels is stored as its crop window and a checksum of the whole.
MAX_STORED_PIXELS = 120_000


# ---- torchvision 0.14, transcribed --------------------------------------------------------------------------

def resized_size(w, h, mode):
    """(new_w, new_h). torchvision 0.14 functional._compute_resized_output_size:
        if len(size) == 1:  # specified size only for the smallest edge
            h, w = image_size
            short, long = (w, h) if w <= h else (h, w)
            requested_new_short = size if isinstance(size, int) else size[0]
            new_short, new_long = requested_new_short, int(requested_new_short * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:  # specified both h and w
            new_w, new_h = size[1], size[0]
    F_pil.resize then calls img.resize((new_w, new_h), interpolation)."""
    if mode == "squash":
        return SIZE, SIZE
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = SIZE, int(SIZE * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def crop_offsets(w, h):
    """(left, top) of CenterCrop(224) on a w x h image. torchvision 0.14 functional.center_crop:
        crop_top = int(round((image_height - crop_height) / 2.0))
        crop_left = int(round((image_width - crop_width) / 2.0))
    Python's round is half to even. (The zero-padding branch for images smaller than the crop is never reached
    after Resize.)"""
    assert w >= SIZE and h >= SIZE
    return int(round((w - SIZE) / 2.0)), int(round((h - SIZE) / 2.0))


def to_tensor_normalize(hwc_u8):
    """torchvision 0.14 to_tensor (uint8 HWC -> permute -> .to(float32).div(255)) then normalize
    (tensor.sub_(mean[:, None, None]).div_(std[:, None, None]) with float32 mean and std). CHW float32."""
    if torch is None:
        x = np.ascontiguousarray(hwc_u8.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)
        m = np.asarray(MEAN, dtype=np.float32)[:, None, None]
        s = np.asarray(STD, dtype=np.float32)[:, None, None]
        return (x - m) / s
    t = torch.from_numpy(np.array(hwc_u8, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    t = t.to(dtype=torch.float32).div(255)
    mean = torch.as_tensor(MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(STD, dtype=torch.float32).view(-1, 1, 1)
    return t.sub_(mean).div_(std).numpy()


# ---- the peer ----------------------------------------------------------------------------------------------

def vertical_first(w, h, ow, oh, order):
    """Pillow 13's choice in ImagingResampleInner; Pillow 10 always starts with the horizontal pass."""
    return order == "pillow13" and (h - oh) > 0 and (h - oh) > (w - ow) * 2


def pillow_resize(img, size, order):
    """img.resize(size, BICUBIC) as Pillow 10 ("pillow10") or Pillow 13 ("pillow13") computes it, from two
    single-axis resizes (each one pass; a same-size resize is a copy)."""
    (w, h), (ow, oh) = img.size, size
    if vertical_first(w, h, ow, oh, order):
        return img.resize((w, oh), Image.BICUBIC).resize((ow, oh), Image.BICUBIC)
    return img.resize((ow, h), Image.BICUBIC).resize((ow, oh), Image.BICUBIC)


def checked_resize(img, size):
    """{order: resized image}, after checking the installed Pillow against the emulation of its own order."""
    out = {order: pillow_resize(img, size, order) for order in ("pillow10", "pillow13")}
    assert img.resize(size, Image.BICUBIC).tobytes() == out[INSTALLED_ORDER].tobytes(), (img.size, size)
    return out


def pipeline(img, mode):
    """{order: resized PIL image (before the crop)}, and the crop (left, top)."""
    w, h = img.size
    rw, rh = resized_size(w, h, mode)
    resized = checked_resize(img, (rw, rh))
    left, top = crop_offsets(rw, rh)
    if torchvision is not None:
        # torchvision runs the installed Pillow: compare it with that order's result.
        mine = resized[INSTALLED_ORDER]
        crop = np.asarray(mine, dtype=np.uint8)[top:top + SIZE, left:left + SIZE]
        bicubic = InterpolationMode.BICUBIC
        resize = T.Resize(SIZE if mode == "shorter" else (SIZE, SIZE), interpolation=bicubic)
        tv_resized = resize(img)
        assert tv_resized.size == (rw, rh), (mode, img.size, tv_resized.size, (rw, rh))
        assert tv_resized.tobytes() == mine.tobytes()
        tv = T.Compose([resize, T.CenterCrop(SIZE), T.ToTensor(), T.Normalize(MEAN, STD)])(img).numpy()
        assert tv.dtype == np.float32 and tv.shape == (3, SIZE, SIZE)
        # Bit for bit: the transcribed crop and normalisation are the same arithmetic as torchvision's.
        assert tv.tobytes() == to_tensor_normalize(crop).tobytes(), (mode, img.size)
    return resized, (left, top)


def fnv1a64(data):
    """64-bit FNV-1a of a byte string (tests/test_preprocess.c computes the same)."""
    h = 0xCBF29CE484222325
    for b in np.frombuffer(data, dtype=np.uint8).tolist():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


# ---- synthetic inputs -------------------------------------------------------------------------------------

def synth(w, h, seed):
    """RGB content that stresses the resampler and still compresses: smooth ramps and rings, hard 0/255 edges
    (bicubic overshoot, so the u8 clipping in both passes matters), a 1-pixel checkerboard (the highest
    frequency, aliased by any downscale), and a band of noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u = (x + 0.5) / w
    v = (y + 0.5) / h
    r = 255 * u
    g = 255 * v
    rr = np.hypot(u - 0.4, v - 0.6)
    b = 127.5 + 127.5 * np.sin(rr * 40.0)
    img = np.stack([r, g, b], axis=-1)
    # A hard-edged block of saturated colour.
    block = (u > 0.15) & (u < 0.45) & (v > 0.2) & (v < 0.5)
    img[block] = (255, 0, 255)
    # A 1-pixel checkerboard of black and white.
    checker = (u > 0.55) & (u < 0.85) & (v > 0.55) & (v < 0.8)
    img[checker] = (((x + y) % 2) * 255)[checker][:, None]
    # Noise band.
    band = (v > 0.88) & (v < 0.92)
    img[band] = rng.integers(0, 256, size=(int(band.sum()), 3))
    # Pure black and white corners.
    img[0, 0] = 0
    img[-1, -1] = 255
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


SYNTH = [  # name, width, height: every case runs both modes
    ("1x1", 1, 1),              # upscaling from one pixel
    ("7x300", 7, 300),          # extreme aspect: Resize(224) gives 224x9600
    ("300x7", 300, 7),          # and 9600x224
    ("229x229", 229, 229),      # a mild downscale (scale 1.022)
    ("224x229", 224, 229),      # the resize is a no-op and the crop top is round(2.5) = 2, not 3
    ("224x227", 224, 227),      # crop top round(1.5) = 2
    ("225x401", 225, 401),      # 224x399 after Resize(224): top round(87.5) = 88
    ("640x480", 640, 480),      # 298x224: left 37
    ("17x13", 17, 13),          # upscaling on both axes, 292x224
    ("224x224", 224, 224),      # exact size: Pillow returns a copy
]

RESIZE_ONLY = [  # name, source (w, h) or a synthetic input above, channels, (out_w, out_h)
    ("gray_37x23_to_50x11", (37, 23), 1, (50, 11)),     # up in x, down in y
    ("rgb_37x23_to_19x40", (37, 23), 3, (19, 40)),      # down in x, up in y
    ("cmyk_37x23_to_64x64", (37, 23), 4, (64, 64)),     # 4 bands
    ("rgb_640x480_to_100x75", "640x480", 3, (100, 75)),  # strong antialiased downscale (support 12.8)
    ("rgb_229x229_to_229x100", "229x229", 3, (229, 100)),  # vertical pass only
    ("rgb_300x7_to_150x7", "300x7", 3, (150, 7)),       # horizontal pass only
    ("rgb_5x5_to_1x1", (5, 5), 3, (1, 1)),              # one output pixel
]


def save_png(path, arr):
    """Gray PNG when every pixel has R = G = B (image_load reads it back as RGB), else RGB."""
    if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        Image.fromarray(np.ascontiguousarray(arr[..., 0]), "L").save(path, optimize=True)
    else:
        Image.fromarray(np.ascontiguousarray(arr), "RGB").save(path, optimize=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    for old in glob.glob(os.path.join(OUT, "*")):
        os.remove(old)
    lines = [
        "# tests/data/preprocess: made by tests/reference/make_preprocess_goldens.py",
        f"# Pillow {PIL.__version__}, torch {torch.__version__ if torch else 'none'}, "
        f"torchvision {torchvision.__version__ if torchvision else 'none (transcription of 0.14 used)'}; "
        f"the installed Pillow was checked against the {INSTALLED_ORDER} pass order",
        "# pipe NAME INPUT MODE W H RESIZED_W RESIZED_H CROP_LEFT CROP_TOP GOLDEN GX GY GW GH FNV64 FNV64_PILLOW13",
        "#   INPUT: data:FILE (this folder) or shared:FILE (../shared/data/images); MODE: shorter | squash.",
        "#   GOLDEN (a PNG here; the input itself when the resize keeps the size) holds Pillow 10's resized pixels",
        "#   [GX, GX+GW) x [GY, GY+GH); FNV64 is the 64-bit FNV-1a of the whole resized image (RGB, row-major), and",
        "#   FNV64_PILLOW13 the same for Pillow 13's pass order.",
        "# resize NAME SRC W H CHANNELS OUT_W OUT_H GOLDEN FNV64_PILLOW13",
        "#   (*.u8: raw [h][w][channels]; *.png: RGB, read by image_load; GOLDEN is Pillow 10's output)",
        "# normalize FILE   ([3][256] float32 little-endian: ToTensor + Normalize of byte value v in channel c)",
    ]

    # Normalisation table: a 16x16 image whose pixel i holds byte i in every channel.
    ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    table = to_tensor_normalize(ramp).reshape(3, 256)
    if torchvision is not None:
        tv = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])(Image.fromarray(ramp, "RGB")).numpy()
        assert tv.reshape(3, 256).tobytes() == table.tobytes()
    table.astype("<f4").tofile(os.path.join(OUT, "normalize_table.f32"))
    lines.append("normalize normalize_table.f32")

    inputs = []
    for i, (name, w, h) in enumerate(SYNTH):
        fname = f"synth_{name}.png"
        Image.fromarray(synth(w, h, 100 + i), "RGB").save(os.path.join(OUT, fname), optimize=True)
        inputs.append((f"synth_{name}", "data:" + fname, os.path.join(OUT, fname)))
    shared = sorted(glob.glob(os.path.join(SHARED_IMAGES, "*.png")))
    if not shared:
        print(f"warning: no photos in {SHARED_IMAGES}; their goldens are not made", file=sys.stderr)
    for path in shared:
        base = os.path.splitext(os.path.basename(path))[0]
        inputs.append((f"photo_{base}", "shared:" + os.path.basename(path), path))

    for name, ref, path in inputs:
        img = Image.open(path).convert("RGB")  # as ImageBind's load_and_transform_vision_data does
        w, h = img.size
        stored = {}
        for mode in ("shorter", "squash"):
            both, (left, top) = pipeline(img, mode)
            rw, rh = both["pillow10"].size
            full = np.asarray(both["pillow10"], dtype=np.uint8)
            digest = fnv1a64(full.tobytes())
            digest13 = fnv1a64(both["pillow13"].tobytes())
            if rw * rh <= MAX_STORED_PIXELS:
                gx, gy, gw, gh = 0, 0, rw, rh
            else:
                gx, gy, gw, gh = left, top, SIZE, SIZE
            window = full[gy:gy + gh, gx:gx + gw]
            key = (rw, rh, gx, gy, gw, gh, digest)
            if key in stored:  # square inputs: both modes give the same resize; store it once
                golden = stored[key]
            elif (rw, rh) == (w, h) and ref.startswith("data:"):
                # Pillow returns a copy when the size does not change: the input is its own golden.
                assert full.tobytes() == img.tobytes()
                golden = ref[len("data:"):]
            else:
                golden = f"{name}_{mode}.png"
                save_png(os.path.join(OUT, golden), window)
                stored[key] = golden
            lines.append(f"pipe {name} {ref} {mode} {w} {h} {rw} {rh} {left} {top} {golden} "
                         f"{gx} {gy} {gw} {gh} {digest:016x} {digest13:016x}")
            print(f"{name:22s} {mode:8s} {w}x{h} -> {rw}x{rh} crop ({left},{top}) stored {golden}"
                  + ("" if digest == digest13 else "  (Pillow 13 differs)"))

    for i, (name, source, channels, (ow, oh)) in enumerate(RESIZE_ONLY):
        if isinstance(source, str):  # a committed synthetic input: no second copy of its pixels
            src_file = f"synth_{source}.png"
            im = Image.open(os.path.join(OUT, src_file)).convert("RGB")
            w, h = im.size
            both = checked_resize(im, (ow, oh))
            out = np.asarray(both["pillow10"], dtype=np.uint8)
            out_file = f"resize_{name}.png"
            Image.fromarray(out, "RGB").save(os.path.join(OUT, out_file), optimize=True)
            lines.append(f"resize {name} {src_file} {w} {h} {channels} {ow} {oh} {out_file} "
                         f"{fnv1a64(both['pillow13'].tobytes()):016x}")
            continue
        w, h = source
        rgb = synth(w, h, 200 + i)
        if channels == 1:
            src, pil_mode = rgb[..., 1].copy(), "L"
        elif channels == 3:
            src, pil_mode = rgb, "RGB"
        else:
            src, pil_mode = np.concatenate([rgb, 255 - rgb[..., :1]], axis=2), "CMYK"
        im = Image.frombytes(pil_mode, (w, h), src.tobytes())
        both = checked_resize(im, (ow, oh))
        out = np.asarray(both["pillow10"], dtype=np.uint8)
        assert out.size == ow * oh * channels
        src.astype(np.uint8).tofile(os.path.join(OUT, f"resize_{name}.src.u8"))
        out.tofile(os.path.join(OUT, f"resize_{name}.out.u8"))
        lines.append(f"resize {name} resize_{name}.src.u8 {w} {h} {channels} {ow} {oh} resize_{name}.out.u8 "
                     f"{fnv1a64(both['pillow13'].tobytes()):016x}")

    with open(os.path.join(OUT, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(OUT, "*")))
    print(f"wrote {len(glob.glob(os.path.join(OUT, '*')))} files, {total} bytes, to {OUT}")
    assert total < 1_000_000, "goldens must stay under 1 MB"


if __name__ == "__main__":
    main()
