"""Client side of tests/test_serve.sh: drives a running `agpt serve` over loopback.

  serve_check.py api   URL EXPECTED.json IMAGES_DIR      every endpoint and error status
  serve_check.py load  URL EXPECTED.json PID SECONDS     concurrent clients mixing valid and bad requests
  serve_check.py page  URL EXPECTED.json IMAGE SHOT.png  the web page in headless Chromium over WebDriver (77: no browser)
  serve_check.py drain URL IMAGE PID                     SIGTERM with requests in flight
  serve_check.py retry URL EXPECTED.json IMAGE           a failed batch retried one by one (see cmd_retry)

EXPECTED.json maps an image path to agpt detect's JSON line for it (same model, --max-new as the server).
Prints one line per check and ends with "N passed, M failed"; exit 0 = passed, 1 = failed.
"""
import http.client
import json
import os
import random
import signal
import socket
import statistics
import sys
import threading
import time
import urllib.parse

passed = 0
failed = 0
lock = threading.Lock()


def check(name, ok, detail=""):
    global passed, failed
    with lock:
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {name} {detail}", flush=True)


def finish():
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(0 if failed == 0 else 1)


class Server:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port

    def request(self, method, path, body=None, headers=None, timeout=30):
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
            return r.status, dict(r.getheaders()), data
        finally:
            c.close()

    def json(self, method, path, body=None, headers=None):
        status, h, data = self.request(method, path, body, headers)
        try:
            return status, h, json.loads(data)
        except ValueError:
            return status, h, None


