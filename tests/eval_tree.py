"""Builds tiny MVTec-AD and VisA trees for tests/test_eval.sh from a few PNG images, with masks written by a
plain-stdlib PNG encoder (no packages needed). Usage: eval_tree.py OUT IMAGE..."""
import os
import shutil
import struct
import sys
import zlib


def write_gray_png(path, w, h, pixel):
    rows = b"".join(b"\0" + bytes(pixel(x, y) for x in range(w)) for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def box(x0, y0, x1, y1):
    return lambda x, y: 255 if x0 <= x < x1 and y0 <= y < y1 else 0


def main():
    out, images = sys.argv[1], sys.argv[2:]
    mv = os.path.join(out, "mvtec")
    # MVTec: two classes; train/good 000..005 (references of round 0 and 1), test good + one defect with masks.
    for c, cls in enumerate(["bottle", "grid"]):
        for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
            os.makedirs(os.path.join(mv, cls, sub), exist_ok=True)
        for i in range(6):
            shutil.copy(images[(i + c) % len(images)], os.path.join(mv, cls, "train/good/%03d.png" % i))
        for i in range(2):
            shutil.copy(images[(i + 1) % len(images)], os.path.join(mv, cls, "test/good/%03d.png" % i))
            shutil.copy(images[(i + 2) % len(images)], os.path.join(mv, cls, "test/crack/%03d.png" % i))
            write_gray_png(os.path.join(mv, cls, "ground_truth/crack/%03d_mask.png" % i), 224, 224,
                           box(20 + 60 * i, 30, 90 + 60 * i, 100))
    # VisA: one class, 1cls.csv; 6 train rows (normal), 2 normal and 2 anomalous test rows with masks (.JPG names
    # for images would need JPEG files: PNG images named .png here, masks .png as the reference derives them).
    vi = os.path.join(out, "visa")
    for sub in ("candle/Data/Images/Normal", "candle/Data/Images/Anomaly", "candle/Data/Masks/Anomaly", "split_csv"):
        os.makedirs(os.path.join(vi, sub), exist_ok=True)
    rows = ["object,split,label,image,mask"]
    for i in range(8):
        rel = "candle/Data/Images/Normal/%04d.png" % i
        shutil.copy(images[i % len(images)], os.path.join(vi, rel))
        rows.append("candle,%s,normal,%s," % ("train" if i < 6 else "test", rel))
    for i in range(2):
        rel = "candle/Data/Images/Anomaly/%03d.png" % i
        mrel = "candle/Data/Masks/Anomaly/%03d.png" % i
        shutil.copy(images[(i + 1) % len(images)], os.path.join(vi, rel))
        write_gray_png(os.path.join(vi, mrel), 224, 224, box(100, 100 + 20 * i, 140, 160))
        rows.append("candle,test,anomaly,%s,%s" % (rel, mrel))
    with open(os.path.join(vi, "split_csv/1cls.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
