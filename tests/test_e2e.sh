#!/usr/bin/env bash
# End to end, as a user with the official files: tiny checkpoints in the four official layouts
# (tests/data/e2e/official, written by tests/reference/make_e2e_goldens.py with torch.save: a full ImageBind
# dict with unused modalities, a sharded HF LLaMA directory, a PandaGPT delta of fp16 Parameters, an AnomalyGPT
# checkpoint) go through `agpt convert` and `agpt detect`; the maps must match the PyTorch re-expression of the
# reference pipeline and the answers must be identical. Also: an f16 conversion, a layered partial conversion,
# folders, and bad inputs. Needs LLaMA's tokenizer.model and CLIP's merges from shared/data (else skipped).
# Usage (from the repository root: the golden names images by repository paths):
#   tests/test_e2e.sh path/to/agpt path/to/e2e_check tests/data shared/data
set -u
agpt=$1
check_tool=$2
data=$3
shared=$4
e2e=$data/e2e
golden=$e2e/expected.safetensors
sp=$shared/llama-tokenizer.model
clip=$shared/clip-bpe-simple-vocab-16e6.txt.gz
if [ ! -f "$sp" ] || [ ! -f "$clip" ] || [ ! -f "$golden" ]; then
    echo "skipped: needs $sp, $clip and $golden"
    exit 77
fi
passed=0
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
meta() { "$check_tool" meta "$golden" "$1"; }

off=$e2e/official
heads="--vision-heads $(meta imagebind.vision_heads) --text-heads $(meta imagebind.text_heads)"
convert_all() {  # convert_all OUT DTYPE
    "$agpt" convert --imagebind "$off/imagebind_huge.pth" --vicuna "$off/vicuna" \
        --pandagpt "$off/pandagpt/pytorch_model.pt" --anomalygpt "$off/anomalygpt/pytorch_model.pt" \
        --tokenizer "$sp" --clip-vocab "$clip" --dtype "$2" $heads -o "$1"
}
if convert_all "$tmp/model.safetensors" f32 >"$tmp/convert.log" 2>&1; then ok; else bad "convert"; cat "$tmp/convert.log"; fi
grep -q "peak memory" "$tmp/convert.log" && ok || bad "convert prints its peak memory"
"$agpt" info "$tmp/model.safetensors" >"$tmp/info" 2>&1
grep -q "cached class names (30)" "$tmp/info" && grep -q "agpt.format" "$tmp/info" && ok || { bad "info: 30 classes, format"; cat "$tmp/info"; }

# The golden cases: the map within float32 tolerance, the score, and the answer token for token.
for i in $(seq 0 $(($(meta cases) - 1))); do
    refs=()
    IFS=',' read -r -a ref_list <<<"$(meta case$i.references)"
    for r in "${ref_list[@]}"; do [ -n "$r" ] && refs+=(--reference "$r"); done
    if "$agpt" detect --device cpu --model "$tmp/model.safetensors" --prompt "$(meta case$i.prompt)" \
        --max-new "$(meta case$i.max_new)" "${refs[@]}" --out "$tmp/case$i" "$(meta case$i.image)" \
        >"$tmp/case$i.jsonl" 2>"$tmp/case$i.err"; then ok; else bad "detect case $i"; cat "$tmp/case$i.err"; fi
    stem=$(basename "$(meta case$i.image)"); stem=${stem%.*}
    "$check_tool" map "$golden" case$i.map "$tmp/case$i/$stem.map.safetensors" 1e-5 && ok || bad "case $i map"
    "$check_tool" score "$golden" case$i.score "$tmp/case$i.jsonl" 1e-5 && ok || bad "case $i score"
    "$check_tool" json "$golden" case$i.answer "$tmp/case$i.jsonl" answer && ok || bad "case $i answer"
done

# f16 storage, as the official weights: the same pipeline within half-precision tolerance.
if convert_all "$tmp/model16.safetensors" f16 >"$tmp/convert16.log" 2>&1; then ok; else bad "convert f16"; cat "$tmp/convert16.log"; fi
"$agpt" detect --device cpu --model "$tmp/model16.safetensors" --prompt "$(meta case0.prompt)" --max-new 4 \
    --out "$tmp/f16" "$(meta case0.image)" >"$tmp/f16.jsonl" 2>"$tmp/f16.err" && ok || { bad "detect f16"; cat "$tmp/f16.err"; }
"$check_tool" map "$golden" case0.map "$tmp/f16/query.map.safetensors" 1e-3 && ok || bad "f16 map"

