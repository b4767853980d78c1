#!/usr/bin/env bash
# The default model (issue 15):
#   - the recipe end to end, short: tools/train-default.sh with 4 updates on the CC0 photos of ../shared/data
#     (no download): the base is built, the crops made, agpt train writes a delta, agpt eval reads the held-out
#     tree and writes its tables, and detect with the delta layered answers on the check set;
#   - the committed models/default/delta.safetensors still loads over the rebuilt base and gives the answers
#     recorded in models/default/expected.jsonl (verdicts and answers equal, scores within 1e-3), and its 1-shot
#     maps score the drawn defects above the normal crops.
# Usage: tests/test_default_model.sh BUILD_DIR SHARED_DATA      (exit 77: skipped without ../shared/data)
set -u
build=$1
shared=$2
root=$(cd "$(dirname "$0")/.." && pwd)
tok=$shared/llama-tokenizer.model
for f in "$tok" "$shared/images/brick.png" "$shared/images/grass.png" "$shared/images/gravel.png"; do
    [ -f "$f" ] || { echo "SKIP: needs $f"; exit 77; }
done
passed=0
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ok() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $*"; fi; }

# The recipe, 4 updates, the shared photos as both training and "held-out" photos (a test of the loop only).
STEPS=4 CROPS=8 TRAIN_PHOTOS=$shared/images HELDOUT_PHOTOS=$shared/images BUILD=$build \
    "$root/tools/train-default.sh" "$tmp/recipe" >"$tmp/recipe.log" 2>&1
rc=$?
ok test $rc -eq 0
[ $rc -eq 0 ] || tail -20 "$tmp/recipe.log"
ok test -s "$tmp/recipe/delta.safetensors"
ok test "$(wc -l <"$tmp/recipe/run/log.jsonl")" -eq 4
ok test "$(find "$tmp/recipe/data" -name '*.png' | wc -l)" -eq 24  # 3 photos x 4 windows x 2 crops
for cls in brick grass gravel; do ok grep -q "^| $cls |" "$tmp/recipe/heldout/report.md"; done
ok grep -q "k = 0" "$tmp/recipe/heldout/report.md"
ok grep -q "k = 1" "$tmp/recipe/heldout/report.md"
ok test "$(wc -l <"$tmp/recipe/expected.jsonl")" -eq 36  # 3 classes x 6 test crops x (1-shot, zero-shot)

# The committed model over the base rebuilt from tests/data.
committed=$root/models/default
mkdir -p "$tmp/seeded"
"$build/make_test_model" "$tmp/seeded" "$root/tests/data" >/dev/null
python3 "$root/tools/default_model/default_base.py" "$tmp/seeded/model.safetensors" "$tmp/base.safetensors"
ok cmp -s "$tmp/base.safetensors" "$tmp/recipe/base.safetensors"  # the recipe's base is this one
"$root/tools/default_model/check.sh" "$build/agpt" "$build/make_default_data" "$tmp/base.safetensors" \
    "$committed/delta.safetensors" "$tok" "$shared/images" "$tmp" >"$tmp/answers.jsonl"
ok test $? -eq 0
ok python3 - "$committed/expected.jsonl" "$tmp/answers.jsonl" <<'EOF'
import json, sys
want = [json.loads(l) for l in open(sys.argv[1])]
got = [json.loads(l) for l in open(sys.argv[2])]
bad = 0
if len(want) != len(got) or not want:
    sys.exit(f"{len(got)} answers, expected {len(want)}")
for w, g in zip(want, got):
    same = (w["image"], w["mode"], w["verdict"], w["answer"]) == (g["image"], g["mode"], g["verdict"], g["answer"])
    if not same or not abs(w["score"] - g["score"]) <= 1e-3:
        bad += 1
        print("differs:", json.dumps(w), "\n    got:", json.dumps(g))
# The 1-shot maps see the drawn defects: their mean score is above the normal crops'.
one = [g for g in got if g["mode"] == "few-shot"]
good = [g["score"] for g in one if "/good/" in g["image"]]
defect = [g["score"] for g in one if "/good/" not in g["image"]]
print(f"1-shot mean score: defects {sum(defect) / len(defect):.4f}, normal {sum(good) / len(good):.4f}")
sys.exit(1 if bad or not sum(defect) / len(defect) > sum(good) / len(good) else 0)
EOF

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
