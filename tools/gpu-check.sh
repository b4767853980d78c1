#!/usr/bin/env bash
# The one script for a lent GPU machine (CUDA 13, PyTorch, CMake, 16 cores, no network). Prepare first with
# tools/gpu-prepare.sh here, then run on the device, carrying .gpu-deps:
#     bash tools/gpu-check.sh            (results under $OUT, or bench/results/local without it)
# Builds for sm_86 and sm_90, runs the gpu-labelled tests and the golden tests (which rerun on CUDA when a
# device exists), runs `agpt bench ops` and the PyTorch peer on the same GPU, and prints the ratio table last.
# The whole run may pass one 10-minute device call: then run GPU_CHECK_PART=tests, then GPU_CHECK_PART=bench.
set -uo pipefail
# GPU_CHECK_PART=tests or bench runs one half (each fits one 10-minute device call; the build is kept between
# calls on the device machine); the default runs everything.
part=${GPU_CHECK_PART:-all}
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/bench/results/local}
mkdir -p "$out"
cd "$root"
status=0
step() { echo; echo "== $* =="; }

step "dependencies"
if [ -d .gpu-deps ] && ls .gpu-deps/*.deb >/dev/null 2>&1; then
    prefix=/tmp/agpt-deps
    for f in .gpu-deps/*.deb; do dpkg -x "$f" "$prefix"; done
    lib="$prefix/usr/lib/x86_64-linux-gnu"
    # dpkg -x does not run update-alternatives: link OpenBLAS where the linker looks.
    ln -sf "$lib/openblas-openmp/libopenblas.so.0" "$lib/libopenblas.so"
    ln -sf "$lib/openblas-openmp/libopenblas.so.0" "$lib/libopenblas.so.0"
    export CMAKE_PREFIX_PATH="$prefix/usr"
    export LD_LIBRARY_PATH="$lib:$lib/openblas-openmp:${LD_LIBRARY_PATH:-}"
    echo "unpacked $(ls .gpu-deps/*.deb | wc -l) packages into $prefix"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee "$out/commit.txt" || echo "unknown" >"$out/commit.txt"
date -u +%Y-%m-%dT%H:%M:%SZ | tee "$out/date.txt"

# The shared data (LLaMA's tokenizer, CLIP's merges): beside the checkout, inside it, or carried in .gpu-deps.
shared_data=""
for d in ../shared/data shared/data .gpu-deps/shared-data; do
    [ -z "$shared_data" ] && [ -f "$d/llama-tokenizer.model" ] && shared_data=$(cd "$d" && pwd)
done
echo "shared data: ${shared_data:-none (tests that need it skip)}"

step "build (sm_86, sm_90)"
gen=""
command -v ninja >/dev/null && gen="-G Ninja"
cmake -S . -B build-gpu $gen -DCMAKE_BUILD_TYPE=Release -DAGPT_CUDA=ON -DAGPT_CUDA_ARCHS="86;90" \
    ${shared_data:+-DAGPT_SHARED_DATA="$shared_data"} \
    >"$out/cmake.log" 2>&1 || { cat "$out/cmake.log"; exit 1; }
cmake --build build-gpu -j 16 2>&1 | tee "$out/build.log" | grep -E "error|warning" | head -40
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "build failed"; tail -40 "$out/build.log"; exit 1; }

if [ "$part" != bench ]; then  # tests
step "tests: gpu and golden"
(cd build-gpu && timeout 240 ctest -L "gpu|golden" --output-on-failure 2>&1) | tee "$out/ctest-gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "kernel variants: the plain attention and our own convolution (the defaults are flash and cuDNN)"
(AGPT_ATTENTION=simple AGPT_CONV=implicit timeout 120 build-gpu/test_ops_cuda 2>&1) | tail -n 30 | tee "$out/ops-cuda-simple.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "end to end on CUDA: convert the official-layout checkpoints, detect, compare with PyTorch's maps and answers"
e2e=tests/data/e2e
golden=$e2e/expected.safetensors
meta() { build-gpu/e2e_check meta "$golden" "$1"; }
if [ -n "$shared_data" ]; then
    sd=$shared_data
    build-gpu/agpt convert --imagebind $e2e/official/imagebind_huge.pth --vicuna $e2e/official/vicuna \
        --pandagpt $e2e/official/pandagpt/pytorch_model.pt --anomalygpt $e2e/official/anomalygpt/pytorch_model.pt \
        --tokenizer $sd/llama-tokenizer.model --clip-vocab $sd/clip-bpe-simple-vocab-16e6.txt.gz --dtype f32 \
        --vision-heads "$(meta imagebind.vision_heads)" --text-heads "$(meta imagebind.text_heads)" \
        -o "$out/e2e.safetensors" >"$out/e2e-convert.log" 2>&1 || status=1
    for dt in f32 f16; do
        timeout 60 build-gpu/agpt detect --device cuda --dtype $dt --model "$out/e2e.safetensors" --prompt "$(meta case0.prompt)" \
            --max-new "$(meta case0.max_new)" --out "$out/e2e-$dt" "$(meta case0.image)" >"$out/e2e-$dt.jsonl" 2>&1 || status=1
        tol=$([ $dt = f32 ] && echo 1e-4 || echo 1e-2)  # DESIGN.md: 1e-2 for f16/bf16
        build-gpu/e2e_check map "$golden" case0.map "$out/e2e-$dt/query.map.safetensors" $tol || status=1
        build-gpu/e2e_check json "$golden" case0.answer "$out/e2e-$dt.jsonl" answer || echo "answer differs in $dt (exact only expected in f32)"
    done
else
    echo "skipped: no tokenizer on this machine (tools/gpu-prepare.sh copies it into .gpu-deps)"
fi

fi  # tests
if [ "$part" != tests ]; then  # benches
step "agpt bench ops (cuda, bf16)"
timeout 120 build-gpu/agpt bench ops --device cuda --dtype bf16 --json "$out/agpt-ops.json" 2>&1 | tee "$out/agpt-ops.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "PyTorch peer (cuda, bf16)"
PYTHONUNBUFFERED=1 timeout 120 python3 bench/peers/torch_ops.py --device cuda --dtype bf16 \
    --json "$out/torch-ops.json" 2>&1 | tee "$out/torch-ops.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "agpt bench vit (ImageBind-H, bf16, batch 1, 8, 64)"
timeout 150 build-gpu/agpt bench vit --device cuda --dtype bf16 --json "$out/agpt-vit.json" 2>&1 | tee "$out/agpt-vit.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "PyTorch peer: ImageBind-H vision (bf16)"
PYTHONUNBUFFERED=1 timeout 150 python3 bench/peers/torch_vit.py --device cuda --dtype bf16 \
    --json "$out/torch-vit.json" 2>&1 | tee "$out/torch-vit.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "agpt bench llama (LLaMA-7B shapes, 32 layers, bf16, prompt 80, decode batch 1, 32)"
timeout 180 build-gpu/agpt bench llama --device cuda --dtype bf16 --batch 1 --batch 32 \
    --json "$out/agpt-llama.json" 2>&1 | tee "$out/agpt-llama.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "agpt bench llama with decode through one captured CUDA graph per batch size (--graph)"
timeout 180 build-gpu/agpt bench llama --device cuda --dtype bf16 --batch 1 --batch 32 --graph \
    --json "$out/agpt-llama-graph.json" 2>&1 | tee "$out/agpt-llama-graph.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "PyTorch peer: LLaMA-7B shapes, HF LlamaForCausalLM (bf16)"
PYTHONUNBUFFERED=1 timeout 180 python3 bench/peers/torch_llama.py --device cuda --dtype bf16 --batch 1 --batch 32 \
    --json "$out/torch-llama.json" 2>&1 | tee "$out/torch-llama.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "agpt bench detect: end-to-end inspections, full-size AnomalyGPT (random weights, f16), verdict-only and 32 tokens"
tok=${shared_data:+$shared_data/llama-tokenizer.model}
if [ -n "$tok" ]; then
    timeout 150 build-gpu/agpt bench detect --device cuda --dtype f16 --iters 10 --answer-tokens 32 --tokenizer "$tok" \
        --json "$out/agpt-detect.json" 2>&1 | tee "$out/agpt-detect.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    step "PyTorch peer: the official per-image AnomalyGPT pipeline (ImageBind-H, decoder, prompt learner, HF generate, f16)"
    PYTHONUNBUFFERED=1 timeout 150 python3 bench/peers/torch_anomalygpt.py --device cuda --dtype f16 --iters 10 \
        --answer-tokens 32 --json "$out/torch-detect.json" 2>&1 | tee "$out/torch-detect.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "skipped: no llama-tokenizer.model (tools/gpu-prepare.sh copies it into .gpu-deps; the prompt needs real ids)"
fi

step "agpt bench comm: NCCL all-reduce of device buffers (one rank: NCCL's copy rate) and bench train on CUDA"
timeout 60 build-gpu/agpt bench comm --device cuda --max-mb 256 2>&1 | tee "$out/agpt-comm-nccl.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ -f build-gpu/train-model/model.safetensors ] && [ -n "$tok" ]; then
    timeout 60 build-gpu/agpt bench train --device cuda --model build-gpu/train-model/model.safetensors \
        --tokenizer "$tok" --iters 10 --json "$out/agpt-train-cuda.json" 2>&1 | tee "$out/agpt-train-cuda.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

fi  # benches
step "ratios (speedup > 1: agpt faster)"
if [ -f "$out/agpt-ops.json" ] && [ -f "$out/torch-ops.json" ]; then
    python3 bench/compare.py "$out/agpt-ops.json" "$out/torch-ops.json" --md "$out/ops-table.md"
fi
if [ -f "$out/agpt-vit.json" ] && [ -f "$out/torch-vit.json" ]; then
    python3 bench/compare.py "$out/agpt-vit.json" "$out/torch-vit.json" --md "$out/vit-table.md"
fi
if [ -f "$out/agpt-llama.json" ] && [ -f "$out/torch-llama.json" ]; then
    python3 bench/compare.py "$out/agpt-llama.json" "$out/torch-llama.json" --md "$out/llama-table.md"
fi
if [ -f "$out/agpt-detect.json" ] && [ -f "$out/torch-detect.json" ]; then
    python3 bench/compare.py "$out/agpt-detect.json" "$out/torch-detect.json" --md "$out/detect-table.md"
fi
echo
echo "gpu-check: $([ $status -eq 0 ] && echo ok || echo FAILED); results in $out"
exit $status
