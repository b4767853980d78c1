#!/usr/bin/env bash
# Data-parallel agpt train through mpirun on loopback (runtime/comm.c, MPI backend), on the small complete model
# tests/make_test_model.c assembles and a tiny MVTec-AD tree from ../shared/data/images:
#   - 2 ranks of accum 2 give the same delta as 1 process of accum 4 (the same micro-batches): bit for bit, since
#     the trainer sums micro-step gradients in double (every tensor within 1e-6 is what must hold);
#   - a 2-rank run killed (SIGKILL) mid-way and resumed ends with the bytes of an uninterrupted 2-rank run;
#   - a rank that meets a broken image stops the job with one message naming the rank, within seconds;
#   - a rank killed with SIGKILL ends the job (mpirun) instead of leaving the other waiting;
#   - ZeRO-1 (--zero 1: AdamW's moments sharded, gradients reduce-scattered, parameters all-gathered) gives plain
#     data parallel's delta within 1e-6, and killed and resumed it ends with the bytes of its uninterrupted run;
#   - a rank that hangs (SIGSTOP) ends the job through the other's collective watchdog (--comm-timeout).
# Usage: tests/test_train_mpi.sh path/to/agpt tests/data shared/data path/to/make_test_model
set -u
agpt=$1
data=$2
shared=$3
make_test_model=$4
tok=$shared/llama-tokenizer.model
command -v mpirun >/dev/null || { echo "SKIP: no mpirun (tools/install-deps.sh installs openmpi-bin)"; exit 77; }
for f in "$tok" "$shared/images/brick.png" "$shared/images/grass.png"; do [ -f "$f" ] || { echo "SKIP: needs $f"; exit 77; }; done
passed=0
failed=0
tmp=$(mktemp -d)
trap 'kill -9 $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
ok() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $*"; fi; }
# Under AddressSanitizer (tools/test.sh's second pass) OpenMPI's own allocations at exit read as leaks: leak
# detection is off for the ranks only (the one-process runs below keep it).
mpi=(env "ASAN_OPTIONS=${ASAN_OPTIONS:-}:detect_leaks=0" mpirun --oversubscribe -np 2)
[ "$(id -u)" = 0 ] && mpi=(env "ASAN_OPTIONS=${ASAN_OPTIONS:-}:detect_leaks=0" mpirun --allow-run-as-root --oversubscribe -np 2)
export OMPI_MCA_btl=self,vader,tcp OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
mkdir -p "$tmp/model"
"$make_test_model" "$tmp/model" "$data" >/dev/null || { echo "FAIL make_test_model"; exit 1; }
m=$tmp/model/model.safetensors
mkdir -p "$tmp/mvtec/bottle/train/good"
for i in 0 1; do
    cp "$shared/images/brick.png" "$tmp/mvtec/bottle/train/good/brick$i.png"
    cp "$shared/images/grass.png" "$tmp/mvtec/bottle/train/good/grass$i.png"
done
common=(--model "$m" --tokenizer "$tok" --data "$tmp/mvtec" --steps 6 --warmup 2 --seed 3 --threads 1)

# Is this agpt built with MPI? (A build without it refuses to run under mpirun, naming the cause.)
if ! timeout 120 "${mpi[@]}" "$agpt" train "${common[@]}" --steps 1 --accum 1 --out "$tmp/probe" >"$tmp/probe.log" 2>&1; then
    if grep -q "built without MPI" "$tmp/probe.log"; then echo "SKIP: agpt was built without MPI"; exit 77; fi
    echo "FAIL: mpirun probe"; cat "$tmp/probe.log"; exit 1
fi
ok grep -q "x 2 ranks (MPI)" "$tmp/probe.log"

# 1 process x accum 4 against 2 ranks x accum 2.
"$agpt" train "${common[@]}" --accum 4 --out "$tmp/one" >"$tmp/one.log" 2>&1 || { echo "FAIL one process"; cat "$tmp/one.log"; }
timeout 300 "${mpi[@]}" "$agpt" train "${common[@]}" --accum 2 --out "$tmp/two" >"$tmp/two.log" 2>&1 ||
    { echo "FAIL two ranks"; cat "$tmp/two.log"; }
ok python3 "$(dirname "$0")/compare_safetensors.py" "$tmp/one/delta.safetensors" "$tmp/two/delta.safetensors" 1e-6
ok cmp -s "$tmp/one/delta.safetensors" "$tmp/two/delta.safetensors"
ok test "$(wc -l <"$tmp/two/log.jsonl")" -eq 6  # rank 0 alone writes the log

