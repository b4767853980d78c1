#!/usr/bin/env bash
# agpt convert's peak memory and speed at real tensor sizes: a Vicuna-7B-shaped directory with random weights
# and fewer layers (bench/make_synthetic_vicuna.py, needs the tests/reference venv for torch) converted to f16
# and to bf16. Prints agpt's own report (peak resident memory against the largest tensor) and /usr/bin/time's.
# Usage: bench/convert_memory.sh [BUILD_DIR] [LAYERS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
layers=${2:-4}
py=$root/tests/reference/.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" "$root/bench/make_synthetic_vicuna.py" "$work/vicuna" --layers "$layers"
du -sh "$work/vicuna"
for dt in f16 bf16; do
    echo "== agpt convert --vicuna ($layers layers) --dtype $dt"
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true  # cold cache where allowed
    /usr/bin/time -f "time: %e s wall, max resident %M KB" "$build/agpt" convert --vicuna "$work/vicuna" --dtype $dt \
        -o "$work/out.safetensors" 2>&1 | grep -v "^convert "
    ls -l "$work/out.safetensors"
done
