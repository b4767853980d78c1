#!/usr/bin/env bash
# agpt train --device cuda against --device cpu on the small model tests/make_test_model.c assembles: the same
# 4 updates (the step on the GPU in f32 without TF32, AdamW on the host) give the CPU's losses and delta within
# f32 noise; killed and resumed on the GPU it ends with the bytes of its uninterrupted run; --gpus 1 (the launcher,
# NCCL with one rank) gives the plain CUDA run's bytes, and --gpus 2 where two GPUs exist the 1-GPU result.
# Skipped without a GPU.
# Without a GPU, --device cuda must fail with a clear message (checked here too, then skipped).
# Usage: tests/test_train_cuda.sh path/to/agpt tests/data shared/data path/to/make_test_model
set -u
agpt=$1
data=$2
shared=$3
make_test_model=$4
tok=$shared/llama-tokenizer.model
for f in "$tok" "$shared/images/brick.png" "$shared/images/grass.png"; do [ -f "$f" ] || { echo "SKIP: needs $f"; exit 77; }; done
passed=0
failed=0
tmp=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
ok() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $*"; fi; }
mkdir -p "$tmp/model" "$tmp/mvtec/bottle/train/good"
"$make_test_model" "$tmp/model" "$data" >/dev/null || { echo "FAIL make_test_model"; exit 1; }
cp "$shared/images/brick.png" "$tmp/mvtec/bottle/train/good/000.png"
cp "$shared/images/grass.png" "$tmp/mvtec/bottle/train/good/001.png"
common=(--model "$tmp/model/model.safetensors" --tokenizer "$tok" --data "$tmp/mvtec" --steps 4 --accum 2 --warmup 2
        --seed 5 --val-images 0)

if ! "$agpt" info | grep -q "^cuda:0 "; then
    # No GPU: a clear error (exit 1 naming CUDA or the GPU), never a crash; then skipped.
    "$agpt" train "${common[@]}" --device cuda --out "$tmp/nogpu" >"$tmp/nogpu.log" 2>&1
    rc=$?
    if [ $rc -ne 1 ] || ! grep -qi "cuda\|gpu" "$tmp/nogpu.log"; then
        echo "FAIL: --device cuda without a GPU exited $rc:"; cat "$tmp/nogpu.log"; exit 1
    fi
    echo "SKIP: no GPU (--device cuda refused with: $(grep -i 'cuda\|gpu' "$tmp/nogpu.log" | head -1))"
    exit 77
fi

"$agpt" train "${common[@]}" --device cpu --out "$tmp/cpu" >"$tmp/cpu.log" 2>&1 || { echo "FAIL cpu run"; cat "$tmp/cpu.log"; }
"$agpt" train "${common[@]}" --device cuda --out "$tmp/gpu" >"$tmp/gpu.log" 2>&1 || { echo "FAIL cuda run"; cat "$tmp/gpu.log"; }
ok grep -q "CUDA, AdamW on the host" "$tmp/gpu.log"
ok python3 "$(dirname "$0")/compare_safetensors.py" "$tmp/cpu/delta.safetensors" "$tmp/gpu/delta.safetensors" 1e-3
# Every update's losses within 1e-4 (relative) of the CPU's.
ok python3 - "$tmp/cpu/log.jsonl" "$tmp/gpu/log.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
worst = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-6) for x, y in zip(a, b) for k in ("ce", "focal", "dice"))
print(f"cuda vs cpu: {len(b)} updates, worst relative loss difference {worst:.3g}")
sys.exit(0 if len(a) == len(b) == 4 and worst < 1e-4 else 1)
PY
# Killed after update 2 (checkpoint every update), resumed: the uninterrupted GPU run's bytes.
"$agpt" train "${common[@]}" --device cuda --ckpt-every 1 --out "$tmp/killed" >"$tmp/killed.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
    [ -f "$tmp/killed/log.jsonl" ] && [ "$(wc -l <"$tmp/killed/log.jsonl")" -ge 2 ] && break
    sleep 0.1
done
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
"$agpt" train "${common[@]}" --device cuda --resume "$tmp/killed" >"$tmp/resume.log" 2>&1 || { echo "FAIL resume"; cat "$tmp/resume.log"; }
ok cmp -s "$tmp/gpu/delta.safetensors" "$tmp/killed/delta.safetensors"
# agpt train --gpus 1: the launcher, one rank, NCCL's all-reduce over one GPU: the plain CUDA run's bytes.
"$agpt" train "${common[@]}" --gpus 1 --out "$tmp/gpus1" >"$tmp/gpus1.log" 2>&1 || { echo "FAIL --gpus 1"; cat "$tmp/gpus1.log"; }
ok grep -q "x 1 rank (NCCL)" "$tmp/gpus1.log"
ok cmp -s "$tmp/gpu/delta.safetensors" "$tmp/gpus1/delta.safetensors"
# Two ranks on one GPU where only one exists is refused; where two exist they run (and equal accum 4 on one).
if "$agpt" info | grep -q "^cuda:1 "; then
    "$agpt" train "${common[@]}" --gpus 2 --accum 1 --out "$tmp/gpus2" >"$tmp/gpus2.log" 2>&1 || { echo "FAIL --gpus 2"; cat "$tmp/gpus2.log"; }
    ok python3 "$(dirname "$0")/compare_safetensors.py" "$tmp/gpu/delta.safetensors" "$tmp/gpus2/delta.safetensors" 1e-5
fi
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
