#!/usr/bin/env bash
# agpt eval as a user runs it, on tiny MVTec-AD, VisA and folder trees (tests/eval_tree.py, from
# tests/data/imagebind's images) with the small complete model make_test_model assembles (random-like weights:
# the numbers mean nothing): --maps-only and full (answers) mode, several k and rounds, the report files and
# their JSON, the per-image lines, the protocol's file and reference selection, and broken trees.
# Usage: tests/test_eval.sh path/to/agpt tests/data [shared/data] path/to/make_test_model [report.md to keep]
set -u
agpt=$1
data=$2
shared=${3:-$data/../../../shared/data}
make_test_model=${4:-}
keep=${5:-}
here=$(cd "$(dirname "$0")" && pwd)
passed=0
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ib="$data/imagebind"
if ! command -v python3 >/dev/null || [ ! -f "$ib/query.png" ] || [ ! -x "$make_test_model" ]; then
    echo "skipped: needs python3 (stdlib only), $ib/*.png and make_test_model"
    exit 77
fi

ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL $1"; [ -f "$tmp/out" ] && cat "$tmp/out"; }
check() {  # check NAME COMMAND...: passes when the command succeeds
    local name=$1
    shift
    if "$@" >"$tmp/out" 2>&1; then ok; else bad "$name"; fi
}
expect_fail() {  # expect_fail NAME PATTERN COMMAND...: must exit non-zero (not a crash) and print PATTERN
    local name=$1 pattern=$2
    shift 2
    "$@" >"$tmp/out" 2>&1
    local rc=$?
    if [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -q -- "$pattern" "$tmp/out"; then ok; else bad "$name (exit $rc)"; fi
}
py() { python3 - "$@" >"$tmp/py.out" 2>&1; }  # a check in Python (stdlib): the script on stdin

mkdir -p "$tmp/model"
check "make_test_model" "$make_test_model" "$tmp/model" "$data"
m="$tmp/model/model.safetensors"
[ -f "$m" ] || { echo "no test model"; exit 1; }
check "build trees" python3 "$here/eval_tree.py" "$tmp/tree" "$ib/query.png" "$ib/ref0.png" "$ib/ref1.png"
mv="$tmp/tree/mvtec"
vi="$tmp/tree/visa"
E=("$agpt" eval --device cpu --model "$m")

# ---- MVTec, maps only: the reference selection (round 0 -> 000.png, round 1 -> 004.png), the files --------
check "mvtec maps-only" "${E[@]}" --data "$mv" --format mvtec --maps-only --k-shot 1 --rounds 0,1 --out "$tmp/o1"
grep -q "| \*\*mean\*\* |" "$tmp/out" && grep -q "I-AUROC" "$tmp/out" && ! grep -q "Accuracy" "$tmp/out" && ok ||
    bad "maps-only summary on stdout (mean row, no accuracy)"
for f in report.md report.json k1_round0/report.md k1_round0/report.json k1_round0/images.jsonl \
    k1_round1/images.jsonl k1_round0/plots/bottle_image_roc.png k1_round0/plots/grid_pro.png \
    k1_round0/plots/bottle_pixel_roc.png; do
    [ -s "$tmp/o1/$f" ] && ok || bad "report file $f"
done
if py "$tmp/o1" <<'EOF'
import json, sys
o = sys.argv[1]
r = json.load(open(o + "/report.json"))
assert r["maps_only"] and len(r["runs"]) == 2 and r["over_runs"]["runs"] == 2, r.keys()
for run in r["runs"]:
    assert [c["class"] for c in run["classes"]] == ["bottle", "grid"]
    for c in run["classes"]:
        assert c["images"] == 4 and c["anomalous"] == 2 and c["pixel_images"] == 4, c
        for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "image_ap", "pixel_ap"):
            assert 0 <= c[k] <= 1, (k, c[k])
        assert "accuracy" not in c
