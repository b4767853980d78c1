#!/usr/bin/env bash
# The agpt command as a user runs it: help, info on a model file, bench ops (quick), and clear errors for
# bad input. Usage: tests/test_cli.sh path/to/agpt tests/data
set -u
agpt=$1
data=$2
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

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
