"""Golden for train/synth.c's synth_perlin_noise (tests/test_synth.c): DRAEM's rand_perlin_2d_np (its
perlin.py, as augment_image in data_loader.py calls it for the anomaly masks), re-expressed here in numpy, on the
lattice angles numpy's generator draws (2 pi rand, as DRAEM), for the cell counts DRAEM draws (2^0 .. 2^5 per
axis), on small images (the algorithm does not depend on the size). The angles are stored in f32 and the noise is computed from those f32 values in f64, so the
C side starts from the same numbers. Needs numpy alone (the rest of tests/reference needs the full venv).
Usage: python3 tests/reference/make_perlin.py   (writes tests/data/perlin.safetensors)
"""
import json
import math
import os
import struct

import numpy as np

OUT = "tests/data/perlin.safetensors"


def lerp(x, y, w):
    return (y - x) * w + x


def rand_perlin_2d(shape, res, angles):
    # DRAEM's algorithm: a grid of positions inside the cells, the four corners' gradients tiled over the cells,
    # their dot products with the offsets to each corner, blended by the quintic fade.
    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3  # noqa: E731
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0:res[0]:delta[0], 0:res[1]:delta[1]].transpose(1, 2, 0) % 1
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tiled(rows, cols):
        g = gradients[rows[0]:rows[1], cols[0]:cols[1]]
        return np.repeat(np.repeat(g, d[0], axis=0), d[1], axis=1)

    def dot(grad, shift):
        offset = np.stack((grid[:shape[0], :shape[1], 0] + shift[0], grid[:shape[0], :shape[1], 1] + shift[1]), axis=-1)
        return (offset * grad[:shape[0], :shape[1]]).sum(axis=-1)

    n00 = dot(tiled([0, -1], [0, -1]), [0, 0])
    n10 = dot(tiled([1, None], [0, -1]), [-1, 0])
    n01 = dot(tiled([0, -1], [1, None]), [0, -1])
    n11 = dot(tiled([1, None], [1, None]), [-1, -1])
    t = fade(grid[:shape[0], :shape[1]])
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


def write(path, tensors):
    header, blobs, offset = {"__metadata__": {"source": "tests/reference/make_perlin.py"}}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype=np.float32)
        raw = a.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    os.replace(path + ".tmp", path)


def main():
    rng = np.random.default_rng(5)
    tensors = {}
    # (rows, cols, cells per row axis, cells per column axis): square and not, every DRAEM scale, kept small.
    cases = [(64, 64, 1, 1), (64, 64, 2, 4), (64, 64, 32, 8), (96, 128, 32, 8), (64, 64, 16, 32)]
    for i, (h, w, ry, rx) in enumerate(cases):
        res = (ry, rx)
        angles = (2 * math.pi * rng.random((res[0] + 1, res[1] + 1))).astype(np.float32)
        noise = rand_perlin_2d((h, w), res, angles.astype(np.float64))
        tensors[f"case{i}.res"] = np.array(res, dtype=np.float32)
        tensors[f"case{i}.angles"] = angles
        tensors[f"case{i}.noise"] = noise
    write(OUT, tensors)
    print(f"{OUT}: {len(cases)} cases, noise range [{min(t.min() for k, t in tensors.items() if 'noise' in k):.3f}, "
          f"{max(t.max() for k, t in tensors.items() if 'noise' in k):.3f}]")


if __name__ == "__main__":
    main()
