#!/usr/bin/env bash
# The main job, as far as it exists today: install dependencies, build, show what this machine can run
# (`agpt info`), make anomaly maps of the bundled sample images with the small test model (zero-shot for the
# class 'bottle', then few-shot against two normal references; its weights are random, so the maps show the
# pipeline working, not a trained detector), and measure every op against this machine's limits.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/install-deps.sh"
"$root/tools/build.sh" "$root/build"
agpt="$root/build/agpt"
"$agpt" info
samples="$root/tests/data/imagebind"
out="$root/build/maps"
"$agpt" map --model "$samples/model.safetensors" --class bottle -o "$out" "$samples/query.png" "$samples/ref0.png"
"$agpt" map --model "$samples/model.safetensors" --reference "$samples/ref0.png" --reference "$samples/ref1.png" \
    -o "$out/few-shot" "$samples/query.png"
echo "heatmaps and raw maps are in $out"
if "$agpt" info | grep -q "^cuda:0"; then
    "$agpt" bench ops --device cuda --dtype bf16
else
    "$agpt" bench ops --device cpu
fi
