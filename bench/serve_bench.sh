#!/usr/bin/env bash
# agpt serve throughput and latency: concurrency 1, 8 and 64 against --max-batch 1, 8 and 64, on the small
# complete test model (tests/make_test_model.c) on the CPU, or on a model given. One JSON line per run.
# Usage: bench/serve_bench.sh BUILD_DIR [SECONDS] [MODEL TOKENIZER]
set -euo pipefail
# OpenMP threads that spin while they wait starve the HTTP threads and clients on a small CPU (stalls of seconds
# at concurrency 64 on 2 cores); agpt serve warns when this is not set.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
build=$1
seconds=${2:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
py=$root/tests/reference/.venv/bin/python
[ -x "$py" ] || py=python3
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
if [ $# -ge 4 ]; then
    model=$3 tok=$4
else
    mkdir -p "$tmp/model"
    "$build/make_test_model" "$tmp/model" "$root/tests/data" >/dev/null
    model=$tmp/model/model.safetensors tok=$root/../shared/data/llama-tokenizer.model
fi
image=$root/tests/data/imagebind/query.png
for batch in 1 8 64; do
    rm -f "$tmp/port"
    "$build/agpt" serve --device cpu --model "$model" --tokenizer "$tok" --max-new 24 --port 0 --port-file "$tmp/port" \
        --max-batch "$batch" --batch-wait-ms 5 --queue 256 --bank-dir "$tmp/banks" 2>"$tmp/log" &
    pid=$!
    for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.1; done
    for conc in 1 8 64; do
        printf '{"max_batch": %d, ' "$batch"
        "$py" "$root/bench/serve_load.py" "http://127.0.0.1:$(cat "$tmp/port")" "$image" "$conc" "$seconds" | cut -c2-
    done
    kill -TERM "$pid"
    wait "$pid"
done