# On the CPU, --dtype bf16 keeps the weight matrices of the encoders and the LLM in bf16 (half the memory; f32
# arithmetic). The small model's ImageBind weights happen to be bf16-exact, so the map stays close to the golden.
"$agpt" detect --device cpu --dtype bf16 --model "$tmp/model.safetensors" --prompt "$(meta case0.prompt)" --max-new 8 \
    --out "$tmp/bf16" "$(meta case0.image)" >"$tmp/bf16.jsonl" 2>"$tmp/bf16.err" &&
    "$check_tool" map "$golden" case0.map "$tmp/bf16/query.map.safetensors" 1e-3 && grep -q '"answer"' "$tmp/bf16.jsonl" &&
    ok || { bad "detect --dtype bf16 on the CPU"; cat "$tmp/bf16.err"; }

# A partial conversion: the AnomalyGPT checkpoint alone, layered over a model converted without it.
"$agpt" convert --imagebind "$off/imagebind_huge.pth" --vicuna "$off/vicuna" --pandagpt "$off/pandagpt/pytorch_model.pt" \
    --anomalygpt "$off/anomalygpt/pytorch_model.pt" --tokenizer "$sp" --clip-vocab "$clip" --dtype f32 $heads \
    -o "$tmp/base.safetensors" >/dev/null 2>&1 &&
    "$agpt" convert --anomalygpt "$off/anomalygpt/pytorch_model.pt" --dtype f32 -o "$tmp/delta.safetensors" >"$tmp/delta.log" 2>&1 &&
    "$agpt" detect --device cpu --model "$tmp/base.safetensors" --weights "$tmp/delta.safetensors" \
        --prompt "$(meta case0.prompt)" --max-new "$(meta case0.max_new)" "$(meta case0.image)" >"$tmp/layered.jsonl" 2>/dev/null &&
    "$check_tool" json "$golden" case0.answer "$tmp/layered.jsonl" answer && ok || { bad "layered delta"; cat "$tmp/delta.log"; }

# Batches: the case-0 image three times through one batch of 3 (anomalygpt_ask_batch): three lines in order,
# each with the case-0 answer.
batch_refs=()
IFS=',' read -r -a batch_ref_list <<<"$(meta case0.references)"
for r in "${batch_ref_list[@]}"; do [ -n "$r" ] && batch_refs+=(--reference "$r"); done
batch_ok=0
if "$agpt" detect --device cpu --batch 3 --model "$tmp/model.safetensors" --prompt "$(meta case0.prompt)" \
    --max-new "$(meta case0.max_new)" "${batch_refs[@]}" "$(meta case0.image)" "$(meta case0.image)" "$(meta case0.image)" \
    >"$tmp/batch.jsonl" 2>"$tmp/batch.err" && [ "$(wc -l <"$tmp/batch.jsonl")" -eq 3 ]; then
    batch_ok=1
    for k in 1 2 3; do
        sed -n "${k}p" "$tmp/batch.jsonl" >"$tmp/batch$k.jsonl"
        "$check_tool" json "$golden" case0.answer "$tmp/batch$k.jsonl" answer || batch_ok=0
    done
fi
[ $batch_ok -eq 1 ] && ok || { bad "detect --batch 3"; cat "$tmp/batch.jsonl" "$tmp/batch.err"; }

# Folders: walked recursively, one line per image, an unreadable image reported without stopping the rest.
mkdir -p "$tmp/line/a/b"
cp "$(meta case0.image)" "$tmp/line/a/one.png"
cp "$(meta case0.image)" "$tmp/line/a/b/one.png"
printf 'not a png' >"$tmp/line/a/b/broken.png"
"$agpt" detect --device cpu --model "$tmp/model.safetensors" --verdict-only --out "$tmp/lineout" "$tmp/line" \
    >"$tmp/line.jsonl" 2>"$tmp/line.err"
rc=$?
[ $rc -eq 1 ] && [ "$(grep -c '"ok":true' "$tmp/line.jsonl")" -eq 2 ] && [ "$(grep -c '"ok":false' "$tmp/line.jsonl")" -eq 1 ] &&
    grep -q "images/s" "$tmp/line.err" && [ -s "$tmp/lineout/a_one.map.safetensors" ] && [ -s "$tmp/lineout/a_b_one.map.safetensors" ] &&
    ! grep -q '"answer"' "$tmp/line.jsonl" && ok || { bad "folder walk (exit $rc)"; cat "$tmp/line.jsonl" "$tmp/line.err"; ls "$tmp/lineout"; }

# Output names stay distinct when a renamed "a_<n>" meets an input already called that.
mkdir -p "$tmp/names"
cp "$(meta case0.image)" "$tmp/names/a.png"
cp "$(meta case0.image)" "$tmp/names/a_1.png"
cp "$(meta case0.image)" "$tmp/names/a.jpg"
"$agpt" detect --device cpu --model "$tmp/model.safetensors" --verdict-only --out "$tmp/namesout" "$tmp/names" \
    >"$tmp/names.jsonl" 2>/dev/null
