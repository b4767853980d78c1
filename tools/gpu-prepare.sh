#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device session: the lent GPU machine has CUDA, PyTorch and CMake
# but no network and none of our Debian libraries, so this downloads their .deb files into .gpu-deps/ (git
# ignored) for the device call to carry. tools/gpu-check.sh unpacks them into a private prefix.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/.gpu-deps"
cd "$root/.gpu-deps"
apt-get update -qq
apt-get download -qq libopenblas0-openmp libopenblas-openmp-dev libopenblas-dev libcjson1 libcjson-dev \
    libpng16-16 libpng-dev libjpeg62-turbo libjpeg62-turbo-dev zlib1g-dev libgfortran5
# The GPU machine gets the working tree, not ../shared: the two tokenizer files the end-to-end step and
# `agpt bench detect` need go beside the packages (ignored by git, never committed).
shared="$root/../shared/data"
if [ -f "$shared/llama-tokenizer.model" ]; then
    mkdir -p "$root/.gpu-deps/shared-data"
    cp "$shared/llama-tokenizer.model" "$shared/clip-bpe-simple-vocab-16e6.txt.gz" "$root/.gpu-deps/shared-data/"
fi
ls -la "$root/.gpu-deps"
du -sh "$root/.gpu-deps"
