#!/usr/bin/env bash
# The agpt command as a user runs it: help, info on a model file, bench ops (quick), and clear errors for
# bad input; with LLaMA's tokenizer in shared/data, map --ask and chat on a complete small model.
# Usage: tests/test_cli.sh path/to/agpt tests/data [shared/data] [path/to/make_test_model]
set -u
agpt=$1
data=$2
shared=${3:-$data/../../../shared/data}
make_test_model=${4:-}
passed=0
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

check() {  # check NAME COMMAND...: passes when the command succeeds
    local name=$1
    shift
    if "$@" >"$tmp/out" 2>&1; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $name"; cat "$tmp/out"; fi
}
expect_fail() {  # expect_fail NAME PATTERN COMMAND...: must exit non-zero, print PATTERN, and not crash
    local name=$1 pattern=$2
    shift 2
    "$@" >"$tmp/out" 2>&1
    local rc=$?
    if [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -q -- "$pattern" "$tmp/out"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1)); echo "FAIL $name (exit $rc)"; cat "$tmp/out"
    fi
}

check "help" "$agpt" --help
check "info" "$agpt" info
grep -q "backends: cpu" "$tmp/out" || { failed=$((failed + 1)); echo "FAIL info lists the backends"; }
if [ -f "$data/vit_block.safetensors" ]; then
    check "info on a model file" "$agpt" info "$data/vit_block.safetensors"
    grep -q "plain.attn.in_proj_weight" "$tmp/out" || { failed=$((failed + 1)); echo "FAIL info lists tensors"; cat "$tmp/out"; }
fi
check "bench ops quick" "$agpt" bench ops --device cpu --quick --iters 1 --json "$tmp/bench.json"
grep -q '"copy_gbps"' "$tmp/bench.json" && grep -q '"fraction"' "$tmp/bench.json" ||
    { failed=$((failed + 1)); echo "FAIL bench json"; cat "$tmp/bench.json"; }
grep -q "layernorm vit 1280" "$tmp/out" || { failed=$((failed + 1)); echo "FAIL bench table"; cat "$tmp/out"; }

expect_fail "unknown command" "unknown command" "$agpt" frobnicate
expect_fail "missing model file" "cannot open\|No such file\|not found" "$agpt" info "$tmp/none.safetensors"
printf 'garbage that is not a safetensors file' >"$tmp/bad.safetensors"
expect_fail "corrupt model file" "bad.safetensors" "$agpt" info "$tmp/bad.safetensors"
expect_fail "bench bad dtype" "dtype" "$agpt" bench ops --dtype f64
expect_fail "bench cpu bf16" "f32" "$agpt" bench ops --device cpu --dtype bf16
expect_fail "bench missing value" "needs a value" "$agpt" bench ops --iters

