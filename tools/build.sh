#!/usr/bin/env bash
# Configures and builds agpt. Usage: tools/build.sh [BUILD_DIR] [extra cmake options...]
# CUDA is used where nvcc exists (AGPT_CUDA=AUTO); pass -DAGPT_CUDA=OFF to skip it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
shift || true
cmake -S "$root" -B "$build" --log-level=NOTICE -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build" -j "$(nproc)"
