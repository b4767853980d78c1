#!/usr/bin/env bash
# The default model from nothing: the recipe that made models/default/delta.safetensors. On 2 CPU cores it takes
# about STEPS x 0.65 s (16 minutes for the committed 1500 updates) plus a minute of data and evaluation.
#
#   tools/train-default.sh [OUT]          (default OUT: build/default-model; needs a built build/)
#   STEPS=4 CROPS=8 TRAIN_PHOTOS=D HELDOUT_PHOTOS=D tools/train-default.sh OUT
#                                         (a short run of the same recipe on given photos, no download: the test's)
#   PARTS=decoder,...,vision VISION_LR_SCALE=0.1 tools/train-default.sh OUT
#                                         (other trained parts, for experiments; BUILD=DIR another build folder)
#   REFERENCE_VIEWS="--reference-shifts 2" tools/train-default.sh OUT
#                                         (other views of the reference in training's few-shot maps)
#
# 1. the base: the small seeded model of tests/data (make_test_model) with a DCT patch embedding, the ViT's
#    residual branches scaled down and the prompt learner's convs re-drawn (tools/default_model/default_base.py
#    says why); no pretrained weights anywhere
# 2. the photos: ../shared/data/images (CC0) and free photos from Debian packages (tools/fetch-photos.sh); each
#    cut into 4 windows of 10 jittered 224 x 224 crops, a class per window (make_default_data train)
# 3. agpt train of the decoder, the prompt learner, llama_proj, the LoRA deltas and lm_head (a random LLaMA needs
#    its read-out trained too) with NSA synthetic anomalies pasted rather than Poisson-blended (params.json: the
#    untrained ViT's features mostly see colour, and a Poisson blend takes the destination's colours, so blended
#    anomalies are invisible to its maps and the answer could not learn from them), the few-shot map (against
#    the window's first crop in 7 x 7 views shifted by 2 pixels, not turned: --reference-shifts 7
#    --no-reference-rotations, the views the model is used with) in 80 % of the micro-steps
# 4. agpt eval on the held-out set (make_default_data heldout: photos and defect kinds training never sees),
#    zero-shot and 1-shot (the reference in 7 x 7 shifted views, as the model is used), into OUT/heldout/report.md; the check set's answers into OUT/expected.jsonl
# The same seed gives the same delta bit for bit on the same machine and --threads (2).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/build/default-model}
build=${BUILD:-$root/build}
steps=${STEPS:-1500}
shared=$root/../shared/data
tok=$shared/llama-tokenizer.model
for f in "$build/agpt" "$build/make_test_model" "$build/make_default_data" "$tok" "$shared/images/brick.png"; do
    [ -e "$f" ] || { echo "train-default: needs $f (build first: tools/build.sh $build)" >&2; exit 1; }
done
mkdir -p "$out"
start=$(date +%s)

echo "== the base model (untrained)"
mkdir -p "$out/seeded"
"$build/make_test_model" "$out/seeded" "$root/tests/data" >/dev/null
python3 "$root/tools/default_model/default_base.py" "$out/seeded/model.safetensors" "$out/base.safetensors"

echo "== the photos and the crops"
if [ -n "${TRAIN_PHOTOS:-}" ]; then
    train_photos=$TRAIN_PHOTOS heldout_photos=${HELDOUT_PHOTOS:?HELDOUT_PHOTOS goes with TRAIN_PHOTOS}
    set --
else
    photos=$("$root/tools/fetch-photos.sh" "$out/photos")
    train_photos=$(echo "$photos" | sed -n 1p) heldout_photos=$(echo "$photos" | sed -n 2p)
    set -- "$shared"/images/{brick,grass,gravel}.png
fi
rm -rf "$out/data" "$out/heldout-data"
"$build/make_default_data" train "$out/data" 1 "${CROPS:-40}" "$@" "$train_photos"/*
"$build/make_default_data" heldout "$out/heldout-data" 2 24 "$heldout_photos"/*

echo "== agpt train ($steps updates)"
rm -rf "$out/run"
echo '{"blend": "paste"}' >"$out/params.json"
"$build/agpt" train --model "$out/base.safetensors" --tokenizer "$tok" --data "$out/data" --params "$out/params.json" \
    --train "${PARTS:-decoder,prompt_learner,llama_proj,lora,lm_head}" --vision-lr-scale "${VISION_LR_SCALE:-1}" --steps "$steps" --accum 4 --lr 2e-3 --warmup 50 \
    --fewshot-p 0.8 ${REFERENCE_VIEWS:---reference-shifts 7 --no-reference-rotations} --seed 1 --threads 2 --val-every 500 --out "$out/run" 2>&1 | grep -v "^update \|agpt warn" || true
[ -s "$out/run/delta.safetensors" ] || { echo "train-default: training failed" >&2; exit 1; }
cp "$out/run/delta.safetensors" "$out/delta.safetensors"

echo "== agpt eval on the held-out set (zero-shot and 1-shot)"
"$build/agpt" eval --model "$out/base.safetensors" --weights "$out/delta.safetensors" --tokenizer "$tok" \
    --data "$out/heldout-data" --format mvtec --k-shot 0,1 --round 0 --reference-shifts 7 --max-new 24 --threads 2 --out "$out/heldout"
"$root/tools/default_model/check.sh" "$build/agpt" "$build/make_default_data" "$out/base.safetensors" \
    "$out/delta.safetensors" "$tok" "$shared/images" "$out" >"$out/expected.jsonl"
echo "train-default: $out/delta.safetensors in $(($(date +%s) - start)) s"
