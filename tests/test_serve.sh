#!/usr/bin/env bash
# agpt serve on loopback with the small complete model that tests/make_test_model.c assembles: every endpoint and
# error status (tests/serve_check.py api), answers equal to agpt detect's, a bounded load + bad-request run, the web
# page in headless Chromium over WebDriver (skipped inside when chromium/chromium-driver are missing), SIGTERM with
# work in flight, banks persisting across a restart, the API key, a full queue (429), the hot folder, and
# agpt detect --watch (the hot folder without the server: lines equal agpt detect's, SIGINT/SIGTERM exit 0).
# serve_check.py needs python3's standard library only: the reference venv's python when it exists, else python3
# (AGPT_TEST_PYTHON=... picks one).
# Usage: tests/test_serve.sh path/to/agpt tests/data shared/data path/to/make_test_model [screenshot.png]
set -u
agpt=$1
data=$2
shared=$3
make_test_model=$4
shot=${5:-$(dirname "$agpt")/serve-page.png}
here=$(cd "$(dirname "$0")" && pwd)
py=${AGPT_TEST_PYTHON:-$here/reference/.venv/bin/python}
[ -n "${AGPT_TEST_PYTHON:-}" ] || [ -x "$py" ] || py=python3
if ! command -v "$py" >/dev/null || ! command -v curl >/dev/null; then
    echo "SKIP: needs python3 and curl"
    exit 77
fi
export OMP_WAIT_POLICY=passive  # as README "Serving" advises for the CPU
tok="$shared/llama-tokenizer.model"
if [ ! -f "$tok" ] || [ ! -f "$data/anomalygpt/parts.safetensors" ] || [ ! -x "$make_test_model" ]; then
    echo "SKIP: needs $tok, $data/anomalygpt/parts.safetensors and make_test_model"
    exit 77
fi
passed=0
failed=0
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
    rm -rf "$tmp"
}
trap cleanup EXIT
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }

mkdir -p "$tmp/model"
"$make_test_model" "$tmp/model" "$data" >/dev/null || { echo "FAIL make_test_model"; exit 1; }
m="$tmp/model/model.safetensors"
ib="$data/imagebind"
common=(--device cpu --model "$m" --tokenizer "$tok" --max-new 24)
images=("$ib/query.png" "$ib/ref0.png" "$ib/ref1.png" "$data/images/jpg_420.jpg" "$data/images/png_gray8.png")

# What agpt detect answers for each image: the server must answer the same.
"$agpt" detect "${common[@]}" "${images[@]}" >"$tmp/detect.jsonl" 2>/dev/null &&
    "$agpt" detect "${common[@]}" --class bottle "$ib/query.png" >"$tmp/detect_class.jsonl" 2>/dev/null &&
    "$agpt" detect "${common[@]}" --reference "$ib/ref0.png" --reference "$ib/ref1.png" "$ib/query.png" \
        >"$tmp/detect_refs.jsonl" 2>/dev/null || { echo "FAIL agpt detect"; exit 1; }
"$py" - "$tmp" <<'EOF' || { echo "FAIL expected answers"; exit 1; }
import json, sys
t = sys.argv[1]
out = {}
for suffix, f in (("", "detect.jsonl"), ("#bottle", "detect_class.jsonl"), ("#refs", "detect_refs.jsonl")):
    for line in open(f"{t}/{f}"):
        j = json.loads(line)
        out[j["image"] + suffix] = j
json.dump(out, open(f"{t}/expected.json", "w"))
EOF

# start_server NAME ARGS...: starts agpt serve on a free port; sets $url and $pid.
start_server() {
    local name=$1
    shift
    rm -f "$tmp/$name.port"
    "$agpt" serve "${common[@]}" --port 0 --port-file "$tmp/$name.port" "$@" >"$tmp/$name.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do
        [ -s "$tmp/$name.port" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -s "$tmp/$name.port" ]; then
        bad "server $name did not start"
        cat "$tmp/$name.log"
        return 1
    fi
    url="http://127.0.0.1:$(cat "$tmp/$name.port")"
}

# stop_server: SIGTERM, then the exit status must be 0 and the log say it stopped.
stop_server() {
    kill -TERM "$pid"
    wait "$pid"
    local rc=$?
    if [ $rc -eq 0 ] && grep -q "agpt serve: stopped" "$1"; then ok; else bad "clean shutdown (exit $rc)"; cat "$1"; fi
}

