#!/usr/bin/env bash
# agpt train as a user runs it, on the small complete model tests/make_test_model.c assembles, with tiny MVTec-AD,
# VisA and plain-folder trees made from the CC0 photos in ../shared/data/images: the loss falls, the delta loads in
# agpt detect --weights and changes its maps, a run SIGKILLed mid-way and resumed ends with the same delta bytes as
# an uninterrupted one (with another loader thread count), Ctrl-C saves and a resume finishes, usage errors exit 2
# before the model loads, a resume with other options is refused, the instruction stream (--sft) runs and its
# bad files are refused.
# Usage: tests/test_train.sh path/to/agpt tests/data shared/data path/to/make_test_model
set -u
agpt=$1
data=$2
shared=$3
make_test_model=$4
tok=$shared/llama-tokenizer.model
for f in "$tok" "$shared/images/brick.png" "$shared/images/grass.png" "$shared/images/gravel.png"; do
    [ -f "$f" ] || { echo "SKIP: needs $f"; exit 77; }
done
passed=0
failed=0
tmp=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
ok() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $*"; fi; }
expect_rc() {  # expect_rc RC PATTERN COMMAND...: exits RC and says PATTERN
    local rc=$1 pattern=$2
    shift 2
    "$@" >"$tmp/log" 2>&1
    local got=$?
    if [ $got -eq "$rc" ] && grep -q -- "$pattern" "$tmp/log"; then passed=$((passed + 1)); else
        failed=$((failed + 1)); echo "FAIL (exit $got, wanted $rc, '$pattern'): $*"; tail -5 "$tmp/log"; fi
}
mkdir -p "$tmp/model"
"$make_test_model" "$tmp/model" "$data" >/dev/null || { echo "FAIL make_test_model"; exit 1; }
m=$tmp/model/model.safetensors

# A tiny MVTec-AD tree (two classes), a VisA tree and a plain folder.
for c in bottle carpet; do mkdir -p "$tmp/mvtec/$c/train/good" "$tmp/mvtec/$c/test/good"; done
cp "$shared/images/brick.png" "$tmp/mvtec/bottle/train/good/000.png"
cp "$shared/images/grass.png" "$tmp/mvtec/bottle/train/good/001.png"
cp "$shared/images/gravel.png" "$tmp/mvtec/carpet/train/good/000.png"
cp "$shared/images/gravel.png" "$tmp/mvtec/bottle/test/good/000.png"  # test split: not a training image
mkdir -p "$tmp/visa/split_csv" "$tmp/visa/pcb1/Data/Images/Normal"
cp "$shared/images/brick.png" "$tmp/visa/pcb1/Data/Images/Normal/0001.JPG"
cp "$shared/images/grass.png" "$tmp/visa/pcb1/Data/Images/Normal/0002.JPG"
printf 'object,split,label,image,mask\npcb1,train,normal,pcb1/Data/Images/Normal/0001.JPG,\npcb1,test,normal,pcb1/Data/Images/Normal/0002.JPG,\n' \
    >"$tmp/visa/split_csv/1cls.csv"
mkdir -p "$tmp/folder"
cp "$shared/images/brick.png" "$tmp/folder/a.png"
cp "$shared/images/grass.png" "$tmp/folder/b.png"

common=(--model "$m" --tokenizer "$tok" --data "$tmp/mvtec" --steps 8 --accum 2 --lr 3e-3 --warmup 2 --seed 7)

# An uninterrupted run: 8 updates, one log line each, a delta and a state; the loss falls.
expect_rc 0 "done after 8 updates" "$agpt" train "${common[@]}" --out "$tmp/run1" --loader-threads 1
ok test -s "$tmp/run1/delta.safetensors"
ok test -s "$tmp/run1/state.safetensors"
ok test "$(wc -l <"$tmp/run1/log.jsonl")" -eq 8
ok grep -q "3 images, 2 classes" "$tmp/log"
ok grep -q "memory plan" "$tmp/log"
ok test "$(grep -c pixel_auroc "$tmp/run1/val.jsonl")" -eq 2  # before training and at the end
loss_falls() {  # the mean of the last two updates' ce + focal + dice below the first two's
    python3 - "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tot = [r["ce"] + r["focal"] + r["dice"] for r in rows]
first, last = sum(tot[:2]) / 2, sum(tot[-2:]) / 2
print(f"  loss {first:.4f} -> {last:.4f}")
sys.exit(0 if last < first else 1)
EOF
}
ok loss_falls "$tmp/run1/log.jsonl"