# agpt map on the small ImageBind-structured golden model (its goldens come from PyTorch).
ib="$data/imagebind"
if [ -f "$ib/model.safetensors" ]; then
    score_of() { sed -n 's/.*"score":\([0-9.eE+-]*\).*/\1/p' "$1" | head -n 1; }
    close_to() { awk -v a="$1" -v b="$2" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && d < 1e-4) }'; }
    check "map zero-shot" "$agpt" map --device cpu --model "$ib/model.safetensors" --class bottle -o "$tmp/maps" "$ib/query.png"
    close_to "$(score_of "$tmp/out")" 0.979187 && [ -s "$tmp/maps/query.heatmap.png" ] && [ -s "$tmp/maps/query.map.safetensors" ] ||
        { failed=$((failed + 1)); echo "FAIL map zero-shot output (want score 0.979187 and two files)"; cat "$tmp/out"; ls "$tmp/maps"; }
    "$agpt" info "$tmp/maps/query.map.safetensors" >"$tmp/info" 2>&1 && grep -q "anomaly_map .*F32\[224,224\]" "$tmp/info" ||
        { failed=$((failed + 1)); echo "FAIL raw map is F32[224,224]"; cat "$tmp/info"; }
    check "map few-shot" "$agpt" map --device cpu --model "$ib/model.safetensors" --reference "$ib/ref0.png" \
        --reference "$ib/ref1.png" -o "$tmp/maps" "$ib/query.png"
    close_to "$(score_of "$tmp/out")" 0.271330 && grep -q '"mode":"few-shot"' "$tmp/out" ||
        { failed=$((failed + 1)); echo "FAIL map few-shot score (want 0.271330)"; cat "$tmp/out"; }
    # An unknown class with no text encoder in the file: falls back to 'object' and says so.
    check "map unknown class" "$agpt" map --device cpu --model "$ib/model.safetensors" --class widget -o "$tmp/maps" "$ib/query.png"
    grep -q '"class":"object"' "$tmp/out" && grep -q "using 'object'" "$tmp/out" ||
        { failed=$((failed + 1)); echo "FAIL unknown class falls back to object"; cat "$tmp/out"; }
    # Two images of that class: both use 'object', and the warning comes once, not per image.
    check "map unknown class twice" "$agpt" map --device cpu --model "$ib/model.safetensors" --class widget \
        -o "$tmp/maps" "$ib/query.png" "$ib/ref0.png"
    [ "$(grep -c '"class":"object"' "$tmp/out")" = 2 ] && [ "$(grep -c "using 'object'" "$tmp/out")" = 1 ] ||
        { failed=$((failed + 1)); echo "FAIL unknown class: two images, one warning"; cat "$tmp/out"; }
    # Odd inputs go through (1x1, grayscale, 16-bit, palette, CMYK, a reference of another size); a bad file is
    # reported in its own JSON line and the others still come out.
    imgs="$data/images"
    printf 'not an image' >"$tmp/bad.png"
    "$agpt" map --device cpu --model "$ib/model.safetensors" --reference "$imgs/jpg_420.jpg" -o "$tmp/maps" \
        "$imgs/png_1x1.png" "$imgs/png_gray8.png" "$imgs/png_rgb16.png" "$imgs/png_pal4.png" "$imgs/jpg_cmyk.jpg" \
        "$tmp/bad.png" >"$tmp/out" 2>&1
    rc=$?
    [ $rc -eq 1 ] && [ "$(grep -c '"score"' "$tmp/out")" -eq 5 ] && grep -q '"error":".*bad.png' "$tmp/out" ||
        { failed=$((failed + 1)); echo "FAIL map over odd images (exit $rc)"; cat "$tmp/out"; }
    # Two inputs with the same file name keep separate outputs.
    mkdir -p "$tmp/a" "$tmp/b"
    cp "$ib/query.png" "$tmp/a/000.png"
    cp "$ib/ref0.png" "$tmp/b/000.png"
    check "map same file names" "$agpt" map --device cpu --model "$ib/model.safetensors" --class bottle \
        -o "$tmp/same" "$tmp/a/000.png" "$tmp/b/000.png"
    [ "$(ls "$tmp/same" | grep -c heatmap.png)" -eq 2 ] ||
        { failed=$((failed + 1)); echo "FAIL same file names overwrite each other"; ls "$tmp/same"; }
    # A 20000x20000 PNG (header and a first data chunk, 400 M pixels): refused before any pixel memory is allocated.
    printf '\x89\x50\x4e\x47\x0d\x0a\x1a\x0a\x00\x00\x00\x0d\x49\x48\x44\x52\x00\x00\x4e\x20\x00\x00\x4e\x20\x08\x02\x00\x00\x00\x6c\x12\xd1\x6e\x00\x00\x00\x0c\x49\x44\x41\x54\x78\x9c\x63\x60\xa0\x0c\x00\x00\x00\x40\x00\x01\xb7\x34\x7c\xef' >"$tmp/huge.png"
    "$agpt" map --device cpu --model "$ib/model.safetensors" --class bottle -o "$tmp/maps" "$tmp/huge.png" >"$tmp/out" 2>&1
    rc=$?
    [ $rc -eq 1 ] && grep -q '"error":".*20000' "$tmp/out" ||
        { failed=$((failed + 1)); echo "FAIL 20000x20000 PNG is refused clearly (exit $rc)"; cat "$tmp/out"; }
    expect_fail "map without model" "required" "$agpt" map -o "$tmp/maps" "$ib/query.png"
    expect_fail "map corrupt model" "bad.safetensors" "$agpt" map --device cpu \
        --model "$tmp/bad.safetensors" -o "$tmp/maps" "$ib/query.png"
    expect_fail "map bad reference" "reference" "$agpt" map --device cpu --model "$ib/model.safetensors" \
        --reference "$tmp/bad.png" -o "$tmp/maps" "$ib/query.png"
