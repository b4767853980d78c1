#!/usr/bin/env bash
# The main job: install dependencies, build, show what this machine can run (`agpt info`), convert a small
# AnomalyGPT from checkpoints in the four official layouts (tests/data/e2e/official: an ImageBind .pth, a
# sharded Vicuna HF directory, a PandaGPT delta and an AnomalyGPT checkpoint, written by torch.save), inspect
# the bundled sample images with `agpt detect` (zero-shot for the class 'bottle', then few-shot against two
# normal references), and measure every op against this machine's limits.
#
# The small model's weights are random (the tests check it against PyTorch, number for number): its maps and
# answers show the pipeline working, not a trained detector. Then the default model, trained by agpt itself
# (models/default), inspects drawn defects 1-shot and zero-shot and is evaluated on held-out photos. For the
# real model, see README.md "Official weights". The answers need LLaMA's tokenizer.model from ../shared/data; without it detect gives maps only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/install-deps.sh"
"$root/tools/build.sh" "$root/build"
agpt="$root/build/agpt"
"$agpt" info

demo="$root/build/demo"
official="$root/tests/data/e2e/official"
golden="$root/tests/data/e2e/expected.safetensors"
shared="$root/../shared/data"
mkdir -p "$demo"
# Attention heads are not in the checkpoints' shapes; the small model's are recorded beside it.
heads=(--vision-heads "$("$root/build/e2e_check" meta "$golden" imagebind.vision_heads)"
       --text-heads "$("$root/build/e2e_check" meta "$golden" imagebind.text_heads)")
language=(--vicuna "$official/vicuna" --pandagpt "$official/pandagpt/pytorch_model.pt")
extras=()
if [ -f "$shared/llama-tokenizer.model" ] && [ -f "$shared/clip-bpe-simple-vocab-16e6.txt.gz" ]; then
    extras=(--tokenizer "$shared/llama-tokenizer.model" --clip-vocab "$shared/clip-bpe-simple-vocab-16e6.txt.gz")
else
    echo "no tokenizers in $shared: converting the vision part only (maps and scores, no answers)"
    language=()
fi
"$agpt" convert --imagebind "$official/imagebind_huge.pth" "${language[@]}" \
    --anomalygpt "$official/anomalygpt/pytorch_model.pt" "${extras[@]}" "${heads[@]}" -o "$demo/model.safetensors"
"$agpt" info "$demo/model.safetensors" | sed -n "1,30p"  # sed reads it all: no SIGPIPE under pipefail

samples="$root/tests/data/imagebind"
images=("$samples/query.png")
[ -d "$shared/images" ] && images+=("$shared/images")
if [ ${#extras[@]} -gt 0 ]; then  # the zero-shot map needs the class text features (CLIP's merges)
    echo "== zero-shot: agpt detect --class bottle"
    "$agpt" detect --model "$demo/model.safetensors" --class bottle --max-new 32 --out "$demo/zero-shot" "${images[@]}"
fi
echo "== few-shot: agpt detect --reference (two normal images)"
"$agpt" detect --model "$demo/model.safetensors" --reference "$samples/ref0.png" --reference "$samples/ref1.png" \
    --max-new 32 --out "$demo/few-shot" "${images[@]}"
echo "heatmaps and raw maps are in $demo/zero-shot and $demo/few-shot"

echo "(the model above has random weights: it shows the pipeline matching PyTorch, not a detector)"

# The default model: a small AnomalyGPT trained by agpt itself (tools/train-default.sh, models/default).
if [ ${#extras[@]} -gt 0 ]; then
    echo "== the default model (trained by agpt: models/default/delta.safetensors over its seeded base)"
    mkdir -p "$demo/default/seeded"
    "$root/build/make_test_model" "$demo/default/seeded" "$root/tests/data" >/dev/null
    python3 "$root/tools/default_model/default_base.py" "$demo/default/seeded/model.safetensors" "$demo/default/base.safetensors"
    default=(--model "$demo/default/base.safetensors" --weights "$root/models/default/delta.safetensors"
             --tokenizer "$shared/llama-tokenizer.model" --threads 2)
    # Defects drawn on crops of the CC0 photos (make_default_data heldout); a normal crop of each is the reference.
    rm -rf "$demo/default/check"
    "$root/build/make_default_data" heldout "$demo/default/check" 3 8 "$shared"/images/{brick,grass,gravel}.png
    mkdir -p "$demo/default/heatmaps"
    for cls in brick gravel; do
        echo "-- 1-shot, $cls: the reference is $cls/train/good/000.png"
        "$agpt" detect "${default[@]}" --class "$cls" --reference-shifts 7 \
            --reference "$demo/default/check/$cls/train/good/000.png" \
            --max-new 24 --out "$demo/default/heatmaps/$cls" "$demo/default/check/$cls"/test/*/000.png
    done
    echo "-- zero-shot, brick"
    "$agpt" detect "${default[@]}" --class brick --max-new 24 --out "$demo/default/heatmaps-zero-shot" \
        "$demo/default/check/brick"/test/*/000.png
    echo "heatmaps in $demo/default/heatmaps/{brick,gravel} and $demo/default/heatmaps-zero-shot"
    # The held-out evaluation: photos and defect kinds the model never saw, from Debian packages.
    if photos=$("$root/tools/fetch-photos.sh" "$demo/default/photos"); then
        rm -rf "$demo/default/heldout-data"
        "$root/build/make_default_data" heldout "$demo/default/heldout-data" 2 24 "$(echo "$photos" | sed -n 2p)"/*
        "$agpt" eval "${default[@]}" --data "$demo/default/heldout-data" --format mvtec --k-shot 0,1 --round 0 \
            --reference-shifts 7 --max-new 24 --out "$demo/default/heldout" 2>/dev/null
    else
        echo "no held-out photos (tools/fetch-photos.sh could not download them): held-out evaluation skipped"
    fi
fi

if "$agpt" info | grep -q "^cuda:0"; then
    "$agpt" bench ops --device cuda --dtype bf16
else
    "$agpt" bench ops --device cpu
fi