run_py() {  # run_py NAME ARGS...: a serve_check.py part; 77 counts as skipped
    local name=$1
    shift
    "$py" "$here/serve_check.py" "$@" >"$tmp/py.out" 2>&1
    local rc=$?
    grep -E "^(load:|SKIP|FAIL|[0-9]+ passed)" "$tmp/py.out" | sed "s/^/  $name: /"
    if [ $rc -eq 0 ]; then ok; elif [ $rc -eq 77 ]; then echo "  $name skipped"; else
        bad "$name (exit $rc)"
        grep -q "^FAIL" "$tmp/py.out" || tail -n 20 "$tmp/py.out"
    fi
}

# Usage errors are exit 2 before any model loads; a model without the LLM is a clear error.
for args in "--port abc" "--port 70000" "--max-batch 0" "--batch-wait-ms -1" "--queue 1.5" "--sort" "--frobnicate"; do
    # shellcheck disable=SC2086
    "$agpt" serve --model "$m" $args >"$tmp/out" 2>&1
    [ $? -eq 2 ] && ok || { bad "usage error for '$args'"; cat "$tmp/out"; }
done
"$agpt" serve --model "$m" --port abc 2>&1 | grep -q "needs an integer in \[0, 65535\], not 'abc'" && ok || bad "--port message"
"$agpt" serve --device cpu --model "$ib/model.safetensors" --port 0 >"$tmp/out" 2>&1
rc=$?
[ $rc -eq 1 ] && grep -q "language model" "$tmp/out" && ok || { bad "model without the LLM (exit $rc)"; cat "$tmp/out"; }

# The main server: the API, the load, the page, then SIGTERM with requests in flight.
banks="$tmp/banks"
if start_server main --max-batch 4 --batch-wait-ms 5 --timeout 3 --bank-dir "$banks"; then
    run_py api api "$url" "$tmp/expected.json" "$ib"
    run_py load load "$url" "$tmp/expected.json" "$pid" 6
    run_py page page "$url" "$tmp/expected.json" "$ib/query.png" "$shot"
    # A bank that must survive a restart.
    code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -F a=@"$ib/ref0.png" -F b=@"$ib/ref1.png" "$url/v1/banks/kept")
    [ "$code" = 201 ] && [ -f "$banks/kept/ref_00.png" ] && [ -f "$banks/kept/ref_01.png" ] && ok || bad "bank persisted ($code)"
    "$py" "$here/serve_check.py" drain "$url" "$ib/query.png" "$pid" >"$tmp/py.out" 2>&1 && ok ||
        { bad "drain"; cat "$tmp/py.out"; }
    wait "$pid"
    rc=$?
    [ $rc -eq 0 ] && grep -q "agpt serve: stopped" "$tmp/main.log" && ok || { bad "SIGTERM exit $rc"; tail "$tmp/main.log"; }
fi
if start_server restarted --bank-dir "$banks"; then
    curl -s "$url/v1/banks/kept" | grep -q '"images":2' && ok || bad "bank loaded after a restart"
    curl -s -F image=@"$ib/query.png" -F bank=kept "$url/v1/inspect" >"$tmp/out"
    want=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]['score'])" "$tmp/expected.json" "$ib/query.png#refs")
    got=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['score'])" "$tmp/out")
    "$py" -c "import sys; sys.exit(abs(float(sys.argv[1]) - float(sys.argv[2])) > 1e-6)" "$got" "$want" && ok ||
        bad "restarted bank's score $got != detect --reference $want"
    stop_server "$tmp/restarted.log"
fi

# A batch that fails as a whole (one prompt too long for a short context) is retried one by one.
if start_server batch --context 128 --max-batch 4 --batch-wait-ms 3000 --bank-dir "$tmp/banks4"; then
    run_py retry retry "$url" "$tmp/expected.json" "$ib/query.png"
    stop_server "$tmp/batch.log"
fi

