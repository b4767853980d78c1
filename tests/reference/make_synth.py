"""Goldens for train/synth.c, train/seamless_clone.c and train/conversation_train.c (tests/test_synth.c):

1. seamless: cv2.seamlessClone(src, dst, mask, center, NORMAL_CLONE) on crops of the shared photos, with the
   rectangular masks patch_ex makes and with ragged object-like masks; plus cv2.resize (INTER_LINEAR) and
   cv2.medianBlur on binary images, which patch_ex also calls.
2. patch_ex: a re-expression of NSA's patch_ex as AnomalyGPT calls it (code/datasets/self_sup_tasks.py,
   mvtec.py), driven by numpy's global generator through a recorder: every draw (randint, gamma, normal) goes on a
   tape that the golden stores, so the C side replays exactly these draws. Outputs: the image, patch mask, label,
   boxes and union-bbox centres.
3. conversation: the position word of every half-pixel centre on a 224 grid (the reference's if-chain), the answer
   texts, and (with ../shared/data/llama-tokenizer.model) the token ids and loss targets of build_one_instance.

OpenCV must be a 4.x of the reference's era (the reference pins opencv_python 4.8.0.74; 4.8.0.76 and 4.10.0.84
give the same clones, 4.14 and 5.x do not): requirements.txt pins opencv-python-headless 4.10.0.84, the first
with numpy 2 wheels.
"""
import os
import sys

import cv2
import numpy as np
import torch
from PIL import Image
from skimage.filters import median
from skimage.morphology import disk

sys.path.insert(0, os.path.dirname(__file__))
import golden_io  # noqa: E402

OUT = "tests/data/synth.safetensors"
SHARED = os.environ.get("AGPT_SHARED_DATA", "../shared/data")

major, minor = (int(x) for x in cv2.__version__.split(".")[:2])
if not (major == 4 and minor <= 10):
    sys.exit(f"make_synth: OpenCV {cv2.__version__}: need 4.x <= 4.10 (pip install opencv-python-headless==4.10.0.84)")


def photo(name, size):
    path = os.path.join(SHARED, "images", name)
    if os.path.exists(path):
        return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC))
    rng = np.random.default_rng(len(name))  # no shared data: smooth noise instead (the golden records the inputs)
    return cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (7, 7), 0)


def on_background(texture, level, radius_frac, seed):
    """An 'object' (a disc of texture, ragged edge) on a flat background of the given level."""
    h, w, _ = texture.shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h / 2 + 3, xx - w / 2 - 2) + rng.normal(0, 1.5, (h, w))
    obj = r < radius_frac * h
    img = np.where(obj[..., None], texture, level).astype(np.int32) + rng.integers(-3, 4, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


T = {}  # the golden tensors


def u8(a):
    return torch.from_numpy(np.ascontiguousarray(a).astype(np.uint8))


def i32(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.int32)))


def f32(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float32)))


# ---- 1. OpenCV primitives ---------------------------------------------------------------------------------