for rnd, ref in ((0, "000.png"), (1, "004.png")):
    lines = [json.loads(l) for l in open(f"{o}/k1_round{rnd}/images.jsonl")]
    assert len(lines) == 8, len(lines)
    for l in lines:
        assert l["references"] == [f"{l['image'].split('/test/')[0]}/train/good/{ref}"], l
        assert ("/test/good/" in l["image"]) == (l["label"] == "normal"), l
        assert (l["mask"] is None) == (l["label"] == "normal"), l
        assert l["mask"] is None or l["mask"].endswith("_mask.png") and "/ground_truth/crack/" in l["mask"]
        assert l["verdict"] is None and isinstance(l["score"], float)
png = open(o + "/k1_round0/plots/bottle_pro.png", "rb").read(24)
assert png[:8] == b"\x89PNG\r\n\x1a\n"
EOF
then ok; else bad "mvtec maps-only report and lines"; cat "$tmp/py.out"; fi

# ---- full mode: the official prompt, greedy answers, accuracy and verdict counts ---------------------------
tok="$shared/llama-tokenizer.model"
if [ -f "$tok" ]; then
    check "mvtec full" "${E[@]}" --tokenizer "$tok" --data "$mv" --format mvtec --k-shot 0,1 --round 0 --max-new 8 \
        --batch 2 --out "$tmp/o2"
    grep -q "Accuracy" "$tmp/out" && grep -q "TP/FP/TN/FN" "$tmp/out" && grep -q "mean ± std over 2 runs" "$tmp/out" &&
        ok || bad "full summary (accuracy, counts, mean ± std)"
    [ -n "$keep" ] && cp "$tmp/o2/report.md" "$keep"
    if py "$tmp/o2" <<'EOF'
import json, sys
o = sys.argv[1]
r = json.load(open(o + "/report.json"))
assert not r["maps_only"] and len(r["runs"]) == 2
for run in r["runs"]:
    for c in run["classes"]:
        assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == 4 and 0 <= c["accuracy"] <= 1, c
lines = [json.loads(l) for l in open(o + "/k0_round0/images.jsonl")]
assert len(lines) == 8 and all(l["references"] == [] for l in lines)
for l in lines:
    assert isinstance(l["answer"], str) and l["verdict"] in ("anomalous", "normal")
    right = ("Yes" in l["answer"]) if l["label"] == "anomalous" else ("No" in l["answer"])
    assert l["correct"] == right, l
# every "mean ± std" cell of report.md is over_runs' mean and std of its own row (the mean row included)
keys = {"Accuracy": "accuracy", "I-AUROC": "image_auroc", "P-AUROC": "pixel_auroc", "AUPRO": "aupro"}
md = open(o + "/report.md").read().split("## mean ± std over 2 runs")[1].split("\n\n")[1].splitlines()
head = [c.strip() for c in md[0].strip("|").split("|")]
rows = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:]]
over = r["over_runs"]
assert len(rows) == len(over["std"]) and rows[-1][0] == "**mean**", rows
seen = 0
for i, row in enumerate(rows):
    for title, key in keys.items():
        cell, m, sd = row[head.index(title)], over["mean"][i][key], over["std"][i][key]
        if m is None:
            continue
        assert cell == f"{100 * m:.1f} ± {100 * sd:.1f}", (row[0], title, cell, m, sd)
        seen += 1
assert seen >= 8, seen
EOF
    then ok; else bad "full report and lines"; cat "$tmp/py.out"; fi
else
    echo "skipped full mode (needs $tok)"
fi

# ---- VisA: 1cls.csv rows, references by row (round r: train rows 4r..4r+k-1), masks by path -----------------
check "visa maps-only" "${E[@]}" --data "$vi" --format visa --maps-only --k-shot 1,2 --round 0,1 --out "$tmp/o3"
if py "$tmp/o3" "$vi" <<'EOF'
import json, sys
o, vi = sys.argv[1], sys.argv[2]
for k in (1, 2):
    for rnd in (0, 1):
        lines = [json.loads(l) for l in open(f"{o}/k{k}_round{rnd}/images.jsonl")]
        assert len(lines) == 4, len(lines)
        want = [f"{vi}/candle/Data/Images/Normal/{4 * rnd + j:04d}.png" for j in range(k)]
        for l in lines:
            assert l["class"] == "candle" and l["references"] == want, (l, want)
            assert (l["label"] == "anomalous") == ("/Anomaly/" in l["image"])
            if l["mask"]:
                assert l["mask"] == l["image"].replace("/Images/", "/Masks/")