# The delta layers over the base in agpt detect and changes the maps.
"$agpt" detect --model "$m" --tokenizer "$tok" --class bottle --max-new 4 "$shared/images/brick.png" \
    >"$tmp/base.jsonl" 2>/dev/null
expect_rc 0 "1 of 1" "$agpt" detect --model "$m" --weights "$tmp/run1/delta.safetensors" --tokenizer "$tok" \
    --class bottle --max-new 4 "$shared/images/brick.png"
grep '"ok":true' "$tmp/log" >"$tmp/tuned.jsonl"
score() { sed -n 's/.*"score":\([0-9.eE+-]*\).*/\1/p' "$1" | head -1; }
ok test -n "$(score "$tmp/tuned.jsonl")"
ok test "$(score "$tmp/base.jsonl")" != "$(score "$tmp/tuned.jsonl")"

# SIGKILL mid-run (a checkpoint every update), then --resume: the same delta bytes as run1, with 3 loader threads.
"$agpt" train "${common[@]}" --out "$tmp/run2" --ckpt-every 1 --loader-threads 3 >"$tmp/run2.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
    [ -f "$tmp/run2/log.jsonl" ] && [ "$(wc -l <"$tmp/run2/log.jsonl")" -ge 3 ] && break
    sleep 0.1
done
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
lines=$(wc -l <"$tmp/run2/log.jsonl")
ok test "$lines" -ge 3 -a "$lines" -lt 8
expect_rc 0 "done after 8 updates" "$agpt" train "${common[@]}" --resume "$tmp/run2" --loader-threads 3
ok cmp -s "$tmp/run1/delta.safetensors" "$tmp/run2/delta.safetensors"

# Ctrl-C: saves and exits 0; the resume finishes with the same bytes again.
"$agpt" train "${common[@]}" --out "$tmp/run3" --loader-threads 2 >"$tmp/run3.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
    [ -f "$tmp/run3/log.jsonl" ] && [ "$(wc -l <"$tmp/run3/log.jsonl")" -ge 2 ] && break
    sleep 0.1
done
kill -INT $pid
wait $pid
ok test $? -eq 0
ok grep -q "stopped after" "$tmp/run3.log"
expect_rc 0 "done after 8 updates" "$agpt" train "${common[@]}" --resume "$tmp/run3"
ok cmp -s "$tmp/run1/delta.safetensors" "$tmp/run3/delta.safetensors"

# A resume with other numbers is refused, naming the option.
expect_rc 1 "lr" "$agpt" train --model "$m" --tokenizer "$tok" --data "$tmp/mvtec" --steps 8 --accum 2 --lr 1e-3 \
    --warmup 2 --seed 7 --resume "$tmp/run1"

# The other layouts, and the LoRA / llama_proj options.
expect_rc 0 "1 images, 1 classes" "$agpt" train --model "$m" --tokenizer "$tok" --data "$tmp/visa" --format visa \
    --steps 1 --accum 1 --out "$tmp/run4"
expect_rc 0 "2 images, 1 classes" "$agpt" train --model "$m" --tokenizer "$tok" --normal "$tmp/folder" --class gear \
    --steps 1 --accum 1 --train decoder,prompt_learner,llama_proj,lora --out "$tmp/run5"
expect_rc 0 "1 images, 1 classes" "$agpt" train --model "$m" --tokenizer "$tok" --data "$tmp/mvtec" --classes carpet \
    --steps 1 --accum 1 --out "$tmp/run6"
# --train vision: the delta holds the ViT's 4 x 12 block tensors, and layered over the base it changes the
# few-shot map, which depends on the ViT alone.
expect_rc 0 "done after 2 updates" "$agpt" train --model "$m" --tokenizer "$tok" --data "$tmp/mvtec" --steps 2 \
    --accum 1 --lr 1e-2 --warmup 1 --train decoder,vision --out "$tmp/run7"
ok python3 - "$tmp/run7/delta.safetensors" <<'EOF'
import json, struct, sys
f = open(sys.argv[1], "rb")
header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
blocks = [k for k in header if k.startswith("modality_trunks.vision.blocks.")]
sys.exit(0 if len(blocks) == 48 and all(header[k]["dtype"] == "F32" for k in blocks) else 1)
EOF
fewshot=(--tokenizer "$tok" --max-new 2 --reference "$shared/images/grass.png" "$shared/images/brick.png")
"$agpt" detect --model "$m" "${fewshot[@]}" >"$tmp/fs-base.jsonl" 2>/dev/null
"$agpt" detect --model "$m" --weights "$tmp/run7/delta.safetensors" "${fewshot[@]}" >"$tmp/fs-tuned.jsonl" 2>/dev/null
ok test -n "$(score "$tmp/fs-tuned.jsonl")"
ok test "$(score "$tmp/fs-base.jsonl")" != "$(score "$tmp/fs-tuned.jsonl")"

