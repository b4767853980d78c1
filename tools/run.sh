#!/usr/bin/env bash
# The main job: install dependencies, build, show what this machine can run (`agpt info`), convert a small
# AnomalyGPT from checkpoints in the four official layouts (tests/data/e2e/official: an ImageBind .pth, a
# sharded Vicuna HF directory, a PandaGPT delta and an AnomalyGPT checkpoint, written by torch.save), inspect
# the bundled sample images with `agpt detect` (zero-shot for the class 'bottle', then few-shot against two
# normal references), and measure every op against this machine's limits.
#
# The small model's weights are random (the tests check it against PyTorch, number for number): its maps and
# answers show the pipeline working, not a trained detector. For the real model, see README.md "Official
# weights". The answers need LLaMA's tokenizer.model from ../shared/data; without it detect gives maps only.
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

if "$agpt" info | grep -q "^cuda:0"; then
    "$agpt" bench ops --device cuda --dtype bf16
else
    "$agpt" bench ops --device cpu
fi