# The API key and a full queue.
if start_server keyed --api-key s3cret --queue 1 --max-batch 1 --batch-wait-ms 0 --bank-dir "$tmp/banks2"; then
    [ "$(curl -s -o "$tmp/out" -w '%{http_code}' "$url/v1/banks")" = 401 ] && grep -q '"status":401' "$tmp/out" && ok || bad "401 without a key"
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer wrong' "$url/v1/banks")" = 401 ] && ok || bad "401 wrong key"
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer s3cret' "$url/v1/banks")" = 200 ] && ok || bad "200 with the key"
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'X-API-Key: s3cret' "$url/metrics")" = 200 ] && ok || bad "X-API-Key"
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/healthz")" = 200 ] && ok || bad "healthz needs no key"
    for i in $(seq 12); do
        curl -s -D "$tmp/h$i" -o "$tmp/b$i" -H 'Authorization: Bearer s3cret' -H 'Content-Type: image/png' \
            --data-binary @"$ib/query.png" "$url/v1/inspect" &
    done
    wait $(jobs -p | grep -v "^$pid$") 2>/dev/null
    n429=$(grep -l "^HTTP/1.1 429" "$tmp"/h* | wc -l)
    n200=$(grep -l "^HTTP/1.1 200" "$tmp"/h* | wc -l)
    retry=$(grep -il "^Retry-After: 1" "$tmp"/h* | wc -l)
    [ "$n429" -ge 1 ] && [ "$n200" -ge 1 ] && [ "$retry" -eq "$n429" ] && [ $((n429 + n200)) -eq 12 ] && ok ||
        bad "full queue: $n200 x 200, $n429 x 429 ($retry with Retry-After)"
    stop_server "$tmp/keyed.log"
fi

# The hot folder: a file there at start, one copied in, one renamed in, a corrupt one; other names ignored.
hot="$tmp/hot"
mkdir -p "$hot"
cp "$ib/query.png" "$hot/a_first.png"
if start_server hot --watch "$hot" --sort --watch-log "$tmp/hot.jsonl" --bank-dir "$tmp/banks3"; then
    cp "$ib/ref0.png" "$hot/b_copied.png"
    cp "$data/images/jpg_420.jpg" "$hot/.c_renamed.jpg" && mv "$hot/.c_renamed.jpg" "$hot/c_renamed.jpg"
    printf 'not an image' >"$hot/d_corrupt.png"
    printf 'notes' >"$hot/readme.txt"
    for _ in $(seq 100); do
        [ "$(wc -l <"$tmp/hot.jsonl" 2>/dev/null || echo 0)" -ge 4 ] && break
        sleep 0.1
    done
    "$py" - "$tmp/hot.jsonl" "$tmp/expected.json" "$hot" "$ib" "$data/images" <<'EOF' && ok || bad "hot folder lines"
import json, os, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
expected = json.load(open(sys.argv[2]))
hot, ib, imgs = sys.argv[3:6]
by = {os.path.basename(l["image"]): l for l in lines}
want = {"a_first.png": f"{ib}/query.png", "b_copied.png": f"{ib}/ref0.png", "c_renamed.jpg": f"{imgs}/jpg_420.jpg"}
ok = len(lines) == 4 and set(by) == set(want) | {"d_corrupt.png"}
for name, src in want.items():
    l, e = by.get(name, {}), expected[src]
    ok = ok and l.get("ok") is True and l.get("answer") == e["answer"] and abs(l["score"] - e["score"]) < 1e-6
    ok = ok and "session" not in l and ("moved_to" in l) == (e["verdict"] is not None)
ok = ok and by.get("d_corrupt.png", {}).get("ok") is False and "not a PNG or JPEG" in by["d_corrupt.png"].get("error", "")
if not ok:
    print(json.dumps(lines, indent=1)[:3000])
sys.exit(0 if ok else 1)
EOF
    stop_server "$tmp/hot.log"
fi

# agpt detect --watch: the same hot folder without the server, each line agpt detect's own for that image.
for args in "--watch $tmp/nowhere" "--watch $tmp --batch 2" "--sort" "--watch-log $tmp/x.jsonl"; do
    # shellcheck disable=SC2086
    "$agpt" detect --model "$m" $args >"$tmp/out" 2>&1
    [ $? -eq 2 ] && ok || { bad "detect usage error for '$args'"; cat "$tmp/out"; }
