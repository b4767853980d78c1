#!/usr/bin/env bash
# The photos of the default model (tools/train-default.sh), from Debian packages: downloaded with
# `apt-get download` (no installation, no dependencies) and unpacked into a cache folder. Nothing of them is
# committed. Prints the two folders it fills:
#   DIR/train     free photos to train on: CC0 or public domain (README.md "The default model" lists each one)
#   DIR/heldout   the photos the issue keeps for an independent check, never trained on: scikit-image's coins and
#                 coffee, OpenCV's board.jpg and pca_test1.jpg
# Usage: tools/fetch-photos.sh DIR      (exit 1 when a package cannot be downloaded: no mirror reachable)
set -euo pipefail
dir=${1:?usage: tools/fetch-photos.sh DIR}
mkdir -p "$dir/debs" "$dir/unpacked" "$dir/train" "$dir/heldout"
dir=$(cd "$dir" && pwd)
skimage=usr/lib/python3/dist-packages/skimage/data
opencv=usr/share/doc/opencv-doc/examples/data
train=("$skimage/camera.png" "$skimage/astronaut.png" "$skimage/chelsea.png" "$skimage/rocket.jpg"
       "$skimage/clock_motion.png" "$skimage/cell.png" "$skimage/hubble_deep_field.jpg" "$skimage/text.png")
heldout=("$skimage/coins.png" "$skimage/coffee.png" "$opencv/board.jpg" "$opencv/pca_test1.jpg")
have_all() {
    local f
    for f in "${train[@]}" "${heldout[@]}"; do [ -s "$dir/unpacked/$f" ] || return 1; done
}
if ! have_all; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    (cd "$dir/debs" && { apt-get download python3-skimage opencv-doc >/dev/null 2>&1 ||
        { $sudo apt-get update -qq >/dev/null && apt-get download python3-skimage opencv-doc >/dev/null; }; }) || {
        echo "fetch-photos: cannot download python3-skimage and opencv-doc (no Debian mirror reachable?)" >&2
        exit 1
    }
    for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/unpacked"; done
    have_all || { echo "fetch-photos: the packages lack some photos (another Debian release?)" >&2; exit 1; }
fi
for f in "${train[@]}"; do cp "$dir/unpacked/$f" "$dir/train/"; done
for f in "${heldout[@]}"; do cp "$dir/unpacked/$f" "$dir/heldout/"; done
echo "$dir/train"
echo "$dir/heldout"