def multipart(fields, files):
    """fields: [(name, text)], files: [(name, filename, bytes)] -> (body, content type)."""
    b = "----agpt%016x" % random.getrandbits(64)
    out = bytearray()
    for k, v in fields:
        out += f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
    for k, fn, data in files:
        out += (f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{fn}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{b}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={b}"


def same_answer(got, want):
    """The server's inspection equals agpt detect's line: verdict, answer text, class, mode, score."""
    if got is None or not got.get("ok"):
        return False, f"not ok: {got}"
    for k in ("verdict", "answer", "mode"):
        if got.get(k) != want.get(k):
            return False, f"{k}: {got.get(k)!r} != {want.get(k)!r}"
    if "class" in want and got.get("class") != want["class"]:
        return False, f"class {got.get('class')} != {want['class']}"
    if abs(got["score"] - want["score"]) > 1e-6:
        return False, f"score {got['score']} != {want['score']}"
    return True, ""


def load_expected(path):
    with open(path) as f:
        return json.load(f)


def image_type(data):
    return "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"


# ---- api ---------------------------------------------------------------------------------------------------

def cmd_api(url, expected_path, images_dir):
    s = Server(url)
    expected = load_expected(expected_path)
    q_path = os.path.join(images_dir, "query.png")
    query = open(q_path, "rb").read()
    ref0 = open(os.path.join(images_dir, "ref0.png"), "rb").read()
    ref1 = open(os.path.join(images_dir, "ref1.png"), "rb").read()

    st, _, j = s.json("GET", "/healthz")
    check("healthz", st == 200 and j == {"status": "ok"}, f"{st} {j}")
    st, _, j = s.json("GET", "/readyz")
    check("readyz", st == 200 and j.get("ready") is True, f"{st} {j}")
    st, h, page = s.request("GET", "/")
    check("page served", st == 200 and h.get("Content-Type", "").startswith("text/html") and b"<form" in page
          and b"http://" not in page and b"https://" not in page, "(no external resources)")

    # Raw body and multipart give agpt detect's answer.
    st, _, j = s.json("POST", "/v1/inspect", query, {"Content-Type": "image/png"})
    ok, why = same_answer(j, expected[q_path])
    check("inspect raw body = agpt detect", st == 200 and ok, f"{st} {why}")
    check("inspect timings per stage", j and all(k in j.get("ms", {}) for k in
                                                 ("decode_image", "queue", "vision", "prefill", "generate", "total")))
    session = j.get("session") if j else None
    body, ct = multipart([], [("image", "query.png", query)])
    st, _, j = s.json("POST", "/v1/inspect?map=f32", body, {"Content-Type": ct})
    ok, why = same_answer(j, expected[q_path])
    import base64
    import struct
    m = j.get("map", {}) if j else {}
    raw = base64.b64decode(m.get("data") or "")
    vals = struct.unpack(f"<{len(raw) // 4}f", raw) if raw else []
    check("inspect multipart, map=f32", st == 200 and ok and m.get("format") == "f32" and
          len(vals) == m.get("width", 0) * m.get("height", 0) > 0 and abs(max(vals) - j["score"]) < 1e-6, why)
    body, ct = multipart([("map", "png")], [("image", "query.png", query)])
    st, _, j = s.json("POST", "/v1/inspect", body, {"Content-Type": ct})
    png = base64.b64decode((j or {}).get("map", {}).get("data") or "")
    check("inspect map=png (form field)", st == 200 and png[:4] == b"\x89PNG", f"{st}")
    cls_key = q_path + "#bottle"
    st, _, j = s.json("POST", "/v1/inspect?class=bottle", query, {"Content-Type": "image/png"})
    ok, why = same_answer(j, expected[cls_key])
    check("inspect class=bottle = agpt detect --class bottle", st == 200 and ok, why)
    st, _, j = s.json("POST", "/v1/inspect?verdict_only=1", query, {"Content-Type": "image/png"})
    check("inspect verdict_only", st == 200 and "answer" not in j and "session" not in j and
          j.get("verdict") == expected[q_path]["verdict"] and j["ms"]["tokens"] <= 3, f"{j}")
    # Few-shot: references in the request, and the same references as a bank.
    fs_key = q_path + "#refs"
    body, ct = multipart([], [("image", "query.png", query), ("reference", "r0.png", ref0), ("reference", "r1.png", ref1)])
    st, _, j = s.json("POST", "/v1/inspect", body, {"Content-Type": ct})
    ok, why = same_answer(j, expected[fs_key])
    check("inspect with references = agpt detect --reference", st == 200 and ok and j["mode"] == "few-shot", why)
    body, ct = multipart([], [("a", "r0.png", ref0), ("b", "r1.png", ref1)])
    st, _, j = s.json("PUT", "/v1/banks/bottle-line_1", body, {"Content-Type": ct})
    check("bank put", st == 201 and j == {"name": "bottle-line_1", "images": 2, "created": True}, f"{st} {j}")
    st, _, j = s.json("PUT", "/v1/banks/bottle-line_1", body, {"Content-Type": ct})
    check("bank put again replaces", st == 200 and j.get("created") is False, f"{st} {j}")
    st, _, j = s.json("GET", "/v1/banks")
    check("bank list", st == 200 and {"name": "bottle-line_1", "images": 2} in j["banks"], f"{j}")
    st, _, j = s.json("GET", "/v1/banks/bottle-line_1")
    check("bank get", st == 200 and j["images"] == 2, f"{st} {j}")
    st, _, j = s.json("POST", "/v1/inspect?bank=bottle-line_1", query, {"Content-Type": "image/png"})
    ok, why = same_answer(j, expected[fs_key])
    check("inspect with a bank = agpt detect --reference", st == 200 and ok and j.get("bank") == "bottle-line_1", why)

    # Follow-up questions reuse the session's cached rows.
    hdr = {"Content-Type": "application/json"}
    st, _, j = s.json("POST", f"/v1/sessions/{session}/ask", json.dumps({"question": "Where is the anomaly?"}), hdr)
    check("ask", st == 200 and j.get("turn") == 2 and isinstance(j.get("answer"), str), f"{st} {j}")
    st, _, j = s.json("POST", f"/v1/sessions/{session}/ask", json.dumps({"question": "Why?", "max_new": 4}), hdr)
    check("ask again reuses the KV cache", st == 200 and j.get("turn") == 3 and j["reused_tokens"] > 0 and
          j["ms"]["tokens"] <= 4, f"{st} {j}")
    st, _, j = s.json("GET", f"/v1/sessions/{session}")
    check("session get", st == 200, f"{st}")

    # Errors: JSON with the right status, never 500.
    def expect(name, status, method, path, body=None, headers=None, retry=False):
        st, h, j = s.json(method, path, body, headers)
        ok = st == status and isinstance(j, dict) and isinstance(j.get("error"), str) and j.get("status") == status
        if retry:
            ok = ok and "Retry-After" in h
        check(f"error {status}: {name}", ok, f"got {st} {j}")

    expect("unknown path", 404, "GET", "/v2/nothing")
    expect("wrong method", 405, "DELETE", "/v1/inspect")
    expect("text/plain body", 415, "POST", "/v1/inspect", b"hello", {"Content-Type": "text/plain"})
    expect("corrupt PNG", 400, "POST", "/v1/inspect", query[:8] + bytes(200) + query[208:], {"Content-Type": "image/png"})
    expect("truncated PNG", 400, "POST", "/v1/inspect", query[: len(query) // 2], {"Content-Type": "image/png"})
    jpg = open(os.path.join(images_dir, "..", "images", "jpg_420.jpg"), "rb").read()
    expect("truncated JPEG", 400, "POST", "/v1/inspect", jpg[:300], {"Content-Type": "image/jpeg"})
    expect("empty body", 400, "POST", "/v1/inspect", b"", {"Content-Type": "image/png"})
    expect("bad map option", 400, "POST", "/v1/inspect?map=gif", query, {"Content-Type": "image/png"})
    expect("bad verdict_only", 400, "POST", "/v1/inspect?verdict_only=maybe", query, {"Content-Type": "image/png"})
    expect("bad class", 400, "POST", "/v1/inspect?class=%3Cscript%3E", query, {"Content-Type": "image/png"})
    expect("unknown bank", 404, "POST", "/v1/inspect?bank=nope", query, {"Content-Type": "image/png"})
    body, ct = multipart([], [("image", "q.png", query), ("reference", "r.png", ref0)])
    expect("bank and references", 400, "POST", "/v1/inspect?bank=bottle-line_1", body, {"Content-Type": ct})
    body, ct = multipart([("class", "bottle")], [])
    expect("multipart without image", 400, "POST", "/v1/inspect", body, {"Content-Type": ct})
    expect("malformed multipart", 400, "POST", "/v1/inspect", b"--x\r\nnot a part",
           {"Content-Type": "multipart/form-data; boundary=x"})
    expect("bank name escaping the folder", 400, "PUT", "/v1/banks/..%2F..%2Fetc", ref0, {"Content-Type": "image/png"})
    expect("bank name with a dot", 400, "PUT", "/v1/banks/a.b", ref0, {"Content-Type": "image/png"})
    expect("bank of a corrupt image", 400, "PUT", "/v1/banks/broken", ref0[:100], {"Content-Type": "image/png"})
    expect("bank without images", 400, "PUT", "/v1/banks/empty", b"", {"Content-Type": "image/png"})
    expect("unknown bank get", 404, "GET", "/v1/banks/nope")
    expect("unknown bank delete", 404, "DELETE", "/v1/banks/nope")
    expect("ask invalid JSON", 400, "POST", f"/v1/sessions/{session}/ask", b"{not json", hdr)
    expect("ask without question", 400, "POST", f"/v1/sessions/{session}/ask", b'{"q": 1}', hdr)
    expect("ask bad max_new", 400, "POST", f"/v1/sessions/{session}/ask", b'{"question": "x", "max_new": 1.5}', hdr)
    expect("ask text/plain", 415, "POST", f"/v1/sessions/{session}/ask", b"why?", {"Content-Type": "text/plain"})
    expect("ask unknown session", 404, "POST", "/v1/sessions/" + "0" * 32 + "/ask", b'{"question": "x"}', hdr)
    expect("ask malformed session id", 404, "POST", "/v1/sessions/../ask", b'{"question": "x"}', hdr)
    st, h, _ = s.request("POST", "/v1/inspect", b"x", {"Content-Type": "image/png", "Content-Length": str(50 << 20)})
    check("error 413: Content-Length over the limit", st == 413, f"{st}")
    st, _, j = s.json("DELETE", "/v1/banks/bottle-line_1")
    check("bank delete", st == 200, f"{st} {j}")
    st, _, j = s.json("GET", "/v1/banks")
    check("bank gone", st == 200 and j["banks"] == [], f"{j}")

    st, h, text = s.request("GET", "/metrics")
    text = text.decode()
    check("metrics", st == 200 and 'agpt_http_requests_total{code="200"}' in text and
          'agpt_http_requests_total{code="415"}' in text and 'agpt_stage_seconds_bucket{stage="vision",le="+Inf"}' in text
          and "agpt_queue_depth 0" in text and "agpt_batch_size_count" in text and
          'agpt_http_requests_total{code="500"}' not in text, text[:300])
    finish()


# ---- load and bad requests ---------------------------------------------------------------------------------

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raw_exchange(s, data, read=True, timeout=10):
    """Sends bytes on a fresh socket; returns the status line's code (0 when the server just closed)."""
    sock = socket.create_connection((s.host, s.port), timeout=timeout)
    try:
        try:
            sock.sendall(data)
        except OSError:
            pass
        if not read:
            return 0
        got = b""
        try:
            while b"\r\n" not in got:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        parts = got.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    finally:
        sock.close()


def bad_requests(s, query, jpg):
    """(name, function returning (status, acceptable statuses))."""
    def http(method, path, body, headers):
        try:
            return s.request(method, path, body, headers, timeout=20)[0]
        except (ConnectionError, OSError):
            return 0  # the server closed the connection: acceptable for a body it refused

    corrupt_png = bytearray(query)
    for i in range(100, len(corrupt_png), 97):
        corrupt_png[i] ^= 0x5A
    corrupt_jpg = bytearray(jpg)
    for i in range(200, len(corrupt_jpg), 53):
        corrupt_jpg[i] ^= 0xFF
    big = b"\0" * (50 << 20)
    return [
        ("truncated body", lambda: (raw_exchange(s, b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                                 b"Content-Length: 100000\r\n\r\n" + query[:500], read=False), {0})),
        ("wrong content type", lambda: (http("POST", "/v1/inspect", query, {"Content-Type": "text/html"}), {415})),
        ("50 MB body", lambda: (http("POST", "/v1/inspect", big, {"Content-Type": "image/png"}), {413, 0})),
        ("invalid JSON", lambda: (http("POST", "/v1/sessions/" + "f" * 32 + "/ask", b"{]", {"Content-Type": "application/json"}), {404, 400})),
        ("corrupt PNG", lambda: (http("POST", "/v1/inspect", bytes(corrupt_png), {"Content-Type": "image/png"}), {400})),
        ("corrupt JPEG", lambda: (http("POST", "/v1/inspect", bytes(corrupt_jpg), {"Content-Type": "image/jpeg"}), {400, 200})),
        ("unknown path", lambda: (http("GET", "/admin/../../etc/passwd", None, {}), {404})),
        ("huge headers", lambda: (raw_exchange(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n"),
                                  {431, 413, 400, 0})),
        ("garbage request line", lambda: (raw_exchange(s, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n"),
                                          {400, 0})),
    ]


def slow_client(s, seconds):
    """Sends a request's headers one byte at a time; the server must keep serving everyone else."""
    try:
        sock = socket.create_connection((s.host, s.port), timeout=5)
        t_end = time.time() + seconds
        for b in b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"z" * 1000:
            if time.time() > t_end:
                break
            sock.send(bytes([b]))
            time.sleep(0.2)
        sock.close()
    except OSError:
        pass


def cmd_load(url, expected_path, pid, seconds):
    s = Server(url)
    pid, seconds = int(pid), float(seconds)
    expected = load_expected(expected_path)
    valid = [(p, open(p, "rb").read()) for p in expected if "#" not in p]
    query = open([p for p in expected if p.endswith("query.png")][0], "rb").read()
    jpg = [d for p, d in valid if p.endswith(".jpg")][0]
    bad = bad_requests(s, query, jpg)
    latencies, wrong, bad_seen = [], [], {}
    # Warm up (first requests allocate the arenas), then measure memory.
    for p, data in valid:
        s.request("POST", "/v1/inspect", data, {"Content-Type": image_type(data)})
    for name, f in bad:  # each kind once before the mix, so that every kind is covered however slow the machine
        st, allowed = f()
        bad_seen[name] = 1
        if st not in allowed:
            wrong.append(f"{name}: status {st}, want one of {sorted(allowed)}")
    rss0 = rss_kb(pid)
    t_end = time.time() + seconds
    slow = [threading.Thread(target=slow_client, args=(s, seconds)) for _ in range(3)]
    for t in slow:
        t.start()

    def client(k):
        rng = random.Random(k)
        n_bad = 0
        while time.time() < t_end:
            if rng.random() < 0.7:
                p, data = valid[rng.randrange(len(valid))]
                t0 = time.time()
                try:
                    st, _, body = s.request("POST", "/v1/inspect", data, {"Content-Type": image_type(data)})
                except OSError as e:
                    st, body = 0, str(e).encode()
                dt = time.time() - t0
                try:
                    j = json.loads(body)
                except ValueError:
                    j = None
                ok, why = same_answer(j, expected[p]) if st == 200 else (st == 429, f"status {st}")
                with lock:
                    if st == 200:
                        latencies.append(dt)
                    if not ok:
                        wrong.append(f"{os.path.basename(p)}: {why}")
            else:
                name, f = bad[(k + n_bad) % len(bad)]
                n_bad += 1
                st, allowed = f()
                with lock:
                    bad_seen[name] = bad_seen.get(name, 0) + 1
                    if st not in allowed:
                        wrong.append(f"{name}: status {st}, want one of {sorted(allowed)}")

    n_clients = 8
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads + slow:
        t.join()
    wall = time.time() - t0
    alive = os.path.exists(f"/proc/{pid}")
    check("server alive after the load", alive)
    st, _, _ = s.request("GET", "/healthz") if alive else (0, None, None)
    check("healthz after the load", st == 200)
    check("every answer as agpt detect's, every bad request refused", not wrong, "; ".join(wrong[:5]))
    check("every kind of bad request sent", len(bad_seen) == len(bad), f"{sorted(bad_seen)}")
    # Bodies are freed: what the load left in memory is bounded (cached sessions hold their images).
    rss1 = rss_kb(pid) if alive else 0
    check("RSS bounded", rss1 < rss0 + 200 * 1024, f"before {rss0} kB, after {rss1} kB")
    # Bodies are released once their connections close; a client that vanished mid-body is dropped after the
    # server's --timeout (3 s in tests/test_serve.sh).
    for _ in range(80):
        st, _, text = s.request("GET", "/metrics")
        text = text.decode()
        if "agpt_request_body_bytes 0\n" in text:
            break
        time.sleep(0.1)
    check("no 500 under load", 'code="500"' not in text, text[:200])
    held = [l for l in text.splitlines() if l.startswith("agpt_request_body_bytes ")]
    check("body bytes released", held == ["agpt_request_body_bytes 0"], f"{held}")
    lat = sorted(latencies)
    if lat:
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"load: {n_clients} clients + 3 slow ones, {wall:.1f} s: {len(lat)} valid inspections "
              f"({len(lat) / wall:.1f}/s), p50 {1e3 * p50:.1f} ms, p99 {1e3 * p99:.1f} ms; "
              f"{sum(bad_seen.values())} bad requests refused; RSS {rss0 // 1024} -> {rss1 // 1024} MB", flush=True)
    check("valid requests answered", len(lat) > 0)
    finish()


# ---- SIGTERM -----------------------------------------------------------------------------------------------

def cmd_drain(url, image, pid):
    s = Server(url)
    data = open(image, "rb").read()
    results = []

    def one():
        try:
            st, _, body = s.request("POST", "/v1/inspect", data, {"Content-Type": image_type(data)}, timeout=30)
            results.append(st)
        except OSError:
            results.append(0)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    os.kill(int(pid), signal.SIGTERM)
    for t in threads:
        t.join()
    # Requests that reached the queue were answered; any that came after the signal were refused with 503.
    check("in-flight requests finished on SIGTERM", results and all(st in (200, 503, 0) for st in results) and
          results.count(200) >= 1, f"{results}")
    finish()


# ---- the web page in a browser -----------------------------------------------------------------------------
# chromedriver spoken to directly over the W3C WebDriver protocol (HTTP + JSON), so that the test needs python3's
# standard library, chromium and chromium-driver only (tools/install-deps.sh), no selenium.

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
ENTER = "\ue007"


class WebDriverError(Exception):
    pass


class WebDriver:
    def __init__(self, driver_path, chromium, args):
        import subprocess
        with socket.socket() as sk:  # a free port for chromedriver
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([driver_path, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.sid = None
        try:
            for _ in range(200):
                try:
                    if self.cmd("GET", "/status").get("value", {}).get("ready"):
                        break
                except (OSError, WebDriverError):
                    pass
                if self.proc.poll() is not None:
                    raise WebDriverError(f"chromedriver exited with status {self.proc.returncode}")
                time.sleep(0.1)
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                     "goog:chromeOptions": {"binary": chromium, "args": args}}}}
            self.sid = self.cmd("POST", "/session", caps, timeout=120)["value"]["sessionId"]
        except Exception:
            self.quit()
            raise

    def cmd(self, method, path, body=None, timeout=60):
        import urllib.error
        import urllib.request
        data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json; charset=utf-8"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:  # W3C errors: {"value": {"error", "message"}}
            try:
                v = json.loads(e.read()).get("value", {})
            except ValueError:
                v = {}
            raise WebDriverError(f"{method} {path}: {v.get('error', e.code)}: {str(v.get('message', ''))[:300]}")

    def s(self, method, path, body=None):  # a command of this session; its "value"
        return self.cmd(method, f"/session/{self.sid}{path}", body).get("value")

    def get(self, url):
        self.s("POST", "/url", {"url": url})

    def title(self):
        return self.s("GET", "/title")

    def find(self, css):
        return self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css):
        return [e[ELEMENT] for e in self.s("POST", "/elements", {"using": "css selector", "value": css})]

    def text(self, css):
        return self.s("GET", f"/element/{self.find(css)}/text")

    def displayed(self, css):
        return bool(self.s("GET", f"/element/{self.find(css)}/displayed"))

    def attribute(self, css, name):
        return self.s("GET", f"/element/{self.find(css)}/attribute/{name}")

    def send_keys(self, css, text):
        self.s("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css):
        self.s("POST", f"/element/{self.find(css)}/click")

    def script(self, js):
        return self.s("POST", "/execute/sync", {"script": js, "args": []})

    def screenshot(self, path):
        import base64
        png = base64.b64decode(self.s("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(png)

    def wait_until(self, cond, what, timeout=30):
        t_end = time.time() + timeout
        while True:
            try:
                if cond():
                    return True
            except WebDriverError:
                pass  # the element is not there yet
            if time.time() > t_end:
                raise WebDriverError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)

    def quit(self):
        if self.sid:
            try:
                self.cmd("DELETE", f"/session/{self.sid}", timeout=20)
            except (OSError, WebDriverError):
                pass
            self.sid = None
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def cmd_page(url, expected_path, image, shot):
    import shutil
    chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
    driver_path = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if p and os.path.exists(p)),
                       None)
    if not chromium or not driver_path:
        print("SKIP: chromium or chromium-driver is not installed (tools/install-deps.sh)")
        sys.exit(77)
    expected = load_expected(expected_path)[image]
    d = WebDriver(driver_path, chromium, ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                                          "--window-size=1100,1000"])
    try:
        d.get(url)
        check("page title", d.title() == "agpt inspection", d.title())
        d.send_keys("#image", os.path.abspath(image))
        # Keyboard only: focus the button and press Enter.
        d.send_keys("#go", ENTER)
        d.wait_until(lambda: d.text("#status") in ("Done.", "Failed."), "the inspection")
        verdict = d.text("#verdict")
        want = expected["verdict"].upper() if expected["verdict"] else "no verdict"
        check("page verdict", verdict == want, f"{verdict!r} != {want!r}")
        answer = d.text("#answer")
        check("page answer = agpt detect", answer == expected["answer"].strip(), answer)
        src = d.attribute("#overlay", "src") or ""
        check("page heatmap overlay", src.startswith("data:image/png;base64,") and
              d.script("return document.getElementById('overlay').naturalWidth") > 0)
        check("page chat box shown", d.displayed("#chatbox"))
        d.send_keys("#question", "Where is the anomaly?" + ENTER)
        d.wait_until(lambda: len(d.find_all("#chat p.a")) == 1 or d.displayed("#error"), "the follow-up answer")
        check("page follow-up answered", len(d.find_all("#chat p.a")) == 1)
        check("page no error shown", not d.displayed("#error"), d.text("#error"))
        d.script("window.scrollTo(0, 0)")
        d.screenshot(shot)
        with open(shot, "rb") as f:
            head = f.read(8)
        check("screenshot saved", head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(shot) > 1000)
        # An API error is shown plainly.
        bad = os.path.join(os.path.dirname(os.path.abspath(shot)), "not-an-image.png")
        with open(bad, "wb") as f:
            f.write(b"this is not an image")
        d.send_keys("#image", bad)
        d.click("#go")
        d.wait_until(lambda: d.displayed("#error"), "the error message")
        err = d.text("#error")
        check("page shows API errors", "HTTP 400" in err and "not a PNG or JPEG" in err, err)
    except WebDriverError as e:
        check("page driven", False, str(e))
    finally:
        d.quit()
    finish()


# ---- a batch that fails is retried one by one --------------------------------------------------------------

def cmd_retry(url, expected_path, image):
    """The server runs with a short --context, --max-batch 4 and a long --batch-wait-ms: three plain inspections
    and one whose prompt passes the HTTP checks but not the model's context share one batch, which fails as a
    whole; retried one by one, the three get agpt detect's answers (still saying "batch": 4) and the one its 400."""
    s = Server(url)
    expected = load_expected(expected_path)[image]
    data = open(image, "rb").read()
    body, ct = multipart([("prompt", "Is there any defect " * 40)], [("image", "query.png", data)])
    results = [None] * 4

    def one(k):
        if k == 3:
            results[k] = s.json("POST", "/v1/inspect", body, {"Content-Type": ct})
        else:
            results[k] = s.json("POST", "/v1/inspect", data, {"Content-Type": "image/png"})

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        st, _, j = results[k]
        ok, why = same_answer(j, expected)
        check(f"request {k} of the failed batch answered as agpt detect", st == 200 and ok and j.get("batch") == 4,
              f"{st} {why} batch {j and j.get('batch')}")
    st, _, j = results[3]
    check("the request too long for the context refused alone", st == 400 and j and "context" in j.get("error", ""),
          f"{st} {j}")
    st, _, text = s.request("GET", "/metrics")
    check("no 500 from the retry", 'code="500"' not in text.decode())
    finish()


if __name__ == "__main__":
    cmds = {"api": cmd_api, "load": cmd_load, "page": cmd_page, "drain": cmd_drain, "retry": cmd_retry}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        print(__doc__)
        sys.exit(2)
    cmds[sys.argv[1]](*sys.argv[2:])