done
"$agpt" detect --model "$m" --watch "$tmp" "$ib/query.png" >"$tmp/out" 2>&1
[ $? -eq 2 ] && grep -q "takes no images" "$tmp/out" && ok || { bad "detect --watch with images listed"; cat "$tmp/out"; }
dhot="$tmp/dhot"
mkdir -p "$dhot"
cp "$ib/query.png" "$dhot/a_first.png"
"$agpt" detect "${common[@]}" --watch "$dhot" --sort >"$tmp/dwatch.jsonl" 2>"$tmp/dwatch.log" &
dpid=$!
pids+=("$dpid")
for _ in $(seq 100); do [ -s "$tmp/dwatch.jsonl" ] && break; sleep 0.1; done
cp "$ib/ref0.png" "$dhot/b_copied.png"
cp "$data/images/jpg_420.jpg" "$dhot/.c_renamed.jpg" && mv "$dhot/.c_renamed.jpg" "$dhot/c_renamed.jpg"
printf 'not an image' >"$dhot/d_corrupt.png"
printf 'notes' >"$dhot/readme.txt"
for _ in $(seq 100); do [ "$(wc -l <"$tmp/dwatch.jsonl")" -ge 4 ] && break; sleep 0.1; done
kill -INT "$dpid"
wait "$dpid"
rc=$?
[ $rc -eq 0 ] && grep -q "agpt detect: stopped watching .*: 4 image(s).*, 1 failed" "$tmp/dwatch.log" && ok ||
    { bad "detect --watch: SIGINT exit $rc"; cat "$tmp/dwatch.log"; }
"$py" - "$tmp/dwatch.jsonl" "$tmp/detect.jsonl" "$dhot" "$ib" "$data/images" <<'EOF' && ok || bad "detect --watch lines"
import json, os, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
detect = {j["image"]: j for j in map(json.loads, open(sys.argv[2]))}
hot, ib, imgs = sys.argv[3:6]
by = {os.path.basename(l["image"]): l for l in lines}
want = {"a_first.png": f"{ib}/query.png", "b_copied.png": f"{ib}/ref0.png", "c_renamed.jpg": f"{imgs}/jpg_420.jpg"}
ok = [os.path.basename(l["image"]) for l in lines] == ["a_first.png", "b_copied.png", "c_renamed.jpg", "d_corrupt.png"]
strip = lambda j: {k: v for k, v in j.items() if k not in ("image", "ms", "moved_to")}
for name, src in want.items():
    got, e = by.get(name, {}), detect[src]
    ok = ok and strip(got) == strip(e) and got["image"] == f"{hot}/{name}" and set(got["ms"]) == set(e["ms"])
    # --sort: a verdict moves the file into ok/ or ng/; a null verdict (this random model's) leaves it in place.
    sub = {"normal": "ok", "anomalous": "ng"}.get(e["verdict"])
    ok = ok and got.get("moved_to") == (f"{hot}/{sub}/{name}" if sub else None)
    ok = ok and os.path.exists(got.get("moved_to") or f"{hot}/{name}")
ok = ok and by.get("d_corrupt.png", {}).get("ok") is False and "not a PNG or JPEG" in by["d_corrupt.png"].get("error", "")
ok = ok and os.path.exists(f"{hot}/d_corrupt.png") and os.path.exists(f"{hot}/readme.txt")
if not ok:
    print(json.dumps(lines, indent=1)[:3000])
sys.exit(0 if ok else 1)
EOF
# --watch-log and SIGTERM: the lines go to the file, none to stdout.
dhot2="$tmp/dhot2"
mkdir -p "$dhot2"
"$agpt" detect "${common[@]}" --watch "$dhot2" --watch-log "$tmp/dwatch2.jsonl" >"$tmp/dwatch2.out" 2>"$tmp/dwatch2.log" &
dpid=$!
pids+=("$dpid")
for _ in $(seq 100); do grep -q "agpt detect: watching" "$tmp/dwatch2.log" && break; sleep 0.1; done
cp "$ib/ref1.png" "$dhot2/e.png"
for _ in $(seq 100); do [ -s "$tmp/dwatch2.jsonl" ] && break; sleep 0.1; done
kill -TERM "$dpid"
wait "$dpid"
rc=$?
want=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]['answer'])" "$tmp/expected.json" "$ib/ref1.png")
got=$("$py" -c "import json,sys; l=[json.loads(x) for x in open(sys.argv[1])]; print(l[0]['answer'] if len(l) == 1 else '')" \
    "$tmp/dwatch2.jsonl" 2>/dev/null)
[ $rc -eq 0 ] && [ ! -s "$tmp/dwatch2.out" ] && [ -n "$got" ] && [ "$got" = "$want" ] && ok ||
    { bad "detect --watch-log, SIGTERM (exit $rc)"; cat "$tmp/dwatch2.log"; }

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