# The instruction stream: each image's micro-step is followed by an instruction one.
mkdir -p "$tmp/sft"
cp "$shared/images/gravel.png" "$tmp/sft/000001.jpg"  # decoded by content, named as PandaGPT's files are
cp "$shared/images/brick.png" "$tmp/sft/000002.jpg"
cat >"$tmp/sft.json" <<'JSON'
[{"image_name": "000001", "conversation": [{"from": "human", "value": "What is in this image?"},
  {"from": "gpt", "value": "A gravel path seen from above."}, {"from": "human", "value": "Ignored?"}]},
 {"image_name": "000002.jpg", "conversation": [{"from": "human", "value": "Describe the wall."},
  {"from": "gpt", "value": "Red bricks in a running bond."}]}]
JSON
expect_rc 0 "done after 2 updates" "$agpt" train --model "$m" --tokenizer "$tok" --data "$tmp/mvtec" --steps 2 --accum 2 \
    --sft "$tmp/sft.json" --sft-images "$tmp/sft" --out "$tmp/run8"
ok test "$(wc -l <"$tmp/run8/log.jsonl")" -eq 2
printf '[{"image_name": "000001", "conversation": [{"from": "gpt", "value": "x"}]}]' >"$tmp/sft-bad.json"
expect_rc 1 "lack an image_name or a human then a gpt turn" "$agpt" train --model "$m" --tokenizer "$tok" \
    --data "$tmp/mvtec" --steps 1 --sft "$tmp/sft-bad.json" --sft-images "$tmp/sft" --out "$tmp/run9"
printf '[{"image_name": "404", "conversation": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]' \
    >"$tmp/sft-missing.json"
expect_rc 1 "404.jpg" "$agpt" train --model "$m" --tokenizer "$tok" --data "$tmp/mvtec" --steps 1 \
    --sft "$tmp/sft-missing.json" --sft-images "$tmp/sft" --out "$tmp/run9"
printf '{"not": "an array"}' >"$tmp/sft-object.json"
expect_rc 1 "expected a JSON array" "$agpt" train --model "$m" --tokenizer "$tok" --data "$tmp/mvtec" --steps 1 \
    --sft "$tmp/sft-object.json" --sft-images "$tmp/sft" --out "$tmp/run9"
expect_rc 2 "go together" "$agpt" train --model "$m" --data "$tmp/mvtec" --sft "$tmp/sft.json" --out "$tmp/x"

# Usage errors: exit 2 before the model loads.
expect_rc 2 "needs an integer" "$agpt" train --model "$m" --data "$tmp/mvtec" --out "$tmp/x" --steps 1.5
expect_rc 2 "needs an integer" "$agpt" train --model "$m" --data "$tmp/mvtec" --out "$tmp/x" --accum 0
expect_rc 2 "needs a number" "$agpt" train --model "$m" --data "$tmp/mvtec" --out "$tmp/x" --lr abc
expect_rc 2 "needs a number" "$agpt" train --model "$m" --data "$tmp/mvtec" --out "$tmp/x" --fewshot-p 2
expect_rc 2 "are required" "$agpt" train --data "$tmp/mvtec" --out "$tmp/x"
expect_rc 2 "either --data" "$agpt" train --model "$m" --out "$tmp/x"
expect_rc 2 "needs --class" "$agpt" train --model "$m" --normal "$tmp/folder" --out "$tmp/x"
expect_rc 2 "mvtec or visa" "$agpt" train --model "$m" --data "$tmp/mvtec" --format coco --out "$tmp/x"
expect_rc 2 "--train takes" "$agpt" train --model "$m" --data "$tmp/mvtec" --train decoder,vit --out "$tmp/x"
expect_rc 2 "unknown option" "$agpt" train --model "$m" --data "$tmp/mvtec" --bogus --out "$tmp/x"
expect_rc 2 "not both" "$agpt" train --model "$m" --data "$tmp/mvtec" --steps 3 --epochs 2 --out "$tmp/x"
mkdir -p "$tmp/empty"
expect_rc 2 "no images found" "$agpt" train --model "$m" --data "$tmp/empty" --out "$tmp/x"
expect_rc 2 "without test images (zipper)" "$agpt" train --model "$m" --data "$tmp/mvtec" --classes zipper --out "$tmp/x"
expect_rc 2 "not a folder" "$agpt" train --model "$m" --data "$tmp/visa-missing" --format visa --out "$tmp/x"
mkdir -p "$tmp/testonly/bottle/test/good"
cp "$shared/images/brick.png" "$tmp/testonly/bottle/test/good/000.png"
expect_rc 2 "no training images" "$agpt" train --model "$m" --data "$tmp/testonly" --out "$tmp/x"
printf 'PK\003\004 a torch.save zip' >"$tmp/model.pth"
expect_rc 2 "agpt convert" "$agpt" train --model "$tmp/model.pth" --data "$tmp/mvtec" --out "$tmp/x"
# Bad data found after the model loads: exit 1 with the file named.
printf 'not an image' >"$tmp/folder/broken.png"
expect_rc 1 "broken.png" "$agpt" train --model "$m" --tokenizer "$tok" --normal "$tmp/folder" --class gear \
    --steps 2 --accum 2 --out "$tmp/run7"

