#!/usr/bin/env bash
# The default model's answers on a fixed check set that needs no download: defects drawn on crops of the CC0
# photos in ../shared/data/images (make_default_data heldout, seed 3), inspected 1-shot (the class's first normal
# crop as the reference) and zero-shot, under the class's name (the prompt's description names it).
# tools/train-default.sh records them in models/default/expected.jsonl; tests/test_default_model.sh checks
# that the committed delta still gives them.
#   tools/default_model/check.sh AGPT MAKE_DEFAULT_DATA BASE DELTA TOKENIZER SHARED_IMAGES WORKDIR > answers.jsonl
set -euo pipefail
agpt=$1 make_data=$2 base=$3 delta=$4 tok=$5 images=$6 work=$7
rm -rf "$work/check"
"$make_data" heldout "$work/check" 3 8 "$images"/brick.png "$images"/grass.png "$images"/gravel.png >/dev/null
for cls in brick grass gravel; do
    tests=("$work/check/$cls"/test/*/*.png)
    "$agpt" detect --model "$base" --weights "$delta" --tokenizer "$tok" --threads 2 --max-new 24 --class "$cls" \
        --reference-shifts 7 --reference "$work/check/$cls/train/good/000.png" "${tests[@]}" 2>/dev/null
    "$agpt" detect --model "$base" --weights "$delta" --tokenizer "$tok" --threads 2 --max-new 24 --class "$cls" \
        "${tests[@]}" 2>/dev/null
done | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    image = "/".join(r["image"].split("/")[-4:])  # class/test/kind/NNN.png: the same on every machine
    if not r.get("ok"):
        sys.exit("check: " + image + ": " + r.get("error", "failed"))
    print(json.dumps({"image": image, "mode": r["mode"], "verdict": r["verdict"], "score": r["score"],
                      "answer": r["answer"]}))
'