r = json.load(open(o + "/report.json"))
assert len(r["runs"]) == 4 and len(r["over_runs"]["std"]) == 2
EOF
then ok; else bad "visa selection"; cat "$tmp/py.out"; fi
expect_fail "visa too few train rows" "too few for k 2 at round 2" "${E[@]}" --data "$vi" --format visa --maps-only \
    --k-shot 2 --round 2 --out "$tmp/o4"

# ---- the folder layout: references from the normal images, left out of the test set ------------------------
mkdir -p "$tmp/fold/normal" "$tmp/fold/bad" "$tmp/fold/masks"
cp "$vi"/candle/Data/Images/Normal/000[0-5].png "$tmp/fold/normal/"
cp "$vi"/candle/Data/Images/Anomaly/*.png "$tmp/fold/bad/"
cp "$vi"/candle/Data/Masks/Anomaly/000.png "$tmp/fold/masks/000.png"
check "folder layout" "${E[@]}" --format folder --normal "$tmp/fold/normal" --abnormal "$tmp/fold/bad" \
    --masks "$tmp/fold/masks" --class widget --maps-only --k-shot 1 --out "$tmp/o5"
grep -q "1 anomalous image without a mask (.*bad/001.png)" "$tmp/out" && ok || bad "folder: the missing mask named"
if py "$tmp/o5" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1] + "/k1_round0/images.jsonl")]
assert len(lines) == 7, len(lines)  # 6 normal - 1 reference + 2 anomalous
assert all(not l["image"].endswith("normal/0000.png") for l in lines)
assert lines[0]["references"][0].endswith("normal/0000.png")
EOF
then ok; else bad "folder selection"; cat "$tmp/py.out"; fi

# ---- broken trees: counted and named in one message, never a crash ----------------------------------------
cp -r "$mv" "$tmp/broken"
rm "$tmp/broken/grid/ground_truth/crack/001_mask.png"
printf 'not a png' >"$tmp/broken/grid/test/good/009.png"
check "broken tree" "${E[@]}" --data "$tmp/broken" --format mvtec --maps-only --round 0 --classes grid,bottle,nothere \
    --out "$tmp/o6"
grep -q "1 anomalous image without a mask (.*grid/test/crack/001.png)" "$tmp/out" &&
    grep -q "1 class without test images (nothere)" "$tmp/out" && grep -q "1 unreadable image (.*009.png)" "$tmp/out" &&
    ok || bad "broken tree: problems named"
if py "$tmp/o6" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1] + "/report.json"))
grid = [c for c in r["runs"][0]["classes"] if c["class"] == "grid"][0]
assert grid["images"] == 4 and grid["pixel_images"] == 3, grid  # the unreadable one skipped; no mask: image only
assert "unreadable" in r["problems"] and "nothere" in r["problems"]
EOF
then ok; else bad "broken tree report"; cat "$tmp/py.out"; fi
expect_fail "missing reference" "reference .*train/good/020.png .* is missing" "${E[@]}" --data "$mv" --format mvtec \
    --maps-only --round 5 --out "$tmp/o7"
expect_fail "no such root" "not a folder" "${E[@]}" --data "$tmp/none" --format mvtec --maps-only --out "$tmp/o8"
mkdir -p "$tmp/empty"
expect_fail "empty tree" "no images found" "${E[@]}" --data "$tmp/empty" --format mvtec --maps-only --out "$tmp/o9"
expect_fail "visa without csv" "split_csv/1cls.csv" "${E[@]}" --data "$mv" --format visa --maps-only --out "$tmp/o9"
expect_fail "bad format" "mvtec|visa|folder" "${E[@]}" --data "$mv" --format kitti --out "$tmp/o9"
expect_fail "bad k" "--k-shot needs an integer" "${E[@]}" --data "$mv" --format mvtec --k-shot 1,x --out "$tmp/o9"
expect_fail "folder needs a class" "--class NAME" "${E[@]}" --format folder --normal "$tmp/fold/normal" --out "$tmp/o9"

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