# Supervised training (--supervised): real defects with masks join the items, on the MVTec, VisA and folder layouts;
# the defects change what is learnt; a defect without its mask is left out and counted; nothing usable is refused.
python3 "$(dirname "$0")/eval_tree.py" "$tmp/tree" "$shared/images/brick.png" "$shared/images/grass.png" \
    "$shared/images/gravel.png" || echo "FAIL eval_tree"
sup=(--model "$m" --tokenizer "$tok" --steps 2 --accum 2 --warmup 1 --seed 7 --val-images 0)
expect_rc 0 "6 images + 2 defects with masks, 1 classes" "$agpt" train "${sup[@]}" --data "$tmp/tree/mvtec" \
    --classes bottle --supervised --out "$tmp/sup1"
expect_rc 0 "done after 2 updates" "$agpt" train "${sup[@]}" --data "$tmp/tree/mvtec" --classes bottle --out "$tmp/sup0"
ok test -s "$tmp/sup1/delta.safetensors"
ok sh -c "! cmp -s '$tmp/sup0/delta.safetensors' '$tmp/sup1/delta.safetensors'"
expect_rc 0 "6 images + 2 defects with masks" "$agpt" train "${sup[@]}" --data "$tmp/tree/visa" --format visa \
    --supervised --out "$tmp/sup2"
mkdir -p "$tmp/fold/good" "$tmp/fold/bad" "$tmp/fold/masks"
cp "$tmp/tree/mvtec/bottle/train/good/000.png" "$tmp/tree/mvtec/bottle/train/good/001.png" "$tmp/fold/good/"
cp "$tmp/tree/mvtec/bottle/test/crack/000.png" "$tmp/fold/bad/d0.png"
cp "$tmp/tree/mvtec/bottle/test/crack/001.png" "$tmp/fold/bad/d1.png"
cp "$tmp/tree/mvtec/bottle/ground_truth/crack/000_mask.png" "$tmp/fold/masks/d0.png"
expect_rc 0 "1 defect image without a mask left out" "$agpt" train "${sup[@]}" --normal "$tmp/fold/good" --class widget \
    --abnormal "$tmp/fold/bad" --masks "$tmp/fold/masks" --supervised --out "$tmp/sup3"
ok grep -q "2 images + 1 defects with masks" "$tmp/log"
expect_rc 2 "no defect images with masks" "$agpt" train "${sup[@]}" --data "$tmp/mvtec" --supervised --out "$tmp/x"
expect_rc 2 "go together" "$agpt" train "${sup[@]}" --normal "$tmp/fold/good" --class widget --abnormal "$tmp/fold/bad" \
    --supervised --out "$tmp/x"
# DRAEM's Perlin anomalies instead of NSA's for a class of the user's ({"perlin": true} in --params).
echo '{"perlin": true}' >"$tmp/perlin.json"
expect_rc 0 "done after 2 updates" "$agpt" train "${sup[@]}" --normal "$tmp/fold/good" --class widget \
    --params "$tmp/perlin.json" --out "$tmp/perlin"
expect_rc 0 "done after 2 updates" "$agpt" train "${sup[@]}" --normal "$tmp/fold/good" --class widget --out "$tmp/nsa"
ok sh -c "! cmp -s '$tmp/perlin/delta.safetensors' '$tmp/nsa/delta.safetensors'"
# --gpus N asks for more GPUs than any machine here has: refused before anything starts.
expect_rc 2 "gpus 256" "$agpt" train "${sup[@]}" --data "$tmp/mvtec" --gpus 256 --out "$tmp/x"
# A resume with the defects left out is refused (other options).
expect_rc 1 "defects" "$agpt" train "${sup[@]}" --data "$tmp/tree/mvtec" --classes bottle --resume "$tmp/sup1"

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