brick, grass, gravel = photo("brick.png", 224), photo("grass.png", 224), photo("gravel.png", 224)
rng = np.random.default_rng(11)
clone_cases = []
for c in range(6):
    dst = [brick, grass, gravel][c % 3][:96, :96] if c < 5 else brick[:160, :160]
    src_full = [gravel, brick, grass][c % 3]
    sh, sw = int(rng.integers(20, 70)), int(rng.integers(20, 70))
    y, x = int(rng.integers(0, 224 - sh)), int(rng.integers(0, 224 - sw))
    src = src_full[y:y + sh, x:x + sw]
    if c % 2 == 0:  # patch_ex's rectangle: ones, border zeroed
        mask = np.full((sh, sw), 255, np.uint8)
    else:  # an object-like mask, as with a background skip
        yy, xx = np.mgrid[:sh, :sw]
        mask = (255 * (np.hypot((yy - sh / 2) / sh, (xx - sw / 2) / sw) + rng.normal(0, 0.03, (sh, sw)) < 0.45)).astype(np.uint8)
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = 0, 0, 0, 0
    H, W = dst.shape[:2]
    cy, cx = int(rng.integers(sh // 2 + 1, H - sh // 2 - 1)), int(rng.integers(sw // 2 + 1, W - sw // 2 - 1))
    out = cv2.seamlessClone(src, dst, mask, (cx, cy), cv2.NORMAL_CLONE)
    T[f"clone{c}.src"], T[f"clone{c}.dst"], T[f"clone{c}.mask"], T[f"clone{c}.out"] = u8(src), u8(dst), u8(mask), u8(out)
    T[f"clone{c}.center"] = i32([cx, cy])
    clone_cases.append(c)
T["clone.count"] = i32([len(clone_cases)])

resize_cases = [(37, 53, 3, 61, 29), (90, 90, 3, 45, 45), (24, 31, 3, 48, 40), (60, 44, 1, 83, 30), (17, 80, 1, 9, 111)]
for i, (sh, sw, cn, dh, dw) in enumerate(resize_cases):
    src = rng.integers(0, 256, (sh, sw, cn), dtype=np.uint8) if i % 2 == 0 else (rng.random((sh, sw, cn)) < 0.5).astype(np.uint8)
    out = cv2.resize(src if cn == 3 else src[..., 0], (dw, dh))
    T[f"resize{i}.src"], T[f"resize{i}.out"] = u8(src), u8(out.reshape(dh, dw, cn))
T["resize.count"] = i32([len(resize_cases)])

for k in (5, 7):
    src = (cv2.GaussianBlur(rng.random((50, 70)), (5, 5), 0) > 0.5).astype(np.uint8)
    src ^= (rng.random((50, 70)) < 0.1).astype(np.uint8)
    T[f"median{k}.src"], T[f"median{k}.out"] = u8(src), u8(cv2.medianBlur(src, k))

# ---- 2. patch_ex from recorded draws ----------------------------------------------------------------------


class Tape:
    """np.random's draws, recorded in order: (kind, value) with 1 randint, 2 gamma, 3 normal."""

    def __init__(self):
        self.kind, self.value = [], []

    def randint(self, lo, hi):
        v = int(np.random.randint(lo, hi))
        self.kind.append(1), self.value.append(float(v))
        return v

    def gamma(self, shape, scale):
        v = float(np.random.gamma(shape, scale))
        self.kind.append(2), self.value.append(v)
        return v

    def uniform(self, lo, hi):
        v = float(np.random.uniform(lo, hi))
        self.kind.append(4), self.value.append(v)
        return v

    def normal(self, mean, std):
        v = float(np.random.normal(mean, std))
        self.kind.append(3), self.value.append(v)
        return v


def one_patch(tape, dest, src, dest_obj, src_obj, width_bounds, gamma_params, min_object_pct, min_overlap_pct,
              resize_bounds, cutpaste=False):
    """_patch_ex with NORMAL_CLONE, shift=True, no ellipses; resize=True except for the cutpaste path."""
    skip_bg = src_obj is not None
    dims = np.array(dest.shape)
    if cutpaste:
        area = tape.uniform(0.02, 0.15) / 4.0
        aspect = tape.uniform(0.3, 1) if tape.randint(0, 2) > 0 else tape.uniform(1, 3.3)
        pw1 = int(np.rint(np.clip(np.sqrt(area * aspect * dims[0] ** 2), 0, dims[0])))
        pw2 = int(np.rint(np.clip(area * dims[0] ** 2 / pw1, 0, dims[1])))
        c1, c2 = tape.randint(pw1, dims[0] - pw1), tape.randint(pw2, dims[1] - pw2)
        y0, y1 = np.clip(c1 - pw1, 0, dims[0]), np.clip(c1 + pw1, 0, dims[0])
        x0, x1 = np.clip(c2 - pw2, 0, dims[1]), np.clip(c2 + pw2, 0, dims[1])
        pmask = np.ones((y1 - y0, x1 - x0, 1), np.uint8)
        return blend(tape, dest, src[y0:y1, x0:x1], pmask, None, None, min_object_pct, min_overlap_pct)
    minw1, maxw1 = int(np.round(width_bounds[0][0] * dims[0])), int(np.round(width_bounds[0][1] * dims[0]))
    minw2, maxw2 = int(np.round(width_bounds[1][0] * dims[1])), int(np.round(width_bounds[1][1] * dims[1]))
    shape, scale, offset = gamma_params
    pw1 = int(np.clip((offset + tape.gamma(shape, scale)) * dims[0], minw1, maxw1))
    pw2 = int(np.clip((offset + tape.gamma(shape, scale)) * dims[1], minw2, maxw2))
    attempts = 0
    while True:
        c1, c2 = tape.randint(minw1, dims[0] - minw1), tape.randint(minw2, dims[1] - minw2)
        y0, y1 = np.clip(c1 - pw1, 0, dims[0]), np.clip(c1 + pw1, 0, dims[0])
        x0, x1 = np.clip(c2 - pw2, 0, dims[1]), np.clip(c2 + pw2, 0, dims[1])
        pmask = np.ones((y1 - y0, x1 - x0, 1), np.uint8)
        found = (not skip_bg) or np.sum(pmask & src_obj[y0:y1, x0:x1]) / (pmask.shape[0] * pmask.shape[1]) > min_object_pct
        attempts += 1
        if attempts == 200:
            return dest.copy(), None, None
        if found:
            break
    patch = src[y0:y1, x0:x1]
    h, w, _ = patch.shape
    s = np.clip(tape.normal(1, 0.5), *resize_bounds)
    nh = np.clip(s * h, minw1, maxw1)
    nw = np.clip(int(nh / h * w), minw2, maxw2)
    nh = np.clip(int(nw / w * h), minw1, maxw1)
    patch = cv2.resize(patch, (int(nw), int(nh)))
    h, w, _ = patch.shape
    pmask = cv2.resize(pmask[..., 0], (w, h))[..., None]
    sobj = cv2.resize(src_obj[y0:y1, x0:x1, 0], (w, h))[..., None] if skip_bg else None
    return blend(tape, dest, patch, pmask, sobj, dest_obj, min_object_pct, min_overlap_pct)


def blend(tape, dest, patch, pmask, sobj, dest_obj, min_object_pct, min_overlap_pct):
    """_patch_ex from the destination centre on: shift, masks, seamlessClone."""
    skip_bg = sobj is not None
    h, w, _ = patch.shape
    attempts = 0
    while True:
        c1 = tape.randint(h // 2 + 1, dest.shape[0] - h // 2 - 1)
        c2 = tape.randint(w // 2 + 1, dest.shape[1] - w // 2 - 1)
        y0, y1 = c1 - h // 2, c1 + (h + 1) // 2
        x0, x1 = c2 - w // 2, c2 + (w + 1) // 2
        found = True
        if skip_bg:
            both = dest_obj[y0:y1, x0:x1] & sobj & pmask
            found = np.sum(sobj) / (h * w) > min_object_pct and np.sum(both) / np.sum(sobj) > min_overlap_pct
        attempts += 1
        if attempts == 200:
            return dest.copy(), None, None
        if found:
            break
    if skip_bg:
        pmask &= sobj | dest_obj[y0:y1, x0:x1]
        clone_mask = 255 * (pmask | ((1 - sobj) & (1 - dest_obj[y0:y1, x0:x1])))
    else:
        clone_mask = 255 * pmask
    clone_mask = clone_mask.astype(np.uint8)
    clone_mask[0], clone_mask[-1], clone_mask[:, 0], clone_mask[:, -1] = 0, 0, 0, 0
    center = (x1 - (x1 - x0) // 2, y0 + (y1 - y0) // 2)
    if np.sum(clone_mask > 0) < 50:
        return dest.copy(), None, None
    out = cv2.seamlessClone(patch, dest, clone_mask, center, cv2.NORMAL_CLONE)
    return out, (y0, y1, x0, x1), pmask


def object_mask(img, background, threshold):
    m = np.uint8(np.abs(img.mean(axis=-1, keepdims=True) - background) > threshold)
    m[..., 0] = cv2.medianBlur(m[..., 0], 7)
    return m


def patch_ex(tape, dest, src, width_bounds, logistic, background, resize_bounds, num_patches=2,
             gamma_params=(2, 0.05, 0.03), min_object_pct=0, min_overlap_pct=0.25, cutpaste=False):
    if cutpaste:
        background, num_patches = None, 1
    src_obj = dest_obj = None
    if background is not None:
        src_obj, dest_obj = object_mask(src, *background), object_mask(dest, *background)
    centers, boxes = [], []
    mask = np.zeros_like(dest[..., 0:1])
    out = dest.copy()
    u0, u1, v0, v1 = mask.shape[0] - 1, 0, mask.shape[1] - 1, 0
    for i in range(num_patches):
        if i == 0 or tape.randint(0, 2) > 0:
            out, box, pmask = one_patch(tape, out, src, dest_obj, src_obj, width_bounds, gamma_params,
                                        min_object_pct, min_overlap_pct, resize_bounds, cutpaste)
            if pmask is not None:
                y0, y1, x0, x1 = box
                mask[y0:y1, x0:x1] = pmask
                u0, u1, v0, v1 = min(u0, y0), max(u1, y1), min(v0, x0), max(v1, x1)
                centers.append(((u0 + u1) / 2, (v0 + v1) / 2))
                boxes.append(box)
    lm = np.uint8(np.mean(np.abs(1.0 * mask * dest - 1.0 * mask * out), axis=-1, keepdims=True) > 1)
    lm[..., 0] = cv2.medianBlur(lm[..., 0], 5)
    k, x0 = logistic
    inten = np.mean(np.abs(lm * dest * 1.0 - lm * out * 1.0), axis=-1, keepdims=True)
    inten[..., 0] = median(inten[..., 0], disk(5))
    label = lm / (1 + np.exp(-k * (inten - x0)))
    return out, mask[..., 0], label[..., 0], centers, boxes


# (class, dest, src, width bounds, logistic, background, resize bounds, numpy seed); the C side takes the
# class's parameters from its own table, so these rows also check that table.
S = 96
bg_white = lambda t, s: on_background(t, 235, 0.36, s)  # noqa: E731
bg_black = lambda t, s: on_background(t, 8, 0.33, s)  # noqa: E731
patch_cases = [
    ("carpet", brick[:S, :S], gravel[:S, :S], ((0.03, 0.4), (0.03, 0.4)), (1 / 3, 7), None, (0.5, 2), 3),
    ("bottle", bg_white(brick[:S, :S], 1), bg_white(grass[:S, :S], 2), ((0.03, 0.4), (0.03, 0.4)), (1 / 12, 24), (200, 60), (0.7, 1.3), 5),
    ("hazelnut", bg_black(gravel[:S, :S], 3), bg_black(brick[:S, :S], 4), ((0.03, 0.35), (0.03, 0.35)), (1 / 12, 24), (20, 20), (0.7, 1.3), 7),
    ("screw", bg_white(grass[:S, :S], 5), bg_white(gravel[:S, :S], 6), ((0.03, 0.12), (0.03, 0.12)), (1, 3), (200, 60), (0.7, 1.3), 8),
    ("capsule", bg_white(gravel[:S, :S], 7), bg_white(brick[:S, :S], 8), ((0.03, 0.15), (0.03, 0.4)), (1 / 2, 4), (200, 60), (0.7, 1.3), 9),
    ("toothbrush", bg_black(grass[:S, :S], 9), bg_black(gravel[:S, :S], 10), ((0.03, 0.4), (0.03, 0.2)), (1 / 6, 15), (20, 20), (0.7, 1.3), 10),
    ("wood", gravel[:S, :S], grass[:S, :S], ((0.03, 0.4), (0.03, 0.4)), (1 / 6, 15), None, (0.5, 2), 12),
    ("candle", grass[:S, :S], brick[:S, :S], ((0.03, 0.4), (0.03, 0.4)), (1 / 12, 24), None, (0.5, 2), 13),
    # the cutpaste option (off in the reference's setting), with bottle's table row
    ("bottle+cutpaste", bg_white(gravel[:S, :S], 11), bg_white(brick[:S, :S], 12), ((0.03, 0.4), (0.03, 0.4)), (1 / 12, 24), (200, 60), (0.7, 1.3), 14),
]
names = []
for i, (cls, dest, src, wb, logi, bg, rb, seed) in enumerate(patch_cases):
    np.random.seed(seed)
    tape = Tape()
    out, mask, label, centers, boxes = patch_ex(tape, dest, src, wb, logi, bg, rb, cutpaste=cls.endswith("+cutpaste"))
    p = f"patch{i}."
    T[p + "dest"], T[p + "src"], T[p + "out"], T[p + "mask"] = u8(dest), u8(src), u8(out), u8(mask)
    T[p + "label"] = f32(label)
    T[p + "tape_kind"] = i32(tape.kind)
    # the float64 draws matter (gamma widths are truncated to int): stored as f32 hi + f32 lo (v = hi + lo to ~1e-14)
    hi = np.asarray(tape.value, np.float64).astype(np.float32)
    lo = (np.asarray(tape.value, np.float64) - hi.astype(np.float64)).astype(np.float32)
    T[p + "tape_hi"], T[p + "tape_lo"] = f32(hi), f32(lo)
    T[p + "centers"] = f32(np.array(centers, np.float64).reshape(-1, 2))
    T[p + "boxes"] = i32(np.array(boxes).reshape(-1, 4))
    names.append(cls)
    print(f"  patch{i} {cls}: {len(centers)} patches, {len(tape.kind)} draws, gt pixels {(label > 0.3).sum()}")
T["patch.count"] = i32([len(patch_cases)])

# ---- 3. position words and conversations ------------------------------------------------------------------

WORDS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]


def position(center):
    """mvtec.py's if-chain, word for word in logic (center[0] is the row)."""
    cx, cy = center[0] / 224, center[1] / 224
    if cx <= 1 / 3 and cy <= 1 / 3: return "top left"  # noqa: E701
    elif cx <= 1 / 3 and cy > 1 / 3 and cy <= 2 / 3: return "top"  # noqa: E701
    elif cx <= 1 / 3 and cy > 2 / 3: return "top right"  # noqa: E701
    elif cx <= 2 / 3 and cy <= 1 / 3: return "left"  # noqa: E701
    elif cx <= 2 / 3 and cy > 1 / 3 and cy <= 2 / 3: return "center"  # noqa: E701
    elif cx <= 2 / 3 and cy > 2 / 3: return "right"  # noqa: E701
    elif cy <= 1 / 3: return "bottom left"  # noqa: E701
    elif cy > 1 / 3 and cy <= 2 / 3: return "bottom"  # noqa: E701
    elif cy > 2 / 3: return "bottom right"  # noqa: E701


# Centres a union bbox can have are k/2; every one near the thirds (74.67 and 149.33) and some between.
halves = np.concatenate([np.arange(0, 449, 16), np.arange(140, 160), np.arange(290, 310)]) / 2.0
T["pos.grid"] = f32(halves)
T["pos.word"] = u8([[WORDS.index(position((r, c))) for c in halves] for r in halves])


def answer(centers):
    if not centers:
        return "No, there is no anomaly in the image."
    pos = [position(c) for c in centers]
    if len(centers) > 1:
        text = "Yes, there are " + str(len(centers)) + " anomalies in the image, they are at the "
        for i in range(len(centers)):
            if i == 0:
                text += pos[i]
            elif i == 1 and pos[i] != pos[i - 1]:
                text += (", " + pos[i]) if i != len(centers) - 1 else (" and " + pos[i] + " of the image.")
            elif i == 1 and pos[i] == pos[i - 1] and i == len(centers) - 1:
                text += " of the image."
        return text
    return "Yes, there is an anomaly in the image, at the " + pos[0] + " of the image."


DESCR = {
    "bottle": "This is a photo of a bottle for anomaly detection, which should be round, without any damage, flaw, defect, scratch, hole or broken part.",
    "cable": "This is a photo of three cables for anomaly detection, they are green, blue and grey, which cannot be missed or swapped and should be without any damage, flaw, defect, scratch, hole or broken part.",
    "metal_nut": "This is a photo of a metal nut for anomaly detection, which should be without any damage, flaw, defect, scratch, hole or broken part, and shouldn't be fliped.",
    "chewinggum": "This is a photo of a chewinggom for anomaly detection, which should be white, without any damage, flaw, defect, scratch, hole or broken part.",
    "pill": "This is a photo of a pill for anomaly detection, which should be white, with print 'FF' and red patterns, without any damage, flaw, defect, scratch, hole or broken part.",
}
conv_cases = [("bottle", []), ("bottle", [(30.5, 20.0)]), ("cable", [(74.5, 149.5), (120.0, 149.0)]),
              ("metal_nut", [(200.0, 75.0), (190.5, 80.0)]), ("chewinggum", [(112.0, 112.0)]), ("pill", [(149.5, 74.5), (10.0, 220.0)])]
T["conv.count"] = i32([len(conv_cases)])
texts = {}
for i, (cls, centers) in enumerate(conv_cases):
    q, a = DESCR[cls] + " Is there any anomaly in the image?", answer(centers)
    T[f"conv{i}.centers"] = f32(np.array(centers, np.float64).reshape(-1, 2))
    T[f"conv{i}.answer"] = u8(np.frombuffer(a.encode(), np.uint8))
    T[f"conv{i}.question"] = u8(np.frombuffer(q.encode(), np.uint8))
    texts[i] = (q, a)
tok_path = os.path.join(SHARED, "llama-tokenizer.model")
meta = {"cv2": cv2.__version__, "numpy": np.__version__, "classes": ",".join(names)}
if os.path.exists(tok_path):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    for i, (q, a) in texts.items():
        # build_one_instance: each piece tokenised on its own; loss only on the gpt turn (incl. "\n###")
        qi, ai = sp.encode(q + "\n### Assistant:"), sp.encode(a + "\n###")
        T[f"conv{i}.ids"] = i32(qi + ai)
        T[f"conv{i}.targets"] = i32([-100] * len(qi) + ai)
    meta["tokens"] = "1"
golden_io.write(OUT, T, meta)