# killed_and_resumed MIN_LINES UNINTERRUPTED OUT ARGS...: a 2-rank run of ARGS saving every update is SIGKILLed (the
# whole job) once it has logged MIN_LINES updates, then resumed: it must end with UNINTERRUPTED's delta bytes.
killed_and_resumed() {
    local min=$1 want=$2 out=$3 pid lines
    shift 3
    "${mpi[@]}" "$agpt" train "${common[@]}" "$@" --ckpt-every 1 --out "$out" >"$out.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do
        [ -f "$out/log.jsonl" ] && [ "$(wc -l <"$out/log.jsonl")" -ge "$min" ] && break
        sleep 0.1
    done
    pkill -9 -f "agpt train.*$out" 2>/dev/null
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    lines=$(wc -l <"$out/log.jsonl")
    ok test "$lines" -ge "$min" -a "$lines" -lt 6
    timeout 300 "${mpi[@]}" "$agpt" train "${common[@]}" "$@" --resume "$out" >"$out.resume.log" 2>&1 ||
        { echo "FAIL resume of $out"; cat "$out.resume.log"; }
    ok cmp -s "$want/delta.safetensors" "$out/delta.safetensors"
}

# Killed mid-way and resumed: the bytes of the uninterrupted 2-rank run.
killed_and_resumed 2 "$tmp/two" "$tmp/killed" --accum 2

# ZeRO-1 against plain data parallel, and its kill + resume.
timeout 300 "${mpi[@]}" "$agpt" train "${common[@]}" --accum 2 --zero 1 --out "$tmp/zero" >"$tmp/zero.log" 2>&1 ||
    { echo "FAIL ZeRO-1"; cat "$tmp/zero.log"; }
ok grep -q "ZeRO-1" "$tmp/zero.log"
ok python3 "$(dirname "$0")/compare_safetensors.py" "$tmp/two/delta.safetensors" "$tmp/zero/delta.safetensors" 1e-6
killed_and_resumed 3 "$tmp/zero" "$tmp/zkilled" --accum 2 --zero 1
# A plain run's checkpoint does not resume under --zero 1 (other options).
timeout 120 "${mpi[@]}" "$agpt" train "${common[@]}" --accum 2 --zero 1 --resume "$tmp/two" >"$tmp/zmix.log" 2>&1
ok test $? -ne 0

# A broken image: the rank that reads it names the file, the other says which rank failed; both stop.
printf 'not an image' >"$tmp/mvtec/bottle/train/good/broken.png"
start=$(date +%s)
timeout 120 "${mpi[@]}" "$agpt" train "${common[@]}" --steps 4 --accum 4 --out "$tmp/broken" >"$tmp/broken.log" 2>&1
rc=$?
ok test $rc -ne 0 -a $rc -ne 124
ok grep -q "broken.png" "$tmp/broken.log"
ok grep -q "rank [01] of 2 failed" "$tmp/broken.log"
ok test $(($(date +%s) - start)) -lt 60
rm "$tmp/mvtec/bottle/train/good/broken.png"

# A rank killed outright: mpirun ends the job with an error instead of the other rank waiting forever.
"${mpi[@]}" "$agpt" train "${common[@]}" --steps 200 --accum 1 --out "$tmp/dead" >"$tmp/dead.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
    [ -f "$tmp/dead/log.jsonl" ] && [ "$(wc -l <"$tmp/dead/log.jsonl")" -ge 1 ] && break
    sleep 0.1
done
victim=$(pgrep -f "^$agpt train.*$tmp/dead" | tail -1)  # a rank, not mpirun
[ -n "$victim" ] && kill -9 "$victim"
start=$(date +%s)
timeout 60 tail --pid=$pid -f /dev/null
wait $pid
rc=$?
ok test $rc -ne 0
ok test $(($(date +%s) - start)) -lt 30

# A rank that hangs (stopped, not dead): the other's collective waits past --comm-timeout and ends the job.
"${mpi[@]}" "$agpt" train "${common[@]}" --steps 200 --accum 1 --val-images 0 --comm-timeout 10 --out "$tmp/hang" \
    >"$tmp/hang.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
    [ -f "$tmp/hang/log.jsonl" ] && [ "$(wc -l <"$tmp/hang/log.jsonl")" -ge 1 ] && break
    sleep 0.1
done
victim=$(pgrep -f "^$agpt train.*$tmp/hang" | tail -1)
[ -n "$victim" ] && kill -STOP "$victim"
start=$(date +%s)
timeout 90 tail --pid=$pid -f /dev/null
wait $pid
rc=$?
[ -n "$victim" ] && kill -9 "$victim" 2>/dev/null
ok test $rc -ne 0
ok grep -q "has waited 1[0-9] s for the other ranks" "$tmp/hang.log"
ok test $(($(date +%s) - start)) -lt 60

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