[ "$(ls "$tmp/namesout" | grep -c 'map.safetensors$')" -eq 3 ] &&
    [ "$(sed -n 's/.*"map":"\([^"]*\)".*/\1/p' "$tmp/names.jsonl" | sort -u | wc -l)" -eq 3 ] && ok ||
    { bad "distinct output names"; cat "$tmp/names.jsonl"; ls "$tmp/namesout"; }

# The embedded CLIP vocabulary computes an uncached class; new references afterwards must not free it (this ran
# into a double free once; the ASan run of this script catches a regression).
"$agpt" convert --imagebind "$off/imagebind_huge.pth" --vicuna "$off/vicuna" --pandagpt "$off/pandagpt/pytorch_model.pt" \
    --anomalygpt "$off/anomalygpt/pytorch_model.pt" --tokenizer "$sp" --clip-vocab "$clip" --no-text-features $heads \
    --dtype f32 -o "$tmp/nofeat.safetensors" >/dev/null 2>&1 &&
    printf 'This is a photo of a bottle. Is there any anomaly?\n/reference %s\nAnd now?\n/quit\n' "$(meta case0.image)" |
    "$agpt" chat --device cpu --greedy --max-new 4 --model "$tmp/nofeat.safetensors" "$(meta case0.image)" \
        >"$tmp/chat.out" 2>"$tmp/chat.err" && [ "$(wc -l <"$tmp/chat.out")" -eq 2 ] && ok ||
    { bad "chat: embedded CLIP vocabulary, then a reference"; cat "$tmp/chat.out" "$tmp/chat.err"; }

# Bad input: clear errors, no crash.
expect_fail() {  # expect_fail NAME PATTERN COMMAND...
    local name=$1 pattern=$2
    shift 2
    "$@" >"$tmp/out" 2>&1
    local rc=$?
    if [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -q -- "$pattern" "$tmp/out"; then ok; else bad "$name (exit $rc)"; cat "$tmp/out"; fi
}
expect_fail "files swapped" "does not look like" "$agpt" convert --anomalygpt "$off/pandagpt/pytorch_model.pt" -o "$tmp/x.safetensors"
head -c 30000 "$off/imagebind_huge.pth" >"$tmp/truncated.pth"
expect_fail "truncated pth" "truncated.pth" "$agpt" convert --imagebind "$tmp/truncated.pth" -o "$tmp/x.safetensors"
mkdir -p "$tmp/shards"
cp "$off/vicuna/config.json" "$off/vicuna/pytorch_model.bin.index.json" "$off/vicuna/pytorch_model-00001-of-00002.bin" "$tmp/shards/"
expect_fail "missing shard" "missing" "$agpt" convert --vicuna "$tmp/shards" -o "$tmp/x.safetensors"
[ ! -e "$tmp/x.safetensors" ] && [ ! -e "$tmp/x.safetensors.tmp" ] && ok || bad "a failed convert leaves no file"
printf 'hello' >"$tmp/text.bin"
cp "$off/anomalygpt/pytorch_model.pt" "$tmp/in.tmp"
expect_fail "output .tmp is an input" "overwrite the input" "$agpt" convert --anomalygpt "$tmp/in.tmp" -o "$tmp/in"
cmp -s "$off/anomalygpt/pytorch_model.pt" "$tmp/in.tmp" && ok || bad "the input named like the temporary is intact"
cp "$off/anomalygpt/pytorch_model.pt" "$tmp/caf$(printf '\351').pt"
"$agpt" convert --anomalygpt "$tmp/caf$(printf '\351').pt" -o "$tmp/latin1.safetensors" >/dev/null 2>&1 &&
    "$agpt" info "$tmp/latin1.safetensors" >/dev/null 2>&1 && ok || bad "a non-UTF-8 input path gives a readable file"
expect_fail "not a checkpoint" "neither" "$agpt" convert --pandagpt "$tmp/text.bin" -o "$tmp/x.safetensors"
expect_fail "no inputs" "at least one" "$agpt" convert -o "$tmp/x.safetensors"
expect_fail "bad layers" "layers" "$agpt" convert --imagebind "$off/imagebind_huge.pth" $heads --layers 3,2,1,0 -o "$tmp/x.safetensors"
expect_fail "detect without images" "required" "$agpt" detect --model "$tmp/model.safetensors"
expect_fail "detect on a missing path" "no such file" "$agpt" detect --model "$tmp/model.safetensors" "$tmp/none.png"
# A model file of a newer format version is refused with the versions named.
sed 's/"agpt.format":"1"/"agpt.format":"9"/' "$tmp/delta.safetensors" >"$tmp/future.safetensors"
expect_fail "newer format" "format 9" "$agpt" detect --device cpu --model "$tmp/base.safetensors" --weights "$tmp/future.safetensors" "$(meta case0.image)"

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
