#!/usr/bin/env bash
# The main job, as far as it exists today: install dependencies, build, show what this machine can run
# (`agpt info`), and measure every op against this machine's copy bandwidth and matmul rate (`agpt bench ops`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/install-deps.sh"
"$root/tools/build.sh" "$root/build"
"$root/build/agpt" info
if "$root/build/agpt" info | grep -q "^cuda:0"; then
    "$root/build/agpt" bench ops --device cuda --dtype bf16
else
    "$root/build/agpt" bench ops --device cpu
fi