fi

# The whole AnomalyGPT on the small golden model (vision + LLaMA parts from tests/data, made into one file by
# make_test_model): map --ask must give PyTorch's greedy answer; chat must hold a conversation from a pipe.
if [ -n "$make_test_model" ] && [ -x "$make_test_model" ] && [ -f "$shared/llama-tokenizer.model" ] &&
    [ -f "$data/anomalygpt/parts.safetensors" ]; then
    tok="$shared/llama-tokenizer.model"
    ib="$data/imagebind"
    mkdir -p "$tmp/model"
    check "make_test_model" "$make_test_model" "$tmp/model" "$data"
    m="$tmp/model/model.safetensors"
    if [ -f "$m" ]; then
        # info shows every part of a complete model and its cached class names.
        check "info complete model" "$agpt" info "$m"
        for part in "vision encoder" "patch decoder" "prompt learner" "llama_proj" "LoRA (unmerged)" "language model"; do
            grep -q "^  $part  *[0-9]" "$tmp/out" || { failed=$((failed + 1)); echo "FAIL info lists part '$part'"; }
        done
        grep -q "cached class names (2): 'bottle' 'object'" "$tmp/out" ||
            { failed=$((failed + 1)); echo "FAIL info lists cached class names"; grep cached "$tmp/out"; }
        # The golden answer: greedy, 24 new tokens, the golden prompt as the question.
        check "map --ask" "$agpt" map --device cpu --model "$m" --tokenizer "$tok" --greedy --max-new 24 \
            --ask "$(cat "$tmp/model/prompt.txt")" -o "$tmp/askmaps" "$ib/query.png"
        grep -qF "\"answer\":$(cat "$tmp/model/answer.json")" "$tmp/out" && grep -q '"class":"bottle"' "$tmp/out" &&
            [ -s "$tmp/askmaps/query.heatmap.png" ] ||
            { failed=$((failed + 1)); echo "FAIL map --ask answer (want $(cat "$tmp/model/answer.json"))"; cat "$tmp/out"; }
        # Sampling (the web demo's defaults) answers each image.
        check "map --ask sampling" "$agpt" map --device cpu --model "$m" --tokenizer "$tok" --max-new 8 --seed 7 \
            --ask "Is there any anomaly?" -o "$tmp/askmaps" "$ib/query.png" "$ib/ref0.png"
        [ "$(grep -c '"answer":"' "$tmp/out")" -eq 2 ] ||
            { failed=$((failed + 1)); echo "FAIL map --ask sampling: two answers"; cat "$tmp/out"; }
        expect_fail "map --ask without tokenizer" "tokenizer" "$agpt" map --device cpu --model "$m" --ask "Why?" \
            -o "$tmp/askmaps" "$ib/query.png"
        # chat from a pipe: two turns, /reset, another image, a missing image (an error, the chat goes on), /quit.
        printf '%s\n' "$(cat "$tmp/model/prompt.txt")" "Where is the defect?" /reset "/image $ib/ref0.png" \
            "Is there any anomaly in the image?" "/image $tmp/none.png" "And now?" /bogus /quit "not asked" |
            "$agpt" chat --device cpu --model "$m" --tokenizer "$tok" --greedy --max-new 24 "$ib/query.png" \
                >"$tmp/chat.out" 2>"$tmp/chat.err"
        rc=$?
        if [ $rc -eq 0 ] && [ "$(wc -l <"$tmp/chat.out")" -eq 4 ] && [ "$(grep -c '^\[score' "$tmp/chat.err")" -eq 4 ] &&
            [ "$(head -n 1 "$tmp/chat.out")" = "$(cat "$tmp/model/answer.txt")" ] &&
            grep -q "none.png" "$tmp/chat.err" && grep -q "unknown command '/bogus'" "$tmp/chat.err" &&
            [ "$(grep -c 'history cleared' "$tmp/chat.err")" -eq 2 ] && ! grep -q '^> ' "$tmp/chat.out"; then
            passed=$((passed + 1))
        else
            failed=$((failed + 1)); echo "FAIL chat conversation (exit $rc)"; cat "$tmp/chat.out" "$tmp/chat.err"
        fi
        # A reference (few-shot map), a turn that outgrows the context (an error, then it goes on), EOF to end.
        long=$(for i in $(seq 300); do printf 'word '; done)
        printf '%s\n' "Is there any anomaly?" "$long" "/references clear" "Is there any anomaly?" |
            "$agpt" chat --device cpu --model "$m" --tokenizer "$tok" --greedy --max-new 8 --context 128 \
                --reference "$ib/ref1.png" "$ib/query.png" >"$tmp/chat.out" 2>"$tmp/chat.err"
        rc=$?
        if [ $rc -eq 0 ] && [ "$(wc -l <"$tmp/chat.out")" -eq 2 ] && grep -q "few-shot, 1 reference" "$tmp/chat.err" &&
            grep -q "error.*context" "$tmp/chat.err" && grep -q "class object" "$tmp/chat.err"; then
            passed=$((passed + 1))
        else
            failed=$((failed + 1)); echo "FAIL chat with a reference and a too-long turn (exit $rc)"
            cat "$tmp/chat.out" "$tmp/chat.err"
        fi
        # ---- careless use of agpt detect (issue 17) ----
        # stdout that cannot be written: an error and exit 1, not "processed".
        "$agpt" detect --device cpu --model "$m" --tokenizer "$tok" --verdict-only "$ib/query.png" >/dev/full 2>"$tmp/full.err"
        rc=$?
        if [ $rc -eq 1 ] && grep -q "cannot write the results to stdout" "$tmp/full.err"; then passed=$((passed + 1)); else
            failed=$((failed + 1)); echo "FAIL detect >/dev/full (exit $rc)"; cat "$tmp/full.err"; fi
        # An empty folder (UBSan caught qsort(NULL, 0) here): named, exit 2; with images elsewhere it is a note.
        mkdir -p "$tmp/emptydir/sub"
        expect_fail "detect empty folder" "emptydir holds no" "$agpt" detect --device cpu --model "$m" "$tmp/emptydir"
        check "detect empty folder among images" "$agpt" detect --device cpu --model "$m" --tokenizer "$tok" \
            --verdict-only "$tmp/emptydir" "$ib/query.png"
        grep -q "emptydir/sub holds no\|emptydir holds no" "$tmp/out" || { failed=$((failed + 1)); echo "FAIL empty folder note"; cat "$tmp/out"; }
        # The summary counts the verdicts (the random model answers neither Yes nor No: "unclear"), and each
        # line's total is its vision + prefill + generate + outputs.
        check "detect summary" "$agpt" detect --device cpu --model "$m" --tokenizer "$tok" --max-new 6 --out "$tmp/sumout" \
            "$ib/query.png" "$ib/ref0.png"
        grep -q "verdicts: 0 anomalous, 0 normal, 2 unclear" "$tmp/out" && [ "$(grep -c '"verdict":null' "$tmp/out")" -eq 2 ] ||
            { failed=$((failed + 1)); echo "FAIL detect summary counts"; cat "$tmp/out"; }
        grep '"ok":true' "$tmp/out" | python3 -c '
import json, sys
for line in sys.stdin:
    t = json.loads(line)["ms"]
    parts = t["vision"] + t["prefill"] + t["generate"] + t.get("outputs", 0)
    assert abs(t["total"] - parts) <= 0.05 * t["total"] + 0.5, (t, parts)
' && passed=$((passed + 1)) || { failed=$((failed + 1)); echo "FAIL ms.total adds up"; cat "$tmp/out"; }
        # --out that cannot be written: refused before the model loads (exit 2), nothing computed.
        mkdir -p "$tmp/ro" && chmod 555 "$tmp/ro"
        if [ "$(id -u)" != 0 ]; then
            expect_fail "detect unwritable --out" "may we write there" "$agpt" detect --device cpu --model "$m" --out "$tmp/ro" "$ib/query.png"
        fi
        printf 'x' >"$tmp/notadir"
        "$agpt" detect --device cpu --model "$m" --out "$tmp/notadir" "$ib/query.png" >"$tmp/out" 2>&1
        rc=$?
        [ $rc -eq 2 ] && grep -q "not a folder" "$tmp/out" && ! grep -q "vision 4 blocks" "$tmp/out" && passed=$((passed + 1)) ||
            { failed=$((failed + 1)); echo "FAIL detect --out is a file: exit 2 before the model loads (exit $rc)"; cat "$tmp/out"; }
        # A .pth given as the model: run agpt convert.
        printf 'PK\003\004 a torch.save zip' >"$tmp/model.pth"
        expect_fail "detect on a .pth" "run agpt convert first" "$agpt" detect --device cpu --model "$tmp/model.pth" "$ib/query.png"
        # Too long a class is refused; a long prompt is taken whole (no cut at 2047 bytes).
        expect_fail "detect class too long" "class" "$agpt" detect --model "$m" --class "$(printf 'x%.0s' $(seq 101))" "$ib/query.png"
        longq="$(printf 'Is this part of the long question number %d fine? ' $(seq 60))"
        check "detect long prompt" "$agpt" detect --device cpu --model "$m" --tokenizer "$tok" --max-new 2 --prompt "$longq" "$ib/query.png"
        # Every numeric option's bad values: usage errors (exit 2) before any model loads (the model path does not
        # even exist here).
        nomodel="$tmp/none.safetensors"
        bad_number() {  # bad_number SUBCOMMAND OPTION VALUE [ARGS...]
            local sub=$1 opt=$2 val=$3
            shift 3
            "$agpt" $sub "$opt" "$val" "$@" >"$tmp/num.out" 2>&1
            local rc=$?
            if [ $rc -eq 2 ] && grep -q -- "$opt" "$tmp/num.out"; then passed=$((passed + 1)); else
                failed=$((failed + 1)); echo "FAIL $sub $opt '$val' (exit $rc, want 2)"; cat "$tmp/num.out"; fi
        }
        for v in 1.5 4abc 0 -1 '' 100000; do bad_number detect --batch "$v" --model "$nomodel" "$ib/query.png"; done
        for v in 0 -1 100000 2x; do bad_number detect --threads "$v" --model "$nomodel" "$ib/query.png"; done
        for v in -5 1.5 abc; do bad_number detect --top-k "$v" --model "$nomodel" "$ib/query.png"; done
        for v in inf nan abc 0 -1 1e9; do bad_number detect --temperature "$v" --model "$nomodel" "$ib/query.png"; done
        for v in 0 1.5 -0.1 x; do bad_number detect --top-p "$v" --model "$nomodel" "$ib/query.png"; done
        for v in -5 4abc 1e3; do bad_number detect --seed "$v" --model "$nomodel" "$ib/query.png"; done
        for v in 0 2000 x; do bad_number detect --max-new "$v" --model "$nomodel" "$ib/query.png"; done
        for v in 10 1e5 x; do bad_number detect --context "$v" --model "$nomodel" "$ib/query.png"; done
        for v in 0 x; do bad_number map --threads "$v" --model "$nomodel" "$ib/query.png"; done
        for v in inf 0; do bad_number map --temperature "$v" --model "$nomodel" --ask "Why?" "$ib/query.png"; done
        for v in 0 x 1.5; do bad_number chat --max-new "$v" --model "$nomodel" "$ib/query.png"; done
        for v in x -3; do bad_number chat --top-k "$v" --model "$nomodel" "$ib/query.png"; done
        for v in 0 x; do bad_number bench --iters "$v" ops --quick; done
        for v in 0 x 1.5; do bad_number train --steps "$v" --model "$nomodel" --data "$tmp" --out "$tmp/t"; done
        for v in 0 x; do bad_number serve --max-batch "$v" --model "$nomodel"; done
        for v in -1 70000 x; do bad_number serve --port "$v" --model "$nomodel"; done  # 0: any free port
        for v in 0 x; do bad_number synth --count "$v" --class bottle --out "$tmp/s" "$ib/query.png"; done
        # Two runs at once on one --out, with maps that differ (two classes): every heatmap must come from the
        # same run as its map, and no temporary file may be left; repeated to catch the race.
        mkdir -p "$tmp/pair"
        for i in 1 2 3; do cp "$ib/query.png" "$tmp/pair/q$i.png"; cp "$ib/ref0.png" "$tmp/pair/r$i.png"; done
        run_pair() {  # run_pair CLASS OUT
            "$agpt" detect --device cpu --threads 1 --model "$m" --tokenizer "$tok" --verdict-only --class "$1" --out "$2" "$tmp/pair"
        }
        run_pair bottle "$tmp/pairA" >/dev/null 2>&1 && run_pair object "$tmp/pairB" >/dev/null 2>&1
        race_ok=1
        for r in $(seq 8); do
            rm -rf "$tmp/pairC"
            run_pair bottle "$tmp/pairC" >/dev/null 2>"$tmp/raceA.err" & pa=$!
            run_pair object "$tmp/pairC" >/dev/null 2>"$tmp/raceB.err" & pb=$!
            wait $pa; ra=$?
            wait $pb; rb=$?
            [ $ra -eq 0 ] && [ $rb -eq 0 ] || { race_ok=0; echo "race round $r: exits $ra $rb"; cat "$tmp/raceA.err" "$tmp/raceB.err"; }
            for f in "$tmp"/pair/*.png; do
                s=$(basename "$f" .png)
                if ! { cmp -s "$tmp/pairC/$s.heatmap.png" "$tmp/pairA/$s.heatmap.png" && cmp -s "$tmp/pairC/$s.map.safetensors" "$tmp/pairA/$s.map.safetensors"; } &&
                   ! { cmp -s "$tmp/pairC/$s.heatmap.png" "$tmp/pairB/$s.heatmap.png" && cmp -s "$tmp/pairC/$s.map.safetensors" "$tmp/pairB/$s.map.safetensors"; }; then
                    race_ok=0; echo "race round $r: $s has a heatmap and a map from different runs (or one is missing)"
                fi
            done
            [ -z "$(ls -A "$tmp/pairC" | grep -v '\.heatmap\.png$\|\.map\.safetensors$')" ] || { race_ok=0; echo "race round $r: leftovers"; ls -A "$tmp/pairC"; }
        done
        ! cmp -s "$tmp/pairA/q1.map.safetensors" "$tmp/pairB/q1.map.safetensors" || { race_ok=0; echo "the two classes' maps should differ"; }
        [ $race_ok -eq 1 ] && passed=$((passed + 1)) || { failed=$((failed + 1)); echo "FAIL two runs on one --out"; }
        # agpt chat with a history that outgrows the context: the oldest turns are dropped (and it says so).
        printf '%s\n' "Is there any anomaly in the image?" "Where is it exactly?" "Tell me more about it." "And the colour?" |
            "$agpt" chat --device cpu --model "$m" --tokenizer "$tok" --greedy --max-new 16 --context 140 "$ib/query.png" \
                >"$tmp/chatd.out" 2>"$tmp/chatd.err"
        rc=$?
        if [ $rc -eq 0 ] && [ "$(wc -l <"$tmp/chatd.out")" -eq 4 ] && grep -q "dropped" "$tmp/chatd.err" && ! grep -q "error" "$tmp/chatd.err"; then
            passed=$((passed + 1))
        else
            failed=$((failed + 1)); echo "FAIL chat drops the oldest turns (exit $rc)"; cat "$tmp/chatd.out" "$tmp/chatd.err"
        fi
        expect_fail "chat without any tokenizer" "embeds no LLaMA tokenizer" "$agpt" chat --device cpu --model "$m" "$ib/query.png"
        expect_fail "chat missing image" "none.png" "$agpt" chat --device cpu --model "$m" --tokenizer "$tok" \
            "$tmp/none.png" </dev/null
    fi
else
    echo "skipped map --ask and chat (needs make_test_model and $shared/llama-tokenizer.model)"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
