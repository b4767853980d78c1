#!/usr/bin/env bash
# agpt synth as a user runs it: the files per sample, the same bytes for the same seed, other bytes for another
# seed, --params, and clear errors (exit 2 for usage, 1 for bad input) for bad options, images and JSON.
# Usage: tests/test_synth_cli.sh path/to/agpt tests/data
set -u
agpt=$1
data=$2
passed=0
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
img1=$data/images/png_rgb8.png
img2=$data/images/png_rgb8_adam7.png
ok() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $*"; fi; }
expect_rc() {  # expect_rc RC PATTERN COMMAND...: exits RC and says PATTERN
    local rc=$1 pattern=$2
    shift 2
    "$@" >"$tmp/log" 2>&1
    local got=$?
    if [ $got -eq "$rc" ] && grep -q -- "$pattern" "$tmp/log"; then passed=$((passed + 1)); else
        failed=$((failed + 1)); echo "FAIL (exit $got, wanted $rc, '$pattern'): $*"; cat "$tmp/log"; fi
}
for f in "$img1" "$img2"; do [ -f "$f" ] || { echo "FAIL: missing $f"; exit 1; }; done

expect_rc 0 "synth_NNNNN.png" "$agpt" synth --help
expect_rc 0 '"answer"' "$agpt" synth --class bottle --seed 7 --count 3 --out "$tmp/a" "$img1" "$img2"
for i in 00000 00001 00002; do
    for s in .png _mask.png _label.png .json; do ok test -s "$tmp/a/synth_$i$s"; done
done
ok grep -q '"normal_conversation"' "$tmp/a/synth_00000.json"
ok grep -q 'This is a photo of a bottle' "$tmp/a/synth_00000.json"
"$agpt" synth --class bottle --seed 7 --count 3 --out "$tmp/b" "$img1" "$img2" >/dev/null 2>&1
"$agpt" synth --class bottle --seed 8 --count 3 --out "$tmp/c" "$img1" "$img2" >/dev/null 2>&1
ok cmp -s "$tmp/a/synth_00002.png" "$tmp/b/synth_00002.png"
ok cmp -s "$tmp/a/synth_00002.json" "$tmp/b/synth_00002.json"
ok bash -c "! cmp -s '$tmp/a/synth_00002.png' '$tmp/c/synth_00002.png'"
printf '{"num_patches": 1, "description": "A photo of a widget."}' >"$tmp/p.json"
expect_rc 0 '"answer"' "$agpt" synth --class widget --params "$tmp/p.json" --count 1 --out "$tmp/d" "$img1"
ok grep -q 'A photo of a widget. Is there any anomaly in the image?' "$tmp/d/synth_00000.json"
printf '{"cutpaste": true}' >"$tmp/cp.json"
expect_rc 0 '"answer"' "$agpt" synth --class wood --params "$tmp/cp.json" --count 2 --out "$tmp/cp" "$img1" "$img2"
expect_rc 0 "not a reference class" "$agpt" synth --class widget --count 1 --out "$tmp/e" "$img1"

expect_rc 2 "needs an integer" "$agpt" synth --class bottle --count 0 --out "$tmp/f" "$img1"
expect_rc 2 "needs an integer" "$agpt" synth --class bottle --count 2x --out "$tmp/f" "$img1"
expect_rc 2 "needs an integer" "$agpt" synth --class bottle --count 1 --seed -1 --out "$tmp/f" "$img1"
expect_rc 2 "unknown option" "$agpt" synth --class bottle --count 1 --bogus --out "$tmp/f" "$img1"
expect_rc 2 "needs --class" "$agpt" synth --count 1 --out "$tmp/f" "$img1"
expect_rc 2 "needs --class" "$agpt" synth --class bottle --count 1 --out "$tmp/f"
printf 'not an image' >"$tmp/bad.png"
expect_rc 1 "error" "$agpt" synth --class bottle --count 1 --out "$tmp/g" "$tmp/bad.png"
expect_rc 1 "error" "$agpt" synth --class bottle --count 1 --out "$tmp/g" "$tmp/missing.png"
printf '{"num_patches": 5}' >"$tmp/bad.json"
expect_rc 1 "num_patches" "$agpt" synth --class bottle --params "$tmp/bad.json" --count 1 --out "$tmp/g" "$img1"
printf '{"width_bounds": 1}' >"$tmp/typo.json"
expect_rc 1 "unknown key" "$agpt" synth --class bottle --params "$tmp/typo.json" --count 1 --out "$tmp/g" "$img1"
expect_rc 1 "error" "$agpt" synth --class bottle --count 1 --out /proc/nonexistent/dir "$img1"

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
