#!/usr/bin/env bash
# Installs the Debian packages agpt builds against, skipping those already present. Idempotent.
# The CUDA toolkit (nvcc, cuBLAS, cuDNN, NCCL) is not installed here: where /usr/local/cuda exists the build
# uses it, elsewhere agpt builds its CPU engine only.
set -euo pipefail
packages=(cmake make gcc libpng-dev libjpeg62-turbo-dev zlib1g-dev libopenblas-dev libopenblas-openmp-dev
          libopenmpi-dev openmpi-bin
          libmicrohttpd-dev libcjson-dev
          chromium chromium-driver curl  # tests/test_serve.sh (curl; the page in headless Chromium)
          python3)  # the CLI tests' JSON and file checks (standard library only)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#packages[@]} packages present"
    exit 0
fi
echo "install-deps: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
